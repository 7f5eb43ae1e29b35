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
from pathlib import Path
from typing import Any

from xlearner.files import write_text_atomic

COST_KEYS = ("images_seen", "gflops", "steps")


def _task_order() -> tuple[str, ...]:
    from xlearner import tasks

    return tasks.names()


def _task_title(task: str) -> str:
    from xlearner import tasks

    t = tasks.get(task)
    return f"{t.title} ({t.metric_title})"


def _report_columns(task: str) -> tuple[str, ...]:
    """Secondary figures shown beside a task's metric (det: AP50)."""
    from xlearner import tasks

    return tasks.get(task).report_columns if task in tasks.names() else ()


def _stage_dirs(run_dir: Path, method_stages: dict) -> list[str]:
    """Every stage folder of the run (a run.json one level down) and those the methods name."""
    found = {p.parent.name for p in run_dir.glob("*/run.json")}
    return sorted(found | {s for v in method_stages.values() for s in v})




def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def mean(xs: list[float]) -> float:
    """The arithmetic mean (every average of the report and of transfer results)."""
    return sum(xs) / len(xs)


def sample_std(xs: list[float]) -> float:
    """Standard deviation with n - 1 (0 for fewer than two values)."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def paired(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, int]:
    """Mean and standard error of the paired difference a - b over the seeds both share.

    Every method is transferred with the same seeds (same head initialisation and data
    order), so per-seed differences cancel what the seed alone moves. The standard error
    is NaN below two shared seeds.
    """
    sa, sb = _by_seed(a), _by_seed(b)
    return _mean_se([sa[s] - sb[s] for s in sa if s in sb])


def _mean_se(diffs: list[float]) -> tuple[float, float, int]:
    """Mean, standard error (NaN below two values) and count of paired differences."""
    if not diffs:
        return float("nan"), float("nan"), 0
    se = sample_std(diffs) / math.sqrt(len(diffs)) if len(diffs) >= 2 else float("nan")
    return mean(diffs), se, len(diffs)


def _by_seed(entry: dict[str, Any]) -> dict[Any, float]:
    seeds = entry.get("seeds") or list(range(len(entry["scores"])))
    return dict(zip(seeds, entry["scores"]))


def verdict(gain: float, se: float) -> str:
    """win / loss where |gain| > 2 s.e., tie otherwise; n/a without a standard error."""
    if math.isnan(gain) or math.isnan(se):
        return "n/a"
    if abs(gain) > 2 * se:
        return "win" if gain > 0 else "loss"
    return "tie"


def task_paired(datasets: dict[str, Any], names: list[str], a: str, b: str) -> tuple[float, float, int]:
    """Paired gain a - b on a task type: per seed, the mean over its datasets; then mean and s.e. over seeds."""
    per_seed: dict[Any, list[float]] = {}
    use = [d for d in names if a in datasets[d]["methods"] and b in datasets[d]["methods"]]
    if not use:
        return float("nan"), float("nan"), 0
    for d in use:
        sa, sb = _by_seed(datasets[d]["methods"][a]), _by_seed(datasets[d]["methods"][b])
        for s in sa:
            if s in sb:
                per_seed.setdefault(s, []).append(sa[s] - sb[s])
    return _mean_se([mean(v) for v in per_seed.values() if len(v) == len(use)])  # seeds every dataset has


def is_ablation(method: str) -> bool:
    """``xlearner[name]``: X-Learner with one lever changed (``xlearner run --ablation name``)."""
    return method.startswith("xlearner[")


def is_teacher(method: str) -> bool:
    """``xlearner.expansion[task]``: one expansion branch transferred as a backbone (a teacher row)."""
    return method.startswith("xlearner.expansion[")


def is_baseline(method: str, ref: str | None) -> bool:
    """A row of the headline: neither X-Learner, nor one of its ablations, nor one of its teachers."""
    return method != ref and not is_ablation(method) and not is_teacher(method)


def reference_method(methods: list[str]) -> str | None:
    """The X-Learner entry the gains are measured from."""
    if "xlearner" in methods:
        return "xlearner"
    cands = [m for m in methods if m.startswith("xlearner") and not is_teacher(m)]
    return cands[0] if cands else None


def collect(run_dir: str | Path) -> dict[str, Any]:
    """Every number of the report, as a JSON-able dict (scores in points)."""
    run_dir = Path(run_dir)
    method_stages, methods, ref = _methods(run_dir)
    datasets, bb_params = _read_transfers(run_dir / "transfer", methods)
    tasks = [t for t in _task_order() if any(d["task"] == t for d in datasets.values())]
    per_task = _per_task(datasets, methods, tasks)
    gains, gains_se, gains_verdict = _task_gains(datasets, methods, ref, tasks)
    per_dataset_gain, per_dataset_gain_se, per_dataset_verdict = _dataset_gains(datasets, ref)
    ablations = _ablations(methods, ref, tasks, per_task, gains, gains_se)
    retention = _retention(methods, ref, tasks, per_task, gains, gains_se)
    costs, stage_costs = _costs(run_dir, methods, method_stages, bb_params)
    gates = check_gates(run_dir, datasets, method_stages, _read_gates(run_dir))
    return {"run_dir": str(run_dir), "reference": ref, "methods": methods, "datasets": datasets,
            "per_task": per_task, "gains": gains, "gains_se": gains_se, "gains_verdict": gains_verdict,
            "per_dataset_gain": per_dataset_gain, "per_dataset_gain_se": per_dataset_gain_se,
            "per_dataset_verdict": per_dataset_verdict, "ablations": ablations, "retention": retention,
            "gates": gates,
            "costs": costs, "stage_costs": stage_costs, "units": "points (x100)"}


def _methods(run_dir: Path) -> tuple[dict[str, list[str]], list[str], str | None]:
    """methods.json's stage folders per method, the methods (those of methods.json, then any other
    transfer folder; X-Learner first) and the reference method."""
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
    return method_stages, methods, ref


def _read_transfers(tdir: Path, methods: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, int | None]]:
    """Per downstream dataset (in task order): task, metric, scored splits and each method's entry;
    and each method's transferred backbone size. Unreadable or foreign JSON files are skipped."""
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
            split = r.get("eval_split", "test")
            if split not in ds.setdefault("eval_splits", []):
                ds["eval_splits"].append(split)
            ds["methods"][m] = _entry(r)
            if r.get("backbone_params") is not None:
                bb_params[m] = int(r["backbone_params"])
    order = _task_order()
    ordered = sorted(datasets, key=lambda d: (order.index(datasets[d]["task"])
                                              if datasets[d]["task"] in order else len(order), d))
    return {d: datasets[d] for d in ordered}, bb_params


