"""The training loop: :func:`fit`, a short loop over steps with hooks between them.

The engine knows nothing of tasks. ``module(batch)`` returns the named scalar losses
of one optimizer step; the engine sums them, steps the optimizer and the schedule, and
takes care of devices, mixed precision, DDP, logs, checkpoints and the non-finite-loss
guard. It never looks inside a batch except to move its tensors to the device (and, for
the default images/s count, to read the leading dimension of tensors stored under the
key ``"images"``).

``fit`` reads top to bottom: the set-up (:func:`_set_up`, with the resume in
:func:`_resume`), then :func:`_train`, which runs :func:`_run_step` and, after a step,
the due hooks (``hooks.py``: log, evaluate, checkpoint, in that order). Loss values stay
on the device in :class:`~xlearner.engine.step_metrics.StepMetrics` and are only brought
to the host (one sync, and one all-reduce under DDP) at log, checkpoint, validation and
final steps, so the loop does not stall the GPU every step. A non-finite loss is
therefore detected at the next of those points, and always before a checkpoint is
written: a checkpoint never contains a step at or after a non-finite loss, and the
error names the first bad step.
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from xlearner.config import TrainConfig

from . import checkpoint as ckpt
from .distributed import all_reduce_sum, init_distributed
from .hooks import CheckpointHook, EvalHook, Hook, LogHook
from .logging import RunLogger
from .step_metrics import NonFiniteLossError, StepMetrics

__all__ = ["FitResult", "NonFiniteLossError", "fit", "lr_factor", "lr_scale_of", "build_optimizer",
           "build_scheduler", "default_count_images", "move_to_device"]


@dataclass
class FitResult:
    steps: int
    """The global step reached (== cfg.steps after a complete run)."""
    images_seen: int
    """Images seen over all ranks since step 1 (carried across resumes)."""
    wall_s: float
    """Wall time of this call."""
    images_per_s: float
    """Training throughput of this call over all ranks, first step (warm-up) and evaluation excluded."""
    last_losses: dict[str, float] = field(default_factory=dict)
    """The last step's named losses plus ``total`` (mean over ranks)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The last evaluation's metrics (rank 0; empty elsewhere or without ``evaluate``)."""
    eval_s: float = 0.0
    """Wall time of this call's evaluations (validation, precise BN): the part of ``wall_s`` that is not training."""
    step_s: float = 0.0
    """Wall time inside this call's training steps, summed: from fetching a batch to the end of the
    optimizer and schedule step (``step_s / wall_s``: the time in steps). Measured without a per-step
    sync, so on a GPU it is a host-side figure (fetching the batch and queueing the step's work)
    unless a sync happens in the step; the waits at log, checkpoint and validation steps fall outside it."""


# ---------------------------------------------------------------------------- pieces

