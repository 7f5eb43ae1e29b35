"""Stages: what each stage builds and which losses it sums; `xlearner train CONFIG --stage ...`.

``STAGES`` is the one registry of stages (the CLI, the main job and the report read it); each is
a ``Stage`` (stages/stage.py: the contract). ``train_stage(cfg, name, out_dir)`` selects the
stage's sources, builds its module, trains it with the engine (``fit``; a stage of zero steps,
scratch, is saved untrained) and writes ``out_dir/model.safetensors`` (the product's state_dict)
and ``out_dir/run.json`` (stage, config, digest, tasks, sources, cost, metrics, status).
"""
from __future__ import annotations

import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Callable

import torch

from xlearner import tasks
from xlearner.config import ConfigError, RunConfig
from xlearner.models.nets import count_parameters
from xlearner.runs import RUN_JSON, WEIGHTS, run_folder_lock
from xlearner.files import write_bytes_atomic, write_json_atomic
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
    from xlearner.engine.distributed import init_distributed, join_restarted_group

    join_restarted_group()  # a group torchrun restarted joins under keys of its own attempt
    return init_distributed()


def save_product(net: torch.nn.Module, path: Path) -> None:
    """The product's state_dict as .safetensors; serialised in memory and written by Python, so a full disk
    is an OSError naming the file (safetensors' own writer reports it as a SafetensorError)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    write_bytes_atomic(path, save(state, metadata={"format": "pt"}))


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


def train_stage(cfg: RunConfig, stage: str, out_dir: Path, resume: bool = False, task: str | None = None,
                prepare: Callable[[RunConfig], bool] | None = None) -> dict:
    """Train one stage and write ``model.safetensors`` + ``run.json`` into ``out_dir`` (rank 0).

    The stage's own ``configure(cfg, task)`` is applied here, so a stage means the same from
    `xlearner train` as inside `xlearner run` (it is idempotent: the main job's parts come configured).
    Rank 0 holds the folder's lock while it trains (``runs.run_folder_lock``); ``prepare(cfg)``, if
    given, runs under that lock and decides ``resume`` (the CLI's resume and overwrite checks)."""
    stage_cls = get_stage(stage)
    cfg = stage_cls.configure(cfg, task)
    out_dir = Path(out_dir)
    rank, world_size, _ = _distributed()
    with ExitStack() as held:
        def take_folder() -> bool:
            out_dir.mkdir(parents=True, exist_ok=True)
            held.enter_context(run_folder_lock(out_dir))
            from xlearner.engine.checkpoint import remove_stale_temp_files

            remove_stale_temp_files(out_dir)  # left by a run killed while writing (fit does it too)
            return prepare(cfg) if prepare is not None else resume

        resume = _rank0_decides(take_folder, rank == 0)
        info = _run_stage(cfg, stage_cls, out_dir, resume, rank, world_size)
    from xlearner.engine.distributed import barrier

    barrier()  # other ranks may go on to a stage that reads these files (squeeze reads its teacher)
    return info


def _rank0_decides(decide: Callable[[], bool], main: bool) -> bool:
    """``decide()`` on rank 0; its answer, or its ConfigError, on every rank (none waits alone in a collective)."""
    from xlearner.engine.distributed import broadcast_object

    answer, error = None, None
    if main:
        try:
            answer = decide()
        except ConfigError as exc:
            error = exc
    answer, error = broadcast_object((answer, error))
    if error is not None:
        raise error
    return bool(answer)


def _run_stage(cfg: RunConfig, stage_cls: type[Stage], out_dir: Path, resume: bool, rank: int,
               world_size: int) -> dict:
    from xlearner.stages import common

    main, t0 = rank == 0, time.time()
    opened = common.OpenedSources()
    sources = stage_cls.select_sources(cfg, lambda s: len(opened[s]))
    datasets = {s.name: opened[s] for s in sources}
    if main:
        print(f"[{stage_cls.name}] sources: " + ", ".join(
            f"{s.name} ({s.task}, {len(datasets[s.name])} images, {datasets[s.name].num_classes} classes)"
            for s in sources), flush=True)
    torch.manual_seed(cfg.seed)
    module = stage_cls.build(cfg, common.source_specs(sources, datasets), out_dir)
    flops = _flops_per_image(cfg, module, sources)
    steps = stage_cls.steps(cfg)
    if steps == 0:
        common.report_bad_records(datasets, sources, verbose=main)
        result, bad_counts = None, common.bad_record_counts(datasets)
    else:
        result, bad_counts = _fit_stage(cfg, stage_cls.name, module, sources, datasets, steps, out_dir, resume,
                                        rank, world_size)
    info = _stage_record(cfg, stage_cls.name, module, sources, datasets, flops, result, bad_counts, t0)
    if main:
        save_product(module.product(), out_dir / WEIGHTS)
        write_json_atomic(out_dir / RUN_JSON, info)
        print(_done_line(info, out_dir), flush=True)
    return info


def _fit_stage(cfg: RunConfig, stage: str, module: Stage, sources: list, datasets: dict, steps: int,
               out_dir: Path, resume: bool, rank: int, world_size: int):
    """Train ``module`` with the engine; (the fit result, bad records per source over every rank)."""
    from xlearner.engine.trainer import fit
    from xlearner.stages import common

    data = common.build_stage_data(cfg, sources, rank=rank, world_size=world_size, datasets=datasets,
                                   target_encoders=module.target_encoders({s.name: cfg.size_of(s) for s in sources}))
    train_cfg = cfg.train.model_copy(update={"steps": steps})
    try:
        # the config rides in the checkpoint: `xlearner train --resume` compares it with the new one
        result = fit(module, data.loader, train_cfg, out_dir, evaluate=common.validation_hook(module, data, cfg, sources),
                     count_images=common.batch_images, resume=resume, seed=cfg.seed,
                     extra_state={"stage": stage, "config": cfg.to_dict()})
    finally:
        data.loader.close()
    bad_counts = common.bad_record_counts(datasets)  # includes the loader workers' skips
    if rank == 0:
        print(common.bad_records_line(bad_counts, {n: d.bad.count for n, d in data.val_datasets.items()},
                                      sources, "in training"), flush=True)
    return result, bad_counts


def _stage_record(cfg: RunConfig, stage: str, module: Stage, sources: list, datasets: dict, flops: tuple,
                  result, bad_counts: dict, t0: float) -> dict:
    """The run.json record: stage, config, sources, cost (images seen as the fit counted them), metrics, times."""
    from xlearner.stages import common

    train_f, frozen_f = flops
    steps = int(result.steps) if result is not None else 0
    batch = {s.name: s.batch_size for s in sources}
    total = int(result.images_seen) if result is not None else 0
    seen = {n: total * b // sum(batch.values()) for n, b in batch.items()}  # every step draws every source's batch
    gflops = common.training_gflops(train_f, seen) + common.training_gflops(frozen_f, seen, backward=False)
    product = module.product()
    times = {"fit_wall_s": 0.0, "fit_eval_s": 0.0, "train_images_per_s": 0.0}
    if result is not None:
        step_s = float(getattr(result, "step_s", 0.0) or 0.0)  # wall time inside training steps
        # milliseconds: a short stage's ratio must stay readable from step_s and fit_s
        times = {"fit_wall_s": round(result.wall_s, 3), "fit_eval_s": round(result.eval_s, 2),
                 "train_images_per_s": round(result.images_per_s, 1), "step_s": round(step_s, 3),
                 "fit_s": round(result.wall_s, 3), "time_in_steps": round(step_s / max(result.wall_s, 1e-9), 3)}
    return {
        "stage": stage,
        "config": cfg.to_dict(),
        "digest": cfg.digest(),
        "tasks": tasks.present([s.task for s in sources]),
        "sources": common.source_records(sources, datasets),
        "cost": {"images_seen": total, "gflops": float(gflops),
                 "backbone_params": int(count_parameters(product) - count_parameters(product.task_heads)),
                 "steps": steps, "gflops_per_image": {n: train_f[n] / 1e9 for n in train_f},
                 "teacher_gflops_per_image": {n: frozen_f[n] / 1e9 for n in frozen_f}},
        "metrics": dict(result.metrics or {}) if result is not None else {},
        # records skipped under on_bad_sample: skip (when opening the source, and while decoding,
        # in this process or in its DataLoader workers)
        "bad_records": bad_counts,
        "wall_s": round(time.time() - t0, 2),
        **times,
        "status": "done",
        **module.run_info(),
    }


def _done_line(info: dict, out_dir: Path) -> str:
    cost, metrics = info["cost"], info["metrics"]
    shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, (int, float)))
    split = ""
    if cost["steps"]:
        split = (f" (validation {info['fit_eval_s']:.1f}s, {info['time_in_steps']:.0%} of the fit in training steps, "
                 f"training {info['train_images_per_s']:.0f} images/s)")
    return (f"[{info['stage']}] done in {info['wall_s']:.1f}s{split}: {cost['steps']} steps, {cost['images_seen']} "
            f"images, {cost['gflops']:.2f} GFLOPs, backbone {cost['backbone_params'] / 1e6:.2f}M params"
            + (f"; val {shown}" if shown else "") + f" -> {out_dir}")


def train_stage_command(args) -> int:
    """``xlearner train CONFIG --stage S [--task T] [--resume [--allow-change KEY]] [--overwrite]``."""
    from xlearner.config import load_config
    from xlearner.engine.distributed import restart_count
    from xlearner.runs import RunLockedError, prepare_run_folder

    cfg = load_config(args.config, list(args.overrides or []))
    out = Path(args.out) if args.out else Path("runs") / cfg.name / args.stage
    stage_cls = get_stage(args.stage)
    if getattr(args, "task", None) and not stage_cls.per_task:
        per_task = [n for n, s in STAGES.items() if s.per_task]
        raise ConfigError(f"--task is for the stages trained once per task ({', '.join(per_task)}), not {args.stage}")

    def prepare(configured: RunConfig) -> bool:  # rank 0, under the folder's lock
        return prepare_run_folder(out, args.stage, configured.to_dict(), stage_steps=stage_cls.steps(configured),
                                  resume=bool(args.resume), overwrite=bool(getattr(args, "overwrite", False)),
                                  allow_change=list(getattr(args, "allow_change", None) or []),
                                  restarted=restart_count())
    try:
        train_stage(cfg, args.stage, out, task=getattr(args, "task", None), prepare=prepare)
    except Exception as exc:  # the CLI prints one line; the run folder keeps the traceback
        if out.is_dir() and not isinstance(exc, RunLockedError):  # a locked folder belongs to its holder
            import traceback

            with suppress(OSError):  # a full disk must not hide the original error
                (out / "error.log").write_text("".join(traceback.format_exception(exc)))
                exc.xlearner_log = str(out / "error.log")
        raise
    (out / "error.log").unlink(missing_ok=True)  # a resumed run that finished: the old error is history
    return 0
