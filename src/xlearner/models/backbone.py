"""The backbone: a timm or torchvision CNN run stage by stage.

Reconciliation acts *between* stages, so the backbone must be callable one stage at a
time (`run_stages`). We build the FULL model (not timm's ``features_only`` wrapper) and
split its top-level children at the ``feature_info`` module names. The modules stay
registered on this object under their original names, so ``state_dict()`` keys are exactly
those of ``timm.create_model(name, num_classes=0, **kwargs)`` (or
``torchvision.models.<name>()`` minus ``fc``): a trained backbone exports without renaming.

Supported: CNNs whose feature stages are a sequential chain of top-level children (or of
the items of one top-level ``nn.Sequential``): timm ResNet/ResNeXt/ResNet-D family,
RegNet, EfficientNet, MobileNetV3, ConvNeXt; torchvision ResNets and MobileNetV2 via ``tv:<name>``.

``tv:mobilenet_v2`` is torchvision's model, chosen over timm's ``mobilenetv2_100`` because the
one real pretrained file here (``weights: imagenet``, see ``xlearner.data.pretrained``) is
torchvision's: its keys load as they are, with no hand-written key map, and an export loads
strictly back into ``torchvision.models.mobilenet_v2()`` (classifier removed). Its feature
points are the ends of ``features[1]``, ``[3]``, ``[6]``, ``[13]``, ``[17]`` (strides 2/4/8/16/32,
timm's choice) and ``[18]`` (the 1280-channel last conv, stride 32): ``out_indices`` (1, 2, 3, 4)
gives 24/32/96/320 channels, (1, 2, 3, 5) keeps the pretrained last conv as C5.
Parts after the last returned feature stage (e.g. ``conv_head``, ``global_pool``, ``fc``)
are dropped: they would never receive a gradient.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from xlearner.config import BackboneConfig

TV_RESNETS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
)
# torchvision ResNets have no feature_info: the same layout as timm's ResNet.
_TV_FEATURE_INFO = [("relu", 2), ("layer1", 4), ("layer2", 8), ("layer3", 16), ("layer4", 32)]
TV_MOBILENETS = ("mobilenet_v2",)
# torchvision MobileNetV2: ends of features[i] and their strides (features[18] = the 1x1 conv to 1280)
_TV_MOBILENET_POINTS = [(1, 2), (3, 4), (6, 8), (13, 16), (17, 32), (18, 32)]


def create_full_model(name: str, kwargs: dict | None = None) -> nn.Module:
    """The un-split model whose key names the backbone keeps (timm or ``tv:<resnet>``)."""
    kwargs = dict(kwargs or {})
    if name.startswith("tv:"):
        import torchvision

        arch = name[3:]
        if arch in TV_MOBILENETS:
            model = getattr(torchvision.models, arch)(weights=None, **kwargs)
            model.classifier = nn.Identity()
            return model
        if arch not in TV_RESNETS:
            raise ValueError(f"tv:{arch} is not a supported torchvision model; supported: "
                             f"{', '.join(TV_RESNETS + TV_MOBILENETS)}")
        model = getattr(torchvision.models, arch)(weights=None, **kwargs)
        model.fc = nn.Identity()
        return model
    import timm

    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def _feature_info(model: nn.Module, name: str) -> list[dict]:
    if name[3:] in TV_MOBILENETS and name.startswith("tv:"):
        return [{"module": f"features.{i}", "reduction": r, "num_chs": int(model.features[i].out_channels)}
                for i, r in _TV_MOBILENET_POINTS]
    if name.startswith("tv:"):
        chs = [model.conv1.out_channels] + [_last_channels(getattr(model, f"layer{i}")[-1]) for i in range(1, 5)]
        return [{"module": m, "reduction": r, "num_chs": c} for (m, r), c in zip(_TV_FEATURE_INFO, chs)]
    info = getattr(model, "feature_info", None)
    if info is None:
        raise ValueError(f"timm model {name!r} has no feature_info: it cannot be split into stages")
    info = getattr(info, "info", info)
    return [dict(i) for i in info]


def _last_channels(block: nn.Module) -> int:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    return bns[-1].num_features if bns else convs[-1].out_channels


def _chain(model: nn.Module, feature_modules: list[str]) -> list[tuple[str, nn.Module]]:
    """Modules in execution order, opening a top-level container where a feature point lies inside it."""
    out = []
    for name, child in model.named_children():
        inner = [f for f in feature_modules if f.startswith(name + ".")]
        if inner:
            if any(f.count(".") > 1 for f in inner) or not isinstance(child, nn.Sequential):
                raise ValueError(f"cannot split at {inner}: only one level of nn.Sequential can be opened")
            out.extend((f"{name}.{n}", m) for n, m in child.named_children())
        else:
            out.append((name, child))
    return out


class Backbone(nn.Module):
    """A CNN split into ``stages`` (stage 0 = stem + everything up to the first returned feature)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        model = create_full_model(cfg.name, cfg.kwargs)
        info = _feature_info(model, cfg.name)
        if not cfg.out_indices or max(cfg.out_indices) >= len(info) or list(cfg.out_indices) != sorted(set(cfg.out_indices)):
            raise ValueError(f"out_indices {cfg.out_indices} must be increasing indices into the {len(info)} "
                             f"feature points of {cfg.name}: {[i['module'] for i in info]}")
        wanted = [info[i]["module"] for i in cfg.out_indices]
        chain = _chain(model, wanted)
        names = [n for n, _ in chain]
        missing = [w for w in wanted if w not in names]
        if missing:
            raise ValueError(f"{cfg.name}: feature modules {missing} are not in the top-level chain {names}")
        cut = [names.index(w) + 1 for w in wanted]
        starts = [0] + cut[:-1]
        stages = nn.ModuleList(nn.Sequential(*[m for _, m in chain[a:b]]) for a, b in zip(starts, cut))
        used = set(names[: cut[-1]])
        # register the used modules under their original names; drop the unused tail
        for top, child in list(model.named_children()):
            if top in used:
                self.add_module(top, child)
            elif any(u.startswith(top + ".") for u in used):
                for sub in [n for n, _ in child.named_children() if f"{top}.{n}" not in used]:
                    del child._modules[sub]  # only trailing items: numbering is kept
                self.add_module(top, child)
        # `stages` views the same modules but is not registered: state_dict keys stay the model's
        object.__setattr__(self, "stages", stages)
        self.channels: list[int] = [int(info[i]["num_chs"]) for i in cfg.out_indices]
        self.strides: list[int] = [int(info[i]["reduction"]) for i in cfg.out_indices]
        if cfg.weights is not None:
            if str(cfg.weights) == IMAGENET:
                load_imagenet_weights(self)
            else:
                load_initial_weights(self, cfg.weights, partial=cfg.weights_partial)

    def run_stages(self, x: Tensor, start: int, stop: int) -> list[Tensor]:
        """Outputs of stages ``start..stop-1`` (0-based) applied in turn to ``x``."""
        outs = []
        for stage in self.stages[start:stop]:
            x = stage(x)
            outs.append(x)
        return outs

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.run_stages(x, 0, len(self.stages))


