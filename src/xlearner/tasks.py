"""Tasks: everything that differs between classification, detection and segmentation, in one place.

A ``Task`` object holds, for its task type, the neck and head factories, the loss, the evaluation
output, the metric, the batch layout (collate), how a transform carries its targets and how a
record is checked. Stages, nets, the loader, transforms, validation and transfer call these
methods; none of them compares task names. A new task is one subclass and one ``register``
call (tests/test_tasks.py trains an msmt run on a toy regression task that way).

The batch layouts (``collate``): cls ``{"images", "labels" (B,)}``; det ``{"images", "targets":
[{"boxes" (n,4) xyxy px, "labels" (n,)}]}`` or, padded for training, ``{"images", "boxes"
(B,M,4), "labels" (B,M), -1 = padding}``, to which the training loader's workers add FCOS's
matched targets ``"fcos_labels", "fcos_ltrb", "fcos_ctr", "fcos_weight", "fcos_norm"``
(``target_encoder``); seg ``{"images", "masks" (B,H,W), 255 = ignore}``, to which they add the point
loss's drawn pixels ``"seg_point_grid", "seg_point_labels", "seg_point_norm"``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlearner.targets import IGNORE_INDEX


@dataclass(frozen=True)
class HeadOptions:
    """Sizes the task necks and heads read (from the run or transfer config)."""

    fpn_channels: int = 64
    det_head_convs: int = 4
    image_sizes: Mapping[str, int] = field(default_factory=dict)
    """Task -> the largest image side of its sources (det: it picks FCOS's levels, ``heads.det_levels``)."""
    seg_head: str = "fpn"
    """``fpn``: Panoptic-FPN head on an FPN; ``linear``: linear dense probe on the raw features."""
    seg_background_weight: float = 1.0
    """Weight of class 0 (background) in the segmentation cross-entropy."""
    seg_loss_points: int = 0
    """Segmentation CE on this many random pixels per image (:func:`point_seg_loss`); 0: every pixel."""


def image_size_of(images: Tensor) -> tuple[int, int]:
    return int(images.shape[-2]), int(images.shape[-1])


class Task:
    """One task type. Subclasses set the class attributes and implement the methods.

    ``metric``: key of the headline score in ``evaluator().compute()`` (a fraction, higher is
    better unless ``higher_is_better`` is False). ``dense``: targets carry geometry (boxes,
    masks), so user data keeps its aspect ratio and is scored at the original size.
    ``transfer_modes``: how a backbone is transferred to a dataset of this task (the first is
    the default); ``frozen`` and ``finetune`` train ``build_neck`` + ``build_head`` with ``loss``.
    """

    name: str = ""
    title: str = ""
    metric: str = ""
    metric_title: str = ""
    report_columns: tuple[str, ...] = ()
    """Secondary figures of the evaluator shown beside the metric in the report."""
    fpn_channels_multiple: int = 1
    """``fpn_channels`` must be a multiple of this where the task's head is built (det: FCOS's GroupNorm(32))."""
    higher_is_better: bool = True
    dense: bool = False
    transfer_modes: tuple[str, ...] = ("frozen", "finetune")
    image_logits: bool = False
    """``predict`` gives one logit vector per image (the squeeze stage's KD on logits applies)."""
    reads: str | None = None
    """The task of the datasets it reads (None: its own name); a toy task may read cls data."""

    # --- model -------------------------------------------------------------------------
    def build_neck(self, channels: list[int], strides: list[int], opts: HeadOptions) -> nn.Module:
        raise NotImplementedError

    def build_head(self, neck: nn.Module, num_classes: int, channels: list[int], strides: list[int],
                   opts: HeadOptions) -> nn.Module:
        raise NotImplementedError

    def loss(self, head: nn.Module, neck_out: Any, batch: dict) -> Tensor:
        raise NotImplementedError

    def predict(self, head: nn.Module, neck_out: Any, images: Tensor) -> Any:
        """What the evaluator's ``update`` takes, for a batch of ``images``."""
        raise NotImplementedError

    def target_encoder(self, head: nn.Module, image_size: int) -> Callable[[dict], dict] | None:
        """What the training loader's workers may add to a collated batch of ``image_size`` images for
        ``loss`` to read: the part of the loss that reads targets only, taken off the step (None: nothing)."""
        return None

    # --- evaluation ----------------------------------------------------------------------
    def evaluator(self, num_classes: int, dataset: Any = None):
        """A fresh accumulator: ``update(prediction, batch)``, then ``compute() -> dict``."""
        raise NotImplementedError

    # --- data ----------------------------------------------------------------------------
    def collate(self, samples: list, padded: bool = False) -> dict:
        """Samples ``(image, target)`` -> one batch (see the module docstring)."""
        raise NotImplementedError

    def extra_ops(self) -> list:
        """torchvision v2 ops appended after the geometric ones (det: drop degenerate boxes)."""
        return []

    def apply_transform(self, pipeline, image, target: dict) -> tuple[Tensor, dict]:
        """Run a v2 ``pipeline`` on a ``tv_tensors.Image`` and the target it must stay aligned with."""
        out = pipeline(image)
        return out.as_subclass(torch.Tensor), dict(target)

    def original_target(self, target: dict) -> dict:
        """The target at the original size, kept in ``meta`` to score there (dense tasks)."""
        return {}

    def check_target(self, image: Tensor, target: dict, num_classes: int, where: str) -> str | None:
        """What is wrong with a record's target, or None when it is sound."""
        return None

    def to_record(self, target: dict) -> tuple[dict, dict[str, Tensor]]:
        """A target as a packed shard keeps it (`xlearner data pack`): JSON fields, and integer
        planes (image-sized, stored as PNGs) by name; ``from_record`` gives the target back exactly."""
        raise NotImplementedError(f"task {self.name} cannot be packed into shards")

    def from_record(self, meta: dict, planes: dict[str, Tensor]) -> dict:
        raise NotImplementedError(f"task {self.name} cannot be read from shards")

    def draw(self, image: Tensor, target: dict, class_names: Sequence[str], scale: float,
             style: "DrawStyle") -> tuple[Tensor, str, set[int]]:
        """``xlearner data show``: the (upscaled by ``scale``) uint8 image with its target drawn, a
        caption, and the classes to list in the figure's legend."""
        return image, ", ".join(f"{k}={v}" for k, v in target.items()), set()


@dataclass(frozen=True)
class DrawStyle:
    """How ``data show`` draws: ``colour(k)`` of class k, a TrueType font (or None) and its size."""

    colour: Any
    font: str | None = None
    font_size: int | None = None


# ----------------------------------------------------------------------------- cls
class Top1Evaluator:
    def __init__(self) -> None:
        self.correct = self.total = 0

    def update(self, logits: Tensor, batch: dict) -> None:
        labels = batch["labels"].to(logits.device)
        self.correct += int((logits.argmax(1) == labels).sum())
        self.total += int(labels.numel())

    def compute(self) -> dict[str, float]:
        return {"top1": self.correct / self.total if self.total else 0.0}


class ClsTask(Task):
    """Image classification: pooled last feature, a linear head per source, cross-entropy, top-1."""

    name, metric, dense = "cls", "top1", False
    title, metric_title = "classification", "top-1"
    image_logits = True
    transfer_modes = ("linear", "finetune")

    def build_neck(self, channels, strides, opts):
        from xlearner.models.heads import ClsNeck

        return ClsNeck()

    def build_head(self, neck, num_classes, channels, strides, opts):
        from xlearner.models.heads import ClsHead

        return ClsHead(channels[-1], num_classes)

    def loss(self, head, neck_out, batch):
        return F.cross_entropy(head(neck_out), batch["labels"])

    def predict(self, head, neck_out, images):
        return head(neck_out)

    def evaluator(self, num_classes, dataset=None):
        return Top1Evaluator()

    def collate(self, samples, padded=False):
        return {"images": torch.stack([s[0] for s in samples]),
                "labels": torch.tensor([int(s[1]["label"]) for s in samples], dtype=torch.int64)}

    def apply_transform(self, pipeline, image, target):
        return pipeline(image).as_subclass(torch.Tensor), {"label": int(target["label"])}

    def draw(self, image, target, class_names, scale, style):
        return image, class_names[target["label"]], set()

    def to_record(self, target):
        return {"label": int(target["label"])}, {}

    def from_record(self, meta, planes):
        return {"label": int(meta["label"])}

    def check_target(self, image, target, num_classes, where):
        label = target.get("label")
        if not isinstance(label, int) or not 0 <= label < num_classes:
            return f"{where}: label {label!r} is not in 0..{num_classes - 1}"
        return None


# ----------------------------------------------------------------------------- det
class DetTask(Task):
    """Object detection: FPN on FCOS's levels, torchvision's FCOS head, COCO mAP@[.5:.95]."""

    name, metric, dense = "det", "mAP", True
    title, metric_title, report_columns = "detection", "COCO mAP", ("AP50",)
    fpn_channels_multiple = 32

    def build_neck(self, channels, strides, opts):
        from xlearner.models.heads import build_det_neck

        neck, head_strides = build_det_neck(list(channels), list(strides), opts.fpn_channels,
                                             opts.image_sizes.get(self.name))
        neck.head_strides = head_strides  # the DetHead's anchors follow them
        return neck

    def build_head(self, neck, num_classes, channels, strides, opts):
        from xlearner.models.heads import DetHead

        return DetHead(opts.fpn_channels, num_classes, neck.head_strides, num_convs=opts.det_head_convs)

    def loss(self, head, neck_out, batch):
        from xlearner.models.heads import FCOS_TARGET_KEYS

        if FCOS_TARGET_KEYS[0] in batch:  # the training loader's matched targets (target_encoder)
            targets = batch  # the boxes are read only if the grids differ: a compiled step sees no box count
        else:  # padded boxes/labels, or a per-image targets list
            targets = batch["targets"] if "targets" in batch else (batch["boxes"], batch["labels"])
        cls, reg, ctr = head.losses(neck_out, image_size_of(batch["images"]), targets).values()
        return cls + reg + ctr  # not sum(): its start, 0 + cls, is one more operator

    def target_encoder(self, head, image_size):
        return head.target_encoder(image_size)  # FCOS's matching and target encoding, in the workers

    def predict(self, head, neck_out, images):
        return head.detect(neck_out, image_size_of(images))

    def evaluator(self, num_classes, dataset=None):
        from xlearner import metrics

        return metrics.DetEvaluator(num_classes, getattr(dataset, "coco_file", None),
                                    getattr(dataset, "category_ids", None))

    def collate(self, samples, padded=False):
        images = torch.stack([s[0] for s in samples])
        if padded:  # 3 tensors a batch cross from the worker (and to the GPU) instead of 2B + 1
            from xlearner.models.heads import pad_targets

            # padded: True, or at least this many boxes per image (train.det_pad_boxes)
            boxes, labels = pad_targets([t for _, t in samples], torch.device("cpu"), min_boxes=int(padded))
            return {"images": images, "boxes": boxes, "labels": labels}
        return {"images": images, "targets": [
            {"boxes": torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4),
             "labels": torch.as_tensor(t["labels"], dtype=torch.int64)} for _, t in samples]}

    def extra_ops(self):
        from torchvision.transforms import v2

        return [v2.SanitizeBoundingBoxes(min_size=1.0)]

    def apply_transform(self, pipeline, image, target):
        from torchvision import tv_tensors

        boxes = tv_tensors.BoundingBoxes(torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4),
                                         format="XYXY", canvas_size=tuple(image.shape[-2:]))
        out, tgt = pipeline(image, {"boxes": boxes, "labels": torch.as_tensor(target["labels"], dtype=torch.int64)})
        return out.as_subclass(torch.Tensor), {"boxes": tgt["boxes"].as_subclass(torch.Tensor).to(torch.float32),
                                               "labels": tgt["labels"].to(torch.int64)}

    def original_target(self, target):
        return {"boxes": torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.as_tensor(target["labels"], dtype=torch.int64)}

    def to_record(self, target):
        meta = {"boxes": target["boxes"].tolist(), "labels": target["labels"].tolist()}
        if target.get("image_id") is not None:  # COCO: scoring against the annotation file needs it
            meta["image_id"] = int(target["image_id"])
        return meta, {}

    def from_record(self, meta, planes):
        out = {"boxes": torch.tensor(meta["boxes"], dtype=torch.float32).reshape(-1, 4),
               "labels": torch.tensor(meta["labels"], dtype=torch.int64)}
        if "image_id" in meta:
            out["image_id"] = int(meta["image_id"])
        return out

    def draw(self, image, target, class_names, scale, style):
        from torchvision.utils import draw_bounding_boxes

        boxes, labels = target["boxes"], target["labels"].tolist()
        if len(boxes):
            image = draw_bounding_boxes(image, boxes * scale, labels=[class_names[k] for k in labels],
                                        colors=[style.colour(k) for k in labels], width=2,
                                        font_size=style.font_size if style.font else None, font=style.font)
        return image, f"{len(labels)} objects", set()

    def check_target(self, image, target, num_classes, where):
        h, w = image.shape[-2:]
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
        return None


