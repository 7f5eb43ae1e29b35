"""Task-aware transforms (torchvision.transforms.v2) that keep boxes and masks aligned with the image.

``build_transform(task, size, train, augment)`` returns ``f(image_uint8, target) -> (image, target)``
with a float32 image normalised by the ImageNet mean/std. Boxes travel as
``tv_tensors.BoundingBoxes`` (XYXY, canvas size) and masks as ``tv_tensors.Mask`` (resized
nearest), so every geometric op moves them together with the pixels. Randomness comes from
torch's global RNG: the loader seeds it per sample so augmentation is reproducible.
"""
from __future__ import annotations

from typing import Callable

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from xlearner.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


class TaskTransform:
    """Picklable callable (DataLoader workers) wrapping a v2 pipeline for one task."""

    def __init__(self, task: str, pipeline: v2.Transform):
        if task not in ("cls", "det", "seg"):
            raise ValueError(f"task must be cls, det or seg, got {task!r}")
        self.task = task
        self.pipeline = pipeline

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        img = tv_tensors.Image(image)
        if self.task == "cls":
            out = self.pipeline(img)
            return out.as_subclass(torch.Tensor), {"label": int(target["label"])}
        if self.task == "det":
            boxes = tv_tensors.BoundingBoxes(
                torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4),
                format="XYXY", canvas_size=tuple(image.shape[-2:]))
            out, tgt = self.pipeline(img, {"boxes": boxes, "labels": torch.as_tensor(target["labels"], dtype=torch.int64)})
            return out.as_subclass(torch.Tensor), {
                "boxes": tgt["boxes"].as_subclass(torch.Tensor).to(torch.float32),
                "labels": tgt["labels"].to(torch.int64)}
        mask = tv_tensors.Mask(torch.as_tensor(target["mask"]))
        out, m = self.pipeline(img, mask)
        return out.as_subclass(torch.Tensor), {"mask": m.as_subclass(torch.Tensor).to(torch.int64)}

    def __repr__(self) -> str:
        return f"TaskTransform({self.task}, {self.pipeline})"


def build_transform(task: str, size: int, train: bool, augment: AugmentConfig | None = None) -> TaskTransform:
    """train: RandomResizedCrop (if augment.random_resized_crop) else Resize, then optional hflip;
    eval: Resize((size, size)). det drops boxes made degenerate by a crop (SanitizeBoundingBoxes)."""
    augment = augment or AugmentConfig()
    ops: list[v2.Transform] = []
    if train and augment.random_resized_crop is not None:
        ops.append(v2.RandomResizedCrop((size, size), scale=tuple(augment.random_resized_crop), antialias=True))
    else:
        ops.append(v2.Resize((size, size), antialias=True))
    if train and augment.hflip:
        ops.append(v2.RandomHorizontalFlip(0.5))
    if task == "det":
        ops.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return TaskTransform(task, v2.Compose(ops))


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Float normalised (3,H,W) or (B,3,H,W) -> uint8, for drawing."""
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return ((image * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
