"""Stages: what each stage builds and which losses it sums; `xlearner train CONFIG --stage ...`.

``STAGES`` is the one registry of stages (the CLI, the main job and the report read it); each is
a ``Stage`` (stages/stage.py: the contract). ``train_stage(cfg, name, out_dir)`` selects the
stage's sources, builds its module, trains it with the engine (``fit``; a stage of zero steps,
scratch, is saved untrained) and writes ``out_dir/model.safetensors`` (the product's state_dict)
and ``out_dir/run.json`` (stage, config, digest, tasks, sources, cost, metrics, status).
"""
from __future__ import annotations

import json
import time
from contextlib import suppress
from pathlib import Path

import torch

from xlearner import tasks
from xlearner.config import RunConfig
from xlearner.models.nets import count_parameters
from xlearner.runs import RUN_JSON, WEIGHTS
from xlearner.files import write_atomic, write_json_atomic
from xlearner.stages.baselines import MSMT, MSST, SSST, Scratch
from xlearner.stages.expansion import ExpansionStage
from xlearner.stages.squeeze import SqueezeStage
from xlearner.stages.stage import Stage

STAGES: dict[str, type[Stage]] = {s.name: s for s in (ExpansionStage, SqueezeStage, SSST, MSST, MSMT, Scratch)}


def get_stage(name: str) -> type[Stage]:
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None


def _distributed() -> tuple[int, int, int]:
    from xlearner.engine.distributed import init_distributed

    return init_distributed()


