"""Frozen features and the data helpers of transfer (training itself is the engine's ``fit``).

- ``extract_pooled``: eval mode, no_grad, global-average-pooled last-stage features over an
  ``eval_loader`` -> (N, C) float32 numpy + labels (the linear probe's input).
- ``precompute_maps`` / ``take_cached``: every backbone feature map of every image, once (frozen
  transfer without augmentation: the backbone never runs again during head training), stored
  fp16, with the batches' other entries per image.
- ``adapt_batchnorm``: AdaBN on the downstream training images; ``freeze``.
- ``subset``: a deterministic subset of at most ``n`` records (``max_train_samples``);
  ``infinite_indices``: the seeded batch order of frozen training.
- ``eval_batches`` (from ``data.loader``): the eval loader's batches, kept in memory under a key
  that names the data (``xlearner run`` transfers every method to the same datasets: decoding,
  composing and transforming them once instead of once per method saves about 5 s per method
  and dataset).
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from xlearner.data.loader import eval_batches
from xlearner.data.sources import SubsetSource
from xlearner.models.heads import global_pool


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
                    show_progress: bool = True, max_images: int | None = 512, resize: str = "square",
                    key: tuple | None = None) -> int:
    """Re-estimate BatchNorm running statistics on the downstream training images (AdaBN).

    A backbone pretrained on several sources carries running statistics averaged over
    whatever it saw last in training (e.g. scenes after digits), which can be far from any
    single domain; a frozen evaluation would then measure that mismatch rather than the
    features. Re-estimating them on the downstream *training* images (no labels, no
    gradient, weights unchanged) gives every compared backbone the same, fair start.
    ``max_images`` (a fixed subset) bounds the cost: a few hundred images pin the statistics down.
    Returns the number of BatchNorm layers adapted. ``key``: see ``eval_batches``.
    """
    from torch.optim.swa_utils import update_bn

    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())
    if n_bn == 0:
        return 0
    loader = eval_batches(subset(dataset, max_images, seed=0), task, size, batch_size, resize=resize,
                          key=None if key is None else (key, "adapt_bn", max_images))
    images = (b["images"] for b in progress(loader, total=len(loader), desc="adapt BN", enable=show_progress))
    with torch.no_grad():
        update_bn(images, backbone, device=_device_of(backbone))  # cumulative average, then eval mode kept as before
    return n_bn


@torch.no_grad()
def extract_pooled(backbone: nn.Module, dataset: Dataset, size: int, batch_size: int = 64,
                   show_progress: bool = True, desc: str = "features",
                   key: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pooled last-stage features (N, C) and labels (N,) of a cls dataset, backbone frozen
    (``key``: see ``eval_batches``)."""

    was_training = backbone.training
    backbone.eval()
    dev = _device_of(backbone)
    feats, labels = [], []
    loader = eval_batches(dataset, "cls", size, batch_size, key=key)
    for batch in progress(loader, total=len(loader), desc=desc, enable=show_progress):
        feats.append(global_pool(backbone(batch["images"].to(dev))).float().cpu())
        labels.append(batch["labels"])
    backbone.train(was_training)
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


@torch.no_grad()
def precompute_maps(backbone: nn.Module, dataset: Dataset, task: str, size: int, batch_size: int = 32,
                    show_progress: bool = True, desc: str = "features", resize: str = "square",
                    original: bool = False, key: tuple | None = None) -> dict[str, Any]:
    """Every backbone feature map of ``dataset`` under the eval transform, once (frozen transfer:
    the backbone never runs again), and what the task's batches carry besides the images.

    Returns ``{"maps": [(N, C_l, h_l, w_l) fp16 on the CPU], "entries": {key: per image}}``: every
    non-image entry of the eval batches (the task's collate: labels, masks, det targets; ``meta``
    with ``original``), a tensor concatenated along its first dimension, a list extended; and
    ``images`` as a zero-channel (N, 0, H, W) stand-in that keeps the images' size.
    ``take_cached(entries, index)`` rebuilds a batch. ``key``: see ``eval_batches``."""
    was_training = backbone.training
    backbone.eval()
    dev = _device_of(backbone)
    levels: list[list[Tensor]] | None = None
    parts: dict[str, list] = {}
    loader = eval_batches(dataset, task, size, batch_size, resize=resize, original=original, key=key)
    for batch in progress(loader, total=len(loader), desc=desc, enable=show_progress):
        feats = backbone(batch["images"].to(dev))
        if levels is None:
            levels = [[] for _ in feats]
        for store, f in zip(levels, feats):
            store.append(f.to(torch.float16).cpu())
        x = batch["images"]
        batch = {**batch, "images": x.new_empty((x.shape[0], 0, *x.shape[2:]))}  # a view would keep x
        for name, value in batch.items():
            if isinstance(value, Tensor):
                parts.setdefault(name, []).append(value)
            else:
                parts.setdefault(name, []).extend(value)
    backbone.train(was_training)
    entries = {k: torch.cat(v) if v and isinstance(v[0], Tensor) else v for k, v in parts.items()}
    entries.setdefault("images", torch.zeros(0, 0, size, size))
    return {"maps": [torch.cat(s) for s in (levels or [])], "entries": entries}


def take_cached(entries: dict[str, Any], index: Tensor | slice) -> dict[str, Any]:
    """The batch of images ``index`` (a slice or a 1-D index tensor) of ``precompute_maps``'s entries."""
    if isinstance(index, slice):
        return {k: v[index] for k, v in entries.items()}
    return {k: v[index] if isinstance(v, Tensor) else [v[int(i)] for i in index] for k, v in entries.items()}


def freeze(backbone: nn.Module) -> None:
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)


def infinite_indices(n: int, batch_size: int, seed: int):
    """Batches of indices from a fresh seeded permutation per pass (the data order of a seed)."""
    g = torch.Generator().manual_seed(int(seed))
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield perm[i:i + batch_size]
