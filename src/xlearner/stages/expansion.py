"""Expansion stage: one backbone per task, joined by reconciliation layers.

A batch of source k (task t) runs through every branch up to the last reconciliation
stage, then only B_t continues (``ExpandedNet.branch_features(images, t)``); its features
go to task t's neck and to source k's head. The loss of the step is the weighted sum over
sources of each source's task loss (weights: ``SourceConfig.loss_weight``).
"""
from __future__ import annotations

from torch import Tensor, nn

from xlearner import tasks
from xlearner.config import RunConfig
from xlearner.stages.common import head_options
from xlearner.stages.stage import NetStage


def build_expanded_net(cfg: RunConfig, specs: list) -> nn.Module:
    """The ExpandedNet of ``cfg`` (tasks of ``specs``), with fresh TaskHeads."""
    from xlearner.models.backbone import Backbone
    from xlearner.models.nets import ExpandedNet, MultiStageExpandedNet, TaskHeads

    probe = Backbone(cfg.backbone.model_copy(update={"weights": None}))  # channels/strides only
    heads = TaskHeads(specs, probe.channels, probe.strides, head_options(cfg, specs))
    del probe
    net = MultiStageExpandedNet if cfg.expansion.reconcile_from == "all" else ExpandedNet
    return net(cfg.backbone, tasks.present([s.task for s in specs]), heads,
               reconcile_after=list(cfg.expansion.reconcile_after), detach_others=cfg.expansion.detach_others,
               reconciliation=cfg.expansion.reconciliation)


class ExpansionStage(NetStage):
    name = "expansion"

    @classmethod
    def steps(cls, cfg):
        return cfg.expansion.steps or cfg.train.steps

    @classmethod
    def build(cls, cfg, specs, run_dir=None):
        return cls(cfg, specs, build_expanded_net(cfg, specs))

    def features(self, images: Tensor, task: str):
        """Branch ``task`` after the reconciliations: what a batch of a task-t source costs and trains."""
        return self.net.branch_features(images, task)
