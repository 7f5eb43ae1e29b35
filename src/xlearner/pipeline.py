"""`xlearner run`: the main job on the embedded benchmark, end to end.

fetch -> expansion -> squeeze -> baselines (ssst, msst per task, msmt, scratch) -> export every
method's backbone -> transfer of every backbone to every downstream dataset -> report.
With a ``tv:mobilenet_v2`` backbone, torchvision's ImageNet MobileNetV2 is transferred too, as the
method ``imagenet`` (no training stage here; ``baselines.imagenet``).

Each part is keyed by the hash of the configuration sections it depends on, stored
in its output; a rerun skips parts whose key matches and resumes an interrupted
training part from its last checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from xlearner.ablations import ABLATIONS, LEVERS, ablation_names, ablation_overrides  # noqa: F401 (re-exported)
from xlearner.config import RunConfig, load_config
from xlearner.files import read_json, write_json_atomic, write_text_atomic


def imagenet_compatible(cfg: RunConfig) -> bool:
    """The run's backbone is torchvision's MobileNetV2 at the standard width: the ImageNet weights fit it."""
    return cfg.backbone.name == "tv:mobilenet_v2" and not cfg.backbone.kwargs


MODEL_LAYOUT = 4
"""Bumped when the models' layout or losses change for the same config (2: det head on FCOS's
levels P3..P7, no stride-4 level; 3: the squeeze student is the stage's ``net`` as in every stage, and
``baselines.ssst_task`` exists; 4: the det head's two towers fused, ``FusedFCOSHead``): finished
parts of an older layout are not reused."""


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps((MODEL_LAYOUT, *parts), sort_keys=True, default=str).encode()).hexdigest()[:16]


UNKEYED = {"train": ("progress", "log_every", "ckpt_every", "num_workers", "compile_mode"),
           "squeeze": ("teacher",), "transfer": ("datasets",), "baselines": ("ssst_source", "ssst_task",
                                                                            "msst_task", "imagenet", "teachers")}
"""Settings that change no result of the parts keyed by their section: display and checkpoint
frequency, loader workers (the data stream does not depend on them), torch.compile's mode (how
the step's kernels are launched, not what they compute), the teacher folder (the
main job sets it), the list of transfer datasets (each transfer part is keyed by its own
dataset) and the baselines' choices (each baseline is keyed by the ones it reads: ``Stage.keyed``)."""


def _sections(cfg: RunConfig, *names: str) -> dict:
    d = cfg.to_dict()
    return {n: {k: v for k, v in d[n].items() if k not in UNKEYED.get(n, ())} if isinstance(d[n], dict) else d[n]
            for n in names}


UPSTREAM = ("seed", "image_size", "fpn_channels", "det_head_convs", "seg_background_weight", "seg_head",
            "seg_loss_points", "backbone", "augment", "sources", "train")


@dataclass
class Part:
    """One resumable unit of the main job: a plain record, run by :func:`run_part`.

    ``kind``: ``train`` (stage ``stage`` with config ``cfg`` into folder ``path``), ``export``
    (the backbone of run folder ``source``, or the ImageNet model when ``source`` is None, branch
    ``branch``, to ``path``) or ``transfer`` (backbone file ``source`` to embedded dataset
    ``dataset``, result JSON ``path``). ``key``: hash of everything the part depends on; a
    finished part whose key matches is skipped. ``weight``: rough relative duration (the
    time-left estimate). ``deps``: names of the parts that must run first.
    """

    name: str
    kind: str
    key: str
    weight: float
    path: Path
    cfg: RunConfig | None = None
    stage: str | None = None
    source: Path | None = None
    branch: str | None = None
    dataset: str | None = None
    deps: list[str] = field(default_factory=list)


def part_done(part: Part) -> bool:
    """Finished with the same key (a train part: its model and a done run.json are there too)."""
    if part.kind == "train":
        from xlearner.runs import is_run_dir, run_info

        return ((read_json(part.path / "part.json") or {}).get("key") == part.key and is_run_dir(part.path)
                and (run_info(part.path) or {}).get("status") == "done")
    marker = part.path.with_suffix(".json") if part.kind == "export" else part.path
    return (read_json(marker) or {}).get("key") == part.key and part.path.is_file()


