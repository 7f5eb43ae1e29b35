"""The batched FCOS target assignment and loss equal torchvision's per-image FCOS loss."""
import pytest
import torch
from torchvision.models.detection.fcos import FCOS, FCOSHead

from xlearner.models.heads import DetHead, build_det_neck, det_levels, fcos_loss, fcos_match, pad_targets


def _random_case(seed: int, size: int, strides: list[int], num_classes: int, batch: int):
    g = torch.Generator().manual_seed(seed)
    head = DetHead(32, num_classes, strides)
    feats = [torch.zeros(batch, 32, -(-size // s), -(-size // s)) for s in strides]
    anchors = head.anchors_for(feats, (size, size))
    per_level = [f.shape[2] * f.shape[3] for f in feats]
    a = anchors.shape[0]
    outputs = {"cls_logits": torch.randn(batch, a, num_classes, generator=g),
               "bbox_regression": torch.rand(batch, a, 4, generator=g) * 2,
               "bbox_ctrness": torch.randn(batch, a, 1, generator=g)}
    targets = []
    for i in range(batch):
        m = 0 if i == 1 else int(torch.randint(1, 9, (1,), generator=g))  # image 1 has no box
        wh = size * (0.05 + 0.9 * torch.rand(m, 2, generator=g))
        xy = (size - wh) * torch.rand(m, 2, generator=g)
        boxes = torch.cat([xy, xy + wh], 1)
        if seed % 2:  # whole pixels, and a box whose left edge lies on location centres (x = 8)
            boxes = torch.cat([boxes.round(), torch.tensor([[8.0, 4.0, 20.0, 20.0]])]) if m else boxes
        if m > 2:
            boxes[1] = boxes[0]  # a duplicate box, like a crowded scene
        targets.append({"boxes": boxes, "labels": torch.randint(0, num_classes, (len(boxes),), generator=g)})
    return head, outputs, anchors, per_level, targets


@pytest.mark.parametrize("seed,size,strides", [(0, 64, [8, 16, 32, 64, 128]), (1, 96, [8, 16, 32, 64, 128]),
                                               (2, 64, [4, 8, 16, 32]), (3, 320, [8, 16, 32, 64, 128]),
                                               (4, 50, [8, 16, 32, 64, 128])])
def test_batched_fcos_loss_equals_torchvision(seed, size, strides):
    head, outputs, anchors, per_level, targets = _random_case(seed, size, strides, num_classes=5, batch=4)
    ref_out = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
    ours_out = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
    head.head = FCOSHead(32, 1, 5, num_convs=1)  # torchvision's own loss (FCOSHead.compute_loss) as the reference
    ref = FCOS.compute_loss(head, targets, ref_out, [anchors] * len(targets), per_level)
    boxes, labels = pad_targets(targets, anchors.device)
    matched = fcos_match(anchors, per_level, boxes, labels, head.center_sampling_radius)
    ours = fcos_loss(ours_out, anchors, matched, boxes, labels)
    assert set(ours) == set(ref)
    assert (matched >= 0).sum() > 0, "the case must have foreground locations to be a test"
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-5, msg=k)
    sum(ref.values()).backward()
    sum(ours.values()).backward()
    for k in outputs:
        torch.testing.assert_close(ours_out[k].grad, ref_out[k].grad, rtol=1e-5, atol=1e-5, msg=f"grad {k}")


@pytest.mark.parametrize("seed", [0, 1])
def test_padding_to_a_fixed_number_of_boxes_changes_no_loss_nor_gradient(seed):
    """train.det_pad_boxes: every batch padded to 32 boxes per image (one shape for a compiled step)."""
    head, outputs, anchors, per_level, targets = _random_case(seed, 64, [8, 16, 32, 64, 128], 5, 4)
    results = []
    for min_boxes in (1, 32):
        out = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
        boxes, labels = pad_targets(targets, anchors.device, min_boxes=min_boxes)
        assert boxes.shape[1] == (32 if min_boxes == 32 else max(len(t["labels"]) for t in targets))
        loss = fcos_loss(out, anchors, fcos_match(anchors, per_level, boxes, labels, 1.5), boxes, labels)
        sum(loss.values()).backward()
        results.append((loss, {k: v.grad for k, v in out.items()}))
    (plain, g_plain), (padded, g_padded) = results
    for k in plain:
        torch.testing.assert_close(padded[k], plain[k], rtol=1e-6, atol=1e-6, msg=k)
    for k in g_plain:
        torch.testing.assert_close(g_padded[k], g_plain[k], rtol=1e-6, atol=1e-6, msg=f"grad {k}")
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    boxes, labels = pad_targets(empty, anchors.device, min_boxes=32)
    assert boxes.shape == (2, 32, 4) and bool((labels == -1).all())


def test_batched_fcos_loss_without_any_box_is_finite():
    head, outputs, anchors, per_level, targets = _random_case(5, 64, [8, 16, 32, 64, 128], 3, 2)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    head.head = FCOSHead(32, 1, 3, num_convs=1)  # torchvision's own loss as the reference
    ref = FCOS.compute_loss(head, empty, outputs, [anchors] * 2, per_level)
    boxes, labels = pad_targets(empty, anchors.device)
    ours = fcos_loss(outputs, anchors, fcos_match(anchors, per_level, boxes, labels, 1.5), boxes, labels)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-5)
    assert ours["bbox_regression"] == 0 and ours["classification"] > 0


def test_det_levels_are_p3_to_p7_that_can_hold_a_box():
    assert det_levels([4, 8, 16, 32]) == (1, [8, 16, 32, 64, 128])
    assert det_levels([8, 16, 32]) == (0, [8, 16, 32, 64, 128])
    # a level of stride s holds boxes whose largest edge distance exceeds 4s: below the image side
    assert det_levels([4, 8, 16, 32], 64) == (1, [8])
    assert det_levels([4, 8, 16, 32], 96) == (1, [8, 16])
    assert det_levels([4, 8, 16, 32], 256) == (1, [8, 16, 32])
    assert det_levels([4, 8, 16, 32], 300) == (1, [8, 16, 32, 64, 128])  # P6 and P7 together
    assert det_levels([4, 8, 16, 32], 640) == (1, [8, 16, 32, 64, 128])


@pytest.mark.parametrize("size,shapes", [(96, [(12, 12), (6, 6), (3, 3), (2, 2), (1, 1)]),
                                         (64, [(8, 8)]), (96, [(12, 12), (6, 6)])])
def test_det_neck_outputs_and_every_parameter_learns(size, shapes):
    torch.manual_seed(0)
    channels, strides = [8, 16, 32, 64], [4, 8, 16, 32]
    neck, head_strides = build_det_neck(channels, strides, 32, None if shapes and len(shapes) == 5 else size)
    img = size or 96
    feats = [torch.randn(2, c, img // s, img // s, requires_grad=True) for c, s in zip(channels, strides)]
    out = neck(feats)
    if shapes is not None:
        assert [tuple(o.shape[-2:]) for o in out] == shapes
    assert len(out) == len(head_strides)
    head = DetHead(32, 3, head_strides)
    losses = head.losses(out, (img, img), [{"boxes": torch.tensor([[10.0, 10.0, 40.0, 50.0]]),
                                            "labels": torch.tensor([1])}] * 2)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["bbox_regression"] > 0
    sum(losses.values()).backward()
    # every parameter gets a gradient (DDP without find_unused_parameters), and so does C5
    assert all(p.grad is not None for p in [*neck.parameters(), *head.parameters()])
    assert feats[0].grad is None and feats[-1].grad is not None and feats[-1].grad.abs().sum() > 0


def test_ltrb_giou_loss_equals_torchvision_on_the_decoded_boxes():
    """GIoU from (l, t, r, b) distances >= 0 around a shared point (FCOS's domain: ReLU'd predictions,
    foreground targets) equals torchvision's GIoU loss of the decoded corner boxes, in values and
    gradients: nested and crossing boxes, equal distances (min/max ties), a predicted point, a
    corner or an edge through the point (zero distances), and a non-square normalisation (w != h)."""
    from torchvision.ops import generalized_box_iou_loss

    from xlearner.models.heads import ltrb_giou_loss

    g = torch.Generator().manual_seed(0)
    n = 300
    pred = 2 * torch.rand(n, 4, generator=g)
    target = 0.1 + 2 * torch.rand(n, 4, generator=g)
    pred[:20] = 0.0                                                   # a predicted point: zero area, GIoU loss 1
    pred[20:30, 0], pred[20:30, 3] = 0.0, 0.0                         # the point on the prediction's corner
    target[30:40, 0] = 0.0                                            # the point on the target's left edge
    pred[40:60, :2] = target[40:60, :2]                               # equal distances: min/max ties
    pred[60:70] = 5 * target[60:70]                                   # the prediction holds the target
    center = 50 * torch.rand(n, 2, generator=g)
    size = torch.tensor([6.0, 10.0])                                  # anchor width 6, height 10

    def decode(d):
        return torch.cat([center - d[:, :2] * size, center + d[:, 2:] * size], dim=1)

    weights = torch.linspace(0.5, 2, n)
    results = []
    for fn in (lambda p, q: generalized_box_iou_loss(decode(p), decode(q), reduction="none"), ltrb_giou_loss):
        p, q = pred.clone().requires_grad_(True), target.clone().requires_grad_(True)
        loss = fn(p, q)
        (loss * weights).sum().backward()
        results.append((loss.detach(), p.grad, q.grad))
    assert torch.allclose(results[0][0][:20], torch.ones(20)), "zero-area predictions must be in the case"
    assert results[0][1][40:60].abs().sum() > 0, "the ties must get a gradient to be a test"
    for ref, ours in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_binary_focal_loss_equals_torchvision(dtype):
    """The sign-flipped focal loss equals torchvision's sigmoid_focal_loss on 0/1 targets, in value and
    gradient, from logits of either precision, confident ones (|z| = 30, past softplus's threshold) included."""
    from torchvision.ops import sigmoid_focal_loss

    from xlearner.models.heads import binary_focal_loss

    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(64, 7, generator=g)).to(dtype)
    logits[0, :4] = torch.tensor([30.0, -30.0, 30.0, -30.0], dtype=dtype)
    positive = torch.rand(64, 7, generator=g) < 0.2
    positive[0, :4] = torch.tensor([True, True, False, False])
    results = []
    for fn in (lambda z: sigmoid_focal_loss(z.float(), positive.float(), reduction="sum"),
               lambda z: binary_focal_loss(z, positive)):
        z = logits.clone().requires_grad_(True)
        loss = fn(z)
        loss.backward()
        assert loss.dtype == torch.float32 and z.grad.dtype == dtype
        results.append((loss.detach(), z.grad.float()))
    (ref, ref_grad), (ours, grad) = results
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)
    assert ref_grad[0, 1] < -0.1, "a confident miss must be in the case"


def test_det_loss_runs_no_operator_that_waits_for_the_device():
    """nonzero (boolean-mask indexing) and item() make the host wait for the GPU in every step."""
    from torch.profiler import ProfilerActivity, profile

    head, outputs, anchors, per_level, targets = _random_case(1, 96, [8, 16, 32, 64, 128], num_classes=5, batch=4)
    outs = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        boxes, labels = pad_targets(targets, anchors.device)
        matched = fcos_match(anchors, per_level, boxes, labels, head.center_sampling_radius)
        sum(fcos_loss(outs, anchors, matched, boxes, labels).values()).backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::mul" in ops  # the profiler saw the loss
    assert not ops & {"aten::nonzero", "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"}, ops


def test_anchors_under_torch_compile_equal_eager_and_compile_once(monkeypatch):
    """Under torch.compile the anchors are built in the graph: a filled eager cache read inside the
    graph made the det step recompile on its second call (seen in benchmarks/bench_stages.py)."""
    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    head = DetHead(32, 3, [8, 16])
    feats = [torch.zeros(2, 32, 8, 8), torch.zeros(2, 32, 4, 4)]
    step = torch.compile(lambda f: head.anchors_for(f, (64, 64)) + 0, backend="eager", fullgraph=True)
    first, second = step(feats), step(feats)  # error_on_recompile: a second graph would raise here
    eager = head.anchors_for(feats, (64, 64))
    torch.testing.assert_close(first, eager)
    torch.testing.assert_close(second, eager)
    assert len(head._anchor_cache) == 1  # eager mode still caches


@pytest.mark.parametrize("num_convs,num_classes", [(2, 7), (4, 7), (2, 3), (2, 5)])
def test_fused_fcos_head_equals_torchvision_outputs_and_gradients(num_convs, num_classes):
    """FusedFCOSHead (the towers run as one conv, grouped convs and GroupNorm(64)) against the
    torchvision FCOSHead it is built from: the same outputs and the same gradients of the
    features and of every weight (the fused weights' gradients are the stacked originals')."""
    from torchvision.models.detection.fcos import FCOSHead

    from xlearner.models.heads import FusedFCOSHead

    torch.manual_seed(0)
    ref = FCOSHead(64, 1, num_classes, num_convs=num_convs)
    for p in ref.parameters():  # away from torchvision's zero biases, so that every term counts
        p.data.normal_(0, 0.05)
    fused = FusedFCOSHead.from_fcos(ref)
    x = [torch.randn(3, 64, 12, 12), torch.randn(3, 64, 6, 6)]
    xa, xb = [t.clone().requires_grad_() for t in x], [t.clone().requires_grad_() for t in x]
    a, b = ref(xa), fused(xb)
    w = {k: torch.randn_like(v) for k, v in a.items()}

    def close(x, y, msg):  # float rounding: the grouped predictor sums in another order
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=msg)

    for k in a:
        assert b[k].shape == a[k].shape, k
        close(b[k], a[k], k)
    sum((a[k] * w[k]).sum() for k in a).backward()
    sum((b[k] * w[k]).sum() for k in b).backward()
    for ga, gb in zip(xa, xb):
        close(gb.grad, ga.grad, "features")
    cls_t, reg_t = ref.classification_head.conv, ref.regression_head.conv
    for i in range(num_convs):
        for j in (0, 1):
            for name in ("weight", "bias"):
                want = torch.cat([getattr(cls_t[3 * i + j], name).grad, getattr(reg_t[3 * i + j], name).grad])
                close(getattr(fused.towers[3 * i + j], name).grad, want, (i, j, name))
    reg = ref.regression_head
    for name in ("weight", "bias"):
        close(getattr(fused.box, name).grad, torch.cat([getattr(reg.bbox_reg, name).grad,
                                                        getattr(reg.bbox_ctrness, name).grad]), name)
        close(getattr(fused.cls_logits, name).grad, getattr(ref.classification_head.cls_logits, name).grad, name)


