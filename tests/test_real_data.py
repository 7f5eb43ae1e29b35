"""The paper's real setting, in miniature: ImageNet/COCO/ADE20K-shaped data as users hold them.

The test writes a JPEG ImageFolder with images of varying sizes, a COCO JSON of non-square
images with ``iscrowd`` annotations and non-contiguous category ids, and ADE-style masks
(0 = other, 1..150 = classes); the shipped template, pointed there and made small, must
validate, pass ``data check``, train expansion, validate and transfer. Scoring is checked
against the original annotation file: a perfect detector gets 1.0, crowds included.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xlearner.config import ConfigError, SourceConfig, load_config, preset_path
from xlearner.data.loader import eval_loader
from xlearner.data.readers import CocoSource, MaskFolderSource
from xlearner.data.transforms import boxes_to_original, build_transform
from xlearner.metrics import DetEvaluator, SegEvaluator, coco_map

COCO_CATS = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]


def _jpeg(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def write_coco(root: Path, name: str, sizes: list[tuple[int, int]], seed: int = 0) -> Path:
    """Non-square images; per image two objects and one crowd region; 'area' as COCO gives it
    (the segment's area, smaller than the box's), so APs/APm/APl follow the file, not the boxes."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i, (h, w) in enumerate(sizes):
        iid = 100 + 7 * i  # ids as given, not positions
        fname = f"{name}_{iid:06d}.jpg"
        _jpeg(root / name / fname, h, w, seed * 100 + i)
        images.append({"id": iid, "file_name": fname, "width": w, "height": h})
        for k in range(3):
            bw, bh = int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            crowd = int(k == 2)
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": COCO_CATS[(i + k) % 3]["id"],
                         "bbox": [x, y, bw, bh], "area": 0.6 * bw * bh, "iscrowd": crowd,
                         "segmentation": {"counts": [0], "size": [h, w]} if crowd else [[x, y, x + bw, y, x, y + bh]]})
    path = root / f"instances_{name}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": COCO_CATS}))
    return path