def run_part(part: Part, cfg: RunConfig) -> None:
    """Run one part: train a stage (resuming its checkpoint when the key is unchanged), export a
    backbone, or transfer one to one dataset; each records its key when it is done."""
    if part.kind == "train":
        from xlearner.stages import train_stage

        info = read_json(part.path / "part.json") or {}
        resume = (part.path / "checkpoints" / "last.pt").is_file() and info.get("key") == part.key
        write_json_atomic(part.path / "part.json", {"key": part.key, "status": "running"})
        train_stage(part.cfg, part.stage, part.path, resume=resume)
        write_json_atomic(part.path / "part.json", {"key": part.key, "status": "done"})
    elif part.kind == "export":
        if part.source is None:
            export_imagenet(cfg, part.path)
        else:
            from xlearner.models.export import native_format
            from xlearner.runs import export_run

            export_run(part.source, part.path, format=native_format(cfg.backbone.name), branch=part.branch)
        write_json_atomic(part.path.with_suffix(".json"), {"key": part.key})
    elif part.kind == "transfer":
        from xlearner.transfer.suite import transfer_one

        write_json_atomic(part.path, {**transfer_one(part.source, part.dataset, cfg), "key": part.key})
    else:
        raise ValueError(f"unknown part kind {part.kind!r}")


def _baseline_key(stage_cls, dirname: str, bcfg: RunConfig) -> str:
    """A baseline's key: the upstream settings and the ``baselines`` fields it reads (``Stage.keyed``)."""
    chosen = {k: getattr(bcfg.baselines, k) for k in stage_cls.keyed}
    return _key(dirname, _sections(bcfg, *UPSTREAM), chosen)


def build_parts(cfg: RunConfig, out: Path, ablation: str | list[str] | None = None
                ) -> tuple[list[Part], dict[str, list[str]]]:
    """The list of parts of the main job and, per method, the stage folders whose cost it carries.

    ``ablation``: one name or several (see :func:`ablation_names`); each adds a method ``xlearner[name]``."""
    plan = _Plan(cfg, out)
    _xlearner_parts(plan, "", cfg, "xlearner", direct=False)
    _ablation_parts(plan, ablation_names(ablation))
    _baseline_parts(plan)
    _imagenet_method(plan)
    _export_and_transfer_parts(plan)
    return in_dependency_order(plan.parts), plan.methods


@dataclass
class _Plan:
    """What :func:`build_parts` gathers, method by method: the parts, the stage folders each
    method's cost carries, and the backbone each method is transferred from."""

    cfg: RunConfig
    out: Path
    parts: list[Part] = field(default_factory=list)
    methods: dict[str, list[str]] = field(default_factory=dict)
    backbone_of: dict[str, tuple[str | None, str, str | None]] = field(default_factory=dict)
    """method -> (stage folder, part key, branch); stage folder None: not trained here (imagenet)."""
    main_expansion_key: str | None = None

    def train(self, dirname: str, stage: str, stage_cfg: RunConfig, key: str, weight: float,
              deps: list[str] | None = None) -> None:
        self.parts.append(Part(dirname, "train", key, weight, self.out / dirname, cfg=stage_cfg, stage=stage,
                               deps=deps or []))


def _xlearner_parts(plan: _Plan, prefix: str, xcfg: RunConfig, method: str, direct: bool) -> None:
    """X-Learner (or one ablation of it, folders under ``prefix``): expansion, then squeeze; with
    ``direct`` the expansion's branch of the ssst task (cls by default) is transferred instead."""
    exp_dir, exp_key = _expansion_part(plan, prefix, xcfg)
    if direct:
        plan.methods[method] = [exp_dir]
        task = xcfg.baselines.ssst_task
        plan.backbone_of[method] = (exp_dir, exp_key, task if task in xcfg.tasks else xcfg.tasks[0])
        return
    sq_key, deps = _squeeze_part(plan, prefix, xcfg, exp_dir, exp_key)
    # the method's cost: every stage it needs (the generalist teacher's training included)
    plan.methods[method] = [exp_dir] + deps[1:] + [f"{prefix}squeeze"]
    plan.backbone_of[method] = (f"{prefix}squeeze", sq_key, None)
    if not prefix and xcfg.baselines.teachers:  # the squeeze's teachers, each branch as a backbone
        for task in xcfg.tasks:
            plan.methods[teacher_method(task)] = [exp_dir]
            plan.backbone_of[teacher_method(task)] = (exp_dir, exp_key, task)


