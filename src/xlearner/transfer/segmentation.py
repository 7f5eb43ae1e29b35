"""Segmentation transfer: FPNNeck + SegHead (Panoptic-FPN semantic head) trained on a backbone.

Same protocol as detection: ``frozen`` (backbone frozen, feature maps computed once per image,
no augmentation) or ``finetune`` (end to end, backbone at lr/10, the run's seg augmentation);
per-pixel cross-entropy ignoring 255; test mIoU (confusion matrix over the whole test split; with
``original``, at each mask's original size, with per-class IoU: ``metrics.SegEvaluator``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xlearner.metrics import SegEvaluator
from xlearner.transfer.features import (finetune_end_to_end, freeze, infinite_indices, precompute_maps,
                                        progress, train_head)


def build_seg(backbone: nn.Module, num_classes: int, fpn_channels: int, seed: int, head: str = "fpn"):
    """``fpn``: FPN neck + Panoptic-FPN head; ``linear``: a linear dense probe on the raw features."""
    from xlearner.models.heads import FPNNeck, LinearSegHead, SegHead, PassFeatures

    torch.manual_seed(seed)
    if head == "linear":
        return PassFeatures(), LinearSegHead(list(backbone.channels), num_classes, list(backbone.strides))
    if head != "fpn":
        raise ValueError(f"seg transfer head must be fpn or linear, got {head!r}")
    neck = FPNNeck(list(backbone.channels), fpn_channels)
    return neck, SegHead(fpn_channels, num_classes, list(backbone.strides))


def transfer_seg(backbone: nn.Module, train_ds, test_ds, num_classes: int, *, size: int, steps: int, lr: float,
                 batch_size: int, seed: int, mode: str = "frozen", fpn_channels: int = 64, augment=None,
                 cache: dict | None = None, show_progress: bool = True, resize: str = "square",
                 original: bool = False, head: str = "fpn") -> dict[str, Any]:
    """Train neck + head (``fpn`` or ``linear``), return {"mIoU", "pixel_acc", "final_loss"} (+ "per_class_iou"
    with ``original``) on ``test_ds``. ``resize``: the source's square | keep_ratio."""
    dev = next(backbone.parameters()).device
    neck, head = build_seg(backbone, num_classes, fpn_channels, seed, head)
    neck.to(dev), head.to(dev)
    neck.train(), head.train()
    image_size = (size, size)
    bs = max(1, min(batch_size, len(train_ds)))

    def seg_loss(logits, masks):
        return F.cross_entropy(logits, masks, ignore_index=255)

    if mode == "frozen":
        freeze(backbone)
        cache = cache if cache is not None else {}
        if "train" not in cache:
            maps, masks, _ = precompute_maps(backbone, train_ds, "seg", size, show_progress=show_progress,
                                             desc="seg features (train)", resize=resize)
            cache["train"] = (maps, torch.stack(masks) if masks else torch.zeros(0, size, size, dtype=torch.long))
        maps, masks = cache["train"]
        order = infinite_indices(len(masks), bs, seed)

        def step(_):
            idx = next(order)
            feats = [m[idx].to(dev, torch.float32) for m in maps]
            return seg_loss(head(neck(feats), image_size), masks[idx].to(dev))

        losses = train_head(step, neck, head, lr=lr, steps=steps, show_progress=show_progress, desc="seg head")
    elif mode == "finetune":
        def batch_loss(b):
            return seg_loss(head(neck(backbone(b["images"].to(dev))), image_size), b["masks"].to(dev))

        losses = finetune_end_to_end(batch_loss, backbone, neck, head, train_ds, "seg", size=size, batch_size=bs,
                                     seed=seed, lr=lr, steps=steps, augment=augment,
                                     show_progress=show_progress, desc="seg finetune", resize=resize)
    else:
        raise ValueError(f"seg transfer mode must be frozen or finetune, got {mode!r}")

    backbone.eval(), neck.eval(), head.eval()
    scorer = SegEvaluator(num_classes, getattr(test_ds, "class_names", None), ignore_index=255)
    with torch.no_grad():
        if mode == "frozen":
            if "test" not in cache:
                cache["test"] = precompute_maps(backbone, test_ds, "seg", size, show_progress=show_progress,
                                                desc="seg features (test)", resize=resize, original=original)
            tmaps, tmasks, tmeta = cache["test"]
            for i in range(0, len(tmasks), 64):
                feats = [m[i:i + 64].to(dev, torch.float32) for m in tmaps]
                batch = {"masks": torch.stack(list(tmasks[i:i + 64]))}
                if tmeta is not None:
                    batch["meta"] = tmeta[i:i + 64]
                scorer.update(head(neck(feats), image_size), batch)
        else:
            from xlearner.data.loader import eval_loader

            ev = eval_loader(test_ds, "seg", size, 64, resize=resize, original=original)
            for b in progress(ev, total=len(ev), desc="seg test", enable=show_progress):
                scorer.update(head(neck(backbone(b["images"].to(dev))), image_size), b)
    return {**scorer.compute(), "final_loss": losses[-1] if losses else None}
