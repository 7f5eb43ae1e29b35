"""Evaluation metrics: top-1 accuracy, COCO box mAP (pycocotools), mean IoU.

All metrics return fractions in [0, 1]; the report multiplies by 100 ("points").
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Sequence

import numpy as np
import torch


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ----------------------------------------------------------------------------- top-1
def top1(logits_or_pred: Any, labels: Any) -> float:
    """Top-1 accuracy. ``logits_or_pred``: (N, K) scores or (N,) predicted indices."""
    pred = _np(logits_or_pred)
    labels = _np(labels).reshape(-1)
    if pred.ndim == 2:
        pred = pred.argmax(axis=1)
    pred = pred.reshape(-1)
    if labels.size == 0:
        return 0.0
    if pred.shape != labels.shape:
        raise ValueError(f"top1: {pred.shape[0]} predictions for {labels.shape[0]} labels")
    return float((pred == labels).mean())


# ----------------------------------------------------------------------------- COCO mAP
def to_coco(predictions: Sequence[dict], targets: Sequence[dict], num_classes: int
            ) -> tuple[dict, list[dict]]:
    """COCO-format ground truth (dict) and detection results (list) for in-memory boxes.

    Boxes are xyxy pixels; COCO wants xywh. Category ids are ``label + 1`` (COCO ids
    start at 1). Image ids are list positions + 1.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"coco_map: {len(predictions)} predictions for {len(targets)} images")
    images, annotations, results = [], [], []
    ann_id = 1
    for i, (pred, tgt) in enumerate(zip(predictions, targets)):
        img_id = i + 1
        boxes = _np(tgt["boxes"]).reshape(-1, 4).astype(np.float64)
        labels = _np(tgt["labels"]).reshape(-1).astype(np.int64)
        # width/height of the image are unknown here; COCOeval does not use them
        images.append({"id": img_id, "width": 0, "height": 0})
        for b, lab in zip(boxes, labels):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            annotations.append({
                "id": ann_id, "image_id": img_id, "category_id": int(lab) + 1,
                "bbox": [float(b[0]), float(b[1]), w, h], "area": max(w, 0.0) * max(h, 0.0),
                "iscrowd": 0,
            })
            ann_id += 1
        pboxes = _np(pred["boxes"]).reshape(-1, 4).astype(np.float64)
        pscores = _np(pred["scores"]).reshape(-1).astype(np.float64)
        plabels = _np(pred["labels"]).reshape(-1).astype(np.int64)
        for b, s, lab in zip(pboxes, pscores, plabels):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            results.append({"image_id": img_id, "category_id": int(lab) + 1,
                            "bbox": [float(b[0]), float(b[1]), w, h], "score": float(s)})
    categories = [{"id": k + 1, "name": str(k)} for k in range(int(num_classes))]
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return gt, results


def coco_map(predictions: Sequence[dict], targets: Sequence[dict], num_classes: int) -> dict[str, float]:
    """COCO box mAP@[.5:.95] and AP50 (pycocotools conventions, maxDets 100).

    Returns 0.0 (never -1) when there is no ground truth or no detection at all.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, results = to_coco(predictions, targets, num_classes)
    if not gt["annotations"] or not results:
        return {"mAP": 0.0, "AP50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(v) for v in ev.stats]
    return {"mAP": max(stats[0], 0.0), "AP50": max(stats[1], 0.0)}


# ----------------------------------------------------------------------------- mIoU
class ConfusionMatrix:
    """Streaming confusion matrix for semantic segmentation (rows: target, cols: pred)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.mat = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: Any, target: Any) -> None:
        pred = _np(pred).reshape(-1).astype(np.int64)
        target = _np(target).reshape(-1).astype(np.int64)
        if pred.shape != target.shape:
            raise ValueError(f"miou: prediction has {pred.size} pixels, target {target.size}")
        k = self.num_classes
        keep = (target != self.ignore_index) & (target >= 0) & (target < k)
        pred, target = pred[keep], target[keep]
        pred = np.clip(pred, 0, k - 1)
        self.mat += np.bincount(target * k + pred, minlength=k * k).reshape(k, k)

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for classes absent from both prediction and target."""
        tp = np.diag(self.mat).astype(np.float64)
        union = self.mat.sum(0) + self.mat.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        iou = self.iou()
        valid = ~np.isnan(iou)
        return float(iou[valid].mean()) if valid.any() else 0.0

    def pixel_accuracy(self) -> float:
        total = self.mat.sum()
        return float(np.trace(self.mat) / total) if total else 0.0


def miou(pred: Any, target: Any, num_classes: int, ignore_index: int = 255) -> float:
    """Mean IoU over classes present in prediction or target (pixels == ignore_index skipped)."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    cm.update(pred, target)
    return cm.miou()
