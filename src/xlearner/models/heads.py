"""Necks (per task) and heads (per source).

cls: ``ClsNeck`` (global average pool of the last feature) + ``ClsHead`` (linear).
det: ``FPNNeck`` from C3 on (FCOS's levels, see ``det_levels``) + ``DetHead`` (torchvision's FCOS head and
post-processing; target assignment and loss vectorised over the batch, same values).
seg: ``FPNNeck`` + ``SegHead`` (Panoptic-FPN semantic head).
Model code only: losses that belong to a head's definition (FCOS) live here, the
weighting of losses across sources does not.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7


def global_pool(features: list[Tensor]) -> Tensor:
    """Global average pool of the last backbone feature -> (B, C): the image-level representation."""
    return features[-1].mean(dim=(2, 3))


class ClsNeck(nn.Module):
    """Global average pool of the last backbone feature -> (B, C)."""

    def forward(self, features: list[Tensor]) -> Tensor:
        return global_pool(features)


class ClsHead(nn.Module):
    """One linear classifier per cls source."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class FPNNeck(nn.Module):
    """torchvision FPN over backbone features ``first..``; returns a list, finest level first.

    ``outputs``: how many of the finest levels to return (default: all). Every input level
    still feeds the top-down path (so the loss reaches every backbone stage), but the 3x3
    output convs of levels nobody reads are not built: no parameter without a gradient (DDP).
    ``p6p7`` adds torchvision's ``LastLevelP6P7`` (two stride-2 3x3 convs on the coarsest
    output), the layout of torchvision's ``fcos_resnet50_fpn``: see :func:`det_levels`.
    """

    def __init__(self, in_channels_list: list[int], out_channels: int, *, first: int = 0,
                 outputs: int | None = None, p6p7: bool = False):
        super().__init__()
        self.out_channels = out_channels
        self.first = int(first)
        ins = list(in_channels_list)[self.first:]
        self.outputs = len(ins) if outputs is None else int(outputs)
        if not 1 <= self.outputs <= len(ins) or (p6p7 and self.outputs != len(ins)):
            raise ValueError(f"FPNNeck: outputs={outputs} must be in 1..{len(ins)} (all of them with p6p7)")
        extra = LastLevelP6P7(out_channels, out_channels) if p6p7 else None
        self.fpn = FeaturePyramidNetwork(ins, out_channels, extra_blocks=extra)
        del self.fpn.layer_blocks[self.outputs:]

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        # torchvision's FPN.forward (a test compares them), its convs' weights cast once
        # (:func:`autocast_weights`) and the 3x3 output convs on the finest ``outputs`` levels only
        x = features[self.first:]
        inner, layer, extra = self.fpn.inner_blocks, self.fpn.layer_blocks, self.fpn.extra_blocks
        convs = [b[0] for b in (*inner, *layer)] + ([extra.p6, extra.p7] if extra is not None else [])
        weights = dict(zip(convs, autocast_weights(convs)))

        def conv(c: nn.Conv2d, t: Tensor) -> Tensor:
            return c._conv_forward(t, *weights[c])

        last = conv(inner[-1][0], x[-1])
        results = [conv(layer[-1][0], last)] if len(x) - 1 < self.outputs else []
        for idx in range(len(x) - 2, -1, -1):
            lateral = conv(inner[idx][0], x[idx])
            last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            if idx < self.outputs:
                results.insert(0, conv(layer[idx][0], last))
        if extra is not None:  # LastLevelP6P7(out, out): P6 from P5, P7 from relu(P6)
            p6 = conv(extra.p6, results[-1])
            results += [p6, conv(extra.p7, F.relu(p6))]
        return results


def det_levels(strides: list[int], image_size: int | None = None) -> tuple[int, list[int]]:
    """(first backbone feature the det neck reads, strides of the det head's levels).

    FCOS's levels are P3..P7 (strides 8..128), as in the FCOS paper and torchvision's
    ``fcos_resnet50_fpn``: P3..P5 from C3..C5, P6/P7 from P5. The stride-4 level is left
    out: it has 4x the locations of P3 (3/4 of all), so the head's convs would cost 4x
    more there, and standard FCOS has no use for it. Of P3..P7 the head runs on the levels
    a box of an image of side ``image_size`` can be assigned to: FCOS gives a location of
    stride s the boxes whose largest location-to-edge distance is in (4s, 8s) (the first
    level from 0, the last up to infinity), and in an image of side L that distance is
    below L, so a level with 4s >= L could only ever hold background. 64 px images: P3
    alone; 96 px: P3, P4; 640 px: P3..P7 (P6 and P7 come together). Every backbone level
    from C3 on still feeds the FPN's top-down path. ``image_size=None``: all of P3..P7.
    A backbone without a stride >= 8 feature uses its last feature.
    """
    first = next((i for i, s in enumerate(strides) if s >= 8), len(strides) - 1)
    base = [int(s) for s in strides[first:]]
    levels = base + [2 * base[-1], 4 * base[-1]]
    keep = len(levels)
    if image_size is not None:
        keep = 1
        while keep < len(levels) and 4 * levels[keep] < int(image_size):
            keep += 1
        if keep > len(base):
            keep = len(levels)
    return first, levels[:keep]


