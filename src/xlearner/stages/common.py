"""What every stage shares: training data, per-task losses, validation, cost accounting.

A stage is the only place where a model and its losses meet; this module holds the
pieces the expansion, squeeze and baseline stages have in common so each stage file
reads as "which model, which losses".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlearner.config import RunConfig, SourceConfig

IGNORE_INDEX = 255


# ----------------------------------------------------------------------------- data
@dataclass
class StageData:
    """Train datasets of the stage's sources, the infinite multi-source loader, val loaders."""

    sources: list[SourceConfig]
    datasets: dict            # name -> train SourceDataset
    loader: object            # MultiSourceLoader
    val_loaders: dict         # name -> DataLoader over the val split
    batch_sizes: dict         # name -> per-rank batch size
    world_size: int = 1


def build_datasets(sources: Sequence[SourceConfig], split: str = "train") -> dict:
    from xlearner.data.sources import build_source

    return {s.name: build_source(s, split) for s in sources}


def report_bad_records(datasets: dict, sources: Sequence[SourceConfig], verbose: bool = True) -> dict[str, int]:
    """Print (if ``verbose``), per source, how many bad records were skipped while opening it."""
    counts = {}
    by_name = {s.name: s for s in sources}
    for name, ds in datasets.items():
        bad = getattr(ds, "bad", None)
        n = int(getattr(bad, "count", 0) or 0)
        counts[name] = n
        if verbose:
            print(f"source {name}: {n} bad records skipped (on_bad_sample: {by_name[name].on_bad_sample})", flush=True)
    return counts


def build_stage_data(cfg: RunConfig, sources: Sequence[SourceConfig], *, rank: int = 0, world_size: int = 1,
                     datasets: dict | None = None, with_val: bool = True) -> StageData:
    """Train datasets + transforms + MultiSourceLoader (DDP-aware) and val loaders for ``sources``."""
    from xlearner.data.loader import MultiSourceLoader, eval_loader
    from xlearner.data.transforms import build_transform

    sources = list(sources)
    if datasets is None:
        datasets = build_datasets(sources, "train")
    datasets = {s.name: datasets[s.name] for s in sources}
    report_bad_records(datasets, sources, verbose=rank == 0)
    batch_sizes = {s.name: s.batch_size for s in sources}
    transforms = {s.name: build_transform(s.task, cfg.size_of(s), True, cfg.augment.of(s.task)) for s in sources}
    tasks = {s.name: s.task for s in sources}
    loader = MultiSourceLoader(datasets, batch_sizes, transforms, tasks, seed=cfg.seed, rank=rank,
                               world_size=world_size, num_workers=cfg.train.num_workers,
                               pin_memory=torch.cuda.is_available())
    val_loaders = {}
    if with_val:
        for s in sources:
            try:
                val = build_source(s, "val")
            except Exception as exc:  # a source without a usable val split is reported, not fatal
                if rank == 0:
                    print(f"source {s.name}: no validation split ({exc}); not validated", flush=True)
                continue
            if len(val) == 0:
                continue
            val_loaders[s.name] = eval_loader(spread_subset(val, cfg.train.val_batches * s.batch_size),
                                              s.task, cfg.size_of(s), s.batch_size)
    return StageData(sources, datasets, loader, val_loaders, batch_sizes, world_size)


def spread_subset(dataset, n: int):
    """At most ``n`` records evenly spread over ``dataset`` (deterministic).

    Validation looks at ``train.val_batches`` batches only; the first batches of a split
    stored in class order would hold a single class, so take records from all of it.
    """
    if len(dataset) <= n:
        return dataset
    from xlearner.data.sources import SubsetSource

    idx = torch.linspace(0, len(dataset) - 1, n).round().long().unique().tolist()
    return SubsetSource(dataset, idx)


def build_source(cfg: SourceConfig, split: str):
    from xlearner.data.sources import build_source as _build

    return _build(cfg, split)


def source_specs(sources: Sequence[SourceConfig], datasets: dict) -> list:
    """One ``SourceSpec`` per source, num_classes from the dataset (the label space it found)."""
    from xlearner.models.nets import SourceSpec

    return [SourceSpec(s.name, s.task, int(datasets[s.name].num_classes)) for s in sources]


def det_image_size(cfg: RunConfig, specs) -> int | None:
    """The largest image side of the det sources among ``specs`` (it picks the det head's levels)."""
    names = {s.name for s in specs if s.task == "det"}
    return max((cfg.size_of(s) for s in cfg.sources if s.name in names), default=None)


def source_records(sources: Sequence[SourceConfig], datasets: dict) -> list[dict]:
    return [{"name": s.name, "task": s.task, "num_classes": int(datasets[s.name].num_classes),
             "class_names": list(getattr(datasets[s.name], "class_names", []) or [])} for s in sources]


# ----------------------------------------------------------------------------- model parts
def net_parts(net: nn.Module) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """(necks per task, heads per source) of a SharedNet / ExpandedNet."""
    th = net.task_heads
    return th.necks, th.heads


def image_size_of(images: Tensor) -> tuple[int, int]:
    return int(images.shape[-2]), int(images.shape[-1])