def save_product(net: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def _flops_per_image(cfg: RunConfig, module: Stage, sources: list) -> tuple[dict, dict]:
    """Forward backbone FLOPs per image for each source: (trained part, frozen nets)."""
    from xlearner.stages.common import backbone_flops_per_image

    was = module.training
    module.eval()  # counting must not move the BatchNorm running statistics
    device = next(module.parameters()).device
    try:
        train_f = {s.name: backbone_flops_per_image(lambda x, t=s.task: module.features(x, t), cfg.size_of(s), device)
                   for s in sources}
        frozen_f = {s.name: backbone_flops_per_image(lambda x, t=s.task: module.frozen_features(x, t),
                                                     cfg.size_of(s), device) for s in sources}
        if not any(frozen_f.values()):  # frozen_features gave None: no frozen net runs
            frozen_f = {}
    finally:
        module.train(was)
    return train_f, frozen_f


def train_stage(cfg: RunConfig, stage: str, out_dir: Path, resume: bool = False) -> dict:
    """Train one stage and write ``model.safetensors`` + ``run.json`` into ``out_dir`` (rank 0)."""
    from xlearner.stages import common

    stage_cls = get_stage(stage)
    out_dir = Path(out_dir)
    rank, world_size, _ = _distributed()
    main = rank == 0
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        from xlearner.engine.checkpoint import remove_stale_temp_files

        remove_stale_temp_files(out_dir)  # left by a run killed while writing (fit does it too)
    t0 = time.time()

    # --- sources and data --------------------------------------------------------------
    opened = common.OpenedSources()
    sources = stage_cls.select_sources(cfg, lambda s: len(opened[s]))
    datasets = {s.name: opened[s] for s in sources}
    specs = common.source_specs(sources, datasets)
    if main:
        print(f"[{stage}] sources: " + ", ".join(f"{s.name} ({s.task}, {len(datasets[s.name])} images, "
                                                    f"{datasets[s.name].num_classes} classes)" for s in sources),
              flush=True)

    torch.manual_seed(cfg.seed)
    module = stage_cls.build(cfg, specs, out_dir)
    train_f, frozen_f = _flops_per_image(cfg, module, sources)

    metrics: dict = {}
    steps = stage_cls.steps(cfg)
    bad_counts = None
    # where a stage's time goes: the fit, its validation (with precise BN), the training throughput
    fit_time = {"fit_wall_s": 0.0, "fit_eval_s": 0.0, "train_images_per_s": 0.0}
    if steps == 0:
        common.report_bad_records(datasets, sources, verbose=main)
    else:
        from xlearner.engine.trainer import fit

        data = common.build_stage_data(cfg, sources, rank=rank, world_size=world_size, datasets=datasets)

        def evaluate(_module, step) -> dict:
            out = common.evaluate_sources(module.predict, data.val_loaders, data.tasks, data.num_classes,
                                          max_batches=cfg.train.val_batches, module=module)
            # ... then per source with BatchNorm statistics re-estimated on its train images (precise BN)
            if data.bn_loaders:
                out.update(common.evaluate_precise_bn(module, data.val_loaders, data.bn_loaders, data.tasks,
                                                      data.num_classes, max_batches=cfg.train.val_batches))
            # fit evaluates on rank 0 only: its own counts here, the union over ranks at the end
            print(common.bad_records_line({n: d.bad.count for n, d in data.datasets.items()},
                                          {n: d.bad.count for n, d in data.val_datasets.items()},
                                          sources, f"by step {step}"), flush=True)
            return out

        train_cfg = cfg.train.model_copy(update={"steps": steps})
        try:
            result = fit(module, data.loader, train_cfg, out_dir, evaluate=evaluate, count_images=common.batch_images,
                         resume=resume, seed=cfg.seed, extra_state={"stage": stage})
        finally:
            data.loader.close()
        steps = int(result.steps)
        metrics = dict(result.metrics or {})
        fit_time = {"fit_wall_s": round(result.wall_s, 2), "fit_eval_s": round(result.eval_s, 2),
                    "train_images_per_s": round(result.images_per_s, 1)}
        bad_counts = common.bad_record_counts(datasets)  # includes the loader workers' skips
        if main:
            print(common.bad_records_line(bad_counts, {n: d.bad.count for n, d in data.val_datasets.items()},
                                          sources, "in training"), flush=True)

    # --- outputs ---------------------------------------------------------------------------
    seen = common.images_seen({s.name: s.batch_size for s in sources}, steps, world_size)
    gflops = common.training_gflops(train_f, seen) + common.training_gflops(frozen_f, seen, backward=False)
    product = module.product()
    backbone_params = count_parameters(product) - count_parameters(product.task_heads)
    info = {
        "stage": stage,
        "config": cfg.to_dict(),
        "digest": cfg.digest(),
        "tasks": tasks.present([s.task for s in sources]),
        "sources": common.source_records(sources, datasets),
        "cost": {"images_seen": int(sum(seen.values())), "gflops": float(gflops),
                 "backbone_params": int(backbone_params), "steps": steps,
                 "gflops_per_image": {n: train_f[n] / 1e9 for n in train_f},
                 "teacher_gflops_per_image": {n: frozen_f[n] / 1e9 for n in frozen_f}},
        "metrics": metrics,
        # records skipped under on_bad_sample: skip (when opening the source, and while decoding,
        # in this process or in its DataLoader workers)
        "bad_records": bad_counts or common.bad_record_counts(datasets),
        "wall_s": round(time.time() - t0, 2),
        **fit_time,
        "status": "done",
        **module.run_info(),
    }
    if main:
        save_product(product, out_dir / WEIGHTS)
        write_json_atomic(out_dir / RUN_JSON, info)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        split = (f" (validation {fit_time['fit_eval_s']:.1f}s, training {fit_time['train_images_per_s']:.0f} "
                 f"images/s)" if steps else "")
        print(f"[{stage}] done in {info['wall_s']:.1f}s{split}: {steps} steps, {info['cost']['images_seen']} images, "
              f"{gflops:.2f} GFLOPs, backbone {backbone_params / 1e6:.2f}M params"
              + (f"; val {shown}" if shown else "") + f" -> {out_dir}", flush=True)
    from xlearner.engine.distributed import barrier

    barrier()  # other ranks may go on to a stage that reads these files (squeeze reads its teacher)
    return info


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
