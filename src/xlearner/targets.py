"""What the numbers of a target mean, for every layer that reads one: the ignore label, and the
way back from the network input's pixels to the original image's.

A leaf module (torch only): the data layer (readers, transforms, schema), the tasks and the
metrics all import it, so the metrics can score at the original size without importing the data
layer, and the tasks can name the ignore label without importing the schema that calls them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF

IGNORE_INDEX = 255
"""Mask value of a pixel that is not scored and gives no loss (segmentation)."""


def boxes_to_original(boxes: torch.Tensor, meta: dict) -> torch.Tensor:
    """xyxy boxes in the network input's pixels -> the original image's pixels (clipped to it)."""
    (h, w), (nh, nw) = meta["orig_size"], meta["input_size"]
    out = boxes.float() * boxes.new_tensor([w / nw, h / nh, w / nw, h / nh], dtype=torch.float32)
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out


def logits_to_original(logits: torch.Tensor, meta: dict) -> torch.Tensor:
    """(K, H_in, W_in) logits of one image -> (K, H, W) at its original size: the padding is cut
    off, the rest upsampled bilinearly (the way published segmentation results are scored)."""
    (h, w), (nh, nw) = meta["orig_size"], meta["input_size"]
    valid = logits[:, :nh, :nw].float()
    if (nh, nw) == (h, w):
        return valid
    return TF.interpolate(valid[None], size=(h, w), mode="bilinear", align_corners=False)[0]