def _entry(r: dict[str, Any]) -> dict[str, Any]:
    """One method's result on one dataset, in points: mean, std, seeds and the task's secondary figures."""
    scores = [100.0 * float(s) for s in r["scores"]]
    entry = {
        "mean": mean(scores) if scores else float("nan"),
        "std": sample_std(scores) if scores else 0.0,
        "n": len(scores), "scores": scores, "mode": r.get("mode"),
        "seeds": r.get("seeds"),
    }
    extra = r.get("extra") or {}
    for col in _report_columns(r.get("task", "")):
        if isinstance(extra.get(col), list) and extra[col]:
            entry[f"{col}_mean"] = mean([100.0 * float(v) for v in extra[col]])
    return entry


def _per_task(datasets: dict[str, Any], methods: list[str], tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Per task type and method: the mean over the task's datasets of the method's mean score."""
    per_task: dict[str, dict[str, Any]] = {}
    for t in tasks:
        names = [d for d, v in datasets.items() if v["task"] == t]
        per_task[t] = {}
        for m in methods:
            vals = [datasets[d]["methods"][m]["mean"] for d in names if m in datasets[d]["methods"]]
            if vals:
                per_task[t][m] = {"mean": mean(vals), "datasets": len(vals), "of": len(names)}
    return per_task


def _task_gains(datasets: dict[str, Any], methods: list[str], ref: str | None, tasks: list[str]
                ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, dict[str, str]]]:
    """Gain of X-Learner over each other method per task type, paired over seeds: gain, s.e., verdict."""
    gains: dict[str, dict[str, float]] = {}
    gains_se: dict[str, dict[str, float]] = {}
    gains_verdict: dict[str, dict[str, str]] = {}
    if ref is None:
        return gains, gains_se, gains_verdict
    for t in tasks:
        names = [d for d, v in datasets.items() if v["task"] == t]
        gains[t], gains_se[t], gains_verdict[t] = {}, {}, {}
        for m in methods:
            if m == ref:
                continue
            g, se, n = task_paired(datasets, names, ref, m)
            if n:
                gains[t][m], gains_se[t][m], gains_verdict[t][m] = g, se, verdict(g, se)
    return gains, gains_se, gains_verdict


def _dataset_gains(datasets: dict[str, Any], ref: str | None
                   ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, dict[str, str]]]:
    """Gain of X-Learner over each other method per dataset: gain, s.e. of the paired difference, verdict."""
    gain: dict[str, dict[str, float]] = {}
    gain_se: dict[str, dict[str, float]] = {}
    verdicts: dict[str, dict[str, str]] = {}
    if ref is None:
        return gain, gain_se, verdicts
    for d, v in datasets.items():
        if ref not in v["methods"]:
            continue
        r = v["methods"][ref]
        gain[d], gain_se[d], verdicts[d] = {}, {}, {}
        for m, e in v["methods"].items():
            if m == ref:
                continue
            g, se, n = paired(r, e)
            if n:
                gain[d][m], gain_se[d][m] = g, se
                verdicts[d][m] = verdict(g, se)
    return gain, gain_se, verdicts


def _ablations(methods: list[str], ref: str | None, tasks: list[str], per_task: dict[str, Any],
               gains: dict[str, dict[str, float]], gains_se: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Each lever minus X-Learner, per task type (the headline's pairs, the sign flipped)."""
    ablations: dict[str, dict[str, dict[str, Any]]] = {}
    for m in methods:
        if not is_ablation(m) or m == ref:
            continue
        ablations[m] = {}
        for t in tasks:
            if m in gains.get(t, {}):
                g, se = -gains[t][m], gains_se[t][m]
                ablations[m][t] = {"mean": per_task[t][m]["mean"], "gain": g, "se": se, "verdict": verdict(g, se)}
    return ablations


def _retention(methods: list[str], ref: str | None, tasks: list[str], per_task: dict[str, Any],
               gains: dict[str, dict[str, float]], gains_se: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per task type, the student (X-Learner) minus its best teacher there (the expansion branch
    with the highest average score on the task type), paired by seed: what the squeeze keeps."""
    out: dict[str, Any] = {}
    for t in tasks:
        teachers = [m for m in methods if is_teacher(m) and m in per_task[t] and m in gains.get(t, {})]
        if ref not in per_task.get(t, {}) or not teachers:
            continue
        best = max(teachers, key=lambda m: per_task[t][m]["mean"])
        g, se = gains[t][best], gains_se[t][best]
        out[t] = {"teacher": best, "teacher_mean": per_task[t][best]["mean"], "student_mean": per_task[t][ref]["mean"],
                  "gain": g, "se": se, "verdict": verdict(g, se)}
    return out


def _costs(run_dir: Path, methods: list[str], method_stages: dict[str, list[str]],
           bb_params: dict[str, int | None]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Per method, the training cost summed over the stages it needs; and each stage's own cost."""
    from xlearner.runs import run_info  # local: importing the report stays light (no pydantic)

    stage_costs: dict[str, dict[str, Any]] = {}
    for sd in _stage_dirs(run_dir, method_stages):
        info = run_info(run_dir / sd)
        if info is not None:
            stage_costs[sd] = dict(info.get("cost") or {})
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
    return costs, stage_costs


# ----------------------------------------------------------------------------- gates
def _read_gates(run_dir: Path) -> dict[str, Any]:
    """The run's ``gates`` section (``config.yaml`` written by ``xlearner run``), else the defaults."""
    from xlearner.config import GatesConfig

    cfg = run_dir / "config.yaml"
    data: dict[str, Any] = {}
    if cfg.is_file():
        import yaml  # config.yaml holds JSON, a subset of YAML

        try:
            data = (yaml.safe_load(cfg.read_text()) or {}).get("gates") or {}
        except yaml.YAMLError:
            data = {}
    return GatesConfig.model_validate(data).model_dump()


def check_gates(run_dir: Path, datasets: dict[str, Any], method_stages: dict[str, list[str]],
                gates: dict[str, Any]) -> dict[str, Any]:
    """Can this run rank backbones? Upstream gates per stage and source, separation per dataset.

    Upstream: every stage that trains a gated source reaches its minimum on that source's
    validation split (the precise-BN figure). msmt lines are shown but do not decide the
    verdict (task interference may be real there). Separation: on every downstream dataset,
    the on-task method beats scratch by ``separation_points`` and by ``separation_se``
    standard errors of the paired difference over at least ``min_seeds`` seeds.
    """
    from xlearner.runs import run_info

    upstream = []
    stage_dirs = _stage_dirs(run_dir, method_stages)
    for sd in stage_dirs:
        info = run_info(run_dir / sd)
        if info is None:
            continue
        if not (info.get("cost") or {}).get("steps"):
            continue  # scratch: nothing trained, nothing to gate
        metrics = info.get("metrics") or {}
        for src in info.get("sources") or []:
            name = src.get("name")
            if name not in gates["upstream"]:
                continue
            value = metrics.get(f"{name}/precise_bn")
            figure = "precise BN"
            if value is None and name in metrics:
                value, figure = metrics[name], "blended BN"
            score = None if value is None else 100.0 * float(value)
            need = float(gates["upstream"][name])
            ok = score is not None and score >= need
            upstream.append({"stage": sd, "source": name, "score": score, "figure": figure, "min": need,
                             "pass": ok, "counts": info.get("stage") != "msmt"})
    separation = []
    for d, v in datasets.items():
        on_task = gates["on_task"].get(v["task"])
        row: dict[str, Any] = {"dataset": d, "task": v["task"], "method": on_task}
        if on_task in v["methods"] and "scratch" in v["methods"]:
            g, se, n = paired(v["methods"][on_task], v["methods"]["scratch"])
            ok = (n >= gates["min_seeds"] and g >= gates["separation_points"]
                  and not math.isnan(se) and g >= gates["separation_se"] * se)
            row.update({"gain": g, "se": se, "n": n, "pass": bool(ok)})
        else:
            row.update({"gain": None, "se": None, "n": 0, "pass": False,
                        "why": f"needs transfer results of {on_task} and scratch"})
        separation.append(row)
    deciding = [r for r in upstream if r["counts"]] + separation
    failed = [r for r in deciding if not r["pass"]]
    return {"config": gates, "upstream": upstream, "separation": separation,
            "checked": len(deciding), "failed": len(failed), "can_rank": bool(deciding) and not failed}


def gate_failures(res: dict[str, Any]) -> list[str]:
    """One line per failed gate (what ``xlearner run`` prints at its end)."""
    g = res.get("gates") or {}
    out = []
    for r in g.get("upstream", []):
        if r["counts"] and not r["pass"]:
            sc = "-" if r["score"] is None else f"{r['score']:.1f}"
            out.append(f"upstream {r['stage']} on {r['source']}: {sc} < {r['min']:g}")
    for r in g.get("separation", []):
        if not r["pass"]:
            if r["gain"] is None:
                out.append(f"separation {r['dataset']}: {r.get('why', 'no results')}")
            else:
                se = r.get("se")  # NaN in memory, None once read back from results.json
                se = "-" if se is None or math.isnan(se) else f"{se:.1f}"
                out.append(f"separation {r['dataset']}: {r['method']} - scratch = {r['gain']:+.1f} "
                           f"(s.e. {se}, {r['n']} seeds)")
    if g and not g.get("checked"):
        out.append("no gate could be checked (no gated source trained, no downstream dataset)")
    return out


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
    return f"{v:+.1f}".replace("-0.0", "+0.0")  # a gain that rounds to zero has no sign


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
    baselines = [m for m in methods if is_baseline(m, ref) and any(m in g for g in gains.values())]
    if ref is not None and baselines and gains:
        tasks = list(gains)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(tasks) * len(baselines) + 2), 3.8))
        w = 0.8 / len(baselines)
        x = np.arange(len(tasks))
        for i, m in enumerate(baselines):
            vals = [gains[t].get(m, np.nan) for t in tasks]
            errs = [res["gains_se"].get(t, {}).get(m, np.nan) for t in tasks]
            errs = [0.0 if e is None or np.isnan(e) else e for e in errs]
            bars = ax.bar(x + i * w - 0.4 + w / 2, vals, w, yerr=errs, capsize=2, label=f"vs {m}")
            for b, v in zip(bars, vals):
                if not np.isnan(v):
                    ax.annotate(_signed(v), (b.get_x() + b.get_width() / 2, v), ha="center",
                                va="bottom" if v >= 0 else "top", fontsize=7)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, tasks)
        ax.set_ylabel(f"{ref} gain (points)")
        ax.set_title(f"{ref} gain over each baseline, per task type (error bars: s.e. of the paired difference)",
                     fontsize=9)
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


