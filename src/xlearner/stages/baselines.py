"""Baselines on the same engine and backbone architecture, for ``baselines.steps`` optimizer steps.

- ``ssst``: single source, single task: ``baselines.ssst_source``, or the cls source with
  the most training images;
- ``msst``: every source of ``baselines.msst_task``;
- ``msmt``: every source of every task, one hard-shared backbone, per-source heads;
- ``scratch``: zero steps; the random-init SharedNet is saved as it is.

Each is a SharedNet (one backbone + task necks + per-source heads); a step's loss is the
weighted sum of each source's task loss, as in the expansion stage.
"""
from __future__ import annotations

from torch import Tensor, nn

from xlearner.config import ConfigError, RunConfig
from xlearner.stages.common import head_options
from xlearner.stages.stage import NetStage


def build_shared_net(cfg: RunConfig, specs: list) -> nn.Module:
    from xlearner.models.backbone import Backbone
    from xlearner.models.nets import SharedNet, TaskHeads

    backbone = Backbone(cfg.backbone)
    return SharedNet(backbone, TaskHeads(specs, backbone.channels, backbone.strides, head_options(cfg, specs)))


class SharedNetStage(NetStage):
    """One backbone shared by every source of the stage."""

    keyed = ("steps",)

    @classmethod
    def steps(cls, cfg):
        return cfg.baselines.steps or cfg.train.steps

    @classmethod
    def build(cls, cfg, specs, run_dir=None):
        return cls(cfg, specs, build_shared_net(cfg, specs))

    def features(self, images: Tensor, task: str):
        return self.net.backbone(images)


class MSMT(SharedNetStage):
    name, baseline = "msmt", True


class MSST(SharedNetStage):
    name, baseline, per_task = "msst", True, True
    keyed = SharedNetStage.keyed + ("msst_task",)

    @classmethod
    def configure(cls, cfg, task=None):
        """``task``: the task whose sources it trains; None keeps ``baselines.msst_task`` (idempotent)."""
        out = cfg.model_copy(deep=True)
        if task is not None:
            out.baselines.msst_task = task
        return out

    @classmethod
    def select_sources(cls, cfg, train_size):
        chosen = [s for s in cfg.sources if s.task == cfg.baselines.msst_task]
        if not chosen:
            raise ConfigError(f"msst: no source of task '{cfg.baselines.msst_task}' (baselines.msst_task); "
                              f"tasks present: {cfg.tasks}")
        return chosen


class SSST(SharedNetStage):
    name, baseline = "ssst", True
    keyed = SharedNetStage.keyed + ("ssst_source", "ssst_task")

    @classmethod
    def applies(cls, cfg):
        return cfg.baselines.ssst_source is not None or cfg.baselines.ssst_task in cfg.tasks

    @classmethod
    def select_sources(cls, cfg, train_size):
        if cfg.baselines.ssst_source is not None:
            return [cfg.source(cfg.baselines.ssst_source)]
        task = cfg.baselines.ssst_task
        candidates = [s for s in cfg.sources if s.task == task]
        if not candidates:
            raise ConfigError(f"ssst needs a {task} source (baselines.ssst_task, or baselines.ssst_source); "
                              f"this config has none")
        if len(candidates) == 1:
            return candidates
        order = {s.name: i for i, s in enumerate(cfg.sources)}
        return [max(candidates, key=lambda s: (train_size(s), -order[s.name]))]


class Scratch(SharedNetStage):
    """Random initialisation, saved untrained: what every gain is measured against."""

    name, baseline = "scratch", True
    keyed = ()  # never trained: baselines.steps does not change it

    @classmethod
    def steps(cls, cfg):
        return 0

    @classmethod
    def configure(cls, cfg, task=None):
        out = cfg.model_copy(deep=True)
        out.backbone.weights = None  # random initialisation, also where the others start pretrained
        return out
