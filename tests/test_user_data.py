"""A user's own data fails loudly: each kind of bad input of issue 30 (D1, D3, D4, D6, D8, D9 and the
minor rows) gives a named error (file, record, fix) or is read as the user meant it."""
import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageOps

from xlearner import cli
from xlearner.config import ConfigError, SourceConfig, load_config
from xlearner.data import readers
from xlearner.data.check import check_source
from xlearner.data.readers import CocoSource, CsvSource, ImageFolderSource, VocSource
from xlearner.data.schema import BadSampleError


def png(path, h=10, w=10, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)
    return path


def cfg(policy="error", **kw):
    kw.setdefault("name", "src")
    return SourceConfig(on_bad_sample=policy, val_fraction=0.0, **kw)


def checked(c):
    """(problem count, PROBLEM lines) of `xlearner data check` on a source."""
    lines = []
    return check_source(c, echo=lines.append), [ln for ln in lines if ln.startswith("PROBLEM")]


# --- D1: every split is numbered by train's classes ------------------------------------

def test_imagefolder_val_lacking_a_class_keeps_trains_numbers(tmp_path):
    for cls in ("a", "b"):
        png(tmp_path / "train" / cls / "0.png")
    png(tmp_path / "val" / "b" / "0.png")
    c = cfg(task="cls", format="imagefolder", root=tmp_path / "train", val_root=tmp_path / "val")
    val = ImageFolderSource(c, "val")
    assert val.class_names == ["a", "b"] and val[0][1]["label"] == 1  # 'b' was numbered 0 before
    png(tmp_path / "val" / "c" / "0.png")
    with pytest.raises(BadSampleError, match=r"classes \['c'\] are not among train's classes \['a', 'b'\]"):
        ImageFolderSource(c, "val")
    problems, lines = checked(c)
    assert problems == 1 and "[val]" in lines[0] and "'c'" in lines[0]


def test_csv_val_label_unseen_in_train_is_a_bad_record(tmp_path):
    png(tmp_path / "x.png")
    (tmp_path / "train.csv").write_text("path,label\nx.png,cat\nx.png,dog\n")
    (tmp_path / "val.csv").write_text("path,label\nx.png,dog\nx.png,horse\n")
    c = cfg(task="cls", format="csv", annotations=tmp_path / "train.csv", val_annotations=tmp_path / "val.csv")
    with pytest.raises(BadSampleError, match=r"val\.csv line 3: label 'horse' is not a class \(train's classes"):
        CsvSource(c, "val")
    val = CsvSource(c.model_copy(update={"on_bad_sample": "skip"}), "val")
    assert val.class_names == ["cat", "dog"] and len(val) == 1 and val[0][1]["label"] == 1
    assert checked(c)[0] == 1


def test_voc_val_class_unseen_in_train_is_a_bad_record(tmp_path):
    def xml(folder, stem, names):
        folder.mkdir(parents=True, exist_ok=True)
        objs = "".join(f"<object><name>{n}</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
                       f"<ymax>5</ymax></bndbox></object>" for n in names)
        (folder / f"{stem}.xml").write_text(f"<annotation><filename>{stem}.png</filename>{objs}</annotation>")
        png(tmp_path / "img" / f"{stem}.png")

    xml(tmp_path / "tr", "t0", ["cat", "dog"])
    xml(tmp_path / "va", "v0", ["dog"])
    c = cfg(task="det", format="voc", root=tmp_path / "img", annotations=tmp_path / "tr",
            val_annotations=tmp_path / "va")
    val = VocSource(c, "val")
    assert val.class_names == ["cat", "dog"] and val[0][1]["labels"].tolist() == [1]
    xml(tmp_path / "va", "v1", ["cow"])
    with pytest.raises(BadSampleError, match=r"v1\.xml object 0 \(cow\): class 'cow' is not in train's classes"):
        VocSource(c, "val")


# --- D3, D4: COCO files that are not what they seem ------------------------------------

def coco_file(tmp_path, images, anns=(), cats=({"id": 1, "name": "a"},), top=None):
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(top if top is not None else
                            {"images": list(images), "annotations": list(anns), "categories": list(cats)}))
    return dict(task="det", format="coco", root=tmp_path / "img", annotations=p)


def two_images(tmp_path):
    for i in range(2):
        png(tmp_path / "img" / f"{i}.png", h=20, w=30)
    return [{"id": i, "file_name": f"{i}.png", "width": 30, "height": 20} for i in range(2)]