def teacher_method(task: str) -> str:
    """The method name of the expansion branch of ``task`` transferred as a backbone (a teacher row)."""
    return f"xlearner.expansion[{task}]"


def _expansion_part(plan: _Plan, prefix: str, xcfg: RunConfig) -> tuple[str, str]:
    """The expansion stage's folder and key; an ablation of the squeeze stage only reuses the main
    expansion model (its teacher) instead of training the same one again."""
    from xlearner.stages import STAGES

    exp_key = _key("expansion", _sections(xcfg, *UPSTREAM, "expansion"))
    exp_dir = f"{prefix}expansion"
    if prefix and plan.main_expansion_key == exp_key:
        exp_dir = "expansion"
    else:
        plan.train(exp_dir, "expansion", xcfg, exp_key, STAGES["expansion"].steps(xcfg) * len(plan.cfg.tasks))
    if not prefix:
        plan.main_expansion_key = exp_key
    return exp_dir, exp_key


def _squeeze_part(plan: _Plan, prefix: str, xcfg: RunConfig, exp_dir: str, exp_key: str
                  ) -> tuple[str, list[str]]:
    """The squeeze stage taught by the expansion model of ``exp_dir``: its key and the parts it needs."""
    from xlearner.stages import STAGES

    cfg, out = plan.cfg, plan.out
    sq_cfg = xcfg.model_copy(deep=True)
    sq_cfg.squeeze.teacher = out / exp_dir
    sq_key = _key("squeeze", exp_key, _sections(xcfg, *UPSTREAM, "squeeze"))
    deps = [exp_dir]
    if xcfg.squeeze.generalist == "msmt":  # the generalist teacher is this run's MSMT baseline
        sq_cfg.squeeze.generalist = str(out / "msmt")
        sq_key = _key(sq_key, _baseline_key(STAGES["msmt"], "msmt", STAGES["msmt"].configure(cfg)))
        deps.append("msmt")
    plan.train(f"{prefix}squeeze", "squeeze", sq_cfg, sq_key, STAGES["squeeze"].steps(xcfg) * (len(cfg.tasks) + 1), deps)
    return sq_key, deps


def _ablation_parts(plan: _Plan, names: list[str]) -> None:
    """Each ablation: X-Learner's parts again with its overrides, under ``ablations/<name>/``."""
    cfg = plan.cfg
    for name in names:
        if name == "expansion_direct" and cfg.baselines.teachers:
            warnings.warn(f"ablation expansion_direct is the teacher row {teacher_method(cfg.baselines.ssst_task)} "
                          "of this run (baselines.teachers): skipped", stacklevel=3)
            continue
        acfg = load_config_like(cfg, ablation_overrides(name, cfg))
        if name != "expansion_direct" and acfg.to_dict() == cfg.to_dict():
            warnings.warn(f"ablation {name} changes nothing in this config ({', '.join(ablation_overrides(name, cfg))} "
                          f"already hold): skipped", stacklevel=3)  # the caller of build_parts
            continue
        _xlearner_parts(plan, f"ablations/{name}/", acfg, f"xlearner[{name}]", direct=name == "expansion_direct")


def _baseline_parts(plan: _Plan) -> None:
    """The registry's baseline stages on the same engine, for baselines.steps, once per task where ``per_task``."""
    from xlearner.stages import STAGES

    cfg = plan.cfg
    for stage_cls in STAGES.values():
        if not stage_cls.baseline or not stage_cls.applies(cfg):
            continue
        for task in (cfg.tasks if stage_cls.per_task else [None]):
            dirname = f"{stage_cls.name}_{task}" if task else stage_cls.name
            bcfg = stage_cls.configure(cfg, task)
            key = _baseline_key(stage_cls, dirname, bcfg)
            plan.train(dirname, stage_cls.name, bcfg, key, stage_cls.steps(cfg) or 0.5)
            plan.methods[dirname] = [dirname]
            plan.backbone_of[dirname] = (dirname, key, None)


