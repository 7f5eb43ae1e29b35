"""Export under timm/torchvision key names, rebuild from file, initial-weights loading."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from xlearner.tasks import HeadOptions
from xlearner.config import BackboneConfig, ConfigError
from xlearner.models import Backbone, ExpandedNet, SharedNet, SourceSpec, TaskHeads
from xlearner.models.backbone import load_initial_weights
from xlearner.models.export import export_backbone_state, load_backbone, save_backbone
from xlearner.runs import export_command

KW = {"channels": [8, 16, 32, 64], "stem_width": 8}
CFG = BackboneConfig(name="resnet18", kwargs=KW)


def _x():
    torch.manual_seed(0)
    return torch.randn(2, 3, 64, 64)


def _trained_like(module):
    """Non-default weights and BN statistics, so a wrong mapping cannot pass by accident."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return module


def test_timm_export_loads_strict_and_matches(tmp_path):
    import timm

    net = SharedNet(_trained_like(Backbone(CFG)), TaskHeads([SourceSpec("a", "cls", 3)], [8, 16, 32, 64], [4, 8, 16, 32], 32))
    net.eval()
    tensors = export_backbone_state(net.state_dict(), "backbone.", "timm", "resnet18", KW)
    ref = timm.create_model("resnet18", num_classes=0, **KW).eval()
    ref.load_state_dict(tensors, strict=True)
    x = _x()
    assert torch.allclose(ref.forward_features(x), net.backbone(x)[-1], atol=1e-5)

    path = save_backbone(tmp_path / "bb.safetensors", tensors, CFG)
    cfg, rebuilt = load_backbone(path)
    assert cfg.name == "resnet18" and cfg.kwargs == KW and tuple(cfg.out_indices) == (1, 2, 3, 4)
    for a, b in zip(rebuilt.eval()(x), net.backbone(x)):
        assert torch.allclose(a, b, atol=1e-6)


def test_tv_export_loads_strict_into_torchvision():
    import torchvision

    bb = _trained_like(Backbone(BackboneConfig(name="tv:resnet18"))).eval()
    tensors = export_backbone_state({f"backbone.{k}": v for k, v in bb.state_dict().items()}, "backbone.",
                                    "torchvision", "tv:resnet18")
    ref = torchvision.models.resnet18()
    ref.fc = nn.Identity()
    ref.load_state_dict(tensors, strict=True)
    x = _x()
    assert torch.allclose(ref.eval()(x), bb(x)[-1].mean(dim=(2, 3)), atol=1e-5)


def test_torchvision_format_refuses_non_standard_arch():
    bb = Backbone(CFG)
    with pytest.raises(ValueError, match="torchvision"):
        export_backbone_state(bb.state_dict(), "", "torchvision", "resnet18", KW)
    with pytest.raises(ValueError, match="torchvision ResNets"):
        export_backbone_state(bb.state_dict(), "", "torchvision", "efficientnet_b0")


def test_export_command_expansion_branch(tmp_path, capsys):
    from safetensors.torch import save_file

    srcs = [SourceSpec("a", "cls", 3), SourceSpec("s", "seg", 2)]
    net = ExpandedNet(CFG, ["cls", "seg"], TaskHeads(srcs, [8, 16, 32, 64], [4, 8, 16, 32], HeadOptions(fpn_channels=32)))
    _trained_like(net.backbones["seg"])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "run.json").write_text(json.dumps({"stage": "expansion", "config": {"backbone": CFG.model_dump(mode="json")}}))
    out = tmp_path / "seg.safetensors"
    assert export_command(SimpleNamespace(run_dir=str(tmp_path), format="timm", branch="seg", out=str(out))) == 0
    assert "wrote" in capsys.readouterr().out
    _, rebuilt = load_backbone(out)
    x = _x()
    net.eval()
    assert torch.allclose(rebuilt.eval()(x)[-1], net.backbones["seg"](x)[-1], atol=1e-6)
    with pytest.raises(ConfigError, match="branch"):
        export_command(SimpleNamespace(run_dir=str(tmp_path), format="timm", branch="det", out=str(out)))


def test_read_run_names_the_missing_or_damaged_file(tmp_path):
    import re

    from xlearner.cli import main
    from xlearner.runs import read_run

    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'run.json'} does not exist") + ".*xlearner train"):
        read_run(tmp_path)
    (tmp_path / "run.json").write_text("{")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'model.safetensors'} does not exist")):
        read_run(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'run.json'} is not valid JSON") + ".*train the stage"):
        read_run(tmp_path)
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "bb.safetensors")]) == 2  # a usage error


def test_initial_weights_pth_report(tmp_path, capsys):
    src = _trained_like(Backbone(CFG))
    state = {f"module.backbone.{k}": v for k, v in src.state_dict().items() if not k.startswith("layer4.")}
    state["fc.weight"] = torch.zeros(3, 64)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"w\.pth: \d+ of the \d+ keys of backbone resnet18 are missing.*layer4\."
                                         r".*weights_partial=true"):
        Backbone(CFG.model_copy(update={"weights": tmp_path / "w.pth"}))
    bb = Backbone(CFG.model_copy(update={"weights": tmp_path / "w.pth", "weights_partial": True}))
    out = capsys.readouterr().out
    assert "unexpected" in out and "fc.weight" in out and "layer4." in out
    assert torch.equal(bb.conv1.weight, src.conv1.weight)
    report = load_initial_weights(Backbone(CFG), tmp_path / "w.pth", partial=True)
    assert report["unexpected"] == ["fc.weight"] and all(k.startswith("layer4.") for k in report["missing"])

    bad = {"conv1.weight": torch.zeros(4, 3, 3, 3)}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="conv1.weight"):
        load_initial_weights(Backbone(CFG), tmp_path / "bad.pt")


def test_initial_weights_refuse_pickled_code(tmp_path):
    torch.save({"x": SimpleNamespace(a=1)}, tmp_path / "evil.pth")
    with pytest.raises(Exception):
        load_initial_weights(Backbone(CFG), tmp_path / "evil.pth")


def test_initial_weights_safetensors(tmp_path):
    from safetensors.torch import save_file

    src = _trained_like(Backbone(CFG))
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    bb = Backbone(CFG.model_copy(update={"weights": tmp_path / "w.safetensors"}))
    for k, v in src.state_dict().items():
        assert torch.equal(bb.state_dict()[k], v)


def test_initial_weights_with_nan_are_refused_naming_the_tensor(tmp_path):
    """backbone.weights with a NaN in a tensor the backbone uses: an error naming the file and the tensor, not a
    run that trains NaN; a NaN in a tensor the backbone ignores (a classifier) does not matter."""
    src = _trained_like(Backbone(CFG))
    state = dict(src.state_dict())
    state["fc.weight"] = torch.full((3, 64), float("nan"))  # not the backbone's: ignored
    torch.save(state, tmp_path / "ok.pth")
    assert torch.equal(Backbone(CFG.model_copy(update={"weights": tmp_path / "ok.pth"})).conv1.weight,
                       src.conv1.weight)
    state["layer2.0.conv1.weight"] = state["layer2.0.conv1.weight"].clone()
    state["layer2.0.conv1.weight"].view(-1)[:2] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=r"nan\.pth: tensor 'layer2\.0\.conv1\.weight' holds 2 NaN and 0 inf"):
        Backbone(CFG.model_copy(update={"weights": tmp_path / "nan.pth"}))


# ------------------------------------------------------------------------------ damaged weights, full disk (D7)