def _gain_cell(g: float | None, se: float | None, v: str | None) -> str:
    if g is None or math.isnan(g):
        return "-"
    if se is None or math.isnan(se):
        return f"{_signed(g)} ({v or 'n/a'})"
    return f"{_signed(g)} ± {se:.1f} ({v})"


def gate_verdict_line(res: dict[str, Any]) -> str:
    g = res.get("gates") or {}
    if not g.get("checked"):
        return "**Can this run rank backbones? not checked: no gated source and no downstream dataset.**"
    if g["can_rank"]:
        return f"**Can this run rank backbones? yes: all {g['checked']} gates pass (see the gate section).**"
    return (f"**Can this run rank backbones? NO: {g['failed']} of {g['checked']} gates fail; the gains below "
            "may measure nothing where a gate fails (see the gate section).**")


def _gate_section(res: dict[str, Any]) -> list[str]:
    g = res.get("gates") or {}
    if not g:
        return []
    c = g["config"]
    L = ["## Can this run rank backbones?", "", gate_verdict_line(res), "",
         "Upstream: each stage's validation score on its own sources with BatchNorm statistics re-estimated "
         "per source (precise BN), against the minimum in `gates.upstream` (msmt lines are shown but do not "
         "decide: task interference may be real there).", ""]
    rows = [[r["stage"], r["source"], "-" if r["score"] is None else f"{r['score']:.1f}", r["figure"],
             f"{r['min']:g}", ("pass" if r["pass"] else "FAIL") + ("" if r["counts"] else " (not deciding)")]
            for r in g["upstream"]]
    L += (_table(["stage", "source", "val score", "figure", "min", "gate"], rows) if rows
          else ["No stage trained a gated source."]) + [""]
    L += [f"Separation: on each downstream dataset, the on-task pretrained backbone ({', '.join(f'{t}: {m}' for t, m in c['on_task'].items())}) "
          f"minus random weights (scratch), paired by seed; passes at >= {c['separation_points']:g} points, "
          f">= {c['separation_se']:g} s.e. and >= {c['min_seeds']} seeds.", ""]
    rows = []
    for r in g["separation"]:
        if r["gain"] is None:
            rows.append([r["dataset"], r["task"], str(r["method"]), "-", "-", "0", "FAIL: " + r.get("why", "")])
        else:
            se = "-" if math.isnan(r["se"]) else f"{r['se']:.1f}"
            rows.append([r["dataset"], r["task"], str(r["method"]), _signed(r["gain"]), se, str(r["n"]),
                         "pass" if r["pass"] else "FAIL"])
    L += (_table(["dataset", "task", "on-task method", "gain over scratch", "s.e.", "seeds", "gate"], rows)
          if rows else ["No downstream dataset."]) + [""]
    return L


