"""The stage contract: what ``train_stage`` needs from a stage, and nothing else.

A stage is where models and losses meet. ``train_stage`` (stages/__init__.py) only calls:

class side, before the module exists
- ``name``: the stage's name (``xlearner train --stage``, the run folder, the report);
- ``baseline`` / ``per_task`` / ``applies(cfg)``: how the main job (``pipeline.build_parts``) trains
  it as a baseline: once, or once per task (msst);
- ``configure(cfg, task)``: the config it trains with (scratch: random init; msst: ``task``'s
  sources), applied by ``train_stage`` itself, so `xlearner train` and `xlearner run` agree; it is
  idempotent (``configure(configure(c, t), None) == configure(c, t)``): the main job keys its parts
  on the configured config and hands that one over;
- ``select_sources(cfg, train_size)``: the sources it trains on (``train_size(source)``: the
  number of training images, opened on demand);
- ``steps(cfg)``: its optimizer steps (``scratch``: 0, nothing is trained);
- ``build(cfg, specs, run_dir)``: the module (teachers are loaded here);

instance side
- ``forward(batch) -> {loss name: scalar}``: the losses of one step, each already weighted (a
  source's ``loss_weight``); the engine sums them;
- ``predict(images, source)``: the evaluation output of the source's task (``Task.predict``);
- ``features(images, task)``: the trained backbone work of a batch of ``task`` (FLOP count,
  precise-BN re-estimation); ``frozen_features(images, task)``: the frozen nets' work, or None;
- ``product()``: the network saved as ``model.safetensors``; ``run_info()``: extra run.json fields;
- ``target_encoders(sizes)``: per source, what its training loader's workers add to each batch for
  the loss (``Task.target_encoder``: FCOS's matching), so that the step does not do it.

``NetStage`` implements forward/predict for every stage whose product has ``task_heads``: a
batch of source k (task t) runs through ``features(images, t)``, task t's neck and k's head,
then task t's loss.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

from torch import Tensor, nn

from xlearner import tasks
from xlearner.config import RunConfig, SourceConfig


class Stage(nn.Module):
    name: ClassVar[str] = ""
    baseline: ClassVar[bool] = False
    per_task: ClassVar[bool] = False
    keyed: ClassVar[tuple[str, ...]] = ()
    """The ``baselines`` settings it reads: a rerun retrains it when one of them changes."""

    @classmethod
    def applies(cls, cfg: RunConfig) -> bool:
        return True

    @classmethod
    def configure(cls, cfg: RunConfig, task: str | None = None) -> RunConfig:
        """The config this stage trains with (for ``task``, with ``per_task``; None: the config's own). Idempotent."""
        return cfg

    @classmethod
    def select_sources(cls, cfg: RunConfig, train_size: Callable[[SourceConfig], int]) -> list[SourceConfig]:
        return list(cfg.sources)

    @classmethod
    def steps(cls, cfg: RunConfig) -> int:
        return cfg.train.steps

    @classmethod
    def build(cls, cfg: RunConfig, specs: list, run_dir: Path | None) -> "Stage":
        raise NotImplementedError

    def forward(self, batch: dict[str, dict]) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(self, images: Tensor, source: str) -> Any:
        raise NotImplementedError

    def features(self, images: Tensor, task: str) -> Any:
        raise NotImplementedError

    def frozen_features(self, images: Tensor, task: str) -> Any | None:
        return None

    def product(self) -> nn.Module:
        raise NotImplementedError

    def run_info(self) -> dict:
        return {}

    def target_encoders(self, sizes: dict[str, int]) -> dict[str, Callable[[dict], dict]]:
        return {}


class NetStage(Stage):
    """A stage whose product ``net`` has ``task_heads`` (a neck per task, a head per source)."""

    def __init__(self, cfg: RunConfig, specs: list, net: nn.Module):
        super().__init__()
        self.specs = {s.name: s for s in specs}
        self.loss_weights = {s.name: float(cfg.source(s.name).loss_weight) for s in specs}
        self.net = net

    def source_loss(self, source: str, features: Any, batch: dict) -> Tensor:
        """Task loss of one source batch on given backbone features, times the source's weight."""
        task = self.specs[source].task
        th = self.net.task_heads
        loss = tasks.get(task).loss(th.heads[source], th.necks[task](features), batch)
        weight = self.loss_weights[source]
        return loss if weight == 1.0 else loss * weight  # x * 1.0 is x: two operators a step saved

    def forward(self, batch: dict[str, dict]) -> dict[str, Tensor]:
        return {source: self.source_loss(source, self.features(b["images"], self.specs[source].task), b)
                for source, b in batch.items()}

    def predict(self, images: Tensor, source: str) -> Any:
        task = self.specs[source].task
        th = self.net.task_heads
        return tasks.get(task).predict(th.heads[source], th.necks[task](self.features(images, task)), images)

    def product(self) -> nn.Module:
        return self.net

    def target_encoders(self, sizes: dict[str, int]) -> dict[str, Callable[[dict], dict]]:
        """Each source's ``Task.target_encoder`` for its head and training image size ``sizes[name]``."""
        heads = self.net.task_heads.heads
        encoders = {name: tasks.get(spec.task).target_encoder(heads[name], sizes[name])
                    for name, spec in self.specs.items() if name in sizes}
        return {name: enc for name, enc in encoders.items() if enc is not None}
