"""Each reader round-trips a small dataset written in its format; splits are deterministic."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from xlearner.config import SourceConfig
from xlearner.data.readers import CocoSource, CsvSource, ImageFolderSource, MaskFolderSource, VocSource
from xlearner.data.schema import validate_target
from xlearner.data.sources import build_source


def rand_image(seed, h=12, w=16, mode="RGB"):
    rng = np.random.default_rng(seed)
    if mode == "L":
        return rng.integers(0, 256, (h, w), dtype=np.uint8)
    return rng.integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)


def save(arr, path):
    """(H,W) -> grey L, (H,W,3) -> RGB, (H,W,4) -> RGBA PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def as_chw(arr):
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return torch.from_numpy(arr[..., :3].copy()).permute(2, 0, 1)


def cfg(**kw):
    kw.setdefault("name", "src")
    return SourceConfig(**kw)


def test_imagefolder_roundtrip_with_grey_and_rgba(tmp_path):
    arrays = {}
    for c, cls in enumerate(["zebra", "ant", "cat"]):
        for j in range(3):
            mode = ["RGB", "L", "RGBA"][j]
            arr = rand_image(10 * c + j, mode=mode)
            p = tmp_path / cls / f"{j}.png"
            save(arr, p)
            arrays[str(p)] = (arr, cls)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = ImageFolderSource(cfg(task="cls", format="imagefolder", root=tmp_path, val_fraction=0.0), "train")
    assert ds.class_names == ["ant", "cat", "zebra"] and ds.num_classes == 3 and len(ds) == 9
    for i in range(len(ds)):
        img, tgt = ds[i]
        arr, cls = arrays[str(ds.records[i].image)]
        assert img.dtype == torch.uint8 and img.shape == (3, 12, 16)
        assert torch.equal(img, as_chw(arr))  # grey repeated to RGB, RGBA's alpha dropped
        assert ds.class_names[tgt["label"]] == cls


