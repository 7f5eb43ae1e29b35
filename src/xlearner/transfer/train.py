"""Trained transfer, one path for every task: the task's neck + head on a backbone, trained by the
engine's ``fit``, scored by the task's evaluator.

``frozen``: the backbone is frozen (eval mode, no gradient); its feature maps are computed once
per training image (eval transform: resize only, no augmentation) and the neck + head are
trained on them. ``finetune``: backbone (lr x ``backbone_lr_factor``) + neck + head trained end
to end with the run's augmentation of the task (or ``transfer.augment``). Both: AdamW, warmup +
cosine, ``steps`` steps (or ``epochs``), gradient clipping (``TransferConfig``); nothing is chosen
on test. The neck and head are built (``Task.build_neck`` / ``build_head``) right after
``torch.manual_seed(seed)`` and ``fit`` does not reseed: the seed picks the head initialisation and
the data order, nothing else.

Test: ``Task.evaluator`` over the test split (``Task.predict``); with ``original`` (data a user
brings) batches carry ``meta`` and are scored at each image's original size. Results: the
evaluator's dict (cls ``top1``; det ``mAP``, ``AP50`` (+ AP75/APs/APm/APl); seg ``mIoU``,
``pixel_acc`` (+ ``per_class_iou``)) plus ``final_loss``.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor, nn

from xlearner.config import TrainConfig, TransferConfig
from xlearner.engine.trainer import fit
from xlearner.tasks import HeadOptions, Task
from xlearner.transfer.features import (freeze, infinite_indices, precompute_maps, progress, take_cached)

EVAL_BATCH = 64


class TransferNet(nn.Module):
    """backbone -> task neck -> task head; ``forward(batch) -> {"loss"}`` (the engine's module).

    Without a backbone (frozen mode) the batch brings the cached feature maps (``features``, fp16)
    and ``images`` is their zero-channel stand-in: it carries only the images' size, which the
    task's loss and prediction read."""

    def __init__(self, task: Task, backbone: nn.Module | None, neck: nn.Module, head: nn.Module):
        super().__init__()
        self.task = task
        self.backbone = backbone  # registered first: the parameter order is backbone, neck, head
        self.neck = neck
        self.head = head

    def features(self, batch: dict) -> list[Tensor]:
        if self.backbone is None:
            return [f.float() for f in batch["features"]]
        return self.backbone(batch["images"])

    def forward(self, batch: dict) -> dict[str, Tensor]:
        return {"loss": self.task.loss(self.head, self.neck(self.features(batch)), batch)}

    @torch.no_grad()
    def predict(self, batch: dict) -> Any:
        """``Task.predict`` for any batch size: a lone image runs as two copies (GroupNorm on a
        small FPN's 1x1 level refuses one; see ``stages.common.forward_any_batch``)."""
        n = int(batch["images"].shape[0])
        if n == 1:
            batch = {"images": torch.cat([batch["images"]] * 2),
                     **({"features": [torch.cat([f, f]) for f in batch["features"]]} if "features" in batch else {})}
        return self.task.predict(self.head, self.neck(self.features(batch)), batch["images"])[:n]


def train_config(tc: TransferConfig, task: str, show_progress: bool = True, num_train: int | None = None) -> TrainConfig:
    """The engine's settings for a transfer run of ``task`` on ``num_train`` images (fp32 on every
    device, as transfer always ran)."""
    steps = tc.steps_of(task, num_train)
    return TrainConfig(steps=steps, optimizer="adamw", lr=tc.lr, weight_decay=tc.weight_decay,
                       warmup_steps=min(tc.warmup_steps, steps // 10), min_lr_ratio=tc.min_lr_ratio,
                       clip_grad=tc.clip_grad, amp="fp32", channels_last=False, compile=False, num_workers=0,
                       log_every=10 if show_progress else steps, val_every=0, ckpt_every=steps,
                       progress=show_progress)


def fit_transfer(net: TransferNet, batches: Iterator[dict], tc: TransferConfig, device: torch.device,
                 show_progress: bool = True, num_train: int | None = None) -> float | None:
    """Train ``net`` on ``batches`` of a ``num_train``-image set with the engine (no run folder, this
    process alone, the RNGs as the caller seeded them); returns the last step's loss."""
    res = fit(net, batches, train_config(tc, net.task.name, show_progress, num_train), None, seed=None, device=device,
              lr_scales={"backbone": tc.backbone_lr_factor}, decay_1d=tc.decay_norms_and_biases,
              distributed=False)
    return res.last_losses.get("loss")


def _cached_batches(cache: dict, batch_size: int, seed: int) -> Iterator[dict]:
    """Training batches of cached maps: indices from ``infinite_indices(n, batch_size, seed)``."""
    maps, entries = cache["maps"], cache["entries"]
    for idx in infinite_indices(len(entries["images"]), batch_size, seed):
        yield {"features": [m[idx] for m in maps], **take_cached(entries, idx)}


def _loader_batches(loader) -> Iterator[dict]:
    for b in loader:
        yield b["ds"]


def transfer_trained(task: Task, backbone: nn.Module, train_ds, test_ds, num_classes: int, tc: TransferConfig, *,
                     mode: str, seed: int, fpn_channels: int, size: int, augment=None, cache: dict | None = None,
                     show_progress: bool = True, resize: str = "square", original: bool = False,
                     keys: tuple[tuple | None, tuple | None] = (None, None)) -> dict[str, Any]:
    """Train ``task``'s neck + head (``frozen``) or the whole network (``finetune``) on ``train_ds``,
    score ``test_ds``; see the module docstring. ``cache`` (frozen mode): a dict reused across
    seeds holding the precomputed train/test maps. ``keys``: the train and test sets' keys for
    ``features.eval_batches`` (frozen mode)."""
    if mode not in ("frozen", "finetune"):
        raise ValueError(f"{task.name} transfer mode must be frozen or finetune, got {mode!r}")
    dev = next(backbone.parameters()).device
    channels, strides = list(backbone.channels), list(backbone.strides)
    opts = HeadOptions(fpn_channels=fpn_channels, det_head_convs=tc.det_head_convs,
                       image_sizes={task.name: size}, seg_head=tc.seg_head,
                       seg_background_weight=tc.seg_background_weight)
    torch.manual_seed(seed)
    neck = task.build_neck(channels, strides, opts)
    head = task.build_head(neck, num_classes, channels, strides, opts)
    bs = max(1, min(tc.batch_size, len(train_ds)))
    maps_of = dict(task=task.name, size=size, show_progress=show_progress, resize=resize)

    if mode == "frozen":
        freeze(backbone)
        cache = cache if cache is not None else {}
        if "train" not in cache:
            cache["train"] = precompute_maps(backbone, train_ds, desc=f"{task.name} features (train)",
                                             key=keys[0], **maps_of)
        net = TransferNet(task, None, neck, head)
        final_loss = fit_transfer(net, _cached_batches(cache["train"], bs, seed), tc, dev, show_progress,
                                  len(train_ds))
    else:
        from xlearner.data.loader import MultiSourceLoader
        from xlearner.data.transforms import build_transform

        for p in backbone.parameters():
            p.requires_grad_(True)
        net = TransferNet(task, backbone, neck, head)
        loader = MultiSourceLoader({"ds": train_ds}, {"ds": bs},
                                   {"ds": build_transform(task.name, size, train=True, augment=augment, resize=resize)},
                                   {"ds": task.name}, seed=seed, target_encoders=_encoders(task, head, size))
        try:
            final_loss = fit_transfer(net, _loader_batches(loader), tc, dev, show_progress, len(train_ds))
        finally:
            loader.close()

    net.eval()
    scores = _score(task, net, backbone, test_ds, num_classes, mode, cache, dev, original, keys[1], maps_of)
    return {**scores, "final_loss": final_loss}


def _encoders(task: Task, head: nn.Module, size: int) -> dict:
    """The training loader's target encoder (det: FCOS's matching, off the step), if the task has one."""
    encoder = task.target_encoder(head, size)
    return {"ds": encoder} if encoder is not None else {}


def _score(task: Task, net: nn.Module, backbone: nn.Module, test_ds, num_classes: int, mode: str,
           cache: dict | None, dev: torch.device, original: bool, key: tuple | None, maps_of: dict) -> dict[str, Any]:
    """The trained net scored on ``test_ds`` by the task's evaluator: on the cached test maps of the
    frozen backbone (computed once per cache), or end to end."""
    scorer = task.evaluator(num_classes, test_ds)
    if mode == "frozen":
        if "test" not in cache:
            cache["test"] = precompute_maps(backbone, test_ds, desc=f"{task.name} features (test)",
                                            original=original, key=key, **maps_of)
        maps, entries = cache["test"]["maps"], cache["test"]["entries"]
        for i in range(0, len(entries["images"]), EVAL_BATCH):
            part = slice(i, i + EVAL_BATCH)
            batch = take_cached(entries, part)
            scorer.update(net.predict({"features": [m[part].to(dev) for m in maps],
                                       "images": batch["images"].to(dev)}), batch)
    else:
        from xlearner.data.loader import eval_loader

        size, resize, show_progress = maps_of["size"], maps_of["resize"], maps_of["show_progress"]
        ev = eval_loader(test_ds, task.name, size, EVAL_BATCH, resize=resize, original=original)
        for b in progress(ev, total=len(ev), desc=f"{task.name} test", enable=show_progress):
            scorer.update(net.predict({"images": b["images"].to(dev)}), b)
    return scorer.compute()
