"""Reading run folders (``run.json`` + ``model.safetensors``, written by `xlearner train`).

A run folder is read for three things: its own record (:func:`read_run`, :func:`run_info`), the
export of its backbone (:func:`export_run`, `xlearner export`), and the frozen teachers a squeeze
run loads from earlier runs (:func:`load_teacher`, :func:`load_generalist`). While a stage trains
into it, the folder is locked (:func:`run_folder_lock`), and `xlearner train` checks what the folder
already holds before it resumes or replaces it (:func:`prepare_run_folder`).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from xlearner.config import BackboneConfig, ConfigError, RunConfig
from xlearner.files import read_json

RUN_JSON = "run.json"
WEIGHTS = "model.safetensors"
LOCK = "run.lock"

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


# ----------------------------------------------------------------------------- lock
class RunLockedError(ConfigError):
    """Another live process trains into the same run folder."""


def _alive(pid: int) -> bool:
    """A process ``pid`` runs on this host (a zombie, killed but not yet reaped, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextmanager
def run_folder_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``run_dir/run.lock`` (the holder's pid and host) while a stage trains into ``run_dir``.

    Two runs into one folder would interleave their logs and the last to finish would win the model:
    the second is refused (:class:`RunLockedError`, naming the folder and the holder). A lock whose
    holder is gone from this host (killed with SIGKILL, a torchrun worker restarted) is taken over
    with a warning; a holder on another host cannot be checked, so its lock is reported, not taken.
    Under torchrun only rank 0 takes it. The check-and-write runs under ``flock``, so two starts at
    the same moment cannot both win."""
    path = Path(run_dir) / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    with _exclusive(path) as f:
        holder = _read_lock(f)
        if holder:  # this very process too: a nested run into its own folder would interleave the same way
            same_host = holder.get("host") == me["host"]
            if not same_host or _alive(int(holder.get("pid", -1))):
                where = "" if same_host else (f"; it runs on another host, or it ended there without releasing: "
                                              f"if no run uses the folder, delete {path}")
                raise RunLockedError(f"run folder {run_dir} is in use by process {holder.get('pid')} on host "
                                     f"{holder.get('host')} (lock {path}){where}; wait for that run to end, or "
                                     f"give another --out")
            warnings.warn(f"run folder {run_dir}: taking over the lock of process {holder.get('pid')}, which no "
                          f"longer runs (killed?); its checkpoint is resumed with --resume", stacklevel=2)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(me))
        f.flush()
    try:
        yield path
    finally:
        with _exclusive(path) as f:
            if _read_lock(f) == me:
                path.unlink(missing_ok=True)


@contextmanager
def _exclusive(path: Path):
    """``path`` opened for update under an exclusive ``flock`` (held for the few lines of the block)."""
    f = open(path, "a+")
    try:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock (Windows, some network filesystems): the pid check alone
            pass
        yield f
    finally:
        f.close()  # releases the flock


def _read_lock(f) -> dict | None:
    f.seek(0)
    try:
        holder = json.loads(f.read() or "null")
    except json.JSONDecodeError:
        return None
    return holder if isinstance(holder, dict) else None


# ----------------------------------------------------------------------------- resume and overwrite
IGNORED_ON_RESUME = ("name", "transfer", "gates", "train.progress", "train.log_every", "train.ckpt_every",
                     "train.num_workers", "train.compile_mode")
"""Settings that do not change what a stage trains (display, checkpoint frequency, loader workers,
how kernels launch; the sections read by transfer and the report): a resume may change them."""
ALLOWED_ON_RESUME = ("train.steps", "baselines.steps", "expansion.steps", "squeeze.steps", "train.val_every",
                     "train.val_batches", "train.precise_bn_batches")
"""Settings a resume may change when ``--allow-change`` names them: more steps (the schedule is then
that of the new count), and how often and on how much it validates. The others would not continue
the same run: the optimizer's state and the schedule's base lr are restored from the checkpoint
(``train.lr`` would silently keep its old value), the data stream's position belongs to the batch
sizes, the weights to the architecture."""
RUN_OUTPUTS = (WEIGHTS, RUN_JSON, "log.jsonl", "error.log", "part.json", "tb", "checkpoints")
"""What `xlearner train` writes into a run folder; ``--overwrite`` deletes it (and exported backbones)."""


def flat_config(d: dict, prefix: str = "") -> dict[str, object]:
    """A config as ``{dotted key: value}``; sources are addressed by name (``sources.mnist.batch_size``)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if k == "sources" and not prefix and isinstance(v, list):
            v = {str(s.get("name", i)): s for i, s in enumerate(v)}
        if isinstance(v, dict) and v:
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: dict, new: dict, ignored: tuple[str, ...] = IGNORED_ON_RESUME) -> dict[str, tuple]:
    """``{dotted key: (old value, new value)}`` for every setting that differs (absent: ``"(absent)"``)."""
    a, b = flat_config(old), flat_config(new)
    skip = lambda k: any(k == i or k.startswith(i + ".") for i in ignored)  # noqa: E731
    return {k: (a.get(k, "(absent)"), b.get(k, "(absent)")) for k in sorted(set(a) | set(b))
            if not skip(k) and a.get(k, "(absent)") != b.get(k, "(absent)")}


def saved_run(run_dir: str | Path) -> dict | None:
    """What a run folder already holds: ``{"stage", "config", "step", "finished"}`` from its checkpoint
    (the config rides in it: ``extra_state``) or its run.json; None when it holds neither."""
    from xlearner.engine.checkpoint import checkpoint_path, load_checkpoint

    run_dir = Path(run_dir)
    info = run_info(run_dir) or {}
    finished = info.get("status") == "done" and (run_dir / WEIGHTS).is_file()
    ckpt = checkpoint_path(run_dir)
    if ckpt.is_file():
        state = load_checkpoint(ckpt)
        extra = state.get("extra_state") or {}
        config = extra.get("config") or (info.get("config") if finished else None)
        return {"stage": extra.get("stage", info.get("stage")), "config": config, "step": int(state["step"]),
                "finished": finished}
    if finished or info:
        return {"stage": info.get("stage"), "config": info.get("config"),
                "step": int((info.get("cost") or {}).get("steps", 0)), "finished": finished}
    return None


def clear_run_outputs(run_dir: str | Path) -> list[str]:
    """Delete what earlier `xlearner train` runs wrote into ``run_dir`` (model, record, logs,
    TensorBoard events, checkpoints, exported backbones); other files stay. Returns the names removed."""
    run_dir = Path(run_dir)
    gone = [p for p in [*(run_dir / n for n in RUN_OUTPUTS), *run_dir.glob("backbone_*.safetensors")] if p.exists()]
    for p in gone:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return [p.name for p in gone]


def prepare_run_folder(run_dir: str | Path, stage: str, config: dict, *, stage_steps: int, resume: bool,
                       overwrite: bool = False, allow_change: list[str] | tuple[str, ...] = (),
                       restarted: int = 0) -> bool:
    """Check what ``run_dir`` holds against the run about to start there; return whether to resume.

    - ``resume``: the folder's stage and config (checkpoint, else run.json) must equal the new ones
      but for :data:`IGNORED_ON_RESUME` and the keys ``allow_change`` names (only
      :data:`ALLOWED_ON_RESUME`); otherwise :class:`ConfigError` listing each differing key;
    - not ``resume``: a folder holding a run (finished, or a checkpoint) is refused unless
      ``overwrite``, which deletes its outputs first (:func:`clear_run_outputs`);
    - ``restarted`` (torchrun's elastic restart count > 0): the worker group was restarted mid-run,
      so the stage resumes from its checkpoint whatever the command line said (``--overwrite`` would
      throw the progress away), with the same checks.
    """
    run_dir = Path(run_dir)
    bad = [k for k in allow_change if k not in ALLOWED_ON_RESUME]
    if bad:
        raise ConfigError(f"--allow-change {' '.join(bad)}: a resumed run cannot change "
                          f"{'it' if len(bad) == 1 else 'them'}; it may change {', '.join(ALLOWED_ON_RESUME)}. "
                          f"Train into another --out, or start this folder again with --overwrite")
    if restarted:
        resume, overwrite = True, False
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the folder and --overwrite deletes it: give one of them")
    saved = saved_run(run_dir)
    if saved is None:
        if overwrite:
            clear_run_outputs(run_dir)  # a run killed before its first checkpoint left logs and events
        return resume
    if not resume:
        if not overwrite:
            what = (f"a finished {saved['stage']} run" if saved["finished"]
                    else f"an unfinished {saved['stage']} run (checkpoint at step {saved['step']})")
            raise ConfigError(f"run folder {run_dir} holds {what}: continue it with --resume (--allow-change "
                              f"train.steps for more steps), or replace it with --overwrite (its model, logs, "
                              f"checkpoints and TensorBoard events are deleted), or give another --out")
        removed = clear_run_outputs(run_dir)
        print(f"--overwrite: removed {', '.join(removed)} from {run_dir}", flush=True)
        return False
    if saved["stage"] != stage:
        raise ConfigError(f"run folder {run_dir} holds a {saved['stage']} run; --resume with --stage {stage} would "
                          f"replace it with another stage: resume it with --stage {saved['stage']}, or give another "
                          f"--out")
    if saved["config"] is None:
        warnings.warn(f"{run_dir}: its checkpoint does not record the config it was trained with (written by an "
                      f"older xlearner): resuming without comparing the configs", stacklevel=2)
        return True
    changes = config_changes(saved["config"], config)
    refused = {k: v for k, v in changes.items() if k not in allow_change}
    if refused:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(refused.items())[:8])
        more = f" (and {len(refused) - 8} more)" if len(refused) > 8 else ""
        allowable = [k for k in refused if k in ALLOWED_ON_RESUME]
        hint = (f"--allow-change {' '.join(allowable)} accepts {'that' if len(allowable) == 1 else 'those'}; "
                if allowable else "")
        raise ConfigError(f"--resume {run_dir}: the config differs from the one the run was trained with: {shown}{more}. "
                          f"{hint}the others cannot change within a run: train into another --out, or restart "
                          f"the folder with --overwrite")
    if stage_steps < saved["step"]:
        raise ConfigError(f"--resume {run_dir}: the run already trained {saved['step']} steps, more than the "
                          f"{stage_steps} asked for: give at least {saved['step']}")
    if changes:
        print(f"resuming {run_dir} with changed settings: "
              + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()), flush=True)
    return True


