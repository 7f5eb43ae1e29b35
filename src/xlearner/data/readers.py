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
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset

from xlearner.config import MAX_IMAGE_PIXELS, SourceConfig
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


def _open_checked(path: Path | BinaryIO, max_pixels: int, shown: Any = None) -> Image.Image:
    """``Image.open`` (lazy: nothing decoded yet) refusing an image of more than ``max_pixels``.

    PIL's own bomb check (a warning above ``Image.MAX_IMAGE_PIXELS``, an error above twice that)
    is raised to a larger configured limit, so the source's ``max_image_pixels`` is the one rule.
    ``shown`` names the file in messages (a shard member read from memory has no path of its own)."""
    shown = path if shown is None else shown
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as exc:  # over twice the limit: PIL refuses to open it
        raise BadSampleError(_too_many_pixels(shown, str(exc).split(" exceeds")[0], max_pixels)) from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise BadSampleError(_too_many_pixels(shown, f"image is {w}x{h} = {w * h:,} pixels, "
                                                    f"{w * h * 3 / 1e6:,.0f} MB decoded", max_pixels))
    return im


def _too_many_pixels(path: Any, size: str, max_pixels: int) -> str:
    return (f"{path}: {size}, over this source's max_image_pixels ({max_pixels:,}); downscale the image, "
            f"or raise max_image_pixels in the source's config if it is meant")


def _upright(im: Image.Image) -> Image.Image:
    """The image as it is displayed: its EXIF orientation applied (``PIL.ImageOps.exif_transpose``).

    Boxes and masks are taken to be given in this displayed frame, as COCO's tools and annotation
    tools draw them. An image without an orientation tag (or with 1, upright) is returned untouched."""
    if im.getexif().get(ExifTags.Base.Orientation, 1) in (1, None):
        return im
    return ImageOps.exif_transpose(im)


