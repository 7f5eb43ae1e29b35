"""Backbone splitting, reconciliation at init, gradient isolation, lazy branches, heads."""
import copy

import pytest
import torch
from torch import nn

from xlearner.tasks import HeadOptions
from xlearner import tasks
from xlearner.config import BackboneConfig
from xlearner.models import (Backbone, DetHead, ExpandedNet, FPNNeck, Reconciliation, SegHead, SharedNet,
                             SourceSpec, TaskHeads, count_parameters)

CFG = BackboneConfig(name="resnet18", kwargs={"channels": [8, 16, 32, 64], "stem_width": 8})
TASKS = ["cls", "det", "seg"]
SOURCES = [SourceSpec("a", "cls", 5), SourceSpec("b", "cls", 3), SourceSpec("d", "det", 3), SourceSpec("s", "seg", 4)]


def _x(size=64):
    torch.manual_seed(0)
    return torch.randn(2, 3, size, size)


_BUILT = {}


def _expanded(**kw):
    """Built once per option set (timm model construction dominates the test time)."""
    key = tuple(sorted((k, str(v)) for k, v in kw.items()))
    if key not in _BUILT:
        torch.manual_seed(0)
        bb = Backbone(CFG)
        _BUILT[key] = ExpandedNet(CFG, TASKS, TaskHeads(SOURCES, bb.channels, bb.strides, HeadOptions(fpn_channels=32)), **kw)
    return copy.deepcopy(_BUILT[key])


def test_backbone_stages_match_timm_features():
    import timm

    bb = Backbone(CFG).eval()
    assert len(bb.stages) == 4 and bb.channels == [8, 16, 32, 64] and bb.strides == [4, 8, 16, 32]
    ref = timm.create_model("resnet18", num_classes=0, **CFG.kwargs)
    assert set(bb.state_dict()) == set(ref.state_dict())  # key names are timm's
    fo = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4), **CFG.kwargs).eval()
    fo.load_state_dict(bb.state_dict())
    x = _x()
    for a, b in zip(bb(x), fo(x)):
        assert torch.allclose(a, b, atol=1e-5)
    mid = bb.run_stages(x, 0, 2)
    assert [m.shape[1] for m in mid] == [8, 16]
    assert torch.allclose(bb.run_stages(mid[-1], 2, 4)[-1], bb(x)[-1], atol=1e-5)


@pytest.mark.parametrize("name", ["tv:resnet18", "mobilenetv3_small_100"])
def test_other_backbones(name):
    bb = Backbone(BackboneConfig(name=name)).eval()
    feats = bb(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == bb.channels and bb.strides == [4, 8, 16, 32]


def test_reconciliation_is_zero_at_init():
    r = Reconciliation(8)
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(r(x), torch.zeros_like(x))
    r.eval()
    assert torch.equal(r(x), torch.zeros_like(x))


def test_branch_equals_own_backbone_at_init():
    net = _expanded()
    x = _x()
    for t in TASKS:
        alone = net.backbones[t](x)
        for a, b in zip(net.branch_features(x, t), alone):
            assert torch.allclose(a, b, atol=1e-6)
    every = net.all_branch_features(x)
    for t in TASKS:
        assert torch.allclose(every[t][-1], net.backbones[t](x)[-1], atol=1e-6)


def _perturb_reconcilers(net):
    for m in net.reconcilers.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 0.5)


@pytest.mark.parametrize("detach", [True, False])
def test_detach_others_isolates_gradients(detach):
    net = _expanded(detach_others=detach)
    _perturb_reconcilers(net)
    net.branch_features(_x(32), "det")[-1].pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.backbones["det"].parameters())
    others = [p for t in ("cls", "seg") for p in net.backbones[t].parameters()]
    nonzero = any(p.grad is not None and p.grad.abs().sum() > 0 for p in others)
    assert nonzero == (not detach)


