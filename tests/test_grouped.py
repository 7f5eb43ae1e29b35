"""The squeeze step in fewer operators, with the same losses: the teacher's branches (and batches of
one shape) side by side as one grouped network, and CKA distillation from Gram matrices with the
adapter folded in, all pairs of a stage at once. Tiny nets, random tensors, one thread."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from test_levers import SIZE, _squeeze, expanded, specs, tiny_cfg

torch.set_num_threads(1)


def busy_teacher(cfg):
    """An expanded net whose reconciliations are not zero (at init they add nothing), frozen."""
    from xlearner.stages.squeeze import use_batch_statistics

    net = expanded(cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in net.reconcilers.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    for p in net.parameters():
        p.requires_grad_(False)
    use_batch_statistics(net)
    return net


def count_ops_of(fn, only: str | None = None) -> int:
    """Operators ``fn`` dispatches (views too: the ratio is what is checked), or those named ``only``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += only is None or func.overloadpacket.__name__ == only
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def assert_close_features(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for t in want:
        assert len(got[t]) == len(want[t]) == 4
        for a, b in zip(got[t], want[t]):
            assert a.shape == b.shape
            assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max()), t


@pytest.mark.parametrize("layout", [("cls",), ("det",), ("seg",), (None,), ("cls", "cls"), ("det", "seg"),
                                    (None, None), ("seg", None)])
def test_grouped_branches_give_the_nets_features(layout):
    from xlearner.models.grouped import GroupedBranches

    net = busy_teacher(tiny_cfg())
    grouped = GroupedBranches(net, [layout])
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 3, SIZE, SIZE, generator=g) * (1 + k) for k in range(len(layout))]
    with torch.no_grad():
        got = grouped.features(images, list(layout))
        for x, keep, out in zip(images, layout, got):
            want = net.all_branch_features(x) if keep is None else {keep: net.branch_features(x, keep)}
            assert_close_features(out, want)  # each batch kept its own BatchNorm statistics


def test_grouped_branches_run_side_by_side_in_fewer_operators_and_fall_back_one_by_one():
    from xlearner.models.grouped import GroupedBranches

    net = busy_teacher(tiny_cfg())
    grouped = GroupedBranches(net, [("cls", "seg")])
    a, b = torch.randn(2, 3, SIZE, SIZE), torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        one_by_one = count_ops_of(lambda: (net.branch_features(a, "cls"), net.branch_features(b, "seg")))
        side_by_side = count_ops_of(lambda: grouped.features([a, b], ["cls", "seg"]))
        assert side_by_side < 0.5 * one_by_one, (side_by_side, one_by_one)
        # a layout that was not built, or batches of different shapes: one at a time, same features
        c = torch.randn(3, 3, SIZE, SIZE)
        for images, keep in (([a, b], ["seg", "cls"]), ([a, c], ["cls", "seg"])):
            for x, t, out in zip(images, keep, grouped.features(images, keep)):
                assert_close_features(out, {t: net.branch_features(x, t)})


def test_grouped_copy_refuses_layers_that_mix_channels_and_squeeze_falls_back():
    from xlearner.models.grouped import NotGroupable, grouped_copy

    with pytest.raises(NotGroupable, match="Linear"):
        grouped_copy([nn.Sequential(nn.Conv2d(3, 4, 1), nn.Linear(4, 4)) for _ in range(2)])
    with pytest.raises(NotGroupable, match="Flatten"):
        grouped_copy([nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten()) for _ in range(2)])
    with pytest.raises(NotGroupable, match="differs"):
        grouped_copy([nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), nn.Sequential(nn.Conv2d(3, 4, 1), nn.GELU())])
    # a per-source-statistics teacher is not grouped: its BatchNorm statistics change per source
    stage = _squeeze(tiny_cfg(**{"squeeze.teacher_bn": "source"}), expanded(tiny_cfg()))
    assert stage._grouped is None