def decode_image(path: Path | BinaryIO, max_pixels: int = MAX_IMAGE_PIXELS, name: Any = None) -> torch.Tensor:
    """uint8 (3, H, W) as displayed (EXIF orientation applied, see ``_upright``); grey, palette, RGBA,
    CMYK and 16-bit images are converted to RGB (see ``_to_rgb8``); an image of more than
    ``max_pixels`` is refused before it is decoded.

    The (3, H, W) view keeps the decoder's H, W, 3 memory order (as torchvision's pil_to_tensor
    does): a transposing copy of a full image cost 40 % of a JPEG's decode-and-crop time, and the
    transforms give the same pixels either way (their output is contiguous)."""
    shown = path if name is None else name  # a shard member is named by its shard and key
    try:
        with _open_checked(path, max_pixels, shown) as im:
            arr = _to_rgb8(_upright(im))
    except BadSampleError:
        raise
    except FileNotFoundError:
        raise BadSampleError(f"{shown}: image file is missing (restore it or remove its record)") from None
    except Exception as exc:  # PIL raises many types for truncated/corrupt files
        raise BadSampleError(
            f"{shown}: cannot decode image ({type(exc).__name__}: {exc}); "
            f"re-export the file or remove its record"
        ) from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def decode_mask(path: Path | BinaryIO, max_pixels: int = MAX_IMAGE_PIXELS, name: Any = None) -> torch.Tensor:
    """int64 (H, W) of class indices from a single-channel (L, P, I) PNG, as displayed (``_upright``)."""
    shown = path if name is None else name  # a shard member is named by its shard and key
    try:
        with _open_checked(path, max_pixels, shown) as im:
            if im.mode not in ("L", "P", "I", "1") + _MODES_16BIT:  # 16-bit label PNGs keep their values
                raise BadSampleError(
                    f"{shown}: mask has mode {im.mode}; masks must be single-channel PNGs holding "
                    f"class indices (mode L or P), 255 = ignore"
                )
            arr = np.asarray(_upright(im)).astype(np.int64)
    except BadSampleError:
        raise
    except FileNotFoundError:
        raise BadSampleError(f"{shown}: mask file is missing (restore it or remove the image)") from None
    except Exception as exc:
        raise BadSampleError(f"{shown}: cannot decode mask ({type(exc).__name__}: {exc}); re-export it") from None
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
        self.explicit = explicit
        """This split reads its own files (``val_*``/``test_*``), numbered by train's classes."""
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
            first = "".join(f"\n  skipped: {m}" for m in self.bad.skipped[:3])  # why, without a second run
            raise BadSampleError(f"source '{self.name}' split '{split}' is empty{skipped} ({where}); {hint}{first}")

    # subclasses ------------------------------------------------------------------------
    def _read(self, paths: dict[str, Path | None]) -> list[Record]:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _classes_in(self, paths: dict[str, Path | None]) -> list[str]:
        """The sorted class names found in the files at ``paths`` (what train would number)."""
        raise NotImplementedError

    @property
    def classes_from(self) -> str:
        """Where ``class_names`` come from, for messages."""
        if self.cfg.class_names:
            return "the config's class_names"
        return "train's classes" if self.explicit else "class_names"

    def _set_class_names(self, found: list[str], where: str) -> None:
        """Class names from the config when given, else train's: the found ones (already sorted) on
        train, the train files' on a split with its own files, so every split numbers a class alike."""
        given = self.cfg.class_names
        if given:
            names = list(given)
        elif self.explicit:
            names = self._classes_in(split_paths(self.cfg, "train")[0])
        else:
            names = list(found)
        self.class_names = names
        unknown = [n for n in found if n not in names]
        if unknown and not self.drops_unknown_classes:
            fix = ("add them to class_names or remove those records" if given else
                   "add their images to train, remove those records, or give class_names in the config")
            raise BadSampleError(f"{where}: classes {unknown} are not among {self.classes_from} {names}; {fix}")

    # reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int) -> tuple[torch.Tensor, dict]:
        """Decode record i; raise BadSampleError on any problem, whatever the policy."""
        r = self.records[i]
        try:
            image = decode_image(r.image, self.cfg.max_image_pixels)
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

    def _outside_root(self, root: Path, rel: str) -> str | None:
        """Why ``root / rel`` lies outside ``root`` (an absolute path, a ``..`` or a symlink leading
        out of it), or None when it is inside or the source allows it (``allow_outside_root``)."""
        if self.cfg.allow_outside_root:
            return None
        if os.path.isabs(rel):
            return f"{rel!r} is an absolute path, outside root {root}"
        real_root = os.path.realpath(root)
        real = os.path.realpath(os.path.join(root, rel))
        if os.path.commonpath([real_root, real]) != real_root:
            how = "climbs out of" if ".." in Path(rel).parts else "is a symlink (or inside one) that leads out of"
            return f"{rel!r} {how} root {root} (to {real})"
        return None

    def _target(self, r, image):
        out = {"boxes": boxes_within(r, image), "labels": r.target["labels"].clone()}
        if "image_id" in r.target:  # COCO: scoring against the annotation file needs it
            out["image_id"] = r.target["image_id"]
        return out


