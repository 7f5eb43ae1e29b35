"""Run folders under `xlearner train`: one run at a time (a lock naming its holder), a resume that
trains the run it continues (same stage, same config but for the settings allowed to change), and
no finished run replaced without --overwrite. Tiny data from tests/fault_cases.py (16 px, 2 steps)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import fault_cases as fc
from xlearner.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def cli(*argv) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        code = main([str(a) for a in argv])
    return code, buf.getvalue()


@pytest.fixture()
def config(tmp_path) -> Path:
    data = fc.run_config(fc._cls(fc._cls_folder(tmp_path / "data")), steps=2, **{"train.ckpt_every": 1})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines() if '"total"' in line]


# ------------------------------------------------------------------------------ the lock (D2)

def test_a_second_run_into_a_locked_folder_is_refused_and_a_dead_holders_lock_taken_over(config, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from xlearner.runs import run_folder_lock\n"
                               "with run_folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)",
         str(out)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        assert holder.stdout.readline().strip() == "held"
        code, text = cli("train", config, "--stage", "msmt", "--out", out)
        assert code == 2, text
        assert f"run folder {out} is in use by process {holder.pid} on host {socket.gethostname()}" in text
        assert not (out / "error.log").exists() and not (out / "log.jsonl").exists()  # the holder's folder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()  # reaped: its pid no longer runs
    assert json.loads((out / "run.lock").read_text())["pid"] == holder.pid  # left behind by kill -9
    with pytest.warns(UserWarning, match=f"taking over the lock of process {holder.pid}, which no longer runs"):
        code, text = cli("train", config, "--stage", "msmt", "--out", out)
    assert code == 0, text
    assert not (out / "run.lock").exists() and _steps(out) == [1, 2]


def test_the_lock_is_held_while_training_and_released_after_an_error(config, tmp_path, monkeypatch):
    from xlearner import runs
    from xlearner.engine import trainer

    out = tmp_path / "run"
    seen = {}
    real_fit = trainer.fit

    def fit(*a, **k):
        seen["lock"] = json.loads((out / "run.lock").read_text())
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "fit", fit)
    assert cli("train", config, "--stage", "msmt", "--out", out)[0] == 130
    assert seen["lock"] == {"pid": os.getpid(), "host": socket.gethostname()}
    assert not (out / "run.lock").exists()
    monkeypatch.setattr(trainer, "fit", real_fit)
    with runs.run_folder_lock(out):  # held by this very process: another folder trains, this one is refused
        assert cli("train", config, "--stage", "msmt", "--out", tmp_path / "other")[0] == 0
        code, text = cli("train", config, "--stage", "msmt", "--out", out)
        assert code == 2 and f"in use by process {os.getpid()}" in text, text
        assert (out / "run.lock").exists()  # the refused run left the holder's lock alone
    assert not (out / "run.lock").exists()


# ------------------------------------------------------------------------------ resume and overwrite (D5)

def test_resume_refuses_a_changed_config_and_allows_more_steps(config, tmp_path):
    out = tmp_path / "run"
    assert cli("train", config, "--stage", "msmt", "--out", out)[0] == 0
    code, text = cli("train", config, "--stage", "msmt", "--out", out, "--resume", "train.lr=0.01", "train.steps=4")
    assert code == 2 and "train.lr: 0.001 -> 0.01" in text and "train.steps: 2 -> 4" in text, text
    assert "--allow-change train.steps accepts that" in text
    for change in ("train.optimizer=sgd", "sources.src.batch_size=3", "backbone.kwargs.stem_width=16"):
        code, text = cli("train", config, "--stage", "msmt", "--out", out, "--resume", change)
        assert code == 2 and change.split("=")[0] + ":" in text and "cannot change within a run" in text, text
    code, text = cli("train", config, "--stage", "msmt", "--out", out, "--resume", "--allow-change", "train.optimizer",
                     "train.optimizer=sgd")
    assert code == 2 and "--allow-change train.optimizer: a resumed run cannot change it" in text, text
    code, text = cli("train", config, "--stage", "msmt", "--out", out, "--resume", "--allow-change", "train.steps",
                     "train.steps=4", "train.log_every=2")  # log_every: display only, never checked
    assert code == 0, text
    assert "with changed settings: train.steps: 2 -> 4" in text
    info = json.loads((out / "run.json").read_text())
    assert info["cost"]["steps"] == 4 and _steps(out) == [1, 2, 4]
    code, text = cli("train", config, "--stage", "msmt", "--out", out, "--resume", "--allow-change", "train.steps",
                     "train.steps=3")
    assert code == 2 and "already trained 4 steps, more than the 3 asked for" in text, text


def test_resume_refuses_another_stage(config, tmp_path):
    out = tmp_path / "run"
    assert cli("train", config, "--stage", "msmt", "--out", out)[0] == 0
    before = (out / "model.safetensors").read_bytes()
    code, text = cli("train", config, "--stage", "scratch", "--out", out, "--resume")
    assert code == 2 and "holds a msmt run; --resume with --stage scratch" in text, text
    assert (out / "model.safetensors").read_bytes() == before


def test_a_run_is_replaced_only_with_overwrite(config, tmp_path):
    out = tmp_path / "run"
    assert cli("train", config, "--stage", "msmt", "--out", out)[0] == 0
    events = sorted((out / "tb").iterdir())
    (out / "backbone_timm.safetensors").write_bytes(b"an export of the old model")
    code, text = cli("train", config, "--stage", "msmt", "--out", out)
    assert code == 2 and f"run folder {out} holds a finished msmt run" in text and "--overwrite" in text, text
    code, text = cli("train", config, "--stage", "msmt", "--out", out, "--resume", "--overwrite")
    assert code == 2 and "give one of them" in text
    code, text = cli("train", config, "--stage", "msmt", "--out", out, "--overwrite", "train.steps=3")
    assert code == 0, text
    assert not any(p.exists() for p in events) and any((out / "tb").iterdir())  # old TensorBoard events gone
    assert not (out / "backbone_timm.safetensors").exists() and _steps(out) == [1, 2, 3]
    # an unfinished run (a checkpoint, no model yet) is not restarted silently either
    (out / "run.json").unlink()
    (out / "model.safetensors").unlink()
    code, text = cli("train", config, "--stage", "msmt", "--out", out, "train.steps=3")
    assert code == 2 and "holds an unfinished msmt run (checkpoint at step 3): continue it with --resume" in text


def test_an_elastic_restart_resumes_whatever_the_command_line_says(config, tmp_path, monkeypatch):
    """torchrun restarts the worker group with the same command: it continues the checkpoint (even under
    --overwrite, which would throw the progress away), still refusing a changed config."""
    out = tmp_path / "run"
    assert cli("train", config, "--stage", "msmt", "--out", out, "train.steps=3")[0] == 0
    (out / "run.json").unlink()  # as if killed after its last checkpoint
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    code, text = cli("train", config, "--stage", "msmt", "--out", out, "--overwrite", "train.steps=3")
    assert code == 0 and "resumed from" in text and _steps(out) == [1, 2, 3], text
    code, text = cli("train", config, "--stage", "msmt", "--out", out, "train.steps=3", "train.lr=0.01")
    assert code == 2 and "train.lr: 0.001 -> 0.01" in text


def test_config_changes_name_sources_by_name():
    from xlearner.runs import config_changes

    old = {"name": "a", "train": {"lr": 1.0, "progress": True}, "sources": [{"name": "m", "batch_size": 2}]}
    new = {"name": "b", "train": {"lr": 2.0, "progress": False}, "sources": [{"name": "m", "batch_size": 4},
                                                                            {"name": "f", "batch_size": 1}]}
    assert config_changes(old, new) == {"train.lr": (1.0, 2.0), "sources.m.batch_size": (2, 4),
                                        "sources.f.batch_size": ("(absent)", 1), "sources.f.name": ("(absent)", "f")}
