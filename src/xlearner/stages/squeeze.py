"""Squeeze stage: one student backbone learns all sources again while distilling the expanded model.

The student S is a SharedNet whose backbone has the architecture of ONE task backbone of
the expansion model. Initial backbone weights follow ``squeeze.init``: ``copy:<task>``
copies the teacher's B_<task>; ``scratch`` keeps the run's initial weights (random unless
``backbone.weights`` is set). Necks and heads are copied from the expansion model (by key,
for the sources and tasks both runs share) and trained on.

Losses of one step (named as the trainer logs them):
- ``"<source>"``: the source's task loss on the student (cls CE, det losses, seg CE);
- ``"distill/<t>"``: ``distill_weight`` x mean over the source batches of task t of the mean
  over distilled stages s of ``mean_pixels ||n(A_t,s(S(x)_s)) - n(T_t(x)_s)||^2`` where n is the
  L2 normalisation over channels (per pixel), A_t,s a 1x1 conv adapter (identity at init) and
  T_t(x) the frozen teacher's branch-t features (``teacher.branch_features(x, t)``). The
  per-pixel squared distance of unit vectors equals 2 - 2cos, so the loss is in [0, 4]
  whatever the channel count;
- ``"kd/<source>"`` (cls sources, when ``kd_weight`` > 0): ``kd_weight`` x T^2 x
  KL(softmax(teacher/T) || softmax(student/T)) (batch mean).

The teacher and the adapters are not part of the product: ``product()`` is the student
SharedNet alone. The teacher is kept outside the module tree (so it is neither optimised,
nor saved in checkpoints, nor switched to train mode) but follows ``.to()``/``.cuda()``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlearner.config import ConfigError, RunConfig
from xlearner.stages.common import det_image_size, net_parts, predict, task_loss
from xlearner.stages.expansion import build_expanded_net


# ----------------------------------------------------------------------------- teacher
def resolve_teacher_dir(path: str | Path | None, default: Path | None = None) -> Path:
    """The expansion run folder: ``squeeze.teacher`` (folder or its model.safetensors) or ``default``."""
    if path is None:
        if default is not None and (default / "run.json").is_file():
            return default
        where = f" (looked for {default})" if default is not None else ""
        raise ConfigError("squeeze.teacher is not set: give the expansion run folder, e.g. "
                          f"squeeze.teacher=runs/<name>/expansion{where}")
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        p = p.parent
    if not (p / "run.json").is_file() or not (p / "model.safetensors").is_file():
        raise ConfigError(f"squeeze.teacher={path}: expected an expansion run folder holding run.json and "
                          f"model.safetensors (written by `xlearner train CONFIG --stage expansion`)")
    return p


def load_teacher(run_dir: Path) -> tuple[nn.Module, RunConfig, list]:
    """Rebuild the expansion ExpandedNet from ``run.json`` and load ``model.safetensors`` (strict)."""
    from safetensors.torch import load_file

    from xlearner.models.nets import SourceSpec

    info = json.loads((run_dir / "run.json").read_text())
    if info.get("stage") != "expansion":
        raise ConfigError(f"squeeze.teacher={run_dir} is a '{info.get('stage')}' run; the teacher must be an expansion run")
    tcfg = RunConfig.model_validate(info["config"])
    tcfg.backbone = tcfg.backbone.model_copy(update={"weights": None})  # everything comes from the file
    specs = [SourceSpec(s["name"], s["task"], int(s["num_classes"])) for s in info["sources"]]
    net = build_expanded_net(tcfg, specs)
    state = load_file(str(run_dir / "model.safetensors"))
    net.load_state_dict(state, strict=True)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, tcfg, specs


def use_batch_statistics(net: nn.Module) -> None:
    """Let the frozen teacher normalise each batch with its own statistics, as in expansion training.

    Every branch of the expanded model saw batches of several sources (digits, clothes,
    scenes), so its running statistics are a blend that fits no single source; in eval mode
    the teacher's features would then be degraded targets. Train-mode BatchNorm with
    momentum 0 normalises with the batch statistics and never changes the stored ones.
    """
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.momentum = 0.0


def build_student(cfg: RunConfig, specs: list, teacher: nn.Module) -> nn.Module:
    """SharedNet of one backbone; backbone per ``squeeze.init``; necks/heads copied from the teacher."""
    from xlearner.models.backbone import Backbone
    from xlearner.models.nets import SharedNet, TaskHeads

    init = cfg.squeeze.init
    bb_cfg = cfg.backbone if init == "scratch" else cfg.backbone.model_copy(update={"weights": None})
    backbone = Backbone(bb_cfg)
    if init.startswith("copy:"):
        task = init[5:]
        if task not in teacher.backbones:
            raise ConfigError(f"squeeze.init={init}: the expansion model has no '{task}' branch "
                              f"(its tasks: {list(teacher.backbones.keys())})")
        backbone.load_state_dict(teacher.backbones[task].state_dict(), strict=True)
    heads = TaskHeads(specs, backbone.channels, backbone.strides, cfg.fpn_channels, det_image_size(cfg, specs),
                      cfg.det_head_convs)
    own = heads.state_dict()
    given = teacher.task_heads.state_dict()
    copy = {k: v for k, v in given.items() if k in own and own[k].shape == v.shape}
    heads.load_state_dict(copy, strict=False)
    fresh = sorted({k.split(".")[1] for k in own if k not in copy and k.count(".") >= 1})
    print(f"squeeze: student backbone init '{init}'; necks/heads copied from the expansion model "
          f"({len(copy)}/{len(own)} tensors)" + (f", fresh: {fresh}" if fresh else ""), flush=True)
    return SharedNet(backbone, heads)


def _dirac_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 0, 0].copy_(torch.eye(channels))
        conv.bias.zero_()
    return conv


def feature_distill_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over pixels of the squared distance of the channel-L2-normalised maps (= 2 - 2 cos)."""
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.float(), dim=1)
    return (s - t).pow(2).sum(1).mean()


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.softmax(teacher_logits.float() / t, dim=1),
                    reduction="batchmean") * (t * t)