def _ablation_section(res: dict[str, Any]) -> list[str]:
    abl, ref = res.get("ablations") or {}, res["reference"]
    if not abl or ref is None:
        return []
    tasks = list(res["per_task"])
    L = ["## Ablations and levers", "",
         f"Each row is {ref} with one setting changed (docs/levers.md): its average score per task type, "
         f"then its gain over {ref} in points, paired by seed, ± standard error (win / loss where "
         "|gain| > 2 s.e.). Choose levers on a run with `transfer.eval_split=val`, never on test.", ""]
    rows = [[ref] + [f"{res['per_task'][t][ref]['mean']:.1f}" if ref in res["per_task"][t] else "-" for t in tasks]]
    for m, per in abl.items():
        rows.append([m] + ["-" if t not in per else f"{per[t]['mean']:.1f} ("
                           f"{_gain_cell(per[t]['gain'], per[t]['se'], per[t]['verdict'])})" for t in tasks])
    return L + _table(["method"] + [_task_title(t) for t in tasks], rows) + [""]


def _across_runs(runs: list[tuple[str, dict]], tasks: list[str], names: list[str], cell) -> dict[str, Any]:
    """Per name and task: each run's cell ({gain, se, verdict}, or None where the run lacks it), then
    the mean of the runs' gains with its s.e. over the runs."""
    out = {}
    for m in names:
        per_task = {}
        for t in tasks:
            per_run = {d: c for d, r in runs if (c := cell(r, m, t)) is not None}
            g, se, n = _mean_se([v["gain"] for v in per_run.values()])
            per_task[t] = {"per_run": per_run, "gain": g, "se": se, "n": n, "verdict": verdict(g, se)}
        out[m] = per_task
    return out


