"""Frozen feature extraction and the small training loop shared by the det/seg transfers.

- ``extract_pooled``: eval mode, no_grad, global-average-pooled last-stage features over an
  ``eval_loader`` -> (N, C) float32 numpy + labels (the linear probe's input).
- ``precompute_maps``: every backbone feature map of every image, once (frozen transfer
  without augmentation: the backbone never runs again during head training), stored fp16.
- ``subset``: a deterministic subset of at most ``n`` records (``max_train_samples``).
- ``cosine_lr`` / ``make_optimizer``: AdamW with linear warmup + cosine decay.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from xlearner.data.sources import SubsetSource


def progress(iterable: Iterable, total: int | None = None, desc: str = "", enable: bool = True):
    if not enable:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)


def subset(ds: Dataset, n: int | None, seed: int = 0) -> Dataset:
    """At most ``n`` records of ``ds``, a deterministic choice by ``seed`` (the dataset, not the run seed)."""
    if n is None or len(ds) <= n:
        return ds
    g = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(ds), generator=g)[:n].tolist())
    return SubsetSource(ds, keep)


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def adapt_batchnorm(backbone: nn.Module, dataset: Dataset, task: str, size: int, batch_size: int = 64,
                    show_progress: bool = True, max_images: int | None = 512, resize: str = "square") -> int:
    """Re-estimate BatchNorm running statistics on the downstream training images (AdaBN).

    A backbone pretrained on several sources carries running statistics averaged over
    whatever it saw last in training (e.g. scenes after digits), which can be far from any
    single domain; a frozen evaluation would then measure that mismatch rather than the
    features. Re-estimating them on the downstream *training* images (no labels, no
    gradient, weights unchanged) gives every compared backbone the same, fair start.
    ``max_images`` (a fixed subset) bounds the cost: a few hundred images pin the statistics down.
    Returns the number of BatchNorm layers adapted.
    """
    from torch.optim.swa_utils import update_bn

    from xlearner.data.loader import eval_loader

    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())
    if n_bn == 0:
        return 0
    loader = eval_loader(subset(dataset, max_images, seed=0), task, size, batch_size, resize=resize)
    images = (b["images"] for b in progress(loader, total=len(loader), desc="adapt BN", enable=show_progress))
    with torch.no_grad():
        update_bn(images, backbone, device=_device_of(backbone))  # cumulative average, then eval mode kept as before
    return n_bn


@torch.no_grad()
def extract_pooled(backbone: nn.Module, dataset: Dataset, size: int, batch_size: int = 64,
                   show_progress: bool = True, desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Pooled last-stage features (N, C) and labels (N,) of a cls dataset, backbone frozen."""
    from xlearner.data.loader import eval_loader

    was_training = backbone.training
    backbone.eval()
    dev = _device_of(backbone)
    feats, labels = [], []
    loader = eval_loader(dataset, "cls", size, batch_size)
    for batch in progress(loader, total=len(loader), desc=desc, enable=show_progress):
        f = backbone(batch["images"].to(dev))[-1]
        feats.append(f.float().mean(dim=(2, 3)).cpu())
        labels.append(batch["labels"])
    backbone.train(was_training)
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


