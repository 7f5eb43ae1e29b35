"""Rank-0 run logs: ``log.jsonl``, TensorBoard (``tb/``) and a tqdm progress bar.

Every method is a no-op on a logger built with ``enabled=False`` (the other ranks).
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def _plain(v: Any) -> Any:
    """JSON-safe value: non-finite floats become None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _keep_until(path: Path, step: int) -> None:
    """Drop the lines of a resumed run's log written after its checkpoint's step."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the crash
        if int(rec.get("step", 0)) <= step:
            kept.append(line)
    path.write_text("".join(l + "\n" for l in kept))


class RunLogger:
    """A run's log: ``out_dir/log.jsonl``, TensorBoard scalars and a progress bar. Without a run
    folder (``out_dir=None``: a fit inside something bigger, e.g. transfer) only a transient
    progress bar and the validation lines on the console."""

    def __init__(self, out_dir: Path | None, *, enabled: bool, progress: bool, total_steps: int,
                 start_step: int, resumed: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self._f = None
        if not enabled:
            return
        if out_dir is None:
            if progress:
                self.bar = tqdm(total=total_steps, desc="train", leave=False, dynamic_ncols=True, mininterval=1.0,
                                file=sys.stderr)
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "log.jsonl"
        if resumed:
            _keep_until(self.path, start_step)
        else:
            self.path.write_text("")
        self._f = open(self.path, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"),
                                    purge_step=start_step + 1 if resumed and start_step > 0 else None)
        except Exception as exc:  # tensorboard missing or broken: keep training, say so
            warnings.warn(f"TensorBoard logging disabled: {exc}")
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            file=sys.stderr)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log_train(self, step: int, record: dict[str, float]) -> None:
        """One JSON line ``{"step": step, **record}`` and ``train/<key>`` scalars."""
        if not self.enabled:
            return
        if self._f is not None:
            self._f.write(json.dumps({"step": step, **_plain(record)}) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            post = {"loss": f"{record.get('total', float('nan')):.4g}"}
            if "images_per_s" in record:
                post["img/s"] = f"{record['images_per_s']:.1f}"
            self.bar.set_postfix(post, refresh=False)

    def log_val(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._f is not None:
            self._f.write(json.dumps({"step": step, "val": _plain(dict(metrics))}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"val/{k}", v, step)
        self.info(f"step {step} val: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                    for k, v in metrics.items()
                                                    if not isinstance(v, dict)))  # per-class: in the JSON log

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self._f is not None:
            self._f.close()
            self._f = None
