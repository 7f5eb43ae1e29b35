"""Writing files so that a crash never leaves half a file: one helper for every writer.

``write_atomic(path, write)``: ``write(tmp)`` fills a temporary file in the same folder, which is
fsynced, renamed over ``path`` (``os.replace``: readers see the old or the new file, never a
mix) and the folder fsynced so the rename itself survives a power cut. Temporary names start
with ``.<name>.`` and end with ``.tmp``: ``engine.checkpoint.remove_stale_temp_files`` finds
the ones a killed run left.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable


class WriteError(OSError):
    """A file could not be written (disk full, no permission): the message names it, ``errno`` says why,
    and the file's previous version, if any, is intact (the CLI's exit status 6)."""

    def __str__(self) -> str:
        return str(self.args[-1]) if self.args else "write failed"


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (best effort: not every filesystem allows it)."""
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp_path)`` then fsync + rename over ``path`` + fsync of the folder; returns ``path``.

    On any error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_s = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_s)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise _write_error(path, exc) from exc
        raise
    fsync_dir(path.parent)
    return path


def _write_error(path: Path, exc: OSError) -> WriteError:
    code = exc.errno or errno.EIO
    reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc) or os.strerror(code))
    intact = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
    fix = "free disk space" if code in (errno.ENOSPC, errno.EDQUOT) else "fix the folder's space or permissions"
    return WriteError(code, f"cannot write {path} ({reason}); {intact}. {fix.capitalize()} and run "
                            f"the command again")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` into ``path`` atomically (a serialised model: a full disk is an OSError naming the file)."""
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2))


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in ``path``, or None when the file is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
