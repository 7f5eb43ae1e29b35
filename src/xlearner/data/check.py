"""`xlearner data check`: read every record of a source and list every problem, not just the first.

Each split is opened under the skip policy (so construction collects all annotation-level
problems instead of stopping), then every image is decoded and every target validated
against the schema. One line per problem (file, record, fix), then a summary line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from xlearner.config import ConfigError, SourceConfig, load_source_config
from xlearner.data.schema import BadSampleError, check_image, validate_target

SPLITS = ("train", "val", "test")


def check_source(cfg: SourceConfig, echo: Callable[[str], None] = print) -> int:
    """Check all splits of one source; return the number of problems."""
    from xlearner.data.sources import open_source

    lenient = cfg.model_copy(update={"on_bad_sample": "skip"})
    problems = records = 0

    def problem(text: str) -> None:
        nonlocal problems
        problems += 1
        echo(f"PROBLEM {text}")

    files = cfg.format not in ("embedded", "shards")  # splits given as paths in the config
    for split in SPLITS:
        if split == "val" and cfg.format == "shards":
            from xlearner.data.shards import read_manifest

            try:
                if "val" not in read_manifest(cfg.root)["splits"]:
                    echo("[val] no val split was packed")
                    continue
            except BadSampleError:
                pass  # opening the split reports it
        if split != "train" and files and cfg.val_fraction == 0:
            from xlearner.data.readers import split_paths

            if not split_paths(cfg, split)[1]:  # no such split declared: nothing to check, not a problem
                echo(f"[{split}] no {split} split (val_fraction: 0 and no {split}_* paths)")
                continue
        if split == "test" and files and not any(
                getattr(cfg, f"test_{k}") is not None for k in ("root", "annotations", "masks")):
            echo("[test] no test split given: test is the val split (already checked)")
            continue  # known before opening it: a val that cannot be opened is reported once
        try:
            ds = open_source(lenient, split)
        except (BadSampleError, ConfigError, OSError, ValueError, KeyError) as exc:
            problem(f"[{split}] {exc}")
            continue
        if split == "test" and getattr(ds, "test_is_val", False):
            echo(f"[test] no test split given: test is the val split (already checked)")
            continue
        for msg in ds.bad.skipped:
            problem(f"[{split}] {msg}")
        for msg in getattr(ds, "verify", lambda: [])():  # shards: each file against its sha256
            problem(f"[{split}] {msg}")
        load = getattr(ds, "load", None)  # readers: decode without the skip fallback
        for i in range(len(ds)):
            where = getattr(getattr(ds, "records", None), "__getitem__", lambda _: None)(i)
            where = where.where if where is not None else f"{cfg.name} {split} record {i}"
            try:
                image, target = load(i) if load is not None else ds[i]
                check_image(image, where)
            except Exception as exc:  # a checker reports, it does not stop
                problem(f"[{split}] {exc}")
                continue
            records += 1
            msg = validate_target(ds.task, image, target, ds.num_classes, where)
            if msg:
                problem(f"[{split}] {msg}; fix the record")
        echo(f"[{split}] {len(ds)} records, {ds.num_classes} classes")
    echo(f"source '{cfg.name}' ({cfg.format}, {cfg.task}): {records} records read, "
         f"{problems} problem{'s' if problems != 1 else ''}")
    return problems


def check_source_file(path: str | Path) -> int:
    """Load a one-source YAML and check it; the caller turns a non-zero count into exit status 1."""
    return check_source(load_source_config(path))
