"""Evaluation metrics: top-1 accuracy, COCO box mAP (pycocotools), mean IoU.

All metrics return fractions in [0, 1]; the report multiplies by 100 ("points").

``DetEvaluator`` and ``SegEvaluator`` stream the predictions of a split (in-training validation
and transfer both use them). For data a user brings, batches carry ``meta`` and the split is
scored the way published numbers are: boxes taken back to each image's original pixels and
scored by pycocotools against the user's own COCO file (crowd regions, COCO's areas and image ids
as given; AP, AP50, AP75, APs, APm, APl), and segmentation logits upsampled to each mask's
original size before the confusion matrix (mIoU and per-class IoU). Embedded datasets carry no
``meta`` and are scored as before, at the network's input size.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from xlearner.targets import boxes_to_original, logits_to_original


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
    """COCO box mAP@[.5:.95], AP50, and AP and recall at IoU 0.4 (pycocotools conventions, maxDets 100).

    Returns 0.0 (never -1) when there is no ground truth or no detection at all.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, results = to_coco(predictions, targets, num_classes)
    if not gt["annotations"] or not results:
        return {"mAP": 0.0, "AP50": 0.0, "AP40": 0.0, "recall40": 0.0}
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
    return {"mAP": max(stats[0], 0.0), "AP50": max(stats[1], 0.0), **_at_iou(coco_gt, coco_dt, 0.4)}


def _at_iou(coco_gt, coco_dt, iou: float, img_ids: list[int] | None = None) -> dict[str, float]:
    """AP and recall (all areas, maxDets 100) at one IoU threshold, e.g. 0.4: the threshold tree-crown
    benchmarks (DeepForest's NEON) report box recall at. A second COCOeval, so that mAP's ten
    thresholds stay pycocotools' own."""
    from pycocotools.cocoeval import COCOeval

    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    ev.params.iouThrs = np.array([iou])
    if img_ids is not None:
        ev.params.imgIds = img_ids
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    prec, rec = ev.eval["precision"][0, :, :, 0, -1], ev.eval["recall"][0, :, 0, -1]
    tag = f"{round(100 * iou)}"
    return {f"AP{tag}": float(prec[prec > -1].mean()) if (prec > -1).any() else 0.0,
            f"recall{tag}": float(rec[rec > -1].mean()) if (rec > -1).any() else 0.0}


COCO_STATS = ("mAP", "AP50", "AP75", "APs", "APm", "APl")
"""The first six numbers of pycocotools' bbox summary, in its order."""


