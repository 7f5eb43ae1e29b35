"""The fault and bad-input trials as fast tests (the kill -9 loop is benchmarks/faults.py).

Bad inputs (tests/fault_cases.py): each raises an error naming the file, the record and the fix
under ``on_bad_sample: error``; under ``skip`` it is skipped and counted, and no sample read from
the source is the bad record. Faults: stale temporary files, a full disk during a checkpoint,
refused or unfitting weights files, and the CLI's one-line messages with distinct exit codes.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch

import fault_cases as fc
from xlearner.cli import EXIT_CODES, build_parser, exit_code, main
from xlearner.config import RunConfig, SourceConfig
from xlearner.data.schema import BadSampleError
from xlearner.data.sources import open_source


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def read_all(ds) -> list:
    return [ds[i] for i in range(len(ds))]


# ------------------------------------------------------------------------------ bad records

@pytest.mark.parametrize("make", fc.DATA_CASES, ids=lambda f: f.__name__)
def test_bad_input_case(make, tmp_path, capsys):
    case = make(tmp_path / "data")
    # on_bad_sample: error -> one error naming file, record and fix (when opening or when reading)
    if case.error is not None:
        with pytest.raises(BadSampleError) as e:
            read_all(open_source(SourceConfig(**case.source, on_bad_sample="error")))
        assert re.search(case.error, str(e.value), re.S), str(e.value)
    # on_bad_sample: skip -> skipped and counted; nothing read is the bad record
    if case.skipped is None:
        with pytest.raises(BadSampleError, match=case.error):
            read_all(open_source(SourceConfig(**case.source, on_bad_sample="skip")))
    else:
        ds = open_source(SourceConfig(**case.source, on_bad_sample="skip"))
        samples = read_all(ds)
        assert ds.bad.count == case.skipped, ds.bad.skipped
        for image, target in samples:
            assert not bool((image == fc.BAD).all()), "a bad record was read"
            if "mask" in target:
                assert target["mask"].shape == image.shape[-2:] and int(target["mask"].max()) < ds.num_classes
            if case.check is not None:
                case.check(image, target)
    # data check lists it (and only it) with the same message
    from xlearner.data.check import check_source

    lines: list[str] = []
    n = check_source(SourceConfig(**case.source), echo=lines.append)
    assert n == (case.skipped if case.skipped is not None else 1), lines
    if case.error is not None:
        assert re.search(case.error, "\n".join(lines), re.S), lines


def test_data_check_cli_exit_codes(tmp_path):
    bad = fc.write_source_yaml(fc.truncated_jpeg(tmp_path / "bad"), tmp_path / "bad.yaml")
    code, out, _ = cli("data", "check", bad)
    assert code == 3 and "cut.jpg: cannot decode" in out and "1 problem" in out
    good = fc.write_source_yaml(fc.image_modes(tmp_path / "good"), tmp_path / "good.yaml")
    assert cli("data", "check", good)[0] == 0
    (tmp_path / "broken.yaml").write_text("name: [x\n")
    code, out, err = cli("data", "check", tmp_path / "broken.yaml")
    assert code == 2 and err.startswith("xlearner: source file") and "is not valid YAML" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------ training on bad data

def test_train_counts_worker_skips_and_validates_one_image(tmp_path):
    """Decode failures met in 2 loader workers reach the console and run.json; a COCO source without
    width/height whose box lies outside its image is skipped; a one-image val split validates."""
    from xlearner.stages import train_stage

    cls = fc.text_named_png(tmp_path / "cls").source
    det = fc._coco(tmp_path / "det", {5: [10, 10, 20, 4]}, sizes=False, n=8)
    det["val_fraction"] = 0.1  # 8 + 1 bad records -> a one-image val split
    data = fc.run_config(cls, "skip", steps=3, **{"train.num_workers": 2})
    data["sources"] = [{**cls, "name": "shapes_cls", "on_bad_sample": "skip", "batch_size": 4},
                       {**det, "name": "boxes", "on_bad_sample": "skip", "batch_size": 4}]
    from xlearner.data.readers import holdout_indices

    assert 5 not in holdout_indices(8, SourceConfig(**det)), "the bad image must be in the train split"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        info = train_stage(RunConfig.model_validate(data), "msmt", tmp_path / "run")
    out = buf.getvalue()
    assert "bad records skipped in training: shapes_cls 1, boxes 1" in out, out
    assert info["bad_records"] == {"shapes_cls": 1, "boxes": 1}
    assert "boxes" in info["metrics"]  # validation ran on the one-image split


def test_train_error_policy_names_record_and_cli_exit_3(tmp_path):
    case = fc.box_outside_unsized(tmp_path / "det")
    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(fc.run_config(case.source, "error", **{"train.num_workers": 1})))
    code, _, err = cli("train", cfg, "--stage", "msmt", "--out", tmp_path / "run")
    assert code == 3, err
    assert re.search(case.error, err, re.S) and "on_bad_sample: skip" in err
    assert err.count("xlearner:") == 1 and "Traceback" not in err and "worker" not in err, err
    assert "Traceback" in (tmp_path / "run" / "error.log").read_text()
    assert "(traceback in" in err


@pytest.mark.parametrize("i", range(4))
def test_config_mistakes_exit_2(i, tmp_path):
    name, path, pattern = fc.config_cases(tmp_path)[i]
    for argv in (("train", path, "--stage", "ssst", "--out", tmp_path / "r"),):
        code, _, err = cli(*argv)
        assert code == 2 and err.startswith("xlearner: ") and re.search(pattern, err, re.S), (name, err)
        assert "Traceback" not in err


# ------------------------------------------------------------------------------ weights files

def _tiny_cfg(tmp_path: Path, **backbone) -> Path:
    import yaml

    src = fc._cls(fc._cls_folder(tmp_path / "data"))
    data = fc.run_config(src)
    data["backbone"].update({k: str(v) for k, v in backbone.items()})
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_malicious_pickle_refused_everywhere(tmp_path):
    evil = fc.malicious_pickle(tmp_path / "evil.pth")
    code, _, err = cli("train", _tiny_cfg(tmp_path, weights=evil), "--stage", "ssst", "--out", tmp_path / "r")
    assert code == 4 and "evil.pth: refused to load" in err and "weights_only=False" not in err, err
    src = fc.write_source_yaml(fc.image_modes(tmp_path / "ds"), tmp_path / "src.yaml")
    code, _, err = cli("transfer", "--backbone", evil, "--source", src, "--config", tmp_path / "cfg.yaml",
                       "--out", tmp_path / "t.json")
    assert code == 4 and "refused to load" in err and "weights_only=False" not in err, err
    assert not evil.with_suffix(".pwned").exists()


def test_weights_matching_no_key_or_missing_keys(tmp_path):
    none = fc.unmatched_weights(tmp_path / "other.safetensors")
    code, _, err = cli("train", _tiny_cfg(tmp_path, weights=none), "--stage", "ssst", "--out", tmp_path / "r")
    assert code == 4 and "other.safetensors: none of its 3 tensors matches a key of backbone resnet18" in err, err
    src = fc.write_source_yaml(fc.image_modes(tmp_path / "ds"), tmp_path / "src.yaml")
    code, _, err = cli("transfer", "--backbone", none, "--source", src, "--config", tmp_path / "cfg.yaml",
                       "--out", tmp_path / "t.json")
    assert code == 4 and "none of its 3 tensors matches" in err, err
    assert not (tmp_path / "t.json").exists()


def test_transfer_accepts_pth_and_names_accepted_files(tmp_path):
    from xlearner.config import load_config
    from xlearner.models.backbone import Backbone
    from xlearner.transfer.suite import load_any_backbone

    cfg = load_config(_tiny_cfg(tmp_path))
    torch.manual_seed(3)
    ref = Backbone(cfg.backbone)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    _, bb = load_any_backbone(tmp_path / "w.pth", cfg)
    assert all(torch.equal(bb.state_dict()[k], v) for k, v in ref.state_dict().items())
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"w\.ckpt: expected a run folder or a weights file \(\.safetensors, \.pth"):
        load_any_backbone(tmp_path / "w.ckpt", cfg)


# ------------------------------------------------------------------------------ checkpoints and the CLI

def _fit(out: Path, steps: int, resume: bool = False, **kw):
    from test_engine import FakeLoader, Toy, cfg

    from xlearner.engine import fit

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = fit(Toy(), FakeLoader(), cfg(steps=steps, ckpt_every=1, **kw), out, resume=resume)
    return res, buf.getvalue()


def test_resume_removes_stale_temp_files(tmp_path):
    from xlearner.engine import load_checkpoint
    from xlearner.engine.checkpoint import checkpoint_path

    _fit(tmp_path, 3)
    stale = [tmp_path / "checkpoints" / ".last.pt.k2j4.tmp", tmp_path / ".model.safetensors.tmp4242",
             tmp_path / ".run.json.tmp4242"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    keep = tmp_path / "notes.tmp"
    keep.write_text("a user's file")
    _, printed = _fit(tmp_path, 5, resume=True)
    assert not any(p.exists() for p in stale) and keep.exists()
    assert "removed 3 temporary file(s)" in printed and "resumed from" in printed
    assert load_checkpoint(checkpoint_path(tmp_path))["step"] == 5


def test_full_disk_during_checkpoint_keeps_previous(tmp_path, monkeypatch, full_disk):
    from xlearner import files
    from xlearner.engine import checkpoint as ck

    _fit(tmp_path, 2)
    full_disk()  # from here on write_atomic writes to /dev/full
    with pytest.raises(ck.CheckpointWriteError) as e:
        _fit(tmp_path, 4, resume=True)
    path = ck.checkpoint_path(tmp_path)
    assert str(e.value).startswith(f"cannot write checkpoint {path} (No space left on device); "
                                   f"the previous checkpoint {path} is intact"), str(e.value)
    assert exit_code(e.value) == 6
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["step"] == 2 and os.listdir(path.parent) == ["last.pt"]
    res, _ = _fit(tmp_path, 4, resume=True)
    assert res.steps == 4


def test_damaged_or_unsafe_checkpoint_is_named(tmp_path):
    from xlearner.engine.checkpoint import CheckpointReadError, checkpoint_path

    _fit(tmp_path, 2)
    path = checkpoint_path(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointReadError, match=r"last\.pt: cannot read the checkpoint.*delete it"):
        _fit(tmp_path, 3, resume=True)
    fc.malicious_pickle(path)
    with pytest.raises(CheckpointReadError, match=r"last\.pt: refused to load") as e:
        _fit(tmp_path, 3, resume=True)
    assert "weights_only=False" not in str(e.value) and exit_code(e.value) == 4


def test_cli_error_classes_messages_and_debug(monkeypatch, capsys):
    from xlearner.data.embedded import EmbeddedDataError
    from xlearner.engine import NonFiniteLossError
    from xlearner.engine.checkpoint import CheckpointWriteError

    import xlearner.cli as cli_mod

    errors = {BadSampleError("x.png: cannot decode image; re-export it"): 3,
              NonFiniteLossError("non-finite loss at step 7: 'src'=nan", 7, ["src"]): 5,
              CheckpointWriteError("cannot write checkpoint c/last.pt (No space left on device)"): 6,
              EmbeddedDataError("fetch failed"): 7, FileNotFoundError("x"): 6, KeyError("a bug"): 1}
    for exc, code in errors.items():
        def boom(args, exc=exc):
            raise exc
        monkeypatch.setattr(cli_mod, "_dispatch", boom)
        assert main(["report", "somewhere"]) == code
        err = capsys.readouterr().err
        assert err.startswith("xlearner: ") and "Traceback" not in err, err
        assert main(["report", "somewhere", "--debug"]) == code
        assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert "internal error: KeyError" in (cli_mod.report_error(KeyError("a bug")) and capsys.readouterr().err)
    codes = [c for c, _, _ in EXIT_CODES]
    assert len(set(codes)) == len(codes)
    helptext = build_parser().format_help()
    for code, _, text in EXIT_CODES:
        assert f"{code:>3}  {text}" in helptext
