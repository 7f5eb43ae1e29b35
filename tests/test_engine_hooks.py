"""The pieces ``fit`` is cut into: the step metrics, the hooks' order, the resume, ``step_s``."""
from __future__ import annotations

import math
import time

import pytest
import torch
from test_engine import FakeLoader, Toy, cfg, read_log, train_lines

from xlearner.engine import NonFiniteLossError, atomic_save, fit, load_checkpoint
from xlearner.engine import checkpoint as ckpt
from xlearner.engine.step_metrics import StepMetrics

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def _row(a: float, b: float, images: int) -> torch.Tensor:
    return torch.tensor([a, b, a + b, float(images)])  # [*losses, total, images]


def _metrics(on_nonfinite: str = "error") -> StepMetrics:
    m = StepMetrics(world=1, grad_norm=False, on_nonfinite=on_nonfinite, ckpt_path=None, images_seen=100)
    m.names = ["a", "b"]
    return m


def test_step_metrics_raise_at_the_first_bad_step():
    m = _metrics()
    for step, (a, b) in enumerate([(1.0, 2.0), (1.0, math.nan), (math.inf, math.nan), (1.0, 1.0)], 1):
        m.record(step, 0.1, _row(a, b, 4))
    with pytest.raises(NonFiniteLossError) as err:
        m.flush()
    assert err.value.step == 2 and err.value.names == ["b"]
    assert str(err.value) == ("non-finite loss at step 2: 'b'=nan (loss names: ['b']); no checkpoint was written "
                              "for this step, last good checkpoint: none (no run folder)")
    assert m.images_seen == 104 and m.last_losses == {"a": 1.0, "b": 2.0, "total": 3.0}  # the rows before it count
    m.flush()  # the queue was dropped: nothing left to raise about


def test_step_metrics_window_means_and_skip_mode():
    m = _metrics("skip")
    for step, (a, b) in enumerate([(1.0, 2.0), (math.nan, 0.0), (3.0, 4.0)], 1):
        m.record(step, 0.01 * step, _row(a, b, 4))
    assert m.window_steps == 0 and m.images_seen == 100  # nothing read before a flush
    m.flush()
    rec = m.take_window(fallback_lr=9.0)
    assert {k: rec[k] for k in ("a", "b", "total", "lr", "skipped")} == {
        "a": 2.0, "b": 3.0, "total": 5.0, "lr": 0.03, "skipped": 1}
    assert rec["images_per_s"] > 0 and m.images_seen == 112 and m.call_images == 12
    assert m.last_losses == {"a": 3.0, "b": 4.0, "total": 7.0}
    empty = m.take_window(fallback_lr=9.0)  # a new window: no means yet, the last lr kept
    assert "total" not in empty and empty["lr"] == 0.03 and empty["skipped"] == 0


def test_loop_reads_the_device_only_at_warmup_log_val_and_checkpoint_steps(tmp_path, monkeypatch):
    """The deferred host sync: flushes with queued rows happen at step 1 (warm-up), the log steps
    (5, 10), the validation step (4, 8) and the checkpoint step (6), and the last; not every step."""
    real, flushed = StepMetrics.flush, []

    def spy(self):
        if self._pending:
            flushed.append([s for s, _, _ in self._pending])
        real(self)

    monkeypatch.setattr(StepMetrics, "flush", spy)
    fit(Toy(), FakeLoader(), cfg(steps=10, log_every=5, val_every=4, ckpt_every=6), tmp_path,
        evaluate=lambda m, step: {"x": 1.0})
    assert flushed == [[1], [2, 3, 4], [5], [6], [7, 8], [9, 10]]


def test_log_and_val_lines_are_written_before_the_checkpoint(tmp_path, monkeypatch):
    real, seen = ckpt.atomic_save, []

    def spy(state, path):
        lines = read_log(tmp_path)
        seen.append((state["step"], [(r["step"], "val" in r) for r in lines if r["step"] == state["step"]]))
        real(state, path)

    monkeypatch.setattr(ckpt, "atomic_save", spy)
    fit(Toy(), FakeLoader(), cfg(steps=4, log_every=2, val_every=2, ckpt_every=2), tmp_path,
        evaluate=lambda m, step: {"x": float(step)})
    assert seen == [(2, [(2, False), (2, True)]), (4, [(4, False), (4, True)])]


def test_a_kill_between_the_lines_and_the_checkpoint_resumes_from_the_previous_one(tmp_path, monkeypatch):
    c = cfg(steps=6, log_every=2, val_every=2, ckpt_every=2)
    evaluate = lambda m, step: {"w": float(m.head_a.weight.sum())}  # noqa: E731
    fit(Toy(), FakeLoader(), c, tmp_path / "full", evaluate=evaluate)
    real = ckpt.atomic_save

    def killed_at_4(state, path):
        if state["step"] == 4:
            raise KeyboardInterrupt
        real(state, path)

    monkeypatch.setattr(ckpt, "atomic_save", killed_at_4)
    with pytest.raises(KeyboardInterrupt):
        fit(Toy(), FakeLoader(), c, tmp_path / "part", evaluate=evaluate)
    monkeypatch.undo()
    assert [r["step"] for r in read_log(tmp_path / "part")][-2:] == [4, 4]  # step 4's lines were written
    assert load_checkpoint(ckpt.checkpoint_path(tmp_path / "part"))["step"] == 2
    fit(Toy(), FakeLoader(), c, tmp_path / "part", evaluate=evaluate, resume=True)
    drop = lambda rs: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rs]  # noqa: E731
    assert drop(read_log(tmp_path / "part")) == drop(read_log(tmp_path / "full"))  # once each, same values


def test_a_change_of_loss_names_closes_the_window(tmp_path):
    class Shrinking(Toy):
        def forward(self, batch):
            losses = super().forward(batch)
            return losses if batch["index"] < 3 else {"a": losses["a"]}

    fit(Shrinking(), FakeLoader(), cfg(steps=6, log_every=10), tmp_path)
    lines = train_lines(tmp_path)
    assert [(r["step"], "b" in r) for r in lines] == [(3, True), (6, False)]
    assert lines[1]["total"] == pytest.approx(lines[1]["a"], rel=1e-6)


def test_resume_with_another_world_size_warns_and_reuses_rng_states(tmp_path):
    fit(Toy(), FakeLoader(), cfg(steps=2, ckpt_every=1), tmp_path)
    path = ckpt.checkpoint_path(tmp_path)
    state = load_checkpoint(path)
    state["rng"] = state["rng"] * 2
    atomic_save(state, path)
    with pytest.warns(UserWarning, match="RNG states of 2 ranks, this run has 1; ranks reuse them modulo"):
        res = fit(Toy(), FakeLoader(), cfg(steps=3, ckpt_every=1), tmp_path, resume=True)
    assert res.steps == 3 and res.images_seen == 3 * 16


def test_step_s_counts_the_steps_and_not_evaluation(tmp_path):
    class SlowLoader(FakeLoader):
        def __iter__(self):
            for batch in super().__iter__():
                time.sleep(0.05)  # fetching a batch is part of a step
                yield batch

    def slow_eval(m, step):
        time.sleep(0.3)
        return {"x": 1.0}

    res = fit(Toy(), SlowLoader(), cfg(steps=4, val_every=2), tmp_path, evaluate=slow_eval)
    assert res.eval_s >= 0.6
    assert 4 * 0.05 <= res.step_s <= res.wall_s - res.eval_s
