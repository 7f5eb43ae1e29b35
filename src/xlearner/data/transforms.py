"""Task-aware transforms (torchvision.transforms.v2) that keep boxes and masks aligned with the image.

``build_transform(task, size, train, augment)`` returns ``f(image_uint8, target) -> (image, target)``
with a float32 image normalised by the ImageNet mean/std. Boxes travel as
``tv_tensors.BoundingBoxes`` (XYXY, canvas size) and masks as ``tv_tensors.Mask`` (resized
nearest), so every geometric op moves them together with the pixels. Randomness comes from
torch's global RNG: the loader seeds it per sample so augmentation is reproducible.

Two resize modes (``SourceConfig.resize``): ``square`` stretches every image to size x size;
``keep_ratio`` scales the longer side to ``size`` and pads bottom/right to size x size (one
batch shape for every batch; padded pixels are the mean colour, ~0 once normalised, and 255 =
ignore in masks; no box lies in the padding, so it yields no detection target). An eval
transform built with ``original=True`` also attaches ``target["meta"]`` (original size, the
resized extent, image id, original boxes or mask) so predictions can be taken back to the
original pixels: ``boxes_to_original``, ``logits_to_original`` (in ``xlearner.targets``, re-exported).
"""
from __future__ import annotations

from typing import Callable

import math

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

from xlearner.config import AugmentConfig
from xlearner.targets import IGNORE_INDEX, boxes_to_original, logits_to_original  # noqa: F401 (re-exported)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]

RESIZE_MODES = ("keep_ratio", "square")
PAD_FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)
"""Padding colour (uint8): the mean, so padded pixels are ~0 after normalisation."""


def keep_ratio_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """(height, width) with the longer side = ``size`` and the aspect ratio kept."""
    scale = size / max(h, w)
    return max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))


class KeepRatioResize(v2.Transform):
    """Resize so the longer side is ``size``, keeping the ratio (boxes scaled, masks nearest)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def make_params(self, flat_inputs: list) -> dict:
        return {"size": list(keep_ratio_shape(*query_size(flat_inputs), self.size))}

    def transform(self, inpt, params: dict):
        return self._call_kernel(F.resize, inpt, params["size"], antialias=True)


class PadTo(v2.Transform):
    """Pad bottom/right to size x size: image with ``PAD_FILL``, masks with 255 (ignore); boxes stay."""

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def make_params(self, flat_inputs: list) -> dict:
        h, w = query_size(flat_inputs)
        return {"padding": [0, 0, max(0, self.size - w), max(0, self.size - h)]}

    def transform(self, inpt, params: dict):
        if not any(params["padding"]):
            return inpt
        fill = IGNORE_INDEX if isinstance(inpt, tv_tensors.Mask) else list(PAD_FILL)
        return self._call_kernel(F.pad, inpt, padding=params["padding"], fill=fill)


class TaskTransform:
    """Picklable callable (DataLoader workers) wrapping a v2 pipeline for one task
    (``tasks.Task.apply_transform`` carries the task's targets through it).

    With ``original=True`` (evaluation) a dense task's target also gets ``meta``: ``orig_size``
    (H, W), ``input_size`` (the resized extent inside the padded input), ``image_id`` when the
    reader gave one, and the task's target before any resize (``Task.original_target``).
    """

    def __init__(self, task: str, pipeline: v2.Transform, *, size: int | None = None,
                 resize: str = "square", original: bool = False):
        from xlearner import tasks

        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.task = tasks.get(task)
        self.pipeline = pipeline
        self.size, self.resize, self.original = size, resize, bool(original) and self.task.dense

    def _meta(self, image: torch.Tensor, target: dict) -> dict:
        h, w = (int(v) for v in image.shape[-2:])
        input_size = keep_ratio_shape(h, w, self.size) if self.resize == "keep_ratio" else (self.size, self.size)
        return {"orig_size": (h, w), "input_size": tuple(input_size), "image_id": target.get("image_id"),
                **self.task.original_target(target)}

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        meta = self._meta(image, target) if self.original else None
        out, result = self.task.apply_transform(self.pipeline, tv_tensors.Image(image), target)
        if meta is not None:
            result["meta"] = meta
        return out, result

    def __repr__(self) -> str:
        return f"TaskTransform({self.task.name}, {self.resize}, {self.pipeline})"


def build_transform(task: str, size: int, train: bool, augment: AugmentConfig | None = None,
                    resize: str = "square", original: bool = False) -> TaskTransform:
    """square: train RandomResizedCrop (if augment.random_resized_crop) else Resize, then optional
    hflip; eval Resize((size, size)).
    keep_ratio: train with a crop scale range (a, b) jitters the ratio-kept image to 1/sqrt(b) ..
    1/sqrt(a) times the fitted size and takes a random size x size window, padding where the image
    is smaller (the same zoom range as a crop of area fraction a..b, without distortion); without
    one, and at eval, the longer side goes to ``size``; then optional hflip, then pad to size x size.
    det drops boxes made degenerate by a crop (SanitizeBoundingBoxes). ``original``: see TaskTransform.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    augment = augment or AugmentConfig()
    ops: list[v2.Transform] = []
    crop = train and augment.random_resized_crop is not None
    if resize == "square":
        if crop:
            ops.append(v2.RandomResizedCrop((size, size), scale=tuple(augment.random_resized_crop), antialias=True))
        else:
            ops.append(v2.Resize((size, size), antialias=True))
    elif crop:
        a, b = augment.random_resized_crop
        ops += [v2.ScaleJitter((size, size), scale_range=(1 / math.sqrt(b), 1 / math.sqrt(a)), antialias=True),
                v2.RandomCrop(size, pad_if_needed=True,
                              fill={tv_tensors.Image: list(PAD_FILL), tv_tensors.Mask: IGNORE_INDEX})]
    else:
        ops.append(KeepRatioResize(size))
    if train and augment.hflip:
        ops.append(v2.RandomHorizontalFlip(0.5))
    from xlearner import tasks

    ops += tasks.get(task).extra_ops()  # det: drop boxes a crop made degenerate
    if resize == "keep_ratio":
        ops.append(PadTo(size))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return TaskTransform(task, v2.Compose(ops), size=size, resize=resize, original=original and not train)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Float normalised (3,H,W) or (B,3,H,W) -> uint8, for drawing."""
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return ((image * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
