"""Where fetched datasets live under $XLEARNER_HOME, and whether one is fetched in the current format."""
from __future__ import annotations

import json
import os
from pathlib import Path

from xlearner.data.embedded.catalog import FORMAT_VERSION, info

def xlearner_home(home: Path | str | None = None) -> Path:
    """The cache root: ``home``, else ``$XLEARNER_HOME``, else ``~/.cache/xlearner``."""
    if home is not None:
        return Path(home)
    return Path(os.environ.get("XLEARNER_HOME") or Path.home() / ".cache" / "xlearner")


def dataset_dir(name: str, home: Path | str | None = None) -> Path:
    return xlearner_home(home) / "datasets" / name


def read_meta(name: str, home: Path | str | None = None) -> dict | None:
    """The dataset's meta.json if it is fetched in the current format, else None."""
    p = dataset_dir(name, home) / "meta.json"
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except ValueError:
        return None
    return meta if meta.get("version") == FORMAT_VERSION else None


def is_fetched(name: str, home: Path | str | None = None) -> bool:
    i = info(name)
    if i.composed:
        return all(is_fetched(d, home) for d in i.depends)
    return read_meta(name, home) is not None
