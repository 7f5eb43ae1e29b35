"""`xlearner data fetch|list|show|check|pack`."""
from __future__ import annotations

import argparse
from pathlib import Path


def main(args: argparse.Namespace) -> int:
    from xlearner.data import embedded

    # errors (EmbeddedDataError, ConfigError, ...) go up to cli.main, which prints them and
    # picks the exit status
    if args.data_command == "fetch":
        for name in args.names or ():
            _known(name, "")
        embedded.fetch(args.names or None, force=args.force)
        return 0
    if args.data_command == "list":
        print(format_table(embedded.list_rows(fetch_missing=not args.no_fetch)))
        return 0
    if args.data_command == "show":
        return _show(args)
    if args.data_command == "check":
        from xlearner.errors import EXIT_DATA_PROBLEMS
        from xlearner.data.check import check_source_file
        problems = check_source_file(args.source_yaml)
        return EXIT_DATA_PROBLEMS if problems else 0
    if args.data_command == "pack":
        return _pack(args)
    raise AssertionError(args.data_command)


def _show(args: argparse.Namespace) -> int:
    from xlearner.data import embedded
    from xlearner.data.show import show_grid

    if args.name in embedded.EMBEDDED:
        ds = embedded.open_dataset(args.name, args.split)
    elif Path(args.name).suffix in (".yaml", ".yml") or Path(args.name).exists():
        from xlearner.config import load_source_config
        from xlearner.data.sources import build_source
        ds = build_source(load_source_config(args.name), args.split)
    else:
        _known(args.name, " (or give a source YAML file)")
        raise AssertionError(args.name)
    out = show_grid(ds, args.out, n=args.num, seed=args.seed)
    print(f"wrote {out}")
    return 0


def _pack(args: argparse.Namespace) -> int:
    import yaml

    from xlearner.config import ConfigError, load_source_config
    from xlearner.data.shards import MANIFEST, read_from_shards
    from xlearner.data.sources import pack_source

    if args.shard_samples < 1:
        raise ConfigError(f"--shard-samples must be at least 1, got {args.shard_samples}")
    cfg = load_source_config(args.source_yaml)
    out = Path(args.out)
    manifest = pack_source(cfg, out, shard_samples=args.shard_samples)
    packed = read_from_shards(cfg, out).model_dump(mode="json", exclude_none=True)
    (out / "source.yaml").write_text(yaml.safe_dump(packed, sort_keys=False))
    total = sum(s["samples"] for s in manifest["splits"].values())
    print(f"wrote {total} records of source '{cfg.name}' to {out} ({MANIFEST}); train from them with the "
          f"source {out / 'source.yaml'}")
    return 0


def _known(name: str, hint: str) -> None:
    """A name that is no embedded dataset is a usage error (exit 2) with the closest name, not a
    fetch failure (exit 7: a dataset that exists could not be fetched or verified)."""
    from xlearner.config import ConfigError
    from xlearner.data import embedded

    try:
        embedded.info(name)
    except embedded.EmbeddedDataError as exc:
        raise ConfigError(f"{exc}{hint}") from None


def format_table(rows: list[dict]) -> str:
    """An aligned text table; counts not yet known (not fetched) show as '-'."""
    cols = ["name", "task", "role", "classes", "train", "val", "test", "origin", "licence"]
    cells = [[("-" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(cols)]
    numeric = {"classes", "train", "val", "test"}

    def line(vals):
        return "  ".join(v.rjust(w) if c in numeric else v.ljust(w)
                         for c, v, w in zip(cols, vals, widths)).rstrip()

    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])
