"""The main job end to end on the `quick` preset, and its skipping of finished parts on a rerun."""
import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

TEACHERS = {"xlearner.expansion[cls]", "xlearner.expansion[det]", "xlearner.expansion[seg]"}
METHODS = {"xlearner", *TEACHERS, "ssst", "msst_cls", "msst_det", "msst_seg", "msmt", "scratch"}


def _run(out, home, *extra):
    env = {**os.environ, "XLEARNER_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "xlearner.cli", "run", "--preset", "quick", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=600)


def test_quick_main_job_completes_then_skips_every_finished_part(tmp_path, embedded_home):
    from xlearner.config import load_config

    home = embedded_home()
    out = tmp_path / "quick"
    first = _run(out, home)
    assert first.returncode == 0, first.stderr[-3000:]
    datasets = load_config("quick").transfer.datasets

    # every stage finished and wrote its product
    for stage in ("expansion", "squeeze", "ssst", "msst_cls", "msst_det", "msst_seg", "msmt", "scratch"):
        run = json.loads((out / stage / "run.json").read_text())
        assert run["status"] == "done" and (out / stage / "model.safetensors").is_file()
        if stage != "scratch":  # every trained stage of the quick preset learns: its loss falls
            totals = [json.loads(line)["total"] for line in (out / stage / "log.jsonl").read_text().splitlines()
                      if '"total"' in line]
            assert len(totals) >= 4 and totals[-1] < totals[0], (stage, totals)
    # every method was transferred to every downstream dataset, with real scores
    results = json.loads((out / "results.json").read_text())
    for method in METHODS:
        for ds in datasets:
            res = json.loads((out / "transfer" / method / f"{ds}.json").read_text())
            assert res["dataset"] == ds and len(res["scores"]) == load_config("quick").transfer.seeds
            assert 0.0 <= res["mean"] <= 1.0
            assert results["datasets"][ds]["methods"][method]["mean"] == pytest.approx(100 * res["mean"])
    assert set(results["methods"]) == METHODS
    report = (out / "report.md").read_text()
    assert "Headline: gain of xlearner over each baseline" in report and "Training cost" in report
    assert "What the squeeze keeps of its teachers" in report and set(results["retention"]) == {"cls", "det", "seg"}
    # the gate verdict opens the report, and the quick preset (1 seed, no upstream gates) cannot rank
    assert report.splitlines()[4].startswith("**Can this run rank backbones? NO")
    assert "gate failed: separation" in first.stdout
    assert (out / "plots" / "gains.png").is_file()
    # every part's wall time is printed as it ends and kept in timings.json (written after every part)
    n_parts = int(re.search(r"\[xlearner run\] (\d+) parts", first.stdout).group(1))
    timings = json.loads((out / "timings.json").read_text())
    assert len(timings) == n_parts == first.stdout.count("[xlearner run] <- ")
    assert all(v >= 0 for v in timings.values()) and timings["expansion"] > 0

    # a second invocation skips every finished part
    second = _run(out, home)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "already finished and skipped, 0 to run" in second.stdout
    # a part whose output went missing is the only one that runs again
    (out / "transfer" / "msmt" / f"{datasets[0]}.json").unlink()
    third = _run(out, home)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "1 to run" in third.stdout
    assert (out / "transfer" / "msmt" / f"{datasets[0]}.json").is_file()
    assert third.stdout.count("[xlearner run] <- ") == 1  # the rerun part's time joins the earlier ones
    assert set(json.loads((out / "timings.json").read_text())) == set(timings)
