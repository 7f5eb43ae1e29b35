"""`xlearner data list`: one row per embedded dataset with its split sizes."""
from __future__ import annotations

from pathlib import Path

from xlearner.config import ComposerConfig
from xlearner.data.embedded.cache import is_fetched, read_meta
from xlearner.data.embedded.catalog import EMBEDDED, SPLITS
from xlearner.data.embedded.fetching import fetch

def list_rows(fetch_missing: bool = True, home: Path | str | None = None) -> list[dict]:
    """One row per embedded dataset: name, task, role, classes, split counts, origin, licence."""
    if fetch_missing:
        fetch(None, home=home)
    rows = []
    default = ComposerConfig()
    for name, i in EMBEDDED.items():
        if i.composed:
            counts = {"train": default.num_train, "val": default.num_val, "test": default.num_test}
            if not is_fetched(name, home):
                counts = {s: None for s in SPLITS}
        else:
            meta = read_meta(name, home)
            counts = meta["counts"] if meta else {s: None for s in SPLITS}
        rows.append({"name": name, "task": i.task, "role": i.role, "classes": len(i.class_names),
                     **{s: counts.get(s) for s in SPLITS}, "origin": i.origin, "licence": i.licence})
    return rows