def test_coco_duplicate_image_id_is_a_bad_record(tmp_path):
    images = two_images(tmp_path)
    images[1]["id"] = 0
    c = coco_file(tmp_path, images, [{"id": 1, "image_id": 0, "category_id": 1, "bbox": [1, 1, 4, 4]}])
    with pytest.raises(BadSampleError, match=r"ann\.json image id 0: the id is given to 2 images"):
        CocoSource(cfg(**c), "train")
    png(tmp_path / "img" / "2.png")
    images.append({"id": 2, "file_name": "2.png"})
    c = coco_file(tmp_path, images)
    ds = CocoSource(cfg("skip", **c), "train")
    assert [r.image.name for r in ds.records] == ["2.png"] and ds.bad.count == 1
    assert checked(cfg(**c))[0] == 1


def test_coco_duplicate_category_id_is_an_error(tmp_path):
    c = coco_file(tmp_path, two_images(tmp_path), cats=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])
    for policy in ("error", "skip"):  # the class numbering itself is ambiguous: no record can be used
        with pytest.raises(BadSampleError, match=r"categories\[1\]: category id 1 is declared twice \('a' and 'b'\)"):
            CocoSource(cfg(policy, **c), "train")


def test_coco_top_level_list_is_named(tmp_path):
    c = coco_file(tmp_path, (), top=[{"id": 1}])
    with pytest.raises(BadSampleError, match=r"ann\.json: the top level of a COCO JSON must be an object.*got a list"):
        CocoSource(cfg("skip", **c), "train")


@pytest.mark.parametrize("change,pattern", [
    ({"file_name": None}, r"image id 1 \(images\[1\]\): file_name None is missing"),
    ({"id": "1"}, r"images\[1\]: id '1' is not an integer"),
    ({"width": "wide"}, r"image id 1 \(1\.png\): width 'wide' is not a positive number"),
])
def test_coco_bad_image_entry_is_a_bad_record(tmp_path, change, pattern):
    images = two_images(tmp_path)
    images[1].update(change)
    c = coco_file(tmp_path, images, [{"id": 5, "image_id": 0, "category_id": 1, "bbox": [1, 1, 4, 4]}])
    with pytest.raises(BadSampleError, match=pattern):
        CocoSource(cfg(**c), "train")
    ds = CocoSource(cfg("skip", **c), "train")
    assert len(ds) == 1 and ds.bad.count == 1 and ds[0][1]["boxes"].tolist() == [[1, 1, 5, 5]]


def test_coco_bad_annotation_entries_are_named(tmp_path):
    c = coco_file(tmp_path, two_images(tmp_path), ["not an object", {"id": 9, "image_id": "0", "category_id": 1,
                                                                       "bbox": [1, 1, 4, 4]}])
    ds = CocoSource(cfg("skip", **c), "train")
    assert len(ds) == 2 and ds.bad.count == 2
    assert "annotations[0]: is not an object" in ds.bad.skipped[0]
    assert "annotation id 9: image_id '0' is not an integer" in ds.bad.skipped[1]


# --- D6 ----------------------------------------------------------------------------------

def test_fpn_channels_not_a_multiple_of_32_with_a_det_head(tmp_path):
    with pytest.raises(ConfigError, match=r"fpn_channels 16 must be a multiple of 32.*GroupNorm.*fpn_channels: 32"):
        load_config("quick", ["fpn_channels=16"], check_files=False)
    # no det head anywhere (cls sources, cls transfer): any width is fine
    cls_only = ["fpn_channels=16", "transfer.datasets=[sklearn_digits]",
                "sources=[{name: f, task: cls, dataset: fashion_mnist}]"]
    assert load_config("quick", cls_only, check_files=False).fpn_channels == 16


# --- D8: EXIF orientation ----------------------------------------------------------------

