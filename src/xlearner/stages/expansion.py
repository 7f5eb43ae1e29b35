"""Expansion stage: one backbone per task, joined by reconciliation layers.

A batch of source k (task t) runs through every branch up to the last reconciliation
stage, then only B_t continues (``ExpandedNet.branch_features(images, t)``); its features
go to task t's neck and to source k's head. The loss of the step is the weighted sum over
sources of each source's task loss (weights: ``SourceConfig.loss_weight``, applied by the
trainer through ``fit(loss_weights=...)``).
"""
from __future__ import annotations

from torch import Tensor, nn

from xlearner.config import RunConfig
from xlearner.stages.common import net_parts, predict, task_loss


def build_expanded_net(cfg: RunConfig, specs: list) -> nn.Module:
    """The ExpandedNet of ``cfg`` (tasks of ``specs``), with fresh TaskHeads."""
    from xlearner.models.backbone import Backbone
    from xlearner.models.nets import ExpandedNet, MultiStageExpandedNet, TaskHeads
    from xlearner.stages.common import det_image_size

    probe = Backbone(cfg.backbone.model_copy(update={"weights": None}))  # channels/strides only
    tasks = [t for t in ("cls", "det", "seg") if any(s.task == t for s in specs)]
    heads = TaskHeads(specs, probe.channels, probe.strides, cfg.fpn_channels, det_image_size(cfg, specs),
                      cfg.det_head_convs)
    del probe
    cls = MultiStageExpandedNet if cfg.expansion.reconcile_from == "all" else ExpandedNet
    return cls(cfg.backbone, tasks, heads, reconcile_after=list(cfg.expansion.reconcile_after),
                       detach_others=cfg.expansion.detach_others,
                       reconciliation=cfg.expansion.reconciliation)


class ExpansionStage(nn.Module):
    def __init__(self, cfg: RunConfig, specs: list, net: nn.Module | None = None):
        super().__init__()
        self.specs = {s.name: s for s in specs}
        self.net = net if net is not None else build_expanded_net(cfg, specs)

    def forward(self, batch: dict[str, dict]) -> dict[str, Tensor]:
        necks, heads = net_parts(self.net)
        losses = {}
        for source, b in batch.items():
            task = self.specs[source].task
            feats = self.net.branch_features(b["images"], task)
            losses[source] = task_loss(task, heads[source], necks[task](feats), b)
        return losses

    def predict(self, images: Tensor, source: str):
        necks, heads = net_parts(self.net)
        task = self.specs[source].task
        return predict(task, heads[source], necks[task](self.net.branch_features(images, task)), images)

    def run_backbone(self, images: Tensor, task: str):
        """What a batch of a task-t source costs: the branches actually run."""
        return self.net.branch_features(images, task)

    def product(self) -> nn.Module:
        return self.net
