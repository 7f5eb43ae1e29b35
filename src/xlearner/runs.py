"""Reading run folders (``run.json`` + ``model.safetensors``, written by `xlearner train`).

A run folder is read for three things: its own record (:func:`read_run`, :func:`run_info`), the
export of its backbone (:func:`export_run`, `xlearner export`), and the frozen teachers a squeeze
run loads from earlier runs (:func:`load_teacher`, :func:`load_generalist`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from xlearner.config import BackboneConfig, ConfigError, RunConfig
from xlearner.files import read_json

RUN_JSON = "run.json"
WEIGHTS = "model.safetensors"

if TYPE_CHECKING:
    from torch import nn


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RUN_JSON).is_file() and (Path(path) / WEIGHTS).is_file()


def read_run(run_dir: str | Path) -> dict:
    """The run.json of a finished run folder; ConfigError naming the missing or damaged file."""
    run_dir = Path(run_dir)
    for p in (run_dir / RUN_JSON, run_dir / WEIGHTS):
        if not p.is_file():
            raise ConfigError(f"{p} does not exist; give a run folder written by `xlearner train` "
                              f"(it holds {RUN_JSON} and {WEIGHTS})")
    path = run_dir / RUN_JSON
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); it was edited or damaged: restore it or train "
                          f"the stage again") from None


def run_info(run_dir: str | Path) -> dict | None:
    """The run.json of a stage folder, or None while it is missing or damaged (the report skips it)."""
    return read_json(Path(run_dir) / RUN_JSON)


# ----------------------------------------------------------------------------- export
def export_run(run_dir: str | Path, out: str | Path | None = None, format: str | None = "timm",
               branch: str | None = None) -> Path:
    """Write the backbone of a run folder (the product of `xlearner train`) alone, under library key names."""
    from safetensors.torch import load_file

    from xlearner.models.export import export_backbone_state, native_format, save_backbone

    run_dir = Path(run_dir)
    try:
        run = read_run(run_dir)
    except ConfigError as exc:
        raise ConfigError(f"export: {exc}") from None
    stage, config = run.get("stage"), run.get("config", {})
    bcfg = BackboneConfig.model_validate({**config.get("backbone", {}), "weights": None})
    if stage == "expansion":
        branch = branch or "cls"
        prefix = f"backbones.{branch}."
    else:
        if branch:
            print(f"note: --branch is only for expansion runs; {stage} has one backbone")
        prefix = "backbone."
    state = load_file(str(run_dir / WEIGHTS))
    if stage == "expansion" and not any(k.startswith(prefix) for k in state):
        have = sorted({k.split(".")[1] for k in state if k.startswith("backbones.")})
        raise ConfigError(f"export: expansion run has no {branch!r} branch; branches: {have}")
    fmt = format or native_format(bcfg.name)  # None: the library the keys belong to
    try:
        tensors = export_backbone_state(state, prefix, fmt, bcfg.name, bcfg.kwargs)
    except ValueError as exc:
        raise ConfigError(f"export: {exc}") from None
    base = bcfg.name[3:] if bcfg.name.startswith("tv:") else bcfg.name
    out_cfg = bcfg.model_copy(update={"name": f"tv:{base}" if fmt == "torchvision" else base})
    out = Path(out) if out else run_dir / f"backbone_{fmt}.safetensors"
    save_backbone(out, tensors, out_cfg)
    params = sum(v.numel() for k, v in tensors.items() if v.is_floating_point() and "running_" not in k)
    print(f"wrote {out}: {len(tensors)} tensors, {params:,} parameters, {fmt} key names for {out_cfg.name} "
          f"(from the {stage} run's {prefix.rstrip('.')})")
    return out


def export_command(args) -> int:
    """``xlearner export RUN_DIR --format timm|torchvision [--branch cls|det|seg] --out FILE``."""
    export_run(args.run_dir, getattr(args, "out", None), getattr(args, "format", None),
               getattr(args, "branch", None))
    return 0


# ----------------------------------------------------------------------------- squeeze teachers
def resolve_teacher_dir(path: str | Path | None, default: Path | None = None) -> Path:
    """The expansion run folder: ``squeeze.teacher`` (folder or its model.safetensors) or ``default``."""
    if path is None:
        if default is not None and (default / RUN_JSON).is_file():
            return default
        where = f" (looked for {default})" if default is not None else ""
        raise ConfigError("squeeze.teacher is not set: give the expansion run folder, e.g. "
                          f"squeeze.teacher=runs/<name>/expansion{where}")
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        p = p.parent
    if not is_run_dir(p):
        raise ConfigError(f"squeeze.teacher={path}: expected an expansion run folder holding run.json and "
                          f"model.safetensors (written by `xlearner train CONFIG --stage expansion`)")
    return p


def load_teacher(run_dir: Path) -> tuple[nn.Module, RunConfig, list]:
    """Rebuild the expansion ExpandedNet from ``run.json`` and load ``model.safetensors`` (strict), frozen."""
    from safetensors.torch import load_file

    from xlearner.models.nets import SourceSpec
    from xlearner.stages.expansion import build_expanded_net

    info = read_run(run_dir)
    if info.get("stage") != "expansion":
        raise ConfigError(f"squeeze.teacher={run_dir} is a '{info.get('stage')}' run; the teacher must be an expansion run")
    tcfg = RunConfig.model_validate(info["config"])
    tcfg.backbone = tcfg.backbone.model_copy(update={"weights": None})  # everything comes from the file
    specs = [SourceSpec(s["name"], s["task"], int(s["num_classes"])) for s in info["sources"]]
    net = build_expanded_net(tcfg, specs)
    state = load_file(str(Path(run_dir) / WEIGHTS))
    net.load_state_dict(state, strict=True)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, tcfg, specs


def resolve_generalist_dir(value: str, default: Path | None = None) -> Path:
    """``squeeze.generalist``: ``msmt`` (the MSMT baseline beside this run: ``default``) or a run folder."""
    p = default if value == "msmt" and default is not None else Path(value)
    if not is_run_dir(p):
        hint = " (in `xlearner run` it is the run's msmt baseline, trained first)" if value == "msmt" else ""
        raise ConfigError(f"squeeze.generalist={value}: expected a run folder holding run.json and model.safetensors "
                          f"at {p}{hint}; train one with `xlearner train CONFIG --stage msmt --out {p}`")
    return p


def load_generalist(run_dir: Path) -> nn.Module:
    """The backbone of a single-backbone run (MSMT, MSST, SSST, squeeze), frozen: a generalist teacher."""
    from safetensors.torch import load_file

    from xlearner.models.backbone import Backbone

    info = read_run(run_dir)
    if info.get("stage") == "expansion":
        raise ConfigError(f"squeeze.generalist={run_dir} is an expansion run; the generalist is one backbone "
                          f"trained on every source, e.g. the msmt baseline")
    gcfg = RunConfig.model_validate(info["config"])
    backbone = Backbone(gcfg.backbone.model_copy(update={"weights": None}))
    state = {k[len("backbone."):]: v for k, v in load_file(str(Path(run_dir) / WEIGHTS)).items()
             if k.startswith("backbone.")}
    backbone.load_state_dict(state, strict=True)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone
