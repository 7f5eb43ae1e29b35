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
    assert report_command(SimpleNamespace(run_dir=str(run_dir))) == 0
    res = json.loads((run_dir / "results.json").read_text())
    assert res["methods"][0] == "xlearner"
    assert set(res["methods"]) == {"xlearner", "ssst", "msmt"}
    assert res["costs"]["ssst"]["images_seen"] == 800  # stage dir named like the method
    assert "wrote" in capsys.readouterr().out
