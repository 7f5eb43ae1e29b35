"""The paper's losses against hand computations (issue #7, item 6).

Every expected value is computed here independently (plain math / numpy or explicit torch
formulas), so a wrong implementation, or a stub returning a constant, fails.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

# one import per function: the module they live in may move (one-line change here)
from xlearner.tasks import seg_loss
from xlearner.stages.squeeze import cka_distill_loss, cosine_distill_loss, feature_distill_loss, kd_loss

l2_distill = feature_distill_loss
cosine_distill = cosine_distill_loss
cka_distill = cka_distill_loss


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- l2 (per-pixel) distillation
def test_l2_distill_is_zero_for_equal_maps_and_for_per_pixel_positive_scales():
    t = _randn(2, 5, 4, 3)
    assert float(l2_distill(t.clone(), t)) == pytest.approx(0.0, abs=1e-6)
    scale = 0.1 + _randn(2, 1, 4, 3, seed=1).abs() * 10  # a different positive factor at every pixel
    assert float(l2_distill(t * scale, t)) == pytest.approx(0.0, abs=1e-6)
    # a negative scale at one pixel is no longer the same direction: that pixel costs 4
    flip = torch.ones(2, 1, 4, 3)
    flip[0, 0, 1, 2] = -1
    assert float(l2_distill(t * flip, t)) == pytest.approx(4.0 / (2 * 4 * 3), abs=1e-6)


def test_l2_distill_equals_two_minus_two_cos_averaged_over_pixels():
    s, t = _randn(3, 6, 5, 4, seed=2), _randn(3, 6, 5, 4, seed=3)
    cos = (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))  # (B, H, W): one cosine per pixel
    expected = (2 - 2 * cos).mean()
    assert float(l2_distill(s, t)) == pytest.approx(float(expected), rel=1e-5)
    # the mean is over pixels and images, not a sum (the loss does not grow with the map size)
    assert 0.0 <= float(l2_distill(s, t)) <= 4.0


def test_l2_distill_range_zero_to_four_and_four_for_opposite_maps():
    t = _randn(2, 8, 3, 3, seed=4)
    assert float(l2_distill(-t, t)) == pytest.approx(4.0, abs=1e-5)
    assert float(l2_distill(-3.0 * t, t)) == pytest.approx(4.0, abs=1e-5)
    for seed in range(5):
        v = float(l2_distill(_randn(2, 8, 3, 3, seed=10 + seed) * 100, t))
        assert 0.0 <= v <= 4.0
    # orthogonal directions at every pixel: cos = 0 -> 2
    a = torch.zeros(1, 2, 2, 2)
    b = torch.zeros(1, 2, 2, 2)
    a[:, 0] = 1.0
    b[:, 1] = 5.0
    assert float(l2_distill(a, b)) == pytest.approx(2.0, abs=1e-6)


def test_l2_distill_resizes_a_student_of_another_size_bilinearly():
    teacher = _randn(1, 3, 4, 4, seed=5)
    # a spatially constant student stays constant under any resize: loss = 2 - 2cos with that vector
    v = torch.tensor([1.0, -2.0, 0.5])
    student = v.view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    cos = (v.view(1, 3, 1, 1) * teacher).sum(1) / (v.norm() * teacher.norm(dim=1))
    assert float(l2_distill(student, teacher)) == pytest.approx(float((2 - 2 * cos).mean()), rel=1e-5)
    # a varying 2x2 student: the value is that of the bilinear (not nearest) upsampling to 4x4
    student = _randn(1, 3, 2, 2, seed=6)
    up = F.interpolate(student, size=(4, 4), mode="bilinear", align_corners=False)
    near = F.interpolate(student, size=(4, 4), mode="nearest")
    cos_up = (up * teacher).sum(1) / (up.norm(dim=1) * teacher.norm(dim=1))
    cos_near = (near * teacher).sum(1) / (near.norm(dim=1) * teacher.norm(dim=1))
    got = float(l2_distill(student, teacher))
    assert got == pytest.approx(float((2 - 2 * cos_up).mean()), rel=1e-5)
    assert got != pytest.approx(float((2 - 2 * cos_near).mean()), rel=1e-3)


def test_l2_distill_gradient_reaches_the_student():
    s = _randn(1, 4, 3, 3, seed=7).requires_grad_(True)
    l2_distill(s, _randn(1, 4, 3, 3, seed=8)).backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0


# ----------------------------------------------------------------------------- cosine (whole map) distillation
def test_cosine_distill_zero_for_equal_maps_and_hand_value():
    t = _randn(2, 3, 4, 4, seed=9)
    assert float(cosine_distill(t.clone(), t)) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_distill(7.0 * t, t)) == pytest.approx(0.0, abs=1e-6)  # one positive scale per image
    # two images of (C=2, 1x1): [1, 0] vs [1, 1] -> 1 - 1/sqrt(2); [0, 2] vs [0, -1] -> 1 - (-1) = 2
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(2, 2, 1, 1)
    t = torch.tensor([[1.0, 1.0], [0.0, -1.0]]).view(2, 2, 1, 1)
    expected = ((1 - 1 / math.sqrt(2)) + 2.0) / 2
    assert float(cosine_distill(s, t)) == pytest.approx(expected, rel=1e-6)


def test_cosine_distill_is_over_the_whole_map_not_per_pixel():
    """(C=1, 1x2): student [1, 3], teacher [1, 1]. Per pixel the directions agree (l2: 0), but the
    whole-map cosine is 4 / (sqrt(10) sqrt(2)) < 1: a per-pixel positive rescaling changes it."""
    s = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)
    t = torch.tensor([1.0, 1.0]).view(1, 1, 1, 2)
    # hand: cos = (1 + 3) / (sqrt(10) * sqrt(2))
    assert float(cosine_distill(s, t)) == pytest.approx(1 - 4 / (math.sqrt(10) * math.sqrt(2)), rel=1e-6)
    assert float(l2_distill(s, t)) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- linear CKA distillation
def _cka_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA in its kernel (HSIC) form: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = X X^T."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def _pixels(m: torch.Tensor) -> np.ndarray:
    return m.permute(0, 2, 3, 1).reshape(-1, m.shape[1]).double().numpy()


def test_cka_distill_zero_for_equal_maps_and_one_channel_hand_value():
    t = _randn(2, 4, 3, 3, seed=11)
    assert float(cka_distill(t.clone(), t)) == pytest.approx(0.0, abs=1e-5)
    # one channel, three pixels: CKA is the squared Pearson correlation. x = [1, 2, 3], y = [1, 3, 2]:
    # centred [-1, 0, 1] and [-1, 1, 0]; corr = 1 / (sqrt(2) sqrt(2)) = 1/2; loss = 1 - 1/4
    s = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 1, 3)
    t = torch.tensor([1.0, 3.0, 2.0]).view(1, 1, 1, 3)
    assert float(cka_distill(s, t)) == pytest.approx(0.75, abs=1e-6)


def test_cka_distill_matches_the_kernel_form_with_different_widths():
    s, t = _randn(2, 3, 3, 2, seed=12), _randn(2, 5, 3, 2, seed=13)  # 12 pixels; 3 vs 5 channels
    expected = 1 - _cka_numpy(_pixels(s), _pixels(t))
    assert float(cka_distill(s, t)) == pytest.approx(expected, abs=1e-5)
    assert 0.0 <= float(cka_distill(s, t)) <= 1.0


def test_cka_distill_invariant_to_orthogonal_rotation_of_channels_and_scale():
    s, t = _randn(2, 4, 3, 3, seed=14), _randn(2, 4, 3, 3, seed=15)
    q, _ = torch.linalg.qr(_randn(4, 4, seed=16))  # a random orthogonal matrix
    rotated = torch.einsum("dc,bchw->bdhw", q, s)
    assert not torch.allclose(rotated, s)
    base = float(cka_distill(s, t))
    assert float(cka_distill(rotated, t)) == pytest.approx(base, abs=1e-5)
    assert float(cka_distill(3.0 * rotated, t)) == pytest.approx(base, abs=1e-5)  # isotropic scale
    # the student rotated from the teacher itself is a perfect match
    assert float(cka_distill(torch.einsum("dc,bchw->bdhw", q, t), t)) == pytest.approx(0.0, abs=1e-5)
    # an anisotropic scaling of channels is not a rotation: CKA changes
    aniso = s * torch.tensor([1.0, 5.0, 0.2, 1.0]).view(1, 4, 1, 1)
    assert float(cka_distill(aniso, t)) != pytest.approx(base, abs=1e-3)


# ----------------------------------------------------------------------------- logit KD
def _kl_hand(student, teacher, temperature):
    """batch mean of T^2 KL(softmax(t/T) || softmax(s/T)), with plain math."""
    total = 0.0
    for srow, trow in zip(student, teacher):
        es = [math.exp(v / temperature) for v in srow]
        et = [math.exp(v / temperature) for v in trow]
        ps = [e / sum(es) for e in es]
        pt = [e / sum(et) for e in et]
        total += sum(p * math.log(p / q) for p, q in zip(pt, ps))
    return temperature ** 2 * total / len(student)


def test_kd_loss_hand_value_with_temperature_squared():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]
    s, t = torch.tensor(student), torch.tensor(teacher)
    for temperature in (1.0, 2.0, 4.0):
        expected = _kl_hand(student, teacher, temperature)
        assert float(kd_loss(s, t, temperature)) == pytest.approx(expected, rel=1e-5), temperature
    # first row at T = 2, written out: p_t = softmax([1, 0, .5]), p_s = softmax([.5, 1, .25])
    pt = np.exp([1.0, 0.0, 0.5]) / np.exp([1.0, 0.0, 0.5]).sum()
    ps = np.exp([0.5, 1.0, 0.25]) / np.exp([0.5, 1.0, 0.25]).sum()
    row0 = 4.0 * float((pt * np.log(pt / ps)).sum())
    assert float(kd_loss(s[:1], t[:1], 2.0)) == pytest.approx(row0, rel=1e-5)
    # direction: KL(p_t || p_s), not KL(p_s || p_t)
    assert float(kd_loss(s, t, 2.0)) != pytest.approx(_kl_hand(teacher, student, 2.0), rel=1e-3)


def test_kd_loss_zero_for_equal_logits():
    x = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    for temperature in (1.0, 4.0):
        assert float(kd_loss(x.clone(), x, temperature)) == pytest.approx(0.0, abs=1e-6)
    # softmax ignores a per-row shift
    assert float(kd_loss(x + 10.0, x, 4.0)) == pytest.approx(0.0, abs=1e-5)


# ----------------------------------------------------------------------------- seg loss with ignored pixels
def test_seg_loss_fully_ignored_mask_is_zero_and_keeps_the_graph():
    logits = _randn(2, 3, 4, 4, seed=20).requires_grad_(True)
    masks = torch.full((2, 4, 4), 255, dtype=torch.long)
    loss = seg_loss(logits, masks)
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0
    assert loss.requires_grad
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_seg_loss_partly_ignored_is_cross_entropy_over_kept_pixels_only():
    logits = _randn(1, 3, 2, 2, seed=21)
    masks = torch.tensor([[[0, 2], [255, 1]]])
    # by hand: -log softmax at the three kept pixels, averaged over 3 (not 4)
    logp = logits.log_softmax(1)[0]
    kept = [(0, 0, 0), (0, 1, 2), (1, 1, 1)]  # (row, col, class)
    expected = -sum(float(logp[c, i, j]) for i, j, c in kept) / 3
    assert float(seg_loss(logits, masks)) == pytest.approx(expected, rel=1e-5)
    # the ignored pixel's logits do not matter
    changed = logits.clone()
    changed[0, :, 1, 0] = torch.tensor([50.0, -50.0, 3.0])
    assert float(seg_loss(changed, masks)) == pytest.approx(expected, rel=1e-5)


def test_seg_loss_gradient_is_zero_at_ignored_pixels():
    logits = _randn(1, 3, 2, 2, seed=22).requires_grad_(True)
    seg_loss(logits, torch.tensor([[[0, 255], [1, 2]]])).backward()
    assert torch.equal(logits.grad[0, :, 0, 1], torch.zeros(3))
    assert float(logits.grad[0, :, 0, 0].abs().sum()) > 0


def test_seg_loss_background_weight_is_weighted_mean_over_kept_pixels():
    from xlearner.tasks import background_weights

    logits = _randn(1, 3, 2, 2, seed=23)
    masks = torch.tensor([[[0, 2], [255, 0]]])
    weight = background_weights(3, 0.25)
    assert weight.tolist() == [0.25, 1.0, 1.0] and background_weights(3, 1.0) is None
    logp = logits.log_softmax(1)[0]
    # by hand: two background pixels at weight 0.25, one class-2 pixel at 1; divided by 0.25 + 1 + 0.25
    expected = -(0.25 * float(logp[0, 0, 0]) + float(logp[2, 0, 1]) + 0.25 * float(logp[0, 1, 1])) / 1.5
    assert float(seg_loss(logits, masks, weight)) == pytest.approx(expected, rel=1e-5)
    # the same as torch's weighted mean once the ignored pixel is gone
    torch_mean = torch.nn.functional.cross_entropy(logits, masks, weight=weight, ignore_index=255)
    assert float(seg_loss(logits, masks, weight)) == pytest.approx(float(torch_mean), rel=1e-5)
    # all ignored: still 0 with the graph kept
    zero = seg_loss(logits.requires_grad_(True), torch.full((1, 2, 2), 255), weight)
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def test_seg_background_weight_reaches_the_upstream_and_transfer_heads():
    from xlearner.tasks import HeadOptions, get

    seg = get("seg")
    for head_kind in ("fpn", "linear"):
        opts = HeadOptions(fpn_channels=8, seg_head=head_kind, seg_background_weight=0.1)
        neck = seg.build_neck([4, 8], [4, 8], opts)
        head = seg.build_head(neck, 5, [4, 8], [4, 8], opts)
        assert head.class_weight.tolist() == pytest.approx([0.1, 1, 1, 1, 1])
        assert "class_weight" not in head.state_dict()  # not saved: checkpoints stay loadable


# ----------------------------------------------------------------------------- point-sampled seg loss
def test_seg_loss_at_every_pixel_is_seg_loss_in_value_and_gradient():
    """Sampling the head-stride logits at all pixel centres (any order) is the upsampled CE itself:
    the sampling geometry is bilinear upsampling's, edges included."""
    from xlearner.tasks import seg_loss_at

    weight = torch.tensor([0.1, 1.0, 2.0, 1.0, 0.5])
    for (h, w), (big_h, big_w) in [((16, 16), (64, 64)), ((5, 7), (20, 28)), ((6, 6), (6, 6))]:
        logits = _randn(3, 5, h, w).requires_grad_(True)
        masks = torch.randint(0, 5, (3, big_h, big_w), generator=torch.Generator().manual_seed(1))
        masks[0, :2] = 255  # ignored rows
        g = torch.Generator().manual_seed(2)
        pixels = torch.stack([torch.randperm(big_h * big_w, generator=g) for _ in range(3)])
        for cw in (None, weight):
            full = seg_loss(logits, masks, cw)
            (g_full,) = torch.autograd.grad(full, logits)
            at = seg_loss_at(logits, masks, pixels, cw)
            (g_at,) = torch.autograd.grad(at, logits)
            assert float(at.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
            torch.testing.assert_close(g_at, g_full, rtol=1e-4, atol=1e-7)


def test_seg_loss_at_reads_the_labels_and_logits_of_the_drawn_pixels():
    from xlearner.tasks import seg_loss_at

    # logits 1x1 per class everywhere except class 1 wins at the top-left pixel only (full-size logits)
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 1, 0, 0] = 10.0
    masks = torch.zeros(1, 4, 4, dtype=torch.long)
    masks[0, 0, 0] = 1
    right = seg_loss_at(logits, masks, torch.tensor([[0]]))  # the top-left pixel: label 1, logit 10 for it
    wrong = seg_loss_at(logits, masks, torch.tensor([[5]]))  # pixel (1, 1): label 0, logits equal
    assert float(right) == pytest.approx(math.log(1 + math.exp(-10)), abs=1e-6)
    assert float(wrong) == pytest.approx(math.log(2), rel=1e-5)


