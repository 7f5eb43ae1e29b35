"""A lever at another upstream seed: X-Learner and X-Learner[lever] only, scored on validation splits.

The lever screen (``xlearner run --ablation levers transfer.eval_split=val``) pairs its gains over
the transfer seeds of one upstream training; whether a gain holds across upstream trainings
needs more seeds, and the baselines are not needed for that. This runs the main job's parts of
the two X-Learners (expansion, squeeze, the lever's stages, export, transfer) at the given
``seed``, skips finished parts like ``xlearner run``, and writes the report (its ablation table
is the lever's gain at this seed):

    python benchmarks/lever_seeds.py --out runs/levers_s1 --seed 1 task_balanced_loss

Overrides (``key=value``) apply to the preset (``--preset``, default ``default``);
``transfer.eval_split=val`` is always set.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("levers", nargs="+", help="ablation names (docs/levers.md)")
    ap.add_argument("--out", required=True, help="run folder")
    ap.add_argument("--seed", type=int, required=True, help="upstream seed (the config's seed)")
    ap.add_argument("--preset", default="default")
    args, overrides = ap.parse_known_args()

    from xlearner.config import load_config
    from xlearner.files import write_json_atomic
    from xlearner.pipeline import ablation_names, build_parts, part_done, run_part
    from xlearner.report import write_report

    levers = ablation_names(args.levers)
    cfg = load_config(args.preset, [*overrides, f"seed={args.seed}", "transfer.eval_split=val"])
    out = Path(args.out)
    parts, methods = build_parts(cfg, out, levers)
    wanted = ["xlearner"] + [f"xlearner[{n}]" for n in levers]
    stage_dirs = {d for m in wanted for d in methods[m]}
    keep = [p for p in parts if p.name in stage_dirs
            or any(p.name == f"export {m}" or p.name.startswith(f"transfer {m} -> ") for m in wanted)]
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "methods.json", {m: methods[m] for m in wanted})
    t0 = time.time()
    for p in keep:
        if part_done(p):
            continue
        t = time.time()
        run_part(p, cfg)
        print(f"[lever_seeds seed {args.seed}] {p.name}: {time.time() - t:.1f} s", flush=True)
    print(f"[lever_seeds seed {args.seed}] done in {time.time() - t0:.0f} s; report: {write_report(out)}")


if __name__ == "__main__":
    main()
