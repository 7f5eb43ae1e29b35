"""Precise BN: validation of a multi-source model with per-source BatchNorm statistics.

Two sources whose inputs live at very different offsets share one BatchNorm. Trained on
batches of both, its running statistics blend them, so in eval mode every input of a source
lands on one side of zero and the sign classifier guesses one class for all. Re-estimated
on a source's own images (precise BN), the same network is exact again.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from xlearner.stages import common

OFFSET = {"a": 10.0, "b": -10.0}


def _batches(source: str, n: int = 4, b: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, 2, (b,), generator=g)
        x = OFFSET[source] + (2.0 * labels - 1.0) + 0.1 * torch.randn(b, generator=g)
        out.append({"images": x.view(b, 1, 1, 1), "labels": labels})
    return out


class TwoSourceStage(nn.Module):
    """Stage-shaped toy: one BatchNorm 'backbone', a sign classifier per source."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm2d(1, affine=False))
        self.scale = nn.Parameter(torch.ones(()))

    def features(self, images: Tensor, task: str) -> Tensor:
        return self.net(images)

    def predict(self, images: Tensor, source: str) -> Tensor:
        z = self.features(images, "cls").flatten(1) * self.scale
        return torch.cat([-z, z], dim=1)  # class 1 where the normalised value is positive

    def product(self) -> nn.Module:
        return self.net


def _blend_statistics(stage: TwoSourceStage) -> None:
    stage.train()
    with torch.no_grad():
        for ba, bb in zip(_batches("a", 30, seed=1), _batches("b", 30, seed=2)):
            stage.features(ba["images"], "cls")
            stage.features(bb["images"], "cls")


def test_precise_bn_restores_per_source_accuracy():
    stage = TwoSourceStage()
    _blend_statistics(stage)
    bn = stage.net[0]
    mean_before, var_before = bn.running_mean.clone(), bn.running_var.clone()
    assert abs(float(mean_before)) < 2.0  # the blend sits between the two sources

    val = {"a": _batches("a", seed=3), "b": _batches("b", seed=4)}
    train = {"a": _batches("a", seed=5), "b": _batches("b", seed=6)}
    tasks = {"a": "cls", "b": "cls"}
    k = {"a": 2, "b": 2}

    blended = common.evaluate_sources(stage.predict, val, tasks, k, module=stage)
    assert blended["a"] < 0.65 and blended["b"] < 0.65  # one class for everything: about chance

    precise = common.evaluate_precise_bn(stage, val, train, tasks, k)
    assert set(precise) == {"a/precise_bn", "b/precise_bn"}
    assert precise["a/precise_bn"] > 0.99 and precise["b/precise_bn"] > 0.99

    # the trained statistics, the momentum and the mode are restored afterwards
    assert torch.equal(bn.running_mean, mean_before) and torch.equal(bn.running_var, var_before)
    assert bn.momentum == 0.1
    assert stage.training  # validation leaves the stage in the mode it found it (train)


def test_precise_bn_statistics_are_exact_and_mode_is_kept():
    stage = TwoSourceStage()
    _blend_statistics(stage)
    stage.train()
    loader = _batches("a", n=3, seed=7)
    xs = torch.cat([b["images"] for b in loader])
    with common.precise_bn(stage.product(), lambda x: stage.features(x, "cls"), loader):
        bn = stage.net[0]
        assert not bn.training
        # cumulative average of the per-batch means (equal batch sizes: the mean of all images)
        assert torch.allclose(bn.running_mean, xs.mean().view(1), atol=1e-5)
    assert stage.net[0].training  # back in train mode


def test_a_batchnorm_the_run_does_not_reach_keeps_its_statistics():
    """A head's BN (the linear seg head has one) is outside ``run_backbone``: reset to mean 0 and
    variance 1, it would normalise the head's input with statistics it never had."""
    backbone, head = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    head.running_mean.fill_(5.0)
    head.running_var.fill_(4.0)
    owner = nn.ModuleDict({"backbone": backbone, "head": head})
    loader = [{"images": torch.randn(8, 3) + 2.0} for _ in range(3)]
    with common.precise_bn(owner, backbone, loader):
        assert torch.allclose(backbone.running_mean, torch.cat([b["images"] for b in loader]).mean(0), atol=1e-5)
        assert head.running_mean.tolist() == [5.0] * 3 and head.running_var.tolist() == [4.0] * 3
    assert head.running_mean.tolist() == [5.0] * 3
