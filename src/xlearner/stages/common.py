"""What every stage shares: training data, per-task losses, validation, cost accounting.

A stage is the only place where a model and its losses meet; this module holds the
pieces the expansion, squeeze and baseline stages have in common so each stage file
reads as "which model, which losses".
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from xlearner import tasks
from xlearner.config import RunConfig, SourceConfig


# ----------------------------------------------------------------------------- data
@dataclass
class StageData:
    """Train datasets of the stage's sources, the infinite multi-source loader, val loaders."""

    datasets: dict            # name -> train SourceDataset
    loader: object            # MultiSourceLoader
    val_loaders: dict         # name -> DataLoader over the val split
    tasks: dict               # name -> task name
    num_classes: dict         # name -> label-space size
    val_datasets: dict = field(default_factory=dict)  # name -> val split (its bad-record count)
    bn_loaders: dict = field(default_factory=dict)    # name -> DataLoader over train images, for precise BN


class OpenedSources:
    """Train splits opened on first use (``opened[source_config]``): a stage that compares
    sources' sizes to choose among them (ssst) opens each once."""

    def __init__(self) -> None:
        self._opened: dict = {}

    def __getitem__(self, source: SourceConfig):
        if source.name not in self._opened:
            self._opened[source.name] = build_source(source, "train")
        return self._opened[source.name]


def build_datasets(sources: Sequence[SourceConfig], split: str = "train") -> dict:
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


def bad_record_counts(datasets: dict) -> dict[str, int]:
    """Records skipped so far per source (opening it, and decoding in this process or its loader workers).

    Under DDP each rank reads its own shard: the decode failures flagged on all ranks are united
    (a collective: every rank must call it)."""
    from xlearner.engine.distributed import all_gather_object, is_dist

    counts = {}
    for name, ds in datasets.items():
        bad = getattr(ds, "bad", None)
        counts[name] = int(getattr(bad, "count", 0) or 0)
    if is_dist():
        flagged = {n: getattr(getattr(ds, "bad", None), "failed_indices", lambda: [])() for n, ds in datasets.items()}
        every = all_gather_object(flagged)
        for name, ds in datasets.items():
            mine = set(flagged[name])
            union = set().union(*(set(f[name]) for f in every))
            counts[name] += len(union - mine)
    return counts


def bad_records_line(counts: dict[str, int], val_counts: dict[str, int], sources: Sequence[SourceConfig],
                     when: str) -> str:
    """One console line: per source, the bad records skipped in train (and val) so far."""
    by_name = {s.name: s for s in sources}
    parts = []
    for name, n in counts.items():
        v = val_counts.get(name, 0)
        parts.append(f"{name} {n}" + (f" (+{v} in val)" if v else "")
                     + ("" if by_name[name].on_bad_sample == "skip" else " (on_bad_sample: error)"))
    return f"bad records skipped {when}: " + ", ".join(parts)


def build_stage_data(cfg: RunConfig, sources: Sequence[SourceConfig], *, rank: int = 0, world_size: int = 1,
                     datasets: dict | None = None, with_val: bool = True,
                     target_encoders: dict | None = None) -> StageData:
    """Train datasets + transforms + MultiSourceLoader (DDP-aware), and val and precise-BN loaders for
    ``sources`` whose batches are built once per process (``CachedEvalLoader``). ``target_encoders``:
    per source, what the training loader's workers add to its batches (``Stage.target_encoders``)."""
    from xlearner.data.loader import CachedEvalLoader, MultiSourceLoader
    from xlearner.data.transforms import build_transform

    sources = list(sources)
    if datasets is None:
        datasets = build_datasets(sources, "train")
    datasets = {s.name: datasets[s.name] for s in sources}
    report_bad_records(datasets, sources, verbose=rank == 0)
    batch_sizes = {s.name: s.batch_size for s in sources}
    transforms = {s.name: build_transform(s.task, cfg.size_of(s), True, cfg.augment.of(s.task), resize=s.resize_mode)
                  for s in sources}
    task_of = {s.name: s.task for s in sources}
    loader = MultiSourceLoader(datasets, batch_sizes, transforms, task_of, seed=cfg.seed, rank=rank,
                               world_size=world_size, num_workers=cfg.train.num_workers,
                               pin_memory=torch.cuda.is_available(), det_pad_boxes=cfg.train.det_pad_boxes,
                               target_encoders=target_encoders)
    val_loaders, val_datasets = {}, {}
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
            val_datasets[s.name] = val
            n = cfg.train.val_batches * s.batch_size
            val_loaders[s.name] = CachedEvalLoader(spread_subset(val, n), s.task, cfg.size_of(s), s.batch_size,
                                                   key=(s.model_dump_json(), "val", n), resize=s.resize_mode,
                                                   original=s.scored_as_published)
    bn_loaders = {}
    if with_val and cfg.train.precise_bn_batches > 0:
        for s in sources:
            n = cfg.train.precise_bn_batches * s.batch_size
            bn_loaders[s.name] = CachedEvalLoader(spread_subset(datasets[s.name], n), s.task, cfg.size_of(s),
                                                  s.batch_size, key=(s.model_dump_json(), "train", n),
                                                  resize=s.resize_mode)
    return StageData(datasets, loader, val_loaders, task_of, {n: int(d.num_classes) for n, d in datasets.items()},
                     val_datasets, bn_loaders)


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


