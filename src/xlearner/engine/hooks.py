"""What the training loop does between steps, as hooks (detectron2's ``HookBase``, cut down).

After each step the loop asks every hook whether it is due; if any is, it flushes the step
metrics once (one host sync) and runs the due hooks in list order. ``fit`` lists them as
log, evaluate, checkpoint: a step's log and validation lines are written before its checkpoint,
so a run killed in between resumes from the previous checkpoint and writes those lines again,
and the log never lacks a checkpointed step.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import checkpoint as ckpt
from .distributed import all_gather_object, barrier
from .logging import RunLogger
from .step_metrics import StepMetrics


class Hook:
    """``due(step, is_last)``: whether to run after this step; ``after_step(step)``: run
    (metrics already flushed). Every rank calls both: a hook that talks to other ranks does
    so on all of them."""

    def due(self, step: int, is_last: bool) -> bool:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        raise NotImplementedError


class LogHook(Hook):
    """A ``log.jsonl`` line (and TensorBoard scalars) every ``every`` steps and at the last."""

    def __init__(self, logger: RunLogger, metrics: StepMetrics, every: int, optimizer: torch.optim.Optimizer) -> None:
        self.logger, self.metrics, self.every, self.optimizer = logger, metrics, every, optimizer

    def due(self, step: int, is_last: bool) -> bool:
        return step % self.every == 0 or is_last

    def after_step(self, step: int) -> None:
        self.logger.log_train(step, self.metrics.take_window(self.optimizer.param_groups[0]["lr"]))


class EvalHook(Hook):
    """``evaluate(module, step)`` on rank 0 every ``every`` steps (0: never) and at the last, under
    ``no_grad``; the RNG state is restored afterwards so that evaluation does not shift the training
    streams. Keeps the last ``metrics`` and the summed wall time ``seconds`` (barrier included)."""

    def __init__(self, evaluate: Callable[[nn.Module, int], dict[str, float]], module: nn.Module,
                 logger: RunLogger, every: int, *, main: bool, distributed: bool) -> None:
        self.evaluate, self.module, self.logger, self.every = evaluate, module, logger, every
        self.main, self.distributed = main, distributed
        self.metrics: dict[str, float] = {}
        self.seconds = 0.0

    def due(self, step: int, is_last: bool) -> bool:
        return is_last or (self.every > 0 and step % self.every == 0)

    def after_step(self, step: int) -> None:
        t = time.perf_counter()
        if self.main:
            rng = ckpt.get_rng_state()
            try:
                with torch.no_grad():
                    self.metrics = dict(self.evaluate(self.module, step))
            finally:
                ckpt.set_rng_state(rng)
                self.module.train()
            self.logger.log_val(step, self.metrics)
        if self.distributed:
            barrier()
        self.seconds += time.perf_counter() - t


class CheckpointHook(Hook):
    """``state(step, rng)`` saved atomically to ``path`` by rank 0 every ``every`` steps and at the
    last; ``rng`` is every rank's RNG state, in rank order (gathered from all ranks when
    ``distributed``), so a resume continues each rank's streams exactly."""

    def __init__(self, path: Path, every: int, state: Callable[[int, list[Any]], dict], *, main: bool,
                 distributed: bool) -> None:
        self.path, self.every, self.state, self.main, self.distributed = path, every, state, main, distributed

    def due(self, step: int, is_last: bool) -> bool:
        return step % self.every == 0 or is_last

    def after_step(self, step: int) -> None:
        rng = all_gather_object(ckpt.get_rng_state()) if self.distributed else [ckpt.get_rng_state()]
        if self.main:
            ckpt.atomic_save(self.state(step, rng), self.path)