@pytest.mark.parametrize("background_weight", [1.0, 0.1])
def test_points_drawn_by_the_loader_give_the_point_loss_of_the_same_pixels(background_weight):
    """SegPointTargets (in the workers) then SegTask.loss equal point_seg_loss drawing the same pixels
    in the step, in value and gradient: ignored pixels, class weights and quarter-stride logits."""
    from xlearner.tasks import SegPointTargets, background_weights, point_seg_loss, seg_loss_on_points

    g = torch.Generator().manual_seed(1)
    masks = torch.randint(0, 4, (3, 32, 32), generator=g)
    masks[:, :5] = 255
    logits = torch.randn(3, 4, 8, 8, generator=g)
    cw = background_weights(4, background_weight)
    results = []
    for encoded in (False, True):
        z = logits.clone().requires_grad_(True)
        torch.manual_seed(7)  # both draw from torch's RNG: the same pixels
        if encoded:
            batch = SegPointTargets(256, cw)({"masks": masks})
            assert batch["seg_point_grid"].shape == (3, 1, 256, 2) and batch["seg_point_grid"].dtype == torch.float32
            loss = seg_loss_on_points(z, batch, cw)
        else:
            loss = point_seg_loss(z, masks, 256, cw)
        loss.backward()
        results.append((loss.detach(), z.grad))
    (ref, ref_grad), (ours, grad) = results
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)
    assert ref_grad.abs().sum() > 0
    ignored = SegPointTargets(16, cw)({"masks": torch.full((2, 8, 8), 255)})
    z = torch.randn(2, 4, 2, 2, requires_grad=True)
    loss = seg_loss_on_points(z, ignored, cw)
    assert loss.requires_grad and float(loss.detach()) == 0.0  # every point ignored: 0, graph kept
    whole = {"masks": masks}
    assert SegPointTargets(32 * 32, cw)(whole) is whole  # as many points as pixels: the full loss, in the step


