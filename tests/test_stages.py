"""Stages end to end on a tiny, fixed data set written by the test (ImageFolder, COCO, mask folder).

Every stage trains with the real engine and its loss falls; the squeeze product is one
backbone (plus necks/heads); run.json + model.safetensors are written and readable.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xlearner.config import RunConfig, apply_overrides

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 60, 220)}
SIZE = 32


def _noise_bg(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 60, size=(SIZE, SIZE, 3), dtype=np.uint8)


def _write_cls(root: Path, classes: list[str], per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            img = _noise_bg(rng)
            x0, y0 = rng.integers(0, 12, size=2)
            img[y0:y0 + 20, x0:x0 + 20] = COLORS[c]
            Image.fromarray(img).save(root / c / f"{i}.png")


def _write_det(root: Path, n: int, name: str = "train", bad: bool = True, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    cats = [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]
    for i in range(n):
        img = _noise_bg(rng)
        cid = 1 + i % 2
        s = int(rng.integers(10, 16))
        x0, y0 = (int(v) for v in rng.integers(0, SIZE - s, size=2))
        img[y0:y0 + s, x0:x0 + s] = COLORS["red" if cid == 1 else "blue"]
        Image.fromarray(img).save(root / "images" / f"{name}{i}.png")
        images.append({"id": i, "file_name": f"{name}{i}.png", "width": SIZE, "height": SIZE})
        anns.append({"id": i, "image_id": i, "category_id": cid, "bbox": [x0, y0, s, s], "iscrowd": 0, "area": s * s})
    if bad:  # one bad record: a box outside the image (skipped under on_bad_sample: skip)
        _add_bad(root, images, anns, n, rng)
    path = root / f"{name}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def _add_bad(root: Path, images: list, anns: list, n: int, rng) -> None:
    img = _noise_bg(rng)
    Image.fromarray(img).save(root / "images" / "bad.png")
    images.append({"id": n, "file_name": "bad.png", "width": SIZE, "height": SIZE})
    anns.append({"id": n, "image_id": n, "category_id": 1, "bbox": [20, 20, 40, 40], "iscrowd": 0, "area": 1600})


def _write_seg(root: Path, n: int) -> None:
    rng = np.random.default_rng(2)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        img = _noise_bg(rng)
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        k = 1 + i % 2
        x0, y0 = (int(v) for v in rng.integers(0, 14, size=2))
        img[y0:y0 + 18, x0:x0 + 18] = COLORS["red" if k == 1 else "green"]
        mask[y0:y0 + 18, x0:x0 + 18] = k
        mask[y0:y0 + 18, x0] = 255  # an ignored edge
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{i}.png")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions: one intra-op thread is several times faster on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stage_data")
    _write_cls(root / "colors", ["red", "green", "blue"], 12, seed=0)
    _write_cls(root / "few", ["red", "blue"], 6, seed=3)
    _write_det(root / "det", 16)
    _write_det(root / "det", 6, name="val", bad=False, seed=5)
    _write_seg(root / "seg", 16)
    return root


STEPS = 20
BATCH = {"colors": 6, "few": 4, "shapes": 4, "regions": 4}


def tiny_config(root: Path, steps: int = STEPS, few: bool = False, **extra) -> RunConfig:
    data = {
        "name": "tiny",
        "seed": 0,
        "image_size": SIZE,
        "fpn_channels": 32,
        "backbone": {"name": "resnet18", "kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}},
        "augment": {"cls": {"random_resized_crop": None}, "det": {"hflip": False},
                    "seg": {"random_resized_crop": None, "hflip": False}},
        "sources": [
            {"name": "colors", "task": "cls", "format": "imagefolder", "root": str(root / "colors"),
             "batch_size": BATCH["colors"], "val_fraction": 0.2},
            {"name": "few", "task": "cls", "format": "imagefolder", "root": str(root / "few"),
             "batch_size": BATCH["few"], "val_fraction": 0.2},
            {"name": "shapes", "task": "det", "format": "coco", "root": str(root / "det" / "images"),
             "annotations": str(root / "det" / "train.json"), "val_root": str(root / "det" / "images"),
             "val_annotations": str(root / "det" / "val.json"), "batch_size": BATCH["shapes"],
             "on_bad_sample": "skip"},
            {"name": "regions", "task": "seg", "format": "maskfolder", "root": str(root / "seg" / "images"),
             "masks": str(root / "seg" / "masks"), "class_names": ["background", "red", "green"],
             "batch_size": BATCH["regions"], "val_fraction": 0.2},
        ],
        "train": {"steps": steps, "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "ckpt_every": 1000,
                  "val_batches": 1, "progress": False, "weight_decay": 0.0},
    }
    if not few:  # "few" only serves the SSST choice: it costs a forward pass per step elsewhere
        data["sources"] = [s for s in data["sources"] if s["name"] != "few"]
    apply_overrides(data, [f"{key}={json.dumps(value)}" for key, value in extra.items()])  # JSON is YAML
    return RunConfig.model_validate(data)


def _totals(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r["total"] for r in rows if "total" in r]


def _assert_loss_falls(run_dir: Path) -> None:
    totals = _totals(run_dir)
    assert len(totals) >= 6, totals
    first, last = np.mean(totals[:3]), np.mean(totals[-3:])
    assert last < first, f"loss did not fall in {run_dir.name}: first {first:.4f}, last {last:.4f}; {totals}"


def _run(cfg: RunConfig, stage: str, out: Path) -> tuple[dict, str]:
    from xlearner.stages import train_stage

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        info = train_stage(cfg, stage, out)
    return info, buf.getvalue()


@pytest.fixture(scope="module")
def expansion_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "expansion"
    info, printed = _run(tiny_config(data_root), "expansion", out)
    return out, info, printed


def _check_outputs(out: Path, info: dict, stage: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    on_disk = json.loads((out / "run.json").read_text())
    assert on_disk == json.loads(json.dumps(info))
    assert on_disk["stage"] == stage and on_disk["status"] == "done"
    assert set(on_disk["cost"]) >= {"images_seen", "gflops", "backbone_params", "steps"}
    assert on_disk["digest"] == RunConfig.model_validate(on_disk["config"]).digest()
    # the stage's time split: validation (with precise BN) inside the fit, training throughput
    assert 0 < on_disk["fit_eval_s"] < on_disk["fit_wall_s"] <= on_disk["wall_s"]
    assert on_disk["train_images_per_s"] > 0
    # the time inside training steps, of the fit's wall time
    assert on_disk["fit_s"] == on_disk["fit_wall_s"]
    assert 0 < on_disk["step_s"] < on_disk["fit_s"] and 0 < on_disk["time_in_steps"] < 1
    # step_s and fit_s are stored to the millisecond, the ratio to 1e-3: the bound of their rounding
    step, fit = on_disk["step_s"], on_disk["fit_s"]
    assert on_disk["time_in_steps"] == pytest.approx(step / fit, abs=0.0005 / fit * (1 + step / fit) + 0.0006)
    for s in on_disk["sources"]:
        assert set(s) == {"name", "task", "num_classes", "class_names"}
        assert len(s["class_names"]) == s["num_classes"]
    return load_file(str(out / "model.safetensors"))


def test_expansion_trains_and_writes_outputs(expansion_run):
    out, info, printed = expansion_run
    _assert_loss_falls(out)
    state = _check_outputs(out, info, "expansion")
    assert info["tasks"] == ["cls", "det", "seg"]
    assert {k.split(".")[1] for k in state if k.startswith("backbones.")} == {"cls", "det", "seg"}
    assert any(k.startswith("reconcilers.") for k in state)
    assert info["cost"]["steps"] == STEPS
    assert info["cost"]["images_seen"] == STEPS * (BATCH["colors"] + BATCH["shapes"] + BATCH["regions"])
    assert info["cost"]["gflops"] > 0
    # user-format det/seg sources are scored as published: COCO's other numbers, per-class IoU;
    # and each source again with precise BN (BatchNorm statistics re-estimated on its train images)
    names = {"colors", "shapes", "regions"}
    assert set(info["metrics"]) == names | {f"{n}/precise_bn" for n in names} | {
        "shapes/AP50", "shapes/AP75", "shapes/APs", "shapes/APm", "shapes/APl", "shapes/AP40", "shapes/recall40",
        "regions/per_class_iou"}
    assert all(0.0 <= info["metrics"][k] <= 1.0 for k in names | {f"{n}/precise_bn" for n in names})
    # the bad record of the det source is counted and printed before training
    assert "source shapes: 1 bad records skipped (on_bad_sample: skip)" in printed
    assert "source colors: 0 bad records skipped" in printed
    assert info["bad_records"] == {"colors": 0, "shapes": 1, "regions": 0}


def test_expansion_flops_count_branches_run(expansion_run, data_root):
    """A det batch runs every branch up to the last reconciliation: more than one backbone's FLOPs."""
    _, info, _ = expansion_run
    per_img = info["cost"]["gflops_per_image"]
    from xlearner.models.backbone import Backbone
    from xlearner.stages.common import backbone_flops_per_image

    bb = Backbone(tiny_config(data_root).backbone).eval()
    one = backbone_flops_per_image(bb, SIZE) / 1e9
    assert per_img["colors"] > 1.5 * one


