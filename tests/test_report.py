import json

import pytest

from xlearner.report import write_report


def _res(dataset, task, metric, scores, params, ap50=None):
    extra = {"AP50": ap50} if ap50 else {}
    return {"dataset": dataset, "task": task, "metric": metric, "mode": "linear", "seeds": list(range(len(scores))),
            "scores": scores, "mean": sum(scores) / len(scores), "std": 0.0, "extra": extra,
            "backbone": "x.safetensors", "backbone_params": params, "wall_s": 1.0}


@pytest.fixture
def run_dir(tmp_path):
    scores = {
        "xlearner": {"a_cls": [0.80, 0.90], "b_cls": [0.60, 0.60], "d_det": [0.30, 0.40], "s_seg": [0.50, 0.50]},
        "ssst": {"a_cls": [0.70, 0.70], "b_cls": [0.50, 0.60], "d_det": [0.20, 0.20], "s_seg": [0.55, 0.55]},
        "msmt": {"a_cls": [0.85, 0.85], "b_cls": [0.65, 0.65], "d_det": [0.35, 0.35]},
    }
    tasks = {"a_cls": ("cls", "top1"), "b_cls": ("cls", "top1"), "d_det": ("det", "mAP"), "s_seg": ("seg", "mIoU")}
    for m, per in scores.items():
        (tmp_path / "transfer" / m).mkdir(parents=True)
        for d, sc in per.items():
            t, met = tasks[d]
            r = _res(d, t, met, sc, 1000, ap50=[0.6, 0.7] if t == "det" else None)
            (tmp_path / "transfer" / m / f"{d}.json").write_text(json.dumps(r))
    costs = {"expansion": (1000, 10.0, 100), "squeeze": (500, 4.0, 50), "ssst": (800, 6.0, 80), "msmt": (1200, 9.0, 120)}
    for sd, (img, gf, st) in costs.items():
        (tmp_path / sd).mkdir()
        (tmp_path / sd / "run.json").write_text(json.dumps(
            {"stage": sd, "cost": {"images_seen": img, "gflops": gf, "backbone_params": 1000, "steps": st}}))
    (tmp_path / "methods.json").write_text(json.dumps(
        {"xlearner": ["expansion", "squeeze"], "ssst": ["ssst"], "msmt": ["msmt"]}))
    return tmp_path


def test_report_tables_gains_costs(run_dir):
    path = write_report(run_dir)
    md = path.read_text()
    res = json.loads((run_dir / "results.json").read_text())

    # per dataset mean in points
    assert res["datasets"]["a_cls"]["methods"]["xlearner"]["mean"] == pytest.approx(85.0)
    assert "85.0 ± 7.1 (n=2)" in md  # sample std of (80, 90)
    # per task averages: xlearner cls = (85 + 60) / 2 = 72.5 ; ssst cls = (70 + 55)/2 = 62.5
    assert res["per_task"]["cls"]["xlearner"]["mean"] == pytest.approx(72.5)
    assert res["per_task"]["cls"]["ssst"]["mean"] == pytest.approx(62.5)
    # gains: cls vs ssst +10.0, vs msmt (85-85 + 60-65)/2 = -2.5 ; det vs ssst 35-20 = +15.0, vs msmt 0.0
    g = res["gains"]
    assert g["cls"]["ssst"] == pytest.approx(10.0)
    assert g["cls"]["msmt"] == pytest.approx(-2.5)
    assert g["det"]["ssst"] == pytest.approx(15.0)
    assert g["det"]["msmt"] == pytest.approx(0.0)
    assert g["seg"]["ssst"] == pytest.approx(-5.0)
    assert "msmt" not in g["seg"]
    for s in ("+10.0", "-2.5", "+15.0", "-5.0"):
        assert s in md
    # costs: xlearner = expansion + squeeze
    c = res["costs"]["xlearner"]
    assert c["images_seen"] == 1500 and c["steps"] == 150 and c["gflops"] == pytest.approx(14.0)
    assert res["costs"]["ssst"]["images_seen"] == 800
    assert c["backbone_params"] == 1000
    assert "1,500" in md
    # plots exist and are linked
    assert (run_dir / "plots" / "gains.png").stat().st_size > 1000
    assert (run_dir / "plots" / "scores.png").stat().st_size > 1000
    assert "plots/gains.png" in md and "plots/scores.png" in md
    # AP50 column for detection
    assert res["datasets"]["d_det"]["methods"]["xlearner"]["AP50_mean"] == pytest.approx(65.0)