def head_options(cfg: RunConfig, specs) -> "tasks.HeadOptions":
    """The necks' and heads' sizes of a stage: the run's widths, each task's largest image side."""
    names = {s.name: s.task for s in specs}
    sizes: dict[str, int] = {}
    for s in cfg.sources:
        if s.name in names:
            sizes[s.task] = max(sizes.get(s.task, 0), cfg.size_of(s))
    return tasks.HeadOptions(fpn_channels=cfg.fpn_channels, det_head_convs=cfg.det_head_convs, image_sizes=sizes,
                             seg_head=cfg.seg_head, seg_loss_points=cfg.seg_loss_points,
                             seg_background_weight=cfg.seg_background_weight)


def source_records(sources: Sequence[SourceConfig], datasets: dict) -> list[dict]:
    return [{"name": s.name, "task": s.task, "num_classes": int(datasets[s.name].num_classes),
             "class_names": list(getattr(datasets[s.name], "class_names", []) or [])} for s in sources]


# ----------------------------------------------------------------------------- validation
def forward_any_batch(net_forward: Callable[[Tensor, str], object], images: Tensor, name: str):
    """``net_forward(images, name)`` for any batch size, one included.

    GroupNorm with one channel per group on a 1x1 map (a small FPN's coarsest level), and a
    batch-statistics BatchNorm, refuse a one-image batch ("Expected more than 1 value per
    channel"). A lone image runs as two copies and keeps the first output: the same result,
    since each copy is normalised the same way.
    """
    if images.shape[0] != 1:
        return net_forward(images, name)
    return net_forward(torch.cat([images, images]), name)[:1]


@torch.no_grad()
def evaluate_sources(net_forward: Callable[[Tensor, str], object], loaders: dict, task_of: dict[str, str],
                     num_classes: dict[str, int], max_batches: int | None = None,
                     module: nn.Module | None = None, device: torch.device | None = None) -> dict[str, float]:
    """Validation metric per source: the task's ``metric`` (top-1, COCO mAP@[.5:.95], mIoU; fractions).

    ``net_forward(images, source)`` returns the task's ``predict`` output. ``module`` (if given)
    is put in eval mode for the duration and its device receives the batches. Sources scored at
    the original size (batches with ``meta``, see ``metrics.DetEvaluator``) also report the
    evaluator's other figures as ``<source>/<key>`` (det AP50, AP75, APs...; seg per_class_iou).
    """
    device = device or torch.device("cpu")
    was_training = None
    if module is not None:
        p = next(module.parameters(), None)
        device = p.device if p is not None else device
        was_training = module.training
        module.eval()
    out: dict[str, float] = {}
    try:
        for name, loader in loaders.items():
            task = tasks.get(task_of[name])
            ds = getattr(loader, "dataset", None)  # any iterable of batches validates; a DataLoader
            ds = getattr(ds, "base", ds)           # tells its dataset (under the eval transform)
            ev = task.evaluator(num_classes[name], ds)
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                ev.update(forward_any_batch(net_forward, batch["images"].to(device), name), batch)
            res = ev.compute()
            out[name] = float(res[task.metric])
            if getattr(ev, "original", False):
                out.update({f"{name}/{key}": v for key, v in res.items() if key not in (task.metric, "pixel_acc")})
    finally:
        if module is not None and was_training:
            module.train()
    return out


