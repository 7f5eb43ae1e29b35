"""Can a transfer protocol rank backbones? On-task pretrained backbone vs random weights, on val.

Transfers two (or more) backbones to downstream datasets with the same seeds, on the
validation split (``transfer.eval_split=val``: protocol choices never look at test), and
prints per-seed scores and the paired difference of each backbone against the last one
(the reference, normally ``scratch``), with its standard error: the separation gate of the
report, for one protocol setting at a time.

    python benchmarks/separation.py --backbone msst_seg=runs/default/msst_seg \\
        --backbone scratch=runs/default/scratch --dataset composed_seg_animals \\
        --seeds 3 transfer.steps=400

Overrides (``key=value``) apply to the preset (``--config``, default ``default``).
"""
from __future__ import annotations

import argparse
import json
import math
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", action="append", required=True, metavar="NAME=PATH",
                    help="run folder or .safetensors; the last one is the reference (e.g. scratch)")
    ap.add_argument("--dataset", action="append", required=True)
    ap.add_argument("--config", default="default")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", default=None, help="append one JSON line per dataset to this file")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from xlearner.config import load_config
    from xlearner.report import paired, verdict
    from xlearner.transfer.suite import transfer_one

    cfg = load_config(args.config, ["transfer.eval_split=val", *args.overrides])
    pairs = [b.split("=", 1) for b in args.backbone]
    for ds in args.dataset:
        results = {}
        for name, path in pairs:
            t = time.perf_counter()
            r = transfer_one(path, ds, cfg, seeds=args.seeds, show_progress=False)
            results[name] = {"seeds": r["seeds"], "scores": [100 * s for s in r["scores"]],
                             "wall_s": round(time.perf_counter() - t, 1)}
            print(f"{ds} {name}: " + " ".join(f"{s:.1f}" for s in results[name]["scores"])
                  + f"  ({results[name]['wall_s']} s)", flush=True)
        ref = pairs[-1][0]
        for name, _ in pairs[:-1]:
            g, se, n = paired(results[name], results[ref])
            se_s = "n/a" if math.isnan(se) else f"{se:.1f}"
            print(f"{ds} {name} - {ref}: {g:+.1f} ± {se_s} over {n} seeds ({verdict(g, se)}) "
                  f"[{' '.join(args.overrides)}]", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"dataset": ds, "overrides": args.overrides, "results": results}) + "\n")


if __name__ == "__main__":
    main()