# ----------------------------------------------------------------------------- seg
def seg_loss(logits: Tensor, masks: Tensor, class_weight: Tensor | None = None,
             weight_table: Tensor | None = None) -> Tensor:
    """Cross-entropy over the pixels not ignored, weighted by ``class_weight`` (K,) and divided by the
    weights' sum (as ``F.cross_entropy``'s mean); 0 (graph kept) when all are ignored. Sum / weight on
    the device: no host synchronisation to test for the all-ignored case. ``weight_table``: the
    :func:`pixel_weight_table` of ``class_weight``, where the caller keeps one (a seg head does)."""
    if logits.shape[-2:] != masks.shape[-2:]:
        from xlearner.models.heads import resize_bilinear

        logits = resize_bilinear(logits, size=masks.shape[-2:])
    total = F.cross_entropy(logits, masks, weight=class_weight, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / seg_weight_total(masks, class_weight, weight_table)


def seg_weight_total(masks: Tensor, class_weight: Tensor | None = None, weight_table: Tensor | None = None) -> Tensor:
    """:func:`seg_loss`'s divisor: the CE weights of the pixels not ignored, summed (at least 1 pixel,
    or 1e-12 of weight, so that an all-ignored mask gives 0)."""
    if class_weight is None:
        return (masks != IGNORE_INDEX).sum().clamp(min=1)
    table = pixel_weight_table(class_weight) if weight_table is None else weight_table
    return table[masks].sum().clamp(min=1e-12)


def pixel_weight_table(class_weight: Tensor) -> Tensor:
    """Each label's CE weight, ``IGNORE_INDEX`` weighing 0: one lookup gives every pixel's weight
    (one operator per step instead of the five of masking the ignored pixels out)."""
    table = class_weight.new_zeros(max(len(class_weight), IGNORE_INDEX + 1))
    table[: len(class_weight)] = class_weight
    table[IGNORE_INDEX] = 0
    return table


def point_seg_loss(logits: Tensor, masks: Tensor, points: int, class_weight: Tensor | None = None,
                   weight_table: Tensor | None = None) -> Tensor:
    """:func:`seg_loss` on ``points`` pixels per image, drawn uniformly without replacement from torch's
    RNG (Mask2Former's point loss, Cheng et al. 2022, with uniform sampling).

    ``logits`` stay at the head's stride: they are sampled bilinearly at the drawn pixels' centres,
    which gives the values that upsampling them to the mask size would have there, without computing
    the others. Per-pixel CE at the input size costs about as much as a light seg head on a CPU."""
    pixels = draw_pixels(masks, points)
    if pixels is None:
        return seg_loss(logits, masks, class_weight, weight_table)
    return seg_loss_at(logits, masks, pixels, class_weight, weight_table)


def draw_pixels(masks: Tensor, points: int) -> Tensor | None:
    """(B, points) flat pixel indices per image of (B, H, W) ``masks``, uniform without replacement from
    torch's RNG; None where ``points`` >= H * W (then every pixel is scored)."""
    b, (h, w) = masks.shape[0], masks.shape[-2:]
    if points >= h * w:
        return None
    return torch.rand(b, h * w, device=masks.device).topk(points, dim=1).indices


_PIXEL_CENTRES: dict = {}


def pixel_centres(h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(h*w, 2): the ``grid_sample`` coordinates (x, y) of each pixel centre of an (h, w) mask, by
    flat index. Cached per shape in eager mode (one gather per step instead of thirteen operators);
    computed in the graph under torch.compile, as the det anchors are."""
    from xlearner.models.heads import cached_tensor

    def compute() -> Tensor:
        flat = torch.arange(h * w, device=device)
        ys, xs = (flat // w).to(dtype), (flat % w).to(dtype)
        # grid_sample's align_corners=False maps [-1, 1] to the maps' outer edges, as F.interpolate
        # does to the mask's: a pixel centre (x + 0.5) / w is where bilinear upsampling samples for
        # that pixel, and border padding is its clamping at the edges
        return torch.stack(((xs + 0.5) / w * 2 - 1, (ys + 0.5) / h * 2 - 1), dim=-1)

    return cached_tensor(_PIXEL_CENTRES, (h, w, dtype, device), compute)


def point_grid(pixels: Tensor, h: int, w: int) -> Tensor:
    """(B, 1, P, 2) ``grid_sample`` coordinates of the pixels ``pixels`` (B, P) (flat indices into (h, w)
    masks). float32 even under bf16 autocast: grid_sample runs in float32 there, and bf16 would move a
    96 px mask's pixel centres by up to 0.2 px."""
    return pixel_centres(h, w, torch.float32, pixels.device)[pixels].unsqueeze(1)


def sample_logits(logits: Tensor, grid: Tensor) -> Tensor:
    """(B, K, 1, P) logits bilinearly sampled at ``grid`` (:func:`point_grid`): the values upsampling them to the masks would give there."""
    return F.grid_sample(logits, grid, mode="bilinear", padding_mode="border", align_corners=False)


def seg_loss_at(logits: Tensor, masks: Tensor, pixels: Tensor, class_weight: Tensor | None = None,
                weight_table: Tensor | None = None) -> Tensor:
    """:func:`seg_loss` over the pixels ``pixels`` (B,P) (flat indices into the (H,W) masks) only."""
    h, w = masks.shape[-2:]
    sampled = sample_logits(logits, point_grid(pixels, h, w))
    return seg_loss(sampled, masks.flatten(1).gather(1, pixels).unsqueeze(1), class_weight, weight_table)


SEG_POINT_KEYS = ("seg_point_grid", "seg_point_labels", "seg_point_norm")


class SegPointTargets:
    """The pixels of a seg batch's point loss (:func:`point_seg_loss`), drawn where the batch is built:
    in the training loader's workers, from their torch RNG. Drawing them, reading their labels and
    grid coordinates and the loss's normaliser read only the masks, so doing it there takes seven
    operators off every seg step (docs/performance.md), as :class:`~xlearner.models.heads.FCOSTargets`
    does for det. Adds ``seg_point_grid`` (B, 1, P, 2), ``seg_point_labels`` (B, 1, P) and
    ``seg_point_norm`` (B,), 1 / the points' total CE weight (the same in every image); the masks stay
    in the batch. Picklable (DataLoader workers): it holds the point count and the CPU weight table."""

    def __init__(self, points: int, class_weight: Tensor | None):
        self.points = int(points)
        self.class_weight = None if class_weight is None else class_weight.detach().cpu().float()
        self.table = None if class_weight is None else pixel_weight_table(self.class_weight)

    def __call__(self, batch: dict) -> dict:
        masks = batch["masks"]
        pixels = draw_pixels(masks, self.points)
        if pixels is None:  # point_seg_loss scores every pixel then
            return batch
        labels = masks.flatten(1).gather(1, pixels).to(torch.int64)
        norm = seg_weight_total(labels, self.class_weight, self.table).to(torch.float32).reciprocal()
        return {**batch, "seg_point_grid": point_grid(pixels, *masks.shape[-2:]), "seg_point_labels": labels.unsqueeze(1),
                "seg_point_norm": norm.expand(masks.shape[0]).clone()}


def seg_loss_on_points(logits: Tensor, batch: dict, class_weight: Tensor | None = None) -> Tensor:
    """:func:`seg_loss_at` on the points :class:`SegPointTargets` drew: sampling and cross-entropy only."""
    grid, labels, norm = (batch[k] for k in SEG_POINT_KEYS)
    total = F.cross_entropy(sample_logits(logits, grid), labels, weight=class_weight, ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total * norm[0]


def head_seg_loss(head, logits: Tensor, masks: Tensor) -> Tensor:
    """The loss a seg head trains with, from its logits at its own stride: :func:`point_seg_loss`
    where the head has ``loss_points``, else :func:`seg_loss` (which upsamples them to the masks)."""
    points, table = getattr(head, "loss_points", 0), getattr(head, "weight_table", None)
    if points:
        return point_seg_loss(logits, masks, points, head.class_weight, table)
    return seg_loss(logits, masks, head.class_weight, table)


def background_weights(num_classes: int, background_weight: float) -> Tensor | None:
    """Per-class CE weights with class 0 (background) at ``background_weight``; None for 1 (plain CE)."""
    if background_weight == 1.0:
        return None
    w = torch.ones(num_classes)
    w[0] = background_weight
    return w


class SegTask(Task):
    """Semantic segmentation: FPN + Panoptic-FPN head (or a linear probe), per-pixel CE, mIoU."""

    name, metric, dense = "seg", "mIoU", True
    title, metric_title = "segmentation", "mIoU"
    ignore_index = IGNORE_INDEX

    def build_neck(self, channels, strides, opts):
        from xlearner.models.heads import FPNNeck, PassFeatures

        if opts.seg_head == "linear":
            return PassFeatures()
        if opts.seg_head != "fpn":
            raise ValueError(f"seg head must be fpn or linear, got {opts.seg_head!r}")
        return FPNNeck(list(channels), opts.fpn_channels)

    def build_head(self, neck, num_classes, channels, strides, opts):
        from xlearner.models.heads import LinearSegHead, SegHead

        weight = background_weights(num_classes, opts.seg_background_weight)
        if opts.seg_head == "linear":
            head = LinearSegHead(list(channels), num_classes, list(strides), class_weight=weight)
        else:
            head = SegHead(opts.fpn_channels, num_classes, list(strides), class_weight=weight)
        head.loss_points = opts.seg_loss_points
        if weight is not None:  # follows the head to its device; not in checkpoints
            head.register_buffer("weight_table", pixel_weight_table(weight), persistent=False)
        return head

    def loss(self, head, neck_out, batch):
        if SEG_POINT_KEYS[0] in batch:  # the training loader's drawn points (target_encoder)
            return seg_loss_on_points(head.logits(neck_out), batch, head.class_weight)
        return head_seg_loss(head, head.logits(neck_out), batch["masks"])

    def target_encoder(self, head, image_size):
        points = getattr(head, "loss_points", 0)  # the point loss's pixels, drawn in the workers
        return SegPointTargets(points, head.class_weight) if points else None

    def predict(self, head, neck_out, images):
        return head(neck_out, image_size_of(images))

    def evaluator(self, num_classes, dataset=None):
        from xlearner import metrics

        return metrics.SegEvaluator(num_classes, getattr(dataset, "class_names", None), IGNORE_INDEX)

    def collate(self, samples, padded=False):
        return {"images": torch.stack([s[0] for s in samples]),
                "masks": torch.stack([torch.as_tensor(t["mask"], dtype=torch.int64) for _, t in samples])}

    def apply_transform(self, pipeline, image, target):
        from torchvision import tv_tensors

        out, m = pipeline(image, tv_tensors.Mask(torch.as_tensor(target["mask"])))
        return out.as_subclass(torch.Tensor), {"mask": m.as_subclass(torch.Tensor).to(torch.int64)}

    def original_target(self, target):
        mask = torch.as_tensor(target["mask"])
        return {"mask": mask.to(torch.uint8) if mask.numel() and int(mask.max()) <= 255 else mask}

    def to_record(self, target):
        return {}, {"mask": target["mask"]}  # after the source's label mapping

    def from_record(self, meta, planes):
        return {"mask": planes["mask"]}

    def draw(self, image, target, class_names, scale, style):
        """The classes present (class 0, background, and ignored pixels left undrawn) as coloured masks."""
        from torchvision.utils import draw_segmentation_masks

        mask = target["mask"]
        if scale > 1:
            mask = mask.repeat_interleave(int(scale), 0).repeat_interleave(int(scale), 1)
        present = [int(k) for k in torch.unique(mask).tolist() if k not in (0, IGNORE_INDEX)]
        if present:
            image = draw_segmentation_masks(image, torch.stack([mask == k for k in present]), alpha=0.5,
                                            colors=[style.colour(k) for k in present])
        return image, ", ".join(class_names[k] for k in present) or "background only", set(present)

    def check_target(self, image, target, num_classes, where):
        h, w = image.shape[-2:]
        mask = target["mask"]
        if tuple(mask.shape) != (h, w):
            return f"{where}: mask is {tuple(mask.shape)} but the image is {(h, w)}"
        bad = mask[(mask >= num_classes) & (mask != IGNORE_INDEX)]
        if bad.numel():
            return (f"{where}: mask holds value {int(bad[0])} but there are {num_classes} classes "
                    f"(values must be 0..{num_classes - 1}, or {IGNORE_INDEX} = ignore)")
        return None


# ----------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add a task type (its ``name`` becomes valid as a source's ``task``); returns it."""
    if not task.name:
        raise ValueError("a task needs a name")
    _REGISTRY[task.name] = task
    return task


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> Task:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(_REGISTRY)}") from None


def names() -> tuple[str, ...]:
    """Registered task names, in registration order (cls, det, seg first)."""
    return tuple(_REGISTRY)


def present(tasks: Sequence[str]) -> list[str]:
    """The distinct tasks among ``tasks``, in registration order: the one order used everywhere."""
    given = set(tasks)
    return [t for t in _REGISTRY if t in given]


for _task in (ClsTask(), DetTask(), SegTask()):
    register(_task)
