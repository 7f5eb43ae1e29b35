"""A lever at another upstream seed: X-Learner and X-Learner[lever] only, scored on validation splits.

The lever screen (``xlearner run --ablation levers transfer.eval_split=val``) pairs its gains over
the transfer seeds of one upstream training; whether a gain holds across upstream trainings
needs more seeds, and the baselines are not needed for that. This runs the main job's parts of
the two X-Learners (expansion, squeeze, the lever's stages, export, transfer) at the given
``seed`` through ``xlearner run``'s own job (``main_job(..., only=...)``: finished parts are
skipped) and writes the report (its ablation table is the lever's gain at this seed):

    python benchmarks/lever_seeds.py --out runs/levers_s1 --seed 1 task_balanced_loss

Overrides (``key=value``) apply to the preset (``--preset``, default ``default``);
``transfer.eval_split=val`` is always set. Across upstream seeds, ``xlearner report`` with
several run folders gives each lever's mean gain ± its s.e. over the runs:

    xlearner report runs/levers_s0 runs/levers_s1 runs/levers_s2
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("levers", nargs="+", help="ablation names (docs/levers.md), then any key=value overrides")
    ap.add_argument("--out", required=True, help="run folder")
    ap.add_argument("--seed", type=int, required=True, help="upstream seed (the config's seed)")
    ap.add_argument("--preset", default="default")
    args, unknown = ap.parse_known_args()
    # argparse gives every positional to `levers`: the key=value ones are overrides
    overrides = unknown + [a for a in args.levers if "=" in a]
    args.levers = [a for a in args.levers if "=" not in a]

    from xlearner.config import load_config
    from xlearner.pipeline import ablation_names, main_job

    levers = ablation_names(args.levers)
    cfg = load_config(args.preset, [*overrides, f"seed={args.seed}", "transfer.eval_split=val"])
    main_job(cfg, Path(args.out), levers, only=["xlearner"] + [f"xlearner[{n}]" for n in levers])


if __name__ == "__main__":
    main()
