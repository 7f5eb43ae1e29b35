"""Bad-input cases of the fault trials, shared by tests/test_faults.py and benchmarks/faults.py.

Each case writes a tiny data set into a folder and returns a ``Case``: the source (as the dict of
one item of ``sources``), the error it must raise (a regex naming file, record and fix), how many
records ``on_bad_sample: skip`` must skip, and the fill value of the bad records' pixels so a test
can check that nothing trained on them. Good images are filled with values < 100; bad ones with
``BAD`` (or they cannot be decoded at all).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

BAD = 201
"""Pixel value of an image whose record is bad but decodable (box outside it, wrong mask)."""
SIZE = 16


@dataclass
class Case:
    name: str
    source: dict
    error: str | None
    """Regex the error must match under on_bad_sample: error (None: the data is fine)."""
    skipped: int | None
    """Records skipped under skip; None: the source cannot be used at all (error under both policies)."""
    when: str = "open"
    """'open': found when the source is opened (annotations); 'decode': when the record is read."""
    check: Callable | None = None
    """For good data read specially (grey, RGBA, CMYK, 16-bit): check(image, target) -> None."""
    extra: dict = field(default_factory=dict)


def png(path: Path, value: int = 40, h: int = SIZE, w: int = SIZE, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)
    return path


def _cls_folder(root: Path, n: int = 3) -> Path:
    for c, k in (("a", 0), ("b", 1)):
        for i in range(n):
            png(root / c / f"{i}.png", value=10 + 20 * k + i)
    return root


def _cls(root: Path, **kw) -> dict:
    return {"name": "src", "task": "cls", "format": "imagefolder", "root": str(root), "val_fraction": 0.0,
            "batch_size": 2, **kw}


def _coco(root: Path, boxes: dict, sizes: bool = True, cats=({"id": 1, "name": "thing"},), n: int = 4,
          cat_of: dict | None = None) -> dict:
    """n images; ``boxes[i]`` = xywh of image i's one object (default [2, 2, 6, 6]); bad ones filled BAD."""
    images, anns = [], []
    for i in range(n):
        bad = i in boxes
        png(root / "img" / f"{i}.png", value=BAD if bad else 30 + i)
        im = {"id": i, "file_name": f"{i}.png"}
        if sizes:
            im.update(width=SIZE, height=SIZE)
        images.append(im)
        anns.append({"id": 100 + i, "image_id": i, "category_id": (cat_of or {}).get(i, 1),
                     "bbox": boxes.get(i, [2, 2, 6, 6]), "iscrowd": 0, "area": 36})
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": list(cats)}))
    return {"name": "src", "task": "det", "format": "coco", "root": str(root / "img"),
            "annotations": str(root / "ann.json"), "val_fraction": 0.0, "batch_size": 2}


def _seg(root: Path, n: int = 4, bad: dict | None = None) -> dict:
    """n image/mask pairs; ``bad[i]`` = a mask array replacing pair i's (its image filled BAD)."""
    for i in range(n):
        is_bad = i in (bad or {})
        png(root / "img" / f"{i}.png", value=BAD if is_bad else 30 + i)
        m = (bad or {}).get(i)
        if m is None:
            m = np.zeros((SIZE, SIZE), np.uint8)
            m[4:10, 4:10] = 1
        (root / "mask").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(root / "mask" / f"{i}.png")
    return {"name": "src", "task": "seg", "format": "maskfolder", "root": str(root / "img"),
            "masks": str(root / "mask"), "class_names": ["bg", "fg"], "val_fraction": 0.0, "batch_size": 2}


# ------------------------------------------------------------------------------ the cases

def truncated_jpeg(root: Path) -> Case:
    _cls_folder(root)
    Image.fromarray(np.full((64, 64, 3), BAD, np.uint8)).save(root / "a" / "cut.jpg", quality=95)
    data = (root / "a" / "cut.jpg").read_bytes()
    (root / "a" / "cut.jpg").write_bytes(data[: len(data) // 2])
    return Case("truncated JPEG", _cls(root), r"a[/\\]cut\.jpg: cannot decode image.*re-export the file", 1, "decode")


def text_named_png(root: Path) -> Case:
    _cls_folder(root)
    (root / "b" / "notes.png").write_text("this is a text file, not an image\n")
    return Case("text file named .png", _cls(root), r"b[/\\]notes\.png: cannot decode image.*remove its record",
                1, "decode")


def missing_file(root: Path) -> Case:
    png(root / "ok0.png", 10)
    png(root / "ok1.png", 20)
    (root / "labels.csv").write_text("path,label\nok0.png,cat\ngone.png,dog\nok1.png,dog\n")
    src = {"name": "src", "task": "cls", "format": "csv", "annotations": str(root / "labels.csv"),
           "val_fraction": 0.0, "batch_size": 2}
    return Case("missing image file", src, r"labels\.csv line 3: image file .*gone\.png is missing; restore it", 1)


def box_nonpositive(root: Path) -> Case:
    return Case("box with w <= 0", _coco(root, {1: [3, 3, 0, 5]}),
                r"ann\.json annotation id 101 \(image 1\.png\).*x2 <= x1.*fix its width/height or delete it", 1)


def box_outside_sized(root: Path) -> Case:
    return Case("box outside the image (COCO width/height given)", _coco(root, {2: [10, 10, 20, 4]}),
                r"ann\.json annotation id 102 \(image 2\.png\).*outside the 16x16 image; fix or delete it", 1)


def box_outside_unsized(root: Path) -> Case:
    return Case("box outside the image (no COCO width/height)", _coco(root, {2: [10, 10, 20, 4]}, sizes=False),
                r"ann\.json image id 2 \(2\.png\): box .* outside the decoded 16x16 image .*fix the box", 1, "decode")


def undeclared_category(root: Path) -> Case:
    return Case("undeclared category", _coco(root, {3: [2, 2, 5, 5]}, cat_of={3: 9}),
                r"annotation id 103 \(image 3\.png\): category_id 9 is not declared.*declare it or fix", 1)


def malformed_coco(root: Path) -> Case:
    src = _coco(root, {})
    Path(src["annotations"]).write_text('{"images": [{"id": 0, "file_name": "0.png"}, ')
    return Case("malformed COCO JSON", src, r"ann\.json: cannot read COCO JSON.*check the annotations path", None)


def mask_out_of_range(root: Path) -> Case:
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[2:6, 2:6] = 7
    return Case("mask value out of range", _seg(root, bad={1: m}),
                r"mask[/\\]1\.png: mask holds value 7 but class_names has 2 classes.*fix the mask or class_names",
                1, "decode")


def mask_wrong_size(root: Path) -> Case:
    return Case("mask size differs from the image", _seg(root, bad={2: np.zeros((SIZE, SIZE + 4), np.uint8)}),
                r"mask[/\\]2\.png: mask is \(16, 20\) but image .*2\.png is \(16, 16\); re-export the mask", 1,
                "decode")


def empty_class_folder(root: Path) -> Case:
    _cls_folder(root)
    (root / "c").mkdir()
    return Case("empty class folder", _cls(root), r"class folder 'c' has no images.*add images or remove the folder",
                1)


def empty_source(root: Path) -> Case:
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text("path,label\n")
    src = {"name": "src", "task": "cls", "format": "csv", "annotations": str(root / "labels.csv"),
           "val_fraction": 0.0, "batch_size": 2}
    return Case("empty source", src, r"source 'src' split 'train' is empty.*point the config at", None)


def _mixed_modes(root: Path) -> dict:
    """Four classes of four images each in one mode: L (grey), RGBA, CMYK (JPEG), 16-bit grey."""
    ramp16 = np.tile(np.linspace(0, 65535, SIZE).astype(np.uint16), (SIZE, 1))
    for i in range(4):
        (root / "grey").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((SIZE, SIZE), 60 + i, np.uint8)).save(root / "grey" / f"{i}.png")
        (root / "rgba").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.dstack([np.full((SIZE, SIZE), v, np.uint8) for v in (10, 20, 30, 0)]), "RGBA").save(
            root / "rgba" / f"{i}.png")
        (root / "cmyk").mkdir(parents=True, exist_ok=True)
        Image.new("CMYK", (SIZE, SIZE), (0, 255, 255, 0)).save(root / "cmyk" / f"{i}.jpg", quality=100)
        (root / "u16").mkdir(parents=True, exist_ok=True)
        Image.fromarray(ramp16).save(root / "u16" / f"{i}.png")
    return _cls(root)