class MaskRecords(RecordSource):
    """Formats of label masks (seg): values mapped by the source's label map and checked."""

    task = "seg"

    def _target(self, r, image):
        mask = map_mask_labels(decode_mask(r.mask, self.cfg.max_image_pixels), self.cfg)
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

    @staticmethod
    def _class_folders(root: Path | None) -> list[Path]:
        if root is None or not Path(root).is_dir():
            raise BadSampleError(f"{root}: ImageFolder root is not a folder; set root to a folder with one sub-folder per class")
        return sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))

    def _classes_in(self, paths):
        return [p.name for p in self._class_folders(paths["root"])]

    def _read(self, paths):
        root = paths["root"]
        folders = self._class_folders(root)
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

    @staticmethod
    def _rows(path: Path) -> tuple[list[tuple[int, str, str]], list[Record]]:
        """(line, path, label text) of each data line, and a problem record for each malformed line."""
        try:  # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is no part of the header
            with open(path, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.reader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise BadSampleError(f"{path}: cannot read CSV ({exc}); check the annotations path and save "
                                 f"the file as UTF-8 text") from None
        if not rows or [c.strip().lower() for c in rows[0][:2]] != ["path", "label"]:
            raise BadSampleError(f"{path}: line 1 must be the header 'path,label', got {rows[0] if rows else 'an empty file'}")
        entries, records = [], []
        for lineno, row in enumerate(rows[1:], start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                records.append(Record(Path(path), f"{path} line {lineno}", problems=[
                    f"{path} line {lineno}: expected 'path,label', got {row}; fix or delete the line"]))
                continue
            entries.append((lineno, row[0].strip(), row[1].strip()))
        return entries, records

    @staticmethod
    def _found_classes(entries: list[tuple[int, str, str]], path: Path) -> list[str]:
        """``"0".."K-1"`` when every label is an integer, else the sorted label names."""
        texts = [e[2] for e in entries]
        if all(_is_int(t) for t in texts):
            return [str(i) for i in range(max((int(t) for t in texts), default=-1) + 1)]
        ints = [(ln, t) for ln, _, t in entries if _is_int(t)]
        if ints:
            raise BadSampleError(
                f"{path} line {ints[0][0]}: label {ints[0][1]!r} is an integer but other labels are "
                f"class names; use one kind, or give class_names in the config so both can be read")
        return sorted(set(texts))

    def _classes_in(self, paths):
        return self._found_classes(self._rows(paths["annotations"])[0], paths["annotations"])

    def _read(self, paths):
        path = paths["annotations"]
        base = Path(paths["root"]) if paths["root"] is not None else Path(path).parent
        entries, records = self._rows(path)
        if self.cfg.class_names:
            self.class_names = list(self.cfg.class_names)
        elif self.explicit:
            self.class_names = self._classes_in(split_paths(self.cfg, "train")[0])
        else:
            self.class_names = self._found_classes(entries, path)
        index: dict[str, int] = {}
        for k, name in enumerate(self.class_names):
            index.setdefault(name, k)  # a name given twice numbers as its first
        for lineno, rel, text in entries:
            where = f"{path} line {lineno}"
            img = Path(rel) if Path(rel).is_absolute() else base / rel
            if text in index:
                label = index[text]
            elif _is_int(text) and 0 <= int(text) < len(self.class_names):
                label = int(text)
            else:
                records.append(Record(img, where, problems=[
                    f"{where}: label {text!r} is not a class ({self.classes_from} {self.class_names}) nor an "
                    f"index 0..{len(self.class_names) - 1}; fix the label or class_names"]))
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


BOX_OK, BOX_NON_FINITE, BOX_EMPTY, BOX_OUTSIDE, BOX_NO_AREA = range(5)


def check_boxes(xyxy: np.ndarray, w: Any, h: Any) -> tuple[np.ndarray, np.ndarray]:
    """The one box rule: ``(N, 4)`` x1,y1,x2,y2 boxes against image sizes ``w``, ``h`` (numbers or
    ``(N,)`` arrays; NaN: size not known) -> (boxes clipped to the image, a ``BOX_*`` code per box).

    A box must be finite with x2 > x1 and y2 > y1; where the size is known it may overhang the image
    by ``BOX_TOLERANCE`` pixels (rounding in annotation tools), is then clipped, and must keep an area
    inside it. Used on the annotations' sizes when they are read and on the decoded size when read."""
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    w, h = np.asarray(w, dtype=np.float64), np.asarray(h, dtype=np.float64)
    x1, y1, x2, y2 = xyxy.T
    known = np.isfinite(w) & np.isfinite(h)
    t = BOX_TOLERANCE
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(xyxy).all(1)
        proper = (x2 > x1) & (y2 > y1)
        inside = ~known | ((x1 >= -t) & (y1 >= -t) & (x2 <= w + t) & (y2 <= h + t))
        clipped = np.stack([np.where(known, np.maximum(x1, 0), x1), np.where(known, np.maximum(y1, 0), y1),
                            np.where(known, np.minimum(x2, w), x2), np.where(known, np.minimum(y2, h), y2)], 1)
        area = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    code = np.select([~finite, ~proper, ~inside, ~area], [BOX_NON_FINITE, BOX_EMPTY, BOX_OUTSIDE, BOX_NO_AREA],
                     BOX_OK)
    return clipped.reshape(-1, 4), code


def box_problem(code: int, box: list[float], w: float | None, h: float | None, where: str) -> str:
    """The message of a box refused with ``code`` by :func:`check_boxes`."""
    size = f"{w:g}x{h:g}" if w is not None and h is not None else "?"
    return {
        BOX_NON_FINITE: f"{where}: box {box} has a non-finite coordinate; fix the annotation",
        BOX_EMPTY: f"{where}: box {box} (x1,y1,x2,y2) has x2 <= x1 or y2 <= y1; fix its width/height or delete it",
        BOX_OUTSIDE: f"{where}: box {box} (x1,y1,x2,y2) lies outside the {size} image; fix or delete it",
        BOX_NO_AREA: f"{where}: box {box} has no area inside the {size} image; fix or delete it",
    }[code]


def _check_box(box: list[float], w: float | None, h: float | None, where: str) -> tuple[list[float] | None, str | None]:
    """One xyxy box -> (clipped box, None) or (None, problem), by :func:`check_boxes`."""
    clipped, code = check_boxes(np.array([box], dtype=np.float64), np.nan if w is None else w,
                                np.nan if h is None else h)
    if code[0] != BOX_OK:
        return None, box_problem(int(code[0]), box, w, h, where)
    return clipped[0].tolist(), None


def boxes_within(r: Record, image: torch.Tensor) -> torch.Tensor:
    """The record's boxes checked against the DECODED image size and clipped to it (:func:`check_boxes`).

    Annotations may lack the image size (COCO without width/height) or state a wrong one; a box
    outside the decoded image (beyond ``BOX_TOLERANCE``) raises BadSampleError naming the record.
    """
    boxes = r.target["boxes"]
    h, w = int(image.shape[-2]), int(image.shape[-1])
    clipped, code = check_boxes(boxes.numpy(), w, h)
    if (code != BOX_OK).any():
        b = [round(v, 2) for v in boxes[int(np.flatnonzero(code != BOX_OK)[0])].tolist()]
        raise BadSampleError(f"{r.where}: box {b} (x1,y1,x2,y2) lies outside the decoded {w}x{h} image "
                             f"{r.image}; fix the box (or the image size) or delete it")
    return torch.from_numpy(clipped.astype(np.float32))


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
        if self.explicit:
            self._same_categories_as_train(path, idx)
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
            if fname and fname in present:  # a plain file directly in root: no stat needed
                pass
            elif fname and (outside := self._outside_root(root, fname)):
                rec.problems.insert(0, f"{rec.where}: file_name {outside}; {OUTSIDE_ROOT_FIX}")
            elif fname and not file.is_file():
                rec.problems.insert(0, f"{rec.where}: image file {file} is missing; restore it or remove the image "
                                       f"and its annotations from the JSON")
            out.append(rec)
        for where, text in zip(idx["orphan_where"].tolist(), idx["orphan_text"].tolist()):
            out.append(Record(path, where, problems=[text]))
        return out


    def _same_categories_as_train(self, path: Path, idx: dict) -> None:
        """A split with its own file numbers its categories as train's file does, or is refused: classes
        are numbered in sorted-id order per file, so a val file lacking one of train's categories would
        silently score every later class as another."""
        train = Path(split_paths(self.cfg, "train")[0]["annotations"])
        if train.resolve() == path.resolve():
            return
        mine = dict(zip(idx["cat_ids"].tolist(), idx["cat_names"].tolist()))
        theirs = dict(zip(*(coco_index(train)[k].tolist() for k in ("cat_ids", "cat_names"))))
        if mine == theirs:
            return
        diff = [f"{what} {sorted(ids)}" for what, ids in (
            ("lacks train's category ids", set(theirs) - set(mine)), ("adds ids", set(mine) - set(theirs)),
            ("renames ids", {i for i in set(mine) & set(theirs) if mine[i] != theirs[i]})) if ids]
        raise BadSampleError(f"{path}: its categories are not those of train's {train}: it {'; '.join(diff)}; "
                             f"give every split the same 'categories' list (as COCO's train2017 and val2017 do)")


OUTSIDE_ROOT_FIX = ("move the image under root and fix the path, or set allow_outside_root: true in this "
                    "source's config if the files are meant to be read from there")

INDEX_VERSION = 2
INDEX_CACHE_MIN_BYTES = 16 << 20
"""Annotation files at least this large get an index cache (a COCO train file parses in ~20 s)."""


def _listing(folder: Path) -> set[str]:
    """Names of the plain files directly in ``folder`` (one directory read instead of a stat per
    image); symlinks are left out, so that where they lead is checked (``_outside_root``)."""
    try:
        with os.scandir(folder) as it:
            return {e.name for e in it if e.is_file(follow_symlinks=False)}
    except OSError:
        return set()


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


def _is_id(value: Any) -> bool:
    """COCO ids are integers (a bool or a text "3" is refused rather than read as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _get(entry: Any, key: str, default: Any = None) -> Any:
    return entry.get(key, default) if isinstance(entry, dict) else default


def _parse_coco(path: Path) -> dict[str, np.ndarray]:
    """Parse and check a COCO file (vectorised: COCO train has 860k boxes); see CocoSource.

    Whole-file problems (not a JSON object, no 'images'/'categories' list, a category without an
    integer id or declared twice) raise; a problem of one image or annotation marks its image (or a
    record of its own: ``orphan_*``) so that ``on_bad_sample`` decides."""
    data = _coco_json(path)
    cat_ids, cat_names = _coco_categories(path, data["categories"])
    img = _coco_images(path, data["images"])
    anns = data.get("annotations") or []
    del data
    ann = _coco_annotations(path, anns, img, {cid: k for k, cid in enumerate(cat_ids)}, cat_ids)
    problems = {k: np.array(img[k] + ann.pop(k), dtype=np.int64 if k == "problem_image" else str)
                for k in ("problem_image", "problem_text", "orphan_where", "orphan_text")}  # images' first
    return {"cat_ids": np.array(cat_ids, dtype=np.int64), "cat_names": np.array(cat_names, dtype=str),
            "img_ids": np.array(img["ids"], dtype=np.int64), "file_names": np.array(img["file_names"], dtype=str),
            **ann, **problems}


def _coco_json(path: Path) -> dict:
    """The file's top-level object, with its 'images' and 'categories' lists (and 'annotations', if any, a list)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadSampleError(f"{path}: cannot read COCO JSON ({exc}); check the annotations path") from None
    if not isinstance(data, dict):
        raise BadSampleError(f"{path}: the top level of a COCO JSON must be an object with 'images', 'annotations' "
                             f"and 'categories' lists, got a {type(data).__name__}; is this a COCO detection file?")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise BadSampleError(f"{path}: COCO JSON has no '{key}' list; is this a COCO detection file?")
    if not isinstance(data.get("annotations") or [], list):
        raise BadSampleError(f"{path}: COCO JSON 'annotations' is a {type(data['annotations']).__name__}, "
                             f"not a list; is this a COCO detection file?")
    return data


def _coco_categories(path: Path, cats: list) -> tuple[list[int], list[str]]:
    """Category ids in sorted order and their names. A category without an integer id, or an id
    declared twice, is a file-level error: the class numbering itself would be a guess."""
    names: dict[int, str] = {}
    for k, c in enumerate(cats):
        cid = _get(c, "id")
        if not _is_id(cid):
            raise BadSampleError(f"{path} categories[{k}]: id {cid!r} is not an integer"
                                 f"{'' if isinstance(c, dict) else ' (the entry is not an object)'}; "
                                 f"give every category an integer id")
        name = str(c.get("name", cid))
        if cid in names:
            raise BadSampleError(f"{path} categories[{k}]: category id {cid} is declared twice ('{names[cid]}' "
                                 f"and '{name}'); give each category its own id")
        names[cid] = name
    ids = sorted(names)
    return ids, [names[c] for c in ids]


def _coco_images(path: Path, images: list) -> dict[str, Any]:
    """Image rows in id order: ``ids``, ``file_names``, ``wh`` (N, 2; NaN: not given), the problems of
    rows (an id given to several images, no file_name, a size that is no positive number) and
    entries with no integer id, which are records of their own (``orphan_*``)."""
    rows_of: dict[int, list[int]] = {}
    orphan_where, orphan_text = [], []
    for k, im in enumerate(images):
        iid = _get(im, "id")
        if _is_id(iid):
            rows_of.setdefault(iid, []).append(k)
            continue
        where = f"{path} images[{k}]"
        orphan_where.append(where)
        orphan_text.append(f"{where}: id {iid!r} is not an integer" if isinstance(im, dict) else
                           f"{where}: the entry is not an object")
        orphan_text[-1] += "; give every image an integer id and a file_name"
    ids = sorted(rows_of)
    file_names, wh = [], np.full((len(ids), 2), np.nan)
    problem_image, problem_text = [], []
    for row, iid in enumerate(ids):
        ks = rows_of[iid]
        im, where, problems = images[ks[0]], f"{path} image id {iid}", []
        if len(ks) > 1:
            problems.append(f"{where}: the id is given to {len(ks)} images (images{ks}: "
                            f"{[images[k].get('file_name') for k in ks]}); give each image its own id")
        fname = im.get("file_name")
        if not isinstance(fname, str) or not fname.strip():
            problems.append(f"{where} (images[{ks[0]}]): file_name {fname!r} is missing or empty; give the "
                            f"image file's path relative to root")
            fname = ""
        for j, key in enumerate(("width", "height")):
            if im.get(key) is None:
                continue
            try:
                wh[row, j] = math.nan if isinstance(im[key], bool) else float(im[key])
            except (TypeError, ValueError):
                pass  # stays NaN
            if not wh[row, j] > 0 or not math.isfinite(wh[row, j]):
                problems.append(f"{where} ({fname}): {key} {im[key]!r} is not a positive number; fix or "
                                f"remove it (the decoded size is then used)")
        file_names.append(fname)
        problem_image += [row] * len(problems)
        problem_text += problems
    return {"ids": ids, "file_names": file_names, "wh": wh, "problem_image": problem_image,
            "problem_text": problem_text, "orphan_where": orphan_where, "orphan_text": orphan_text}


def _coco_bboxes(anns: list) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) x, y, w, h of every annotation (NaN where not four numbers) and whether it was."""
    n = len(anns)
    raw = [_get(a, "bbox") for a in anns]
    try:  # fast path: every bbox is four numbers
        xywh = np.asarray(raw, dtype=np.float64)
        if xywh.shape != (n, 4) or not all(isinstance(b, list) for b in raw):
            raise ValueError("not all [x, y, w, h]")
        return xywh, np.ones(n, dtype=bool)
    except (TypeError, ValueError):
        raw = [_float4(b) for b in raw]
        shaped = np.fromiter((b is not None for b in raw), bool, n)
        return np.array([b if b is not None else [np.nan] * 4 for b in raw], dtype=np.float64).reshape(-1, 4), shaped


def _coco_annotations(path: Path, anns: list, img: dict, contiguous: dict[int, int], cat_ids: list[int]) -> dict:
    """Training boxes grouped by image row (``boxes``, ``labels``, ``offsets``), ``num_crowd``, and the
    problem of every bad annotation: on its image's row, or its own record when it has no image."""
    n, n_img = len(anns), len(img["ids"])
    row_of = {iid: i for i, iid in enumerate(img["ids"])}
    ann_row = np.fromiter((row_of.get(iid, -1) if _is_id(iid := _get(a, "image_id")) else -1 for a in anns),
                          np.int64, n)
    crowd = np.fromiter((bool(_get(a, "iscrowd", 0)) for a in anns), bool, n)
    label = np.fromiter((contiguous.get(c, -1) if _is_id(c := _get(a, "category_id")) else -1 for a in anns),
                        np.int64, n)
    xywh, shaped = _coco_bboxes(anns)
    with np.errstate(over="ignore"):  # a huge width is refused as non-finite below
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    wh = np.concatenate([img["wh"], [[np.nan, np.nan]]])[ann_row]  # row -1 (no image): size unknown
    boxes, code = check_boxes(xyxy, wh[:, 0], wh[:, 1])
    orphan = ann_row < 0
    live = ~orphan & ~crowd
    keep = live & (label >= 0) & shaped & (code == BOX_OK)
    out: dict[str, list] = {"problem_image": [], "problem_text": [], "orphan_where": [], "orphan_text": []}
    for k in np.flatnonzero(~keep & (orphan | live)).tolist():  # rare: the file's bad annotations, in order
        a = anns[k]
        where = f"{path} annotation id {a['id']}" if _get(a, "id") is not None else f"{path} annotations[{k}]"
        if orphan[k]:
            iid = _get(a, "image_id", -1)
            why = ("is not an object; fix or delete it" if not isinstance(a, dict) else
                   f"image_id {iid} is not in 'images'; add the image or delete the annotation" if _is_id(iid)
                   else f"image_id {iid!r} is not an integer; give its image's id or delete the annotation")
            out["orphan_where"].append(where)
            out["orphan_text"].append(f"{where}: {why}")
            continue
        i = int(ann_row[k])
        fname = Path(img["file_names"][i]).name
        if label[k] < 0:
            text = (f"{where} (image {fname}): category_id {a.get('category_id')!r} is not declared in "
                    f"'categories' (ids {cat_ids}); declare it or fix the annotation")
        elif not shaped[k]:
            text = f"{where}: bbox {a.get('bbox')!r} is not [x, y, w, h]; fix the annotation"
        else:
            size = [None if math.isnan(v) else v for v in img["wh"][i].tolist()]
            text = box_problem(int(code[k]), xyxy[k].tolist(), *size, f"{where} (image {fname})")
        out["problem_image"].append(i)
        out["problem_text"].append(text)
    rows = np.flatnonzero(keep)
    order = rows[np.argsort(ann_row[rows], kind="stable")]
    counts = np.bincount(ann_row[order], minlength=n_img)
    return {"boxes": boxes[order].astype(np.float32).reshape(-1, 4), "labels": label[order],
            "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            "num_crowd": np.array(int((crowd & ~orphan).sum())), **out}


class VocSource(BoxRecords):
    """Folder of Pascal VOC XML files; ``<filename>`` relative to ``root``.

    Coordinates are read as given (x1,y1,x2,y2 pixel edges, no 1-based shift). Classes are the
    config's class_names when given, else the sorted set of object names found.
    """

    @staticmethod
    def _parse(folder: Path) -> tuple[list[tuple], list[Record]]:
        """(xml, <filename>, width, height, [(name, box)]) of each XML file, and a problem record for
        each that cannot be parsed."""
        if not folder.is_dir():
            raise BadSampleError(f"{folder}: VOC annotations must be a folder of .xml files")
        parsed, records = [], []
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
            parsed.append((xml, filename, w, h, objs))
        return parsed, records

    def _classes_in(self, paths):
        return sorted({name for *_, objs in self._parse(Path(paths["annotations"]))[0] for name, _ in objs})

    def _read(self, paths):
        folder, root = Path(paths["annotations"]), Path(paths["root"])
        parsed, records = self._parse(folder)
        found = sorted({name for *_, objs in parsed for name, _ in objs})
        self._set_class_names(found, str(folder))
        for xml, filename, w, h, objs in parsed:
            img = root / filename
            rec = Record(img, str(xml))
            boxes, labels = [], []
            if outside := self._outside_root(root, filename):
                rec.problems.append(f"{xml}: <filename> {outside}; {OUTSIDE_ROOT_FIX}")
            elif not img.is_file():
                rec.problems.append(f"{xml}: image file {img} (<filename>) is missing; restore it or delete the XML")
            for i, (name, box) in enumerate(objs):
                where = f"{xml} object {i} ({name})"
                if name not in self.class_names:
                    rec.problems.append(f"{where}: class '{name}' is not in {self.classes_from} {self.class_names}; "
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