def test_csv_names_and_ints_and_root(tmp_path):
    imgs = tmp_path / "imgs"
    rows = []
    for i in range(6):
        save(rand_image(i), imgs / f"{i}.png")
        rows.append((f"imgs/{i}.png", ["dog", "cat"][i % 2]))
    with open(tmp_path / "a.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    ds = CsvSource(cfg(task="cls", format="csv", annotations=tmp_path / "a.csv", val_fraction=0.0), "train")
    assert ds.class_names == ["cat", "dog"]
    for i in range(6):
        img, tgt = ds[i]
        assert torch.equal(img, as_chw(rand_image(i)))
        assert ds.class_names[tgt["label"]] == rows[i][1]
    # integer labels, paths relative to root
    sub = tmp_path / "other"
    sub.mkdir()
    with open(sub / "b.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), ("0.png", "2"), ("1.png", "0")])
    ds = CsvSource(cfg(task="cls", format="csv", annotations=sub / "b.csv", root=imgs, val_fraction=0.0), "train")
    assert ds.class_names == ["0", "1", "2"] and [ds[i][1]["label"] for i in range(2)] == [2, 0]


def write_coco(tmp_path, images, anns, cats):
    data = {"images": images, "annotations": anns, "categories": cats}
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(data))
    return p


def test_coco_roundtrip_and_category_mapping(tmp_path):
    for i in range(3):
        save(rand_image(i, 20, 30), tmp_path / "img" / f"{i}.png")
    images = [{"id": 10 + i, "file_name": f"{i}.png", "width": 30, "height": 20} for i in range(3)]
    cats = [{"id": 90, "name": "zeta"}, {"id": 7, "name": "alpha"}, {"id": 15, "name": "mid"}]
    anns = [
        {"id": 1, "image_id": 10, "category_id": 90, "bbox": [1, 2, 10, 5], "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 7, "bbox": [0, 0, 30, 20], "iscrowd": 0},
        {"id": 3, "image_id": 11, "category_id": 15, "bbox": [5.5, 6.5, 3, 4]},
        {"id": 4, "image_id": 11, "category_id": 7, "bbox": [0, 0, 5, 5], "iscrowd": 1},
    ]  # image 12 has no annotations
    p = write_coco(tmp_path, images, anns, cats)
    ds = CocoSource(cfg(task="det", format="coco", root=tmp_path / "img", annotations=p, val_fraction=0.0), "train")
    assert ds.category_ids == [7, 15, 90] and ds.class_names == ["alpha", "mid", "zeta"]
    img, tgt = ds[0]
    assert torch.equal(img, as_chw(rand_image(0, 20, 30)))
    assert torch.equal(tgt["boxes"], torch.tensor([[1, 2, 11, 7], [0, 0, 30, 20]], dtype=torch.float32))
    assert tgt["labels"].tolist() == [2, 0] and tgt["labels"].dtype == torch.int64
    _, tgt = ds[1]
    assert tgt["boxes"].tolist() == [[5.5, 6.5, 8.5, 10.5]] and tgt["labels"].tolist() == [1]  # crowd ignored
    img, tgt = ds[2]
    assert tgt["boxes"].shape == (0, 4) and tgt["labels"].shape == (0,)
    for i in range(3):
        img, tgt = ds[i]
        assert validate_target("det", img, tgt, ds.num_classes, "x") is None


def test_voc_roundtrip(tmp_path):
    ann = tmp_path / "xml"
    ann.mkdir()
    objs = {0: [("dog", (1, 2, 9, 10)), ("cat", (3, 3, 15, 11))], 1: [("bird", (0, 0, 16, 12))]}
    for i, o in objs.items():
        save(rand_image(i), tmp_path / "img" / f"{i}.png")
        body = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                       f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in o)
        (ann / f"{i}.xml").write_text(f"<annotation><filename>{i}.png</filename><size><width>16</width>"
                                      f"<height>12</height><depth>3</depth></size>{body}</annotation>")
    c = cfg(task="det", format="voc", root=tmp_path / "img", annotations=ann, val_fraction=0.0)
    ds = VocSource(c, "train")
    assert ds.class_names == ["bird", "cat", "dog"]
    img, tgt = ds[0]
    assert torch.equal(img, as_chw(rand_image(0)))
    assert tgt["boxes"].tolist() == [[1, 2, 9, 10], [3, 3, 15, 11]] and tgt["labels"].tolist() == [2, 1]
    ds = VocSource(c.model_copy(update={"class_names": ["dog", "cat", "bird", "person"]}), "train")
    assert ds.num_classes == 4 and ds[1][1]["labels"].tolist() == [2]


def test_maskfolder_roundtrip(tmp_path):
    for i in range(4):
        save(rand_image(i), tmp_path / "img" / f"s{i}.png")
        m = np.zeros((12, 16), np.uint8)
        m[2:6, 3:9] = 1 + i % 2
        m[0, :] = 255
        save(m, tmp_path / "mask" / f"s{i}.png")
    c = cfg(task="seg", format="maskfolder", root=tmp_path / "img", masks=tmp_path / "mask",
            class_names=["background", "a", "b"], val_fraction=0.0)
    ds = MaskFolderSource(c, "train")
    assert len(ds) == 4 and ds.num_classes == 3
    for i in range(4):
        img, tgt = ds[i]
        assert torch.equal(img, as_chw(rand_image(i)))
        m = tgt["mask"]
        assert m.dtype == torch.int64 and m.shape == (12, 16)
        assert m[3, 4] == 1 + i % 2 and m[0, 0] == 255 and m[10, 10] == 0


def _folder(tmp_path, n=20):
    for i in range(n):
        save(rand_image(i, 4, 4), tmp_path / ["a", "b"][i % 2] / f"{i:02d}.png")
    return tmp_path


def test_holdout_split_is_deterministic_and_disjoint(tmp_path):
    root = _folder(tmp_path)
    c = cfg(task="cls", format="imagefolder", root=root, val_fraction=0.25, split_seed=3)
    tr, va, te = (ImageFolderSource(c, s) for s in ("train", "val", "test"))
    tr_f = {str(r.image) for r in tr.records}
    va_f = {str(r.image) for r in va.records}
    assert len(va_f) == 5 and len(tr_f) == 15 and tr_f.isdisjoint(va_f)
    assert te.test_is_val and {str(r.image) for r in te.records} == va_f
    assert va_f == {str(r.image) for r in ImageFolderSource(c, "val").records}
    other = {str(r.image) for r in ImageFolderSource(c.model_copy(update={"split_seed": 4}), "val").records}
    assert other != va_f


def test_explicit_val_root(tmp_path):
    root = _folder(tmp_path / "train", 6)
    val = _folder(tmp_path / "val", 4)
    c = cfg(task="cls", format="imagefolder", root=root, val_root=val, val_fraction=0.5)
    assert len(ImageFolderSource(c, "train")) == 6  # no holdout when val is explicit
    assert len(ImageFolderSource(c, "val")) == 4 and len(ImageFolderSource(c, "test")) == 4


def test_build_source_max_samples_and_task_check(tmp_path):
    root = _folder(tmp_path)
    c = cfg(task="cls", format="imagefolder", root=root, val_fraction=0.0, max_samples=7)
    ds = build_source(c, "train")
    assert len(ds) == 7 and ds.num_classes == 2 and ds.name == "src" and ds.bad.count == 0
    again = build_source(c, "train")
    assert [again[i][1] for i in range(7)] == [ds[i][1] for i in range(7)]
    assert torch.equal(ds[3][0], again[3][0])
    from xlearner.config import ConfigError
    with pytest.raises(ConfigError, match="task"):
        build_source(cfg(task="det", format="imagefolder", root=root), "train")
