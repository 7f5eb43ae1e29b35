"""Whole networks: heads per source, one shared backbone, or one backbone per task.

``SharedNet`` = one backbone + ``TaskHeads`` (MSMT/SSST/MSST baselines, the squeeze
student, transfer). ``ExpandedNet`` = one backbone per task joined by reconciliation
layers + ``TaskHeads`` (the expansion stage). Neither knows about losses or optimizers.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from xlearner import tasks
from xlearner.config import BackboneConfig
from xlearner.models.backbone import Backbone
from xlearner.models.reconciliation import MultiStageReconciliation, Reconciliation
from xlearner.tasks import HeadOptions


@dataclass
class SourceSpec:
    """One labelled source as the model sees it: its task and label-space size."""

    name: str
    task: str
    num_classes: int


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class TaskHeads(nn.Module):
    """A neck per task present (shared by that task's sources) and a head per source, built by
    each task's factories (``xlearner.tasks``). ``opts``: the necks' and heads' sizes."""

    def __init__(self, sources: list[SourceSpec], channels: list[int], strides: list[int],
                 opts: HeadOptions | None = None):
        super().__init__()
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique: {names}")
        opts = opts or HeadOptions()
        self.sources = {s.name: s for s in sources}
        self.tasks = tasks.present([s.task for s in sources])
        self.necks = nn.ModuleDict({t: tasks.get(t).build_neck(channels, strides, opts) for t in self.tasks})
        self.heads = nn.ModuleDict({
            s.name: tasks.get(s.task).build_head(self.necks[s.task], s.num_classes, channels, strides, opts)
            for s in sources})


class SharedNet(nn.Module):
    """One backbone shared by every source (MSMT/SSST/MSST, the squeeze student, transfer)."""

    def __init__(self, backbone: Backbone, task_heads: TaskHeads):
        super().__init__()
        self.backbone = backbone
        self.task_heads = task_heads

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.backbone(images)

    def param_counts(self) -> dict[str, int]:
        return {"backbone": count_parameters(self.backbone), "task_heads": count_parameters(self.task_heads),
                "total": count_parameters(self)}


class ExpandedNet(nn.Module):
    """One backbone per task, joined after stages ``reconcile_after`` (1-based) by
    f_t <- f_t + sum_{u != t} R_{t<-u}(f_u), using the pre-update f_u of every branch."""

    def __init__(self, backbone_cfg: BackboneConfig, tasks: list[str], task_heads: TaskHeads,
                 reconcile_after: list[int] = (1, 2, 3), detach_others: bool = True, reconciliation: bool = True):
        super().__init__()
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be non-empty and unique, got {tasks}")
        self.tasks = list(tasks)
        self.backbones = nn.ModuleDict({t: Backbone(backbone_cfg) for t in self.tasks})
        first = self.backbones[self.tasks[0]]
        self.channels, self.strides = first.channels, first.strides
        self.num_stages = len(first.stages)
        bad = [s for s in reconcile_after if not 1 <= s <= self.num_stages]
        if bad:
            raise ValueError(f"reconcile_after {list(reconcile_after)}: stages are 1..{self.num_stages}")
        self.detach_others = detach_others
        active = reconciliation and len(self.tasks) > 1
        self.reconcile_after = sorted(set(reconcile_after)) if active else []
        # reconcilers["s<stage>"]["<t>_from_<u>"] = R_{t<-u}
        self.reconcilers = nn.ModuleDict()
        for s in self.reconcile_after:
            c = self.channels[s - 1]
            self.reconcilers[f"s{s}"] = nn.ModuleDict(
                {f"{t}_from_{u}": Reconciliation(c) for t in self.tasks for u in self.tasks if u != t})
        self.task_heads = task_heads

    @property
    def last_shared_stage(self) -> int:
        """Stages 1..this run in every branch; after it only the batch's own branch continues."""
        return max(self.reconcile_after) if self.reconcile_after else 0

    def _graph(self, t: str, keep: list[str]):
        """Autograd for branch ``t``: with ``detach_others`` a branch outside ``keep`` reaches the
        kept ones only through ``.detach()``, so its gradient is zero: run it without a graph."""
        return torch.no_grad() if self.detach_others and t not in keep else nullcontext()

    def _reconcile(self, stage: int, feats: dict[str, Tensor], targets: list[str],
                   keep: list[str] | None = None) -> dict[str, Tensor]:
        rs = self.reconcilers[f"s{stage}"]
        out = dict(feats)
        for t in targets:
            with self._graph(t, keep if keep is not None else self.tasks):
                update = 0
                for u in self.tasks:
                    if u != t:
                        fu = feats[u].detach() if self.detach_others else feats[u]
                        update = update + rs[f"{t}_from_{u}"](fu)
                out[t] = feats[t] + update
        return out

    def _run(self, images: Tensor, keep: list[str]) -> dict[str, list[Tensor]]:
        """Stage by stage; all branches up to the last reconciliation, then only ``keep``."""
        last = self.last_shared_stage
        x = {t: images for t in (self.tasks if last else keep)}
        outs: dict[str, list[Tensor]] = {t: [] for t in keep}
        for i in range(self.num_stages):
            stage = i + 1
            running = list(x) if stage <= last else keep
            nxt = {}
            for t in running:
                with self._graph(t, keep):
                    nxt[t] = self.backbones[t].stages[i](x[t])
            x = nxt
            if stage in self.reconcile_after:
                # at the last exchange only the kept branches need the update
                x = self._reconcile(stage, x, keep if stage == last else self.tasks, keep)
            for t in keep:
                outs[t].append(x[t])
        return outs

    def branch_features(self, images: Tensor, task: str) -> list[Tensor]:
        """Features C2..C5 of branch ``task`` for a batch of one of its sources."""
        if task not in self.backbones:
            raise KeyError(f"no branch for task {task!r}; branches: {self.tasks}")
        return self._run(images, [task])[task]

    def all_branch_features(self, images: Tensor) -> dict[str, list[Tensor]]:
        """Every branch's features (the squeeze teacher)."""
        return self._run(images, list(self.tasks))

    def forward(self, images: Tensor, task: str) -> list[Tensor]:
        return self.branch_features(images, task)

    def param_counts(self) -> dict[str, int]:
        counts = {f"backbone/{t}": count_parameters(b) for t, b in self.backbones.items()}
        counts["reconciliation"] = count_parameters(self.reconcilers)
        counts["task_heads"] = count_parameters(self.task_heads)
        counts["total"] = count_parameters(self)
        return counts


class MultiStageExpandedNet(ExpandedNet):
    """ExpandedNet whose reconciliation at stage s reads stages 1..s of every other branch
    (``expansion.reconcile_from: all``), as gv-benchmark's cross layers do:
    f_t,s <- f_t,s + sum_{u != t} R_{t<-u}(f_u,1 .. f_u,s), each earlier stage resampled to stage s
    (``MultiStageReconciliation``; zero at initialisation). f_u,j for j < s is branch u's feature
    as it went on (after its own update at stage j); f_u,s is taken before the update."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for s in self.reconcile_after:
            self.reconcilers[f"s{s}"] = nn.ModuleDict({
                f"{t}_from_{u}": MultiStageReconciliation(self.channels[:s], self.strides[:s],
                                                          self.channels[s - 1], self.strides[s - 1])
                for t in self.tasks for u in self.tasks if u != t})

    def _run(self, images: Tensor, keep: list[str]) -> dict[str, list[Tensor]]:
        last = self.last_shared_stage
        x = {t: images for t in (self.tasks if last else keep)}
        history: dict[str, list[Tensor]] = {t: [] for t in x}
        outs: dict[str, list[Tensor]] = {t: [] for t in keep}
        for i in range(self.num_stages):
            stage = i + 1
            running = list(x) if stage <= last else keep
            x = {t: self.backbones[t].stages[i](x[t]) for t in running}
            if stage in self.reconcile_after:
                rs = self.reconcilers[f"s{stage}"]
                updated = dict(x)
                for t in (keep if stage == last else self.tasks):
                    update = 0
                    for u in self.tasks:
                        if u != t:
                            fu = history[u] + [x[u]]
                            if self.detach_others:
                                fu = [f.detach() for f in fu]
                            update = update + rs[f"{t}_from_{u}"](fu)
                    updated[t] = x[t] + update
                x = updated
            if stage < last:
                for t in x:
                    history[t].append(x[t])
            for t in keep:
                outs[t].append(x[t])
        return outs
