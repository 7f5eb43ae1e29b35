"""A stage's validation data: built on every read (as before) against once per process (``CachedEvalLoader``).

A stage validates every source twice (with its trained BatchNorm statistics, then with precise BN
estimated on a third set, of training images), and every stage of ``xlearner run`` validates the
same sources. This reads a preset's validation and precise-BN batches as ``stages`` stages in a
row would, data only (no model): once with the cache emptied before every read (every read
composes, decodes and transforms its images again, the behaviour before the cache), once with
the cache kept, and prints the seconds per source and in all, the ratio last. Usage:

    python benchmarks/bench_validation.py --preset gpu --stages 7
"""
from __future__ import annotations

import argparse
import time

import torch


def one_stage(data, cached: bool) -> dict[str, float]:
    """The reads of one stage's validation (``stages.train_stage``'s ``evaluate``), seconds per source."""
    from xlearner.data import loader

    def consume(batches) -> int:
        if not cached:
            loader._eval_cache.clear()  # every read builds its batches again, as before the cache
        return sum(int(b["images"].shape[0]) for b in batches)

    seconds = {}
    for name, val in data.val_loaders.items():
        t0 = time.perf_counter()
        consume(val)                        # trained statistics
        if name in data.bn_loaders:
            consume(data.bn_loaders[name])  # precise BN: estimate ...
            consume(val)                    # ... and validate again
        seconds[name] = time.perf_counter() - t0
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--stages", type=int, default=7, help="stages validated in one process (gpu preset: 7)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from xlearner.config import load_config
    from xlearner.data import loader
    from xlearner.stages import common

    cfg = load_config(args.preset, args.overrides)
    data = common.build_stage_data(cfg, cfg.sources)
    data.loader.close()
    rows = {}
    for mode in ("every read", "cached"):
        loader._eval_cache.clear()
        rows[mode] = [one_stage(data, cached=mode == "cached") for _ in range(args.stages)]
    print(f"bench_validation: preset {cfg.name}, {args.stages} stages' validation data in one process, "
          f"{args.threads} thread(s), seconds (val_batches {cfg.train.val_batches}, "
          f"precise_bn_batches {cfg.train.precise_bn_batches})")
    print(f"{'source':<12} {'every read: per stage':>22} {'cached: first stage':>20} {'cached: later stage':>20}")
    for name in data.val_loaders:
        every = sum(s[name] for s in rows["every read"]) / args.stages
        first = rows["cached"][0][name]
        later = sum(s[name] for s in rows["cached"][1:]) / max(1, args.stages - 1)
        print(f"{name:<12} {every:>22.2f} {first:>20.2f} {later:>20.3f}")
    total = {mode: sum(sum(s.values()) for s in per_stage) for mode, per_stage in rows.items()}
    print(f"{args.stages} stages: every read {total['every read']:.1f} s, cached {total['cached']:.1f} s; "
          f"ratio {total['every read'] / total['cached']:.1f}x less validation data time")


if __name__ == "__main__":
    main()