# ----------------------------------------------------------------------------- losses
def task_loss(task: str, head: nn.Module, neck_feats, batch: dict) -> Tensor:
    """The task loss of one source batch, from its head and the task neck's output.

    cls: cross-entropy of the head's logits; det: the sum of the detector's own losses
    (classification, box regression, centerness); seg: per-pixel cross-entropy with ignore
    index 255 on logits upsampled (bilinear) to the mask size.
    """
    if task == "cls":
        return F.cross_entropy(head(neck_feats), batch["labels"])
    if task == "det":  # the training loader's padded boxes/labels, or a per-image targets list
        targets = batch["targets"] if "targets" in batch else (batch["boxes"], batch["labels"])
        losses = head.losses(neck_feats, image_size_of(batch["images"]), targets)
        return sum(losses.values())
    if task == "seg":
        logits = head(neck_feats, image_size_of(batch["images"]))
        return seg_loss(logits, batch["masks"])
    raise ValueError(f"unknown task {task!r}")


def seg_loss(logits: Tensor, masks: Tensor) -> Tensor:
    """Mean cross-entropy over the pixels not ignored; 0 (graph kept) when all are ignored.
    Sum / count on the device: no host synchronisation to test for the all-ignored case."""
    if logits.shape[-2:] != masks.shape[-2:]:
        logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (masks != IGNORE_INDEX).sum().clamp(min=1)


def predict(task: str, head: nn.Module, neck_feats, images: Tensor):
    """Evaluation output: cls logits (B,K), det detections [{boxes,scores,labels}], seg logits (B,K,H,W)."""
    if task == "det":
        return head.detect(neck_feats, image_size_of(images))
    if task == "seg":
        return head(neck_feats, image_size_of(images))
    return head(neck_feats)


# ----------------------------------------------------------------------------- validation
def _to(obj, device):
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


@torch.no_grad()
def evaluate_sources(net_forward: Callable[[Tensor, str], object], loaders: dict, tasks: dict[str, str],
                     num_classes: dict[str, int], max_batches: int | None = None,
                     module: nn.Module | None = None) -> dict[str, float]:
    """Validation metric per source: cls top-1, det COCO mAP@[.5:.95], seg mIoU (fractions in [0, 1]).

    ``net_forward(images, source)`` returns what :func:`predict` returns. ``module`` (if given)
    is put in eval mode for the duration and its device receives the batches.
    """
    from xlearner import metrics

    device = torch.device("cpu")
    was_training = None
    if module is not None:
        p = next(module.parameters(), None)
        device = p.device if p is not None else device
        was_training = module.training
        module.eval()
    out: dict[str, float] = {}
    try:
        for name, loader in loaders.items():
            task, k = tasks[name], num_classes[name]
            correct = total = 0
            preds, targets = [], []
            cm = metrics.ConfusionMatrix(k, IGNORE_INDEX) if task == "seg" else None
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                images = batch["images"].to(device)
                y = net_forward(images, name)
                if task == "cls":
                    labels = batch["labels"].to(y.device)
                    correct += int((y.argmax(1) == labels).sum())
                    total += int(labels.numel())
                elif task == "det":
                    preds.extend({k2: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                                  for k2, v in d.items()} for d in y)
                    targets.extend({k2: v.cpu() for k2, v in t.items()} for t in batch["targets"])
                else:
                    masks = batch["masks"]
                    if y.shape[-2:] != masks.shape[-2:]:
                        y = F.interpolate(y.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
                    cm.update(y.argmax(1).cpu(), masks.cpu())
            if task == "cls":
                out[name] = correct / total if total else 0.0
            elif task == "det":
                out[name] = float(metrics.coco_map(preds, targets, k)["mAP"])
            else:
                out[name] = cm.miou()
    finally:
        if module is not None and was_training:
            module.train()
    return out


# ----------------------------------------------------------------------------- cost
def count_flops(fn: Callable[[], object]) -> int:
    """Forward FLOPs of ``fn()`` (torch's FlopCounterMode: a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return int(counter.get_total_flops())


def backbone_flops_per_image(run_backbone: Callable[[Tensor], object], size: int, device=None) -> int:
    """Forward FLOPs of one image of side ``size`` through ``run_backbone``.

    Counted on a batch of two (a batch-statistics BatchNorm, like the squeeze teacher's,
    cannot normalise a single 1x1 map) and halved."""
    x = torch.randn(2, 3, size, size, device=device)
    return count_flops(lambda: run_backbone(x)) // 2


def training_gflops(flops_per_image: dict[str, int], images_seen: dict[str, int], *,
                    backward: bool = True) -> float:
    """GFLOPs of training: forward FLOPs x 3 (forward + backward ~ 2x forward) x images seen."""
    factor = 3 if backward else 1
    return sum(flops_per_image[n] * factor * images_seen.get(n, 0) for n in flops_per_image) / 1e9


def images_seen(batch_sizes: dict[str, int], steps: int, world_size: int = 1) -> dict[str, int]:
    """Images each source contributed: every step draws one batch from every source on every rank."""
    return {n: int(b) * int(steps) * int(world_size) for n, b in batch_sizes.items()}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def batch_images(batch: dict) -> int:
    """Images in one multi-source batch (fit's ``count_images``)."""
    return sum(int(b["images"].shape[0]) for b in batch.values())