def build_det_neck(channels: list[int], strides: list[int], fpn_channels: int,
                   image_size: int | None = None) -> tuple[FPNNeck, list[int]]:
    """The det neck (FPN from C3 on, outputs on :func:`det_levels`) and its output strides, for ``DetHead``."""
    first, head_strides = det_levels(strides, image_size)
    n_base = len(strides) - first
    p6p7 = len(head_strides) > n_base
    return FPNNeck(channels, fpn_channels, first=first, outputs=n_base if p6p7 else len(head_strides),
                   p6p7=p6p7), head_strides


def cast_once(stacks: list[Tensor | list[Tensor]]) -> list[Tensor]:
    """Each entry (a tensor, or a list of tensors stacked along dim 0) in the autocast dtype, all cast
    by one cat, one cast and one split, and their gradients cast back by one cat and one cast, where
    autocast dispatches a cast per weight and one more per gradient: 4 operators instead of 36 for a
    det neck and head of 9 convs (docs/performance.md). The same values: a cast is elementwise.
    Outside autocast (or for weights not in float32): the tensors themselves, a list by its cat."""
    stacks = [list(s) if isinstance(s, (list, tuple)) else [s] for s in stacks]
    parts = [t for s in stacks for t in s]
    device = parts[0].device.type
    if not torch.is_autocast_enabled(device) or any(t.dtype != torch.float32 for t in parts):
        return [s[0] if len(s) == 1 else torch.cat(s) for s in stacks]
    flat = torch.cat([t.reshape(-1) for t in parts]).to(torch.get_autocast_dtype(device))
    pieces = flat.split([sum(t.numel() for t in s) for s in stacks])
    return [v.view(sum(t.shape[0] for t in s), *s[0].shape[1:]) for v, s in zip(pieces, stacks)]


def autocast_weights(convs: list[nn.Conv2d]) -> list[tuple[Tensor, Tensor]]:
    """Each conv's (weight, bias) through :func:`cast_once` (the convs have biases)."""
    flat = cast_once([t for c in convs for t in (c.weight, c.bias)])
    return list(zip(flat[0::2], flat[1::2]))


def _groups(channels: int) -> int:
    """Largest group count <= 32 dividing channels (GroupNorm needs it)."""
    return math.gcd(32, channels)