@pytest.mark.parametrize("size,strides", [(96, [8, 16]), (100, [8, 16, 32, 64, 128]), (64, [8])])
def test_targets_encoded_in_the_loader_leave_losses_and_gradients_unchanged(size, strides):
    """A training loader's det batches carry FCOSTargets, computed in its workers (the matching, off
    the step): the losses and every gradient equal those of matching in the step. 100 px: the grids
    are ceil(size / stride) and torchvision's anchor stride there is 100 // 13 = 7, not 8."""
    from xlearner import tasks
    from xlearner.models.heads import FCOS_TARGET_KEYS

    torch.manual_seed(0)
    head = DetHead(32, 5, strides, num_convs=2)
    *_, targets = _random_case(1, size, strides, num_classes=5, batch=4)
    boxes, labels = pad_targets(targets, torch.device("cpu"))
    plain = {"images": torch.zeros(4, 3, size, size), "boxes": boxes, "labels": labels}
    encoded = head.target_encoder(size)(plain)
    assert set(encoded) == set(plain) | set(FCOS_TARGET_KEYS)
    assert (encoded["fcos_labels"] >= 0).sum() > 0, "the case must have foreground locations to be a test"
    feats = [torch.randn(4, 32, -(-size // s), -(-size // s)) for s in strides]
    results = []
    for batch in (plain, encoded):
        head.zero_grad()
        f = [x.clone().requires_grad_(True) for x in feats]
        parts = head.losses(f, (size, size), {k: batch[k] for k in (*FCOS_TARGET_KEYS, "boxes", "labels")}
                            if "fcos_labels" in batch else (batch["boxes"], batch["labels"]))
        total = tasks.get("det").loss(head, f, batch)
        torch.testing.assert_close(total, sum(parts.values()), rtol=0, atol=0)
        total.backward()
        results.append((parts, [x.grad for x in f] + [p.grad for p in head.parameters()]))
    (ref, ref_grads), (ours, our_grads) = results
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-6, atol=1e-6, msg=k)
    assert len(our_grads) == len(ref_grads) and all(g is not None for g in ref_grads)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_targets_encoded_for_other_grids_are_matched_in_the_step_with_a_warning():
    """A backbone whose grids are not ceil(size / stride) (floor arithmetic at 90 px): the anchor
    counts differ, the head matches in the step and says so once; the losses stay right."""
    from xlearner.models.heads import FCOS_TARGET_KEYS

    head = DetHead(32, 5, [8, 16], num_convs=1)
    *_, targets = _random_case(2, 90, [8, 16], num_classes=5, batch=2)
    boxes, labels = pad_targets(targets, torch.device("cpu"))
    encoded = head.target_encoder(90)({"images": torch.zeros(2, 3, 90, 90), "boxes": boxes, "labels": labels})
    feats = [torch.randn(2, 32, 11, 11), torch.randn(2, 32, 5, 5)]  # ceil would give 12 and 6
    with pytest.warns(UserWarning, match="matching in the step"):
        ours = head.losses(feats, (90, 90), {k: encoded[k] for k in (*FCOS_TARGET_KEYS, "boxes", "labels")})
    ref = head.losses(feats, (90, 90), (boxes, labels))
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=0, msg=k)


# ------------------------------------------------- the det step in fewer operators, the same maths (#28)
def _reference_fcos_loss(out, targets):
    """The FCOS losses through autograd on the formulas the closed-form gradients replaced."""
    import torch.nn.functional as F

    from xlearner.models.heads import FCOS_TARGET_KEYS, binary_focal_loss, ltrb_giou_loss

    labels, reg_targets, gt_ctr, weight, norm = (targets[k] for k in FCOS_TARGET_KEYS)
    positive = labels[..., None] == torch.arange(out["cls_logits"].shape[-1])
    ctr = out["bbox_ctrness"].float().squeeze(2)
    return {"classification": binary_focal_loss(out["cls_logits"], positive) * norm[0],
            "bbox_regression": (ltrb_giou_loss(out["bbox_regression"].float(), reg_targets) * weight).sum(),
            "bbox_ctrness": F.binary_cross_entropy_with_logits(ctr, gt_ctr, weight=weight, reduction="sum")}


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_closed_form_fcos_gradients_equal_autograd_in_fewer_operators(dtype, autocast):
    """fcos_loss_on_targets computes its gradients with its values (_FCOSLoss): they equal autograd's
    of the formulas, with ties of prediction and target (min/max: a half each), zero distances and
    background; bf16 logits (the head's under autocast) included, the sums in float32; under a
    third of autograd's backward operators."""
    from test_grouped import count_ops_of
    from xlearner.models.heads import fcos_loss_on_targets, fcos_targets

    head, outputs, anchors, per_level, targets = _random_case(3, 96, [8, 16, 32, 64, 128], num_classes=5, batch=4)
    boxes, labels = pad_targets(targets, anchors.device)
    enc = fcos_targets(anchors, fcos_match(anchors, per_level, boxes, labels, 1.5), boxes, labels)
    fg = enc["fcos_weight"] > 0
    assert fg.sum() > 20
    reg = outputs["bbox_regression"]
    reg[fg] = torch.where(torch.rand(reg[fg].shape) < 0.3, enc["fcos_ltrb"][fg], reg[fg])  # ties
    reg[..., 0][::3] = 0.0  # a zero distance
    outputs["cls_logits"] = outputs["cls_logits"].to(dtype)
    grads, values, ops = [], [], []
    for fn in (_reference_fcos_loss, fcos_loss_on_targets):
        out = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses = fn(out, enc)
        values.append(losses)
        ops.append(count_ops_of(lambda: sum(losses.values()).backward()))
        grads.append({k: v.grad for k, v in out.items()})
    (ref, ours), (ref_g, our_g) = values, grads
    for k in ref:
        assert ours[k].dtype == torch.float32, k
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in ref_g:
        assert our_g[k].dtype == ref_g[k].dtype, k
        tol = dict(rtol=1e-5, atol=1e-7) if ref_g[k].dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
        torch.testing.assert_close(our_g[k], ref_g[k], **tol, msg=f"grad {k}")
    assert (our_g["bbox_regression"][fg] != 0).any()
    assert ops[1] * 3 < ops[0], ops


def test_cast_once_gives_autocast_values_and_gradients_in_fewer_operators():
    """cast_once: the weights autocast would cast, in one cast: the same convolutions and weight
    gradients bit for bit under bf16 autocast, fewer operators; outside autocast the weights themselves."""
    from test_grouped import count_ops_of
    from xlearner.models.heads import autocast_weights, cast_once

    torch.manual_seed(0)
    convs = [torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(4)]
    x = torch.randn(2, 8, 6, 6)

    def run(own: bool):
        for c in convs:
            c.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            weights = None if own else autocast_weights(convs)
            y = x
            for i, c in enumerate(convs):
                y = c(y) if own else c._conv_forward(y, *weights[i])
        y.float().square().sum().backward()
        return y, [t.grad.clone() for c in convs for t in (c.weight, c.bias)]

    (y_ref, g_ref), (y, g) = run(True), run(False)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    assert all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip(g, g_ref))
    counts = [count_ops_of(lambda: run(own), only="_to_copy") for own in (True, False)]
    # both: the input, the output's float() and its gradient; autocast: each of the 8 tensors and its
    # gradient; cast once: all tensors, all gradients
    assert counts == [3 + 16, 3 + 2], counts
    assert all(a is c.weight and b is c.bias for (a, b), c in zip(autocast_weights(convs), convs))
    stacked = cast_once([[convs[0].bias, convs[1].bias]])[0]
    assert torch.equal(stacked, torch.cat([convs[0].bias, convs[1].bias]))  # fp32: a cat


