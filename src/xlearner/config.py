"""Typed, validated run configuration.

A run is described by one YAML file (a preset shipped in ``xlearner/configs`` or a
user's file) plus ``key.sub=value`` overrides from the command line. Everything is
validated into pydantic models with ``extra="forbid"``, so a typo is an error that
names the key, the file and the closest valid key instead of a silently ignored
setting.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)
from typing_extensions import Annotated

from xlearner import tasks as _tasks


def _known_task(name: str) -> str:
    if name not in _tasks.names():
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(_tasks.names())}")
    return name


Task = Annotated[str, AfterValidator(_known_task)]
"""A registered task name (``xlearner.tasks``): cls, det, seg, or one a user registered."""

SourceFormat = Literal["embedded", "imagefolder", "csv", "coco", "voc", "maskfolder", "shards"]


MAX_IMAGE_PIXELS = 89_478_485
"""Default of a source's ``max_image_pixels``: PIL's own decompression-bomb limit."""


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the file."""


class _Strict(BaseModel):
    """Unknown keys, infinite or NaN numbers and a boolean where a number is meant are errors
    (pydantic would read ``steps: true`` as 1 step and accept ``lr: .inf``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: Any) -> Any:
        if isinstance(value, bool) and _wants_number(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got the boolean {str(value).lower()}; give a number")
        return value


def _wants_number(ann: Any) -> bool:
    """True for an int or float field (optional or not), False where a bool is also allowed."""
    args = getattr(ann, "__args__", None) or (ann,)
    if getattr(ann, "__origin__", None) not in (None, Literal) and type(None) not in args:
        return False  # a container (list, tuple, dict): its items are validated by their own type
    return bool({int, float} & set(args)) and bool not in args


class BackboneConfig(_Strict):
    name: str = "resnet18"
    """A timm model name, or ``tv:<name>`` for a torchvision ResNet or ``tv:mobilenet_v2``."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra constructor arguments (e.g. ``channels`` and ``stem_width`` for a narrow timm ResNet)."""
    out_indices: tuple[int, ...] = (1, 2, 3, 4)
    """Feature stages returned (C2..C5 for a ResNet)."""
    weights: Path | None = None
    """Initial weights: a .safetensors file or a .pth/.pt loaded with weights_only=True; or
    ``imagenet``: torchvision's ImageNet MobileNetV2 (needs ``name: tv:mobilenet_v2``), fetched once."""
    weights_partial: bool = False
    """Accept a weights file that lacks some backbone keys (they keep their random init); by default a
    missing key is an error, so a wrong file never leaves a silently random backbone."""

    @property
    def imagenet(self) -> bool:
        """True when the weights are the fetched ImageNet MobileNetV2 (``weights: imagenet``)."""
        return self.weights is not None and str(self.weights) == "imagenet"

    @model_validator(mode="after")
    def _check_imagenet(self) -> "BackboneConfig":
        if self.imagenet and self.name != "tv:mobilenet_v2":
            raise ValueError(f"backbone.weights: imagenet is torchvision's MobileNetV2: set backbone.name: "
                             f"tv:mobilenet_v2 (got {self.name!r})")
        return self


class ComposerConfig(_Strict):
    """Scene composer settings for the composed (glyphs-on-texture) det/seg sources."""

    canvas_size: int = 64
    objects: tuple[int, int] = (1, 4)
    scale: tuple[float, float] = (0.5, 1.2)
    """Glyph side relative to its native 28 px."""
    max_overlap: float = 0.3
    """Largest IoU allowed between a new glyph's box and any earlier one."""
    num_train: int = 2000
    num_val: int = 200
    num_test: int = 200
    seed: int = 0


class AugmentConfig(_Strict):
    """Training augmentation of one task; evaluation only resizes and normalises."""

    random_resized_crop: tuple[float, float] | None = None
    """Scale range of torchvision's RandomResizedCrop (None: plain resize)."""
    hflip: bool = False