def check_comparable_runs(run_dirs: list[str | Path]) -> None:
    """Runs summarised across upstream seeds: each folder once, and every setting but ``seed`` the
    same (a preset, a split or a step count that differs would be averaged in as seed noise)."""
    import yaml  # config.yaml holds JSON, a subset of YAML

    from xlearner.config import ConfigError

    dirs = [Path(d) for d in run_dirs]
    if len({d.resolve() for d in dirs}) < len(dirs):
        raise ConfigError(f"a run folder is given twice in {[str(d) for d in dirs]}: each upstream seed once")
    configs = {d: yaml.safe_load((d / "config.yaml").read_text()) for d in dirs if (d / "config.yaml").is_file()}
    if not configs:
        return
    first, cfg0 = next(iter(configs.items()))
    for d, cfg in configs.items():
        keys = sorted(k for k in set(cfg0) | set(cfg) if k != "seed" and cfg0.get(k) != cfg.get(k))
        if keys:
            raise ConfigError(f"{d / 'config.yaml'} differs from {first / 'config.yaml'} in {', '.join(keys)}: "
                              "summarise runs that differ in `seed` only")


def upstream_seed_summary(run_dirs: list[str | Path]) -> dict[str, Any]:
    """:func:`summarise_runs` over run folders: checks that they differ only in ``seed``, then
    reads each one's results.json (``xlearner report`` writes it)."""
    check_comparable_runs(run_dirs)
    results = {}
    for d in run_dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no results.json; run the job there first (or `xlearner report {d}`)")
        results[str(d)] = _read_json(path)
    return summarise_runs(results)