def test_report_without_methods_json(run_dir, capsys):
    (run_dir / "methods.json").unlink()
    from types import SimpleNamespace

    from xlearner.report import report_command
    assert report_command(SimpleNamespace(run_dir=[str(run_dir)], out=None)) == 0
    res = json.loads((run_dir / "results.json").read_text())
    assert res["methods"][0] == "xlearner"
    assert set(res["methods"]) == {"xlearner", "ssst", "msmt"}
    assert res["costs"]["ssst"]["images_seen"] == 800  # stage dir named like the method
    assert "wrote" in capsys.readouterr().out


def test_paired_standard_error_and_verdicts(run_dir):
    """Gains are paired by seed: a constant per-seed difference has s.e. 0, whatever the seed spread."""
    from xlearner.report import paired, verdict

    a = {"seeds": [0, 1, 2], "scores": [50.0, 70.0, 90.0]}
    b = {"seeds": [0, 1, 2], "scores": [48.0, 68.0, 88.0]}
    g, se, n = paired(a, b)
    assert (g, se, n) == (pytest.approx(2.0), pytest.approx(0.0), 3)
    assert verdict(g, se) == "win"  # an unpaired s.e. (~11.6) would call it a tie
    c = {"seeds": [2, 1, 0], "scores": [80.0, 75.0, 55.0]}  # pairs by seed, not by position
    g, se, n = paired(a, c)
    # differences 50-55=-5, 70-75=-5, 90-80=+10: mean 0, sd 8.66, s.e. 5.0
    assert g == pytest.approx(0.0) and se == pytest.approx(5.0) and n == 3
    assert verdict(g, se) == "tie" and verdict(-11.0, 5.0) == "loss" and verdict(1.0, float("nan")) == "n/a"

    res = json.loads((write_report(run_dir).parent / "results.json").read_text())
    # cls vs ssst per seed: seed0 ((80-70)+(60-50))/2 = 10, seed1 ((90-70)+(60-60))/2 = 10 -> +10 ± 0: win
    assert res["gains_se"]["cls"]["ssst"] == pytest.approx(0.0)
    assert res["gains_verdict"]["cls"]["ssst"] == "win"
    # cls vs msmt: seed0 -5, seed1 0 -> -2.5 ± 2.5: tie
    assert res["gains_se"]["cls"]["msmt"] == pytest.approx(2.5)
    assert res["gains_verdict"]["cls"]["msmt"] == "tie"
    md = (run_dir / "report.md").read_text()
    assert "+10.0 ± 0.0 (win)" in md and "-2.5 ± 2.5 (tie)" in md


def _probe_scores(feature_fn, seeds) -> list[float]:
    """Linear-probe top-1 of a 'backbone' (a feature function) on a fixed labelled set, per seed."""
    import numpy as np

    from xlearner.transfer.linear_probe import probe

    data = np.random.default_rng(123)
    x = data.normal(size=(360, 8))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)  # the label lives in the inputs
    split = [(x[:200], y[:200]), (x[200:260], y[200:260]), (x[260:], y[260:])]
    out = []
    for s in seeds:
        rng = np.random.default_rng(s)
        keep = np.sort(rng.permutation(200)[:160])  # what varies with the seed: the probe's sample
        tr = (feature_fn(split[0][0][keep], s), split[0][1][keep])
        out.append(probe(tr, (feature_fn(split[1][0], s), split[1][1]),
                         (feature_fn(split[2][0], s), split[2][1]), [0.1, 1.0], seed=s)["top1"])
    return out


