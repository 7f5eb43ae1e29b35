"""Atomic, ``weights_only``-loadable training checkpoints.

Everything stored is a tensor or a plain python value (dict/list/tuple/int/float/str/
bool/None), so ``torch.load(path, weights_only=True)`` reads it back: RNG states are
converted (python's ``random`` state to a list, numpy's to a tensor + ints).

Writes are atomic (:func:`xlearner.files.write_atomic`: a temporary file in the same folder,
fsynced, then ``os.replace``d over the old one). A crash mid-write leaves
the previous checkpoint intact, plus a temporary file that the next start or resume of the
run removes (:func:`remove_stale_temp_files`). A write that fails (disk full, permission)
raises :class:`CheckpointWriteError`, which names the checkpoint and says whether an
earlier one is intact.
"""
from __future__ import annotations

import errno
import os
import pickle
import random
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xlearner.files import write_atomic

LAST = "last.pt"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space left, no permission); the previous one is intact."""


class CheckpointReadError(ValueError):
    """A checkpoint could not be read back (truncated, not a checkpoint, or not weights-only)."""


def remove_stale_temp_files(out_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed run left in ``out_dir`` (``checkpoints/.last.pt.*.tmp``,
    and ``.<name>.*.tmp`` (``files.write_atomic``) or ``.<name>.tmp<pid>`` of its outputs); return
    what was removed.

    Call it only where no other process writes into the same run folder (rank 0, at start).
    """
    out_dir = Path(out_dir)
    found = list((out_dir / "checkpoints").glob(f".{LAST}.*.tmp")) + list(out_dir.glob(".*.tmp*"))
    removed = []
    for p in found:
        if p.is_file():
            with suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def checkpoint_path(out_dir: str | os.PathLike) -> Path:
    """Where ``fit`` keeps the resumable checkpoint of a run folder."""
    return Path(out_dir) / "checkpoints" / LAST


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`xlearner.files.write_atomic`; a failed write raises
    :class:`CheckpointWriteError` (why, whether an earlier checkpoint is intact, the fix)."""
    path = Path(path)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            w = _Writer(f)
            try:
                torch.save(obj, w)
            except RuntimeError:
                if w.error is not None:  # torch hides the OSError behind "unexpected pos ..."
                    raise w.error from None
                raise

    try:
        write_atomic(path, write)
    except OSError as exc:
        intact = (f"the previous checkpoint {path} is intact" if path.is_file()
                  else "no earlier checkpoint exists")
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc  # write_atomic wraps the OSError
        code = getattr(cause, "errno", None)
        why = os.strerror(code) if code else str(cause)
        fix = "free disk space" if code == errno.ENOSPC else "fix the folder's space or permissions"
        err = CheckpointWriteError(
            f"cannot write checkpoint {path} ({why}); {intact}. {fix.capitalize()}, then rerun the same "
            f"command with --resume")
        err.errno = code or errno.EIO
        raise err from exc


class _Writer:
    """A file wrapper for torch.save that keeps the OSError of a failed write (torch reports only
    'unexpected pos'), so a full disk can be named as such."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`atomic_save` with ``weights_only=True``."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointReadError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain values, "
            f"which could run code (xlearner reads checkpoints with weights_only=True). It was not "
            f"written by `xlearner train`; delete it or start the run without --resume") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointReadError(
            f"{path}: cannot read the checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            f"it is damaged: delete it (the run restarts from step 0) or restore a copy") from None


# ---------------------------------------------------------------------------- RNG

def get_rng_state() -> dict[str, Any]:
    """torch CPU / CUDA, numpy and python ``random`` states, as plain values and tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [int(version), [int(x) for x in internal], gauss_next],
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), int(npst["pos"]),
                         int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i].to(torch.uint8), device=i)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