@pytest.mark.parametrize("detach", [True, False])
def test_detached_branches_build_no_autograd_graph(detach):
    """With detach_others the other branches' gradient is zero by design: they run without a graph
    (cheaper), while the kept branch and its incoming reconcilers still learn."""
    net = _expanded(detach_others=detach)
    _perturb_reconcilers(net)
    graph = []
    hooks = [st.register_forward_hook(lambda m, i, o: graph.append(o.requires_grad))
             for t in ("cls", "seg") for st in net.backbones[t].stages]
    net.branch_features(_x(32), "det")[-1].pow(2).mean().backward()
    for h in hooks:
        h.remove()
    assert graph and all(g == (not detach) for g in graph)
    r = net.reconcilers["s1"]["det_from_cls"].conv.weight
    assert r.grad is not None and r.grad.abs().sum() > 0


def _count_calls(net):
    calls = {}
    for t, bb in net.backbones.items():
        for i, stage in enumerate(bb.stages):
            calls[(t, i + 1)] = 0
            stage.register_forward_hook(lambda *a, key=(t, i + 1): calls.__setitem__(key, calls[key] + 1))
    return calls


def test_other_branches_stop_after_last_reconciliation():
    net = _expanded(reconcile_after=[1, 2])
    calls = _count_calls(net)
    net.branch_features(_x(32), "seg")
    for t in TASKS:
        for s in (1, 2):
            assert calls[(t, s)] == 1
        for s in (3, 4):
            assert calls[(t, s)] == (1 if t == "seg" else 0)


def test_no_reconciliation_runs_only_own_branch():
    net = _expanded(reconciliation=False)
    assert count_parameters(net.reconcilers) == 0
    calls = _count_calls(net)
    net.branch_features(_x(32), "cls")
    assert all(n == (1 if t == "cls" else 0) for (t, _), n in calls.items())


def _head_out(th, name, feats, size=(64, 64)):
    """Neck + head of source ``name`` (det: the neck's FPN levels, what DetHead.losses/detect take)."""
    task = th.sources[name].task
    neck = th.necks[task](feats)
    if task == "det":
        return neck
    return tasks.get(task).predict(th.heads[name], neck, torch.zeros(1, 3, *size))


def test_single_task_expanded():
    bb = Backbone(CFG)
    net = ExpandedNet(CFG, ["cls"], TaskHeads(SOURCES[:1], bb.channels, bb.strides, HeadOptions(fpn_channels=32)))
    assert len(net.reconcilers) == 0
    assert _head_out(net.task_heads, "a", net.branch_features(_x(32), "cls")).shape == (2, 5)


def test_shared_backbone_size_equals_one_branch():
    net = _expanded()
    bb = Backbone(CFG)
    shared = SharedNet(bb, TaskHeads(SOURCES, bb.channels, bb.strides, HeadOptions(fpn_channels=32)))
    assert shared.param_counts()["backbone"] == net.param_counts()["backbone/cls"] == count_parameters(net.backbones["det"])
    assert net.param_counts()["reconciliation"] > 0


def test_task_heads_outputs():
    bb = Backbone(CFG)
    th = TaskHeads(SOURCES, bb.channels, bb.strides, HeadOptions(fpn_channels=32))
    assert set(th.necks) == {"cls", "det", "seg"} and set(th.heads) == {"a", "b", "d", "s"}
    feats = bb(_x())
    assert _head_out(th, "a", feats).shape == (2, 5)
    assert _head_out(th, "b", feats).shape == (2, 3)
    assert _head_out(th, "s", feats).shape == (2, 4, 64, 64)
    fpn = _head_out(th, "d", feats)
    # the det neck gives FCOS's P3..P7 (strides 8..128; P6 and P7 of a 64 px image are 1x1)
    assert [f.shape for f in fpn] == [(2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2), (2, 32, 1, 1), (2, 32, 1, 1)]
    assert th.heads["d"].strides == [8, 16, 32, 64, 128]


def _fpn_feats():
    torch.manual_seed(0)
    neck = FPNNeck([8, 16, 32, 64], 32)
    return neck([torch.randn(2, c, 64 // s, 64 // s) for c, s in zip([8, 16, 32, 64], [4, 8, 16, 32])])


_TWO_BOXES = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0], [30.0, 20.0, 60.0, 50.0]]), "labels": torch.tensor([0, 2])}  # one image's det targets, in pixels of a 64 px image