def _gate_run(tmp_path, on_task_fn, scratch_fn, seeds=(0, 1, 2)):
    from xlearner.report import check_gates, collect

    for m, fn in (("ssst", on_task_fn), ("scratch", scratch_fn)):
        (tmp_path / "transfer" / m).mkdir(parents=True)
        r = _res("toy", "cls", "top1", _probe_scores(fn, seeds), 10)
        r["seeds"] = list(seeds)
        (tmp_path / "transfer" / m / "toy.json").write_text(json.dumps(r))
    res = collect(tmp_path)
    return res["gates"]["separation"][0], res


def test_separation_gate_fails_when_protocol_cannot_rank(tmp_path):
    import numpy as np

    def random_backbone(offset):
        # features drawn at random for each image, independent of its content
        return lambda x, s: np.random.default_rng(1000 * offset + s).normal(size=(len(x), 16))

    # two backbones whose features ignore the image: both at chance, no separation
    row, res = _gate_run(tmp_path, random_backbone(1), random_backbone(2))
    assert row["n"] == 3 and not row["pass"]
    assert res["gates"]["can_rank"] is False
    from xlearner.report import gate_failures
    assert any(line.startswith("separation toy: ssst - scratch") for line in gate_failures(res))


def test_separation_gate_passes_when_protocol_ranks(tmp_path):
    import numpy as np

    w = np.random.default_rng(7).normal(size=(8, 16))
    informative = lambda x, s: x @ w  # noqa: E731  a backbone that keeps the label's signal
    noise = lambda x, s: np.random.default_rng(s).normal(size=(len(x), 16))  # noqa: E731
    row, res = _gate_run(tmp_path, informative, noise)
    assert row["n"] == 3 and row["gain"] > 30 and row["pass"], row
    assert res["gates"]["can_rank"] is True
    md = (write_report(tmp_path)).read_text()
    assert "Can this run rank backbones? yes" in md.splitlines()[4]


def test_upstream_gates_read_precise_bn_figures(run_dir):
    (run_dir / "config.yaml").write_text(json.dumps({"gates": {"upstream": {"fashion": 85, "mnist": 95}}}))
    for sd, fashion, mnist in (("ssst", 0.90, None), ("msmt", 0.80, 0.97)):
        info = json.loads((run_dir / sd / "run.json").read_text())
        info["sources"] = [{"name": "fashion"}] + ([{"name": "mnist"}] if mnist else [])
        info["metrics"] = {"fashion": 0.40, "fashion/precise_bn": fashion}
        if mnist:
            info["metrics"].update({"mnist": 0.5, "mnist/precise_bn": mnist})
        (run_dir / sd / "run.json").write_text(json.dumps(info))
    (run_dir / "scratch").mkdir()  # random weights: trains nothing, so it is not gated
    (run_dir / "scratch" / "run.json").write_text(json.dumps(
        {"stage": "scratch", "cost": {"steps": 0}, "sources": [{"name": "fashion"}], "metrics": {}}))
    res = json.loads((write_report(run_dir).parent / "results.json").read_text())
    rows = {(r["stage"], r["source"]): r for r in res["gates"]["upstream"]}
    assert not any(stage == "scratch" for stage, _ in rows)
    assert rows[("ssst", "fashion")]["score"] == pytest.approx(90.0) and rows[("ssst", "fashion")]["pass"]
    assert rows[("msmt", "fashion")]["pass"] is False and rows[("msmt", "fashion")]["counts"] is False
    assert rows[("msmt", "mnist")]["pass"]
    md = (run_dir / "report.md").read_text()
    assert "| msmt | fashion | 80.0 | precise BN | 85 | FAIL (not deciding) |" in md
    # separation needs ssst/msst and scratch results: missing here, so the verdict is NO
    assert "Can this run rank backbones? NO" in md