def test_point_seg_loss_estimates_the_full_loss_without_bias():
    """A position-dependent loss: a sampler that favoured some rows or columns would be biased."""
    from xlearner.tasks import point_seg_loss

    yy, xx = torch.meshgrid(torch.linspace(-3, 3, 16), torch.linspace(-2, 2, 16), indexing="ij")
    logits = torch.stack([yy, xx, yy * xx]).unsqueeze(0).repeat(2, 1, 1, 1)
    masks = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(0))
    full = float(seg_loss(logits, masks))
    torch.manual_seed(0)
    draws = torch.stack([point_seg_loss(logits, masks, 256) for _ in range(300)])
    assert float(draws.mean()) == pytest.approx(full, rel=0.01)
    assert float(draws.std()) > 0.01  # it does sample (not the full loss every time)
    assert float(point_seg_loss(logits, masks, 64 * 64)) == pytest.approx(full, rel=1e-6)  # all pixels: exact


def test_seg_loss_points_reach_the_upstream_heads_and_change_only_the_loss():
    from xlearner.tasks import HeadOptions, get

    seg = get("seg")
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    masks = torch.randint(0, 4, (2, 32, 32))
    for head_kind in ("fpn", "linear"):
        opts = HeadOptions(fpn_channels=8, seg_head=head_kind, seg_loss_points=100)
        neck = seg.build_neck([4, 8], [4, 8], opts)
        head = seg.build_head(neck, 4, [4, 8], [4, 8], opts)
        assert head.loss_points == 100
        feats = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
        out = neck(feats)
        # the prediction is the full-size upsampled logits, whatever the loss samples
        with torch.no_grad():
            torch.testing.assert_close(head(out, (32, 32)), F.interpolate(head.logits(out), size=(32, 32),
                                                                           mode="bilinear", align_corners=False))
        batch = {"images": images, "masks": masks}
        with torch.no_grad():
            torch.manual_seed(1)
            a = seg.loss(head, out, batch)
            torch.manual_seed(2)
            b = seg.loss(head, out, batch)
            head.loss_points = 0
            full = seg.loss(head, out, batch)
        assert float(a) != float(b)  # a new draw each call
        assert float(a) == pytest.approx(float(full), rel=0.2) and float(b) == pytest.approx(float(full), rel=0.2)