def image_modes(root: Path) -> Case:
    def check(image, target):
        assert image.dtype.is_floating_point is False and tuple(image.shape) == (3, SIZE, SIZE)
        label = target["label"]  # classes sorted: cmyk, grey, rgba, u16
        if label == 0:  # CMYK (0, 255, 255, 0) is red
            assert image[0].float().mean() > 240 and image[1:].float().mean() < 15, image[:, 0, 0]
        elif label == 1:
            assert 60 <= int(image[0, 0, 0]) <= 63 and bool((image[0] == image[1]).all())
        elif label == 2:
            assert image[:, 0, 0].tolist() == [10, 20, 30]
        else:  # a 0..65535 ramp stays a ramp: 0 at the left, 255 at the right, half the pixels below 128
            row = image[0, 0].tolist()
            assert row[0] == 0 and row[-1] == 255 and row == sorted(row), row
            assert 0.4 < float((image[0] < 128).float().mean()) < 0.6
    return Case("grey / RGBA / CMYK / 16-bit images", _mixed_modes(root), None, 0, check=check)


def mask_16bit(root: Path) -> Case:
    """A 16-bit label PNG keeps its values (here 300 classes; value 299 must stay 299)."""
    for i in range(2):
        png(root / "img" / f"{i}.png", value=30 + i)
        m = np.zeros((SIZE, SIZE), np.uint16)
        m[0, 0], m[1, 1], m[2, 2] = 299, 255, 256
        (root / "mask").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(root / "mask" / f"{i}.png")
    src = {"name": "src", "task": "seg", "format": "maskfolder", "root": str(root / "img"),
           "masks": str(root / "mask"), "class_names": [f"c{k}" for k in range(300)], "val_fraction": 0.0,
           "batch_size": 2}

    def check(image, target):
        m = target["mask"]
        assert int(m[0, 0]) == 299 and int(m[1, 1]) == 255 and int(m[2, 2]) == 256, m[:3, :3]
    return Case("16-bit label mask", src, None, 0, check=check)


DATA_CASES = [truncated_jpeg, text_named_png, missing_file, box_nonpositive, box_outside_sized, box_outside_unsized,
              undeclared_category, malformed_coco, mask_out_of_range, mask_wrong_size, empty_class_folder,
              empty_source, image_modes, mask_16bit]


def write_source_yaml(case: Case, path: Path, policy: str = "error") -> Path:
    import yaml

    path.write_text(yaml.safe_dump({**case.source, "on_bad_sample": policy}))
    return path


# ------------------------------------------------------------------------------ config and weights cases

TINY_BACKBONE = {"name": "resnet18", "kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}}


def run_config(source: dict, policy: str = "error", steps: int = 2, **extra) -> dict:
    """A tiny training config around one source (16 px images, a narrow ResNet-18)."""
    cfg = {"name": "fault", "seed": 0, "image_size": SIZE, "fpn_channels": 32, "backbone": dict(TINY_BACKBONE),
           "augment": {"cls": {"random_resized_crop": None}, "det": {"hflip": False},
                       "seg": {"random_resized_crop": None, "hflip": False}},
           "sources": [{**source, "on_bad_sample": policy}],
           "train": {"steps": steps, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "ckpt_every": 1000,
                     "val_batches": 1, "progress": False, "num_workers": 0}}
    for key, value in extra.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def config_cases(root: Path) -> list[tuple[str, Path, str]]:
    """(case, YAML path, regex of the error) for config mistakes; `train` must exit 2 on each."""
    import yaml

    src = _cls(_cls_folder(root / "data"))
    out = []

    def write(name: str, data) -> Path:
        p = root / f"{name}.yaml"
        p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return p

    bad = run_config(src)
    bad["train"]["stpes"] = 3
    out.append(("unknown key", write("unknown", bad), r"unknown key 'train\.stpes'.*did you mean 'steps'"))
    bad = run_config(src)
    bad["train"]["steps"] = "many"
    out.append(("wrong type", write("wrongtype", bad), r"train\.steps.*integer"))
    bad = run_config({**src, "root": str(root / "nowhere")})
    out.append(("missing path", write("missing", bad), r"nowhere.*does not exist"))
    out.append(("malformed YAML", write("malformed", "name: x\nsources: [\n  - {name: a\n"), r"is not valid YAML"))
    return out


def malicious_pickle(path: Path) -> Path:
    """A .pth whose unpickling would run a shell command (it writes ``path.with_suffix('.pwned')``)."""
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {path.with_suffix('.pwned')}",)

    path.write_bytes(pickle.dumps({"conv1.weight": Evil()}, protocol=2))
    return path


def unmatched_weights(path: Path) -> Path:
    """A .safetensors of 3 tensors under key names no backbone has."""
    import torch
    from safetensors.torch import save_file

    save_file({f"encoder.block{i}.weight": torch.zeros(4, 4) for i in range(3)}, str(path))
    return path
