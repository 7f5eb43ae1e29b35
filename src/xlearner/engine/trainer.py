"""The training loop: one function, :func:`fit`, read top to bottom.

The engine knows nothing of tasks. ``module(batch)`` returns the named scalar losses
of one optimizer step; the engine sums them (weighted), steps the optimizer and the
schedule, and takes care of devices, mixed precision, DDP, logs, checkpoints and the
non-finite-loss guard. It never looks inside a batch except to move its tensors to
the device (and, for the default images/s count, to read the leading dimension of
tensors stored under the key ``"images"``).

Loss values are kept on the device and only brought to the host (one sync, and one
all-reduce under DDP) at log, checkpoint, validation and final steps, so the loop does
not stall the GPU every step. A non-finite loss is therefore detected at the next of
those points, and always before a checkpoint is written: a checkpoint never contains
a step at or after a non-finite loss, and the error names the first bad step.
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from xlearner.config import TrainConfig

from . import checkpoint as ckpt
from .distributed import all_gather_object, all_reduce_sum, barrier, init_distributed
from .logging import RunLogger

__all__ = ["FitResult", "NonFiniteLossError", "fit", "lr_factor", "lr_scale_of", "build_optimizer",
           "build_scheduler", "default_count_images", "move_to_device"]


class NonFiniteLossError(RuntimeError):
    """A loss (or the gradient norm) became NaN/inf; the run stopped before checkpointing it."""

    def __init__(self, message: str, step: int, names: list[str]) -> None:
        super().__init__(message)
        self.step = step
        self.names = names


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


# ---------------------------------------------------------------------------- fit

def fit(module: nn.Module, loader, cfg: TrainConfig, out_dir: Path | None, *,
        loss_weights: dict[str, float] | None = None,
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

    ``module(batch) -> {name: scalar loss}``; the step's objective is
    ``sum(loss_weights.get(name, 1.0) * loss)``. ``loader`` is iterable (infinite) and
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
    if distributed:
        rank, world, local_rank = init_distributed()
    else:
        rank, world, local_rank = 0, 1, torch.cuda.current_device() if torch.cuda.is_available() else 0
    main = rank == 0
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp_dtype = _autocast_dtype(cfg.amp, device)
    weights = dict(loss_weights or {})
    count = count_images or default_count_images
    ckpt_path = ckpt.checkpoint_path(out_dir) if out_dir is not None else None

    if seed is not None:
        ckpt.seed_everything(seed + rank)
    module.to(device)
    if cfg.channels_last:
        module.to(memory_format=torch.channels_last)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer(module, cfg, device, lr_scales=lr_scales, decay_1d=decay_1d)
    scheduler = build_scheduler(optimizer, cfg)

    # a run killed while writing leaves temporary files; only rank 0 writes into out_dir
    stale = ckpt.remove_stale_temp_files(out_dir) if main and out_dir is not None else []
    start_step, images_seen, resumed_msg = 0, 0, None
    if resume:
        if ckpt_path.is_file():
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
            start_step, images_seen = int(state["step"]), int(state.get("images_seen", 0))
            resumed_msg = f"resumed from {ckpt_path} at step {start_step}"
        else:
            resumed_msg = f"no checkpoint at {ckpt_path}, starting fresh"

    model: nn.Module = module
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model, mode=cfg.compile_mode)

    log = RunLogger(out_dir, enabled=main, progress=cfg.progress, total_steps=cfg.steps,
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
    names: list[str] | None = None
    pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, row on device)
    # window accumulators for the next log line (host values)
    win = {"sum": None, "n": 0, "images": 0, "skipped": 0, "t0": time.perf_counter()}
    last_losses: dict[str, float] = {}
    metrics: dict[str, float] = {}
    eval_s = 0.0
    timed_t0, timed_images0, call_images = None, 0, 0
    gn_col = cfg.clip_grad is not None

    def flush() -> None:
        """Bring pending per-step values to the host (all-reduced), check them, accumulate."""
        nonlocal images_seen, call_images, last_losses
        if not pending:
            return
        rows = torch.stack([r for _, _, r in pending]).double()
        if world > 1:
            rows[:, :-1] /= world  # losses: mean over ranks; last column (images): sum
            all_reduce_sum(rows)
        values = rows.cpu().tolist()
        k = len(names)
        for (step, lr, _), row in zip(pending, values):
            losses, total = row[:k], row[k]
            gn = row[k + 1] if gn_col else None
            skipped = False
            if not math.isfinite(total) or (gn is not None and not math.isfinite(gn)):
                if on_nonfinite == "error":
                    pending.clear()
                    bad = [n for n, v in zip(names, losses) if not math.isfinite(v)]
                    what = (", ".join(f"'{n}'={v}" for n, v in zip(names, losses) if n in bad)
                            or (f"total={total}" if not math.isfinite(total) else f"grad_norm={gn}"))
                    good = (ckpt_path if ckpt_path is not None and ckpt_path.is_file()
                            else "none written yet" if ckpt_path is not None else "none (no run folder)")
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step}: {what} "
                        f"(loss names: {bad or ['total' if not math.isfinite(total) else 'grad_norm']}); "
                        f"no checkpoint was written for this step, last good checkpoint: {good}",
                        step, bad or (["total"] if not math.isfinite(total) else ["grad_norm"]))
                skipped = True
            n_img = int(round(row[-1]))
            images_seen += n_img
            call_images += n_img
            win["images"] += n_img
            if skipped:
                win["skipped"] += 1
                continue
            vec = row[:-1]
            win["sum"] = vec if win["sum"] is None else [a + b for a, b in zip(win["sum"], vec)]
            win["n"] += 1
            win["lr"] = lr
            last_losses = {**dict(zip(names, losses)), "total": total}
        win["lr"] = pending[-1][1]
        pending.clear()

    def write_log(step: int) -> None:
        now = time.perf_counter()
        rec: dict[str, float] = {}
        if win["n"]:
            mean = [v / win["n"] for v in win["sum"]]
            rec.update(zip(names, mean[:len(names)]))
            rec["total"] = mean[len(names)]
            if gn_col:
                rec["grad_norm"] = mean[len(names) + 1]
        rec["lr"] = win.get("lr", optimizer.param_groups[0]["lr"])
        rec["images_per_s"] = win["images"] / max(now - win["t0"], 1e-9)
        if on_nonfinite == "skip":
            rec["skipped"] = win["skipped"]
        log.log_train(step, rec)
        win.update(sum=None, n=0, images=0, skipped=0, t0=now)

    def save(step: int) -> None:
        # collective: every rank calls it (a lone process keeps to itself)
        rng = all_gather_object(ckpt.get_rng_state()) if distributed else [ckpt.get_rng_state()]
        if main:
            ckpt.atomic_save({
                "step": step,
                "images_seen": images_seen,
                "world_size": world,
                "model": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "loader": loader.state_dict() if hasattr(loader, "state_dict") else None,
                "rng": rng,
                "extra_state": extra_state,
            }, ckpt_path)

    def run_eval(step: int) -> None:
        nonlocal metrics, eval_s
        t = time.perf_counter()
        if main:
            rng = ckpt.get_rng_state()  # evaluation must not shift the training RNG streams
            try:
                with torch.no_grad():
                    metrics = dict(evaluate(module, step))
            finally:
                ckpt.set_rng_state(rng)
                module.train()
            log.log_val(step, metrics)
        if distributed:
            barrier()
        eval_s += time.perf_counter() - t

    step = start_step
    try:
        it = iter(loader)
        for step in range(start_step + 1, cfg.steps + 1):
            batch = move_to_device(next(it), device, cfg.channels_last)
            n_img = count(batch)
            with autocast():
                losses = model(batch)
            if names is None or list(losses) != names:
                flush()
                if names is not None and win["n"]:
                    write_log(step - 1)
                names = list(losses)
            total = sum(weights.get(n, 1.0) * losses[n].float() for n in names)
            total.backward()
            row = [losses[n].detach().float().reshape(()) for n in names] + [total.detach().reshape(())]
            if gn_col:
                row.append(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad).detach().float())
            lr = optimizer.param_groups[0]["lr"]
            do_update = True
            if on_nonfinite == "skip":
                ok = torch.isfinite(torch.stack(row[len(names):])).all().float().reshape(1)
                if world > 1:  # any rank non-finite -> every rank skips
                    ok = 1.0 - all_reduce_sum(1.0 - ok).clamp(max=1.0)
                do_update = bool(ok.item())
            if do_update:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            # a fill kernel, not torch.tensor(): a copy from pageable host memory would wait for the GPU
            row.append(torch.full((), float(n_img), device=device))
            pending.append((step, lr, torch.stack(row)))
            log.advance()

            if timed_t0 is None:  # the first step of the call is warm-up: time from its end
                _sync(device)
                flush()
                timed_t0, timed_images0 = time.perf_counter(), call_images
            is_last = step == cfg.steps
            due_log = step % cfg.log_every == 0 or is_last
            due_ckpt = out_dir is not None and (step % cfg.ckpt_every == 0 or is_last)
            due_val = evaluate is not None and (is_last or (cfg.val_every > 0 and step % cfg.val_every == 0))
            if due_log or due_ckpt or due_val:
                flush()
            # log and validation lines first, checkpoint last: a run killed in between resumes from the
            # previous checkpoint and writes those lines again, so the log never lacks a checkpointed step
            if due_log:
                write_log(step)
            if due_val:
                run_eval(step)
            if due_ckpt:
                save(step)
        flush()
        t_end = time.perf_counter()
        if step == start_step:  # nothing left to train (resumed a finished run)
            t_end = timed_t0 = time.perf_counter()
            if evaluate is not None:
                run_eval(step)
    finally:
        log.close()

    timed_s = max(t_end - (timed_t0 or t_call) - eval_s, 1e-9)
    timed_images = call_images - timed_images0
    if timed_images == 0:  # a one-step call: no warm-up to exclude
        timed_s, timed_images = max(t_end - t_call - eval_s, 1e-9), call_images
    return FitResult(steps=step, images_seen=images_seen, wall_s=time.perf_counter() - t_call,
                     images_per_s=timed_images / timed_s, last_losses=last_losses,
                     metrics=metrics if main else {}, eval_s=eval_s)
