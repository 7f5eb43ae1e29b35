"""A backbone alone, under timm or torchvision key names (the run-folder side is ``xlearner.runs.export_run``).

The backbone already keeps the key names of the model it was built from
(see ``backbone.py``), so exporting is: take the keys under a prefix, check them against
the target library's own model (names and shapes), and write a .safetensors whose
metadata (arch, kwargs, out_indices) is enough to rebuild the backbone (``load_backbone``).
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from xlearner.config import BackboneConfig
from xlearner.files import write_bytes_atomic
from xlearner.models.backbone import TV_MOBILENETS, TV_RESNETS, Backbone, check_finite, create_full_model


def native_format(arch: str) -> str:
    """The export format a backbone's keys belong to: torchvision for ``tv:mobilenet_v2`` (timm's
    MobileNetV2 names its modules differently), timm for everything else."""
    return "torchvision" if arch.startswith("tv:") and arch[3:] in TV_MOBILENETS else "timm"


def _reference_state(format: str, arch: str, kwargs: dict) -> dict[str, Tensor]:
    base = arch[3:] if arch.startswith("tv:") else arch
    if format == "torchvision":
        if base not in TV_RESNETS + TV_MOBILENETS:
            raise ValueError(f"torchvision format is only for the standard torchvision ResNets and MobileNetV2 "
                             f"({', '.join(TV_RESNETS + TV_MOBILENETS)}); {arch!r} is not one: use --format timm")
        if kwargs and not arch.startswith("tv:"):
            raise ValueError(f"{arch} was built with timm kwargs {kwargs}, which torchvision.models.{base}() cannot "
                             f"express: use --format timm")
        return create_full_model(f"tv:{base}", kwargs).state_dict()
    if format == "timm":
        if base in TV_MOBILENETS:
            raise ValueError(f"{arch} has torchvision key names (timm's MobileNetV2 is mobilenetv2_100, with other "
                             f"names): use --format torchvision")
        if arch.startswith("tv:") and kwargs:
            raise ValueError(f"{arch} was built with torchvision kwargs {kwargs}: use --format torchvision")
        return create_full_model(base, kwargs).state_dict()
    raise ValueError(f"unknown export format {format!r}: timm or torchvision")


def export_backbone_state(state_dict: dict[str, Tensor], prefix: str, format: str, arch: str,
                          kwargs: dict | None = None) -> dict[str, Tensor]:
    """Keys under ``prefix`` renamed to those of ``timm.create_model(arch, num_classes=0, **kwargs)``
    or ``torchvision.models.<arch>()`` minus ``fc``; names and shapes are checked against that model."""
    tensors = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not tensors:
        tops = sorted({k.split(".")[0] + "." for k in state_dict})
        raise ValueError(f"no keys under prefix {prefix!r}; top-level prefixes: {tops}")
    ref = _reference_state(format, arch, dict(kwargs or {}))
    unexpected = [k for k in tensors if k not in ref]
    if unexpected:
        raise ValueError(f"{len(unexpected)} keys have no place in {format} {arch}: {unexpected[:5]}")
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(ref[k].shape)}" for k, v in tensors.items() if v.shape != ref[k].shape]
    if bad:
        raise ValueError(f"shape mismatch against {format} {arch} (wrong kwargs?): {bad[:3]}")
    missing = [k for k in ref if k not in tensors]
    if missing:
        # only the unused tail after the last feature stage (e.g. conv_head) can be absent
        print(f"note: {len(missing)} keys of {arch} are not part of the trained backbone "
              f"(the unused part after its last feature stage), e.g. {missing[:3]}; load with strict=False")
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def save_backbone(path: str | Path, tensors: dict[str, Tensor], backbone_cfg: BackboneConfig) -> Path:
    """Write the tensors with the metadata ``load_backbone`` needs to rebuild the backbone."""
    from safetensors.torch import save

    meta = {"arch": backbone_cfg.name, "kwargs": json.dumps(backbone_cfg.kwargs),
            "out_indices": json.dumps(list(backbone_cfg.out_indices))}
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return write_bytes_atomic(path, save(state, metadata=meta))  # a full disk: an OSError naming the file


def read_weights(path: str | Path, what: str = "weights file") -> dict[str, Tensor]:
    """The tensors of a .safetensors written by xlearner (a run's model, an exported backbone), checked:
    a damaged file (truncated, not safetensors) or a NaN/inf tensor is a WeightsError naming the file
    (and the first such tensor), instead of a crash further on (sklearn refusing NaN features)."""
    from safetensors.torch import load_file

    from xlearner.models.backbone import WeightsError

    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise WeightsError(f"{what} {path} does not exist") from None
    except Exception as exc:  # SafetensorError: truncated, or not a .safetensors file
        raise WeightsError(f"{what} {path} is damaged or not a .safetensors file ({exc}); it was cut short "
                           f"(a full disk, a copy interrupted) or replaced: train or export it again, or restore "
                           f"a copy") from None
    check_finite(state, path, what)
    return state


def load_backbone(path: str | Path) -> tuple[BackboneConfig, Backbone]:
    """Rebuild a backbone from an exported file alone (weights loaded strictly)."""
    from safetensors import safe_open

    from xlearner.models.backbone import WeightsError

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # a truncated header
        raise WeightsError(f"backbone {path} is damaged or not a .safetensors file ({exc}): export it again "
                           f"(`xlearner export`) or restore a copy") from None
    if "arch" not in meta:
        raise ValueError(f"{path} has no 'arch' metadata: it was not written by `xlearner export`")
    cfg = BackboneConfig(name=meta["arch"], kwargs=json.loads(meta.get("kwargs", "{}")),
                         out_indices=tuple(json.loads(meta.get("out_indices", "[1, 2, 3, 4]"))))
    backbone = Backbone(cfg)
    state = read_weights(path, "backbone")
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # missing/unexpected keys or shapes: the file does not fit its own metadata
        raise WeightsError(f"{path}: its tensors do not fit the {cfg.name} backbone its metadata names "
                           f"({str(exc).splitlines()[0]} ...); export it again with `xlearner export`") from None
    return cfg, backbone