def _imagenet_method(plan: _Plan) -> None:
    """The current pretrained model, untouched (no training stage here)."""
    cfg = plan.cfg
    if cfg.baselines.imagenet and imagenet_compatible(cfg):
        from xlearner.data.pretrained import IMAGENET_SHA256

        plan.methods["imagenet"] = []  # its ImageNet pretraining is an external cost, not counted
        plan.backbone_of["imagenet"] = (None, _key("imagenet", IMAGENET_SHA256, cfg.backbone.out_indices), None)


def _export_and_transfer_parts(plan: _Plan) -> None:
    """Per method: export its backbone, then transfer it to every downstream dataset."""
    cfg, out = plan.cfg, plan.out
    # transfer_one reads these sections (fpn_channels: the transfer necks; augment: fine-tuning)
    transfer_sections = _sections(cfg, "transfer", "seed", "fpn_channels", "augment")
    if cfg.transfer.eval_split == "val":  # results of the leaky val probe (before 3fd98d2) are not reused
        transfer_sections["val_probe"] = "C on a held-out fifth of train"
    for method, (dirname, stage_key, branch) in plan.backbone_of.items():
        bb_path = out / "backbones" / f"{method}.safetensors"
        bb_key = _key("export", stage_key, branch)
        plan.parts.append(Part(f"export {method}", "export", bb_key, 0.1, bb_path,
                               source=out / dirname if dirname else None, branch=branch,
                               deps=[dirname] if dirname else []))
        for dataset in cfg.transfer.datasets:
            sections = {**transfer_sections, "transfer": _transfer_section(cfg, dataset)}
            plan.parts.append(Part(f"transfer {method} -> {dataset}", "transfer",
                                   _key("transfer", bb_key, dataset, sections), _transfer_weight(cfg, dataset),
                                   out / "transfer" / method / f"{dataset}.json", source=bb_path, dataset=dataset,
                                   deps=[f"export {method}"]))


def _transfer_section(cfg: RunConfig, dataset: str) -> dict:
    """The transfer settings of ``dataset`` (``transfer.by_dataset`` applied) as its parts' key sees
    them: another dataset's entry re-keys nothing here, and without ``epochs`` and ``augment`` the key
    is the one runs had before those fields existed."""
    tc = cfg.transfer.for_dataset(dataset)
    d = _sections(cfg.model_copy(update={"transfer": tc}), "transfer")["transfer"]
    d.pop("by_dataset", None)
    for late in ("epochs", "augment"):
        if d.get(late) is None:
            d.pop(late, None)
    return d


def _transfer_weight(cfg: RunConfig, dataset: str) -> float:
    """A transfer part's share of the progress bar: its seeds times its steps (pixels counted)."""
    tc = cfg.transfer.for_dataset(dataset)
    if tc.epochs is not None:
        steps = tc.epochs * (tc.max_train_samples or 1000) / tc.batch_size
    else:
        steps = max([tc.steps, *tc.task_steps.values()])
    return 0.05 * tc.seeds * max(1.0, steps / 10) * max(1.0, (tc.image_size / 64) ** 2)


def in_dependency_order(parts: list[Part]) -> list[Part]:
    """The parts, each after the parts it depends on, otherwise in their given order."""
    names = {p.name for p in parts}
    placed: set[str] = set()
    ordered: list[Part] = []
    pending = list(parts)
    while pending:
        ready = next((p for p in pending if all(d in placed or d not in names for d in p.deps)), None)
        if ready is None:
            raise ValueError(f"circular dependencies among parts: {[p.name for p in pending]}")
        pending.remove(ready)
        ordered.append(ready)
        placed.add(ready.name)
    return ordered


def export_imagenet(cfg: RunConfig, path: Path) -> Path:
    """torchvision's ImageNet MobileNetV2, cut to the run's ``out_indices``, as an exported backbone."""
    from xlearner.models.backbone import Backbone
    from xlearner.models.export import save_backbone

    backbone = Backbone(cfg.backbone.model_copy(update={"weights": Path("imagenet")}))
    return save_backbone(path, backbone.state_dict(), cfg.backbone.model_copy(update={"weights": None}))


