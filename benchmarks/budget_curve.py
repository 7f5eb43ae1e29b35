"""When does X-Learner pay? Its gain over MSMT and the on-task baselines against the training budget.

Runs the main job (``xlearner run``) of a preset at several budgets and upstream seeds, every
method's steps scaled alike (``train.steps``, ``baselines.steps``, ``train.warmup_steps``; transfer
unchanged), one run folder per (budget, seed): ``OUT/x<budget>_s<seed>``. Each run is resumable
(the main job skips finished parts), so the curve is too: run the same command again after an
interruption, or with more seeds. After every run it rewrites, from the runs finished so far:

- ``OUT/budget.md``: per budget and task type, X-Learner's gain over each baseline (mean ± s.e. over
  upstream seeds, win / tie / loss), the retention (X-Learner minus its best teacher), the slope of
  the gain per doubling of the budget, and the verdict;
- ``OUT/budget.json``: the same numbers; ``OUT/budget.png``: gain over MSMT and retention against budget.

    python benchmarks/budget_curve.py --out runs/budget                 # default: 1x 2x 4x, seeds 0 1 2
    python benchmarks/budget_curve.py --out runs/budget --seeds 0,1 --budgets 1,2,4,8
    python benchmarks/budget_curve.py --out runs/budget --summary-only  # tables and plot from what is there

Runs go seed by seed (every budget at seed 0, then at seed 1, ...), so a curve cut short has
every budget at the seeds it reached.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

# The curve's methods: X-Learner, its teachers, the multi-task baseline and the on-task ones, and
# random weights (ssst and msst_cls are left out: X-Learner wins against them at every budget measured).
METHODS = ["xlearner", "xlearner.expansion[cls]", "xlearner.expansion[det]", "xlearner.expansion[seg]",
           "msmt", "msst_det", "msst_seg", "scratch"]


def scaled_overrides(preset: str, budget: float, extra: list[str]) -> list[str]:
    """The preset's step counts times ``budget`` (after the user's ``extra`` overrides)."""
    from xlearner.config import load_config

    cfg = load_config(preset, extra)
    base = {"train.steps": cfg.train.steps, "baselines.steps": cfg.baselines.steps or cfg.train.steps,
            "train.warmup_steps": cfg.train.warmup_steps}
    for key, value in (("expansion.steps", cfg.expansion.steps), ("squeeze.steps", cfg.squeeze.steps)):
        if value is not None:  # a split of X-Learner's steps (docs/levers.md) scales with the rest
            base[key] = value
    return [f"{k}={max(1, round(v * budget)) if k != 'train.warmup_steps' else round(v * budget)}"
            for k, v in base.items()]


def run_dir(out: Path, budget: float, seed: int) -> Path:
    return out / f"x{budget:g}_s{seed}"


def run_one(args, budget: float, seed: int) -> dict:
    """One main job at one budget and seed, in a process of its own (a crash ends that run only)."""
    d = run_dir(args.out, budget, seed)
    cmd = ([sys.executable, "-m", "xlearner", "run", "--preset", args.preset, "--out", str(d),
            "--methods", ",".join(args.methods), f"seed={seed}"]
           + list(args.overrides) + scaled_overrides(args.preset, budget, args.overrides))  # the scaled ones win
    print(f"[budget] {budget:g}x seed {seed}: {' '.join(cmd[2:])}", flush=True)
    t = time.time()
    rc = subprocess.call(cmd)
    return {"budget": budget, "seed": seed, "dir": str(d), "rc": rc, "wall_s": round(time.time() - t, 1)}


def _slope(points: list[tuple[float, float]]) -> tuple[float, float, int]:
    """Least-squares slope of gain against log2(budget), its s.e. (nan below 3 points or one budget)."""
    n = len(points)
    xs = [math.log2(b) for b, _ in points]
    ys = [g for _, g in points]
    if n < 2 or len(set(xs)) < 2:
        return float("nan"), float("nan"), n
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if n < 3:
        return slope, float("nan"), n
    ssr = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
    return slope, math.sqrt(ssr / (n - 2) / sxx), n


def summarise(out: Path, budgets: list[float], seeds: list[int], methods: list[str] | None = None) -> dict:
    """The curve from every finished run under ``out`` (a run is finished when its results.json is there);
    ``methods``: the baselines shown (default: every one the runs have)."""
    from xlearner.report import upstream_seed_summary

    curve: dict = {"budgets": {}, "slopes": {}, "verdict": None}
    points: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for b in budgets:
        dirs = [run_dir(out, b, s) for s in seeds if (run_dir(out, b, s) / "results.json").is_file()]
        if not dirs:
            continue
        summary = upstream_seed_summary(dirs)
        if methods is not None:
            summary["headline"] = {m: v for m, v in summary["headline"].items() if m in methods}
        curve["budgets"][f"{b:g}"] = {"runs": [str(d) for d in dirs], "tasks": summary["tasks"],
                                      "headline": summary["headline"], "retention": summary["retention"]}
        for m, per_task in summary["headline"].items():
            for t, cell in per_task.items():
                for v in cell["per_run"].values():
                    points.setdefault(m, {}).setdefault(t, []).append((b, v["gain"]))
        for t, cell in summary["retention"].items():
            for v in cell["per_run"].values():
                points.setdefault("retention", {}).setdefault(t, []).append((b, v["gain"]))
    for m, per_task in points.items():
        curve["slopes"][m] = {t: dict(zip(("per_doubling", "se", "n"), _slope(p))) for t, p in per_task.items()}
    curve["verdict"] = verdict_text(curve)
    return curve


def verdict_text(curve: dict) -> str:
    """The smallest budget at which X-Learner wins every task type against MSMT, or the trend."""
    for b, entry in curve["budgets"].items():
        cells = entry["headline"].get("msmt") or {}
        verdicts = [c["verdict"] if c["n"] > 1 else next(iter(c["per_run"].values()))["verdict"]
                    for c in cells.values() if c["n"]]
        if verdicts and all(v == "win" for v in verdicts):
            runs = max(c["n"] for c in cells.values())
            return (f"X-Learner wins every task type against MSMT from {b}x the preset's budget on"
                    + (" (one upstream seed: judged on its transfer seeds only)." if runs == 1 else "."))
    slopes = curve["slopes"].get("msmt") or {}
    if not slopes:
        return "No finished run yet."
    trend = "; ".join(f"{t} {s['per_doubling']:+.2f}" + ("" if math.isnan(s["se"]) else f" ± {s['se']:.2f}")
                      for t, s in slopes.items())
    return (f"X-Learner does not win every task type against MSMT at any budget measured "
            f"({', '.join(b + 'x' for b in curve['budgets'])}); its gain over MSMT changes per doubling of "
            f"the budget by (points, ± s.e.): {trend}.")


def _cell(c: dict) -> str:
    """mean ± s.e. over upstream seeds; with one run, that run's gain ± its s.e. over transfer seeds."""
    if c is None or c.get("n", 0) == 0 or c.get("gain") is None or math.isnan(c["gain"]):
        return "-"
    if c["n"] == 1 and c.get("per_run"):
        (run,) = c["per_run"].values()
        se = "" if run.get("se") is None or math.isnan(run["se"]) else f" ± {run['se']:.1f}"
        return f"{run['gain']:+.1f}{se} ({run['verdict']}, 1 run)"
    se = "" if c["se"] is None or math.isnan(c["se"]) else f" ± {c['se']:.1f}"
    return f"{c['gain']:+.1f}{se} ({c['verdict']}, n={c['n']})"