def summarise_runs(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """X-Learner's headline gains and each ablation's gain over X-Learner, across runs at different
    upstream seeds (``results``: run name -> that run's :func:`collect` dict).

    A run's own s.e. covers its transfer seeds only; the spread between upstream trainings is
    larger, so a comparison is judged on the mean of its per-run gains with the s.e. over runs.
    A method missing from a run is left out of that run's column.
    """
    runs = list(results.items())
    tasks = [t for t in _task_order() if any(t in r.get("per_task", {}) for _, r in runs)]
    levers = list(dict.fromkeys(m for _, r in runs for m in (r.get("ablations") or {})))
    baselines = list(dict.fromkeys(m for _, r in runs for t in (r.get("gains") or {})
                                   for m in r["gains"][t] if is_baseline(m, r.get("reference"))))

    def headline_cell(r, m, t):
        if m not in (r.get("gains") or {}).get(t, {}):
            return None
        return {"gain": r["gains"][t][m], "se": r["gains_se"][t][m], "verdict": r["gains_verdict"][t][m]}

    out: dict[str, Any] = {"runs": [d for d, _ in runs], "tasks": tasks, "reference": {}}
    for d, r in runs:
        ref = r.get("reference")
        out["reference"][d] = {t: r["per_task"][t][ref]["mean"] for t in tasks
                               if ref in r.get("per_task", {}).get(t, {})}
    out["headline"] = _across_runs(runs, tasks, baselines, headline_cell)
    out["levers"] = _across_runs(runs, tasks, levers,
                                 lambda r, m, t: (r.get("ablations") or {}).get(m, {}).get(t))
    out["retention"] = _across_runs(runs, tasks, ["student - best teacher"],
                                    lambda r, m, t: (r.get("retention") or {}).get(t))["student - best teacher"]
    return out


def render_upstream_seed_summary(summary: dict[str, Any]) -> str:
    """Markdown: the headline across runs (mean ± s.e. over runs, then each run's gain), and per
    lever a row per run (gain ± the run's transfer-seed s.e.) and the mean ± s.e. over runs."""
    tasks, runs = summary["tasks"], summary["runs"]
    L: list[str] = []
    refs = [" / ".join(f"{summary['reference'][d][t]:.1f}" if t in summary["reference"][d] else "-"
                       for t in tasks) for d in runs]
    if summary["headline"]:
        L += [f"### X-Learner's gain over each baseline across {len(runs)} runs, points", "",
              "Mean of the runs' paired gains ± its s.e. over the runs (win / loss where |mean| > 2 s.e.); "
              "then each run's gain. X-Learner's averages per run: " + "; ".join(refs) + ".", ""]
        rows = [[m] + [_gain_cell(per_task[t]["gain"], per_task[t]["se"], per_task[t]["verdict"]) + " ["
                       + ", ".join(_signed(v["gain"]) for v in per_task[t]["per_run"].values()) + "]"
                       for t in tasks] for m, per_task in summary["headline"].items()]
        L += _table(["baseline"] + [_task_title(t) for t in tasks], rows) + [""]
    ret = summary.get("retention") or {}
    if any(ret[t]["n"] for t in ret):
        L += ["### What the squeeze keeps: X-Learner minus its best teacher, points", "",
              "Per run, the expansion branch with the best average score on the task type; mean ± s.e. over "
              "the runs, then each run's figure.", ""]
        L += _table(["", *[_task_title(t) for t in tasks]],
                    [["student - best teacher"] + [_gain_cell(ret[t]["gain"], ret[t]["se"], ret[t]["verdict"]) + " ["
                                                   + ", ".join(_signed(v["gain"]) for v in ret[t]["per_run"].values())
                                                   + "]" for t in tasks]]) + [""]
    header = ["run", "X-Learner"] + [_task_title(t) for t in tasks]
    for m, per_task in summary["levers"].items():
        rows = []
        for d, ref in zip(runs, refs):
            cells = []
            for t in tasks:
                v = per_task[t]["per_run"].get(d)
                cells.append("-" if v is None else _gain_cell(v["gain"], v["se"], v["verdict"]))
            rows.append([d, ref] + cells)
        rows.append([f"mean ± s.e. over runs (n = {max(p['n'] for p in per_task.values())})", ""]
                    + [_gain_cell(per_task[t]["gain"], per_task[t]["se"], per_task[t]["verdict"]) for t in tasks])
        L += [f"### {m}: gain over X-Learner, points", ""] + _table(header, rows) + [""]
    return "\n".join(L)


def render_markdown(res: dict[str, Any], plots: dict[str, str]) -> str:
    """report.md: one function per section, in the order a reader needs them."""
    L = _intro(res) + _headline_section(res, plots) + _retention_section(res) + _ablation_section(res)
    L += _gate_section(res)
    L += _dataset_section(res) + _task_average_section(res) + _cost_section(res) + _plots_section(plots)
    L += ["Every number above is in `results.json`."]
    return "\n".join(L) + "\n"


def _intro(res: dict[str, Any]) -> list[str]:
    """Title, units, the scored splits and the gate verdict."""
    ds = res["datasets"]
    L = [f"# X-Learner report: {Path(res['run_dir']).name}", "",
         "All scores are in points (x100): top-1 accuracy for classification, COCO box mAP@[.5:.95] "
         "for detection, mIoU for segmentation; mean ± std over seeds (n = number of seeds). "
         "Every downstream dataset is unseen during pretraining.", ""]
    splits = sorted({sp for v in ds.values() for sp in v.get("eval_splits", [])})
    if splits == ["val"]:
        L += ["Scored on the downstream **validation** splits (`transfer.eval_split=val`): a tuning run; "
              "the test splits were not touched.", ""]
    elif len(splits) > 1:
        L += [f"**Mixed splits: some scores are on {' and some on '.join(splits)}; compare within one split only.**", ""]
    return L + [gate_verdict_line(res), ""]


def _headline_section(res: dict[str, Any], plots: dict[str, str]) -> list[str]:
    """X-Learner's gain over each baseline per task type."""
    methods, ref = res["methods"], res["reference"]
    if ref is None or not res["gains"]:
        return []
    L = [f"## Headline: gain of {ref} over each baseline", "",
         f"{ref} minus baseline in points, averaged over the task type's datasets, paired by seed "
         "(same head initialisation and data order): gain ± standard error of the paired difference; "
         "win / loss where |gain| > 2 s.e., tie otherwise (n/a: fewer than 2 seeds).", ""]
    tasks = list(res["gains"])
    rows = []
    for m in methods:
        if not is_baseline(m, ref):
            continue
        rows.append([m] + [_gain_cell(res["gains"][t].get(m), res["gains_se"][t].get(m),
                                      res["gains_verdict"][t].get(m)) for t in tasks])
    L += _table(["baseline"] + [_task_title(t) for t in tasks], rows) + [""]
    if "gains" in plots:
        L += [f"![gains]({plots['gains']})", ""]
    return L


def _retention_section(res: dict[str, Any]) -> list[str]:
    """The squeezed student against its best teacher per task type."""
    ret, ref = res.get("retention") or {}, res["reference"]
    if not ret:
        return []
    L = ["## What the squeeze keeps of its teachers", "",
         f"Each expansion branch transferred as a backbone (`xlearner.expansion[task]`) beside {ref}, the one "
         "backbone squeezed from them. The teachers are not baselines: together they are T backbones, each "
         "trained on its own task's sources (reading the others' features through reconciliation). "
         f"Retention: {ref} minus the best teacher on the task type, paired by seed (negative: the squeeze "
         "lost part of what that teacher knew).", ""]
    rows = [[_task_title(t), f"{r['student_mean']:.1f}", f"{r['teacher']} {r['teacher_mean']:.1f}",
             _gain_cell(r["gain"], r["se"], r["verdict"])] for t, r in ret.items()]
    return L + _table(["task type", ref, "best teacher", f"{ref} - best teacher"], rows) + [""]


def _dataset_section(res: dict[str, Any]) -> list[str]:
    """Per downstream dataset: every method's score, secondary figures and X-Learner's gain."""
    L = ["## Scores per downstream dataset", ""]
    for d, v in res["datasets"].items():
        L += [f"### {d} ({v['task']}, {v['metric']})", ""] + _dataset_table(res, d, v) + [""]
    return L


def _dataset_table(res: dict[str, Any], d: str, v: dict[str, Any]) -> list[str]:
    methods, ref = res["methods"], res["reference"]
    rows = []
    extra = _report_columns(v["task"])
    for m in methods:
        e = v["methods"].get(m)
        if e is None:
            continue
        row = [m, e.get("mode") or "-", f"{e['mean']:.1f} ± {e['std']:.1f} (n={e['n']})"]
        for col in extra:
            row.append(f"{e[col + '_mean']:.1f}" if col + "_mean" in e else "-")
        if ref is not None and m != ref and m in res["per_dataset_gain"].get(d, {}):
            row.append(_gain_cell(res["per_dataset_gain"][d][m], res["per_dataset_gain_se"][d][m],
                                  res["per_dataset_verdict"][d][m]))
        else:
            row.append("")
        rows.append(row)
    header = ["method", "mode", v["metric"]] + list(extra) + [f"{ref} gain" if ref else "gain"]
    return _table(header, rows)


def _task_average_section(res: dict[str, Any]) -> list[str]:
    if not res["per_task"]:
        return []
    L = ["## Average per task type", "",
         "Mean over the task's downstream datasets of each method's mean score.", ""]
    tasks = list(res["per_task"])
    rows = []
    for m in res["methods"]:
        row = [m]
        for t in tasks:
            e = res["per_task"][t].get(m)
            row.append("-" if e is None else f"{e['mean']:.1f}" +
                       ("" if e["datasets"] == e["of"] else f" ({e['datasets']}/{e['of']} datasets)"))
        rows.append(row)
    return L + _table(["method"] + [_task_title(t) for t in tasks], rows) + [""]


def _cost_section(res: dict[str, Any]) -> list[str]:
    """Training cost per method, summed over the stages its backbone needs."""
    L = ["## Training cost", "",
         "Summed over the stages each method's backbone needs (e.g. X-Learner = expansion + squeeze); "
         "parameters are those of the backbone that is transferred.", ""]
    rows = []
    for m in res["methods"]:
        c = res["costs"][m]
        external = m == "imagenet" and not c["stages"]  # pretrained outside this run
        rows.append([m, "external: ImageNet-1k (torchvision)" if external else (", ".join(c["stages"]) or "-"),
                     _fmt_num(c["images_seen"]),
                     _fmt_num(float(c["gflops"]) if c["gflops"] is not None else None),
                     _fmt_num(c["steps"]), _fmt_num(c["backbone_params"])])
    L += _table(["method", "stages", "images seen", "GFLOPs", "steps", "backbone params"], rows) + [""]
    if "imagenet" in res["costs"] and not res["costs"]["imagenet"]["stages"]:
        L += ["`imagenet` is torchvision's ImageNet MobileNetV2: its pretraining (1.28 M images, 300 epochs in "
              "torchvision's recipe) happened outside this run and is not counted here.", ""]
    missing = {m: c["missing_stages"] for m, c in res["costs"].items() if c["missing_stages"]}
    if missing:
        L += ["Stages without a run.json (not counted): " +
              "; ".join(f"{m}: {', '.join(s)}" for m, s in missing.items()), ""]
    return L


def _plots_section(plots: dict[str, str]) -> list[str]:
    return ["## Plots", "", f"![scores per dataset]({plots['scores']})", ""] if "scores" in plots else []


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def check_run_folder(run_dir: str | Path) -> None:
    """A ConfigError unless the folder exists and holds something the main job writes: a transfer
    result, a stage's run.json or methods.json (a report of an empty folder would say nothing)."""
    from xlearner.config import ConfigError

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} does not exist")
    if not ((run_dir / "methods.json").is_file() or any(run_dir.glob("transfer/*/*.json"))
            or any(run_dir.glob("*/run.json"))):
        raise ConfigError(f"{run_dir} holds nothing to report: a run folder of `xlearner run` holds transfer "
                          f"results (transfer/<method>/<dataset>.json), stage folders (<stage>/run.json) or "
                          f"methods.json; give the folder the main job wrote (e.g. runs/<preset>)")