# ----------------------------------------------------------------------------- fewer operators, same loss (#28)
def _masked_weight_sum(masks, class_weight, dtype):
    """The ignored pixels' weights masked out by hand: the formula the weight table replaced."""
    valid = masks != 255
    return (class_weight.to(dtype)[masks.masked_fill(~valid, 0)] * valid).sum().clamp(min=1e-12)


def _seg_loss_at_by_hand(logits, masks, pixels, class_weight):
    """seg_loss_at with the grid built from the drawn pixels' coordinates, as before the cache."""
    h, w = masks.shape[-2:]
    ys, xs = (pixels // w).to(logits.dtype), (pixels % w).to(logits.dtype)
    grid = torch.stack(((xs + 0.5) / w * 2 - 1, (ys + 0.5) / h * 2 - 1), dim=-1).unsqueeze(1)
    sampled = F.grid_sample(logits, grid, mode="bilinear", padding_mode="border", align_corners=False)
    labels = masks.flatten(1).gather(1, pixels).unsqueeze(1)
    total = F.cross_entropy(sampled, labels, weight=class_weight, ignore_index=255, reduction="sum")
    return total / _masked_weight_sum(labels, class_weight, sampled.dtype)


def test_seg_weight_table_and_cached_pixel_centres_leave_loss_and_gradient_unchanged():
    from xlearner.tasks import pixel_centres, pixel_weight_table, seg_loss_at

    weight = torch.tensor([0.1, 1.0, 2.0, 1.0, 0.5])
    table = pixel_weight_table(weight)
    assert table.shape == (256,) and float(table[255]) == 0.0 and torch.equal(table[:5], weight)
    logits = _randn(2, 5, 8, 8, seed=3).requires_grad_(True)
    masks = torch.randint(0, 5, (2, 32, 32), generator=torch.Generator().manual_seed(4))
    masks[0, :5], masks[1, :, -3:] = 255, 255
    total = F.cross_entropy(F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False), masks,
                            weight=weight, ignore_index=255, reduction="sum")
    by_hand = total / _masked_weight_sum(masks, weight, logits.dtype)
    for kwargs in ({}, {"weight_table": table}):
        new = seg_loss(logits, masks, weight, **kwargs)
        torch.testing.assert_close(new, by_hand, rtol=1e-6, atol=0)
        torch.testing.assert_close(torch.autograd.grad(new, logits)[0], torch.autograd.grad(by_hand, logits,
                                   retain_graph=True)[0], rtol=1e-6, atol=1e-9)
    pixels = torch.rand(2, 32 * 32, generator=torch.Generator().manual_seed(5)).topk(100, dim=1).indices
    for _ in range(2):  # the second call reads the cached centres
        new, old = seg_loss_at(logits, masks, pixels, weight, table), _seg_loss_at_by_hand(logits, masks, pixels, weight)
        assert torch.equal(new, old)
        assert torch.equal(*(torch.autograd.grad(x, logits)[0] for x in (new, old)))
    assert pixel_centres(32, 32, torch.float32, torch.device("cpu")) is pixel_centres(32, 32, torch.float32,
                                                                                     torch.device("cpu"))


