"""The training loop's per-step figures, kept on the device until someone reads them.

A step hands :meth:`StepMetrics.record` one device tensor (its named losses, the total, the
gradient norm when clipping, its image count). Only :meth:`StepMetrics.flush`, called at log,
checkpoint, validation and final steps, brings the queued rows to the host: one sync and, under
DDP, one all-reduce, instead of a stall every step. The flush checks each row in step order, so
a non-finite loss is caught at the first of those points after it, before any checkpoint of
that step, and the error names the first bad step.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .distributed import all_reduce_sum


class NonFiniteLossError(RuntimeError):
    """A loss (or the gradient norm) became NaN/inf; the run stopped before checkpointing it."""

    def __init__(self, message: str, step: int, names: list[str]) -> None:
        super().__init__(message)
        self.step = step
        self.names = names


class StepMetrics:
    """Queued per-step rows, the current log window, the last losses and the call's image counts.

    ``grad_norm``: rows carry a gradient-norm column (clipping is on). ``on_nonfinite``:
    ``"error"`` raises :class:`NonFiniteLossError` at the first non-finite row, ``"skip"``
    counts such rows in the window (``skipped``) and leaves them out of its means.
    ``ckpt_path``: named in the error as the last good checkpoint (``None``: no run folder).
    """

    def __init__(self, *, world: int, grad_norm: bool, on_nonfinite: str, ckpt_path: Path | None,
                 images_seen: int = 0) -> None:
        self.world, self.grad_norm, self.on_nonfinite, self.ckpt_path = world, grad_norm, on_nonfinite, ckpt_path
        self.names: list[str] | None = None  # the losses' names, in the order of the rows' columns
        self.images_seen = images_seen  # over all ranks since step 1 (carried across resumes)
        self.call_images = 0  # over all ranks in this call
        self.last_losses: dict[str, float] = {}
        self.lr: float | None = None  # the lr of the last flushed step
        self.step_s = 0.0  # summed by the loop
        self.timed_t0: float | None = None  # end of the warm-up step: throughput is timed from here
        self.timed_images0 = 0
        self._pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, row on device)
        self.reset_window(time.perf_counter())

    def reset_window(self, now: float) -> None:
        self._sum: list[float] | None = None
        self.window_steps, self._images, self._skipped, self._t0 = 0, 0, 0, now

    def record(self, step: int, lr: float, row: torch.Tensor) -> None:
        """Queue a step's row ``[*losses, total, (grad_norm), images]``; nothing is read yet."""
        self._pending.append((step, lr, row))

    def flush(self) -> None:
        """Bring queued rows to the host (losses mean, images summed over ranks), check and accumulate them."""
        if not self._pending:
            return
        rows = torch.stack([r for _, _, r in self._pending]).double()
        if self.world > 1:
            rows[:, :-1] /= self.world  # losses: mean over ranks; last column (images): sum
            all_reduce_sum(rows)
        k = len(self.names)
        for (step, _, _), row in zip(self._pending, rows.cpu().tolist()):
            bad = self._nonfinite(step, row[:k], row[k], row[k + 1] if self.grad_norm else None)
            n_img = int(round(row[-1]))
            self.images_seen += n_img
            self.call_images += n_img
            self._images += n_img
            if bad:
                self._skipped += 1
                continue
            vec = row[:-1]
            self._sum = vec if self._sum is None else [a + b for a, b in zip(self._sum, vec)]
            self.window_steps += 1
            self.last_losses = {**dict(zip(self.names, row[:k])), "total": row[k]}
        self.lr = self._pending[-1][1]
        self._pending.clear()

    def _nonfinite(self, step: int, losses: list[float], total: float, gn: float | None) -> bool:
        """Whether the row is non-finite (to skip); raises :class:`NonFiniteLossError` in error mode."""
        if math.isfinite(total) and (gn is None or math.isfinite(gn)):
            return False
        if self.on_nonfinite != "error":
            return True
        self._pending.clear()
        bad = [n for n, v in zip(self.names, losses) if not math.isfinite(v)]
        what = (", ".join(f"'{n}'={v}" for n, v in zip(self.names, losses) if n in bad)
                or (f"total={total}" if not math.isfinite(total) else f"grad_norm={gn}"))
        path = self.ckpt_path
        good = (path if path is not None and path.is_file()
                else "none written yet" if path is not None else "none (no run folder)")
        raise NonFiniteLossError(
            f"non-finite loss at step {step}: {what} "
            f"(loss names: {bad or ['total' if not math.isfinite(total) else 'grad_norm']}); "
            f"no checkpoint was written for this step, last good checkpoint: {good}",
            step, bad or (["total"] if not math.isfinite(total) else ["grad_norm"]))

    def take_window(self, fallback_lr: float) -> dict[str, float]:
        """The log line of the window (flushed first): mean losses, lr, images/s, and ``skipped``
        in skip mode; the next window starts now."""
        now = time.perf_counter()
        rec: dict[str, float] = {}
        if self.window_steps:
            k = len(self.names)
            mean = [v / self.window_steps for v in self._sum]
            rec.update(zip(self.names, mean[:k]))
            rec["total"] = mean[k]
            if self.grad_norm:
                rec["grad_norm"] = mean[k + 1]
        rec["lr"] = self.lr if self.lr is not None else fallback_lr
        rec["images_per_s"] = self._images / max(now - self._t0, 1e-9)
        if self.on_nonfinite == "skip":
            rec["skipped"] = self._skipped
        self.reset_window(now)
        return rec

    def end_warmup(self) -> None:
        """The first step of a call is warm-up: the call's throughput is timed from its end (the
        caller has synchronised the device)."""
        self.flush()
        self.timed_t0, self.timed_images0 = time.perf_counter(), self.call_images

    def images_per_s(self, t_call: float, t_end: float, eval_s: float) -> float:
        """Images/s over all ranks from the end of the warm-up step to ``t_end``, evaluation excluded;
        a one-step call has no warm-up to exclude and is timed from ``t_call``."""
        timed_s = max(t_end - (self.timed_t0 or t_call) - eval_s, 1e-9)
        timed_images = self.call_images - self.timed_images0
        if timed_images == 0:
            timed_s, timed_images = max(t_end - t_call - eval_s, 1e-9), self.call_images
        return timed_images / timed_s
