"""Engine tests on a toy two-source module and a deterministic, resumable fake loader (CPU)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from xlearner.config import TrainConfig
from xlearner.engine import NonFiniteLossError, atomic_save, fit, load_checkpoint, lr_factor
from xlearner.engine.checkpoint import checkpoint_path

G = 8  # global batch per source


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def make_batch(index: int, rank: int = 0, world: int = 1, seed: int = 0) -> dict:
    """Global batch ``index`` of two sources; rank r gets the r-th slice of it."""
    g = torch.Generator().manual_seed(seed * 100003 + index)
    xa = torch.randn(G, 8, generator=g)
    ya = (xa[:, 0] + xa[:, 1] > 0).long()  # learnable
    xb = torch.randn(G, 8, generator=g)
    yb = xb[:, :2].sum(1, keepdim=True) * 0.5
    sl = slice(rank * G // world, (rank + 1) * G // world)
    return {"a": {"images": xa[sl], "labels": ya[sl]}, "b": {"images": xb[sl], "target": yb[sl]},
            "index": index}


class FakeLoader:
    """Infinite, deterministic; ``state_dict`` is the number of batches handed out."""

    def __init__(self, rank: int = 0, world: int = 1, crash_at: int | None = None) -> None:
        self.pos, self.rank, self.world, self.crash_at = 0, rank, world, crash_at

    def __iter__(self):
        while True:
            if self.crash_at is not None and self.pos == self.crash_at:
                raise RuntimeError("simulated kill")
            b = make_batch(self.pos, self.rank, self.world)
            self.pos += 1
            yield b

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])


class Toy(nn.Module):
    """Shared trunk, head 'a' (cross-entropy), head 'b' (regression); dropout uses the RNG."""

    def __init__(self, nan_at_index: int | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Dropout(dropout))
        self.head_a = nn.Linear(16, 2)
        self.head_b = nn.Linear(16, 1)
        self.nan_at_index = nan_at_index

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        la = nn.functional.cross_entropy(self.head_a(self.trunk(batch["a"]["images"])), batch["a"]["labels"])
        lb = nn.functional.mse_loss(self.head_b(self.trunk(batch["b"]["images"])), batch["b"]["target"])
        if self.nan_at_index is not None and batch["index"] == self.nan_at_index:
            lb = lb * float("nan")
        return {"a": la, "b": lb}


def cfg(**kw) -> TrainConfig:
    base = dict(steps=12, lr=1e-2, warmup_steps=2, log_every=1, ckpt_every=100, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def read_log(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]


def train_lines(out: Path) -> list[dict]:
    return [r for r in read_log(out) if "val" not in r]


def test_loss_falls_and_outputs(tmp_path):
    res = fit(Toy(), FakeLoader(), cfg(steps=40, warmup_steps=4), tmp_path, seed=1)
    lines = train_lines(tmp_path)
    assert [r["step"] for r in lines] == list(range(1, 41))
    first = sum(r["total"] for r in lines[:5]) / 5
    last = sum(r["total"] for r in lines[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert set(lines[0]) >= {"step", "a", "b", "total", "lr", "images_per_s"}
    assert res.steps == 40 and res.images_seen == 40 * 2 * G and res.images_per_s > 0
    assert set(res.last_losses) == {"a", "b", "total"}
    assert any((tmp_path / "tb").iterdir())
    state = load_checkpoint(checkpoint_path(tmp_path))
    assert state["step"] == 40 and state["loader"] == {"pos": 40}


class WeightedToy(Toy):
    """Weights its own losses, as Stage.forward does: 'a' twice, 'b' not at all."""

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        losses = super().forward(batch)
        return {"a": 2.0 * losses["a"], "b": 0.0 * losses["b"]}


def test_objective_is_the_sum_of_the_modules_losses(tmp_path):
    toy = WeightedToy()
    bias_b = toy.head_b.bias.detach().clone()
    fit(toy, FakeLoader(), cfg(steps=3), tmp_path)
    for r in train_lines(tmp_path):
        assert r["b"] == 0.0 and r["a"] > 0
        assert r["total"] == pytest.approx(r["a"] + r["b"], rel=1e-6)
    assert torch.equal(toy.head_b.bias, bias_b)  # a zero-weighted loss trains nothing (no decay on biases)


def test_warmup_cosine_lr(tmp_path):
    c = cfg(steps=20, warmup_steps=4, lr=0.01, min_lr_ratio=0.1, optimizer="sgd", clip_grad=None)
    fit(Toy(), FakeLoader(), c, tmp_path)
    lr = {r["step"]: r["lr"] / 0.01 for r in train_lines(tmp_path)}
    assert lr[1] == pytest.approx(0.25) and lr[2] == pytest.approx(0.5) and lr[4] == pytest.approx(1.0)
    assert lr[5] == pytest.approx(1.0)  # cosine starts at its top
    assert lr[13] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert lr[20] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)  # the floor is reached at cfg.steps
    assert all(lr[s] >= lr[s + 1] for s in range(4, 20))


@pytest.mark.parametrize("ckpt_every,crash_at", [(1, 5), (3, 7)])
def test_resume_matches_uninterrupted(tmp_path, ckpt_every, crash_at):
    c = cfg(steps=12, ckpt_every=ckpt_every)
    full = tmp_path / "full"
    fit(Toy(), FakeLoader(), c, full, seed=3)
    part = tmp_path / "part"
    with pytest.raises(RuntimeError, match="simulated kill"):
        fit(Toy(), FakeLoader(crash_at=crash_at), c, part, seed=3)  # dies while drawing batch crash_at+1
    saved = load_checkpoint(checkpoint_path(part))["step"]
    assert saved == (crash_at // ckpt_every) * ckpt_every
    m2 = Toy()
    res = fit(m2, FakeLoader(), c, part, seed=3, resume=True)
    assert res.steps == 12
    a, b = train_lines(full), train_lines(part)
    assert [r["step"] for r in b] == list(range(1, 13))  # lines after the checkpoint were dropped
    for ra, rb in zip(a, b):
        for k in ("a", "b", "total", "lr"):
            assert rb[k] == pytest.approx(ra[k], abs=1e-6, rel=0), (ra["step"], k)
    wa = load_checkpoint(checkpoint_path(full))["model"]
    for k, v in m2.state_dict().items():
        assert torch.allclose(v, wa[k], atol=1e-6, rtol=0), k


def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    res = fit(Toy(), FakeLoader(), cfg(steps=2), tmp_path, resume=True)
    assert res.steps == 2
    assert "no checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("ckpt_every,log_every", [(1, 1), (2, 10)])
def test_nan_guard(tmp_path, ckpt_every, log_every):
    c = cfg(steps=10, ckpt_every=ckpt_every, log_every=log_every)
    with pytest.raises(NonFiniteLossError) as err:
        fit(Toy(nan_at_index=2), FakeLoader(), c, tmp_path)  # batch index 2 = step 3
    msg = str(err.value)
    assert "'b'" in msg and "step 3" in msg and "'a'" not in msg
    assert err.value.step == 3 and err.value.names == ["b"]
    assert isinstance(err.value, RuntimeError)
    state = load_checkpoint(checkpoint_path(tmp_path))  # weights_only=True
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_nan_skip_mode(tmp_path):
    res = fit(Toy(nan_at_index=2), FakeLoader(), cfg(steps=5), tmp_path, on_nonfinite="skip")
    lines = train_lines(tmp_path)
    assert lines[2]["skipped"] == 1 and sum(r["skipped"] for r in lines) == 1
    assert math.isfinite(res.last_losses["total"])


def test_atomic_write_survives_crash(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_crash_during_fit_checkpoint_keeps_previous(tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def flaky_save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"garbage")
            raise OSError("killed during save")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError):
        fit(Toy(), FakeLoader(), cfg(steps=6, ckpt_every=1), tmp_path)
    monkeypatch.undo()
    assert load_checkpoint(checkpoint_path(tmp_path))["step"] == 2


def test_evaluate_and_extra_state(tmp_path):
    seen = []

    def evaluate(m, step):
        assert isinstance(m, Toy)
        seen.append(step)
        torch.rand(5)  # consuming RNG here must not change training
        return {"acc": 0.5, "step": float(step)}

    c = cfg(steps=6, val_every=2)
    res = fit(Toy(), FakeLoader(), c, tmp_path / "ev", evaluate=evaluate, extra_state={"cfg": {"x": [1, 2]}})
    assert seen == [2, 4, 6] and res.metrics == {"acc": 0.5, "step": 6.0}
    vals = [r for r in read_log(tmp_path / "ev") if "val" in r]
    assert [v["step"] for v in vals] == [2, 4, 6]
    state = load_checkpoint(checkpoint_path(tmp_path / "ev"))
    assert state["extra_state"] == {"cfg": {"x": [1, 2]}}
    fit(Toy(), FakeLoader(), c, tmp_path / "plain")
    for ra, rb in zip(train_lines(tmp_path / "ev"), train_lines(tmp_path / "plain")):
        assert ra["total"] == rb["total"]


def test_train_compile_passes_its_mode_to_torch_compile(tmp_path, monkeypatch):
    modes = []

    def fake_compile(model, mode=None):
        modes.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    fit(Toy(), FakeLoader(), cfg(steps=1), None)
    fit(Toy(), FakeLoader(), cfg(steps=1, compile=True), None)
    fit(Toy(), FakeLoader(), cfg(steps=1, compile=True, compile_mode="reduce-overhead"), None)
    assert modes == ["default", "reduce-overhead"]
    with pytest.raises(ValueError, match="compile_mode"):
        cfg(compile_mode="fast")


def test_count_images_and_bf16_autocast_on_cpu(tmp_path):
    """train.amp=bf16 runs torch's CPU autocast (the GPU code path, testable on a CPU); auto stays fp32."""
    for amp, want in (("bf16", torch.bfloat16), ("auto", torch.float32)):
        toy, dtypes = Toy(), set()
        toy.head_a.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
        res = fit(toy, FakeLoader(), cfg(steps=2, amp=amp), tmp_path / amp, count_images=lambda b: 7)
        assert res.images_seen == 14 and dtypes == {want}


