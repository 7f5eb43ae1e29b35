"""The one sample schema every reader yields, and the policy for bad records.

A sample is ``(image, target)``:
- image: ``torch.uint8`` tensor of shape ``(3, H, W)`` (grey images are repeated to 3 channels);
- target: ``{"label": int}`` for cls, ``{"boxes": float32 (N, 4) xyxy in pixels,
  "labels": int64 (N,)}`` for det, ``{"mask": int64 (H, W), 255 = ignore}`` for seg.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = 255


class BadSampleError(ValueError):
    """A record that cannot be used; the message names the file, the record and the fix."""


@dataclass
class BadSampleLog:
    """Collects records skipped under ``on_bad_sample: skip`` so training can print the count."""

    source: str
    policy: str = "error"
    skipped: list[str] = field(default_factory=list)

    def report(self, message: str) -> None:
        """Raise under the 'error' policy; record and go on under 'skip'."""
        if self.policy == "error":
            raise BadSampleError(
                f"{message}\n  (source '{self.source}'; fix the record, or set on_bad_sample: skip "
                f"in this source's config to skip such records and count them)"
            )
        self.skipped.append(message)

    @property
    def count(self) -> int:
        return len(self.skipped)


def check_image(image: torch.Tensor, where: str) -> None:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise BadSampleError(f"{where}: image must be uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}")


def validate_target(task: str, image: torch.Tensor, target: dict, num_classes: int, where: str) -> str | None:
    """Return a description of what is wrong with a target, or None when it is sound."""
    h, w = image.shape[-2:]
    if task == "cls":
        label = target.get("label")
        if not isinstance(label, int) or not 0 <= label < num_classes:
            return f"{where}: label {label!r} is not in 0..{num_classes - 1}"
    elif task == "det":
        boxes, labels = target["boxes"], target["labels"]
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or len(boxes) != len(labels):
            return f"{where}: boxes must be (N, 4) with one label each, got {tuple(boxes.shape)} and {len(labels)} labels"
        for i, (b, lab) in enumerate(zip(boxes.tolist(), labels.tolist())):
            x1, y1, x2, y2 = b
            if x2 <= x1 or y2 <= y1:
                return f"{where}: box {i} {b} has x2 <= x1 or y2 <= y1 (boxes are x1,y1,x2,y2 in pixels)"
            if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
                return f"{where}: box {i} {b} lies outside the {w}x{h} image"
            if not 0 <= lab < num_classes:
                return f"{where}: box {i} label {lab} is not in 0..{num_classes - 1}"
    elif task == "seg":
        mask = target["mask"]
        if tuple(mask.shape) != (h, w):
            return f"{where}: mask is {tuple(mask.shape)} but the image is {(h, w)}"
        bad = mask[(mask >= num_classes) & (mask != IGNORE_INDEX)]
        if bad.numel():
            return (f"{where}: mask holds value {int(bad[0])} but there are {num_classes} classes "
                    f"(values must be 0..{num_classes - 1}, or 255 = ignore)")
    return None