# ----------------------------------------------------------------------------- export
def export_run(run_dir: str | Path, out: str | Path | None = None, format: str | None = "timm",
               branch: str | None = None) -> Path:
    """Write the backbone of a run folder (the product of `xlearner train`) alone, under library key names."""
    from xlearner.models.export import export_backbone_state, native_format, read_weights, save_backbone

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
    state = read_weights(run_dir / WEIGHTS, f"the {stage} run's model")
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
    from xlearner.models.export import read_weights
    from xlearner.models.nets import SourceSpec
    from xlearner.stages.expansion import build_expanded_net

    info = read_run(run_dir)
    if info.get("stage") != "expansion":
        raise ConfigError(f"squeeze.teacher={run_dir} is a '{info.get('stage')}' run; the teacher must be an expansion run")
    tcfg = RunConfig.model_validate(info["config"])
    tcfg.backbone = tcfg.backbone.model_copy(update={"weights": None})  # everything comes from the file
    specs = [SourceSpec(s["name"], s["task"], int(s["num_classes"])) for s in info["sources"]]
    net = build_expanded_net(tcfg, specs)
    state = read_weights(Path(run_dir) / WEIGHTS, "the teacher's model")
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
    from xlearner.models.backbone import Backbone
    from xlearner.models.export import read_weights

    info = read_run(run_dir)
    if info.get("stage") == "expansion":
        raise ConfigError(f"squeeze.generalist={run_dir} is an expansion run; the generalist is one backbone "
                          f"trained on every source, e.g. the msmt baseline")
    gcfg = RunConfig.model_validate(info["config"])
    backbone = Backbone(gcfg.backbone.model_copy(update={"weights": None}))
    state = {k[len("backbone."):]: v for k, v in read_weights(Path(run_dir) / WEIGHTS, "the generalist's model").items()
             if k.startswith("backbone.")}
    backbone.load_state_dict(state, strict=True)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone
