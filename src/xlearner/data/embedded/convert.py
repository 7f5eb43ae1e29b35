"""Converters: the extracted package files of each dataset to .npy splits (and the textures skimage ships)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from xlearner.data.embedded.catalog import (_FM, ANIMAL_CLASSES, NUCLEI_TILE, SPLITS, TEXTURE_NAMES, TEXTURE_PATCH,
                                            TREE_TILE, EmbeddedDataError)
from xlearner.data.embedded.safety import restricted_loads

def _stratified_split(labels: np.ndarray, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic per-class split of indices into train/val/test."""
    rng = np.random.default_rng(seed)
    parts = {s: [] for s in SPLITS}
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_tr = int(round(len(idx) * fractions[0]))
        n_va = int(round(len(idx) * fractions[1]))
        parts["train"].append(idx[:n_tr])
        parts["val"].append(idx[n_tr:n_tr + n_va])
        parts["test"].append(idx[n_tr + n_va:])
    return {s: np.sort(np.concatenate(v)) for s, v in parts.items()}


def _save_cls(out: Path, images: np.ndarray, labels: np.ndarray, split_idx: dict[str, np.ndarray]) -> dict:
    counts = {}
    for s, idx in split_idx.items():
        np.save(out / f"{s}_images.npy", np.ascontiguousarray(images[idx]).astype(np.uint8))
        np.save(out / f"{s}_labels.npy", labels[idx].astype(np.int64))
        counts[s] = int(len(idx))
    return counts


def _idx(path: Path, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint8, offset=offset)


def _convert_fashion(files: dict[str, Path], out: Path) -> dict:
    tr_x = _idx(files[_FM + "train-images-idx3-ubyte.gz"], 16).reshape(-1, 28, 28)
    tr_y = _idx(files[_FM + "train-labels-idx1-ubyte.gz"], 8).astype(np.int64)
    te_x = _idx(files[_FM + "t10k-images-idx3-ubyte.gz"], 16).reshape(-1, 28, 28)
    te_y = _idx(files[_FM + "t10k-labels-idx1-ubyte.gz"], 8).astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(tr_x))
    counts = _save_cls(out, tr_x, tr_y, {"train": np.sort(perm[:55000]), "val": np.sort(perm[55000:])})
    counts.update(_save_cls(out, te_x, te_y, {"test": np.arange(len(te_x))}))
    return counts


def _convert_mnist(files: dict[str, Path], out: Path) -> dict:
    xs, ys = [], []
    for d in range(10):
        flat = np.asarray(json.loads(files[f"package/src/digits/{d}.json"].read_text())["data"], dtype=np.float32)
        x = np.clip(np.round(flat.reshape(-1, 28, 28) * 255.0), 0, 255).astype(np.uint8)
        xs.append(x)
        ys.append(np.full(len(x), d, dtype=np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    return _save_cls(out, x, y, _stratified_split(y))


def _convert_animal(files: dict[str, Path], out: Path) -> dict:
    root = "animal_mnist/data/Animal_MNIST/"
    x = restricted_loads(gzip.decompress(files[root + "animal_data_version_3.gz"].read_bytes()))
    y = restricted_loads(gzip.decompress(files[root + "animal_label_version_3.gz"].read_bytes()))
    x, y = np.asarray(x, dtype=np.uint8).reshape(-1, 28, 28), np.asarray(y, dtype=np.int64).reshape(-1)
    if len(x) != len(y) or y.min() < 0 or y.max() >= len(ANIMAL_CLASSES):
        raise EmbeddedDataError(f"animal_mnist: unexpected contents ({len(x)} images, labels {y.min()}..{y.max()})")
    return _save_cls(out, x, y, _stratified_split(y))


def _convert_sklearn_digits(out: Path) -> dict:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    y = d.target.astype(np.int64)
    return _save_cls(out, x, y, _stratified_split(y))


def texture_images() -> dict[str, np.ndarray]:
    """The three skimage textures (512x512 grey), bundled with scikit-image (no download)."""
    import skimage.data
    return {n: np.asarray(getattr(skimage.data, n)(), dtype=np.uint8) for n in TEXTURE_NAMES}


def texture_half(image: np.ndarray, half: str) -> np.ndarray:
    """TOP half feeds upstream backgrounds; BOTTOM half feeds all downstream uses."""
    h = image.shape[0] // 2
    return image[:h] if half == "top" else image[h:]


def _convert_textures(out: Path) -> dict:
    # the bottom half (256 x 512) is cut into column bands: train 0-352, val 352-432, test 432-512
    bands = {"train": (0, 352), "val": (352, 432), "test": (432, 512)}
    strides = {"train": 16, "val": 16, "test": 16}
    p = TEXTURE_PATCH
    xs = {s: [] for s in SPLITS}
    ys = {s: [] for s in SPLITS}
    for k, (name, img) in enumerate(texture_images().items()):
        bottom = texture_half(img, "bottom")
        for s, (c0, c1) in bands.items():
            for y in range(0, bottom.shape[0] - p + 1, strides[s]):
                for x in range(c0, c1 - p + 1, strides[s]):
                    xs[s].append(bottom[y:y + p, x:x + p])
                    ys[s].append(k)
    counts = {}
    for s in SPLITS:
        np.save(out / f"{s}_images.npy", np.stack(xs[s]).astype(np.uint8))
        np.save(out / f"{s}_labels.npy", np.asarray(ys[s], dtype=np.int64))
        counts[s] = len(ys[s])
    return counts


def _voc_boxes(xml_path: Path) -> np.ndarray:
    import xml.etree.ElementTree as ET
    boxes = []
    for obj in ET.parse(xml_path).getroot().iter("object"):
        bb = obj.find("bndbox")
        boxes.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def tile_boxes(boxes: np.ndarray, x0: int, y0: int, tile: int,
               min_side: float = 4.0, min_kept: float = 0.4) -> np.ndarray:
    """Boxes of one tile: clipped to it, shifted to tile pixels; remnants (< min_side px a side,
    or < min_kept of the original area) dropped."""
    if not len(boxes):
        return boxes.reshape(0, 4)
    c = boxes.copy()
    c[:, [0, 2]] = np.clip(c[:, [0, 2]] - x0, 0, tile)
    c[:, [1, 3]] = np.clip(c[:, [1, 3]] - y0, 0, tile)
    w, h = c[:, 2] - c[:, 0], c[:, 3] - c[:, 1]
    area0 = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = (w >= min_side) & (h >= min_side) & (w * h >= min_kept * np.maximum(area0, 1e-6))
    return c[keep]


# which image regions feed which split (disjoint): (stem, split, row range as fractions)
TREE_REGIONS = [
    ("2019_YELL_2_528000_4978000_image_crop2", "train", (0.0, 1.0)),
    ("OSBS_029", "train", (0.0, 1.0)),
    ("SOAP_061", "val", (0.0, 1.0)),
    ("2019_YELL_2_541000_4977000_image_crop", "val", (0.0, 0.5)),
    ("2019_YELL_2_541000_4977000_image_crop", "test", (0.5, 1.0)),
]


def _convert_trees(files: dict[str, Path], out: Path) -> dict:
    from PIL import Image
    t = TREE_TILE
    tiles = {s: [] for s in SPLITS}
    tile_boxes_ = {s: [] for s in SPLITS}
    origins = {s: [] for s in SPLITS}
    for stem, split, (f0, f1) in TREE_REGIONS:
        img = np.asarray(Image.open(files[f"deepforest/data/{stem}.png"]).convert("RGB"))
        boxes = _voc_boxes(files[f"deepforest/data/{stem}.xml"])
        r0, r1 = int(round(f0 * img.shape[0])), int(round(f1 * img.shape[0]))
        for y in range(r0, r1 - t + 1, t):
            for x in range(0, img.shape[1] - t + 1, t):
                tiles[split].append(img[y:y + t, x:x + t])
                tile_boxes_[split].append(tile_boxes(boxes, x, y, t).tolist())
                origins[split].append([stem, x, y])
    counts = {}
    for s in SPLITS:
        np.save(out / f"{s}_images.npy", np.stack(tiles[s]).astype(np.uint8))
        (out / f"{s}_boxes.json").write_text(json.dumps({"tile": t, "boxes": tile_boxes_[s], "origin": origins[s]}))
        counts[s] = len(tiles[s])
    return counts


NUCLEI_BANDS = {"train": (0, 384, 32), "val": (384, 448, 64), "test": (448, 512, 64)}
"""Row bands (start, stop, stride) of the 512x512 image: tiles never cross a band edge."""


def _convert_nuclei(files: dict[str, Path], out: Path) -> dict:
    import tifffile
    img = tifffile.imread(files["stardist/data/images/img2d.tif"]).astype(np.float32)
    inst = tifffile.imread(files["stardist/data/images/mask2d.tif"])
    lo, hi = np.percentile(img, 1.0), np.percentile(img, 99.8)
    img8 = np.clip((img - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255).astype(np.uint8)
    sem = (inst > 0).astype(np.uint8)
    t = NUCLEI_TILE
    counts = {}
    for s, (r0, r1, stride) in NUCLEI_BANDS.items():
        ims, ms, origin = [], [], []
        for y in range(r0, r1 - t + 1, stride):
            for x in range(0, img8.shape[1] - t + 1, stride):
                ims.append(img8[y:y + t, x:x + t])
                ms.append(sem[y:y + t, x:x + t])
                origin.append([x, y])
        np.save(out / f"{s}_images.npy", np.stack(ims))
        np.save(out / f"{s}_masks.npy", np.stack(ms))
        np.save(out / f"{s}_origin.npy", np.asarray(origin, dtype=np.int64))
        counts[s] = len(ims)
    return counts


_CONVERT = {"fashion_mnist": _convert_fashion, "mnist": _convert_mnist, "animal_mnist": _convert_animal,
            "tree_crowns": _convert_trees, "nuclei": _convert_nuclei}
_LOCAL = {"sklearn_digits": _convert_sklearn_digits, "textures": _convert_textures}
