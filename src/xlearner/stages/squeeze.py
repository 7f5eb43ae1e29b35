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

Levers (each a ``squeeze`` option, default = the behaviour above; see docs/levers.md):
- ``distill_teachers: all`` (URL's multi-teacher distillation): on every source's images, every
  adapter A_u is pulled towards teacher branch u (``teacher.all_branch_features``), so
  ``"distill/<u>"`` averages over every batch, not only the batches of task u;
- ``distill_loss``: ``l2`` (above), ``cosine`` (1 - cos of each image's whole map) or ``cka``
  (1 - linear CKA between student and teacher, pixels of the batch as samples; the presets
  ``default``, ``gpu`` and ``quick`` use it: it won seg on validation at five upstream seeds). CKA is
  computed from each pair's Gram matrix with the adapter applied to it (``adapted_cka_loss``), all
  pairs of a stage at once; its adapters have no bias, which CKA's centring would cancel;
- ``teacher_bn: source``: the teacher (and the generalist) normalise a batch of source k with
  precise-BN statistics estimated once on source k's training images, instead of batch statistics;
- ``generalist`` (Representation Consolidation): a single-backbone run (e.g. the MSMT baseline) as
  an extra teacher on every batch, through its own adapters: ``"distill/generalist"``, weight
  ``generalist_weight``.

The frozen teacher runs as ``GroupedBranches`` (its branches, and the batches of sources of one
shape, side by side: the same features in fewer operators) unless ``teacher_bn: source``.

The teacher and the adapters are not part of the product: ``product()`` is the student
SharedNet alone. The teacher is kept outside the module tree (so it is neither optimised,
nor saved in checkpoints, nor switched to train mode) but follows ``.to()``/``.cuda()``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlearner import tasks
from xlearner.config import ConfigError, RunConfig
from xlearner.models.grouped import GroupedBranches, NotGroupable
from xlearner.models.heads import resize_bilinear
from xlearner.stages.common import estimate_bn_statistics, head_options
from xlearner.stages.expansion import build_expanded_net
from xlearner.stages.stage import NetStage


# ----------------------------------------------------------------------------- teacher
def use_batch_statistics(net: nn.Module) -> None:
    """Let the frozen teacher normalise each batch with its own statistics, as in expansion training.

    Every branch of the expanded model saw batches of several sources (digits, clothes,
    scenes), so its running statistics are a blend that fits no single source; in eval mode
    the teacher's features would then be degraded targets. Train-mode BatchNorm that does not
    track statistics normalises with the batch's and neither reads nor changes the stored ones
    (nor counts batches: one operator less per BatchNorm and call than momentum 0 gave).
    """
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.track_running_stats = False


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
    heads = TaskHeads(specs, backbone.channels, backbone.strides, head_options(cfg, specs))
    own = heads.state_dict()
    given = teacher.task_heads.state_dict()
    copy = {k: v for k, v in given.items() if k in own and own[k].shape == v.shape}
    heads.load_state_dict(copy, strict=False)
    fresh = sorted({k.split(".")[1] for k in own if k not in copy and k.count(".") >= 1})
    print(f"squeeze: student backbone init '{init}'; necks/heads copied from the expansion model "
          f"({len(copy)}/{len(own)} tensors)" + (f", fresh: {fresh}" if fresh else ""), flush=True)
    return SharedNet(backbone, heads)


def _dirac_conv(channels: int, out_channels: int | None = None, bias: bool = True) -> nn.Conv2d:
    """1x1 adapter, the identity at init (a plain init when the teacher's width differs)."""
    out_channels = out_channels or channels
    conv = nn.Conv2d(channels, out_channels, 1, bias=bias)
    if out_channels == channels:
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:, :, 0, 0].copy_(torch.eye(channels))
            if bias:
                conv.bias.zero_()
    return conv


def _at_size_of(student: Tensor, teacher: Tensor) -> Tensor:
    """The student map resized (bilinear) to the teacher map's height and width, where they differ."""
    if student.shape[-2:] != teacher.shape[-2:]:
        return resize_bilinear(student, size=teacher.shape[-2:])
    return student


def feature_distill_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over pixels of the squared distance of the channel-L2-normalised maps (= 2 - 2 cos)."""
    student = _at_size_of(student, teacher)
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.float(), dim=1)
    return (s - t).pow(2).sum(1).mean()


def cosine_distill_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Batch mean of 1 - cos between each image's whole (C, H, W) student and teacher maps.

    Unlike ``l2`` (per pixel, every pixel weighs the same), pixels with larger teacher
    activations weigh more; in [0, 2]."""
    student = _at_size_of(student, teacher)
    return (1 - F.cosine_similarity(student.float().flatten(1), teacher.float().flatten(1), dim=1)).mean()


def cka_distill_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """1 - linear CKA (Kornblith et al. 2019) between the maps, every pixel of the batch a sample.

    With X (n, c) and Y (n, d) column-centred, CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F):
    invariant to rotations and isotropic scaling of either side; in [0, 1]. In float32 whatever the
    autocast: the Gram matrices sum over every pixel of the batch, and autocast would cast the
    float32 inputs back to bf16 for each product (six more operators per call)."""
    student = _at_size_of(student, teacher)
    with torch.autocast(student.device.type, enabled=False):
        x = student.float().permute(0, 2, 3, 1).reshape(-1, student.shape[1])
        y = teacher.float().permute(0, 2, 3, 1).reshape(-1, teacher.shape[1])
        x = x - x.mean(0, keepdim=True)
        y = y - y.mean(0, keepdim=True)
        cross = (y.T @ x).pow(2).sum()
        norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
        return 1 - cross / norm.clamp_min(1e-12)


DISTILL_LOSSES = {"l2": feature_distill_loss, "cosine": cosine_distill_loss, "cka": cka_distill_loss}


def centred_gram(student: Tensor, teacher: Tensor) -> Tensor:
    """(c + d, c + d) Gram matrix of the column-centred [student | teacher] channels, every pixel of the
    batch a sample (float32): the three products linear CKA needs, from one matrix product.

    The means are subtracted without a gradient: CKA does not change when a channel is shifted, so its
    gradient at centred features is already centred, and the centring's backward would change nothing."""
    student = _at_size_of(student, teacher)
    with torch.autocast(student.device.type, enabled=False):
        # one copy: channels last and side by side (a view on a channels_last GPU tensor)
        z = torch.cat([student.permute(0, 2, 3, 1), teacher.permute(0, 2, 3, 1)], dim=3).flatten(0, 2).float()
        z = z - z.mean(0, keepdim=True).detach()
        return z.T @ z


def adapted_cka_loss(grams: Tensor, adapters: Tensor) -> Tensor:
    """1 - linear CKA between A x and y for a batch of items, from their ``centred_gram``s (K, c + d, c + d)
    and 1x1 adapters A (K, d, c): ``cka_distill_loss(adapter(x), y)`` without the adapter's pass over pixels.

    The adapter is linear, so the centred Grams of A x are A G_xx A^T and A G_xy: A acts on c x c
    matrices. Its bias is removed by the centring: CKA does not depend on it, so CKA adapters have none."""
    c = adapters.shape[2]
    with torch.autocast(grams.device.type, enabled=False):
        adapters = adapters.float()
        cross = (grams[:, c:, :c] @ adapters.mT).pow(2).sum((1, 2))
        norm = torch.linalg.matrix_norm(adapters @ grams[:, :c, :c] @ adapters.mT) * \
            torch.linalg.matrix_norm(grams[:, c:, c:].detach())  # the teacher's alone: no gradient
        return 1 - cross / norm.clamp_min(1e-12)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.softmax(teacher_logits.float() / t, dim=1),
                    reduction="batchmean") * (t * t)