# ---------------------------------------------------------------------------- options for callers (transfer)

def test_fit_without_run_folder_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    res = fit(Toy(), FakeLoader(), cfg(steps=4, ckpt_every=1), None, seed=1)
    assert res.steps == 4 and set(res.last_losses) == {"a", "b", "total"}
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no log, no tb
    assert capsys.readouterr().out == ""  # no start line either (progress off)
    with_dir = fit(Toy(), FakeLoader(), cfg(steps=4), tmp_path / "run", seed=1)
    assert with_dir.last_losses == res.last_losses  # the same training
    with pytest.raises(ValueError, match="resume needs a run folder"):
        fit(Toy(), FakeLoader(), cfg(steps=4), None, resume=True)
    with pytest.raises(NonFiniteLossError, match="none \\(no run folder\\)"):
        fit(Toy(nan_at_index=1), FakeLoader(), cfg(steps=4), None)


def test_build_optimizer_groups():
    from xlearner.engine.trainer import build_optimizer, lr_scale_of

    toy, dev = Toy(), torch.device("cpu")
    default = build_optimizer(toy, cfg(weight_decay=0.05), dev)  # the stages' layout is unchanged
    assert [(len(g["params"]), g["weight_decay"], g["lr"]) for g in default.param_groups] == [
        (3, 0.05, 1e-2), (5, 0.0, 1e-2)]
    opt = build_optimizer(toy, cfg(weight_decay=0.05), dev, lr_scales={"trunk": 0.1, "trunk.1": 0.5, "nope": 3.0},
                          decay_1d=True)
    got = [([id(p) for p in g["params"]], g["weight_decay"], g["lr"]) for g in opt.param_groups]
    want = [([id(toy.trunk[0].weight), id(toy.trunk[0].bias)], 0.05, 1e-2 * 0.1),
            ([id(toy.trunk[1].weight), id(toy.trunk[1].bias)], 0.05, 1e-2 * 0.5),
            ([id(p) for p in [*toy.head_a.parameters(), *toy.head_b.parameters()]], 0.05, 1e-2)]
    assert got == want
    assert lr_scale_of("trunkx.weight", {"trunk": 0.1}) == 1.0  # a prefix names whole modules
    with pytest.raises(ValueError, match=">= 0"):
        build_optimizer(toy, cfg(), dev, lr_scales={"trunk": -1.0})