class AugmentSet(_Strict):
    cls: AugmentConfig = Field(default_factory=lambda: AugmentConfig(random_resized_crop=(0.6, 1.0)))
    det: AugmentConfig = Field(default_factory=lambda: AugmentConfig(hflip=True))
    seg: AugmentConfig = Field(default_factory=lambda: AugmentConfig(random_resized_crop=(0.6, 1.0), hflip=True))

    def of(self, task: str) -> AugmentConfig:
        """A task without its own section here (a registered extra task) trains unaugmented."""
        return getattr(self, task, None) or AugmentConfig()


class SourceConfig(_Strict):
    """One labelled dataset of one task, with its own label space and head."""

    name: str
    task: Task
    format: SourceFormat = "embedded"
    dataset: str | None = None
    """For format=embedded: the embedded dataset's name (see `xlearner data list`)."""
    root: Path | None = None
    """Images: ImageFolder root, CSV/COCO/VOC image folder, mask-folder images, or the folder
    ``xlearner data pack`` wrote (format shards)."""
    annotations: Path | None = None
    """CSV file (cls), COCO JSON file (det), or folder of VOC XML files (det)."""
    masks: Path | None = None
    """Folder of PNG masks holding class indices, 255 = ignore (seg)."""
    val_root: Path | None = None
    val_annotations: Path | None = None
    val_masks: Path | None = None
    test_root: Path | None = None
    test_annotations: Path | None = None
    test_masks: Path | None = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Used when no explicit val split is given: a deterministic split by ``split_seed``."""
    split_seed: int = 0
    class_names: list[str] | None = None
    """Seg: names of the mask values 0..K-1 (required for maskfolder); cls/det: optional override."""
    batch_size: int = Field(16, ge=1)
    loss_weight: float = Field(1.0, ge=0.0)
    on_bad_sample: Literal["error", "skip"] = "error"
    image_size: int | None = Field(None, ge=8)
    """Training/eval image side; None takes the run's ``image_size``."""
    composer: ComposerConfig | None = None
    """Overrides for composed embedded sources."""
    max_samples: int | None = Field(None, ge=1)
    """Use at most this many training records (deterministic subset) - for quick presets."""
    resize: Literal["keep_ratio", "square"] | None = None
    """det/seg: ``keep_ratio`` scales the longer side to ``image_size`` and pads to a square
    (no distortion, as detectors and segmenters are trained and scored); ``square`` stretches to
    ``image_size`` x ``image_size``. None: keep_ratio for det/seg data a user brings (coco, voc,
    maskfolder), square for embedded sources (their composed scenes are square already)."""
    reduce_zero_label: bool = False
    """maskfolder: masks use 0 for "other" and 1..K for the classes (ADE20K): 0 -> 255 (ignore), k -> k-1."""
    label_map: dict[int, int] | None = None
    """maskfolder: mask value -> class index (or 255 = ignore), for other mask conventions; unlisted values stay."""
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1)
    """An image or mask of more pixels (width x height) is a bad sample, refused before it is
    decoded; the default is PIL's own decompression-bomb limit. Raise it for large aerial or slide images."""
    allow_outside_root: bool = False
    """coco/voc: accept image paths that lead outside ``root`` (``../``, an absolute path, a symlink
    out of it); by default such a record is a bad sample, so an annotation file never reads elsewhere."""

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        """The two reading safeguards are left out of a dump while at their defaults, so a source that
        does not set them keys its runs and caches as before they existed (finished parts are reused)."""
        data = handler(self)
        for key, default in (("max_image_pixels", MAX_IMAGE_PIXELS), ("allow_outside_root", False)):
            if key in data and data[key] == default:
                del data[key]
        return data

    @model_validator(mode="after")
    def _check_format_fields(self) -> "SourceConfig":
        needed = {
            "embedded": ["dataset"],
            "imagefolder": ["root"],
            "csv": ["annotations"],
            "coco": ["root", "annotations"],
            "voc": ["root", "annotations"],
            "maskfolder": ["root", "masks", "class_names"],
            "shards": ["root"],
        }[self.format]
        missing = [f for f in needed if getattr(self, f) is None]
        if missing:
            raise ValueError(
                f"source '{self.name}' (format {self.format}) needs {', '.join(missing)}"
            )
        if self.format == "shards":
            stray = [f for f in ("annotations", "masks", "val_root", "val_annotations", "val_masks", "test_root",
                                 "test_annotations", "test_masks") if getattr(self, f) is not None]
            if stray:
                raise ValueError(f"source '{self.name}' (format shards): the packed folder holds its splits, labels "
                                 f"and masks; remove {', '.join(stray)}")
        if self.resize == "keep_ratio" and not _tasks.get(self.task).dense:
            raise ValueError(f"source '{self.name}': resize: keep_ratio applies to det/seg sources; "
                             f"remove it (cls images are cropped to a square)")
        if (self.reduce_zero_label or self.label_map) and self.format != "maskfolder":
            raise ValueError(f"source '{self.name}': reduce_zero_label/label_map apply to the masks of a "
                             f"maskfolder source; remove them from this {self.format} {self.task} source")
        if self.reduce_zero_label and self.label_map:
            raise ValueError(f"source '{self.name}': give reduce_zero_label or label_map, not both "
                             f"(a label_map can also express the shift: {{0: 255, 1: 0, 2: 1, ...}})")
        bad = {k: v for k, v in (self.label_map or {}).items() if not (0 <= k and 0 <= v <= 255)}
        if bad:
            raise ValueError(f"source '{self.name}': label_map entries {bad} are out of range "
                             f"(mask values >= 0 map to class indices 0..254 or 255 = ignore)")
        return self

    @property
    def resize_mode(self) -> str:
        """The ``resize`` in force: the given one, else keep_ratio for user det/seg formats."""
        if self.resize is not None:
            return self.resize
        return "keep_ratio" if _tasks.get(self.task).dense and self.format != "embedded" else "square"

    @property
    def scored_as_published(self) -> bool:
        """det/seg data a user brings is scored at each image's original size against its own
        annotations (COCO: the annotation file itself); embedded sources keep their in-memory
        scoring at the network's input size, so the embedded benchmark's numbers do not move."""
        return _tasks.get(self.task).dense and self.format != "embedded"