@pytest.fixture(scope="module")
def squeeze_run(expansion_run, data_root):
    exp_dir, _, _ = expansion_run
    out = exp_dir.parent / "squeeze"
    cfg = tiny_config(data_root, **{"squeeze.teacher": str(exp_dir)})
    info, printed = _run(cfg, "squeeze", out)
    return out, info, printed


def test_squeeze_trains_one_backbone(squeeze_run, expansion_run, data_root):
    from xlearner.models.backbone import Backbone
    from xlearner.models.nets import count_parameters

    out, info, _ = squeeze_run
    exp_dir, exp_info, _ = expansion_run
    _assert_loss_falls(out)
    state = _check_outputs(out, info, "squeeze")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    names = {k for r in rows for k in r}
    assert {"distill/cls", "distill/det", "distill/seg", "colors", "shapes", "regions"} <= names
    # the product is the student alone: one backbone + necks/heads, no teacher, no adapters
    assert all(k.startswith(("backbone.", "task_heads.")) for k in state), sorted(state)[:5]
    bb = Backbone(tiny_config(data_root).backbone)
    bb_params = count_parameters(bb)
    assert info["cost"]["backbone_params"] == bb_params
    student_bb = sum(v.numel() for k, v in state.items() if k.startswith("backbone.") and v.is_floating_point()
                     and "running_" not in k)
    assert student_bb == bb_params
    # and its backbone is exactly one expansion branch's (same keys, same shapes)
    from safetensors.torch import load_file

    exp_state = load_file(str(exp_dir / "model.safetensors"))
    branch = {k[len("backbones.cls."):]: v.shape for k, v in exp_state.items() if k.startswith("backbones.cls.")}
    student = {k[len("backbone."):]: v.shape for k, v in state.items() if k.startswith("backbone.")}
    assert branch == student
    heads_exp = {k: v.shape for k, v in exp_state.items() if k.startswith("task_heads.")}
    heads_sq = {k: v.shape for k, v in state.items() if k.startswith("task_heads.")}
    assert heads_exp == heads_sq
    assert exp_info["cost"]["backbone_params"] > 3 * bb_params  # three branches + reconciliation
    assert "teacher" in info