def test_det_head_losses_and_detect():
    feats = _fpn_feats()
    head = DetHead(32, 3, [4, 8, 16, 32])
    targets = [_TWO_BOXES,
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    losses = head.losses(feats, (64, 64), targets)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["bbox_regression"] > 0
    sum(losses.values()).backward()
    empty = head.losses(feats, (64, 64), [targets[1], targets[1]])
    assert all(torch.isfinite(v) for v in empty.values())
    head.eval()
    dets = head.detect([f.detach() for f in feats], (64, 64))
    assert len(dets) == 2
    for d in dets:
        b = d["boxes"]
        assert b.shape[1] == 4 and len(b) == len(d["scores"]) == len(d["labels"]) > 0
        assert (b[:, 2:] >= b[:, :2]).all() and b.min() >= 0 and b.max() <= 64
        assert d["labels"].min() >= 0 and d["labels"].max() < 3


def test_seg_head_logits_shape():
    feats = _fpn_feats()
    assert SegHead(32, 6, [4, 8, 16, 32])(feats, (64, 64)).shape == (2, 6, 64, 64)


def test_resize_bilinear_paths_match_f_interpolate_in_values_and_gradients():
    """The CPU default (two matmuls) and the channels_last path (taken on CUDA) compute F.interpolate's resize:
    up and down, non-square, by size and by scale factor."""
    from xlearner.models.heads import Upsample2x, resize_bilinear

    torch.manual_seed(0)
    cases = [(6, 7, dict(size=(13, 11))), (16, 16, dict(size=(64, 64))), (12, 9, dict(size=(5, 4))),
             (5, 6, dict(scale_factor=2)), (7, 4, dict(scale_factor=(3, 0.5)))]
    for h, w, kw in cases:
        x = torch.randn(3, 5, h, w)
        outs, grads = [], []
        for cl in ("reference", None, False, True):
            xi = x.clone().requires_grad_(True)
            if cl == "reference":
                y = torch.nn.functional.interpolate(xi, mode="bilinear", align_corners=False, **kw)
            else:
                y = resize_bilinear(xi, channels_last=cl, **kw)
                assert y.is_contiguous(memory_format=torch.channels_last) == (cl is True)
            (y * torch.arange(y.numel()).reshape(y.shape).float().sin()).sum().backward()
            outs.append(y.detach().contiguous())
            grads.append(xi.grad)
        for o, g in zip(outs[1:], grads[1:]):
            assert o.shape == outs[0].shape, (h, w, kw)
            assert torch.allclose(o, outs[0], atol=1e-5), (h, w, kw)
            assert torch.allclose(g, grads[0], atol=1e-4), (h, w, kw)
    x = torch.randn(2, 3, 5, 5)
    ref = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(Upsample2x()(x), ref, atol=1e-6)


def test_det_head_box_regression_survives_a_step_that_lowers_it():
    """torchvision starts the ReLU'd (l, t, r, b) layer at bias 0: one step that lowers its
    pre-activations kills every box (GIoU loss stuck at 1, no gradient ever again), which killed
    some frozen det transfers. DetHead starts the bias at one stride, so the same step leaves the
    layer learning, while a head built like torchvision's (regression_bias=0) dies."""
    feats = [f.detach() for f in _fpn_feats()]
    targets = [_TWO_BOXES] * 2

    def regression_after_a_lowering_step(bias: float):
        torch.manual_seed(0)
        head = DetHead(32, 3, [4, 8, 16, 32], regression_bias=bias)
        reg = head.head.box  # outputs 0..3: the (l, t, r, b) distances, 4: centerness
        with torch.no_grad():
            reg.bias[:4] -= 0.5  # a first step that pushes every distance down by half a stride
        loss = head.losses(feats, (64, 64), targets)["bbox_regression"]
        loss.backward()
        return float(loss.detach()), float(reg.weight.grad[:4].abs().sum() + reg.bias.grad[:4].abs().sum())

    torch.manual_seed(0)
    fresh = DetHead(32, 3, [4, 8, 16, 32]).head(feats)["bbox_regression"]
    assert (fresh > 0).all()  # every location starts with a box of positive size
    loss, grad = regression_after_a_lowering_step(1.0)
    assert loss < 0.99 and grad > 1e-3
    dead_loss, dead_grad = regression_after_a_lowering_step(0.0)
    assert dead_loss == pytest.approx(1.0, abs=1e-4) and dead_grad == 0.0