class TrainConfig(_Strict):
    steps: int = Field(200, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = 0.9
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    clip_grad: float | None = 5.0
    amp: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU; bf16: bf16 autocast on CUDA and on the CPU (tests the GPU path)."""
    channels_last: bool = False
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile's mode when ``compile`` is on; ``reduce-overhead`` replays the step's kernels
    as CUDA graphs, for steps whose time goes to launching operators rather than running them."""
    det_pad_boxes: int | None = Field(None, ge=1)
    """Detection batches pad their boxes to at least this many per image (padding changes no loss).
    The training loader encodes FCOS targets per anchor, so a compiled step sees no box count; the
    padding matters where the step matches boxes itself (level grids that are not ceil(size /
    stride), the frozen transfer's cached batches), which then keeps one shape instead of recompiling."""
    num_workers: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)
    val_every: int = Field(0, ge=0)
    """Validate every N steps (0: only at the end)."""
    val_batches: int = Field(8, ge=1)
    precise_bn_batches: int = Field(8, ge=0)
    """Before validating a source, re-estimate BatchNorm statistics on this many of its train
    batches (precise BN) and validate again; both figures are logged (0: blended only)."""
    ckpt_every: int = Field(100, ge=1)
    progress: bool = True


class ExpansionConfig(_Strict):
    reconciliation: bool = True
    reconcile_after: list[int] = Field(default_factory=lambda: [1, 2, 3])
    """Stage boundaries (1-based index into backbone stages) after which branches exchange features."""
    detach_others: bool = True
    reconcile_from: Literal["same", "all"] = "same"
    """``same``: R_{t<-u} at stage s reads stage s of branch u (1x1 conv + BN); ``all``: stages 1..s of
    branch u, resampled to stage s (gv-benchmark's cross layers; ablation ``reconcile_all_stages``)."""
    steps: int | None = Field(None, ge=1)
    """Optimizer steps of the expansion stage (None: ``train.steps``); with ``squeeze.steps``, how
    X-Learner splits its budget between the two stages (levers ``split_25_75``, ``split_75_25``)."""