def test_squeeze_stage_module(expansion_run, data_root):
    """copy:<task> init, frozen teacher kept out of the module tree, KD losses for cls sources."""
    from xlearner.stages.common import build_datasets, source_specs
    from xlearner.runs import load_teacher
    from xlearner.stages.squeeze import SqueezeStage

    exp_dir, _, _ = expansion_run
    cfg = tiny_config(data_root, **{"squeeze.kd_weight": 1.0, "squeeze.init": "copy:det",
                                    "squeeze.distill_stages": [3, 4]})
    teacher, _, specs = load_teacher(exp_dir)
    stage = SqueezeStage(cfg, specs, teacher)
    for k, v in teacher.backbones["det"].state_dict().items():
        assert torch.equal(stage.net.backbone.state_dict()[k], v)
    assert not any(k.startswith("teacher") for k in stage.state_dict())
    assert all(not p.requires_grad for p in teacher.parameters())
    stage.train()
    assert not teacher.training
    batch = {
        "colors": {"images": torch.randn(2, 3, SIZE, SIZE), "labels": torch.tensor([0, 2])},
        "shapes": {"images": torch.randn(2, 3, SIZE, SIZE),
                   "targets": [{"boxes": torch.tensor([[2.0, 2.0, 14.0, 14.0]]), "labels": torch.tensor([1])}] * 2},
        "regions": {"images": torch.randn(2, 3, SIZE, SIZE), "masks": torch.randint(0, 3, (2, SIZE, SIZE))},
    }
    stored = {k: v.clone() for k, v in teacher.state_dict().items() if "running" in k}
    losses = stage(batch)
    # the teacher normalises with batch statistics, as in expansion training, and never changes the stored ones
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in stored.items())
    x = batch["colors"]["images"]
    with torch.no_grad():
        in_eval = [f.clone() for f in teacher.branch_features(x, "cls")]
        for m in teacher.modules():
            m.train()
        in_train = teacher.branch_features(x, "cls")
        teacher.eval()
        from xlearner.stages.squeeze import use_batch_statistics
        use_batch_statistics(teacher)
    assert [float((a - b).abs().max()) for a, b in zip(in_eval, in_train)] == [0.0] * len(in_eval)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in stored.items())
    assert set(losses) == {"colors", "shapes", "regions", "kd/colors",
                           "distill/cls", "distill/det", "distill/seg"}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert stage.adapters["cls"][0].weight.grad is not None
    # no distillation: no adapters (an unused parameter would stall DDP), no teacher forward needed
    cfg0 = tiny_config(data_root, **{"squeeze.distill_weight": 0.0, "squeeze.init": "scratch"})
    stage0 = SqueezeStage(cfg0, specs, teacher)
    assert len(stage0.adapters) == 0
    assert set(stage0(batch)) == {"colors", "shapes", "regions"}


