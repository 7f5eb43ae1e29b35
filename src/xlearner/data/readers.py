"""Readers for the formats a user brings; every one yields the sample schema of ``schema.py``.

Each reader is a ``torch.utils.data.Dataset`` with ``name``, ``task``, ``class_names``,
``num_classes`` and ``bad`` (a ``BadSampleLog``). Annotations are parsed and checked once
at construction (cheap: no image is decoded), so a bad box, an undeclared category or a
missing file is reported before training starts. Decoding problems (a corrupt image, a mask
with a value out of range) can only be seen when a record is read: under
``on_bad_sample: error`` they raise; under ``skip`` the record is counted in ``bad`` and the
next valid record is returned instead, so a batch never holds a wrong label.
``xlearner data check`` decodes every record up front and lists them all.

Splits: ``train`` reads ``root``/``annotations``/``masks``. ``val`` reads the ``val_*`` paths
when any is given, otherwise a deterministic ``val_fraction`` of the train records chosen by
``split_seed`` (and ``train`` then excludes them). ``test`` reads the ``test_*`` paths when
any is given, otherwise it is the same records as ``val`` (attribute ``test_is_val`` is True).
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from xlearner.config import SourceConfig
from xlearner.data.schema import IGNORE_INDEX, BadSampleError, BadSampleLog
from xlearner.files import write_atomic

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
BOX_TOLERANCE = 1.0
"""Boxes may overhang the image by up to this many pixels (rounding in annotation tools); they are clipped."""

SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------------------
# decoding


_MODES_16BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def _to_rgb8(im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of any PIL image.

    ``convert("RGB")`` clips 16-bit and 32-bit grey images to 255 (a 0..65535 ramp turns almost all
    white), so those are scaled first: 16-bit integers by ``>> 8`` (torchvision's uint16 -> uint8
    rule: the same value always maps to the same grey, whatever the image), 32-bit integers the same
    when they fit 16 bits, otherwise (and float images) from the image's own min..max. Grey, palette,
    RGBA and CMYK images go through PIL's conversion; 16-bit RGB PNGs are already reduced by PIL.
    """
    if im.mode in _MODES_16BIT or im.mode in ("I", "F"):
        a = np.asarray(im)
        if im.mode != "F" and a.size and a.min() >= 0 and a.max() <= 65535:
            grey = (a.astype(np.uint32) >> 8).astype(np.uint8)
        else:
            a = a.astype(np.float64)
            lo, hi = (float(np.nanmin(a)), float(np.nanmax(a))) if a.size else (0.0, 0.0)
            grey = np.nan_to_num((a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a))
            grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_image(path: Path) -> torch.Tensor:
    """uint8 (3, H, W); grey, palette, RGBA, CMYK and 16-bit images are converted to RGB (see ``_to_rgb8``).

    The (3, H, W) view keeps the decoder's H, W, 3 memory order (as torchvision's pil_to_tensor
    does): a transposing copy of a full image cost 40 % of a JPEG's decode-and-crop time, and the
    transforms give the same pixels either way (their output is contiguous)."""
    try:
        with Image.open(path) as im:
            arr = _to_rgb8(im)
    except FileNotFoundError:
        raise BadSampleError(f"{path}: image file is missing (restore it or remove its record)") from None
    except Exception as exc:  # PIL raises many types for truncated/corrupt files
        raise BadSampleError(
            f"{path}: cannot decode image ({type(exc).__name__}: {exc}); "
            f"re-export the file or remove its record"
        ) from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def decode_mask(path: Path) -> torch.Tensor:
    """int64 (H, W) of class indices from a single-channel (L, P, I) PNG."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "1") + _MODES_16BIT:  # 16-bit label PNGs keep their values
                raise BadSampleError(
                    f"{path}: mask has mode {im.mode}; masks must be single-channel PNGs holding "
                    f"class indices (mode L or P), 255 = ignore"
                )
            arr = np.asarray(im).astype(np.int64)
    except BadSampleError:
        raise
    except FileNotFoundError:
        raise BadSampleError(f"{path}: mask file is missing (restore it or remove the image)") from None
    except Exception as exc:
        raise BadSampleError(f"{path}: cannot decode mask ({type(exc).__name__}: {exc}); re-export it") from None
    return torch.from_numpy(arr)


def map_mask_labels(mask: torch.Tensor, cfg: SourceConfig) -> torch.Tensor:
    """The source's mask convention -> class indices: ``reduce_zero_label`` (0 -> 255, k -> k-1)
    or ``label_map`` (value -> index, unlisted values kept), as a lookup table over the mask."""
    if not cfg.reduce_zero_label and not cfg.label_map:
        return mask
    n = max(256, int(mask.max()) + 1 if mask.numel() else 0)
    lut = torch.arange(n, dtype=torch.int64)
    if cfg.reduce_zero_label:
        lut[1:] -= 1
        lut[0] = IGNORE_INDEX
        lut[IGNORE_INDEX] = IGNORE_INDEX  # a value already marked ignore stays ignore
    for k, v in (cfg.label_map or {}).items():
        if k < n:
            lut[k] = v
    return lut[mask]


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


# ---------------------------------------------------------------------------------------
# records and the shared base class


@dataclass
class Record:
    """One sample before decoding: its image file, its parsed target, where it came from."""

    image: Path
    where: str
    """Human pointer to the record: 'file.csv line 7', 'ann.json image id 3', ..."""
    target: dict[str, Any] = field(default_factory=dict)
    mask: Path | None = None
    problems: list[str] = field(default_factory=list)


def split_paths(cfg: SourceConfig, split: str) -> tuple[dict[str, Path | None], bool]:
    """Paths for a split and whether they are explicit (True) or the train paths to be split (False)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    base = {"root": cfg.root, "annotations": cfg.annotations, "masks": cfg.masks}
    if split == "train":
        return base, False
    for prefix in ((split, "val") if split == "test" else (split,)):
        given = {k: getattr(cfg, f"{prefix}_{k}") for k in base}
        if any(v is not None for v in given.values()):
            # a field not given for the split (e.g. COCO val_annotations without val_root) falls back to train's
            return {k: given[k] if given[k] is not None else base[k] for k in base}, True
    return base, False


def holdout_indices(n: int, cfg: SourceConfig) -> list[int]:
    """Deterministic val holdout of the train records: a permutation by split_seed, first ceil(n*f)."""
    if cfg.val_fraction <= 0 or n == 0:
        return []
    k = min(max(1, math.ceil(n * cfg.val_fraction)), n - 1) if n > 1 else 0
    g = torch.Generator().manual_seed(cfg.split_seed)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


class RecordSource(Dataset):
    """Shared machinery: split selection, bad-record policy, decoding with skip fallback.

    Subclasses read one file format (``_read``) and take their task's target from a decoded
    record through one of ``LabelRecords`` / ``BoxRecords`` / ``MaskRecords`` (``_target``)."""

    task: str = ""
    drops_unknown_classes = False
    """Records of classes outside the config's class_names are dropped (boxes) instead of refused."""

    def __init__(self, cfg: SourceConfig, split: str = "train"):
        self.cfg = cfg
        self.name = cfg.name
        self.split = split
        self.bad = BadSampleLog(source=cfg.name, policy=cfg.on_bad_sample)
        paths, explicit = split_paths(cfg, split)
        self.test_is_val = split == "test" and not any(
            getattr(cfg, f"test_{k}") is not None for k in ("root", "annotations", "masks"))
        records = self._read(paths)  # subclasses also set class_names
        holdout = not split_paths(cfg, "val")[1] if split == "train" else not explicit
        if holdout:
            held = set(holdout_indices(len(records), cfg))
            keep = held if split != "train" else set(range(len(records))) - held
            records = [r for i, r in enumerate(records) if i in keep]
        self.records: list[Record] = []
        for r in records:
            if r.problems:
                for p in r.problems:
                    self.bad.report(p)
            else:
                self.records.append(r)
        self.bad.track(len(self.records))  # decode failures, counted across DataLoader workers
        if not self.records:
            where = ", ".join(f"{k}={v}" for k, v in paths.items() if v is not None)
            hint = ("set val_fraction > 0 or give val_root/val_annotations"
                    if split != "train" and not explicit and cfg.val_fraction == 0 else
                    "point the config at a folder/file with records")
            skipped = f" ({self.bad.count} bad records skipped)" if self.bad.count else ""
            raise BadSampleError(f"source '{self.name}' split '{split}' is empty{skipped} ({where}); {hint}")

    # subclasses ------------------------------------------------------------------------
    def _read(self, paths: dict[str, Path | None]) -> list[Record]:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _set_class_names(self, found: list[str], where: str) -> None:
        """Class names from the config when given, else the found ones (already sorted)."""
        given = self.cfg.class_names
        self.class_names = list(given) if given else list(found)
        if given:
            unknown = [n for n in found if n not in given]
            if unknown and not self.drops_unknown_classes:
                raise BadSampleError(
                    f"{where}: classes {unknown} are not among the config's class_names {given}; "
                    f"add them to class_names or remove those records")

    # reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int) -> tuple[torch.Tensor, dict]:
        """Decode record i; raise BadSampleError on any problem, whatever the policy."""
        r = self.records[i]
        try:
            image = decode_image(r.image)
        except BadSampleError as exc:
            raise BadSampleError(f"{exc} [record: {r.where}]") from None
        return image, self._target(r, image)

    def _target(self, r: Record, image: torch.Tensor) -> dict:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        """Under skip, a record that fails to decode is counted once and the next valid one is returned.

        The count is kept in shared memory (``BadSampleLog.track``), so records skipped inside
        DataLoader worker processes reach the main process; `xlearner data check` decodes every
        record up front and reports them all.
        """
        n = len(self.records)
        for k in range(n):
            j = (i + k) % n
            if self.bad.is_failed(j):
                continue
            try:
                return self.load(j)
            except BadSampleError as exc:
                self.bad.report_record(j, str(exc))  # raises under 'error'
        raise BadSampleError(f"source '{self.name}': no record of split '{self.split}' can be decoded")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, task={self.task}, split={self.split}, "
                f"n={len(self)}, classes={self.num_classes}, skipped={self.bad.count})")


# ---------------------------------------------------------------------------------------
# classification


class LabelRecords(RecordSource):
    """Formats of image-level labels (cls)."""

    task = "cls"

    def _target(self, r, image):
        return {"label": int(r.target["label"])}


class BoxRecords(RecordSource):
    """Formats of boxes (det): boxes checked against the decoded image; COCO keeps its image id."""

    task = "det"
    drops_unknown_classes = True

    def _target(self, r, image):
        out = {"boxes": boxes_within(r, image), "labels": r.target["labels"].clone()}
        if "image_id" in r.target:  # COCO: scoring against the annotation file needs it
            out["image_id"] = r.target["image_id"]
        return out


class MaskRecords(RecordSource):
    """Formats of label masks (seg): values mapped by the source's label map and checked."""

    task = "seg"

    def _target(self, r, image):
        mask = map_mask_labels(decode_mask(r.mask), self.cfg)
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise BadSampleError(f"{r.mask}: mask is {tuple(mask.shape)} but image {r.image} is "
                                 f"{tuple(image.shape[-2:])}; re-export the mask at the image size [record: {r.where}]")
        bad = mask[(mask >= self.num_classes) & (mask != IGNORE_INDEX)]
        if bad.numel():
            raise BadSampleError(
                f"{r.mask}: mask holds value {int(bad[0])} but class_names has {self.num_classes} classes "
                f"(values must be 0..{self.num_classes - 1} or 255 = ignore); fix the mask or class_names "
                f"[record: {r.where}]")
        return {"mask": mask}


class ImageFolderSource(LabelRecords):
    """``root/<class name>/<image>``; classes are the sorted folder names."""

    def _read(self, paths):
        root = paths["root"]
        if root is None or not Path(root).is_dir():
            raise BadSampleError(f"{root}: ImageFolder root is not a folder; set root to a folder with one sub-folder per class")
        folders = sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
        self._set_class_names([p.name for p in folders], str(root))
        records = []
        for folder in folders:
            with os.scandir(folder) as it:  # DirEntry.is_file needs no stat per file (ImageNet: 1.28M)
                names = sorted(e.name for e in it if not e.name.startswith(".") and e.is_file()
                               and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
            if not names:
                records.append(Record(folder, f"class folder {folder}", problems=[
                    f"{folder}: class folder '{folder.name}' has no images (extensions "
                    f"{sorted(IMAGE_EXTENSIONS)}); add images or remove the folder"]))
                continue
            label = self.class_names.index(folder.name)
            prefix = f"{folder}{os.sep}"
            records.extend(Record(folder / n, prefix + n, {"label": label}) for n in names)
        return records


class CsvSource(LabelRecords):
    """CSV with header ``path,label``; label is a class name or an integer index.

    Paths are relative to ``root`` when given, else to the CSV's folder. Without
    ``class_names`` in the config, labels must be all integers (classes ``"0".."K-1"``) or all
    names (classes = their sorted set).
    """

    def _read(self, paths):
        path = paths["annotations"]
        base = Path(paths["root"]) if paths["root"] is not None else Path(path).parent
        try:
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
        except OSError as exc:
            raise BadSampleError(f"{path}: cannot read CSV ({exc}); check the annotations path") from None
        if not rows or [c.strip().lower() for c in rows[0][:2]] != ["path", "label"]:
            raise BadSampleError(f"{path}: line 1 must be the header 'path,label', got {rows[0] if rows else 'an empty file'}")
        entries = []  # (line, path, label text)
        records = []
        for lineno, row in enumerate(rows[1:], start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                records.append(Record(Path(path), f"{path} line {lineno}", problems=[
                    f"{path} line {lineno}: expected 'path,label', got {row}; fix or delete the line"]))
                continue
            entries.append((lineno, row[0].strip(), row[1].strip()))
        given = self.cfg.class_names
        texts = [e[2] for e in entries]
        all_int = all(_is_int(t) for t in texts)
        if given:
            self.class_names = list(given)
        elif all_int:
            k = max((int(t) for t in texts), default=-1) + 1
            self.class_names = [str(i) for i in range(k)]
        else:
            ints = [(ln, t) for ln, _, t in entries if _is_int(t)]
            if ints:
                raise BadSampleError(
                    f"{path} line {ints[0][0]}: label {ints[0][1]!r} is an integer but other labels are "
                    f"class names; use one kind, or give class_names in the config so both can be read")
            self.class_names = sorted(set(texts))
        for lineno, rel, text in entries:
            where = f"{path} line {lineno}"
            img = Path(rel) if Path(rel).is_absolute() else base / rel
            if text in self.class_names:
                label = self.class_names.index(text)
            elif _is_int(text) and 0 <= int(text) < len(self.class_names):
                label = int(text)
            else:
                records.append(Record(img, where, problems=[
                    f"{where}: label {text!r} is not a class ({self.class_names}) nor an index "
                    f"0..{len(self.class_names) - 1}; fix the label or class_names"]))
                continue
            rec = Record(img, where, {"label": label})
            if not img.is_file():
                rec.problems.append(f"{where}: image file {img} is missing; restore it or delete the line")
            records.append(rec)
        return records


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------
# detection


def _check_box(box: list[float], w: float | None, h: float | None, where: str) -> tuple[list[float] | None, str | None]:
    """xyxy box -> (clipped box, None) or (None, problem)."""
    x1, y1, x2, y2 = box
    if not all(math.isfinite(v) for v in box):
        return None, f"{where}: box {box} has a non-finite coordinate; fix the annotation"
    if x2 <= x1 or y2 <= y1:
        return None, f"{where}: box {box} (x1,y1,x2,y2) has x2 <= x1 or y2 <= y1; fix its width/height or delete it"
    if w is not None and h is not None:
        t = BOX_TOLERANCE
        if x1 < -t or y1 < -t or x2 > w + t or y2 > h + t:
            return None, f"{where}: box {box} (x1,y1,x2,y2) lies outside the {w:g}x{h:g} image; fix or delete it"
        x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))
        if x2 <= x1 or y2 <= y1:
            return None, f"{where}: box {box} has no area inside the {w:g}x{h:g} image; fix or delete it"
    return [x1, y1, x2, y2], None


def boxes_within(r: Record, image: torch.Tensor) -> torch.Tensor:
    """The record's boxes checked against the DECODED image size and clipped to it.

    Annotations may lack the image size (COCO without width/height) or state a wrong one; a box
    outside the decoded image (beyond ``BOX_TOLERANCE``) raises BadSampleError naming the record.
    """
    boxes = r.target["boxes"].clone()
    h, w = int(image.shape[-2]), int(image.shape[-1])
    t = BOX_TOLERANCE
    outside = ((boxes[:, 0] < -t) | (boxes[:, 1] < -t) | (boxes[:, 2] > w + t) | (boxes[:, 3] > h + t)
               | (boxes[:, 0] >= w) | (boxes[:, 1] >= h) | (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0))  # no area inside
    if bool(outside.any()):
        b = [round(v, 2) for v in boxes[int(outside.nonzero()[0, 0])].tolist()]
        raise BadSampleError(f"{r.where}: box {b} (x1,y1,x2,y2) lies outside the decoded {w}x{h} image "
                             f"{r.image}; fix the box (or the image size) or delete it")
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return boxes


def _det_target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


class CocoSource(BoxRecords):
    """COCO JSON: bbox xywh -> xyxy; category ids -> contiguous 0..K-1 in sorted-id order.

    ``category_ids[k]`` is the original id of contiguous class k (for reports and for results
    written against the file). Images without annotations are kept (no boxes). ``iscrowd``
    annotations are not training targets (a crowd box is no single object; detectron2 and
    mmdetection ignore them too) but stay in the file, which is what evaluation scores against:
    ``coco_file`` is this split's annotation file and every target carries its ``image_id``, so
    pycocotools sees the crowd regions, COCO's own areas and the image ids as given
    (``metrics.DetEvaluator``). Any bad annotation marks its whole image bad, so an object is
    never silently turned into background.
    """

    def _read(self, paths):
        path, root = Path(paths["annotations"]), Path(paths["root"])
        idx = coco_index(path)
        self.category_ids = idx["cat_ids"].tolist()
        names = idx["cat_names"].tolist()
        if self.cfg.class_names:
            if len(self.cfg.class_names) != len(names):
                raise BadSampleError(f"{path}: config class_names has {len(self.cfg.class_names)} names but the "
                                     f"file declares {len(names)} categories; make them match")
            names = list(self.cfg.class_names)
        self.class_names = names
        self.coco_file = path
        self.num_crowd = int(idx["num_crowd"])
        boxes, labels, offsets = torch.from_numpy(idx["boxes"]), torch.from_numpy(idx["labels"]), idx["offsets"]
        problems: dict[int, list[str]] = {}
        for i, text in zip(idx["problem_image"].tolist(), idx["problem_text"].tolist()):
            problems.setdefault(i, []).append(text)
        present = _listing(root)
        out = []
        for i, (iid, fname) in enumerate(zip(idx["img_ids"].tolist(), idx["file_names"].tolist())):
            file = root / fname
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            rec = Record(file, f"{path} image id {iid} ({fname})",
                         {"boxes": boxes[lo:hi], "labels": labels[lo:hi], "image_id": iid},
                         problems=list(problems.get(i, ())))
            if not (fname in present if present is not None and "/" not in fname else file.is_file()):
                rec.problems.insert(0, f"{rec.where}: image file {file} is missing; restore it or remove the image "
                                       f"and its annotations from the JSON")
            out.append(rec)
        for where, text in zip(idx["orphan_where"].tolist(), idx["orphan_text"].tolist()):
            out.append(Record(path, where, problems=[text]))
        return out


INDEX_VERSION = 1
INDEX_CACHE_MIN_BYTES = 16 << 20
"""Annotation files at least this large get an index cache (a COCO train file parses in ~20 s)."""


def _listing(folder: Path) -> set[str] | None:
    """Names of the files directly in ``folder`` (one directory read instead of a stat per image)."""
    try:
        with os.scandir(folder) as it:
            return {e.name for e in it if e.is_file()}
    except OSError:
        return None


def coco_index(path: Path) -> dict[str, np.ndarray]:
    """The parsed content of a COCO file as arrays, from the index cache when the file is unchanged.

    Cache: ``$XLEARNER_HOME/index/coco-<hash of the path>.npz`` (plain arrays, read with
    ``allow_pickle=False``) for files of ``INDEX_CACHE_MIN_BYTES`` or more, holding the file's size
    and mtime: an edited file (either changed) is parsed again and its entry replaced. Nothing in
    it depends on the image folder or the config.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BadSampleError(f"{path}: cannot read COCO JSON ({exc}); check the annotations path") from None
    cache = None
    key = np.array([st.st_size, st.st_mtime_ns, INDEX_VERSION], dtype=np.int64)
    if st.st_size >= INDEX_CACHE_MIN_BYTES:
        from xlearner.data.embedded import xlearner_home

        name = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:24]
        cache = xlearner_home() / "index" / f"coco-{name}.npz"
        if cache.is_file():
            try:
                with np.load(cache, allow_pickle=False) as z:
                    if np.array_equal(z["key"], key):
                        return {k: z[k] for k in z.files if k != "key"}
            except Exception:  # a damaged entry is rebuilt
                pass
    idx = _parse_coco(path)
    if cache is not None:
        def save(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a path
                np.savez(f, key=key, **idx)

        try:
            write_atomic(cache, save)
        except OSError:
            pass  # a read-only cache only costs the next open its parse
    return idx


def _float4(bbox: Any) -> list[float] | None:
    if not isinstance(bbox, list) or len(bbox) != 4:
        return None
    try:
        return [float(v) for v in bbox]
    except (TypeError, ValueError):
        return None


def _parse_coco(path: Path) -> dict[str, np.ndarray]:
    """Parse and check a COCO file (vectorised: COCO train has 860k boxes); see CocoSource."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadSampleError(f"{path}: cannot read COCO JSON ({exc}); check the annotations path") from None
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise BadSampleError(f"{path}: COCO JSON has no '{key}' list; is this a COCO detection file?")
    cats = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
    cat_ids = sorted(cats)
    contiguous = {cid: k for k, cid in enumerate(cat_ids)}
    images = {int(img["id"]): img for img in data["images"]}
    img_ids = sorted(images)
    row_of = {iid: i for i, iid in enumerate(img_ids)}
    n_img = len(img_ids)
    wh = np.array([[np.nan if images[i].get(k) is None else float(images[i][k]) for k in ("width", "height")]
                   for i in img_ids], dtype=np.float64).reshape(-1, 2)
    anns = data.get("annotations", []) or []
    del data
    n = len(anns)
    ann_row = np.fromiter((row_of.get(int(a.get("image_id", -1)), -1) for a in anns), np.int64, n)
    crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), bool, n)
    def contiguous_of(c: Any) -> int:
        try:
            return contiguous.get(c, -1)
        except TypeError:  # an unhashable category_id is simply undeclared
            return -1

    label = np.fromiter((contiguous_of(a.get("category_id")) for a in anns), np.int64, n)
    raw = [a.get("bbox") for a in anns]
    try:  # fast path: every bbox is four numbers
        xywh = np.asarray(raw, dtype=np.float64)
        if xywh.shape != (n, 4) or not all(isinstance(b, list) for b in raw):
            raise ValueError("not all [x, y, w, h]")
        shaped = np.ones(n, dtype=bool)
    except (TypeError, ValueError):
        raw = [_float4(b) for b in raw]
        shaped = np.fromiter((b is not None for b in raw), bool, n)
        xywh = np.array([b if b is not None else [np.nan] * 4 for b in raw], dtype=np.float64).reshape(-1, 4)
    del raw
    x1, y1 = xywh[:, 0], xywh[:, 1]
    x2, y2 = x1 + xywh[:, 2], y1 + xywh[:, 3]
    w, h = wh[ann_row, 0], wh[ann_row, 1]
    known = np.isfinite(w) & np.isfinite(h)
    t = BOX_TOLERANCE
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(xywh).all(1) & np.isfinite(x2) & np.isfinite(y2)
        inside = ~known | ((x1 >= -t) & (y1 >= -t) & (x2 <= w + t) & (y2 <= h + t))
        cx1, cy1 = np.where(known, np.maximum(x1, 0), x1), np.where(known, np.maximum(y1, 0), y1)
        cx2, cy2 = np.where(known, np.minimum(x2, w), x2), np.where(known, np.minimum(y2, h), y2)
        good_box = finite & (x2 > x1) & (y2 > y1) & inside & (cx2 > cx1) & (cy2 > cy1)
    orphan = ann_row < 0
    live = ~orphan & ~crowd
    keep = live & (label >= 0) & shaped & good_box
    problem_image, problem_text, orphan_where, orphan_text = [], [], [], []
    for k in np.flatnonzero(~keep & (orphan | live)).tolist():  # rare: the file's bad annotations, in order
        a = anns[k]
        where = f"{path} annotation id {a.get('id')}"
        if orphan[k]:
            orphan_where.append(where)
            orphan_text.append(f"{where}: image_id {a.get('image_id', -1)} is not in 'images'; add the image or "
                               f"delete the annotation")
            continue
        i = int(ann_row[k])
        fname = Path(str(images[img_ids[i]]["file_name"])).name
        if label[k] < 0:
            text = (f"{where} (image {fname}): category_id {a.get('category_id')} is not declared in "
                    f"'categories' (ids {cat_ids}); declare it or fix the annotation")
        elif not shaped[k]:
            text = f"{where}: bbox {a.get('bbox')!r} is not [x, y, w, h]; fix the annotation"
        else:
            size = [None if math.isnan(v) else v for v in wh[i].tolist()]
            box = [float(v[k]) for v in (x1, y1, x2, y2)]
            text = _check_box(box, *size, f"{where} (image {fname})")[1]
        problem_image.append(i)
        problem_text.append(text)
    rows = np.flatnonzero(keep)
    order = rows[np.argsort(ann_row[rows], kind="stable")]
    counts = np.bincount(ann_row[order], minlength=n_img)
    return {
        "cat_ids": np.array(cat_ids, dtype=np.int64), "cat_names": np.array([cats[c] for c in cat_ids], dtype=str),
        "img_ids": np.array(img_ids, dtype=np.int64),
        "file_names": np.array([str(images[i]["file_name"]) for i in img_ids], dtype=str),
        "boxes": np.stack([cx1, cy1, cx2, cy2], 1)[order].astype(np.float32).reshape(-1, 4),
        "labels": label[order], "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "num_crowd": np.array(int((crowd & ~orphan).sum())),
        "problem_image": np.array(problem_image, dtype=np.int64), "problem_text": np.array(problem_text, dtype=str),
        "orphan_where": np.array(orphan_where, dtype=str), "orphan_text": np.array(orphan_text, dtype=str),
    }


class VocSource(BoxRecords):
    """Folder of Pascal VOC XML files; ``<filename>`` relative to ``root``.

    Coordinates are read as given (x1,y1,x2,y2 pixel edges, no 1-based shift). Classes are the
    config's class_names when given, else the sorted set of object names found.
    """

    def _read(self, paths):
        folder, root = Path(paths["annotations"]), Path(paths["root"])
        if not folder.is_dir():
            raise BadSampleError(f"{folder}: VOC annotations must be a folder of .xml files")
        parsed = []
        records = []
        for xml in sorted(folder.glob("*.xml")):
            try:
                tree = ET.parse(xml).getroot()
                filename = tree.findtext("filename")
                if not filename:
                    raise ValueError("no <filename>")
                size = tree.find("size")
                w = float(size.findtext("width")) if size is not None and size.findtext("width") else None
                h = float(size.findtext("height")) if size is not None and size.findtext("height") else None
                objs = []
                for i, obj in enumerate(tree.findall("object")):
                    bb = obj.find("bndbox")
                    objs.append((obj.findtext("name", "").strip(),
                                 [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]))
            except Exception as exc:
                records.append(Record(xml, str(xml), problems=[
                    f"{xml}: cannot parse VOC XML ({type(exc).__name__}: {exc}); fix or delete the file"]))
                continue
            parsed.append((xml, root / filename, w, h, objs))
        found = sorted({name for *_, objs in parsed for name, _ in objs})
        self._set_class_names(found, str(folder))
        for xml, img, w, h, objs in parsed:
            rec = Record(img, str(xml))
            boxes, labels = [], []
            if not img.is_file():
                rec.problems.append(f"{xml}: image file {img} (<filename>) is missing; restore it or delete the XML")
            for i, (name, box) in enumerate(objs):
                where = f"{xml} object {i} ({name})"
                if name not in self.class_names:
                    rec.problems.append(f"{where}: class '{name}' is not in class_names {self.class_names}; "
                                        f"add it to class_names or fix the name")
                    continue
                box, problem = _check_box(box, w, h, where)
                if problem:
                    rec.problems.append(problem)
                    continue
                boxes.append(box)
                labels.append(self.class_names.index(name))
            rec.target = _det_target(boxes, labels)
            records.append(rec)
        return records


# ---------------------------------------------------------------------------------------
# segmentation


class MaskFolderSource(MaskRecords):
    """Image folder + folder of PNG masks matched by file stem; mask values are class indices, 255 = ignore."""

    def _read(self, paths):
        root, masks = Path(paths["root"]), Path(paths["masks"])
        for p, what in ((root, "root (images)"), (masks, "masks")):
            if not p.is_dir():
                raise BadSampleError(f"{p}: {what} is not a folder")
        if not self.cfg.class_names:
            raise BadSampleError(f"source '{self.name}': maskfolder needs class_names (names of mask values 0..K-1)")
        self.class_names = list(self.cfg.class_names)
        by_stem = {p.stem: p for p in masks.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
        records = []
        for img in sorted(p for p in root.iterdir() if _is_image(p)):
            rec = Record(img, str(img), mask=by_stem.get(img.stem))
            if rec.mask is None:
                rec.problems.append(f"{img}: no mask {masks / (img.stem + '.png')} for this image; add the mask "
                                    f"or remove the image")
            records.append(rec)
        return records


READERS: dict[str, type[RecordSource]] = {
    "imagefolder": ImageFolderSource,
    "csv": CsvSource,
    "coco": CocoSource,
    "voc": VocSource,
    "maskfolder": MaskFolderSource,
}