class SqueezeConfig(_Strict):
    init: str = "copy:cls"
    """``scratch`` or ``copy:<task>``: the student's initial weights."""
    steps: int | None = Field(None, ge=1)
    """Optimizer steps of the squeeze stage (None: ``train.steps``)."""
    distill_weight: float = Field(1.0, ge=0)
    distill_stages: list[int] = Field(default_factory=lambda: [1, 2, 3, 4])
    """Which stage features (1-based, of out_indices) are distilled."""
    kd_weight: float = Field(0.0, ge=0)
    kd_temperature: float = Field(4.0, gt=0)
    distill_teachers: Literal["own", "all"] = "own"
    """``own``: a batch of task t is distilled from teacher branch t only; ``all``: on every source's
    images, adapter A_u is pulled towards every branch u (URL's multi-teacher distillation)."""
    distill_loss: Literal["l2", "cosine", "cka"] = "l2"
    """``l2``: squared distance of per-pixel channel-normalised maps (= 2 - 2cos per pixel);
    ``cosine``: 1 - cos of each image's whole (C, H, W) map; ``cka``: 1 - linear CKA over the batch's pixels."""
    teacher_bn: Literal["batch", "source"] = "batch"
    """How the frozen teacher normalises: ``batch`` statistics of each batch, or ``source``: precise-BN
    statistics estimated once per source on ``teacher_bn_batches`` of its training batches."""
    teacher_bn_batches: int = Field(8, ge=1)
    generalist: str | None = None
    """A generalist teacher beside the task branches (Representation Consolidation): ``msmt`` (in
    ``xlearner run``: the run's MSMT baseline) or a single-backbone run folder; distilled through its own adapter."""
    generalist_weight: float = Field(1.0, ge=0)
    teacher: Path | None = None
    """Expansion run folder (or its checkpoint); `xlearner run` fills it in."""

    @model_validator(mode="after")
    def _check_init(self) -> "SqueezeConfig":
        if self.init != "scratch" and not (self.init.startswith("copy:") and self.init[5:] in _tasks.names()):
            raise ValueError(f"squeeze.init must be 'scratch' or copy:cls|det|seg, got {self.init!r}")
        return self


class BaselineConfig(_Strict):
    ssst_source: str | None = None
    """Source for SSST; None picks the ``ssst_task`` source with the most training images."""
    ssst_task: Task = "cls"
    """Task of the SSST baseline (the supervised single-dataset model, e.g. ImageNet classification)."""
    msst_task: Task = "cls"
    """Task whose sources MSST trains on (`xlearner run` trains MSST for every task)."""
    steps: int | None = Field(None, ge=1)
    """Optimizer steps of every trained baseline (None: ``train.steps``). X-Learner trains its
    sources in two stages of ``train.steps`` (expansion, then squeeze); ``2 * train.steps`` gives
    each baseline as many batches of each of its sources as X-Learner sees in all."""
    teachers: bool = True
    """`xlearner run` also transfers each expansion branch as ``xlearner.expansion[<task>]``, so the
    report shows what the squeezed student keeps of its teachers (not baselines: they are T backbones)."""
    imagenet: bool = True
    """`xlearner run` transfers torchvision's ImageNet MobileNetV2 untouched as the method ``imagenet``
    (no training stage; its ImageNet pretraining is an external cost) when ``backbone.name`` is
    ``tv:mobilenet_v2`` at the standard width; other architectures have no pretrained file here."""