@pytest.mark.parametrize("stage,sources", [
    ("ssst", ["colors"]),                      # the cls source with the most training images
    ("msst", ["shapes"]),                      # baselines.msst_task=det
    ("msmt", ["colors", "shapes", "regions"]),
])
def test_baselines_train(stage, sources, data_root, tmp_path):
    # a baseline trains for baselines.steps, not train.steps (X-Learner's per-stage steps)
    cfg = tiny_config(data_root, steps=3, few=stage == "ssst",
                      **{"baselines.msst_task": "det", "baselines.steps": STEPS})
    info, _ = _run(cfg, stage, tmp_path / stage)
    _assert_loss_falls(tmp_path / stage)
    state = _check_outputs(tmp_path / stage, info, stage)
    assert [s["name"] for s in info["sources"]] == sources
    assert all(k.startswith(("backbone.", "task_heads.")) for k in state)
    assert info["cost"]["images_seen"] == STEPS * sum(BATCH[s] for s in sources)


def test_det_steps_read_the_targets_their_loader_matched(data_root, tmp_path, monkeypatch):
    """train_stage gives its training loader the stage's target encoders: every det step's loss reads
    FCOS targets matched where the batch was built, none matches in the step (the equality of the
    two is tests/test_fcos_loss.py's)."""
    from xlearner.models import heads

    seen, real = [], heads.DetHead.losses

    def losses(self, features, image_size, targets):
        seen.append(int(targets["fcos_labels"].shape[1]) if isinstance(targets, dict) else 0)
        return real(self, features, image_size, targets)

    monkeypatch.setattr(heads.DetHead, "losses", losses)
    cfg = tiny_config(data_root, steps=3, **{"baselines.msst_task": "det", "baselines.steps": 3,
                                             "train.num_workers": 1})
    _run(cfg, "msst", tmp_path / "msst")
    anchors = sum((-(-cfg.size_of(cfg.source("shapes")) // s)) ** 2 for s in heads.det_levels([4, 8, 16, 32], SIZE)[1])
    assert seen == [anchors] * 3


def test_seg_steps_read_the_points_their_loader_drew(data_root, tmp_path, monkeypatch):
    """With seg_loss_points, every seg step's loss reads the pixels the training loader's workers drew
    (SegPointTargets), none draws in the step (their equality is tests/test_method_maths.py's)."""
    from xlearner import tasks

    seen, real, drawn = [], tasks.seg_loss_on_points, tasks.point_seg_loss

    def on_points(logits, batch, class_weight=None):
        seen.append(int(batch["seg_point_labels"].shape[-1]))
        return real(logits, batch, class_weight)

    def in_step(*args, **kwargs):
        raise AssertionError("a seg step drew its points itself")

    monkeypatch.setattr(tasks, "seg_loss_on_points", on_points)
    monkeypatch.setattr(tasks, "point_seg_loss", in_step)
    cfg = tiny_config(data_root, steps=3, **{"baselines.msst_task": "seg", "baselines.steps": 3,
                                             "train.num_workers": 1, "seg_loss_points": 64})
    _run(cfg, "msst", tmp_path / "msst")
    assert seen == [64] * 3


def test_stage_validation_builds_its_batches_once_per_process(data_root, tmp_path, monkeypatch):
    """A stage validates each source with its trained and with precise-BN statistics, and every stage
    of a job validates the same sources: their val and precise-BN batches are built once per process
    (a det source's scenes composed once), and the scores equal those from freshly built batches."""
    from collections import OrderedDict

    from xlearner.data import loader

    monkeypatch.setattr(loader, "_eval_cache", OrderedDict())
    built = []
    real = loader.eval_loader
    monkeypatch.setattr(loader, "eval_loader", lambda *a, **k: built.append(a[1]) or real(*a, **k))
    cfg = tiny_config(data_root, steps=2, **{"baselines.steps": 2})
    first, _ = _run(cfg, "msmt", tmp_path / "a")
    assert sorted(built) == ["cls", "cls", "det", "det", "seg", "seg"]  # val and precise-BN set per source
    assert {k.split("/")[0] for k in first["metrics"]} == {"colors", "shapes", "regions"}
    second, _ = _run(cfg, "msmt", tmp_path / "b")
    assert len(built) == 6 and second["metrics"] == first["metrics"]
    monkeypatch.setattr(loader, "_eval_cache", OrderedDict())
    cold, _ = _run(cfg, "msmt", tmp_path / "c")
    assert len(built) == 12 and cold["metrics"] == first["metrics"]


def test_scratch_and_cli(data_root, tmp_path):
    """`xlearner train CONFIG --stage scratch` saves the random-init net without training."""
    import yaml

    from xlearner.cli import main

    cfg = tiny_config(data_root)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["train", str(path), "--stage", "scratch", "--out", str(tmp_path / "scratch"), "train.steps=5",
                   "baselines.steps=7"])
    assert rc == 0
    info = json.loads((tmp_path / "scratch" / "run.json").read_text())
    assert info["stage"] == "scratch" and info["cost"]["steps"] == 0 and info["cost"]["images_seen"] == 0
    assert info["config"]["train"]["steps"] == 5
    assert (tmp_path / "scratch" / "model.safetensors").is_file()
    assert "source shapes: 1 bad records skipped" in buf.getvalue()


def _cli_train(*argv) -> tuple[int, str]:
    from xlearner.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main([str(a) for a in argv])
    return rc, buf.getvalue()


def test_cli_scratch_from_pretrained_config_is_random(embedded_home, data_root, tmp_path):
    """`xlearner train pretrained --stage scratch` saves a random net, as `xlearner run`'s scratch does
    (Scratch.configure drops backbone.weights): no tensor of it equals the ImageNet weights."""
    import yaml
    from safetensors.torch import load_file

    from xlearner.config import load_config
    from xlearner.data.pretrained import fetch_imagenet_weights

    imagenet = torch.load(str(fetch_imagenet_weights(embedded_home())), map_location="cpu", weights_only=True)
    data = load_config("pretrained").to_dict()
    data["sources"] = [tiny_config(data_root).to_dict()["sources"][0]]  # colors: 36 images of 32 px
    data["gates"]["upstream"] = {}
    path = tmp_path / "pretrained_tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    rc, printed = _cli_train("train", path, "--stage", "scratch", "--out", tmp_path / "scratch")
    assert rc == 0, printed
    state = {k[len("backbone."):]: v for k, v in load_file(str(tmp_path / "scratch" / "model.safetensors")).items()
             if k.startswith("backbone.")}
    shared = [k for k, v in state.items() if k in imagenet and v.is_floating_point()]
    assert len(shared) > 100  # the MobileNetV2 backbone under torchvision's names
    assert not [k for k in shared if torch.equal(state[k], imagenet[k])]
    info = json.loads((tmp_path / "scratch" / "run.json").read_text())
    assert info["config"]["backbone"]["weights"] is None  # the record says what was trained


def test_cli_msst_task_trains_that_task_with_the_baselines_steps(data_root, tmp_path):
    """`--stage msst --task det`: the det sources only, for baselines.steps, recorded as msst_task det (as
    `xlearner run`'s msst_det part); without --task, baselines.msst_task; --task is msst's alone."""
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(data_root).to_dict()))
    rc, printed = _cli_train("train", path, "--stage", "msst", "--task", "det", "--out", tmp_path / "det",
                             "train.steps=5", "baselines.steps=2")
    assert rc == 0, printed
    info = json.loads((tmp_path / "det" / "run.json").read_text())
    assert [s["name"] for s in info["sources"]] == ["shapes"] and info["tasks"] == ["det"]
    assert info["cost"]["steps"] == 2 and info["config"]["baselines"]["msst_task"] == "det"
    assert info["cost"]["images_seen"] == 2 * BATCH["shapes"]
    from xlearner.stages import STAGES

    cfg = tiny_config(data_root)
    assert STAGES["msst"].configure(STAGES["msst"].configure(cfg, "seg"), None).baselines.msst_task == "seg"
    rc, printed = _cli_train("train", path, "--stage", "msmt", "--task", "det", "--out", tmp_path / "msmt")
    assert rc == 2 and "--task is for the stages trained once per task (msst)" in printed