def test_exif_orientation_is_applied_to_images_and_their_boxes_stay_in_the_displayed_frame(tmp_path):
    arr = np.zeros((20, 30, 3), np.uint8)
    arr[:5, :10] = 255  # a white block in the stored frame's top left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "img" / "0.jpg"
    path.parent.mkdir()
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    with Image.open(path) as im:
        shown = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    image = readers.decode_image(path)
    assert tuple(image.shape) == (3, 30, 20) and np.array_equal(image.permute(1, 2, 0).numpy(), shown)
    # a box given in the displayed 20x30 frame (as COCO tools give it) fits the decoded image
    images = [{"id": 0, "file_name": "0.jpg", "width": 20, "height": 30}]
    c = coco_file(tmp_path, images, [{"id": 1, "image_id": 0, "category_id": 1, "bbox": [2, 20, 15, 9]}])
    assert CocoSource(cfg(**c), "train")[0][1]["boxes"].tolist() == [[2, 20, 17, 29]]
    plain = png(tmp_path / "plain.png", h=4, w=6, value=7)  # no EXIF: untouched
    assert tuple(readers.decode_image(plain).shape) == (3, 4, 6)


# --- D9: paths leading outside root ------------------------------------------------------

def test_coco_file_names_outside_root_are_refused_unless_allowed(tmp_path):
    png(tmp_path / "img" / "0.png", h=20, w=30)
    png(tmp_path / "secret.png", h=20, w=30)
    os.symlink(tmp_path / "secret.png", tmp_path / "img" / "link.png")
    images = [{"id": 0, "file_name": "0.png"}, {"id": 1, "file_name": "../secret.png"},
              {"id": 2, "file_name": str(tmp_path / "secret.png")}, {"id": 3, "file_name": "link.png"}]
    c = coco_file(tmp_path, images)
    with pytest.raises(BadSampleError, match=r"image id 1 \(\.\./secret\.png\): file_name '\.\./secret\.png' climbs "
                                             r"out of root .*allow_outside_root: true"):
        CocoSource(cfg(**c), "train")
    ds = CocoSource(cfg("skip", **c), "train")
    assert [r.image.name for r in ds.records] == ["0.png"] and ds.bad.count == 3
    assert "absolute path" in ds.bad.skipped[1] and "symlink" in ds.bad.skipped[2]
    assert len(CocoSource(cfg(allow_outside_root=True, **c), "train")) == 4
    problems, lines = checked(cfg(**c))
    assert problems == 3 and all("outside" in ln or "out of" in ln for ln in lines[:3])


def test_voc_filename_outside_root_is_refused(tmp_path):
    png(tmp_path / "elsewhere.png")
    (tmp_path / "img").mkdir()
    (tmp_path / "xml").mkdir()
    (tmp_path / "xml" / "a.xml").write_text("<annotation><filename>../elsewhere.png</filename></annotation>")
    c = cfg(task="det", format="voc", root=tmp_path / "img", annotations=tmp_path / "xml", class_names=["x"])
    with pytest.raises(BadSampleError, match=r"a\.xml: <filename> '\.\./elsewhere\.png' climbs out of root"):
        VocSource(c, "train")
    assert len(VocSource(c.model_copy(update={"allow_outside_root": True}), "train")) == 1


# --- minor rows --------------------------------------------------------------------------