class TransferConfig(_Strict):
    datasets: list[str] = Field(
        default_factory=lambda: [
            "animal_mnist", "sklearn_digits", "textures",
            "tree_crowns", "composed_det_animals",
            "nuclei", "composed_seg_animals",
        ]
    )
    seeds: int = Field(2, ge=1)
    cls_mode: Literal["linear", "finetune"] = "linear"
    det_mode: Literal["frozen", "finetune"] = "frozen"
    seg_mode: Literal["frozen", "finetune"] = "frozen"
    steps: int = Field(150, ge=1)
    """Optimizer steps for det/seg heads and cls fine-tune (frozen and finetune modes run on the
    engine's ``fit``: AdamW, linear warmup then cosine; the fields from ``lr`` to ``backbone_lr_factor``)."""
    task_steps: dict[Task, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    """Per-task overrides of ``steps``, e.g. ``{det: 300}``: FCOS heads converge more slowly than seg heads."""
    lr: float = 2e-3
    warmup_steps: int = Field(20, ge=0)
    """Linear warmup, applied as ``min(warmup_steps, steps // 10)`` steps (none below 10 steps)."""
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    """The cosine ends at ``lr * min_lr_ratio``."""
    weight_decay: float = Field(1e-4, ge=0)
    """AdamW's (decoupled) weight decay."""
    decay_norms_and_biases: bool = True
    """Weight decay on 1-D parameters too (norm layers, biases), as transfer always did; the
    upstream stages exempt them."""
    clip_grad: float | None = Field(5.0, gt=0)
    """Gradient-norm clipping over the trained parameters (None: no clipping)."""
    backbone_lr_factor: float = Field(0.1, ge=0)
    """``finetune``: the backbone trains at ``lr * backbone_lr_factor`` (the neck and head at ``lr``)."""
    batch_size: int = 16
    image_size: int = 64
    max_train_samples: int | None = 2000
    eval_split: Literal["test", "val"] = "test"
    """Split scored: ``test`` for reports; ``val`` when tuning pretraining settings, so test stays untouched."""
    adapt_bn: bool = True
    """Frozen/linear modes: re-estimate BatchNorm statistics on the downstream train images (AdaBN)."""
    seg_head: Literal["fpn", "linear"] = "fpn"
    """Segmentation transfer head: FPN + Panoptic-FPN head, or a linear dense probe (frozen mode)."""
    det_head_convs: int = Field(4, ge=1)
    """Depth of the FCOS towers of the transfer detector (torchvision's default is 4)."""
    seg_background_weight: float = Field(1.0, gt=0)
    """Weight of class 0 (background) in the transfer segmentation cross-entropy."""
    probe_C: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])
    """Inverse L2 strengths tried for the linear probe, picked on the val split."""
    epochs: float | None = Field(None, gt=0)
    """A schedule in epochs over the train subset for the trained modes, as detection users count
    it (mmdet's ``1x`` is 12): ``ceil(epochs * images / batch_size)`` steps, in place of ``steps``
    and ``task_steps``. None: those."""
    augment: AugmentConfig | None = None
    """``finetune``: the training augmentation (None: the run's ``augment`` of the task), so one
    dataset's protocol can carry its own, e.g. scale jitter for real photos (docs/ranking.md)."""
    by_dataset: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per downstream dataset (its source name), the transfer settings that differ from the rest,
    e.g. ``{tree_crowns: {det_mode: finetune, image_size: 200, epochs: 24}}``: real photos fine-tuned
    at their own resolution while the composed scenes keep the run's protocol (docs/ranking.md)."""

    @model_validator(mode="after")
    def _check_by_dataset(self) -> "TransferConfig":
        for name, entry in self.by_dataset.items():
            fixed = sorted(set(entry) & _RUN_WIDE_TRANSFER)
            if fixed:
                raise ValueError(f"transfer.by_dataset.{name}: {fixed} hold for the whole run (every dataset "
                                 f"pairs the same seeds and split); set them in transfer itself")
            self.for_dataset(name)  # unknown or invalid keys are refused here, naming the dataset
        return self

    def for_dataset(self, name: str) -> "TransferConfig":
        """The settings a transfer to dataset ``name`` runs with (``by_dataset`` applied)."""
        entry = self.by_dataset.get(name)
        if not entry:
            return self
        try:
            return TransferConfig.model_validate({**self.model_dump(exclude={"by_dataset"}), **entry})
        except ValidationError as exc:
            raise ValueError("; ".join(f"transfer.by_dataset.{name}.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                       for e in exc.errors())) from None

    def steps_of(self, task: str, num_train: int | None = None) -> int:
        """The optimizer steps of a trained transfer to a ``task`` dataset of ``num_train`` images."""
        if self.epochs is not None:
            if num_train is None:
                raise ValueError("transfer.epochs: the number of training images is needed to count steps")
            return max(1, math.ceil(self.epochs * num_train / max(1, min(self.batch_size, num_train))))
        return self.task_steps.get(task, self.steps)


_RUN_WIDE_TRANSFER = {"datasets", "seeds", "eval_split", "by_dataset"}


class GatesConfig(_Strict):
    """When a run can rank backbones; the report marks each gate pass/fail and gives a verdict."""

    upstream: dict[str, float] = Field(default_factory=dict)
    """Source name -> minimum validation score (points, precise BN) of every stage that trains it."""
    on_task: dict[str, str] = Field(default_factory=lambda: {"cls": "ssst", "det": "msst_det", "seg": "msst_seg"})
    """Per task type, the method whose gain over scratch shows that the transfer protocol can rank."""
    separation_points: float = Field(5.0, ge=0)
    """The on-task method must beat scratch by at least this many points ..."""
    separation_se: float = Field(3.0, ge=0)
    """... and by at least this many standard errors of the paired difference ..."""
    min_seeds: int = Field(3, ge=1)
    """... over at least this many paired seeds."""


class RunConfig(_Strict):
    name: str = "run"
    seed: int = 0
    image_size: int = Field(64, ge=8)
    fpn_channels: int = Field(64, ge=8)
    det_head_convs: int = Field(4, ge=1)
    """Conv layers of each upstream FCOS tower (classification and box); FCOS uses 4. The
    upstream heads are a training signal for the backbone and are not transferred."""
    seg_background_weight: float = Field(1.0, gt=0)
    """Weight of class 0 (background) in the upstream segmentation cross-entropy (mmseg's
    ``class_weight``): below 1 where background covers most pixels and would drown the glyph classes."""
    seg_head: Literal["fpn", "linear"] = "fpn"
    """Upstream segmentation head: FPN + Panoptic-FPN head, or the linear dense head (BN + 1x1 conv
    per level). Like the FCOS towers, it is a training signal for the backbone and is not transferred."""
    seg_loss_points: int = Field(0, ge=0)
    """Upstream segmentation CE on this many pixels per image, drawn uniformly at random each step
    (Mask2Former's point loss, uniform sampling); 0: every pixel."""
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    augment: AugmentSet = Field(default_factory=AugmentSet)
    """Per-task training augmentation; ``augment.of(task)``."""
    sources: list[SourceConfig]
    train: TrainConfig = Field(default_factory=TrainConfig)
    expansion: ExpansionConfig = Field(default_factory=ExpansionConfig)
    squeeze: SqueezeConfig = Field(default_factory=SqueezeConfig)
    baselines: BaselineConfig = Field(default_factory=BaselineConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    """Read by the report only: changing a gate re-keys no training or transfer."""

    @model_validator(mode="after")
    def _check_sources(self) -> "RunConfig":
        if not self.sources:
            raise ValueError("sources is empty: give at least one source")
        names = [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"source names must be unique, repeated: {sorted(dup)}")
        unknown = sorted(set(self.gates.upstream) - set(names))
        if unknown:
            raise ValueError(f"gates.upstream names unknown sources {unknown}; sources are {names}")
        self._check_det_channels()
        return self

    def _check_det_channels(self) -> None:
        """The FCOS head (``models.heads.DetHead``) normalises its towers with GroupNorm(32, fpn_channels)."""
        from xlearner.data.embedded.catalog import EMBEDDED  # a plain table, no fetch machinery

        def grouped(task: str) -> bool:
            return _tasks.get(task).fpn_channels_multiple == 32

        det = [f"source '{s.name}'" for s in self.sources if grouped(s.task)]
        det += [f"transfer dataset '{d}'" for d in self.transfer.datasets
                if d in EMBEDDED and grouped(EMBEDDED[d].task)]
        if det and self.fpn_channels % 32:
            up = -(-self.fpn_channels // 32) * 32
            raise ValueError(f"fpn_channels {self.fpn_channels} must be a multiple of 32 when a det head is "
                             f"built ({', '.join(det)}): the FCOS head uses GroupNorm(32, fpn_channels); "
                             f"use fpn_channels: {up}")

    @property
    def tasks(self) -> list[str]:
        """Tasks present among the sources, in the canonical cls, det, seg order."""
        present = {s.task for s in self.sources}
        return _tasks.present(present)

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"no source named {name!r}; sources are {[s.name for s in self.sources]}")

    def size_of(self, source: SourceConfig) -> int:
        return source.image_size or self.image_size

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """Stable hash of the resolved config: the key under which finished work is reused."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------
# loading

PRESETS_PACKAGE = "xlearner.configs"


def preset_names() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files(PRESETS_PACKAGE).iterdir() if p.name.endswith(".yaml")
    )


def preset_path(name: str) -> Path:
    path = Path(str(resources.files(PRESETS_PACKAGE).joinpath(f"{name}.yaml")))
    if not path.is_file():
        close = difflib.get_close_matches(name, preset_names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"no preset named '{name}'{hint}; presets: {', '.join(preset_names())}")
    return path


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override value {text!r} is not valid YAML ({str(exc).splitlines()[0]}); "
                          f"quote it or fix the brackets") from None


def apply_overrides(data: dict[str, Any], overrides: list[str], origin: str = "command line") -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; list items are addressed by index or by ``name``."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' on the {origin} is not of the form key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                node_idx = _list_index(node, part, key)
                if last:
                    node[node_idx] = _parse_value(value)
                else:
                    node = node[node_idx]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{'.'.join(parts[:i])}' is not a section")
            if last:
                node[part] = _parse_value(value)
            else:
                node = node.setdefault(part, {})
    return data


def _list_index(items: list, part: str, key: str) -> int:
    if part.isdigit():
        if int(part) >= len(items):
            raise ConfigError(f"override '{key}': index {part} out of range (list has {len(items)} items)")
        return int(part)
    for idx, entry in enumerate(items):
        if isinstance(entry, dict) and entry.get("name") == part:
            return idx
    names = [e.get("name") for e in items if isinstance(e, dict)]
    close = difflib.get_close_matches(part, [n for n in names if n], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"override '{key}': no list item named '{part}'{hint}; items: {names}")


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths in a config file are relative to that file."""
    path_fields = ("root", "annotations", "masks", "val_root", "val_annotations", "val_masks",
                   "test_root", "test_annotations", "test_masks")
    for src in data.get("sources", []) or []:
        if isinstance(src, dict):
            for f in path_fields:
                if isinstance(src.get(f), str):
                    p = Path(src[f]).expanduser()
                    src[f] = str(p if p.is_absolute() else base / p)
    bb = data.get("backbone")
    if isinstance(bb, dict) and isinstance(bb.get("weights"), str) and bb["weights"] != "imagenet":
        p = Path(bb["weights"]).expanduser()
        bb["weights"] = str(p if p.is_absolute() else base / p)


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys at a location of the config tree, for 'did you mean' hints."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        current = _model_in(ann)
    return list(getattr(current, "model_fields", {}).keys()) if current is not None else []


def _model_in(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _format_loc(loc: tuple, data: dict[str, Any]) -> str:
    out, node = [], data
    for part in loc:
        if isinstance(part, int):
            name = node[part].get("name") if isinstance(node, list) and isinstance(node[part], dict) else None
            out.append(f"[{part}]" + (f"({name})" if name else ""))
            node = node[part] if isinstance(node, list) and part < len(node) else None
        else:
            out.append(("." if out else "") + str(part))
            node = node.get(part) if isinstance(node, dict) else None
    return "".join(out)


def validate(data: dict[str, Any], origin: str) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            where = _format_loc(loc, data) or "(top level)"
            if err["type"] == "extra_forbidden":
                valid = _field_names(RunConfig, loc[:-1])
                close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                lines.append(f"unknown key '{where}'{hint} (valid keys here: {', '.join(valid)})")
            elif err["type"] == "missing":
                lines.append(f"missing required key '{where}'")
            else:
                got = err.get("input")
                got_s = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
                lines.append(f"'{where}': {err['msg']}{got_s}")
        raise ConfigError(f"invalid config {origin}:\n  " + "\n  ".join(lines)) from None


def check_paths(cfg: RunConfig, origin: str) -> None:
    """A missing path names the field and what was expected there."""
    expect = {
        "root": "a folder of images",
        "annotations": "the annotation file or folder",
        "masks": "a folder of PNG masks",
    }
    problems = []
    for i, src in enumerate(cfg.sources):
        for field in ("root", "annotations", "masks", "val_root", "val_annotations", "val_masks",
                      "test_root", "test_annotations", "test_masks"):
            p = getattr(src, field)
            if p is not None and not Path(p).exists():
                what = expect[field.split("_")[-1]]
                problems.append(f"sources[{i}]({src.name}).{field}: {p} does not exist (expected {what})")
    if cfg.backbone.weights is not None and not cfg.backbone.imagenet and not Path(cfg.backbone.weights).is_file():
        problems.append(f"backbone.weights: {cfg.backbone.weights} does not exist (expected a .safetensors or .pth file)")
    if problems:
        raise ConfigError(f"invalid config {origin}:\n  " + "\n  ".join(problems))


def load_config(name_or_path: str | Path, overrides: list[str] | None = None,
                check_files: bool = True) -> RunConfig:
    """Load a preset name or YAML path, apply overrides, validate."""
    text_path = Path(name_or_path)
    if text_path.suffix in (".yaml", ".yml") or text_path.exists():
        if not text_path.is_file():
            raise ConfigError(f"config file {text_path} does not exist; give a YAML path or a preset ({', '.join(preset_names())})")
        path = text_path
    else:
        path = preset_path(str(name_or_path))
    data = _read_yaml_mapping(path, "config file", "")
    _resolve_paths(data, path.parent)
    # per-task augmentation defaults differ by task: start overrides from the full defaults
    aug = AugmentSet().model_dump(mode="json")
    for task, given in (data.get("augment") or {}).items():
        aug.setdefault(task, {}).update(given or {})
    data["augment"] = aug
    data = apply_overrides(data, list(overrides or []))
    cfg = validate(data, origin=f"in {path}" + (f" with overrides {overrides}" if overrides else ""))
    if check_files:
        check_paths(cfg, origin=f"in {path}")
    return cfg


def _read_yaml_mapping(path: Path, what: str, expected: str) -> dict:
    """The mapping a YAML file holds (safe loading); a named ConfigError otherwise."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping{expected} at the top level")
    return data


def load_source_config(path: str | Path, overrides: list[str] | None = None) -> SourceConfig:
    """A YAML holding one source (the same schema as an item of ``sources``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"source file {path} does not exist")
    data = _read_yaml_mapping(path, "source file", " (name, task, format, ...)")
    if "sources" in data:
        srcs = data["sources"]
        if not isinstance(srcs, list) or len(srcs) != 1:
            n = len(srcs) if isinstance(srcs, list) else "no list of"
            raise ConfigError(f"{path} holds {n} sources; give a file with exactly one")
        data = srcs[0]
    wrapper = {"sources": [data]}
    _resolve_paths(wrapper, path.parent)
    wrapper = apply_overrides(wrapper, [f"sources.0.{o}" for o in (overrides or [])])
    cfg = validate(wrapper, origin=f"in {path}")
    check_paths(cfg, origin=f"in {path}")
    return cfg.sources[0]