@pytest.mark.parametrize("outputs,p6p7", [(None, False), (None, True), (2, False)])
@pytest.mark.parametrize("autocast", [False, True])
def test_fpn_neck_equals_torchvision_fpn(outputs, p6p7, autocast):
    """FPNNeck's own top-down pass (weights cast once) against torchvision's FeaturePyramidNetwork
    with the same weights: the same maps and gradients, bit for bit (also under bf16 autocast)."""
    from collections import OrderedDict

    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    from xlearner.models.heads import FPNNeck

    torch.manual_seed(0)
    channels = [8, 16, 32, 64]
    neck = FPNNeck(channels, 16, first=1, outputs=outputs, p6p7=p6p7)
    for p in neck.parameters():
        p.data.normal_(0, 0.1)
    ref = FeaturePyramidNetwork(channels[1:], 16, extra_blocks=LastLevelP6P7(16, 16) if p6p7 else None)
    assert set(ref.load_state_dict(neck.fpn.state_dict(), strict=False).unexpected_keys) == set()
    feats = [torch.randn(2, c, 32 // 2 ** i, 32 // 2 ** i) for i, c in enumerate(channels)]
    runs = []
    for fn in (lambda f: list(ref(OrderedDict((str(i), v) for i, v in enumerate(f[1:]))).values()), neck):
        f = [v.clone().requires_grad_(True) for v in feats]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(f)[:neck.outputs + 2 * p6p7]
        sum(o.float().square().sum() for o in out).backward()
        runs.append((out, [v.grad for v in f[1:]]))
    (ref_out, ref_g), (out, g) = runs
    assert len(out) == len(ref_out) == (2 if outputs == 2 else 3) + 2 * p6p7
    assert all(torch.equal(a, b) for a, b in zip(out, ref_out))
    assert all(torch.equal(a, b) for a, b in zip(g, ref_g))