def test_seg_head_keeps_its_weight_table_on_its_device_and_out_of_checkpoints():
    from xlearner.tasks import HeadOptions, get, pixel_weight_table

    seg = get("seg")
    opts = HeadOptions(fpn_channels=8, seg_head="fpn", seg_background_weight=0.1)
    head = seg.build_head(seg.build_neck([4, 8], [4, 8], opts), 5, [4, 8], [4, 8], opts)
    assert torch.equal(head.weight_table, pixel_weight_table(head.class_weight))
    assert "weight_table" not in head.state_dict()
    assert head.to(torch.float64).weight_table.dtype == torch.float64  # a buffer: moves with the head
    plain = seg.build_head(seg.build_neck([4, 8], [4, 8], HeadOptions(fpn_channels=8)), 5, [4, 8], [4, 8],
                           HeadOptions(fpn_channels=8))
    assert getattr(plain, "weight_table", None) is None  # unweighted heads keep the count of valid pixels


def test_cka_distill_in_float32_under_bf16_autocast():
    """Under autocast the Gram matrices stay float32: the loss of bf16 maps is their float32 CKA."""
    s, t = _randn(2, 6, 5, 5, seed=8).bfloat16(), _randn(2, 4, 5, 5, seed=9).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = cka_distill(s, t)
    assert under.dtype == torch.float32
    assert torch.equal(under, cka_distill(s.float(), t.float()))
