"""Detection transfer: the det neck (FPN P3..P7) + DetHead (torchvision FCOS) trained on a backbone.

``frozen``: the backbone is frozen (eval mode, no gradient); its feature maps are computed once
per training image (eval transform: resize only, no augmentation) and the neck + head are
trained on them. ``finetune``: backbone (lr/10) + neck + head trained end to end with the
run's det augmentation. AdamW, warmup + cosine, ``steps`` steps; nothing is chosen on test.
Test: COCO box mAP@[.5:.95] and AP50 (pycocotools); with ``original`` (data a user brings) the
boxes go back to each image's original pixels and are scored against its own annotations (a
COCO source: its annotation file), adding AP75/APs/APm/APl (``metrics.DetEvaluator``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from xlearner.metrics import DetEvaluator
from xlearner.transfer.features import (finetune_end_to_end, freeze, infinite_indices, precompute_maps,
                                        progress, train_head)


def build_det(backbone: nn.Module, num_classes: int, fpn_channels: int, seed: int, num_convs: int = 4,
              image_size: int | None = None):
    from xlearner.models.heads import DetHead, build_det_neck

    torch.manual_seed(seed)
    neck, strides = build_det_neck(list(backbone.channels), list(backbone.strides), fpn_channels, image_size)
    head = DetHead(fpn_channels, num_classes, strides, num_convs=num_convs)
    return neck, head


def transfer_det(backbone: nn.Module, train_ds, test_ds, num_classes: int, *, size: int, steps: int, lr: float,
                 batch_size: int, seed: int, mode: str = "frozen", fpn_channels: int = 64, augment=None,
                 cache: dict | None = None, show_progress: bool = True, head_convs: int = 4,
                 resize: str = "square", original: bool = False) -> dict[str, Any]:
    """Train neck + DetHead, return {"mAP", "AP50", "final_loss"} (+ AP75/APs/APm/APl with
    ``original``) on ``test_ds``. ``resize``: the source's square | keep_ratio.

    ``cache`` (frozen mode): a dict reused across seeds holding the precomputed train/test maps.
    """
    dev = next(backbone.parameters()).device
    neck, head = build_det(backbone, num_classes, fpn_channels, seed, head_convs, size)
    neck.to(dev), head.to(dev)
    neck.train(), head.train()
    image_size = (size, size)
    bs = max(1, min(batch_size, len(train_ds)))

    if mode == "frozen":
        freeze(backbone)
        cache = cache if cache is not None else {}
        if "train" not in cache:
            cache["train"] = precompute_maps(backbone, train_ds, "det", size, show_progress=show_progress,
                                             desc="det features (train)", resize=resize)
        maps, targets, _ = cache["train"]
        order = infinite_indices(len(targets), bs, seed)

        def step(_):
            idx = next(order)
            feats = [m[idx].to(dev, torch.float32) for m in maps]
            tg = [{k: v.to(dev) for k, v in targets[int(i)].items()} for i in idx]
            return sum(head.losses(neck(feats), image_size, tg).values())

        losses = train_head(step, neck, head, lr=lr, steps=steps, show_progress=show_progress, desc="det head")
    elif mode == "finetune":
        def batch_loss(b):
            tg = (b["boxes"].to(dev), b["labels"].to(dev))  # the training loader's padded layout
            return sum(head.losses(neck(backbone(b["images"].to(dev))), image_size, tg).values())

        losses = finetune_end_to_end(batch_loss, backbone, neck, head, train_ds, "det", size=size, batch_size=bs,
                                     seed=seed, lr=lr, steps=steps, augment=augment,
                                     show_progress=show_progress, desc="det finetune", resize=resize)
    else:
        raise ValueError(f"det transfer mode must be frozen or finetune, got {mode!r}")

    backbone.eval(), neck.eval(), head.eval()
    scorer = DetEvaluator(num_classes, getattr(test_ds, "coco_file", None), getattr(test_ds, "category_ids", None))
    with torch.no_grad():
        if mode == "frozen":
            if "test" not in cache:
                cache["test"] = precompute_maps(backbone, test_ds, "det", size, show_progress=show_progress,
                                                desc="det features (test)", resize=resize, original=original)
            tmaps, tt, tmeta = cache["test"]
            for i in range(0, len(tt), 64):
                feats = [m[i:i + 64].to(dev, torch.float32) for m in tmaps]
                fb = feats
                if fb[0].shape[0] == 1:  # GroupNorm of a 1x1 level refuses one image: run two copies
                    fb = [torch.cat([f, f]) for f in feats]
                scorer.update(head.detect(neck(fb), image_size)[:feats[0].shape[0]],
                              {"targets": tt[i:i + 64], **({"meta": tmeta[i:i + 64]} if tmeta is not None else {})})
        else:
            from xlearner.data.loader import eval_loader

            ev = eval_loader(test_ds, "det", size, 64, resize=resize, original=original)
            for b in progress(ev, total=len(ev), desc="det test", enable=show_progress):
                x = b["images"].to(dev)
                x1 = torch.cat([x, x]) if x.shape[0] == 1 else x  # one image: see the frozen branch
                scorer.update(head.detect(neck(backbone(x1)), image_size)[:x.shape[0]], b)
    res = scorer.compute()
    res["final_loss"] = losses[-1] if losses else None
    return res