def test_gate_failures_read_back_from_results_json(tmp_path, capsys):
    """One seed: no standard error (NaN, stored as null); the failure is still printed."""
    from xlearner.report import print_gate_failures

    for m, sc in (("ssst", [0.9]), ("scratch", [0.5])):
        (tmp_path / "transfer" / m).mkdir(parents=True)
        (tmp_path / "transfer" / m / "toy.json").write_text(json.dumps(_res("toy", "cls", "top1", sc, 10)))
    write_report(tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["gates"]["separation"][0]["se"] is None
    print_gate_failures(res)
    out = capsys.readouterr().out
    assert "Can this run rank backbones? NO" in out
    assert "gate failed: separation toy: ssst - scratch = +40.0 (s.e. -, 1 seeds)" in out


def test_ablations_get_their_own_table_with_the_gain_over_xlearner(run_dir):
    """An ablation is X-Learner with one lever changed: its gain is ablation minus X-Learner (not the
    headline's X-Learner minus baseline), and it is not a baseline of the headline."""
    per = {"a_cls": [0.90, 0.90], "b_cls": [0.60, 0.70], "d_det": [0.25, 0.35], "s_seg": [0.50, 0.50]}
    tasks = {"a_cls": ("cls", "top1"), "b_cls": ("cls", "top1"), "d_det": ("det", "mAP"), "s_seg": ("seg", "mIoU")}
    (run_dir / "transfer" / "xlearner[kd_logits]").mkdir()
    for d, sc in per.items():
        t, met = tasks[d]
        (run_dir / "transfer" / "xlearner[kd_logits]" / f"{d}.json").write_text(json.dumps(_res(d, t, met, sc, 1000)))
    md = write_report(run_dir).read_text()
    res = json.loads((run_dir / "results.json").read_text())
    a = res["ablations"]["xlearner[kd_logits]"]
    # cls: ablation (90 + 65) / 2 = 77.5 against xlearner 72.5: +5.0; pairs (+10, 0), (0, +10) -> per-seed +5, +5
    assert a["cls"]["mean"] == pytest.approx(77.5) and a["cls"]["gain"] == pytest.approx(5.0)
    assert a["cls"]["se"] == pytest.approx(0.0) and a["cls"]["verdict"] == "win"
    assert a["det"]["gain"] == pytest.approx(-5.0) and a["det"]["verdict"] == "loss"  # pairs (-5, -5)
    assert a["seg"]["gain"] == pytest.approx(0.0)
    headline = md.split("## Headline", 1)[1].split("\n## ", 1)[0]
    assert "kd_logits" not in headline
    section = md.split("## Ablations and levers", 1)[1].split("\n## ", 1)[0]
    assert "| xlearner[kd_logits] | 77.5 (+5.0 ± 0.0 (win))" in section
    assert "| xlearner | 72.5 |" in section


def test_report_says_when_scores_are_on_validation_splits(run_dir):
    for f in (run_dir / "transfer").glob("*/*.json"):
        r = json.loads(f.read_text())
        f.write_text(json.dumps({**r, "eval_split": "val"}))
    md = write_report(run_dir).read_text()
    assert "validation** splits" in md and "Mixed splits" not in md
    f = next((run_dir / "transfer" / "ssst").glob("*.json"))
    f.write_text(json.dumps({**json.loads(f.read_text()), "eval_split": "test"}))
    assert "Mixed splits" in write_report(run_dir).read_text()


def _fake_results(run_dir, ref_means, gains, seed=0, baseline_gains=None):
    """A results.json as `xlearner report` writes it, with X-Learner's averages and one lever's gains."""
    run_dir.mkdir()
    abl = {"xlearner[lever]": {t: {"mean": ref_means[t] + g, "gain": g, "se": 0.1, "verdict": "tie"}
                               for t, g in gains.items()}}
    res = {"reference": "xlearner", "ablations": abl,
           "per_task": {t: {"xlearner": {"mean": m}} for t, m in ref_means.items()},
           "gains": {t: {"msmt": g} for t, g in (baseline_gains or {}).items()},
           "gains_se": {t: {"msmt": 0.5} for t in (baseline_gains or {})},
           "gains_verdict": {t: {"msmt": "tie"} for t in (baseline_gains or {})}}
    (run_dir / "results.json").write_text(json.dumps(res))
    (run_dir / "config.yaml").write_text(json.dumps({"name": "default", "seed": seed, "transfer": {"eval_split": "val"}}))
    return run_dir


def test_upstream_seed_summary_judges_a_lever_on_the_spread_between_runs(tmp_path):
    """lever_seeds.py --summarise: the mean of the per-run gains, its s.e. over runs (not over the
    runs' transfer seeds), and win / loss where |mean| > 2 s.e."""
    from xlearner.report import render_upstream_seed_summary, upstream_seed_summary

    ref = {"cls": 90.0, "det": 5.0, "seg": 20.0}
    runs = [_fake_results(tmp_path / f"s{i}", ref, {"cls": c, "det": d, "seg": 1.0 + 0.1 * i}, seed=i,
                          baseline_gains={"cls": -c, "det": 1.0})
            for i, (c, d) in enumerate([(2.0, -1.0), (-2.0, -1.2), (0.3, -0.8)])]
    summ = upstream_seed_summary(runs)
    lever = summ["levers"]["xlearner[lever]"]
    assert lever["cls"]["gain"] == pytest.approx(0.1) and lever["cls"]["verdict"] == "tie"
    assert lever["det"]["gain"] == pytest.approx(-1.0)
    assert lever["det"]["se"] == pytest.approx(0.2 / 3 ** 0.5)  # sample std 0.2 over 3 runs
    assert lever["det"]["verdict"] == "loss" and lever["seg"]["verdict"] == "win"
    assert lever["seg"]["n"] == 3
    text = render_upstream_seed_summary(summ)
    assert "-1.0 ± 0.1 (loss)" in text and "90.0 / 5.0 / 20.0" in text and "(n = 3)" in text
    msmt = summ["headline"]["msmt"]  # X-Learner minus msmt, from each run's headline
    assert msmt["cls"]["gain"] == pytest.approx(-0.1) and msmt["cls"]["n"] == 3
    assert msmt["det"]["se"] == 0.0 and msmt["det"]["verdict"] == "win"
    assert "+1.0 ± 0.0 (win) [+1.0, +1.0, +1.0]" in text
    with pytest.raises(ValueError, match="given twice"):
        upstream_seed_summary([runs[0], runs[0]])
    other = _fake_results(tmp_path / "test_split", ref, {"cls": 0.0}, seed=3)
    (other / "config.yaml").write_text(json.dumps({"name": "default", "seed": 3, "transfer": {"eval_split": "test"}}))
    with pytest.raises(ValueError, match="differs .* in transfer"):
        upstream_seed_summary([runs[0], other])
    with pytest.raises(FileNotFoundError, match="no results.json"):
        upstream_seed_summary([runs[0], tmp_path / "missing"])


def test_report_command_across_upstream_seeds(run_dir, tmp_path_factory, capsys):
    """`xlearner report RUN0 RUN1 --out F`: each run's report, then X-Learner's gain over each
    baseline as the mean over the runs ± its s.e. over the runs; runs whose settings differ in more
    than the seed are refused before any report is rewritten."""
    import shutil

    from xlearner.cli import main

    other = tmp_path_factory.mktemp("seed1") / "run"
    shutil.copytree(run_dir, other)
    f = other / "transfer" / "xlearner" / "a_cls.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "scores": [0.70, 0.80]}))
    (run_dir / "config.yaml").write_text(json.dumps({"name": "t", "seed": 0}))
    (other / "config.yaml").write_text(json.dumps({"name": "t", "seed": 1}))
    out = other.parent / "across.md"
    assert main(["report", str(run_dir), str(other), "--out", str(out)]) == 0
    text = out.read_text()
    # cls vs ssst: per-seed gains (+10, +10) in the first run, (+5, +5) in the second
    row = next(line for line in text.splitlines() if line.startswith("| ssst |"))
    assert "+7.5 ± 2.5 (win) [+10.0, +5.0]" in row
    assert (other / "report.md").is_file() and "across 2 runs" in capsys.readouterr().out

    (other / "config.yaml").write_text(json.dumps({"name": "t", "seed": 1, "train": {"steps": 9}}))
    before = (other / "report.md").stat().st_mtime_ns
    assert main(["report", str(run_dir), str(other)]) == 2
    err = capsys.readouterr().err
    assert "differs from" in err and "in train:" in err
    assert (other / "report.md").stat().st_mtime_ns == before
    assert main(["report", str(run_dir), "--out", str(out)]) == 2  # --out is the summary: two runs or more
    assert "two or more run folders" in capsys.readouterr().err


def test_report_refuses_a_folder_without_run_outputs(run_dir, tmp_path_factory, capsys):
    """`xlearner report` on an empty folder (or a mistyped one holding other files) is a usage error,
    exit 2, naming the folder and what a run folder holds; nothing is written there, and with several
    folders no report is rewritten."""
    from xlearner.cli import main

    empty = tmp_path_factory.mktemp("empty")
    (empty / "notes.txt").write_text("not a run")
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "transfer/<method>/<dataset>.json" in err and "run.json" in err
    assert sorted(p.name for p in empty.iterdir()) == ["notes.txt"]
    write_report(run_dir)
    before = (run_dir / "report.md").stat().st_mtime_ns
    assert main(["report", str(run_dir), str(empty)]) == 2
    assert (run_dir / "report.md").stat().st_mtime_ns == before
    (empty / "methods.json").write_text(json.dumps({"xlearner": ["expansion", "squeeze"]}))
    assert main(["report", str(empty)]) == 0  # a job that has started: its report says what is missing
    assert (empty / "report.md").is_file()


def _add_teachers(run_dir, scores):
    """Teacher rows: the expansion branches' transfers, one row per branch (as `xlearner run` writes them)."""
    tasks = {"a_cls": ("cls", "top1"), "b_cls": ("cls", "top1"), "d_det": ("det", "mAP"), "s_seg": ("seg", "mIoU")}
    for m, per in scores.items():
        (run_dir / "transfer" / m).mkdir(parents=True)
        for d, sc in per.items():
            (run_dir / "transfer" / m / f"{d}.json").write_text(json.dumps(_res(d, *tasks[d], sc, 1000)))
    methods = json.loads((run_dir / "methods.json").read_text())
    (run_dir / "methods.json").write_text(json.dumps({**methods, **{m: ["expansion"] for m in scores}}))


def test_teacher_rows_give_the_retention_and_stay_out_of_the_headline(run_dir):
    """Student (xlearner) minus its best teacher per task type, paired by seed; the teachers are not
    baselines: no headline row, no gain bar, and an across-seed summary keeps them out too."""
    from xlearner.report import summarise_runs

    _add_teachers(run_dir, {
        # cls: the cls branch is the best teacher, (82+62)/2 = 72 on average; det: the det branch (0.45)
        "xlearner.expansion[cls]": {"a_cls": [0.82, 0.86], "b_cls": [0.62, 0.60], "d_det": [0.10, 0.10],
                                    "s_seg": [0.40, 0.40]},
        "xlearner.expansion[det]": {"a_cls": [0.50, 0.50], "b_cls": [0.40, 0.40], "d_det": [0.40, 0.50],
                                    "s_seg": [0.45, 0.45]},
    })
    md = write_report(run_dir).read_text()
    res = json.loads((run_dir / "results.json").read_text())
    ret = res["retention"]
    assert ret["cls"]["teacher"] == "xlearner.expansion[cls]"
    # per seed: seed0 ((80-82)+(60-62))/2 = -2, seed1 ((90-86)+(60-60))/2 = +2 -> 0 ± 2: tie
    assert ret["cls"]["gain"] == pytest.approx(0.0) and ret["cls"]["se"] == pytest.approx(2.0)
    assert ret["cls"]["verdict"] == "tie" and ret["cls"]["teacher_mean"] == pytest.approx(72.5)
    assert ret["det"]["teacher"] == "xlearner.expansion[det]"
    assert ret["det"]["gain"] == pytest.approx(-10.0) and ret["det"]["verdict"] == "loss"  # 30-40, 40-50
    assert ret["seg"]["teacher"] == "xlearner.expansion[det]" and ret["seg"]["gain"] == pytest.approx(5.0)
    headline = md.split("## Headline")[1].split("## ")[0]
    assert "ssst" in headline and "xlearner.expansion" not in headline
    assert "## What the squeeze keeps of its teachers" in md and "not baselines" in md
    assert "| detection (COCO mAP) | 35.0 | xlearner.expansion[det] 45.0 | -10.0 ± 0.0 (loss) |" in md
    assert res["costs"]["xlearner.expansion[det]"]["stages"] == ["expansion"]
    summary = summarise_runs({"r0": res, "r1": res})
    assert not any(m.startswith("xlearner.expansion") for m in summary["headline"])
    assert summary["retention"]["det"]["gain"] == pytest.approx(-10.0) and summary["retention"]["det"]["n"] == 2


def test_budget_curve_summary_slopes_and_verdict(tmp_path):
    """benchmarks/budget_curve.py: per budget the gain across seeds, the slope of the gain per
    doubling (least squares on log2 budget, with its s.e.), and the verdict from the smallest
    budget at which every task type wins against MSMT."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "budget_curve", Path(__file__).parents[1] / "benchmarks" / "budget_curve.py")
    bc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bc)
    slope, se, n = bc._slope([(1, 0.0), (2, 1.0), (4, 2.0), (1, 0.5), (2, 1.5), (4, 2.5)])
    # every method's steps scale alike, X-Learner's split between its stages too (docs/levers.md)
    assert bc.scaled_overrides("default", 2, []) == ["train.steps=520", "baselines.steps=1040", "train.warmup_steps=60"]
    assert bc.scaled_overrides("default", 4, ["expansion.steps=130", "squeeze.steps=390"])[-2:] == \
        ["expansion.steps=520", "squeeze.steps=1560"]
    # residuals +-0.25: s.e. = sqrt(6 * 0.0625 / (6 - 2) / Sxx 4)
    assert (slope, n) == (pytest.approx(1.0), 6) and se == pytest.approx((0.375 / 4 / 4) ** 0.5)
    assert bc._slope([(1, 0.0), (1, 1.0)])[0] != bc._slope([(1, 0.0), (1, 1.0)])[0]  # one budget: nan

    ref = {"cls": 90.0, "det": 5.0}
    msmt = {1: [(-1.0, 1.0), (-1.5, 0.5)], 2: [(0.0, 1.5), (0.4, 1.7)], 4: [(1.0, 2.0), (1.2, 2.2)]}
    for b, per_seed in msmt.items():
        for seed, (c, d) in enumerate(per_seed):
            r = tmp_path / f"x{b}_s{seed}"
            _fake_results(r, ref, {"cls": 0.0}, seed=seed, baseline_gains={"cls": c, "det": d})
            res = json.loads((r / "results.json").read_text())
            res["gains_se"] = {"cls": {"msmt": 0.1}, "det": {"msmt": 0.1}}
            res["gains_verdict"] = {"cls": {"msmt": "win" if c > 0 else "loss"}, "det": {"msmt": "win"}}
            res["retention"] = {"det": {"gain": -d, "se": 0.1, "verdict": "loss"}}
            (r / "results.json").write_text(json.dumps(res))
    curve = bc.summarise(tmp_path, [1.0, 2.0, 4.0], [0, 1])
    cls1 = curve["budgets"]["1"]["headline"]["msmt"]["cls"]
    assert cls1["gain"] == pytest.approx(-1.25) and cls1["n"] == 2 and cls1["verdict"] == "loss"
    assert curve["budgets"]["2"]["headline"]["msmt"]["cls"]["verdict"] == "tie"  # +0.2 ± 0.2
    assert curve["budgets"]["4"]["headline"]["msmt"]["cls"]["verdict"] == "win"  # +1.1 ± 0.1
    assert curve["slopes"]["msmt"]["cls"]["per_doubling"] == pytest.approx(1.175)
    assert curve["verdict"].startswith("X-Learner wins every task type against MSMT from 4x")
    assert curve["budgets"]["4"]["retention"]["det"]["gain"] == pytest.approx(-2.1)
    md = bc.render(curve, [])
    assert "| 1x | -1.2 ± 0.2 (loss, n=2) |" in md and "## Verdict" in md
    bc.plot(curve, tmp_path / "budget.png")
    assert (tmp_path / "budget.png").stat().st_size > 1000
