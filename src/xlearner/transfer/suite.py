"""`xlearner transfer`: one backbone on one downstream dataset, several seeds, mean and spread.

``transfer_one(backbone_path, source, cfg, mode=None, seeds=None) -> dict`` with keys
``dataset, task, metric (top1|mAP|mIoU), mode, seeds, scores, mean, std, extra, backbone,
backbone_params, wall_s`` (scores are fractions; the report shows points).
Seeds change the head initialisation and the data order; for the (deterministic) linear
probe they draw the 80% of the training features it is fitted on. The train subset
(``max_train_samples``) and the splits do not depend on the seed. A source without a test split
of its own (no ``test_*`` paths: its test records are its val records) is scored on val with
val's protocol (:func:`scored_split`, :func:`probe_seed`), and the result says so
(``eval_split: val`` and ``eval_split_note``).
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xlearner import tasks
from xlearner.config import BackboneConfig, ConfigError, RunConfig, SourceConfig
from xlearner.files import write_json_atomic
from xlearner.models.nets import count_parameters


# ----------------------------------------------------------------------------- inputs
def resolve_source(source: str | Path | SourceConfig) -> SourceConfig:
    """An embedded dataset name, a source YAML path, or a SourceConfig."""
    if isinstance(source, SourceConfig):
        return source
    text = str(source)
    p = Path(text)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        from xlearner.config import load_source_config

        return load_source_config(p)
    from xlearner.config import ConfigError
    from xlearner.data.embedded import EMBEDDED, EmbeddedDataError, info

    if text not in EMBEDDED:  # a mistyped name is a usage error (exit 2), not a failed fetch
        try:
            info(text)
        except EmbeddedDataError as exc:  # its message has the "did you mean" hint
            raise ConfigError(f"--source {text!r}: not a source YAML file, and {exc}") from None
    return SourceConfig(name=text, task=EMBEDDED[text].task, format="embedded", dataset=text)


def load_any_backbone(path: str | Path | nn.Module, cfg: RunConfig | None = None) -> tuple[BackboneConfig | None, nn.Module]:
    """A Backbone module, an exported .safetensors (``models.export.load_backbone``), a run folder
    (its product is exported on the fly), or a raw weights file loaded into ``cfg.backbone``'s architecture."""
    if isinstance(path, nn.Module):
        return getattr(path, "cfg", None), path
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"backbone {path} does not exist (expected a .safetensors from `xlearner export` or a run folder)")
    from xlearner.models.export import load_backbone

    if path.is_dir():
        from xlearner.runs import export_run

        with tempfile.TemporaryDirectory(prefix="xlearner-export-") as tmp:
            exported = Path(tmp) / "backbone.safetensors"
            export_run(path, exported, format=None)  # timm, or torchvision for tv:mobilenet_v2
            return load_any_backbone(exported, cfg)  # read into memory before the folder goes
    from xlearner.models.backbone import WEIGHTS_SUFFIXES, Backbone, WeightsError

    if path.suffix not in WEIGHTS_SUFFIXES:
        raise WeightsError(f"backbone {path}: expected a run folder or a weights file ({', '.join(WEIGHTS_SUFFIXES)}: "
                           f".safetensors from `xlearner export`, or a state_dict saved with torch.save)")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                has_arch = "arch" in (f.metadata() or {})
        except Exception as exc:
            raise WeightsError(f"{path}: not a readable .safetensors file ({exc}); if it was written by "
                               f"torch.save, rename it to .pth") from None
        if has_arch or cfg is None:
            return load_backbone(path)

    if cfg is None:
        raise ConfigError("loading a raw weights file needs a config naming the backbone architecture")
    bcfg = cfg.backbone.model_copy(update={"weights": path})
    return bcfg, Backbone(bcfg)


def _holdout(features: tuple, seed: int, fraction: float = 0.8) -> tuple[tuple, tuple]:
    """A seed's ``fraction`` of the features and the rest."""
    x, y = features
    order = np.random.default_rng(seed).permutation(len(y))
    n = max(2, math.ceil(fraction * len(y)))
    keep, rest = np.sort(order[:n]), np.sort(order[n:])
    return (x[keep], y[keep]), (x[rest], y[rest])