def test_export_reads_stage_outputs(expansion_run, squeeze_run, tmp_path):
    export = pytest.importorskip("xlearner.models.export")
    from safetensors.torch import load_file

    from xlearner.cli import main

    sq_dir, _, _ = squeeze_run
    exp_dir, _, _ = expansion_run
    assert main(["export", str(sq_dir), "--out", str(tmp_path / "sq.safetensors")]) == 0
    assert main(["export", str(exp_dir), "--branch", "det", "--out", str(tmp_path / "det.safetensors")]) == 0
    sq = load_file(str(tmp_path / "sq.safetensors"))
    det = load_file(str(tmp_path / "det.safetensors"))
    assert sq.keys() == det.keys() and len(sq) > 0
    assert export is not None


def test_squeeze_resumes_without_teacher_in_checkpoint(squeeze_run, expansion_run, data_root, tmp_path):
    """The checkpoint holds the student and adapters only; a resumed squeeze run continues from it."""
    import shutil

    sq_dir, _, _ = squeeze_run
    exp_dir, _, _ = expansion_run
    ckpt = torch.load(sq_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["model"] and not any(k.startswith("teacher") for k in ckpt["model"])
    out = tmp_path / "squeeze"
    shutil.copytree(sq_dir, out)
    from xlearner.stages import train_stage

    cfg = tiny_config(data_root, steps=STEPS + 3, **{"squeeze.teacher": str(exp_dir)})
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        info = train_stage(cfg, "squeeze", out, resume=True)
    assert info["cost"]["steps"] == STEPS + 3
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows if "total" in r][-3:] == [STEPS + 1, STEPS + 2, STEPS + 3]


def test_seg_loss_is_the_mean_over_kept_pixels_and_zero_when_all_are_ignored():
    from xlearner.tasks import seg_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    masks = torch.randint(0, 4, (2, 16, 16))
    masks[0, :5] = 255
    up = torch.nn.functional.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(seg_loss(logits, masks), torch.nn.functional.cross_entropy(up, masks, ignore_index=255))
    none = seg_loss(logits, torch.full((2, 16, 16), 255))
    none.backward()  # the graph is kept: a step whose pixels are all ignored still runs
    assert none.item() == 0 and logits.grad is not None and logits.grad.abs().sum() == 0