def test_fit_lr_scales_zero_freezes_a_module(tmp_path):
    toy = Toy()
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    fit(toy, FakeLoader(), cfg(steps=5), None, lr_scales={"head_b": 0.0}, decay_1d=True)
    after = toy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("head_b."))
    assert not torch.equal(before["head_a.weight"], after["head_a.weight"])


def test_fit_seed_none_goes_on_from_the_callers_rng():
    """seed=None: the run draws (dropout) from where the caller left the RNG, not a fresh seed."""
    def run(seed, caller_seed=None):
        toy = Toy(dropout=0.5)
        if caller_seed is not None:
            torch.manual_seed(caller_seed)
        return fit(toy, FakeLoader(), cfg(steps=3), None, seed=seed).last_losses

    assert run(None, caller_seed=7) == run(7)
    assert run(None, caller_seed=8) != run(7)


def test_fit_not_distributed_joins_no_process_group(monkeypatch, tmp_path):
    from xlearner.engine import hooks, step_metrics, trainer

    def refusing(name):
        def refuse(*args):
            raise AssertionError(f"{name} called")
        return refuse

    for mod, name in ((trainer, "init_distributed"), (trainer, "all_reduce_sum"), (hooks, "barrier"),
                      (hooks, "all_gather_object"), (step_metrics, "all_reduce_sum")):
        monkeypatch.setattr(mod, name, refusing(name))
    seen = []
    res = fit(Toy(), FakeLoader(), cfg(steps=2, ckpt_every=1), tmp_path, distributed=False,
              evaluate=lambda m, step: seen.append(type(m)) or {"x": 1.0})
    assert res.steps == 2 and seen == [Toy]  # the module itself, no DDP wrapper