@pytest.mark.parametrize("override,pattern", [
    ("train.steps=true", r"'train\.steps': .*expected a number, got the boolean true"),
    ("train.lr=.inf", r"'train\.lr': Input should be a finite number"),
    ("transfer.lr=.nan", r"'transfer\.lr': Input should be a finite number"),
    ("sources.0.batch_size=false", r"batch_size.*boolean false"),
])
def test_booleans_and_non_finite_numbers_are_refused(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("quick", [override], check_files=False)
    assert load_config("quick", ["train.channels_last=true"], check_files=False).train.channels_last is True


def test_unknown_embedded_name_in_data_commands_exits_2(tmp_path, capsys):
    assert cli.main(["data", "show", "animal_mnst", "--out", str(tmp_path / "x.png")]) == 2
    assert cli.main(["data", "fetch", "animal_mnst"]) == 2
    assert "did you mean 'animal_mnist'" in capsys.readouterr().err.lower()


def test_csv_with_a_utf8_byte_order_mark(tmp_path):
    png(tmp_path / "x.png")
    (tmp_path / "l.csv").write_bytes("path,label\nx.png,cat\n".encode("utf-8-sig"))
    ds = CsvSource(cfg(task="cls", format="csv", annotations=tmp_path / "l.csv"), "train")
    assert len(ds) == 1 and ds.class_names == ["cat"]
    (tmp_path / "l.csv").write_bytes("path,label\nx.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(BadSampleError, match=r"l\.csv: cannot read CSV .*save the file as UTF-8"):
        CsvSource(cfg(task="cls", format="csv", annotations=tmp_path / "l.csv"), "train")


def test_images_over_max_image_pixels_are_bad_samples(tmp_path):
    for i in range(2):
        png(tmp_path / "a" / f"{i}.png", h=10, w=10 + 10 * i)
    c = cfg(task="cls", format="imagefolder", root=tmp_path, max_image_pixels=150)
    with pytest.raises(BadSampleError, match=r"1\.png: image is 20x10 = 200 pixels.*max_image_pixels \(150\)"):
        ImageFolderSource(c, "train")[1]
    ds = ImageFolderSource(c.model_copy(update={"on_bad_sample": "skip"}), "train")
    assert tuple(ds[1][0].shape) == (3, 10, 10) and ds.bad.count == 1
    assert tuple(ImageFolderSource(c.model_copy(update={"max_image_pixels": 200}), "train")[1][0].shape) == (3, 10, 20)
    assert SourceConfig(name="s", task="cls", dataset="mnist").max_image_pixels == Image.MAX_IMAGE_PIXELS


# --- box validation written once ------------------------------------------------------------

@pytest.mark.parametrize("box,ok,clipped", [
    ([-0.5, 0, 10, 20.9], True, [0, 0, 10, 20]),  # overhang within BOX_TOLERANCE (1 px): clipped
    ([-1.5, 0, 10, 10], False, None),
    ([0, 0, 31.5, 10], False, None),
    ([30, 0, 30.5, 10], False, None),  # inside the tolerance but no area inside the image
])
def test_one_box_rule_for_annotations_and_decoded_images(tmp_path, box, ok, clipped):
    """VOC boxes, COCO boxes and the check against the decoded image apply the same rule."""
    got, code = readers.check_boxes(np.array([box]), 30, 20)
    assert (code[0] == readers.BOX_OK) == ok
    voc_box, problem = readers._check_box(box, 30.0, 20.0, "w")
    assert (voc_box == clipped and problem is None) if ok else (voc_box is None and problem.startswith("w: box"))
    images = two_images(tmp_path)
    anns = [{"id": 1, "image_id": 0, "category_id": 1, "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}]
    ds = CocoSource(cfg("skip", **coco_file(tmp_path, images, anns)), "train")
    assert (ds.bad.count == 0) == ok
    del images[0]["width"], images[0]["height"]  # no size in the file: checked against the decoded image
    ds = CocoSource(cfg("skip", **coco_file(tmp_path, images, anns)), "train")
    i = [r.image.name for r in ds.records].index("0.png")
    if ok:
        assert got[0].tolist() == clipped and ds[i][1]["boxes"].tolist() == [clipped]
    else:
        with pytest.raises(BadSampleError, match="outside the decoded 30x20 image"):
            ds.load(i)


def test_no_reader_function_is_over_80_lines():
    tree = ast.parse(Path(readers.__file__).read_text())
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long


def test_reading_safeguards_at_their_defaults_leave_config_dumps_and_keys_as_before():
    """A source that does not set max_image_pixels / allow_outside_root dumps (and so keys its runs)
    as before the fields existed; a set value is dumped and read back."""
    s = SourceConfig(name="s", task="cls", dataset="mnist")
    assert "max_image_pixels" not in s.model_dump() and "allow_outside_root" not in s.model_dump_json()
    t = SourceConfig(name="s", task="cls", dataset="mnist", max_image_pixels=10, allow_outside_root=True)
    back = SourceConfig.model_validate(t.model_dump(mode="json"))
    assert back.max_image_pixels == 10 and back.allow_outside_root is True


def test_coco_val_file_with_other_categories_than_train_is_refused(tmp_path):
    """Classes are numbered in sorted-id order per file: a val file lacking one of train's categories
    would score class 'c' as 'b'. Refused, naming what differs; the same list reads."""
    images = two_images(tmp_path)
    anns = [{"id": 1, "image_id": 0, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    train = coco_file(tmp_path, images, anns, cats)
    val = tmp_path / "val.json"
    val.write_text(json.dumps({"images": images, "annotations": anns, "categories": [cats[0], cats[2]]}))
    c = cfg(**train, val_annotations=val)
    with pytest.raises(BadSampleError, match=r"lacks train's category ids \[2\].*same 'categories' list"):
        CocoSource(c, "val")
    val.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    assert CocoSource(c, "val").records[0].target["labels"].tolist() == [2]
