"""Necks (per task) and heads (per source).

cls: ``ClsNeck`` (global average pool of the last feature) + ``ClsHead`` (linear).
det: ``FPNNeck`` + ``DetHead`` (torchvision FCOS head, its loss and post-processing).
seg: ``FPNNeck`` + ``SegHead`` (Panoptic-FPN semantic head).
Model code only: losses that belong to a head's definition (FCOS) live here, the
weighting of losses across sources does not.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork


class ClsNeck(nn.Module):
    """Global average pool of the last backbone feature -> (B, C)."""

    def forward(self, features: list[Tensor]) -> Tensor:
        return features[-1].mean(dim=(2, 3))


class ClsHead(nn.Module):
    """One linear classifier per cls source."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class FPNNeck(nn.Module):
    """torchvision FPN over all backbone features; returns a list at the same strides."""

    def __init__(self, in_channels_list: list[int], out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.fpn = FeaturePyramidNetwork(list(in_channels_list), out_channels)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        out = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))
        return list(out.values())


def _groups(channels: int) -> int:
    """Largest group count <= 32 dividing channels (GroupNorm needs it)."""
    return math.gcd(32, channels)


class _NoBackbone(nn.Module):
    """FCOS wants a backbone; ours lives outside the head (features come in ready-made)."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels


class DetHead(FCOS):
    """torchvision FCOS on our FPN features.

    Why FCOS: anchor-free with one prediction per location and fewer hyper-parameters
    than RetinaNet (no anchor scales/ratios to tune per dataset), and robust for small
    objects on small images (every location inside a box can be a positive, with
    centre sampling). We reuse torchvision's head, its anchor convention (one
    anchor per location, size = the level's stride), its loss (``compute_loss``),
    box coder and ``postprocess_detections``. Its ``GeneralizedRCNNTransform`` is skipped:
    our images are already resized and normalised, and boxes are in input pixels.
    Labels are 0..K-1 for ``num_classes=K`` (no background class: sigmoid focal loss).
    """

    def __init__(self, in_channels: int, num_classes: int, strides: list[int], *, num_convs: int = 4,
                 score_thresh: float = 0.05, nms_thresh: float = 0.6, detections_per_img: int = 100,
                 topk_candidates: int = 1000, center_sampling_radius: float = 1.5):
        if in_channels % 32:
            raise ValueError(f"DetHead: in_channels={in_channels} must be a multiple of 32 (FCOSHead uses GroupNorm(32))")
        anchor_generator = AnchorGenerator(tuple((int(s),) for s in strides), ((1.0,),) * len(strides))
        head = FCOSHead(in_channels, 1, num_classes, num_convs=num_convs)
        super().__init__(_NoBackbone(in_channels), num_classes, anchor_generator=anchor_generator, head=head,
                         center_sampling_radius=center_sampling_radius, score_thresh=score_thresh,
                         nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                         topk_candidates=topk_candidates)
        del self.backbone, self.transform  # not used: see the class docstring
        self.num_classes = num_classes
        self.strides = list(strides)

    def _run(self, features: list[Tensor], image_size: tuple[int, int]):
        head_outputs = self.head(features)
        b = features[0].shape[0]
        h, w = int(image_size[0]), int(image_size[1])
        # AnchorGenerator only reads the image tensor's shape: an empty (B, 0, H, W) suffices
        images = ImageList(features[0].new_empty((b, 0, h, w)), [(h, w)] * b)
        anchors = self.anchor_generator(images, features)
        num_anchors_per_level = [f.size(2) * f.size(3) for f in features]
        return head_outputs, anchors, num_anchors_per_level, images

    def losses(self, features: list[Tensor], image_size: tuple[int, int], targets: list[dict]) -> dict[str, Tensor]:
        """FCOS losses: ``classification`` (focal), ``bbox_regression`` (GIoU), ``bbox_ctrness`` (BCE)."""
        head_outputs, anchors, per_level, _ = self._run(features, image_size)
        targets = [{"boxes": t["boxes"].to(features[0].dtype).reshape(-1, 4), "labels": t["labels"].long()}
                   for t in targets]
        return self.compute_loss(targets, head_outputs, anchors, per_level)

    @torch.no_grad()
    def detect(self, features: list[Tensor], image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        """Boxes (xyxy, input pixels), scores and labels (0..K-1) per image."""
        head_outputs, anchors, per_level, images = self._run(features, image_size)
        split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        return self.postprocess_detections(split_outputs, split_anchors, images.image_sizes)

    def forward(self, features: list[Tensor], image_size: tuple[int, int], targets: list[dict] | None = None):
        return self.losses(features, image_size, targets) if targets is not None else self.detect(features, image_size)


class _ConvGNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(_groups(cout), cout),
                         nn.ReLU(inplace=True))


class SegHead(nn.Module):
    """Panoptic-FPN semantic head: every level is brought to stride 4 by (conv+GN+ReLU+2x up)
    blocks, the levels are summed, a 1x1 conv gives K logits, upsampled to the input size."""

    def __init__(self, in_channels: int, num_classes: int, strides: list[int], hidden: int | None = None):
        super().__init__()
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
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*blocks))
        self.predictor = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, features: list[Tensor], image_size: tuple[int, int] | None = None) -> Tensor:
        x = None
        for f, head in zip(features, self.scale_heads):
            y = head(f)
            if x is not None and y.shape[-2:] != x.shape[-2:]:
                y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = y if x is None else x + y
        logits = self.predictor(x)
        if image_size is None:
            image_size = (logits.shape[-2] * self.base_stride, logits.shape[-1] * self.base_stride)
        return F.interpolate(logits, size=tuple(int(v) for v in image_size), mode="bilinear", align_corners=False)


class _PassFeatures(nn.Module):
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

    def __init__(self, in_channels_list: list[int], num_classes: int, strides: list[int]):
        super().__init__()
        self.base_stride = min(strides)
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in in_channels_list)
        self.classifiers = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in in_channels_list)

    def forward(self, features: list[Tensor], image_size: tuple[int, int] | None = None) -> Tensor:
        size = features[0].shape[-2:]
        logits = None
        for f, norm, clf in zip(features, self.norms, self.classifiers):
            y = clf(norm(f))
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            logits = y if logits is None else logits + y
        if image_size is None:
            image_size = (size[0] * self.base_stride, size[1] * self.base_stride)
        return F.interpolate(logits, size=tuple(int(v) for v in image_size), mode="bilinear", align_corners=False)