class _NoBackbone(nn.Module):
    """FCOS wants a backbone; ours lives outside the head (features come in ready-made)."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels


def pad_targets(targets: list[dict], device: torch.device, min_boxes: int = 1) -> tuple[Tensor, Tensor]:
    """A list of per-image ``{"boxes" (n,4), "labels" (n,)}`` -> boxes (B, M, 4) float32 and
    labels (B, M) int64 padded with -1, M = max(most boxes of an image, ``min_boxes``): one tensor
    per field for the whole batch (a fixed ``min_boxes`` gives a compiled step one shape)."""
    boxes = [torch.as_tensor(t["boxes"]).to(device, torch.float32).reshape(-1, 4) for t in targets]
    labels = [torch.as_tensor(t["labels"]).to(device, torch.int64).reshape(-1) for t in targets]
    most = max((len(lb) for lb in labels), default=0)
    if most == 0:
        boxes_t = torch.zeros(len(targets), 1, 4, device=device)
        labels_t = torch.full((len(targets), 1), -1, device=device)
    else:
        boxes_t = nn.utils.rnn.pad_sequence(boxes, batch_first=True, padding_value=0.0)
        labels_t = nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-1)
    extra = min_boxes - boxes_t.shape[1]
    if extra > 0:
        boxes_t = F.pad(boxes_t, (0, 0, 0, extra), value=0.0)
        labels_t = F.pad(labels_t, (0, extra), value=-1)
    return boxes_t, labels_t


def fcos_match(anchors: Tensor, num_anchors_per_level: list[int], boxes: Tensor, labels: Tensor,
               center_sampling_radius: float) -> Tensor:
    """Matched box index per anchor, (B, A), -1 for background: torchvision FCOS's rules
    (centre sampling, inside the box, the level's scale range, smallest box wins) for the
    whole batch at once. ``anchors`` (A, 4) are shared by every image; ``boxes`` (B, M, 4) and
    ``labels`` (B, M) come from :func:`pad_targets` (label -1: padding)."""
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2                      # (A, 2)
    sizes = anchors[:, 2] - anchors[:, 0]                                # (A,)
    gt_centers = (boxes[..., :2] + boxes[..., 2:]) / 2                   # (B, M, 2)
    match = ((centers[None, :, None, :] - gt_centers[:, None, :, :]).abs().amax(dim=3)
             < center_sampling_radius * sizes[None, :, None])             # (B, A, M)
    x0, y0, x1, y1 = boxes[:, None, :, :].unbind(dim=3)                   # (B, 1, M)
    dist = torch.cat([centers[None, :, None, :] - boxes[:, None, :, :2],
                      boxes[:, None, :, 2:] - centers[None, :, None, :]], dim=3)  # (B, A, M, 4): l, t, r, b
    match &= dist.amin(dim=3) > 0
    lower = sizes * 4
    lower[: num_anchors_per_level[0]] = 0
    upper = sizes * 8
    upper[-num_anchors_per_level[-1]:] = float("inf")
    far = dist.amax(dim=3)
    match &= (far > lower[None, :, None]) & (far < upper[None, :, None]) & (labels[:, None, :] >= 0)
    areas = (x1 - x0) * (y1 - y0)                                         # (B, 1, M)
    best, idx = (match.to(torch.float32) * (1e8 - areas)).max(dim=2)
    return torch.where(best < 1e-5, torch.full_like(idx, -1), idx)


def ltrb_targets(anchors: Tensor, boxes: Tensor) -> Tensor:
    """FCOS's regression targets: the distances (l, t, r, b) from each anchor's centre to the edges of
    its box, divided by the anchor's width and height (torchvision's ``BoxLinearCoder.encode`` with
    ``normalize_by_size``, in four operators on 2-vectors instead of its per-coordinate ones).
    ``anchors`` (A, 4), ``boxes`` (..., A, 4)."""
    centers = (anchors[:, :2] + anchors[:, 2:]) * 0.5
    sizes = (anchors[:, 2:] - anchors[:, :2]).repeat(1, 2)
    return torch.cat([centers - boxes[..., :2], boxes[..., 2:] - centers], dim=-1) / sizes


def ltrb_giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """torchvision's ``generalized_box_iou_loss`` (reduction "none") of two boxes given as distances
    (l, t, r, b) >= 0 from one shared point, as FCOS has them (its ReLU'd predictions, its foreground
    targets), without decoding them to corners.

    Both boxes hold the point, so they always overlap: the overlap's width is min(l, l') + min(r, r')
    >= 0 (and the enclosing box's max(l, l') + max(r, r')), where torchvision must clamp. The
    anchor-size normalisation scales every area by the same w x h, which IoU and GIoU do not see.
    The four boxes' widths and heights come from one stacked sum, and torchvision's
    1 - (iou - (area_c - union) / (area_c + eps)) is written 2 - inter / (union + eps) -
    (union + eps) / (area_c + eps), the same value with one division fewer. So the values and
    gradients are torchvision's on the decoded boxes (to float rounding), in about half the
    operators of decoding and then intersecting corners, and no boolean-mask indexing (torchvision's
    ``inter[mask] = ...`` is a ``nonzero`` whose output size the host must read: every det step on
    CUDA waited for the GPU there). The training step computes the same with its gradient in closed
    form (:class:`_FCOSLoss`)."""
    # (..., 2, 2) views [[l, t], [r, b]]: a sum over dim -2 gives (width, height)
    pred, target = pred.unflatten(-1, (2, 2)), target.unflatten(-1, (2, 2))
    boxes = torch.stack([pred, target, torch.minimum(pred, target), torch.maximum(pred, target)], dim=-3)
    width, height = boxes.sum(dim=-2).unbind(dim=-1)  # not prod(): its backward checks for zeros on the host
    area_p, area_t, inter, area_c = (width * height).unbind(dim=-1)
    union = area_p + area_t - inter + eps
    return 2 - inter / union - union / (area_c + eps)


def binary_focal_loss(logits: Tensor, positive: Tensor, alpha: float = 0.25) -> Tensor:
    """torchvision's ``sigmoid_focal_loss`` (gamma 2, reduction "sum") for 0/1 targets ``positive``
    (bool), in about half its operators. With s = -z on positives and z elsewhere, 1 - p_t is
    sigmoid(s) and the cross-entropy is softplus(s): one sign flip instead of torchvision's mixing of
    p and 1 - p by the target. ``logits`` may be bf16: the product with the sign is float32. The
    training step computes the same with its gradient in closed form (:class:`_FCOSLoss`)."""
    sign = 1.0 - 2.0 * positive  # -1 on positives, 1 elsewhere (float32; two operators, where() takes three)
    s = logits * sign
    q = torch.sigmoid(s)
    alpha_t = 0.5 + (0.5 - alpha) * sign  # alpha on positives, 1 - alpha elsewhere
    return (q * q * F.softplus(s) * alpha_t).sum()


FCOS_TARGET_KEYS = ("fcos_labels", "fcos_ltrb", "fcos_ctr", "fcos_weight", "fcos_norm")


def fcos_targets(anchors: Tensor, matched: Tensor, boxes: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """What FCOS's loss reads from the boxes, per anchor (no prediction enters it): ``fcos_labels``
    (B, A) the matched box's class, -1 on background; ``fcos_ltrb`` (B, A, 4) its regression target
    (:func:`ltrb_targets`; background: a unit box around the anchor's own centre, finite terms that
    the loss weights by zero); ``fcos_ctr`` (B, A) its centerness target (0 on background);
    ``fcos_norm`` (B,) 1 / max(1, foreground anchors of the batch), torchvision's normaliser, the
    same in every image; ``fcos_weight`` (B, A) the foreground indicator times it."""
    fg = matched >= 0
    idx = matched.clamp(min=0)
    gt_boxes = torch.gather(boxes, 1, idx[..., None].expand(-1, -1, 4))  # (B, A, 4)
    gt_labels = torch.where(fg, torch.gather(labels, 1, idx), -1)        # (B, A)
    reg_targets = torch.where(fg[..., None], ltrb_targets(anchors, gt_boxes), 0.5)
    # centerness: sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)), on the (2, 2) view [[l, t], [r, b]]
    pairs = reg_targets.unflatten(-1, (2, 2))
    ratios = pairs.amin(dim=-2) / pairs.amax(dim=-2)
    fg_weight = fg.to(torch.float32)
    gt_ctr = (ratios[..., 0] * ratios[..., 1]).sqrt() * fg_weight
    norm = fg_weight.sum().clamp(min=1).reciprocal()
    return {"fcos_labels": gt_labels, "fcos_ltrb": reg_targets, "fcos_ctr": gt_ctr,
            "fcos_weight": fg_weight * norm, "fcos_norm": norm.expand(fg.shape[0]).clone()}


def cached_tensor(store: dict, key: tuple, compute) -> Tensor:
    """``compute()``, kept in ``store`` under ``key`` in eager mode (a tensor that depends only on shapes
    and the device, built once instead of every step); under torch.compile computed in the graph,
    because a cache read there would recompile the step once the cache is filled. At most 17 keys."""
    if torch.compiler.is_compiling():
        return compute()
    if key not in store:
        if len(store) > 16:
            store.clear()
        store[key] = compute()
    return store[key]


_CLASS_INDICES: dict = {}


def class_indices(num_classes: int, device: torch.device) -> Tensor:
    """``arange(num_classes)`` on ``device`` (:func:`cached_tensor`: one operator less per det step)."""
    return cached_tensor(_CLASS_INDICES, (num_classes, device), lambda: torch.arange(num_classes, device=device))


_LOSS_CONSTANTS: dict = {}


class _FCOSLoss(torch.autograd.Function):
    """The three FCOS losses of :func:`fcos_loss_on_targets` and, in the same pass, their gradients in
    closed form, so that the backward is three products. Through autograd the same formulas took 81
    operators forward and backward at the ``gpu`` preset's det batch (49 backward: each product,
    division, minimum and maximum of the forward adds one to three), in closed form 54 (5 backward):
    what a launch-bound det step pays for (docs/performance.md). The values are
    :func:`binary_focal_loss`'s, :func:`ltrb_giou_loss`'s and ``binary_cross_entropy_with_logits``'s,
    the gradients autograd's on them, ties of the GIoU's minimum and maximum included (half to each
    side): tests compare both with torchvision's loss."""

    @staticmethod
    def forward(ctx, cls_logits, ltrb, ctrness, positive, reg_targets, gt_ctr, weight, norm, alpha=0.25):
        # focal: s = -z on positives and z elsewhere, q = sigmoid(s), loss q^2 softplus(s) alpha_t
        # (binary_focal_loss); its derivative in s is alpha_t q^2 (2 (1 - q) softplus(s) + q)
        c = cached_tensor(_LOSS_CONSTANTS, (alpha, positive.device), lambda: torch.tensor(
            [-1.0, 1.0, alpha, 1.0 - alpha, 0.5, 1e-7, 0.0, 1e-7, 0.0], device=positive.device))
        sign = torch.where(positive, c[0], c[1])  # where() of Python numbers is 3 operators, of tensors 1
        s = cls_logits * sign
        q = torch.sigmoid(s)
        sp = F.softplus(s)
        alpha_n = c[2:4] * norm[0]  # alpha_t over the foreground count
        aqq = q * q * torch.where(positive, alpha_n[0], alpha_n[1])
        cls = torch.dot(aqq.reshape(-1), sp.reshape(-1))
        # GIoU on (l, t, r, b) from a shared point (ltrb_giou_loss), boxes as (2, 2) views [[l, t], [r, b]]
        p, t = ltrb.unflatten(-1, (2, 2)), reg_targets.unflatten(-1, (2, 2))
        wh = torch.stack([p, torch.minimum(p, t), torch.maximum(p, t), t], dim=-3).sum(dim=-2)  # (..., 4, 2)
        area_p, inter, area_c, area_t = (wh.prod(dim=-1) + c[5:]).unbind(dim=-1)  # eps on area_p and area_c
        union = area_p + area_t - inter
        r_u, r_c = union.reciprocal(), area_c.reciprocal()
        iou, u_c = inter * r_u, union * r_c
        reg = torch.dot((2 - iou - u_c).reshape(-1), weight.reshape(-1))
        ctr = F.binary_cross_entropy_with_logits(ctrness, gt_ctr, weight=weight, reduction="sum")
        grads = [None, None, None]
        if ctx.needs_input_grad[0]:
            grads[0] = aqq * torch.addcmul(q, 1 - q, sp, value=2) * sign
        if ctx.needs_input_grad[1]:
            # d loss / d (area_p, inter, area_c) = (g_u, -(r_u + g_u), u_c r_c), g_u = iou r_u - r_c; an
            # area's derivative in a distance is the other side (l, r: height; t, b: width); inter's
            # reaches the prediction where it is the minimum, area_c's where it is the maximum: with
            # u = 1, 0.5, 0 for p >, =, < t that is (k_p - k_i) + u (k_i + k_c) (a half each on ties,
            # as autograd's minimum and maximum)
            g_u = iou * r_u - r_c
            k = torch.stack([g_u, r_u + g_u, u_c * r_c], dim=-1)[..., None] * wh[..., :3, :].flip(-1)
            k_p, k_i, k_c = (v[..., None, :] for v in k.unbind(dim=-2))
            grads[1] = (torch.addcmul(k_p - k_i, torch.heaviside(p - t, c[4]), k_i + k_c)
                        * weight[..., None, None]).flatten(-2)
        if ctx.needs_input_grad[2]:
            grads[2] = (torch.sigmoid(ctrness) - gt_ctr) * weight
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        ctx.logits_dtype = cls_logits.dtype
        return cls, reg, ctr

    @staticmethod
    def backward(ctx, g_cls, g_reg, g_ctr):
        d_cls, d_ltrb, d_ctr = ctx.saved_tensors
        return ((d_cls * g_cls).to(ctx.logits_dtype) if ctx.needs_input_grad[0] else None,
                d_ltrb * g_reg if ctx.needs_input_grad[1] else None,
                d_ctr * g_ctr if ctx.needs_input_grad[2] else None, None, None, None, None, None, None)


def fcos_loss_on_targets(head_outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision FCOSHead.compute_loss over the batch at once, on :func:`fcos_targets`: sigmoid
    focal loss (:func:`binary_focal_loss`), GIoU loss (:func:`ltrb_giou_loss`) and centerness BCE,
    each summed and divided by max(1, foreground count). Weighted sums instead of boolean indexing,
    and the count comes with the targets: no host synchronisation. The boxes stay in FCOS's
    (l, t, r, b) form throughout, and the gradients come in closed form with the values
    (:class:`_FCOSLoss`): the det step's cost on a GPU follows its operator count (docs/performance.md)."""
    cls_logits = head_outputs["cls_logits"]                               # (B, A, K)
    bbox_regression = head_outputs["bbox_regression"].float()             # (B, A, 4)
    ctrness = head_outputs["bbox_ctrness"].float().squeeze(dim=2)        # (B, A)
    gt_labels, reg_targets, gt_ctr, weight, norm = (targets[k] for k in FCOS_TARGET_KEYS)
    positive = gt_labels[..., None] == class_indices(cls_logits.shape[-1], cls_logits.device)  # background (-1): none
    cls, reg, ctr = _FCOSLoss.apply(cls_logits, bbox_regression, ctrness, positive, reg_targets, gt_ctr, weight, norm)
    return {"classification": cls, "bbox_regression": reg, "bbox_ctrness": ctr}


def fcos_loss(head_outputs: dict[str, Tensor], anchors: Tensor, matched: Tensor, boxes: Tensor,
              labels: Tensor) -> dict[str, Tensor]:
    """The FCOS losses from matched boxes (:func:`fcos_match`): :func:`fcos_loss_on_targets` of :func:`fcos_targets`."""
    return fcos_loss_on_targets(head_outputs, fcos_targets(anchors, matched, boxes, labels))


class FCOSTargets:
    """A padded det batch's :func:`fcos_targets`, added where the batch is built: in the training
    loader's workers. Matching and encoding read only boxes and anchors, so computing them there takes
    about 60 operators off every det step (docs/performance.md), which is what a launch-bound GPU step
    pays for. Picklable (DataLoader workers): it holds the anchors of one image size
    (:meth:`DetHead.target_encoder`); the boxes and labels stay in the batch."""

    def __init__(self, anchors: Tensor, num_anchors_per_level: list[int], center_sampling_radius: float):
        self.anchors = anchors
        self.num_anchors_per_level = list(num_anchors_per_level)
        self.center_sampling_radius = float(center_sampling_radius)

    def __call__(self, batch: dict) -> dict:
        boxes, labels = batch["boxes"].to(torch.float32), batch["labels"].to(torch.int64)
        matched = fcos_match(self.anchors, self.num_anchors_per_level, boxes, labels, self.center_sampling_radius)
        return {**batch, **fcos_targets(self.anchors, matched, boxes, labels)}


class FusedFCOSHead(nn.Module):
    """torchvision's ``FCOSHead`` with its classification and regression towers run as one.

    Both towers read the same features: their first convs are one conv with twice the outputs,
    the later ones one grouped conv (two groups), each GroupNorm(32) pair one GroupNorm(64) over the
    stacked channels (the same groups), and the box and centerness predictors one conv with 5
    outputs. In the step the class and box predictors run as one grouped conv on both towers, its
    weight the two stacked with zero rows that even the groups (max(K, 5) outputs each; the zero
    rows' outputs are dropped, so the parameters and their gradients are the two convs' own), and
    every conv's weights are cast once (:func:`autocast_weights`). The maths is torchvision's (a
    test compares the outputs and gradients); a step
    dispatches about half of the head's operators, which is what a launch-bound GPU step pays for.
    Built from a torchvision head (:meth:`from_fcos`), so it starts from torchvision's initialisation."""

    def __init__(self, in_channels: int, num_classes: int, num_convs: int):
        super().__init__()
        c = in_channels
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += [nn.Conv2d(c if i == 0 else 2 * c, 2 * c, 3, padding=1, groups=1 if i == 0 else 2),
                       nn.GroupNorm(64, 2 * c), nn.ReLU()]
        self.towers = nn.Sequential(*layers)
        self.cls_logits = nn.Conv2d(c, num_classes, 3, padding=1)
        self.box = nn.Conv2d(c, 5, 3, padding=1)  # (l, t, r, b) distances, then centerness
        self.in_channels, self.num_classes = c, num_classes
        self._zeros: dict = {}

    def _zero_rows(self, n: int) -> tuple[Tensor, Tensor]:
        """n zero output rows (weight, bias) for the grouped predictor, cached per shape and device."""
        like = self.cls_logits.weight
        key = (n, like.shape[1:], like.dtype, like.device)
        w = cached_tensor(self._zeros, key, lambda: like.new_zeros((n, *like.shape[1:])))
        return w, cached_tensor(self._zeros, key + ("bias",), lambda: like.new_zeros(n))

    @classmethod
    def from_fcos(cls, head: FCOSHead) -> "FusedFCOSHead":
        cls_tower, reg_tower = head.classification_head.conv, head.regression_head.conv
        num_convs = len(cls_tower) // 3
        fused = cls(cls_tower[0].in_channels, head.classification_head.num_classes, num_convs)
        with torch.no_grad():
            for i in range(num_convs):
                for j in (0, 1):  # conv, GroupNorm: the cls tower's channels first, then the regression tower's
                    dst = fused.towers[3 * i + j]
                    dst.weight.copy_(torch.cat([cls_tower[3 * i + j].weight, reg_tower[3 * i + j].weight]))
                    dst.bias.copy_(torch.cat([cls_tower[3 * i + j].bias, reg_tower[3 * i + j].bias]))
            fused.cls_logits.load_state_dict(head.classification_head.cls_logits.state_dict())
            reg = head.regression_head
            fused.box.weight.copy_(torch.cat([reg.bbox_reg.weight, reg.bbox_ctrness.weight]))
            fused.box.bias.copy_(torch.cat([reg.bbox_reg.bias, reg.bbox_ctrness.bias]))
        return fused

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        towers = [m for m in self.towers if isinstance(m, nn.Conv2d)]
        k, m = self.num_classes, max(self.num_classes, 5)
        zeros = self._zero_rows(m - k), self._zero_rows(m - 5)
        predictor = [(self.cls_logits.weight, self.cls_logits.bias), zeros[0], (self.box.weight, self.box.bias), zeros[1]]
        predictor = [r for r in predictor if r[0].shape[0]]
        # one cast for every level, the predictor's weight stacked in it
        *flat, w_pred, b_pred = cast_once([t for c in towers for t in (c.weight, c.bias)]
                                          + [[w for w, _ in predictor], [b for _, b in predictor]])
        weights = dict(zip(towers, zip(flat[0::2], flat[1::2])))
        outputs = []
        for features in x:
            for layer in self.towers:
                features = layer._conv_forward(features, *weights[layer]) if isinstance(layer, nn.Conv2d) \
                    else layer(features)
            y = F.conv2d(features, w_pred, b_pred, padding=1, groups=2)  # (n, 2m, h, w): classes | boxes
            outputs.append(y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, 2 * m))
        # one split (its backward one cat); the distances and centerness in float32 (the loss and the
        # box decoding read them so)
        sizes = [s for s in (k, m - k, 5, m - 5) if s]
        pieces = torch.cat(outputs, dim=1).split(sizes, dim=2)
        logits, boxes = pieces[0], pieces[1 if m == k else 2]
        reg, ctr = boxes.float().split([4, 1], dim=2)
        return {"cls_logits": logits, "bbox_regression": F.relu(reg), "bbox_ctrness": ctr}


@functools.lru_cache(maxsize=8)
def _warn_grids(encoded: int, anchors: int, grids: tuple) -> None:
    """Once per shape: a backbone whose level grids are not ceil(size / stride)."""
    import warnings

    warnings.warn(f"DetHead: the loader encoded targets for {encoded} anchors, the features give {anchors} "
                  f"(grids {list(grids)}, not ceil(size / stride)); matching in "
                  "the step instead, which is correct but slower", stacklevel=3)


class DetHead(FCOS):
    """torchvision FCOS on our FPN features.

    Why FCOS: anchor-free with one prediction per location and fewer hyper-parameters
    than RetinaNet (no anchor scales/ratios to tune per dataset), and robust for small
    objects on small images (every location inside a box can be a positive, with
    centre sampling). We reuse torchvision's head, its anchor convention (one
    anchor per location, size = the level's stride), box coder and
    ``postprocess_detections``; its target assignment and loss are computed for the whole
    batch at once (:func:`fcos_match`, :func:`fcos_loss`: the same values as torchvision's
    ``compute_loss``, without its per-image Python loop and host synchronisation). Its
    ``GeneralizedRCNNTransform`` is skipped: our images are already resized and normalised,
    and boxes are in input pixels. ``strides``: those of the features it is given
    (:func:`build_det_neck`). Labels are 0..K-1 for ``num_classes=K`` (no background class:
    sigmoid focal loss).

    ``regression_bias``: the start of the (l, t, r, b) layer's bias, in strides. torchvision's
    ``FCOSRegressionHead`` puts a ReLU on these outputs and starts the bias at 0; when the first
    optimiser steps push the pre-activations below 0 everywhere, every box has zero size, the GIoU
    loss sticks at 1 and no gradient reaches the layer again (a dead ReLU: 17 of 90 frozen det
    transfers of the 5-seed lever screen died so, see docs/levers.md). Starting at 1.0 (each
    distance one stride, a box of two strides around each location) keeps them alive (0 of 90).
    """

    def __init__(self, in_channels: int, num_classes: int, strides: list[int], *, num_convs: int = 4,
                 score_thresh: float = 0.05, nms_thresh: float = 0.6, detections_per_img: int = 100,
                 topk_candidates: int = 1000, center_sampling_radius: float = 1.5, regression_bias: float = 1.0):
        if in_channels % 32:
            raise ValueError(f"DetHead: in_channels={in_channels} must be a multiple of 32 (FCOSHead uses GroupNorm(32))")
        anchor_generator = AnchorGenerator(tuple((int(s),) for s in strides), ((1.0,),) * len(strides))
        head = FCOSHead(in_channels, 1, num_classes, num_convs=num_convs)
        super().__init__(_NoBackbone(in_channels), num_classes, anchor_generator=anchor_generator, head=head,
                         center_sampling_radius=center_sampling_radius, score_thresh=score_thresh,
                         nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                         topk_candidates=topk_candidates)
        del self.backbone, self.transform  # not used: see the class docstring
        nn.init.constant_(self.head.regression_head.bbox_reg.bias, regression_bias)
        self.head = FusedFCOSHead.from_fcos(self.head)  # torchvision's initialisation, its towers run as one
        self.num_classes = num_classes
        self.strides = list(strides)
        self._anchor_cache: dict = {}

    def anchors_for(self, features: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        """The (A, 4) anchors of one image (every image of a batch shares them), cached per shape
        in eager mode; under torch.compile they are computed in the graph (a cache read there would
        recompile the step once it is filled)."""
        h, w = int(image_size[0]), int(image_size[1])
        grids = tuple(tuple(int(v) for v in f.shape[-2:]) for f in features)
        key = (h, w, grids, features[0].device)
        return cached_tensor(self._anchor_cache, key, lambda: self._anchors(*key))

    def _anchors(self, h: int, w: int, grids: tuple, device: torch.device) -> Tensor:
        # AnchorGenerator reads only shapes, dtype and device: empty float32 stand-ins (float32
        # even under bf16 autocast: bf16 would round pixel coordinates above 256 to 2+ px)
        empty = torch.empty((1, 0, h, w), dtype=torch.float32, device=device)
        return self.anchor_generator(ImageList(empty, [(h, w)]), [empty.new_empty((1, 0) + g) for g in grids])[0]

    def target_encoder(self, image_size: int | tuple[int, int]) -> FCOSTargets:
        """:class:`FCOSTargets` for training images of ``image_size``, on the CPU. The level grids are
        ceil(size / stride), what stride-2 convs with "same" padding give (ResNet, MobileNet); for a
        backbone whose grids differ, :meth:`losses` sees the anchor count differ and matches in the step."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        grids = tuple((math.ceil(h / s), math.ceil(w / s)) for s in self.strides)
        return FCOSTargets(self._anchors(int(h), int(w), grids, torch.device("cpu")), [a * b for a, b in grids],
                           self.center_sampling_radius)

    def _run(self, features: list[Tensor], image_size: tuple[int, int]):
        if len(features) != len(self.strides):
            raise ValueError(f"DetHead expects {len(self.strides)} feature levels (strides {self.strides}), "
                             f"got {len(features)}")
        head_outputs = self.head(features)
        anchors = self.anchors_for(features, image_size)
        num_anchors_per_level = [f.size(2) * f.size(3) for f in features]
        return head_outputs, anchors, num_anchors_per_level

    def losses(self, features: list[Tensor], image_size: tuple[int, int],
               targets: list[dict] | tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """FCOS losses: ``classification`` (focal), ``bbox_regression`` (GIoU), ``bbox_ctrness`` (BCE).

        ``targets``: per-image ``{"boxes", "labels"}`` dicts, the padded ``(boxes (B, M, 4),
        labels (B, M), -1 = padding)`` of :func:`pad_targets`, or a training loader's det batch
        encoded by :class:`FCOSTargets` (its ``fcos_*`` targets and its padded boxes and labels)."""
        head_outputs, anchors, per_level = self._run(features, image_size)
        if isinstance(targets, dict):  # the loader's :class:`FCOSTargets`, with the boxes they came from
            if targets["fcos_labels"].shape[1] == anchors.shape[0]:
                return fcos_loss_on_targets(head_outputs, targets)
            _warn_grids(int(targets["fcos_labels"].shape[1]), int(anchors.shape[0]),
                        tuple(tuple(int(v) for v in f.shape[-2:]) for f in features))
            targets = (targets["boxes"], targets["labels"])
        if isinstance(targets, tuple):
            boxes, labels = targets[0].to(anchors.device, torch.float32), targets[1].to(anchors.device, torch.int64)
        else:
            boxes, labels = pad_targets(targets, anchors.device)
        matched = fcos_match(anchors, per_level, boxes, labels, self.center_sampling_radius)
        return fcos_loss(head_outputs, anchors, matched, boxes, labels)

    @torch.no_grad()
    def detect(self, features: list[Tensor], image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        """Boxes (xyxy, input pixels), scores and labels (0..K-1) per image."""
        head_outputs, anchors, per_level = self._run(features, image_size)
        b = features[0].shape[0]
        h, w = int(image_size[0]), int(image_size[1])
        split_outputs = {k: list(v.float().split(per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(anchors.split(per_level))] * b
        return self.postprocess_detections(split_outputs, split_anchors, [(h, w)] * b)

    def forward(self, features: list[Tensor], image_size: tuple[int, int], targets: list[dict] | None = None):
        return self.losses(features, image_size, targets) if targets is not None else self.detect(features, image_size)


@functools.lru_cache(maxsize=256)
def _axis_weights(n_in: int, n_out: int | None, scale: float | None, dtype: torch.dtype) -> Tensor:
    """(n_out, n_in): 1-d linear interpolation (``align_corners=False``) as a matrix, its rows built by
    ``F.interpolate`` itself from the unit signals, so the weights are the library's."""
    eye = torch.eye(n_in).unsqueeze(1)
    w = F.interpolate(eye, size=n_out, scale_factor=scale, mode="linear", align_corners=False)
    return w.squeeze(1).T.to(dtype).contiguous()


def _resize_separable(x: Tensor, size, scale_factor) -> Tensor:
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    (sh, sw), (fh, fw) = pair(size), pair(scale_factor)
    h, w = x.shape[-2:]
    uh = _axis_weights(h, None if sh is None else int(sh), None if fh is None else float(fh), x.dtype)
    uw = _axis_weights(w, None if sw is None else int(sw), None if fw is None else float(fw), x.dtype)
    return uh @ x @ uw.T


def resize_bilinear(x: Tensor, size=None, scale_factor=None, channels_last: bool | None = None) -> Tensor:
    """Bilinear resizing (``align_corners=False``): on the CPU as two matmuls, on CUDA of a channels_last copy.

    CPU (``channels_last=None``): bilinear resizing is one linear map per axis, so ``Uh @ x @ Uw.T``
    with the per-axis weights of ``F.interpolate`` (:func:`_axis_weights`) gives its values to float
    rounding. PyTorch's CPU kernel copies its input and its backward scatters pixel by pixel: for the
    seg logits of a default batch (16 x 21 maps, 16 -> 64 px) forward + backward took 11.5 ms there
    and 3.5 ms as matmuls (2 threads).

    CUDA: PyTorch's kernel for a contiguous (NCHW) tensor runs one thread per output pixel,
    each looping over batch x channels: on the seg head's small maps (64 images x 128 channels,
    12x12 -> 24x24) one call took 1.5 ms, and upsampling took two thirds of the GPU time of a
    seg step on an H200 (GroupNorm returns NCHW even in a channels_last net). The channels_last
    kernel runs one thread per output value. ``channels_last`` True or False forces that kernel
    on a channels_last or an NCHW tensor, on any device.
    """
    if channels_last is None and x.device.type == "cpu":
        return _resize_separable(x, size, scale_factor)
    if x.is_cuda if channels_last is None else channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=size, scale_factor=scale_factor, mode="bilinear", align_corners=False)


class Upsample2x(nn.Module):
    """2x bilinear upsampling through :func:`resize_bilinear` (no parameters: replaces ``nn.Upsample``)."""

    def forward(self, x: Tensor) -> Tensor:
        return resize_bilinear(x, scale_factor=2)


def _upsample_logits(logits: Tensor, base_stride: int, image_size: tuple[int, int] | None) -> Tensor:
    """Logits at ``base_stride`` -> at ``image_size`` (default: their size times the stride)."""
    if image_size is None:
        image_size = (logits.shape[-2] * base_stride, logits.shape[-1] * base_stride)
    return resize_bilinear(logits, size=tuple(int(v) for v in image_size))


class _ConvGNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(_groups(cout), cout),
                         nn.ReLU(inplace=True))