IMAGENET = "imagenet"
"""``backbone.weights: imagenet``: torchvision's ImageNet MobileNetV2 (fetched, sha256-checked)."""


def load_imagenet_weights(backbone: Backbone) -> None:
    """Every tensor of the backbone from torchvision's ImageNet MobileNetV2; a missing one is an error."""
    from xlearner.data.pretrained import IMAGENET_ARCH, fetch_imagenet_weights

    if backbone.cfg.name != IMAGENET_ARCH:
        raise ValueError(f"backbone.weights: imagenet holds torchvision's MobileNetV2; it needs backbone.name: "
                         f"{IMAGENET_ARCH}, not {backbone.cfg.name}")
    path = fetch_imagenet_weights()
    report = load_initial_weights(backbone, path)
    if report["missing"]:
        raise ValueError(f"backbone.weights: imagenet ({path}) lacks {len(report['missing'])} tensors of "
                         f"{backbone.cfg.name} with kwargs {backbone.cfg.kwargs}, e.g. {report['missing'][:3]}: "
                         f"the ImageNet weights fit only the standard width (no width_mult)")


class WeightsError(ValueError):
    """A weights file that is refused (not weights-only), unreadable, or does not fit the backbone."""


def check_finite(state: dict[str, Tensor], path: str | Path, what: str = "weights file") -> None:
    """WeightsError naming ``path`` and its first tensor holding NaN or inf (with how many of each)."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise WeightsError(f"{what} {path}: tensor {name!r} holds {nan} NaN and {inf} inf values of "
                               f"{t.numel()}; the weights are unusable (a diverged run saved, or a damaged copy): "
                               f"train or export them again")


WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def read_weights_file(path: str | Path) -> dict[str, Tensor]:
    """A .safetensors or a .pth/.pt/.bin (loaded with weights_only=True, never unpickling code)."""
    import pickle

    path = Path(path)
    if path.suffix not in WEIGHTS_SUFFIXES:
        raise WeightsError(f"weights file {path}: expected one of {', '.join(WEIGHTS_SUFFIXES)} (a .safetensors, "
                           f"or a state_dict saved with torch.save)")
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # SafetensorError and friends: a damaged or mislabelled file
            raise WeightsError(f"{path}: not a readable .safetensors file ({exc}); if it was written by "
                               f"torch.save, rename it to .pth") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # say it in our words: PyTorch's own message suggests weights_only=False, which would run the file's code
        raise WeightsError(
            f"{path}: refused to load: it holds Python objects other than tensors, which could run code "
            f"(xlearner reads .pth/.pt with weights_only=True). Save a plain state_dict "
            f"(torch.save(model.state_dict(), ...)) or a .safetensors file") from None
    except Exception as exc:
        raise WeightsError(f"{path}: cannot read it as a torch.save file ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); is it damaged or of another "
                           f"format? Accepted: {', '.join(WEIGHTS_SUFFIXES)}") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in ("module.", "backbone."):
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def load_initial_weights(backbone: nn.Module, path: str | Path, partial: bool = False) -> dict[str, list[str]]:
    """Load a weights file into the backbone, printing the matched, missing and unexpected keys.

    Keys of the file absent from the backbone (a classifier, the unused tail) are ignored. An error
    names the file when no key matches, when a shape differs, when a loaded tensor holds NaN or inf,
    or when a backbone key is missing from the file, unless ``partial`` (config
    ``backbone.weights_partial``): a wrong file must not silently leave a random backbone.
    """
    state = {_strip(k): v for k, v in read_weights_file(path).items()}
    own = backbone.state_dict()
    arch = getattr(getattr(backbone, "cfg", None), "name", type(backbone).__name__)
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise WeightsError(f"weights {path}: shape mismatch for {len(mismatched)} keys of backbone {arch}, first: "
                           + "; ".join(mismatched[:3]) + "; the file is for another architecture or other kwargs")
    matched = [k for k in state if k in own]
    # old checkpoints lack BatchNorm's num_batches_tracked: it only counts steps, never missing
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if not matched:
        raise WeightsError(
            f"weights {path}: none of its {len(state)} tensors matches a key of backbone {arch} "
            f"(file has e.g. {list(state)[:3]}; expected e.g. {list(own)[:3]}); give weights of this "
            f"architecture (`xlearner export` writes them) or set backbone.name to the file's architecture")
    if missing and not partial:
        raise WeightsError(
            f"weights {path}: {len(missing)} of the {len(own)} keys of backbone {arch} are missing from the file "
            f"(e.g. {missing[:3]}; {len(matched)} matched); give a file for the whole backbone, or set "
            f"backbone.weights_partial=true to keep random weights for the missing keys")
    check_finite({k: state[k] for k in matched}, path, "weights")  # NaN weights would train NaN silently
    backbone.load_state_dict({k: state[k] for k in matched}, strict=False)
    report = {"matched": matched, "missing": missing, "unexpected": unexpected}
    print(f"backbone weights {path}: " + ", ".join(
        f"{len(v)} {k}" + (f" (e.g. {', '.join(v[:3])})" if v and k != "matched" else "") for k, v in report.items()))
    return report