@functools.lru_cache(maxsize=4)
def _load_coco_cached(path: str, size: int, mtime_ns: int):
    from pycocotools.coco import COCO

    data = json.loads(Path(path).read_text())
    for ann in data.get("annotations", []) or []:
        # hand-made files may lack these; pycocotools needs them (COCO's own files have both)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann and isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_coco(path: str | Path):
    """pycocotools COCO of an annotation file, cached by (path, size, mtime): validation reads it once."""
    st = os.stat(path)
    return _load_coco_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def coco_eval(coco_gt, results: list[dict], img_ids: Sequence[int]) -> dict[str, float | None]:
    """pycocotools bbox evaluation of ``results`` on ``img_ids`` of ``coco_gt``: AP, AP50, AP75, APs,
    APm, APl (maxDets 100), and AP40/recall40 (``_at_iou``). AP/AP50/AP75 are 0.0 without detections; APs/APm/APl are None when
    no ground truth of that size is among the images (pycocotools says -1)."""
    from pycocotools.cocoeval import COCOeval

    img_ids = sorted({int(i) for i in img_ids})
    if not results or not img_ids:
        return {**{k: 0.0 for k in COCO_STATS}, "AP40": 0.0, "recall40": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {}
    for k, v in zip(COCO_STATS, ev.stats[:6]):
        v = float(v)
        out[k] = max(v, 0.0) if k in ("mAP", "AP50", "AP75") else (v if v >= 0 else None)
    return {**out, **_at_iou(coco_gt, coco_dt, 0.4, img_ids)}


def _cpu(d: dict) -> dict:
    return {k: (v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu())
            if isinstance(v, torch.Tensor) else v for k, v in d.items()}


class DetEvaluator:
    """Detections of one split -> COCO metrics; ``update(detections, batch)``, then ``compute()``.

    Batches with ``meta``: boxes go back to each image's original pixels; with ``coco_file``
    (a COCO source) they are written as results against that file (category ids
    ``category_ids[label]``, the image ids of the file) and scored on the images seen, else
    against the reader's original boxes. Batches without ``meta`` (embedded data): in-memory
    ground truth at the input size, ``coco_map`` as before (mAP and AP50 only).
    """

    def __init__(self, num_classes: int, coco_file: str | Path | None = None,
                 category_ids: Sequence[int] | None = None):
        self.num_classes = int(num_classes)
        self.coco_file = coco_file
        self.category_ids = list(category_ids) if category_ids is not None else None
        self.preds: list[dict] = []
        self.targets: list[dict] = []
        self.results: list[dict] = []
        self.img_ids: list[int] = []
        self.original = False

    def update(self, detections: Sequence[dict], batch: dict) -> None:
        metas = batch.get("meta")
        dets = [_cpu(d) for d in detections]
        if metas is None:
            self.preds.extend(dets)
            self.targets.extend(_cpu(t) for t in batch["targets"])
            return
        self.original = True
        for d, m in zip(dets, metas):
            boxes = boxes_to_original(d["boxes"].reshape(-1, 4), m)
            if self.coco_file is not None and m.get("image_id") is not None:
                iid = int(m["image_id"])
                self.img_ids.append(iid)
                for b, s, lab in zip(boxes.tolist(), d["scores"].tolist(), d["labels"].tolist()):
                    cid = self.category_ids[int(lab)] if self.category_ids else int(lab) + 1
                    self.results.append({"image_id": iid, "category_id": int(cid), "score": float(s),
                                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
            else:
                self.preds.append({"boxes": boxes, "scores": d["scores"], "labels": d["labels"]})
                self.targets.append({"boxes": m["boxes"], "labels": m["labels"]})

    def compute(self) -> dict[str, float]:
        if not self.original:
            return coco_map(self.preds, self.targets, self.num_classes)
        if self.img_ids:
            return coco_eval(load_coco(self.coco_file), self.results, self.img_ids)
        from pycocotools.coco import COCO

        gt, results = to_coco(self.preds, self.targets, self.num_classes)
        if not gt["annotations"]:
            return {k: 0.0 for k in COCO_STATS}
        coco_gt = COCO()
        coco_gt.dataset = gt
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt.createIndex()
        return coco_eval(coco_gt, results, [im["id"] for im in gt["images"]])


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


class SegEvaluator:
    """Segmentation logits of one split -> mIoU, pixel accuracy (and per-class IoU at original size).

    Batches with ``meta``: each image's logits lose the padding and are upsampled (bilinear) to its
    original mask size before the argmax, as ADE20K/Cityscapes results are reported. Batches
    without ``meta`` (embedded data): argmax at the batch masks' size, as before.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, ignore_index: int = 255):
        self.cm = ConfusionMatrix(num_classes, ignore_index)
        self.class_names = list(class_names) if class_names else [str(k) for k in range(int(num_classes))]
        self.original = False

    def update(self, logits: torch.Tensor, batch: dict) -> None:
        metas = batch.get("meta")
        if metas is None:
            masks = batch["masks"]
            if logits.shape[-2:] != masks.shape[-2:]:
                logits = torch.nn.functional.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear",
                                                         align_corners=False)
            self.cm.update(logits.argmax(1).cpu(), masks.cpu())
            return
        self.original = True
        for lg, m in zip(logits, metas):
            self.cm.update(logits_to_original(lg, m).argmax(0).cpu(), m["mask"])

    def compute(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mIoU": self.cm.miou(), "pixel_acc": self.cm.pixel_accuracy()}
        if self.original:
            out["per_class_iou"] = {n: (None if math.isnan(v) else float(v))
                                    for n, v in zip(self.class_names, self.cm.iou())}
        return out


def miou(pred: Any, target: Any, num_classes: int, ignore_index: int = 255) -> float:
    """Mean IoU over classes present in prediction or target (pixels == ignore_index skipped)."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    cm.update(pred, target)
    return cm.miou()