def probe_seed(train: tuple, val: tuple, scored: tuple, Cs, seed: int, n_seeds: int, eval_split: str) -> dict:
    """One seed's linear probe. On test, C is chosen on val and refit on train + val. When the
    scored split is val itself it can neither choose C nor be fitted on (a probe fitted on the
    images it is scored on measures memory, not features): C is chosen on the fifth of train
    left out of the seed's 80%, and the probe fitted on that 80% is scored."""
    from xlearner.transfer.linear_probe import probe

    if eval_split == "val":
        fit, tune = _holdout(train, seed=seed)
        return probe(fit, tune, scored, Cs, seed=seed, refit=False)
    return probe(_holdout(train, seed=seed)[0] if n_seeds > 1 else train, val, scored, Cs, seed=seed)


# ----------------------------------------------------------------------------- transfer
def scored_split(test: Any, eval_split: str) -> str:
    """The split a transfer scores: ``transfer.eval_split``, except that a source without a test part
    of its own (a reader's ``test_is_val``: no ``test_*`` paths, so test holds val's records) is
    scored as val, with val's protocol: the linear probe is never refit on the split it is scored on."""
    return "val" if eval_split == "val" or getattr(test, "test_is_val", False) else "test"


@dataclass
class _Data:
    """The splits of one transfer: train (the ``max_train_samples`` subset), the scored split and
    the keys naming each split's content (the eval batches every method of a run shares)."""

    train: Any
    test: Any
    scored: str
    keys: dict[str, tuple]
    num_classes: int


def _open_splits(src: SourceConfig, tc) -> _Data:
    from xlearner.data.sources import build_source
    from xlearner.transfer.features import subset

    train = subset(build_source(src, "train"), tc.max_train_samples, seed=src.split_seed)
    test = build_source(src, tc.eval_split)  # "val" only while tuning: test is touched once
    scored = scored_split(test, tc.eval_split)
    data_key = (src.model_dump_json(), tc.max_train_samples)
    keys = {split: (*data_key, split) for split in ("train", "val", scored)}
    num_classes = int(getattr(train, "num_classes", None) or len(train.class_names))
    return _Data(train, test, scored, keys, num_classes)


def _transfer_mode(task, tc, mode: str | None) -> str:
    mode = mode or getattr(tc, f"{task.name}_mode", task.transfer_modes[0])
    if mode not in task.transfer_modes:
        raise ConfigError(f"transfer mode {mode!r} does not apply to a {task.name} dataset; "
                          f"use one of {task.transfer_modes}")
    return mode


def _seed_list(cfg: RunConfig, seeds: int | list[int] | None) -> list[int]:
    if seeds is None:
        seeds = cfg.transfer.seeds
    seed_list = list(seeds) if isinstance(seeds, (list, tuple)) else [cfg.seed + i for i in range(int(seeds))]
    if not seed_list:
        raise ConfigError("transfer needs at least one seed")
    return seed_list


def transfer_one(backbone_path: str | Path | nn.Module, source: str | Path | SourceConfig, cfg: RunConfig,
                 mode: str | None = None, seeds: int | list[int] | None = None,
                 show_progress: bool = True, device: str | torch.device | None = None) -> dict[str, Any]:
    """Transfer one backbone to one downstream dataset over several seeds (see module docstring)."""
    t0 = time.time()
    src = resolve_source(source)
    tc = cfg.transfer.for_dataset(src.name)  # transfer.by_dataset: this dataset's own protocol
    cfg = cfg.model_copy(update={"transfer": tc})
    task = tasks.get(src.task)
    mode = _transfer_mode(task, tc, mode)
    seed_list = _seed_list(cfg, seeds)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    _, backbone = load_any_backbone(backbone_path, cfg)
    backbone.to(dev)
    n_params = count_parameters(backbone)
    data = _open_splits(src, tc)
    if tc.adapt_bn and mode in ("linear", "frozen"):
        from xlearner.transfer.features import adapt_batchnorm

        adapt_batchnorm(backbone, data.train, task.name, tc.image_size, max(tc.batch_size, 64), show_progress,
                        resize=src.resize_mode, key=data.keys["train"])
    if mode == "linear":
        scores, extra = _linear_seeds(backbone, src, data, tc, seed_list, show_progress)
    else:
        scores, extra = _trained_seeds(task, backbone, src, data, cfg, mode, seed_list, show_progress)
    from xlearner.report import mean, sample_std

    res = {
        "dataset": src.name, "task": task.name, "metric": task.metric, "mode": mode,
        "seeds": seed_list, "scores": scores, "mean": mean(scores), "std": sample_std(scores), "extra": extra,
        "backbone": str(backbone_path) if not isinstance(backbone_path, nn.Module) else "<module>",
        "backbone_params": n_params, "num_train": len(data.train), "num_test": len(data.test),
        "image_size": tc.image_size, "steps": tc.steps_of(task.name, len(data.train)) if mode != "linear" else None,
        "eval_split": data.scored, "wall_s": round(time.time() - t0, 2),
    }
    if data.scored != tc.eval_split:
        res["eval_split_note"] = (f"{src.name} has no test split of its own (no test_* paths): its val split "
                                  f"is scored, and no probe or head is fitted on it")
    return res


