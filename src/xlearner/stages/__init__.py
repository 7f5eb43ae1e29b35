"""Stages: what each stage builds and which losses it sums; `xlearner train CONFIG --stage ...`.

``train_stage(cfg, stage, out_dir)`` builds the stage's data and module, trains it with the
engine (``fit``), and writes ``out_dir/model.safetensors`` (the product's state_dict) and
``out_dir/run.json`` (stage, config, digest, tasks, sources, cost, metrics, status).
"""
from __future__ import annotations

import json
import os
import time
from contextlib import suppress
from pathlib import Path

import torch

from xlearner.config import RunConfig

STAGES = ("expansion", "squeeze", "ssst", "msst", "msmt", "scratch")


def _distributed() -> tuple[int, int, int]:
    from xlearner.engine.distributed import init_distributed

    return init_distributed()


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_product(net: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    _write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def _flops_per_image(cfg: RunConfig, stage: str, module: torch.nn.Module, sources: list) -> tuple[dict, dict]:
    """Forward backbone FLOPs per image for each source: (trained part, frozen teacher part)."""
    from xlearner.stages.common import backbone_flops_per_image

    was = module.training
    module.eval()  # counting must not move the BatchNorm running statistics
    device = next(module.parameters()).device
    try:
        train_f = {s.name: backbone_flops_per_image(lambda x, t=s.task: module.run_backbone(x, t), cfg.size_of(s), device)
                   for s in sources}
        teacher_f = {}
        if stage == "squeeze" and module.uses_teacher:
            teacher_f = {s.name: backbone_flops_per_image(lambda x, t=s.task: module.run_teacher(x, t), cfg.size_of(s), device)
                         for s in sources}
    finally:
        module.train(was)
    return train_f, teacher_f


def build_stage_module(cfg: RunConfig, stage: str, specs: list, out_dir: Path | None = None):
    if stage == "expansion":
        from xlearner.stages.expansion import ExpansionStage

        return ExpansionStage(cfg, specs)
    if stage == "squeeze":
        from xlearner.runs import load_teacher, resolve_teacher_dir
        from xlearner.stages.squeeze import SqueezeStage

        default = out_dir.parent / "expansion" if out_dir is not None else None
        teacher_dir = resolve_teacher_dir(cfg.squeeze.teacher, default)
        teacher, _, _ = load_teacher(teacher_dir)
        print(f"squeeze: teacher {teacher_dir}", flush=True)
        generalist = None
        if cfg.squeeze.generalist:
            from xlearner.runs import load_generalist, resolve_generalist_dir

            g_dir = resolve_generalist_dir(cfg.squeeze.generalist, out_dir.parent / "msmt" if out_dir is not None else None)
            generalist = load_generalist(g_dir)
            print(f"squeeze: generalist teacher {g_dir}", flush=True)
        return SqueezeStage(cfg, specs, teacher, generalist)
    from xlearner.stages.baselines import BaselineStage

    return BaselineStage(cfg, specs)


def train_stage(cfg: RunConfig, stage: str, out_dir: Path, resume: bool = False) -> dict:
    """Train one stage and write ``model.safetensors`` + ``run.json`` into ``out_dir`` (rank 0)."""
    from xlearner.stages import common
    from xlearner.stages.baselines import select_sources

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    out_dir = Path(out_dir)
    rank, world_size, _ = _distributed()
    main = rank == 0
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        from xlearner.engine.checkpoint import remove_stale_temp_files

        remove_stale_temp_files(out_dir)  # left by a run killed while writing (fit does it too)
    t0 = time.time()

    # --- sources and data --------------------------------------------------------------
    datasets: dict = {}
    if stage == "ssst" and cfg.baselines.ssst_source is None:
        cls_sources = [s for s in cfg.sources if s.task == "cls"]
        datasets.update(common.build_datasets(cls_sources))
        sources = select_sources(cfg, stage, {n: len(d) for n, d in datasets.items()})
    else:
        sources = select_sources(cfg, stage)
    missing = [s for s in sources if s.name not in datasets]
    datasets.update(common.build_datasets(missing))
    datasets = {s.name: datasets[s.name] for s in sources}
    specs = common.source_specs(sources, datasets)
    if main:
        print(f"[{stage}] sources: " + ", ".join(f"{s.name} ({s.task}, {len(datasets[s.name])} images, "
                                                    f"{datasets[s.name].num_classes} classes)" for s in sources),
              flush=True)

    torch.manual_seed(cfg.seed)
    module = build_stage_module(cfg, stage, specs, out_dir)
    train_f, teacher_f = _flops_per_image(cfg, stage, module, sources)

    metrics: dict = {}
    steps = 0
    bad_counts = None
    if stage == "scratch":
        common.report_bad_records(datasets, sources, verbose=main)
        fit_wall = 0.0
    else:
        from xlearner.engine.trainer import fit

        data = common.build_stage_data(cfg, sources, rank=rank, world_size=world_size, datasets=datasets)
        tasks = {s.name: s.task for s in sources}
        num_classes = {s.name: int(datasets[s.name].num_classes) for s in sources}

        def evaluate(_module, step, *_args, **_kwargs) -> dict:
            out = common.evaluate_sources(module.predict, data.val_loaders, tasks, num_classes,
                                          max_batches=cfg.train.val_batches, module=module)
            # ... then per source with BatchNorm statistics re-estimated on its train images (precise BN)
            if data.bn_loaders:
                out.update(common.evaluate_precise_bn(module, data.val_loaders, data.bn_loaders, tasks, num_classes,
                                                      max_batches=cfg.train.val_batches))
            # fit evaluates on rank 0 only: its own counts here, the union over ranks at the end
            print(common.bad_records_line({n: d.bad.count for n, d in data.datasets.items()},
                                          {n: d.bad.count for n, d in data.val_datasets.items()},
                                          sources, f"by step {step}"), flush=True)
            return out

        try:
            result = fit(module, data.loader, cfg.train, out_dir,
                         loss_weights={s.name: float(s.loss_weight) for s in sources},
                         evaluate=evaluate, count_images=common.batch_images, resume=resume,
                         seed=cfg.seed, extra_state={"stage": stage, "digest": cfg.digest()})
        finally:
            close = getattr(data.loader, "close", None)
            if close is not None:
                close()
        steps = int(result.steps)
        metrics = dict(result.metrics or {})
        fit_wall = float(getattr(result, "wall_s", time.time() - t0))
        bad_counts = common.bad_record_counts(datasets)  # includes the loader workers' skips
        if main:
            print(common.bad_records_line(bad_counts, {n: d.bad.count for n, d in data.val_datasets.items()},
                                          sources, "in training"), flush=True)

    # --- outputs ---------------------------------------------------------------------------
    seen = common.images_seen({s.name: s.batch_size for s in sources}, steps, world_size)
    gflops = common.training_gflops(train_f, seen) + common.training_gflops(teacher_f, seen, backward=False)
    product = module.product()
    backbone_params = common.count_params(product) - common.count_params(product.task_heads)
    info = {
        "stage": stage,
        "config": cfg.to_dict(),
        "digest": cfg.digest(),
        "tasks": [t for t in ("cls", "det", "seg") if any(s.task == t for s in sources)],
        "sources": common.source_records(sources, datasets),
        "cost": {"images_seen": int(sum(seen.values())), "gflops": float(gflops),
                 "backbone_params": int(backbone_params), "steps": steps,
                 "gflops_per_image": {n: train_f[n] / 1e9 for n in train_f},
                 "teacher_gflops_per_image": {n: teacher_f[n] / 1e9 for n in teacher_f}},
        "metrics": metrics,
        # records skipped under on_bad_sample: skip (when opening the source, and while decoding,
        # in this process or in its DataLoader workers)
        "bad_records": bad_counts or {s.name: int(getattr(getattr(datasets[s.name], "bad", None), "count", 0) or 0)
                                      for s in sources},
        "wall_s": round(time.time() - t0, 2),
        "fit_wall_s": round(fit_wall, 2),
        "status": "done",
    }
    if stage == "squeeze":
        info["teacher"] = str(resolve_teacher(cfg, out_dir))
    if main:
        save_product(product, out_dir / "model.safetensors")
        _write_atomic(out_dir / "run.json", lambda tmp: tmp.write_text(json.dumps(info, indent=2)))
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        print(f"[{stage}] done in {info['wall_s']:.1f}s: {steps} steps, {info['cost']['images_seen']} images, "
              f"{gflops:.2f} GFLOPs, backbone {backbone_params / 1e6:.2f}M params"
              + (f"; val {shown}" if shown else "") + f" -> {out_dir}", flush=True)
    from xlearner.engine.distributed import barrier

    barrier()  # other ranks may go on to a stage that reads these files (squeeze reads its teacher)
    return info


def resolve_teacher(cfg: RunConfig, out_dir: Path) -> Path:
    from xlearner.runs import resolve_teacher_dir

    return resolve_teacher_dir(cfg.squeeze.teacher, Path(out_dir).parent / "expansion")


def train_stage_command(args) -> int:
    from xlearner.config import load_config

    cfg = load_config(args.config, list(args.overrides or []))
    out = Path(args.out) if args.out else Path("runs") / cfg.name / args.stage
    try:
        train_stage(cfg, args.stage, out, resume=bool(args.resume))
    except Exception as exc:  # the CLI prints one line; the run folder keeps the traceback
        if out.is_dir():
            import traceback

            with suppress(OSError):  # a full disk must not hide the original error
                (out / "error.log").write_text("".join(traceback.format_exception(exc)))
                exc.xlearner_log = str(out / "error.log")
        raise
    (out / "error.log").unlink(missing_ok=True)  # a resumed run that finished: the old error is history
    return 0