class SegHead(nn.Module):
    """Panoptic-FPN semantic head: every level is brought to the finest stride (4 for a ResNet) by (conv+GN+ReLU+2x up)
    blocks, the levels are summed, a 1x1 conv gives K logits, upsampled to the input size."""

    def __init__(self, in_channels: int, num_classes: int, strides: list[int], hidden: int | None = None,
                 class_weight: Tensor | None = None):
        super().__init__()
        # the loss's per-class weights travel with the head (a non-persistent buffer: not in checkpoints)
        self.register_buffer("class_weight", class_weight, persistent=False)
        hidden = hidden or in_channels
        base = min(strides)
        self.base_stride = base
        self.scale_heads = nn.ModuleList()
        for s in strides:
            n_up = int(round(math.log2(s / base)))
            blocks: list[nn.Module] = []
            for k in range(max(1, n_up)):
                blocks.append(_ConvGNReLU(in_channels if k == 0 else hidden, hidden))
                if n_up > 0:
                    blocks.append(Upsample2x())
            self.scale_heads.append(nn.Sequential(*blocks))
        self.predictor = nn.Conv2d(hidden, num_classes, 1)

    def logits(self, features: list[Tensor]) -> Tensor:
        """(B,K,h,w) logits at the finest level's stride."""
        x = None
        for f, head in zip(features, self.scale_heads):
            y = head(f)
            if x is not None and y.shape[-2:] != x.shape[-2:]:
                y = resize_bilinear(y, size=x.shape[-2:])
            x = y if x is None else x + y
        return self.predictor(x)

    def forward(self, features: list[Tensor], image_size: tuple[int, int] | None = None) -> Tensor:
        return _upsample_logits(self.logits(features), self.base_stride, image_size)


