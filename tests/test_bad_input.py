"""Every kind of bad record: a BadSampleError naming file, record and fix; under skip, skipped and counted."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from xlearner.config import SourceConfig
from xlearner.data.readers import CocoSource, CsvSource, ImageFolderSource, MaskFolderSource, VocSource
from xlearner.data.schema import BadSampleError


def png(path, h=10, w=10, value=None, grey=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((h, w) if grey else (h, w, 3), 0 if value is None else value, np.uint8)
    Image.fromarray(arr).save(path)
    return path


def cfg(policy="error", **kw):
    return SourceConfig(name="src", on_bad_sample=policy, val_fraction=0.0, **kw)


def test_corrupt_image_raises_on_read_or_is_replaced_under_skip(tmp_path):
    for i in range(3):
        png(tmp_path / "a" / f"{i}.png", value=i * 50)
    bad = tmp_path / "a" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    ds = ImageFolderSource(cfg(task="cls", format="imagefolder", root=tmp_path), "train")
    with pytest.raises(BadSampleError, match=r"1\.png.*cannot decode") as e:
        ds[1]
    assert "on_bad_sample: skip" in str(e.value)
    ds = ImageFolderSource(cfg("skip", task="cls", format="imagefolder", root=tmp_path), "train")
    img, _ = ds[1]  # replaced by the next valid record (2.png)
    assert int(img[0, 0, 0]) == 100 and ds.bad.count == 1 and "1.png" in ds.bad.skipped[0]


def test_missing_image_in_csv(tmp_path):
    png(tmp_path / "ok.png")
    (tmp_path / "l.csv").write_text("path,label\nok.png,cat\ngone.png,dog\n")
    with pytest.raises(BadSampleError, match=r"l\.csv line 3.*gone\.png is missing"):
        CsvSource(cfg(task="cls", format="csv", annotations=tmp_path / "l.csv"), "train")
    ds = CsvSource(cfg("skip", task="cls", format="csv", annotations=tmp_path / "l.csv"), "train")
    assert len(ds) == 1 and ds.bad.count == 1 and ds.class_names == ["cat", "dog"]


def test_unknown_csv_label_with_class_names(tmp_path):
    png(tmp_path / "ok.png")
    (tmp_path / "l.csv").write_text("path,label\nok.png,cat\nok.png,horse\nok.png,7\n")
    c = dict(task="cls", format="csv", annotations=tmp_path / "l.csv", class_names=["cat", "dog"])
    with pytest.raises(BadSampleError, match=r"line 3.*'horse'"):
        CsvSource(cfg(**c), "train")
    ds = CsvSource(cfg("skip", **c), "train")
    assert len(ds) == 1 and ds.bad.count == 2


def coco(tmp_path, anns, cats=({"id": 1, "name": "a"},)):
    png(tmp_path / "img" / "0.png", h=20, w=30)
    png(tmp_path / "img" / "1.png", h=20, w=30)
    images = [{"id": i, "file_name": f"{i}.png", "width": 30, "height": 20} for i in range(2)]
    p = tmp_path / "ann.json"
    p.write_text(json.dumps({"images": images, "annotations": anns, "categories": list(cats)}))
    return dict(task="det", format="coco", root=tmp_path / "img", annotations=p)


@pytest.mark.parametrize("bbox,pattern", [
    ([5, 5, 0, 4], "x2 <= x1"),
    ([5, 5, 4, -1], "x2 <= x1 or y2 <= y1"),
    ([20, 5, 25, 4], "outside the 30x20 image"),
])
def test_coco_bad_boxes(tmp_path, bbox, pattern):
    c = coco(tmp_path, [{"id": 7, "image_id": 0, "category_id": 1, "bbox": [1, 1, 4, 4]},
                        {"id": 8, "image_id": 1, "category_id": 1, "bbox": bbox}])
    with pytest.raises(BadSampleError, match=rf"ann\.json annotation id 8 \(image 1\.png\).*{pattern}"):
        CocoSource(cfg(**c), "train")
    ds = CocoSource(cfg("skip", **c), "train")
    assert len(ds) == 1 and ds.bad.count == 1  # the whole image goes: never an object turned background
    assert ds[0][1]["boxes"].tolist() == [[1, 1, 5, 5]]


def test_coco_small_overhang_is_clipped(tmp_path):
    c = coco(tmp_path, [{"id": 1, "image_id": 0, "category_id": 1, "bbox": [-0.5, 2, 30.9, 5]}])
    ds = CocoSource(cfg(**c), "train")
    assert ds[0][1]["boxes"].tolist() == [[0, 2, 30, 7]]


def test_coco_undeclared_category(tmp_path):
    c = coco(tmp_path, [{"id": 3, "image_id": 0, "category_id": 42, "bbox": [1, 1, 4, 4]}])
    with pytest.raises(BadSampleError, match=r"annotation id 3.*category_id 42 is not declared"):
        CocoSource(cfg(**c), "train")
    ds = CocoSource(cfg("skip", **c), "train")
    assert len(ds) == 1 and ds.bad.count == 1


def test_coco_missing_image(tmp_path):
    c = coco(tmp_path, [])
    (tmp_path / "img" / "1.png").unlink()
    with pytest.raises(BadSampleError, match=r"image id 1 \(1\.png\).*missing"):
        CocoSource(cfg(**c), "train")
    assert len(CocoSource(cfg("skip", **c), "train")) == 1


def test_voc_bad_box(tmp_path):
    png(tmp_path / "img" / "a.png", h=12, w=16)
    (tmp_path / "xml").mkdir()
    (tmp_path / "xml" / "a.xml").write_text(
        "<annotation><filename>a.png</filename><size><width>16</width><height>12</height></size>"
        "<object><name>dog</name><bndbox><xmin>2</xmin><ymin>8</ymin><xmax>6</xmax><ymax>3</ymax></bndbox></object>"
        "</annotation>")
    c = dict(task="det", format="voc", root=tmp_path / "img", annotations=tmp_path / "xml")
    with pytest.raises(BadSampleError, match=r"a\.xml object 0 \(dog\).*y2 <= y1"):
        VocSource(cfg(**c), "train")
    with pytest.raises(BadSampleError, match="empty"):  # the only record skipped: empty source
        VocSource(cfg("skip", **c), "train")


def test_mask_value_out_of_range(tmp_path):
    for i in range(3):
        png(tmp_path / "img" / f"{i}.png", value=i * 60)
        png(tmp_path / "mask" / f"{i}.png", value=5 if i == 0 else 1, grey=True)
    c = dict(task="seg", format="maskfolder", root=tmp_path / "img", masks=tmp_path / "mask",
             class_names=["bg", "fg"])
    ds = MaskFolderSource(cfg(**c), "train")
    with pytest.raises(BadSampleError, match=r"mask[/\\]0\.png: mask holds value 5.*2 classes"):
        ds[0]
    ds = MaskFolderSource(cfg("skip", **c), "train")
    img, tgt = ds[0]
    assert int(img[0, 0, 0]) == 60 and int(tgt["mask"][0, 0]) == 1 and ds.bad.count == 1


def test_mask_missing(tmp_path):
    png(tmp_path / "img" / "0.png")
    png(tmp_path / "img" / "1.png")
    png(tmp_path / "mask" / "0.png", grey=True)
    c = dict(task="seg", format="maskfolder", root=tmp_path / "img", masks=tmp_path / "mask", class_names=["bg"])
    with pytest.raises(BadSampleError, match=r"1\.png: no mask"):
        MaskFolderSource(cfg(**c), "train")
    assert len(MaskFolderSource(cfg("skip", **c), "train")) == 1


def test_class_folder_without_images(tmp_path):
    png(tmp_path / "a" / "0.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("x")
    with pytest.raises(BadSampleError, match=r"class folder 'b' has no images"):
        ImageFolderSource(cfg(task="cls", format="imagefolder", root=tmp_path), "train")
    ds = ImageFolderSource(cfg("skip", task="cls", format="imagefolder", root=tmp_path), "train")
    assert ds.class_names == ["a", "b"] and len(ds) == 1 and ds.bad.count == 1  # indices stay stable


def test_empty_source_always_errors(tmp_path):
    (tmp_path / "l.csv").write_text("path,label\n")
    for policy in ("error", "skip"):
        with pytest.raises(BadSampleError, match=r"split 'train' is empty"):
            CsvSource(cfg(policy, task="cls", format="csv", annotations=tmp_path / "l.csv"), "train")
    (tmp_path / "root").mkdir()
    with pytest.raises(BadSampleError, match="empty"):
        ImageFolderSource(cfg(task="cls", format="imagefolder", root=tmp_path / "root"), "train")


def test_val_split_empty_names_the_fix(tmp_path):
    png(tmp_path / "a" / "0.png")
    with pytest.raises(BadSampleError, match="val_fraction > 0"):
        ImageFolderSource(cfg(task="cls", format="imagefolder", root=tmp_path), "val")


def test_data_check_lists_every_problem(tmp_path, capsys):
    from xlearner.data.check import check_source_file

    for i in range(4):
        png(tmp_path / "img" / f"{i}.png", h=20, w=30)
    (tmp_path / "img" / "3.png").write_bytes(b"garbage")
    images = [{"id": i, "file_name": f"{i}.png", "width": 30, "height": 20} for i in range(5)]  # 4.png missing
    anns = [{"id": 1, "image_id": 0, "category_id": 1, "bbox": [1, 1, 0, 4]},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [1, 1, 4, 4]},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [1, 1, 4, 4]}]
    (tmp_path / "ann.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    (tmp_path / "src.yaml").write_text(
        "name: mine\ntask: det\nformat: coco\nroot: img\nannotations: ann.json\nval_fraction: 0.0\n"
        "val_root: img\nval_annotations: ann.json\n")
    n = check_source_file(tmp_path / "src.yaml")
    out = capsys.readouterr().out
    # train and val both read the file: 4 problems each (zero-width box, undeclared id, missing, corrupt)
    assert n == 8, out
    for text in ("annotation id 1", "category_id 9", "4.png is missing", "3.png: cannot decode", "8 problems"):
        assert text in out, out
    good = tmp_path / "good.yaml"
    (tmp_path / "ok").mkdir()
    png(tmp_path / "ok" / "a" / "0.png")
    png(tmp_path / "ok" / "a" / "1.png")
    good.write_text("name: ok\ntask: cls\nformat: imagefolder\nroot: ok\nval_fraction: 0.5\n")
    assert check_source_file(good) == 0