def _run_folder(root, nan_in: str | None = None):
    """A msmt run folder of the tiny ResNet (model.safetensors + run.json); ``nan_in``: a key set to NaN."""
    from xlearner.config import RunConfig
    from xlearner.stages import save_product
    from xlearner.stages.baselines import build_shared_net

    cfg = RunConfig.model_validate({"backbone": CFG.model_dump(mode="json"),
                                    "sources": [{"name": "digits", "task": "cls", "dataset": "mnist"}]})
    net = build_shared_net(cfg, [SourceSpec("digits", "cls", 10)])
    if nan_in is not None:
        with torch.no_grad():
            net.state_dict()[nan_in].view(-1)[1] = float("nan")
    root.mkdir(parents=True, exist_ok=True)
    save_product(net, root / "model.safetensors")
    (root / "run.json").write_text(json.dumps({"stage": "msmt", "config": cfg.to_dict()}))
    return root


def _cli(*argv):
    import contextlib
    import io

    from xlearner.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def _transfer_args(tmp_path):
    import yaml

    import fault_cases as fc

    src = fc.write_source_yaml(fc.image_modes(tmp_path / "ds"), tmp_path / "src.yaml")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(fc.run_config(fc._cls(fc._cls_folder(tmp_path / "d")))))
    return ["--source", src, "--config", tmp_path / "cfg.yaml", "--out", tmp_path / "t.json"]


def test_a_truncated_model_file_is_named_with_exit_4(tmp_path):
    run = _run_folder(tmp_path / "run")
    good = tmp_path / "bb.safetensors"
    assert _cli("export", run, "--out", good)[0] == 0
    for path in (run / "model.safetensors", good):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short, as by a full disk
    code, err = _cli("export", run, "--out", tmp_path / "again.safetensors")
    assert code == 4 and f"{run / 'model.safetensors'} is damaged or not a .safetensors file" in err, err
    code, err = _cli("transfer", "--backbone", run, *_transfer_args(tmp_path))
    assert code == 4 and f"{run / 'model.safetensors'} is damaged or not a .safetensors file" in err, err
    code, err = _cli("transfer", "--backbone", good, *_transfer_args(tmp_path))  # transfer's own check of the header
    assert code == 4 and f"{good}: not a readable .safetensors file" in err, err
    assert not (tmp_path / "t.json").exists()


def test_nan_weights_are_named_with_the_first_tensor(tmp_path):
    run = _run_folder(tmp_path / "run", nan_in="backbone.conv1.weight")
    code, err = _cli("export", run, "--out", tmp_path / "bb.safetensors")
    assert code == 4 and f"{run / 'model.safetensors'}: tensor 'backbone.conv1.weight' holds 1 NaN and 0 inf" in err
    good = _run_folder(tmp_path / "good")
    assert _cli("export", good, "--out", tmp_path / "bb.safetensors")[0] == 0
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bb.safetensors"), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(tmp_path / "bb.safetensors"))
    state["layer1.0.bn1.running_var"][0] = float("inf")
    save_file(state, str(tmp_path / "bb.safetensors"), metadata=meta)
    code, err = _cli("transfer", "--backbone", tmp_path / "bb.safetensors", *_transfer_args(tmp_path))
    assert code == 4 and "tensor 'layer1.0.bn1.running_var' holds 0 NaN and 1 inf" in err, err


def test_a_full_disk_while_writing_a_model_is_exit_6_naming_the_file(tmp_path, monkeypatch, full_disk):
    import errno
    import os
    import tempfile

    from xlearner import files
    from xlearner.errors import exit_code

    run = _run_folder(tmp_path / "run")
    before = (run / "model.safetensors").read_bytes()
    full_disk()  # from here on write_atomic writes to /dev/full
    with pytest.raises(OSError) as e:
        _run_folder(run)  # save_product over the finished model
    assert e.value.errno == errno.ENOSPC and exit_code(e.value) == 6
    assert str(e.value).startswith(f"cannot write {run / 'model.safetensors'} (No space left on device); "
                                   f"the previous model.safetensors is intact. Free disk space")
    code, err = _cli("export", run, "--out", tmp_path / "bb.safetensors")
    assert code == 6 and f"cannot write {tmp_path / 'bb.safetensors'} (No space left on device)" in err, err
    monkeypatch.undo()
    assert (run / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(run)) == ["model.safetensors", "run.json"]  # no temporary file left