# ----------------------------------------------------------------------------- stage
class SqueezeStage(nn.Module):
    def __init__(self, cfg: RunConfig, specs: list, teacher: nn.Module):
        super().__init__()
        self.specs = {s.name: s for s in specs}
        self.tasks = [t for t in ("cls", "det", "seg") if any(s.task == t for s in specs)]
        sq = cfg.squeeze
        self.distill_weight = float(sq.distill_weight)
        self.kd_weight = float(sq.kd_weight)
        self.temperature = float(sq.kd_temperature)
        self.student = build_student(cfg, specs, teacher)
        n_feats = len(self.student.backbone.channels)
        bad = [i for i in sq.distill_stages if not 1 <= i <= n_feats]
        if bad:
            raise ConfigError(f"squeeze.distill_stages {list(sq.distill_stages)}: indices are 1-based into the "
                              f"{n_feats} backbone features (out_indices); {bad} out of range")
        self.distill_stages = list(sq.distill_stages)
        missing = [t for t in self.tasks if t not in teacher.backbones]
        if missing and self.distill_weight > 0:
            raise ConfigError(f"squeeze: the expansion model has no branch for tasks {missing}; "
                              f"train the expansion stage on the same sources")
        chans = self.student.backbone.channels
        # adapters exist only when used: an unused parameter would stall DDP
        self.adapters = nn.ModuleDict({
            t: nn.ModuleList(_dirac_conv(chans[i - 1]) for i in self.distill_stages) for t in self.tasks
        }) if self.distill_weight > 0 and self.distill_stages else nn.ModuleDict()
        object.__setattr__(self, "teacher", teacher)  # not a submodule: frozen, unsaved, not optimised
        teacher.eval()
        use_batch_statistics(teacher)

    def _apply(self, fn, *args, **kwargs):
        # .to(device) / .half() ... also move the (unregistered) teacher
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def forward(self, batch: dict[str, dict]) -> dict[str, Tensor]:
        necks, heads = net_parts(self.student)
        t_necks, t_heads = net_parts(self.teacher)
        losses: dict[str, Tensor] = {}
        distill: dict[str, list[Tensor]] = {}
        for source, b in batch.items():
            task = self.specs[source].task
            images = b["images"]
            feats = self.student.backbone(images)
            neck_out = necks[task](feats)
            losses[source] = task_loss(task, heads[source], neck_out, b)
            use_kd = self.kd_weight > 0 and task == "cls" and source in t_heads
            if not self.adapters and not use_kd:
                continue
            with torch.inference_mode():  # frozen: no graph, no version counting (bf16 under the engine's autocast)
                t_feats = self.teacher.branch_features(images, task)
            if self.adapters:
                per_stage = [feature_distill_loss(self.adapters[task][j](feats[i - 1]), t_feats[i - 1])
                             for j, i in enumerate(self.distill_stages)]
                distill.setdefault(task, []).append(torch.stack(per_stage).mean())
            if use_kd:
                with torch.inference_mode():
                    t_logits = t_heads[source](t_necks[task](t_feats))
                losses[f"kd/{source}"] = self.kd_weight * kd_loss(heads[source](neck_out), t_logits, self.temperature)
        for task, items in distill.items():
            losses[f"distill/{task}"] = self.distill_weight * torch.stack(items).mean()
        return losses

    def predict(self, images: Tensor, source: str):
        necks, heads = net_parts(self.student)
        task = self.specs[source].task
        return predict(task, heads[source], necks[task](self.student.backbone(images)), images)

    def run_backbone(self, images: Tensor, task: str):
        return self.student.backbone(images)

    def run_teacher(self, images: Tensor, task: str):
        return self.teacher.branch_features(images, task)

    @property
    def uses_teacher(self) -> bool:
        return bool(self.adapters) or self.kd_weight > 0

    def product(self) -> nn.Module:
        return self.student