def write_ade(root: Path, split: str, sizes: list[tuple[int, int]], seed: int = 0) -> tuple[Path, Path]:
    """ADEChallengeData2016 layout: images/<split>/*.jpg, annotations/<split>/*.png, 0 = other."""
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        stem = f"ADE_{split}_{i:08d}"
        _jpeg(root / "images" / split / f"{stem}.jpg", h, w, seed * 100 + i)
        mask = np.zeros((h, w), np.uint8)  # 0 = other
        mask[: h // 2] = rng.choice([1, 3, 150])
        mask[h // 2:, : w // 2] = rng.choice([2, 5])
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask, mode="L").save(root / "annotations" / split / f"{stem}.png")
    return root / "images" / split, root / "annotations" / split


def write_real_data(root: Path) -> dict:
    """ImageNet-, COCO- and ADE20K-shaped data under ``root``; the template's source paths to it."""
    for split, n in (("train", 4), ("val", 2)):
        for c, wnid in enumerate(["n01440764", "n01443537", "n01484850"]):
            for j in range(n):
                _jpeg(root / "imagenet" / split / wnid / f"{wnid}_{j}.JPEG", 20 + 7 * j, 40 - 5 * j, c * 10 + j)
    coco = root / "coco"
    train_ann = write_coco(coco, "train2017", [(40, 64), (64, 48), (30, 70), (56, 56), (48, 36), (60, 44)], 1)
    val_ann = write_coco(coco, "val2017", [(36, 60), (64, 40), (50, 50)], 2)
    ade = root / "ade20k"
    tr_img, tr_mask = write_ade(ade, "training", [(40, 56), (48, 32), (36, 36), (44, 60)], 3)
    va_img, va_mask = write_ade(ade, "validation", [(30, 50), (52, 40)], 4)
    return {"root": root, "paths": {
        "imagenet.root": root / "imagenet" / "train", "imagenet.val_root": root / "imagenet" / "val",
        "coco.root": coco / "train2017", "coco.annotations": train_ann,
        "coco.val_root": coco / "val2017", "coco.val_annotations": val_ann,
        "ade20k.root": tr_img, "ade20k.masks": tr_mask, "ade20k.val_root": va_img, "ade20k.val_masks": va_mask}}


@pytest.fixture(scope="module")
def real_data(tmp_path_factory) -> dict:
    return write_real_data(tmp_path_factory.mktemp("real"))


def small_template(real_data: dict, extra: list[str] = ()):
    """The shipped template, paths pointed at the test data, sizes made small for a CPU."""
    overrides = [f"sources.{k}={v}" for k, v in real_data["paths"].items()] + [
        "image_size=32", "fpn_channels=32", "backbone.name=resnet18",
        "backbone.kwargs={channels: [8, 16, 32, 64], stem_width: 8}",
        "sources.imagenet.batch_size=4", "sources.imagenet.image_size=32",
        "sources.coco.batch_size=2", "sources.coco.image_size=48",
        "sources.ade20k.batch_size=2", "sources.ade20k.image_size=32",
        "train.steps=2", "train.warmup_steps=1", "train.compile=false", "train.channels_last=false",
        "train.num_workers=0", "train.amp=fp32", "train.progress=false", "train.val_batches=2",
        "transfer.steps=2", "transfer.seeds=1", "transfer.image_size=32", "transfer.batch_size=2",
        *extra]
    return load_config("imagenet_coco_ade20k", overrides)


def test_template_lists_all_ade20k_classes_and_validates_as_shipped():
    with pytest.raises(ConfigError) as err:  # only because the data is not on this machine
        load_config("imagenet_coco_ade20k")
    msg = str(err.value)
    for field in ("sources[1](coco).val_annotations", "sources[2](ade20k).masks"):
        assert field in msg
    cfg = load_config(preset_path("imagenet_coco_ade20k"), check_files=False)
    ade = cfg.source("ade20k")
    assert len(ade.class_names) == 150 == len(set(ade.class_names))
    assert ade.class_names[:3] == ["wall", "building", "sky"] and ade.class_names[-1] == "flag"
    assert ade.reduce_zero_label and ade.resize_mode == "keep_ratio"
    assert cfg.source("coco").resize_mode == "keep_ratio" and cfg.source("imagenet").resize_mode == "square"


def test_template_on_real_shaped_data_checks_trains_validates_transfers(real_data, tmp_path):
    from xlearner.data.check import check_source
    from xlearner.stages import train_stage
    from xlearner.transfer.suite import transfer_one

    cfg = small_template(real_data)
    lines: list[str] = []
    for s in cfg.sources:
        assert check_source(s, echo=lines.append) == 0, "\n".join(lines)
    coco = CocoSource(cfg.source("coco"), "val")
    assert coco.class_names == ["person", "car", "dog"] and coco.category_ids == [1, 3, 18]
    assert coco.num_crowd == 3 and coco.coco_file == real_data["paths"]["coco.val_annotations"]

    torch.manual_seed(0)
    info = train_stage(cfg, "expansion", tmp_path / "expansion")
    m = info["metrics"]
    for key in ("imagenet", "coco", "ade20k", "coco/AP50", "coco/AP75", "coco/APs", "coco/APm", "coco/APl"):
        assert key in m, sorted(m)
    per_class = m["ade20k/per_class_iou"]
    assert list(per_class) == cfg.source("ade20k").class_names
    # ADE mask values 1, 2, 3, 5, 150 are classes 0, 1, 2, 4, 149; 0 (other) is ignored
    ade_val = MaskFolderSource(cfg.source("ade20k"), "val")
    values = set().union(*(ade_val[i][1]["mask"].unique().tolist() for i in range(len(ade_val))))
    assert values <= {0, 1, 2, 4, 149, 255} and 255 in values
    assert {info["sources"][i]["num_classes"] for i in (1, 2)} == {3, 150}

    det = transfer_one(tmp_path / "expansion", cfg.source("coco"), cfg, show_progress=False)
    assert det["metric"] == "mAP" and {"AP50", "AP75", "APs", "APm", "APl"} <= set(det["extra"])
    assert det["num_test"] == 3
    seg = transfer_one(tmp_path / "expansion", cfg.source("ade20k"), cfg, show_progress=False)
    assert 0.0 <= seg["mean"] <= 1.0 and len(seg["extra"]["per_class_iou"][0]) == 150


def _perfect(batch: dict, crowd_score: float | None = None, crowd_boxes=None) -> list[dict]:
    """Detections equal to the (transformed) ground truth; optionally one more on each crowd region."""
    out = []
    for i, t in enumerate(batch["targets"]):
        boxes, labels = t["boxes"], t["labels"]
        scores = torch.full((len(boxes),), 0.9)
        if crowd_boxes is not None:
            boxes = torch.cat([boxes, crowd_boxes[i]])
            labels = torch.cat([labels, torch.zeros(len(crowd_boxes[i]), dtype=torch.int64)])
            scores = torch.cat([scores, torch.full((len(crowd_boxes[i]),), crowd_score)])
        out.append({"boxes": boxes, "scores": scores, "labels": labels})
    return out


def test_perfect_detector_scores_one_against_the_original_file_crowds_included(tmp_path):
    ann = write_coco(tmp_path, "val2017", [(36, 60), (64, 40), (50, 50), (30, 80)], 5)
    data = json.loads(ann.read_text())
    for a in data["annotations"]:  # crowd regions labelled as class 0's category so a hit on one is matched
        if a["iscrowd"]:
            a["category_id"] = 1
    ann.write_text(json.dumps(data))
    cfg = SourceConfig(name="coco", task="det", format="coco", root=tmp_path / "val2017", annotations=ann,
                       val_fraction=0.0)
    ds = CocoSource(cfg, "train")
    crowd = {a["image_id"]: a for a in data["annotations"] if a["iscrowd"]}
    size = 32
    loader = eval_loader(ds, "det", size, batch_size=3, resize="keep_ratio", original=True)
    scorer, legacy_preds, legacy_tgts = DetEvaluator(ds.num_classes, ds.coco_file, ds.category_ids), [], []
    for batch in loader:
        assert batch["images"].shape[-2:] == (size, size)
        cb = []
        for t, m in zip(batch["targets"], batch["meta"]):
            # the keep-ratio path takes boxes back to the original pixels exactly
            assert torch.allclose(boxes_to_original(t["boxes"], m), m["boxes"], atol=1e-3)
            h, w = m["orig_size"]
            assert max(m["input_size"]) == size and abs(m["input_size"][0] / m["input_size"][1] - h / w) < 0.05
            x, y, bw, bh = crowd[m["image_id"]]["bbox"]
            s = m["input_size"][1] / w
            cb.append(torch.tensor([[x * s, y * s, (x + bw) * s, (y + bh) * s]]))
        dets = _perfect(batch, crowd_score=0.99, crowd_boxes=cb)
        scorer.update(dets, batch)
        legacy_preds += dets
        legacy_tgts += batch["targets"]
    res = scorer.compute()
    assert res["mAP"] == pytest.approx(1.0) and res["AP50"] == pytest.approx(1.0) and res["AP75"] == pytest.approx(1.0)
    # sizes follow the file's 'area' (0.6 x box): these objects are all small (< 32^2) by COCO's rule
    assert res["APs"] == pytest.approx(1.0)
    # the old path (ground truth rebuilt by the reader, no crowds) counts the crowd hits as false positives
    assert coco_map(legacy_preds, legacy_tgts, ds.num_classes)["mAP"] < 0.95


def test_ade_masks_scored_at_original_size_with_zero_as_other(tmp_path):
    img_dir, mask_dir = write_ade(tmp_path, "validation", [(30, 50), (52, 40), (20, 64)], 6)
    names = [f"c{k}" for k in range(150)]
    cfg = SourceConfig(name="ade", task="seg", format="maskfolder", root=img_dir, masks=mask_dir,
                       class_names=names, reduce_zero_label=True, val_fraction=0.0)
    ds = MaskFolderSource(cfg, "train")
    raw = [np.asarray(Image.open(r.mask)) for r in ds.records]
    _, t0 = ds[0]
    assert int((t0["mask"] == 255).sum()) == int((raw[0] == 0).sum())  # 0 = other -> ignore
    assert set(t0["mask"][t0["mask"] != 255].unique().tolist()) == {int(v) - 1 for v in np.unique(raw[0]) if v}
    scorer = SegEvaluator(150, names)
    for batch in eval_loader(ds, "seg", 24, batch_size=2, resize="keep_ratio", original=True):
        # a perfect segmenter at the input size, one-hot logits of the resized mask
        logits = torch.nn.functional.one_hot(batch["masks"].clamp(max=149), 150).permute(0, 3, 1, 2).float()
        scorer.update(logits, batch)
    res = scorer.compute()
    # the confusion matrix counts every labelled pixel of the ORIGINAL masks (not the 24 px input)
    assert scorer.cm.mat.sum() == sum(int((r != 0).sum()) for r in raw)
    assert res["mIoU"] > 0.8
    assert set(res["per_class_iou"]) == set(names)


def test_label_map_and_option_errors(tmp_path):
    img_dir, mask_dir = write_ade(tmp_path, "training", [(20, 30)], 7)
    cfg = SourceConfig(name="m", task="seg", format="maskfolder", root=img_dir, masks=mask_dir,
                       class_names=["a", "b", "c"], label_map={1: 0, 3: 1, 150: 2, 2: 255, 5: 255, 0: 255},
                       val_fraction=0.0)
    _, t = MaskFolderSource(cfg, "train")[0]
    assert set(t["mask"].unique().tolist()) <= {0, 1, 2, 255}
    with pytest.raises(ValueError, match="not both"):
        SourceConfig(name="m", task="seg", format="maskfolder", root=img_dir, masks=mask_dir, class_names=["a"],
                     label_map={0: 255}, reduce_zero_label=True)
    with pytest.raises(ValueError, match="keep_ratio applies to det/seg"):
        SourceConfig(name="c", task="cls", format="imagefolder", root=img_dir, resize="keep_ratio")
    with pytest.raises(ValueError, match="reduce_zero_label/label_map apply to the masks of a maskfolder"):
        SourceConfig(name="c", task="cls", format="imagefolder", root=img_dir, reduce_zero_label=True)
    with pytest.raises(ValueError, match="remove them from this embedded seg source"):
        SourceConfig(name="e", task="seg", format="embedded", dataset="composed_seg_glyphs", label_map={1: 0})
    embedded = SourceConfig(name="e", task="det", format="embedded", dataset="composed_det_glyphs")
    assert embedded.resize_mode == "square" and not embedded.scored_as_published


def test_keep_ratio_training_pads_with_ignore_and_keeps_boxes_in_the_image():
    from xlearner.config import AugmentConfig

    img = torch.zeros(3, 30, 80, dtype=torch.uint8)
    img[:, 5:25, 50:70] = 255
    mask = torch.zeros(30, 80, dtype=torch.int64)
    mask[5:25, 50:70] = 1
    seg = build_transform("seg", 40, True, AugmentConfig(random_resized_crop=(0.6, 1.0), hflip=True),
                          resize="keep_ratio")
    det = build_transform("det", 40, True, AugmentConfig(hflip=True), resize="keep_ratio")
    for s in range(8):
        torch.manual_seed(s)
        out, t = seg(img, {"mask": mask})
        assert out.shape == (3, 40, 40) and (t["mask"] == 255).sum() > 0  # the 80x30 image leaves padding
        pad = t["mask"] == 255
        assert out[:, pad].abs().max() < 0.05  # padding is the mean colour (~0 once normalised)
        torch.manual_seed(s)
        out, t = det(img, {"boxes": torch.tensor([[50.0, 5.0, 70.0, 25.0]]), "labels": torch.tensor([1])})
        x1, y1, x2, y2 = t["boxes"][0].tolist()
        assert y2 <= 15 + 1e-4 and x2 - x1 == pytest.approx(10, abs=1e-4)  # ratio kept: 80x30 -> 40x15


def test_coco_index_cache_is_reused_and_keyed_by_size_and_mtime(tmp_path, monkeypatch):
    from xlearner.data import readers

    monkeypatch.setenv("XLEARNER_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(readers, "INDEX_CACHE_MIN_BYTES", 0)  # cache even this small file
    ann = write_coco(tmp_path, "train2017", [(36, 60), (64, 40)], 8)
    cfg = SourceConfig(name="coco", task="det", format="coco", root=tmp_path / "train2017", annotations=ann,
                       val_fraction=0.0)
    first = CocoSource(cfg, "train")
    assert len(list((tmp_path / "home" / "index").glob("coco-*.npz"))) == 1
    parse = readers._parse_coco
    monkeypatch.setattr(readers, "_parse_coco", lambda p: pytest.fail("parsed again despite the cache"))
    again = CocoSource(cfg, "train")
    assert [r.where for r in again.records] == [r.where for r in first.records]
    for a, b in zip(again.records, first.records):
        assert torch.equal(a.target["boxes"], b.target["boxes"]) and a.target["image_id"] == b.target["image_id"]
    assert again.num_crowd == first.num_crowd == 2 and again.category_ids == [1, 3, 18]
    # an edited file (new size and mtime) is parsed again, never served from the old entry
    data = json.loads(ann.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != data["images"][0]["id"]]
    ann.write_text(json.dumps(data))
    monkeypatch.setattr(readers, "_parse_coco", parse)
    edited = CocoSource(cfg, "train")
    assert len(edited.records[0].target["boxes"]) == 0 and len(first.records[0].target["boxes"]) == 2
    assert len(list((tmp_path / "home" / "index").glob("coco-*.npz"))) == 1  # the entry was replaced


def test_reduce_zero_label_follows_ade20k_convention():
    from xlearner.data.readers import map_mask_labels

    fields = dict(task="seg", format="maskfolder", root="i", masks="m", class_names=["x"])
    raw = torch.tensor([[0, 1, 2], [150, 255, 7]])
    reduced = map_mask_labels(raw, SourceConfig(name="a", reduce_zero_label=True, **fields))
    assert reduced.tolist() == [[255, 0, 1], [149, 255, 6]]  # 0 = other and 255 stay ignored
    assert map_mask_labels(raw, SourceConfig(name="b", **fields)) is raw
