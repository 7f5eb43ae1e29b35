"""The X-Learner ablations and method levers of `xlearner run --ablation`: names -> config overrides.

Kept apart from ``pipeline`` and light (it imports no config, model or torch at run time), so
that building the command-line parser, which lists these names, stays light too.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from xlearner.config import RunConfig


def _balanced_loss(cfg: RunConfig) -> list[str]:
    """Each task's sources share one unit of loss weight (today a task with two sources counts twice)."""
    n = {t: sum(s.task == t for s in cfg.sources) for t in cfg.tasks}
    return [f"sources.{s.name}.loss_weight={s.loss_weight / n[s.task]}" for s in cfg.sources]


def _balanced_sampling(cfg: RunConfig) -> list[str]:
    """Every task draws the same number of images per step, the step's total unchanged."""
    total = sum(s.batch_size for s in cfg.sources)
    n = {t: sum(s.task == t for s in cfg.sources) for t in cfg.tasks}
    return [f"sources.{s.name}.batch_size={max(1, round(total / len(cfg.tasks) / n[s.task]))}" for s in cfg.sources]


def _linear_seg_head(cfg: RunConfig) -> list[str]:
    """The upstream seg branch with the linear dense head and CE on a quarter of the pixels of an
    ``image_size`` image (the heads of ``default``)."""
    return ["seg_head=linear", f"seg_loss_points={cfg.image_size ** 2 // 4}"]


def _split(expansion_share: float) -> Callable[["RunConfig"], list[str]]:
    """X-Learner's steps split between expansion and squeeze in another ratio, their total unchanged."""
    def overrides(cfg: RunConfig) -> list[str]:
        total = (cfg.expansion.steps or cfg.train.steps) + (cfg.squeeze.steps or cfg.train.steps)
        exp = max(1, round(expansion_share * total))
        return [f"expansion.steps={exp}", f"squeeze.steps={max(1, total - exp)}"]
    return overrides


_Overrides = list[str] | Callable[["RunConfig"], list[str]]

_METHOD_ABLATIONS: dict[str, _Overrides] = {
    "no_reconciliation": ["expansion.reconciliation=false"],
    "no_detach": ["expansion.detach_others=false"],
    "squeeze_scratch": ["squeeze.init=scratch"],
    "no_distill": ["squeeze.distill_weight=0", "squeeze.kd_weight=0"],
    "expansion_direct": [],  # the expansion cls branch is transferred instead of the squeezed student
    # the upstream seg branch with the Panoptic-FPN head and every pixel's CE (the presets' head before the
    # linear one: docs/levers.md, "The upstream seg head")
    "seg_fpn_head": ["seg_head=fpn", "seg_loss_points=0"],
}
_LEVER_ABLATIONS: dict[str, _Overrides] = {  # the method levers of the anchors (docs/levers.md)
    "reconcile_all_stages": ["expansion.reconcile_from=all"],
    "multi_teacher": ["squeeze.distill_teachers=all"],
    "teacher_source_bn": ["squeeze.teacher_bn=source"],
    "generalist_teacher": ["squeeze.generalist=msmt"],
    "distill_cosine": ["squeeze.distill_loss=cosine"],
    "distill_cka": ["squeeze.distill_loss=cka"],
    "distill_l2": ["squeeze.distill_loss=l2"],  # the library's loss, where a preset distils with CKA
    "kd_logits": ["squeeze.kd_weight=1.0"],
    "distill_weight_x4": lambda cfg: [f"squeeze.distill_weight={4 * cfg.squeeze.distill_weight}"],
    "distill_weight_x0.25": lambda cfg: [f"squeeze.distill_weight={0.25 * cfg.squeeze.distill_weight}"],
    "task_balanced_loss": _balanced_loss,
    "task_balanced_sampling": _balanced_sampling,
    "seg_linear_head": _linear_seg_head,
}
_SPLIT_ABLATIONS: dict[str, _Overrides] = {  # the split of X-Learner's budget (issue 29; docs/levers.md)
    "split_25_75": _split(0.25),  # a quarter of X-Learner's steps in expansion, three quarters in squeeze
    "split_75_25": _split(0.75),
}
ABLATIONS: dict[str, _Overrides] = {**_METHOD_ABLATIONS, **_LEVER_ABLATIONS, **_SPLIT_ABLATIONS}
"""Ablation name -> overrides of the X-Learner config (or a function of the config giving them)."""

LEVERS = tuple(_LEVER_ABLATIONS)
"""The method levers of docs/levers.md; ``--ablation levers`` runs them all in one job."""


def ablation_names(spec: str | list[str] | None) -> list[str]:
    """Ablation names from ``--ablation`` values: names, comma-separated lists, ``levers`` for all levers."""
    items = [spec] if isinstance(spec, str) else list(spec or [])
    names: list[str] = []
    for item in items:
        for name in filter(None, (n.strip() for n in item.split(","))):
            for n in (LEVERS if name == "levers" else (name,)):
                if n not in ABLATIONS:
                    raise ValueError(f"unknown ablation {n!r}; ablations: {', '.join(ABLATIONS)}, or levers (all of "
                                     f"docs/levers.md)")
                if n not in names:
                    names.append(n)
    return names


def ablation_overrides(name: str, cfg: RunConfig) -> list[str]:
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; ablations: {', '.join(ABLATIONS)}")
    spec = ABLATIONS[name]
    return list(spec(cfg) if callable(spec) else spec)
