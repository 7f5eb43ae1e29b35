"""Elastic restarts: under torchrun --max-restarts, a stage whose rank was SIGKILLed is restarted by
torchrun, resumes from its last checkpoint and ends with the losses and weights of an uninterrupted
run (benchmarks/faults.py --elastic runs more tries)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_a_killed_rank_is_restarted_and_the_stage_resumes_identically(tmp_path):
    import faults

    config = faults.write_config(tmp_path)
    steps = 10
    ref = faults.torchrun(config, tmp_path / "ref", steps, restarts=0)
    assert ref.wait() == 0, (tmp_path / "ref.console").read_text()[-3000:]
    where = faults.kill_one_rank(config, tmp_path / "killed", steps, rank=1, after=4)
    console = (tmp_path / "killed.console").read_text()
    assert "torchrun exit 0; resumed from the checkpoint" in where, console[-3000:]
    ref_losses, ref_vals, ref_w = faults.results(tmp_path / "ref")
    losses, vals, w = faults.results(tmp_path / "killed")
    assert sorted(losses) == list(range(1, steps + 1)) and losses == ref_losses and vals == ref_vals
    assert set(w) == set(ref_w) and all(bool((w[k] == ref_w[k]).all()) for k in ref_w)


def test_a_first_attempt_joins_as_before(monkeypatch):
    """join_restarted_group touches nothing outside a restart (the env:// path of init_distributed stays)."""
    import torch.distributed as dist

    from xlearner.engine.distributed import join_restarted_group, restart_count

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert restart_count() == 0
    join_restarted_group()
    assert not dist.is_initialized()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert restart_count() == 2
    monkeypatch.setenv("WORLD_SIZE", "1")
    join_restarted_group()  # a single process never joins a group
    assert not dist.is_initialized()