def test_an_edited_teacher_is_grouped_again():
    cfg = tiny_cfg(**{"squeeze.distill_loss": "cka"})
    stage = _squeeze(cfg, busy_teacher(cfg))
    first = stage._grouped
    assert first is not None and not first.stale()
    with torch.no_grad():
        next(stage.teacher.backbones["det"].parameters()).mul_(2)
    assert first.stale()
    x = torch.randn(2, 3, SIZE, SIZE)
    stage.refresh_teacher()
    assert stage._grouped is not first and not stage._grouped.stale()
    got = stage._teacher_features({"scenes": {"images": x}}, ["scenes"])["scenes"]
    with torch.no_grad():
        assert_close_features(got, {"det": stage.teacher.branch_features(x, "det")})  # the edited weights


@pytest.mark.parametrize("c,d", [(8, 8), (8, 12)])
def test_cka_from_gram_matrices_equals_cka_after_the_adapter_conv(c, d):
    """adapted_cka_loss(centred_gram(x, y), A) == cka_distill_loss(conv_A(x), y), values and gradients
    (to the student features and to A), for several pairs at once; the conv's bias gets no gradient."""
    from xlearner.stages.squeeze import adapted_cka_loss, centred_gram, cka_distill_loss

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, c, 5, 6, generator=g).relu().requires_grad_() for _ in range(3)]
    ys = [torch.randn(3, d, 5, 6, generator=g).relu() + 0.5 * x.detach()[:, :1] for x in xs]
    convs = [nn.Conv2d(c, d, 1) for _ in xs]
    with torch.no_grad():
        for conv in convs:
            conv.bias.normal_(generator=g)
    want = torch.stack([cka_distill_loss(conv(x), y) for conv, x, y in zip(convs, xs, ys)])
    want.sum().backward()
    want_grads = [x.grad.clone() for x in xs] + [conv.weight.grad.clone() for conv in convs]
    assert all(float(conv.bias.grad.abs().max()) < 1e-5 for conv in convs)  # CKA ignores the bias
    for t in [*xs, *(conv.weight for conv in convs)]:
        t.grad = None
    got = adapted_cka_loss(torch.stack([centred_gram(x, y) for x, y in zip(xs, ys)]),
                           torch.stack([conv.weight.flatten(1) for conv in convs]))
    assert 0.05 < float(want.detach().min()) and float(want.detach().max()) < 0.95  # neither equal nor unrelated maps
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    for a, b in zip([x.grad for x in xs] + [conv.weight.grad for conv in convs], want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_squeeze_cka_losses_equal_the_pair_by_pair_reference():
    """The squeeze step's distill/<task> losses and gradients: each source's batch through the
    teacher alone, cka_distill_loss after each adapter, stage by stage, as the method defines them."""
    from xlearner.stages.squeeze import cka_distill_loss

    cfg = tiny_cfg(**{"squeeze.distill_loss": "cka", "squeeze.distill_stages": [1, 2, 3, 4]})
    stage = _squeeze(cfg, busy_teacher(cfg))
    assert stage._grouped is not None and all(a.bias is None for ads in stage.adapters.values() for a in ads)
    g = torch.Generator().manual_seed(1)
    batch = {"digits": {"images": torch.randn(4, 3, SIZE, SIZE, generator=g), "labels": torch.tensor([0, 1, 2, 3])},
             "regions": {"images": torch.randn(2, 3, SIZE, SIZE, generator=g),
                         "masks": torch.randint(0, 21, (2, SIZE, SIZE), generator=g)}}
    losses = stage(batch)
    params = [p for p in stage.parameters() if p.requires_grad]
    got_grads = torch.autograd.grad(losses["distill/cls"] + losses["distill/seg"], params, allow_unused=True)
    want = {}
    for source, b in batch.items():
        task = stage.specs[source].task
        feats = stage.net.backbone(b["images"])
        with torch.no_grad():
            t_feats = stage.teacher.branch_features(b["images"], task)
        want[task] = torch.stack([cka_distill_loss(a(feats[i - 1]), t_feats[i - 1])
                                  for a, i in zip(stage.adapters[task], stage.distill_stages)]).mean()
    for task, value in want.items():
        torch.testing.assert_close(losses[f"distill/{task}"], value, rtol=1e-5, atol=1e-6)
    want_grads = torch.autograd.grad(want["cls"] + want["seg"], params, allow_unused=True)
    n = 0
    for a, b in zip(got_grads, want_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
            n += 1
    assert n > 20