def _linear_seeds(backbone: nn.Module, src: SourceConfig, data: _Data, tc, seed_list: list[int],
                  show_progress: bool) -> tuple[list[float], dict[str, list]]:
    """The linear probe on pooled features (cls), once per seed."""
    from xlearner.data.sources import build_source
    from xlearner.transfer.features import extract_pooled

    val = build_source(src, "val")
    size, bs, keys = tc.image_size, max(tc.batch_size, 64), data.keys
    ftr = extract_pooled(backbone, data.train, size, bs, show_progress, "features (train)", key=keys["train"])
    fv = extract_pooled(backbone, val, size, bs, show_progress, "features (val)", key=keys["val"])
    fte = extract_pooled(backbone, data.test, size, bs, show_progress, "features (test)", key=keys[data.scored])
    scores: list[float] = []
    extra: dict[str, list] = {"C": [], "val_top1": []}
    for s in seed_list:
        # a deterministic probe: what varies with the seed is its training sample (80% of train)
        r = probe_seed(ftr, fv, fte, tc.probe_C, s, len(seed_list), data.scored)
        scores.append(r["top1"])
        extra["C"].append(r["C"])
        extra["val_top1"].append(r["val_top1"])
    return scores, extra


def _trained_seeds(task, backbone: nn.Module, src: SourceConfig, data: _Data, cfg: RunConfig, mode: str,
                   seed_list: list[int], show_progress: bool) -> tuple[list[float], dict[str, list]]:
    """frozen | finetune: the task's neck + head trained by the engine, once per seed (fine-tuning
    starts each seed from the backbone as it came, and leaves it so)."""
    from xlearner.transfer.train import transfer_trained

    tc = cfg.transfer
    scores: list[float] = []
    extra: dict[str, list] = {}
    cache: dict = {}
    pristine = copy.deepcopy(backbone.state_dict()) if mode == "finetune" else None
    for s in seed_list:
        if pristine is not None:
            backbone.load_state_dict(pristine)
        r = transfer_trained(task, backbone, data.train, data.test, data.num_classes, tc, mode=mode, seed=s,
                             fpn_channels=cfg.fpn_channels, size=tc.image_size, augment=tc.augment or cfg.augment.of(task.name),
                             cache=cache, show_progress=show_progress, resize=src.resize_mode,
                             original=src.scored_as_published, keys=(data.keys["train"], data.keys[data.scored]))
        scores.append(r[task.metric])
        for key, value in r.items():  # det AP50 (AP75, APs, APm, APl); seg pixel_acc (per_class_iou)
            if key not in (task.metric, "final_loss"):
                extra.setdefault(key, []).append(value)
        extra.setdefault("final_loss", []).append(r.get("final_loss"))
    if pristine is not None:
        backbone.load_state_dict(pristine)  # a module passed in is left as it came
    return scores, extra


def transfer_command(args) -> int:
    from xlearner.config import load_config

    cfg = load_config(args.config, list(getattr(args, "overrides", None) or []))
    res = transfer_one(args.backbone, args.source, cfg, mode=args.mode, seeds=args.seeds)
    write_json_atomic(Path(args.out), res)
    print(f"{res['dataset']} ({res['task']}, {res['mode']}): {res['metric']} "
          f"{100 * res['mean']:.1f} ± {100 * res['std']:.1f} over {len(res['seeds'])} seeds "
          f"[{', '.join(f'{100 * s:.1f}' for s in res['scores'])}] in {res['wall_s']:.0f} s -> {args.out}")
    if "eval_split_note" in res:
        print(f"xlearner transfer: note: {res['eval_split_note']} (eval_split: {res['eval_split']} in {args.out})")
    return 0