@torch.no_grad()
def precompute_maps(backbone: nn.Module, dataset: Dataset, task: str, size: int, batch_size: int = 32,
                    show_progress: bool = True, desc: str = "features", resize: str = "square",
                    original: bool = False) -> tuple[list[Tensor], list[Any], list[dict] | None]:
    """All backbone feature maps of ``dataset`` under the eval transform: ``[(N, C_l, h_l, w_l) fp16]``,
    the per-image targets (det: dict of boxes/labels; seg: (H, W) int64 mask) and, with
    ``original``, the per-image ``meta`` for scoring at the original size (else None)."""
    from xlearner.data.loader import eval_loader

    was_training = backbone.training
    backbone.eval()
    dev = _device_of(backbone)
    levels: list[list[Tensor]] | None = None
    targets: list[Any] = []
    metas: list[dict] | None = [] if original else None
    loader = eval_loader(dataset, task, size, batch_size, resize=resize, original=original)
    for batch in progress(loader, total=len(loader), desc=desc, enable=show_progress):
        feats = backbone(batch["images"].to(dev))
        if levels is None:
            levels = [[] for _ in feats]
        for store, f in zip(levels, feats):
            store.append(f.to(torch.float16).cpu())
        if task == "det":
            targets.extend(batch["targets"])
        else:
            targets.extend(list(batch["masks"]))
        if metas is not None:
            metas.extend(batch["meta"])
    backbone.train(was_training)
    return [torch.cat(s) for s in (levels or [])], targets, metas


def cosine_lr(step: int, total: int, warmup: int, min_ratio: float = 0.01) -> float:
    """Multiplier of the base lr: linear warmup then cosine to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(groups: list[dict], weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    dev = groups[0]["params"][0].device.type if groups else "cpu"
    return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=dev in ("cuda", "cpu") or None)


def train_loop(step_fn: Callable[[int], Tensor], params: list[nn.Parameter], opt: torch.optim.Optimizer,
               steps: int, clip: float | None = 5.0, show_progress: bool = True, desc: str = "train") -> list[float]:
    """Run ``steps`` optimizer steps of ``step_fn(step) -> loss`` with warmup + cosine; returns the losses."""
    base = [g["lr"] for g in opt.param_groups]
    warmup = min(20, steps // 10)
    losses = []
    bar = progress(range(steps), total=steps, desc=desc, enable=show_progress)
    for step in bar:
        mult = cosine_lr(step, steps, warmup)
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * mult
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}")
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        losses.append(float(loss.detach()))
        if show_progress and hasattr(bar, "set_postfix") and step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def freeze(backbone: nn.Module) -> None:
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)


def train_head(step_fn: Callable[[int], Tensor], neck: nn.Module, head: nn.Module, *, lr: float, steps: int,
               show_progress: bool = True, desc: str = "head") -> list[float]:
    """Frozen mode: only the neck and head learn."""
    params = list(neck.parameters()) + list(head.parameters())
    opt = make_optimizer([{"params": params, "lr": lr}])
    return train_loop(step_fn, params, opt, steps, show_progress=show_progress, desc=desc)


def finetune_end_to_end(batch_loss: Callable[[dict], Tensor], backbone: nn.Module, neck: nn.Module,
                        head: nn.Module, train_ds, task: str, *, size: int, batch_size: int, seed: int,
                        lr: float, steps: int, augment=None, show_progress: bool = True,
                        desc: str = "finetune", resize: str = "square") -> list[float]:
    """Fine-tune mode: backbone (lr/10) + neck + head on augmented batches; ``batch_loss(batch)``."""
    from xlearner.data.loader import MultiSourceLoader
    from xlearner.data.transforms import build_transform

    for p in backbone.parameters():
        p.requires_grad_(True)
    backbone.train()
    loader = MultiSourceLoader({"ds": train_ds}, {"ds": batch_size},
                               {"ds": build_transform(task, size, train=True, augment=augment, resize=resize)},
                               {"ds": task}, seed=seed)
    hp = list(neck.parameters()) + list(head.parameters())
    opt = make_optimizer([{"params": list(backbone.parameters()), "lr": lr * 0.1}, {"params": hp, "lr": lr}])
    try:
        return train_loop(lambda _: batch_loss(next(loader)["ds"]), list(backbone.parameters()) + hp, opt,
                          steps, show_progress=show_progress, desc=desc)
    finally:
        loader.close()


def infinite_indices(n: int, batch_size: int, seed: int):
    """Batches of indices from a fresh seeded permutation per pass (the data order of a seed)."""
    g = torch.Generator().manual_seed(int(seed))
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield perm[i:i + batch_size]