def load_config_like(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A copy of ``cfg`` with dotted overrides applied and validated again."""
    from xlearner.config import apply_overrides, validate

    data = apply_overrides(cfg.to_dict(), overrides)
    return validate(data, origin="(ablation)")


def parts_of(parts: list[Part], methods: dict[str, list[str]], wanted: list[str]) -> list[Part]:
    """The parts that the methods ``wanted`` need: their stages, exports and transfers, in order."""
    exports = {f"export {m}" for m in wanted}
    need = {d for m in wanted for d in methods[m]} | exports
    return [p for p in parts if p.name in need or (p.kind == "transfer" and exports.intersection(p.deps))]


def main_job(cfg: RunConfig, out: Path, ablation: str | list[str] | None = None,
             only: list[str] | None = None) -> Path:
    """``only``: train and transfer just these methods (e.g. X-Learner and its ablations, no baselines)."""
    from xlearner.data.embedded import fetch
    from xlearner.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    needed = sorted({s.dataset for s in cfg.sources if s.format == "embedded" and s.dataset}
                    | set(cfg.transfer.datasets))
    print(f"[xlearner run] preset '{cfg.name}' -> {out}  (config {cfg.digest()})")
    print(f"[xlearner run] fetching data: {', '.join(needed)}")
    fetch(needed)
    if cfg.backbone.imagenet or (cfg.baselines.imagenet and imagenet_compatible(cfg)):
        from xlearner.data.pretrained import fetch_imagenet_weights

        print(f"[xlearner run] ImageNet MobileNetV2 weights: {fetch_imagenet_weights()}")

    parts, methods = build_parts(cfg, out, ablation)
    if only is not None:
        unknown = [m for m in only if m not in methods]
        if unknown:
            from xlearner.config import ConfigError

            raise ConfigError(f"unknown method(s) {', '.join(unknown)} in --methods; this run's methods: "
                              f"{', '.join(methods)}")
        parts, methods = parts_of(parts, methods, only), {m: methods[m] for m in only}
    # ablations of an earlier job in this folder keep their rows (and costs) in the report, and so does
    # every method of an earlier job when this one runs only some (``only``: `xlearner run --methods`)
    earlier = read_json(out / "methods.json") or {}
    methods.update({m: s for m, s in earlier.items()
                    if m not in methods and (m.startswith("xlearner[") or only is not None)})
    write_json_atomic(out / "methods.json", methods)
    write_text_atomic(out / "config.yaml", json.dumps(cfg.to_dict(), indent=2))
    ticks = {id(p): max(1, round(100 * p.weight)) for p in parts}  # integer ticks: the bar ends exactly at 100 %
    total = sum(ticks.values())
    finished = {p.name for p in parts if part_done(p)}
    todo = [p for p in parts if p.name not in finished]
    skipped = len(finished)
    print(f"[xlearner run] {len(parts)} parts, {skipped} already finished and skipped, {len(todo)} to run")
    timings: dict[str, float] = read_json(out / "timings.json") or {}
    with tqdm(total=total, desc="main job", unit="w", position=0,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| elapsed {elapsed}, left ~{remaining}") as bar:
        bar.update(sum(ticks[id(p)] for p in parts if p.name in finished))
        for part in todo:
            bar.set_description(f"main job [{part.name}]")
            tqdm.write(f"[xlearner run] -> {part.name}")
            t = time.time()
            run_part(part, cfg)
            timings[part.name] = round(time.time() - t, 1)
            tqdm.write(f"[xlearner run] <- {part.name}: {timings[part.name]:.1f} s")
            write_json_atomic(out / "timings.json", timings)  # after every part: a run cut short keeps its times
            bar.update(ticks[id(part)])
    report = write_report(out)
    print(f"[xlearner run] done in {time.time() - t0:.0f} s; report: {report}")
    from xlearner.report import print_gate_failures

    print_gate_failures(read_json(out / "results.json") or {})
    return report


def run_command(args) -> int:
    overrides = list(args.overrides or [])
    cfg = load_config(args.preset, overrides)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    main_job(cfg, out, ablation=args.ablation, only=getattr(args, "methods", None))
    return 0