class PassFeatures(nn.Module):
    """The neck of a linear probe: the backbone's feature maps as they are."""

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        return list(features)


class LinearSegHead(nn.Module):
    """Linear dense probe: per level BatchNorm + 1x1 conv to K logits, upsampled and summed.

    The sum of per-level linear maps is one linear map of the concatenated, upsampled
    multi-scale features (the linear segmentation evaluation of self-supervised learning,
    e.g. DINOv2's BN + linear layer). With no hidden layer, the score depends on what the
    frozen features hold, not on what a deep head can still learn on top of them.
    """

    def __init__(self, in_channels_list: list[int], num_classes: int, strides: list[int],
                 class_weight: Tensor | None = None):
        super().__init__()
        self.register_buffer("class_weight", class_weight, persistent=False)
        self.base_stride = min(strides)
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in in_channels_list)
        self.classifiers = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in in_channels_list)

    def logits(self, features: list[Tensor]) -> Tensor:
        """(B,K,h,w) logits at the finest level's stride."""
        size = features[0].shape[-2:]
        logits = None
        for f, norm, clf in zip(features, self.norms, self.classifiers):
            y = clf(norm(f))
            if y.shape[-2:] != size:
                y = resize_bilinear(y, size=size)
            logits = y if logits is None else logits + y
        return logits

    def forward(self, features: list[Tensor], image_size: tuple[int, int] | None = None) -> Tensor:
        return _upsample_logits(self.logits(features), self.base_stride, image_size)