def render(curve: dict, runs: list[dict]) -> str:
    from xlearner.report import _task_title

    L = ["# X-Learner against budget", "",
         "Gain = X-Learner minus the method, points, per task type: mean over upstream seeds ± s.e. over "
         "them (n = seeds), win / loss where |mean| > 2 s.e. With one upstream seed (1 run): that run's gain ± "
         "its s.e. over transfer seeds, which leaves out the spread between upstream trainings. Retention = "
         "X-Learner minus its best teacher (expansion branch) on the task type. Per doubling: the least-squares "
         "slope of the runs' gains against log2(budget) ± its s.e. (n = runs).", ""]
    tasks = next(iter(curve["budgets"].values()))["tasks"] if curve["budgets"] else []
    methods = list(dict.fromkeys(m for e in curve["budgets"].values() for m in e["headline"]))
    for m in methods:
        L += [f"## Gain over {m}", "", "| budget | " + " | ".join(_task_title(t) for t in tasks) + " |",
              "|---" * (len(tasks) + 1) + "|"]
        for b, e in curve["budgets"].items():
            L.append(f"| {b}x | " + " | ".join(_cell((e["headline"].get(m) or {}).get(t)) for t in tasks) + " |")
        s = curve["slopes"].get(m, {})
        L.append("| per doubling | " + " | ".join(_cell({**s[t], "gain": s[t]["per_doubling"], "verdict": "slope"})
                                                  if t in s else "-" for t in tasks) + " |")
        L.append("")
    L += ["## Retention: X-Learner minus its best teacher", "",
          "| budget | " + " | ".join(_task_title(t) for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for b, e in curve["budgets"].items():
        L.append(f"| {b}x | " + " | ".join(_cell(e["retention"].get(t)) for t in tasks) + " |")
    L += ["", "## Verdict", "", curve["verdict"], "", "## Runs", "", "| budget | seed | folder | exit | wall s |",
          "|---|---|---|---|---|"]
    L += [f"| {r['budget']:g}x | {r['seed']} | {r['dir']} | {r['rc']} | {r['wall_s']} |" for r in runs]
    return "\n".join(L) + "\n"


def plot(curve: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xlearner.report import _task_title

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (key, title) in zip(axes, [("msmt", "X-Learner minus MSMT"), ("retention", "X-Learner minus best teacher")]):
        for t in (next(iter(curve["budgets"].values()))["tasks"] if curve["budgets"] else []):
            xs, ys, es = [], [], []
            for b, e in curve["budgets"].items():
                c = (e["headline"].get(key) or {}).get(t) if key != "retention" else e["retention"].get(t)
                if c and c["n"]:
                    xs.append(float(b))
                    ys.append(c["gain"])
                    es.append(0.0 if c["se"] is None or math.isnan(c["se"]) else c["se"])
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=_task_title(t))
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (x the preset's steps)")
        ax.set_ylabel("points")
        ax.set_title(title + " (± s.e. over upstream seeds)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(args, runs: list[dict]) -> None:
    from xlearner.files import write_json_atomic, write_text_atomic

    curve = summarise(args.out, args.budgets, args.seeds, args.methods)
    write_json_atomic(args.out / "budget.json", {**curve, "runs": runs})
    write_text_atomic(args.out / "budget.md", render(curve, runs))
    if curve["budgets"]:
        plot(curve, args.out / "budget.png")
    print(f"[budget] {args.out / 'budget.md'}: {curve['verdict']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/budget"))
    p.add_argument("--preset", default="default")
    p.add_argument("--budgets", default="1,2,4", type=lambda v: [float(x) for x in v.split(",")])
    p.add_argument("--seeds", default="0,1,2", type=lambda v: [int(x) for x in v.split(",")])
    p.add_argument("--methods", default=",".join(METHODS), type=lambda v: v.split(","))
    p.add_argument("--rerun", action="store_true",
                   help="call the main job of finished runs again (it skips their finished parts)")
    p.add_argument("--summary-only", action="store_true", help="only rewrite budget.md/json/png from the runs there")
    p.add_argument("overrides", nargs="*", help="config overrides for every run (before the scaling)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.json"
    runs = json.loads(log.read_text()) if log.is_file() else []
    if not args.summary_only:
        for seed in args.seeds:
            for b in args.budgets:
                done = [x for x in runs if (x["budget"], x["seed"]) == (b, seed) and x["rc"] == 0]
                if done and (run_dir(args.out, b, seed) / "results.json").is_file() and not args.rerun:
                    continue  # finished: its record keeps the wall time of the run that did the work
                r = run_one(args, b, seed)
                runs = [x for x in runs if (x["budget"], x["seed"]) != (b, seed)] + [r]
                log.write_text(json.dumps(runs, indent=1))
                write_summary(args, runs)
    write_summary(args, runs)
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