def write_report(run_dir: str | Path) -> Path:
    """Write report.md, results.json and plots/ in ``run_dir``; return the report's path."""
    run_dir = Path(run_dir)
    check_run_folder(run_dir)
    res = collect(run_dir)
    plots = _plots(res, run_dir / "plots")
    res["plots"] = plots
    write_text_atomic(run_dir / "results.json", json.dumps(_jsonable(res), indent=2))
    path = run_dir / "report.md"
    write_text_atomic(path, render_markdown(res, plots))
    return path


def report_command(args) -> int:
    from xlearner.config import ConfigError

    several = len(args.run_dir) > 1
    if args.out and not several:
        raise ConfigError("--out writes the summary across runs: give two or more run folders (one per seed)")
    for run_dir in args.run_dir:  # before any report is rewritten
        check_run_folder(run_dir)
    if several:
        check_comparable_runs(args.run_dir)
    results = {}
    for run_dir in args.run_dir:
        path = write_report(run_dir)
        res = results[str(run_dir)] = json.loads((Path(run_dir) / "results.json").read_text())
        if not res["datasets"]:
            print(f"xlearner report: no transfer results under {Path(run_dir) / 'transfer'}; wrote {path} anyway")
        else:
            gains = "; ".join(f"{t}: " + ", ".join(f"vs {m} {v:+.1f}" for m, v in g.items())
                              for t, g in res["gains"].items() if g)
            print(f"wrote {path} ({len(res['datasets'])} datasets, {len(res['methods'])} methods)"
                  + (f" - {res['reference']} gain {gains}" if gains else ""))
        print_gate_failures(res)
    if several:
        text = render_upstream_seed_summary(summarise_runs(results))
        print(text)
        if args.out:
            write_text_atomic(Path(args.out), text + "\n")
            print(f"wrote {args.out}")
    return 0


def print_gate_failures(res: dict[str, Any]) -> None:
    """Tell the user, at the end of the console output, when the gains measure nothing."""
    fails = gate_failures(res)
    if fails:
        print(gate_verdict_line(res).strip("*"))
        for line in fails:
            print(f"  gate failed: {line}")
