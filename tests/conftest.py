"""Shared fixtures.

`embedded_home` points XLEARNER_HOME at one cache shared by all tests (and by later test
runs): ``$XLEARNER_TEST_HOME`` if set, else ``~/.cache/xlearner``. Call it with dataset
names to fetch them (once; later runs find them cached):

    def test_x(embedded_home):
        home = embedded_home("nuclei", "mnist")
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


class EmbeddedHome:
    """The test cache root; calling it fetches the named embedded datasets into it."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, *names: str) -> Path:
        from xlearner.data.embedded import fetch
        if names:
            fetch(list(names), home=self.path)
        return self.path

    def __fspath__(self) -> str:
        return str(self.path)


@pytest.fixture(scope="session")
def embedded_home():
    path = Path(os.environ.get("XLEARNER_TEST_HOME") or Path.home() / ".cache" / "xlearner")
    path.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("XLEARNER_HOME")
    os.environ["XLEARNER_HOME"] = str(path)
    yield EmbeddedHome(path)
    if old is None:
        os.environ.pop("XLEARNER_HOME", None)
    else:
        os.environ["XLEARNER_HOME"] = old


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a busy 2-core box: intra-op threads only add synchronisation stalls.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def full_disk(monkeypatch):
    """Call it to put every temp file ``files.write_atomic`` makes on a full device (/dev/full): writes
    raise ENOSPC (through the test's own ``monkeypatch``: its ``undo()`` lifts it)."""
    import tempfile

    from xlearner import files

    real = tempfile.mkstemp

    def mkstemp(**kw):
        fd, name = real(**kw)
        os.close(fd)
        os.unlink(name)
        os.symlink("/dev/full", name)
        return os.open(name, os.O_WRONLY), name

    return lambda: monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
