"""`xlearner report RUN_DIR`: tables, gains, costs and plots from a finished run folder.

Input layout (written by `xlearner run`)::

    run_dir/transfer/<method>/<dataset>.json   # dicts from transfer.suite.transfer_one
    run_dir/<stage_dir>/run.json               # {"stage", "cost": {"images_seen", "gflops", "backbone_params", "steps"}}
    run_dir/methods.json                       # optional: {method: [stage_dir, ...]} whose costs it includes

Output: ``run_dir/report.md``, ``run_dir/results.json``, ``run_dir/plots/{gains,scores}.png``.
Scores are in points (x100).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

TASK_ORDER = ("cls", "det", "seg")
TASK_TITLE = {"cls": "classification (top-1)", "det": "detection (COCO mAP)", "seg": "segmentation (mIoU)"}
STAGE_DIRS = ("expansion", "squeeze", "ssst", "msst_cls", "msst_det", "msst_seg", "msmt", "scratch")
COST_KEYS = ("images_seen", "gflops", "steps")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def reference_method(methods: list[str]) -> str | None:
    """The X-Learner entry the gains are measured from."""
    if "xlearner" in methods:
        return "xlearner"
    cands = [m for m in methods if m.startswith("xlearner")]
    return cands[0] if cands else None


def collect(run_dir: str | Path) -> dict[str, Any]:
    """Every number of the report, as a JSON-able dict (scores in points)."""
    run_dir = Path(run_dir)
    tdir = run_dir / "transfer"
    methods_file = run_dir / "methods.json"
    method_stages: dict[str, list[str]] = {}
    if methods_file.is_file():
        method_stages = {k: list(v) for k, v in _read_json(methods_file).items()}
    found = sorted(p.name for p in tdir.iterdir() if p.is_dir()) if tdir.is_dir() else []
    methods = list(method_stages) + [m for m in found if m not in method_stages]
    ref = reference_method(methods)
    if ref in methods:  # X-Learner first
        methods = [ref] + [m for m in methods if m != ref]

    # --- per dataset scores -------------------------------------------------------
    datasets: dict[str, dict[str, Any]] = {}
    bb_params: dict[str, int | None] = {m: None for m in methods}
    for m in methods:
        mdir = tdir / m
        if not mdir.is_dir():
            continue
        for f in sorted(mdir.glob("*.json")):
            try:
                r = _read_json(f)
            except json.JSONDecodeError:
                continue
            if not isinstance(r, dict) or "scores" not in r:
                continue
            name = r.get("dataset", f.stem)
            ds = datasets.setdefault(name, {"task": r.get("task"), "metric": r.get("metric"), "methods": {}})
            scores = [100.0 * float(s) for s in r["scores"]]
            entry = {
                "mean": _mean(scores) if scores else float("nan"),
                "std": _std(scores) if scores else 0.0,
                "n": len(scores), "scores": scores, "mode": r.get("mode"),
                "seeds": r.get("seeds"),
            }
            extra = r.get("extra") or {}
            if "AP50" in extra and isinstance(extra["AP50"], list) and extra["AP50"]:
                ap50 = [100.0 * float(v) for v in extra["AP50"]]
                entry["AP50_mean"] = _mean(ap50)
            ds["methods"][m] = entry
            if r.get("backbone_params") is not None:
                bb_params[m] = int(r["backbone_params"])

    ordered = sorted(datasets, key=lambda d: (TASK_ORDER.index(datasets[d]["task"])
                                              if datasets[d]["task"] in TASK_ORDER else 9, d))
    datasets = {d: datasets[d] for d in ordered}

    # --- per task type averages --------------------------------------------------
    tasks = [t for t in TASK_ORDER if any(d["task"] == t for d in datasets.values())]
    per_task: dict[str, dict[str, Any]] = {}
    for t in tasks:
        names = [d for d, v in datasets.items() if v["task"] == t]
        per_task[t] = {}
        for m in methods:
            vals = [datasets[d]["methods"][m]["mean"] for d in names if m in datasets[d]["methods"]]
            if vals:
                per_task[t][m] = {"mean": _mean(vals), "datasets": len(vals), "of": len(names)}

    # --- gains of X-Learner over each baseline, per task type (shared datasets) --
    gains: dict[str, dict[str, float]] = {}
    if ref is not None:
        for t in tasks:
            names = [d for d, v in datasets.items() if v["task"] == t]
            gains[t] = {}
            for m in methods:
                if m == ref:
                    continue
                shared = [d for d in names if m in datasets[d]["methods"] and ref in datasets[d]["methods"]]
                if shared:
                    gains[t][m] = _mean([datasets[d]["methods"][ref]["mean"] - datasets[d]["methods"][m]["mean"]
                                         for d in shared])
    per_dataset_gain: dict[str, dict[str, float]] = {}
    per_dataset_gain_se: dict[str, dict[str, float]] = {}  # standard error of the difference of means
    if ref is not None:
        for d, v in datasets.items():
            if ref in v["methods"]:
                r = v["methods"][ref]
                per_dataset_gain[d] = {m: r["mean"] - e["mean"] for m, e in v["methods"].items() if m != ref}
                per_dataset_gain_se[d] = {m: math.sqrt(r["std"] ** 2 / max(1, r["n"]) + e["std"] ** 2 / max(1, e["n"]))
                                          for m, e in v["methods"].items() if m != ref}

    # --- costs -------------------------------------------------------------------
    stage_costs: dict[str, dict[str, Any]] = {}
    for sd in sorted({*STAGE_DIRS, *(s for v in method_stages.values() for s in v)}):
        f = run_dir / sd / "run.json"
        if f.is_file():
            try:
                stage_costs[sd] = dict(_read_json(f).get("cost") or {})
            except json.JSONDecodeError:
                pass
    costs: dict[str, dict[str, Any]] = {}
    for m in methods:
        stages = method_stages.get(m, [m] if m in stage_costs else [])
        c: dict[str, Any] = {"stages": stages, "missing_stages": [s for s in stages if s not in stage_costs]}
        for k in COST_KEYS:
            vals = [stage_costs[s].get(k) for s in stages if s in stage_costs and stage_costs[s].get(k) is not None]
            c[k] = sum(vals) if vals else None
        params = bb_params.get(m)
        if params is None:
            for s in reversed(stages):
                if s in stage_costs and stage_costs[s].get("backbone_params") is not None:
                    params = int(stage_costs[s]["backbone_params"])
                    break
        c["backbone_params"] = params
        costs[m] = c

    return {"run_dir": str(run_dir), "reference": ref, "methods": methods, "datasets": datasets,
            "per_task": per_task, "gains": gains, "per_dataset_gain": per_dataset_gain,
            "per_dataset_gain_se": per_dataset_gain_se,
            "costs": costs, "stage_costs": stage_costs, "units": "points (x100)"}


# ----------------------------------------------------------------------------- rendering
def _fmt_num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1e4:
            return f"{v:.3g}"
        return f"{v:.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _signed(v: float) -> str:
    return f"{v:+.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _plots(res: dict[str, Any], out_dir: Path) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    methods, ref = res["methods"], res["reference"]

    # gains per task type
    gains = res["gains"]
    baselines = [m for m in methods if m != ref and any(m in g for g in gains.values())]
    if ref is not None and baselines and gains:
        tasks = list(gains)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(tasks) * len(baselines) + 2), 3.8))
        w = 0.8 / len(baselines)
        x = np.arange(len(tasks))
        for i, m in enumerate(baselines):
            vals = [gains[t].get(m, np.nan) for t in tasks]
            bars = ax.bar(x + i * w - 0.4 + w / 2, vals, w, label=f"vs {m}")
            for b, v in zip(bars, vals):
                if not np.isnan(v):
                    ax.annotate(_signed(v), (b.get_x() + b.get_width() / 2, v), ha="center",
                                va="bottom" if v >= 0 else "top", fontsize=7)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, tasks)
        ax.set_ylabel(f"{ref} gain (points)")
        ax.set_title(f"{ref} gain over each baseline, per task type", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "gains.png", dpi=120)
        plt.close(fig)
        files["gains"] = "plots/gains.png"

    # per-dataset scores
    ds = res["datasets"]
    if ds:
        names = list(ds)
        fig, ax = plt.subplots(figsize=(max(6.5, 1.3 * len(names) + 1), 3.8))
        w = 0.8 / max(1, len(methods))
        x = np.arange(len(names))
        for i, m in enumerate(methods):
            means = [ds[d]["methods"].get(m, {}).get("mean", np.nan) for d in names]
            stds = [ds[d]["methods"].get(m, {}).get("std", 0.0) for d in names]
            ax.bar(x + i * w - 0.4 + w / 2, means, w, yerr=stds, capsize=2, label=m)
        ax.set_xticks(x, [f"{d}\n({ds[d]['metric']})" for d in names], fontsize=7)
        ax.set_ylabel("score (points)")
        ax.set_title("Transfer score per downstream dataset (mean ± std over seeds)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "scores.png", dpi=120)
        plt.close(fig)
        files["scores"] = "plots/scores.png"
    return files


def render_markdown(res: dict[str, Any], plots: dict[str, str]) -> str:
    methods, ref, ds = res["methods"], res["reference"], res["datasets"]
    L = [f"# X-Learner report: {Path(res['run_dir']).name}", "",
         "All scores are in points (x100): top-1 accuracy for classification, COCO box mAP@[.5:.95] "
         "for detection, mIoU for segmentation; mean ± std over seeds (n = number of seeds). "
         "Every downstream dataset is unseen during pretraining.", ""]

    L += ["## Scores per downstream dataset", ""]
    for d, v in ds.items():
        L += [f"### {d} ({v['task']}, {v['metric']})", ""]
        rows = []
        for m in methods:
            e = v["methods"].get(m)
            if e is None:
                continue
            row = [m, e.get("mode") or "-", f"{e['mean']:.1f} ± {e['std']:.1f} (n={e['n']})"]
            if v["task"] == "det":
                row.append(f"{e['AP50_mean']:.1f}" if "AP50_mean" in e else "-")
            if ref is not None and m != ref and d in res["per_dataset_gain"]:
                se = res["per_dataset_gain_se"][d][m]
                row.append(_signed(res["per_dataset_gain"][d][m]) + (f" (s.e. {se:.1f})" if se > 0 else ""))
            else:
                row.append("")
            rows.append(row)
        header = ["method", "mode", v["metric"]] + (["AP50"] if v["task"] == "det" else []) + \
                 [f"{ref} gain" if ref else "gain"]
        L += _table(header, rows) + [""]

    if res["per_task"]:
        L += ["## Average per task type", "",
              "Mean over the task's downstream datasets of each method's mean score.", ""]
        tasks = list(res["per_task"])
        rows = []
        for m in methods:
            row = [m]
            for t in tasks:
                e = res["per_task"][t].get(m)
                row.append("-" if e is None else f"{e['mean']:.1f}" +
                           ("" if e["datasets"] == e["of"] else f" ({e['datasets']}/{e['of']} datasets)"))
            rows.append(row)
        L += _table(["method"] + [TASK_TITLE.get(t, t) for t in tasks], rows) + [""]

    if ref is not None and res["gains"]:
        L += [f"## Gain of {ref} over each baseline", "",
              f"{ref} minus baseline, in points, averaged over the task type's datasets both methods were "
              "evaluated on (the paper's headline form).", ""]
        tasks = list(res["gains"])
        rows = []
        for m in methods:
            if m == ref:
                continue
            rows.append([m] + [_signed(res["gains"][t][m]) if m in res["gains"][t] else "-" for t in tasks])
        L += _table(["baseline"] + [TASK_TITLE.get(t, t) for t in tasks], rows) + [""]
        if "gains" in plots:
            L += [f"![gains]({plots['gains']})", ""]

    L += ["## Training cost", "",
          "Summed over the stages each method's backbone needs (e.g. X-Learner = expansion + squeeze); "
          "parameters are those of the backbone that is transferred.", ""]
    rows = []
    for m in methods:
        c = res["costs"][m]
        rows.append([m, ", ".join(c["stages"]) or "-", _fmt_num(c["images_seen"]),
                     _fmt_num(float(c["gflops"]) if c["gflops"] is not None else None),
                     _fmt_num(c["steps"]), _fmt_num(c["backbone_params"])])
    L += _table(["method", "stages", "images seen", "GFLOPs", "steps", "backbone params"], rows) + [""]
    missing = {m: c["missing_stages"] for m, c in res["costs"].items() if c["missing_stages"]}
    if missing:
        L += ["Stages without a run.json (not counted): " +
              "; ".join(f"{m}: {', '.join(s)}" for m, s in missing.items()), ""]

    if "scores" in plots:
        L += ["## Plots", "", f"![scores per dataset]({plots['scores']})", ""]
    L += ["Every number above is in `results.json`."]
    return "\n".join(L) + "\n"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_report(run_dir: str | Path) -> Path:
    """Write report.md, results.json and plots/ in ``run_dir``; return the report's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        from xlearner.config import ConfigError
        raise ConfigError(f"run folder {run_dir} does not exist")
    res = collect(run_dir)
    plots = _plots(res, run_dir / "plots")
    res["plots"] = plots
    _atomic_write(run_dir / "results.json", json.dumps(_jsonable(res), indent=2))
    path = run_dir / "report.md"
    _atomic_write(path, render_markdown(res, plots))
    return path


def report_command(args) -> int:
    path = write_report(args.run_dir)
    res = json.loads((Path(args.run_dir) / "results.json").read_text())
    if not res["datasets"]:
        print(f"xlearner report: no transfer results under {Path(args.run_dir) / 'transfer'}; wrote {path} anyway")
    else:
        gains = "; ".join(f"{t}: " + ", ".join(f"vs {m} {v:+.1f}" for m, v in g.items())
                          for t, g in res["gains"].items() if g)
        print(f"wrote {path} ({len(res['datasets'])} datasets, {len(res['methods'])} methods)"
              + (f" - {res['reference']} gain {gains}" if gains else ""))
    return 0
