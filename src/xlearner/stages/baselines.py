"""Baselines on the same engine, backbone architecture and number of optimizer steps.

- ``ssst``: single source, single task: ``baselines.ssst_source``, or the cls source with
  the most training images;
- ``msst``: every source of ``baselines.msst_task``;
- ``msmt``: every source of every task, one hard-shared backbone, per-source heads;
- ``scratch``: no training; the random-init SharedNet is saved as it is.

Each is a SharedNet (one backbone + task necks + per-source heads); a step's loss is the
weighted sum of each source's task loss, as in the expansion stage.
"""
from __future__ import annotations

from torch import Tensor, nn

from xlearner.config import ConfigError, RunConfig, SourceConfig
from xlearner.stages.common import net_parts, predict, task_loss

BASELINES = ("ssst", "msst", "msmt", "scratch")


def select_sources(cfg: RunConfig, stage: str, train_sizes: dict[str, int] | None = None) -> list[SourceConfig]:
    """The sources a baseline trains on. ``train_sizes`` (name -> training images) picks the SSST source."""
    if stage == "ssst":
        if cfg.baselines.ssst_source is not None:
            return [cfg.source(cfg.baselines.ssst_source)]
        cls = [s for s in cfg.sources if s.task == "cls"]
        if not cls:
            raise ConfigError("ssst needs a cls source (or baselines.ssst_source); this config has none")
        if len(cls) == 1:
            return cls
        if train_sizes is None:
            raise ValueError("ssst with several cls sources needs their training sizes to pick the largest")
        order = {s.name: i for i, s in enumerate(cfg.sources)}
        return [max(cls, key=lambda s: (train_sizes[s.name], -order[s.name]))]
    if stage == "msst":
        chosen = [s for s in cfg.sources if s.task == cfg.baselines.msst_task]
        if not chosen:
            raise ConfigError(f"msst: no source of task '{cfg.baselines.msst_task}' (baselines.msst_task); "
                              f"tasks present: {cfg.tasks}")
        return chosen
    if stage in ("msmt", "scratch", "expansion", "squeeze"):
        return list(cfg.sources)
    raise ValueError(f"unknown baseline {stage!r}; baselines: {BASELINES}")


def build_shared_net(cfg: RunConfig, specs: list) -> nn.Module:
    from xlearner.models.backbone import Backbone
    from xlearner.models.nets import SharedNet, TaskHeads
    from xlearner.stages.common import det_image_size

    backbone = Backbone(cfg.backbone)
    return SharedNet(backbone, TaskHeads(specs, backbone.channels, backbone.strides, cfg.fpn_channels,
                                         det_image_size(cfg, specs), cfg.det_head_convs))


class BaselineStage(nn.Module):
    def __init__(self, cfg: RunConfig, specs: list, net: nn.Module | None = None):
        super().__init__()
        self.specs = {s.name: s for s in specs}
        self.net = net if net is not None else build_shared_net(cfg, specs)

    def forward(self, batch: dict[str, dict]) -> dict[str, Tensor]:
        necks, heads = net_parts(self.net)
        losses = {}
        for source, b in batch.items():
            task = self.specs[source].task
            feats = self.net.backbone(b["images"])
            losses[source] = task_loss(task, heads[source], necks[task](feats), b)
        return losses

    def predict(self, images: Tensor, source: str):
        necks, heads = net_parts(self.net)
        task = self.specs[source].task
        return predict(task, heads[source], necks[task](self.net.backbone(images)), images)

    def run_backbone(self, images: Tensor, task: str):
        return self.net.backbone(images)

    def product(self) -> nn.Module:
        return self.net