# ----------------------------------------------------------------------------- precise BN
@torch.no_grad()
def estimate_bn_statistics(bns: list, run: Callable[[Tensor], object], batches) -> list[tuple[Tensor, Tensor]]:
    """Precise BN: every BN's running mean/var as the equal-weight average over ``batches``
    (momentum None; the layers normalise with batch statistics while they are gathered).
    ``run(images)`` runs the nets owning ``bns``; their momentum and mode are restored, the
    new statistics stay in the buffers and are returned (CPU copies). A BN that ``run`` does not
    reach (a head's, where ``run`` is the backbone) keeps the statistics it had: reset, it would
    normalise with mean 0 and variance 1."""
    saved = [(m.momentum, m.training) for m in bns]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch weighs the same
        m.train()
    n = 0
    for images in batches:
        run(images)
        n += 1
    if n == 0:
        raise ValueError("precise BN: no batch to estimate the statistics on")
    for m, state in zip(bns, before):
        if int(m.num_batches_tracked) == 0:
            m.load_state_dict(state)
    stats = [(m.running_mean.detach().cpu().clone(), m.running_var.detach().cpu().clone()) for m in bns]
    for m, (momentum, training) in zip(bns, saved):
        m.momentum = momentum
        m.train(training)
    return stats


@contextmanager
def precise_bn(bn_owner: nn.Module, run_backbone: Callable[[Tensor], object], loader,
               max_batches: int | None = None):
    """BatchNorm statistics of ``bn_owner`` re-estimated on ``loader``'s images, restored on exit.

    A multi-source backbone's running statistics blend every source (each step draws a
    batch of each), so eval mode normalises a source with statistics it never had; its
    validation then measures the blend, not the network. Inside this context, every
    BatchNorm of ``bn_owner`` holds the exact mean/variance of ``run_backbone`` over
    ``loader`` (:func:`estimate_bn_statistics`) and ``bn_owner`` is in eval mode; on exit the
    trained statistics and the modes are put back, so training and the saved product are unaffected.
    """
    from itertools import islice

    bns = [m for m in bn_owner.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]
    modes = {m: m.training for m in bn_owner.modules()}
    device = next(iter([*bn_owner.parameters(), *bn_owner.buffers()])).device
    try:
        estimate_bn_statistics(bns, run_backbone, (b["images"].to(device) for b in islice(loader, max_batches)))
        bn_owner.eval()
        yield
    finally:
        for m, state in zip(bns, saved):
            m.load_state_dict(state)
        for m, was in modes.items():
            m.train(was)


def evaluate_precise_bn(stage: nn.Module, val_loaders: dict, bn_loaders: dict, tasks: dict[str, str],
                        num_classes: dict[str, int], max_batches: int | None = None,
                        bn_batches: int | None = None) -> dict[str, float]:
    """Validation metric per source with BatchNorm statistics re-estimated on that source's
    train images first (see :func:`precise_bn`); keys ``<source>/precise_bn``."""
    out: dict[str, float] = {}
    for name, val in val_loaders.items():
        if name not in bn_loaders:
            continue
        task = tasks[name]
        with precise_bn(stage.product(), lambda x, t=task: stage.features(x, t), bn_loaders[name], bn_batches):
            score = evaluate_sources(stage.predict, {name: val}, tasks, num_classes, max_batches=max_batches,
                                     module=None, device=next(stage.parameters()).device)
        out[f"{name}/precise_bn"] = score[name]
    return out


def validation_hook(stage: nn.Module, data: StageData, cfg: RunConfig,
                    sources: Sequence[SourceConfig]) -> Callable[[nn.Module, int], dict[str, float]]:
    """fit's ``evaluate``: every source's metric with the trained (blended) BatchNorm statistics, then with
    statistics re-estimated on its own train images (precise BN), and a line of the bad records so far."""
    def evaluate(_module: nn.Module, step: int) -> dict[str, float]:
        out = evaluate_sources(stage.predict, data.val_loaders, data.tasks, data.num_classes,
                               max_batches=cfg.train.val_batches, module=stage)
        if data.bn_loaders:
            out.update(evaluate_precise_bn(stage, data.val_loaders, data.bn_loaders, data.tasks, data.num_classes,
                                           max_batches=cfg.train.val_batches))
        # fit evaluates on rank 0 only: its own counts here, the union over ranks at the end
        print(bad_records_line({n: d.bad.count for n, d in data.datasets.items()},
                               {n: d.bad.count for n, d in data.val_datasets.items()}, sources, f"by step {step}"),
              flush=True)
        return out

    return evaluate


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


def batch_images(batch: dict) -> int:
    """Images in one multi-source batch (fit's ``count_images``)."""
    return sum(int(b["images"].shape[0]) for b in batch.values())