# ----------------------------------------------------------------------------- levers
def batchnorms(*nets: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for net in nets for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def use_statistics(bns: list, stats: list[tuple[Tensor, Tensor]]) -> None:
    """Normalise with the given stored statistics (eval-mode BN)."""
    for m, (mean, var) in zip(bns, stats):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.eval()


# ----------------------------------------------------------------------------- stage
class SqueezeStage(NetStage):
    """The student ``net`` (product) learns every source while distilling the frozen teacher."""

    name = "squeeze"

    @classmethod
    def steps(cls, cfg):
        return cfg.squeeze.steps or cfg.train.steps

    @classmethod
    def build(cls, cfg, specs, run_dir=None):
        from xlearner.runs import load_generalist, load_teacher, resolve_generalist_dir, resolve_teacher_dir

        default = run_dir.parent / "expansion" if run_dir is not None else None
        teacher_dir = resolve_teacher_dir(cfg.squeeze.teacher, default)
        teacher, _, _ = load_teacher(teacher_dir)
        print(f"squeeze: teacher {teacher_dir}", flush=True)
        generalist = None
        if cfg.squeeze.generalist:
            g_dir = resolve_generalist_dir(cfg.squeeze.generalist, run_dir.parent / "msmt" if run_dir is not None else None)
            generalist = load_generalist(g_dir)
            print(f"squeeze: generalist teacher {g_dir}", flush=True)
        return cls(cfg, specs, teacher, generalist, teacher_dir=teacher_dir)

    def __init__(self, cfg: RunConfig, specs: list, teacher: nn.Module, generalist: nn.Module | None = None,
                 teacher_dir: Path | None = None):
        super().__init__(cfg, specs, build_student(cfg, specs, teacher))
        self.cfg = cfg
        self.tasks = tasks.present([s.task for s in specs])
        self.teacher_dir = teacher_dir  # recorded in run.json
        sq = cfg.squeeze
        self.distill_weight = float(sq.distill_weight)
        self.kd_weight = float(sq.kd_weight)
        self.temperature = float(sq.kd_temperature)
        self.distill_fn = DISTILL_LOSSES[sq.distill_loss]
        self.teacher_bn = sq.teacher_bn
        self.generalist_weight = float(sq.generalist_weight)
        n_feats = len(self.net.backbone.channels)
        bad = [i for i in sq.distill_stages if not 1 <= i <= n_feats]
        if bad:
            raise ConfigError(f"squeeze.distill_stages {list(sq.distill_stages)}: indices are 1-based into the "
                              f"{n_feats} backbone features (out_indices); {bad} out of range")
        self.distill_stages = list(sq.distill_stages)
        missing = [t for t in self.tasks if t not in teacher.backbones]
        if missing and self.distill_weight > 0:
            raise ConfigError(f"squeeze: the expansion model has no branch for tasks {missing}; "
                              f"train the expansion stage on the same sources")
        # which teacher branches a batch of task t is distilled from
        self.all_teachers = sq.distill_teachers == "all"
        branches = list(teacher.backbones.keys()) if self.all_teachers else self.tasks
        chans = self.net.backbone.channels
        # adapters exist only when used: an unused parameter would stall DDP (so CKA's have no bias)
        self.batched_cka = sq.distill_loss == "cka"
        bias = not self.batched_cka
        self.adapters = nn.ModuleDict({
            t: nn.ModuleList(_dirac_conv(chans[i - 1], bias=bias) for i in self.distill_stages) for t in branches
        }) if self.distill_weight > 0 and self.distill_stages else nn.ModuleDict()
        object.__setattr__(self, "teacher", teacher)  # not a submodule: frozen, unsaved, not optimised
        teacher.eval()
        object.__setattr__(self, "generalist", generalist if self.generalist_weight > 0 else None)
        if generalist is not None and self.generalist is None:
            print("squeeze: generalist_weight is 0: the generalist teacher is not used", flush=True)
        self.generalist_adapters = nn.ModuleList()
        if self.generalist is not None and self.distill_stages:
            g_chans = self.generalist.channels
            if len(g_chans) != n_feats:
                raise ConfigError(f"squeeze.generalist has {len(g_chans)} feature stages, the student {n_feats}: "
                                  f"use a run of the same backbone architecture")
            self.generalist_adapters = nn.ModuleList(_dirac_conv(chans[i - 1], g_chans[i - 1], bias=bias)
                                                     for i in self.distill_stages)
        self._source_stats: dict[str, list] | None = None
        self._mix, self._mix_key = None, None  # the (keys x pairs) weights of the batched CKA
        if self.teacher_bn == "batch":
            use_batch_statistics(teacher)
            if self.generalist is not None:
                use_batch_statistics(self.generalist)
        self._group_teacher()

    def _group_teacher(self) -> None:
        """The teacher's branches side by side (``GroupedBranches``: the same features in about a third of
        the operators), and the batches of sources of one image size and batch size side by side too;
        rebuilt whenever the teacher moves or is cast. Not with ``teacher_bn: source``, whose
        statistics change per source."""
        object.__setattr__(self, "_grouped", None)  # not a submodule: unsaved, like the teacher
        if self.teacher_bn != "batch" or not (self.adapters or self.kd_weight > 0):
            return
        shapes: dict[tuple, list] = {}
        for name, spec in self.specs.items():
            src = next((s for s in self.cfg.sources if s.name == name), None)
            if src is None:  # a source the config does not name (a test's): grouped when it is run
                continue
            shapes.setdefault((self.cfg.size_of(src), src.batch_size), []).append(self._keep(spec.task))
        try:
            object.__setattr__(self, "_grouped", GroupedBranches(self.teacher, [tuple(k) for k in shapes.values()]))
        except NotGroupable as e:
            if not getattr(self, "_said_ungrouped", False):
                print(f"squeeze: the teacher's branches run one after another ({e})", flush=True)
                self._said_ungrouped = True

    def refresh_teacher(self) -> None:
        """Copy the teacher's weights again after editing them in place: the grouped copy does not follow
        such edits (the teacher is frozen; moves and casts through the stage rebuild it themselves)."""
        self._group_teacher()

    def _keep(self, task: str) -> str | None:
        """The teacher branch a batch of ``task`` is distilled from (None: all of them)."""
        return None if self.all_teachers and self.adapters else task

    @torch.no_grad()
    def _teacher_features(self, batch: dict[str, dict], sources: list[str]) -> dict[str, dict[str, list[Tensor]]]:
        """source -> teacher branch -> features C2..C5, for ``sources``; batches of one shape side by side."""
        if self._grouped is None:
            out = {}
            for name in sources:
                images = batch[name]["images"]
                self._teacher_for(name, images.device)
                keep = self._keep(self.specs[name].task)
                out[name] = self.teacher.all_branch_features(images) if keep is None else \
                    {keep: self.teacher.branch_features(images, keep)}
            return out
        groups: dict[tuple, list[str]] = {}
        for name in sources:
            groups.setdefault(tuple(batch[name]["images"].shape), []).append(name)
        out = {}
        for names in groups.values():
            feats = self._grouped.features([batch[n]["images"] for n in names],
                                           [self._keep(self.specs[n].task) for n in names])
            out.update(zip(names, feats))
        return out

    def _apply(self, fn, *args, **kwargs):
        # .to(device) / .half() ... also move the (unregistered) teacher and generalist
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        if self.generalist is not None:
            self.generalist._apply(fn, *args, **kwargs)
        self._group_teacher()
        return self

    def cast_frozen_for_autocast(self, dtype: torch.dtype) -> None:
        """Keep the frozen teacher's (and generalist's) conv and linear weights in the autocast dtype
        (the engine calls this under ``train.amp``). Autocast caches its casts only of weights that
        require grad, so a frozen fp32 teacher was cast again on every call: about 330 operators of
        a bf16 squeeze step (docs/performance.md). The features do not change: autocast rounded the
        weights to the same dtype. Not with ``teacher_bn: source``, whose statistics pass runs the
        teacher outside autocast."""
        if self.teacher_bn == "source":
            return
        for net in self._frozen_nets():
            for m in net.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.to(dtype)
        self._group_teacher()

    def _frozen_nets(self) -> list[nn.Module]:
        return [self.teacher] + ([self.generalist] if self.generalist is not None else [])

    def _run_frozen(self, images: Tensor) -> None:
        self.teacher.all_branch_features(images)
        if self.generalist is not None:
            self.generalist(images)

    def estimate_source_statistics(self, device: torch.device | None = None, loaders: dict | None = None) -> None:
        """``teacher_bn: source``: precise-BN statistics of the teacher (and generalist) per source, on
        ``teacher_bn_batches`` batches of its training images (resized, not augmented). ``loaders``
        (source -> iterable of batches with "images") replaces the source's own data."""
        import itertools

        from xlearner.data.loader import eval_loader
        from xlearner.stages.common import build_source, spread_subset

        n = self.cfg.squeeze.teacher_bn_batches
        bns = batchnorms(*self._frozen_nets())
        stats = {}
        for name in self.specs:
            if loaders is not None:
                loader = loaders[name]
            else:
                src = self.cfg.source(name)
                data = spread_subset(build_source(src, "train"), n * src.batch_size)
                loader = eval_loader(data, src.task, self.cfg.size_of(src), src.batch_size)
            batches = (b["images"].to(device) if device is not None else b["images"]
                       for b in itertools.islice(loader, n))
            stats[name] = estimate_bn_statistics(bns, self._run_frozen, batches)
        self._source_stats = stats

    def _teacher_for(self, source: str, device: torch.device) -> None:
        if self.teacher_bn != "source":
            return
        if self._source_stats is None:
            self.estimate_source_statistics(device)
        use_statistics(batchnorms(*self._frozen_nets()), self._source_stats[source])

    def _distill(self, distill: dict[str, list]) -> dict[str, Tensor]:
        """Each key's weighted mean over its (adapters, student features, teacher features) pairs of the
        mean over the distilled stages of the distillation loss. CKA: all pairs of a stage at once, as
        one batch of Gram matrices (the generalist's, whose width may differ, as a second batch)."""
        weights = {key: self.generalist_weight if key == "generalist" else self.distill_weight for key in distill}
        if not self.batched_cka:
            return {key: weights[key] * torch.stack([
                torch.stack([self.distill_fn(a[j](f[i - 1]), t[i - 1]) for j, i in enumerate(self.distill_stages)]).mean()
                for a, f, t in pairs]).mean() for key, pairs in distill.items()}
        keys = [k for k in distill if k != "generalist"] + (["generalist"] if "generalist" in distill else [])
        batches = [[p for k in keys if k != "generalist" for p in distill[k]]] + \
            ([distill["generalist"]] if "generalist" in distill else [])
        per_stage = []
        for j, i in enumerate(self.distill_stages):
            values = [adapted_cka_loss(torch.stack([centred_gram(f[i - 1], t[i - 1]) for _, f, t in b]),
                                       torch.stack([a[j].weight.flatten(1) for a, _, _ in b])) for b in batches if b]
            per_stage.append(values[0] if len(values) == 1 else torch.cat(values))
        # (keys, pairs): each key's weight / (its pairs x stages) on its own pairs
        counts = tuple(len(distill[k]) for k in keys)
        mix_key = (counts, tuple(weights[k] for k in keys), len(per_stage), per_stage[0].device)
        if self._mix_key != mix_key:
            mix = torch.zeros(len(keys), sum(counts))
            start = 0
            for r, (k, n) in enumerate(zip(keys, counts)):
                mix[r, start:start + n] = weights[k] / (n * len(per_stage))
                start += n
            self._mix, self._mix_key = mix.to(per_stage[0].device), mix_key
        return dict(zip(keys, (self._mix @ torch.stack(per_stage).sum(0)).unbind()))

    def features(self, images: Tensor, task: str):
        return self.net.backbone(images)

    def forward(self, batch: dict[str, dict]) -> dict[str, Tensor]:
        th, t_th = self.net.task_heads, self.teacher.task_heads
        # KD on logits: tasks whose prediction is one logit vector per image (cls)
        use_kd = {source: self.kd_weight > 0 and tasks.get(self.specs[source].task).image_logits and source in t_th.heads
                  for source in batch}
        teacher = self._teacher_features(batch, [s for s in batch if self.adapters or use_kd[s]])
        losses: dict[str, Tensor] = {}
        distill: dict[str, list] = {}  # key -> (adapters, student features, teacher features) per batch
        for source, b in batch.items():
            task = self.specs[source].task
            images = b["images"]
            feats = self.net.backbone(images)
            neck_out = th.necks[task](feats)
            losses[source] = tasks.get(task).loss(th.heads[source], neck_out, b) * self.loss_weights[source]
            for u in (teacher[source] if self.adapters else ()):
                distill.setdefault(u, []).append((self.adapters[u], feats, teacher[source][u]))
            if len(self.generalist_adapters):
                self._teacher_for(source, images.device)
                with torch.no_grad():
                    g_feats = self.generalist(images)
                distill.setdefault("generalist", []).append((self.generalist_adapters, feats, g_feats))
            if use_kd[source]:
                with torch.no_grad():
                    t_logits = t_th.heads[source](t_th.necks[task](teacher[source][task]))
                losses[f"kd/{source}"] = self.kd_weight * kd_loss(th.heads[source](neck_out), t_logits, self.temperature)
        if distill:
            losses.update((f"distill/{key}", value) for key, value in self._distill(distill).items())
        return losses

    def frozen_features(self, images: Tensor, task: str):
        """What the frozen nets cost for a batch of task ``task`` (FLOP counting); None when unused."""
        if not (bool(self.adapters) or self.kd_weight > 0 or bool(len(self.generalist_adapters))):
            return None
        out = self.teacher.all_branch_features(images) if self.all_teachers else self.teacher.branch_features(images, task)
        if len(self.generalist_adapters):
            out = (out, self.generalist(images))
        return out

    def run_info(self) -> dict:
        return {"teacher": str(self.teacher_dir)} if self.teacher_dir is not None else {}