def lr_factor(index: int, warmup_steps: int, steps: int, min_lr_ratio: float) -> float:
    """LR multiplier for the optimizer step with 0-based ``index``.

    Linear warmup ``(index+1)/warmup`` over the first ``warmup_steps`` steps, then a
    cosine from 1 down to ``min_lr_ratio``, reached at ``index == steps``.
    """
    if index < warmup_steps:
        return (index + 1) / warmup_steps
    progress = min(1.0, (index - warmup_steps) / max(1, steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scale_of(name: str, lr_scales: dict[str, float] | None) -> float:
    """The lr factor of parameter ``name``: that of the longest prefix of ``lr_scales`` naming it or
    one of its parent modules (``"backbone"`` covers ``backbone.conv1.weight``), else 1."""
    best, scale = -1, 1.0
    for prefix, factor in (lr_scales or {}).items():
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, scale = len(prefix), float(factor)
    return scale


def build_optimizer(module: nn.Module, cfg: TrainConfig, device: torch.device, *,
                    lr_scales: dict[str, float] | None = None, decay_1d: bool = False) -> torch.optim.Optimizer:
    """AdamW or SGD over trainable params; no weight decay on 1-D params (norms, biases) unless ``decay_1d``.

    ``lr_scales``: module-name prefix -> factor; those parameters train at ``cfg.lr * factor``
    (:func:`lr_scale_of`; a prefix naming no parameter is ignored). Groups: per factor (in the
    order the parameters come), the decayed parameters, then the others; without factors that is
    ``[decay, no_decay]``, the layout of the checkpoints written before these options existed.
    """
    for prefix, factor in (lr_scales or {}).items():
        if not factor >= 0:
            raise ValueError(f"lr_scales[{prefix!r}] = {factor}: a factor must be >= 0")
    scales: list[float] = []
    buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        scale = lr_scale_of(name, lr_scales)
        if scale not in scales:
            scales.append(scale)
        buckets.setdefault((scale, decay_1d or p.ndim > 1), []).append(p)
    if not buckets:
        raise ValueError("the module has no trainable parameters (all have requires_grad=False)")
    groups = []
    for scale in scales:
        for decays in (True, False):
            if (scale, decays) in buckets:
                group = {"params": buckets[scale, decays], "weight_decay": cfg.weight_decay if decays else 0.0}
                if scale != 1.0:
                    group["lr"] = cfg.lr * scale
                groups.append(group)
    if cfg.optimizer == "adamw":
        # fused: one kernel for all parameters, on CUDA and on the CPU (4x faster step there than the loop)
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type in ("cuda", "cpu") or None)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, steps, floor = cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio

    def factor(index: int) -> float:  # a plain function: LambdaLR's state_dict then stores None for it
        return lr_factor(index, warmup, steps, floor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def default_count_images(batch: Any) -> int:
    """Sum of the leading dims of every tensor stored under a key ``"images"``, at any depth."""
    n = 0
    if isinstance(batch, dict):
        for k, v in batch.items():
            if k == "images" and isinstance(v, torch.Tensor):
                n += int(v.shape[0]) if v.ndim else 1
            elif isinstance(v, (dict, list, tuple)):
                n += default_count_images(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            n += default_count_images(v)
    return n


def move_to_device(obj: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Tensors anywhere in dicts/lists/tuples go to ``device``; everything else is left as is."""
    if isinstance(obj, torch.Tensor):
        t = obj.to(device, non_blocking=True)
        if channels_last and t.ndim == 4 and t.is_floating_point():
            t = t.contiguous(memory_format=torch.channels_last)
        return t
    if isinstance(obj, dict):
        return {k: move_to_device(v, device, channels_last) for k, v in obj.items()}
    if isinstance(obj, list):
        return [move_to_device(v, device, channels_last) for v in obj]
    if isinstance(obj, tuple):
        return tuple(move_to_device(v, device, channels_last) for v in obj)
    return obj


def _autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA for ``auto`` and ``bf16``; on the CPU only when asked (``bf16``):
    torch's CPU autocast runs it (slowly without bf16 hardware), so the GPU code path can be
    tested on a CPU."""
    if amp == "fp32":
        return None
    if device.type == "cuda" or amp == "bf16":
        return torch.bfloat16
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- set-up and resume

@dataclass
class _Run:
    """What the set-up made: the pieces the step, the hooks and the result read."""
    cfg: TrainConfig
    module: nn.Module
    """The module itself: its state is checkpointed and evaluated."""
    model: nn.Module
    """What a step calls: ``module``, wrapped in DDP and/or compiled."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    params: list[nn.Parameter]
    device: torch.device
    autocast: Callable[[], Any]
    rank: int
    world: int
    distributed: bool
    ckpt_path: Path | None
    log: RunLogger
    start_step: int = 0
    images_seen: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _place(device: torch.device | None, distributed: bool) -> tuple[int, int, torch.device]:
    """``(rank, world, device)``: joins torchrun's process group when ``distributed``; the device
    defaults to this rank's GPU, else the CPU."""
    if distributed:
        rank, world, local_rank = init_distributed()
    else:
        rank, world, local_rank = 0, 1, torch.cuda.current_device() if torch.cuda.is_available() else 0
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return rank, world, device


def _resume(module: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loader, ckpt_path: Path,
            rank: int, world: int) -> tuple[int, int, str]:
    """Load the run folder's checkpoint into the module, optimizer, scheduler, loader and this rank's
    RNG streams; ``(step, images_seen, message)``, ``(0, 0, ...)`` when there is none."""
    if not ckpt_path.is_file():
        return 0, 0, f"no checkpoint at {ckpt_path}, starting fresh"
    state = ckpt.load_checkpoint(ckpt_path, map_location="cpu")
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("loader") is not None:
        loader.load_state_dict(state["loader"])
    rngs = state["rng"]
    if len(rngs) != world:
        warnings.warn(f"checkpoint holds RNG states of {len(rngs)} ranks, this run has {world}; "
                      "ranks reuse them modulo their count")
    ckpt.set_rng_state(rngs[rank % len(rngs)])
    step = int(state["step"])
    return step, int(state.get("images_seen", 0)), f"resumed from {ckpt_path} at step {step}"


def _wrap(module: nn.Module, cfg: TrainConfig, world: int, device: torch.device) -> nn.Module:
    """DDP over ranks (built after a resume: it broadcasts rank 0's weights), then ``torch.compile``."""
    model = module
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model, mode=cfg.compile_mode)
    return model


def prepare_module(module: nn.Module, device: torch.device, channels_last: bool,
                   amp_dtype: torch.dtype | None) -> None:
    """The module on its device and memory format, in train mode, as it will be stepped; under amp a
    stage's frozen nets (``cast_frozen_for_autocast``: the squeeze teacher) are kept in the autocast
    dtype. Shared with benchmarks/bench_stages.py so that what is measured is what trains."""
    module.to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    if amp_dtype is not None and hasattr(module, "cast_frozen_for_autocast"):
        module.cast_frozen_for_autocast(amp_dtype)
    module.train()


def _set_up(module: nn.Module, loader, cfg: TrainConfig, out_dir: Path | None, *, resume: bool,
            seed: int | None, device: torch.device | None, lr_scales: dict[str, float] | None,
            decay_1d: bool, distributed: bool) -> _Run:
    """Devices, seeds, optimizer and schedule, the resume, the DDP/compile wrap and the run log,
    in that order (the order the RNG streams and checkpoints were made with)."""
    rank, world, device = _place(device, distributed)
    amp_dtype = _autocast_dtype(cfg.amp, device)
    ckpt_path = ckpt.checkpoint_path(out_dir) if out_dir is not None else None
    if seed is not None:
        ckpt.seed_everything(seed + rank)
    prepare_module(module, device, cfg.channels_last, amp_dtype)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer(module, cfg, device, lr_scales=lr_scales, decay_1d=decay_1d)
    scheduler = build_scheduler(optimizer, cfg)
    # a run killed while writing leaves temporary files; only rank 0 writes into out_dir
    stale = ckpt.remove_stale_temp_files(out_dir) if rank == 0 and out_dir is not None else []
    start_step, images_seen, resumed_msg = 0, 0, None
    if resume:
        start_step, images_seen, resumed_msg = _resume(module, optimizer, scheduler, loader, ckpt_path, rank, world)
    model = _wrap(module, cfg, world, device)
    log = RunLogger(out_dir, enabled=rank == 0, progress=cfg.progress, total_steps=cfg.steps,
                    start_step=start_step, resumed=start_step > 0)
    if out_dir is not None:
        n_params = sum(p.numel() for p in params)
        log.info(f"xlearner fit: device={device} world_size={world} trainable_params={n_params:,} "
                 f"steps={cfg.steps} optimizer={cfg.optimizer} amp={amp_dtype or 'fp32'} out={out_dir}")
    if resumed_msg:
        log.info(resumed_msg)
    if stale:
        log.info(f"removed {len(stale)} temporary file(s) left by an interrupted run: "
                 + ", ".join(p.name for p in stale))
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    return _Run(cfg, module, model, optimizer, scheduler, params, device, autocast, rank, world, distributed,
                ckpt_path, log, start_step, images_seen)


# ---------------------------------------------------------------------------- the step and the loop

def _all_finite(values: list[torch.Tensor], world: int) -> bool:
    """Whether every value is finite on every rank (one host sync, and one all-reduce under DDP)."""
    ok = torch.isfinite(torch.stack(values)).all().float().reshape(1)
    if world > 1:  # any rank non-finite -> every rank skips
        ok = 1.0 - all_reduce_sum(1.0 - ok).clamp(max=1.0)
    return bool(ok.item())


def _run_step(run: _Run, batch: Any, step: int, count: Callable[[Any], int], metrics: StepMetrics,
              log_hook: LogHook, skip_nonfinite: bool) -> tuple[float, torch.Tensor]:
    """One optimizer step on ``batch``; ``(lr, row)`` with row ``[*losses, total, (grad_norm), images]``
    on the device. A change of the losses' names closes the log window of the old ones first."""
    cfg = run.cfg
    batch = move_to_device(batch, run.device, cfg.channels_last)
    n_img = count(batch)
    with run.autocast():
        losses = run.model(batch)
    if list(losses) != metrics.names:
        metrics.flush()
        if metrics.window_steps:
            log_hook.after_step(step - 1)
        metrics.names = list(losses)
    names = metrics.names
    total = sum(losses[n].float() for n in names)
    total.backward()
    row = [losses[n].detach().float().reshape(()) for n in names] + [total.detach().reshape(())]
    if cfg.clip_grad is not None:
        row.append(torch.nn.utils.clip_grad_norm_(run.params, cfg.clip_grad).detach().float())
    lr = run.optimizer.param_groups[0]["lr"]
    if not skip_nonfinite or _all_finite(row[len(names):], run.world):
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    # a fill kernel, not torch.tensor(): a copy from pageable host memory would wait for the GPU
    row.append(torch.full((), float(n_img), device=run.device))
    return lr, torch.stack(row)


def _train(run: _Run, loader, metrics: StepMetrics, hooks: list[Hook], step_fn: Callable[[Any, int], tuple]) -> int:
    """Steps ``start_step + 1 .. cfg.steps``, the due hooks after each; returns the step reached."""
    step = run.start_step
    it = iter(loader)
    for step in range(run.start_step + 1, run.cfg.steps + 1):
        t0 = time.perf_counter()
        lr, row = step_fn(next(it), step)
        metrics.step_s += time.perf_counter() - t0
        metrics.record(step, lr, row)
        run.log.advance()
        if metrics.timed_t0 is None:  # the first step of the call is warm-up: time from its end
            _sync(run.device)
            metrics.end_warmup()
        is_last = step == run.cfg.steps
        due = [h for h in hooks if h.due(step, is_last)]
        if due:
            metrics.flush()
        for hook in due:
            hook.after_step(step)
    return step


def _checkpoint_state(run: _Run, loader, metrics: StepMetrics, extra_state: dict | None,
                      step: int, rng: list[Any]) -> dict[str, Any]:
    return {
        "step": step,
        "images_seen": metrics.images_seen,
        "world_size": run.world,
        "model": run.module.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "loader": loader.state_dict() if hasattr(loader, "state_dict") else None,
        "rng": rng,
        "extra_state": extra_state,
    }


def _hooks(run: _Run, loader, metrics: StepMetrics, evaluate, extra_state: dict | None
           ) -> tuple[LogHook, EvalHook | None, list[Hook]]:
    """The hooks in the order they run after a step: log, evaluate, checkpoint (a run folder only),
    so that a step's log and validation lines precede its checkpoint."""
    log_hook = LogHook(run.log, metrics, run.cfg.log_every, run.optimizer)
    eval_hook = (EvalHook(evaluate, run.module, run.log, run.cfg.val_every, main=run.main,
                          distributed=run.distributed) if evaluate is not None else None)
    hooks: list[Hook] = [log_hook, *([eval_hook] if eval_hook else [])]
    if run.ckpt_path is not None:
        hooks.append(CheckpointHook(run.ckpt_path, run.cfg.ckpt_every,
                                    partial(_checkpoint_state, run, loader, metrics, extra_state),
                                    main=run.main, distributed=run.distributed))
    return log_hook, eval_hook, hooks


# ---------------------------------------------------------------------------- fit

def fit(module: nn.Module, loader, cfg: TrainConfig, out_dir: Path | None, *,
        evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None,
        count_images: Callable[[dict], int] | None = None,
        resume: bool = False, seed: int | None = 0,
        device: torch.device | None = None,
        extra_state: dict | None = None,
        on_nonfinite: str = "error",
        lr_scales: dict[str, float] | None = None,
        decay_1d: bool = False,
        distributed: bool = True) -> FitResult:
    """Train ``module`` for ``cfg.steps`` optimizer steps on batches drawn from ``loader``.

    ``module(batch) -> {name: scalar loss}``; the step's objective is the sum of the losses
    (a module weights its own losses). ``loader`` is iterable (infinite) and
    has ``state_dict()`` / ``load_state_dict()``. Under torchrun each rank passes its own
    loader (its share of the global batch); the module is wrapped in DDP.

    ``on_nonfinite``: ``"error"`` raises :class:`NonFiniteLossError` naming the loss(es)
    and the step, without checkpointing that step; ``"skip"`` drops the update of a step
    whose total loss is non-finite (checked every step, one host sync per step), counts
    it in the log (``skipped``) and goes on.

    ``out_dir=None``: a fit that is one step of something bigger (transfer): no checkpoint, no
    log files, no start line; a transient progress bar (``cfg.progress``) and validation lines
    only; ``resume`` needs a run folder. ``seed=None`` leaves the RNGs as the caller set them
    (a caller that seeded, then built its module and data, and wants the run to go on from
    there); an int seeds python, numpy and torch with ``seed + rank``. ``lr_scales`` and
    ``decay_1d``: see :func:`build_optimizer`. ``distributed=False``: this process trains alone
    even under torchrun (no process group joined, no DDP, no collectives).
    """
    if on_nonfinite not in ("error", "skip"):
        raise ValueError(f"on_nonfinite must be 'error' or 'skip', got {on_nonfinite!r}")
    if resume and out_dir is None:
        raise ValueError("resume needs a run folder (out_dir)")
    t_call = time.perf_counter()
    out_dir = Path(out_dir) if out_dir is not None else None
    run = _set_up(module, loader, cfg, out_dir, resume=resume, seed=seed, device=device, lr_scales=lr_scales,
                  decay_1d=decay_1d, distributed=distributed)
    metrics = StepMetrics(world=run.world, grad_norm=cfg.clip_grad is not None, on_nonfinite=on_nonfinite,
                          ckpt_path=run.ckpt_path, images_seen=run.images_seen)
    log_hook, eval_hook, hooks = _hooks(run, loader, metrics, evaluate, extra_state)
    step_fn = partial(_run_step, run, count=count_images or default_count_images, metrics=metrics,
                      log_hook=log_hook, skip_nonfinite=on_nonfinite == "skip")
    try:
        step = _train(run, loader, metrics, hooks, step_fn)
        metrics.flush()
        t_end = time.perf_counter()
        if step == run.start_step:  # nothing left to train (resumed a finished run)
            t_end = metrics.timed_t0 = time.perf_counter()
            if eval_hook is not None:
                eval_hook.after_step(step)
    finally:
        run.log.close()
    eval_s = eval_hook.seconds if eval_hook is not None else 0.0
    return FitResult(steps=step, images_seen=metrics.images_seen, wall_s=time.perf_counter() - t_call,
                     images_per_s=metrics.images_per_s(t_call, t_end, eval_s), last_losses=metrics.last_losses,
                     metrics=eval_hook.metrics if eval_hook is not None and run.main else {}, eval_s=eval_s,
                     step_s=metrics.step_s)
