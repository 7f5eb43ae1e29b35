"""Sharded sources: ``xlearner data pack`` writes any source as webdataset tar shards; ``format: shards``
reads them back, sample for sample what the source itself gives.

Why webdataset's tar format, read through its indexed reader ``wids`` (the comparison with MosaicML
``streaming`` and ``litdata`` is in docs/data.md, "Shards"): a shard is a plain tar any tool can list,
and ``wids.IndexedTarSamples`` maps a shard and indexes its members from the tar headers, so every
sample can be read by its number. That keeps training on the one map-style ``ShardedInfiniteSampler``:
exact mid-stage resume (a position in a seeded permutation) and, with ``shard_sizes``, whole shards
per rank, so a node reads only its own files from shared storage.

A packed folder::

    manifest.json          layout, source name, task, class names, per split: its shards (samples, bytes, sha256)
    train-000000.tar ...   in record order: <key>.img.<ext> (the image file's own bytes), <key>.json (the
                           target: label | boxes, labels, image_id; and where the record came from),
                           <key>.mask.png (seg: the mask after the source's label mapping)
    val-*.tar, test-*.tar  (test only when the source has its own test split; otherwise test is val)
    val.coco.json ...      COCO sources: each split's annotation file, which detection scoring reads
"""
from __future__ import annotations

import io
import json
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from xlearner.config import ConfigError, SourceConfig
from xlearner.data.readers import SPLITS, RecordSource, decode_image, decode_mask, split_paths
from xlearner.data.schema import BadSampleError, BadSampleLog
from xlearner.files import write_atomic

MANIFEST = "manifest.json"
LAYOUT = 1
OPEN_SHARDS = 64
"""Shards kept mapped per process (an LRU): ImageNet packs into ~1300 shards, more than a process's file limit."""


# ---------------------------------------------------------------------------------------
# packing


def packed_splits(cfg: SourceConfig) -> list[str]:
    """The splits a source has: train; val unless it has none (val_fraction 0, no val_* paths);
    test only when given as its own files (otherwise the packed test is val, as in the source)."""
    if cfg.format == "embedded":
        return list(SPLITS)
    out = ["train"]
    if cfg.val_fraction > 0 or split_paths(cfg, "val")[1]:
        out.append("val")
    if any(getattr(cfg, f"test_{k}") is not None for k in ("root", "annotations", "masks")):
        out.append("test")
    return out


def write_pack(cfg: SourceConfig, splits: dict, out: Path, shard_samples: int = 1000,
               echo: Callable[[str], None] = print) -> dict:
    """Write the opened ``splits`` of ``cfg`` into ``out`` as shards of ``shard_samples`` records; return
    the manifest (``sources.pack_source`` opens the splits).

    Each record is decoded and its target checked as training reads it (``load``), so a bad record
    is refused (or, under ``on_bad_sample: skip``, left out and counted in the manifest); the manifest
    is written last and atomically, so a folder without one is an unfinished pack."""
    out = Path(out)
    if (out / MANIFEST).exists():
        raise ConfigError(f"{out} already holds a packed source ({out / MANIFEST}); give another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"layout": LAYOUT, "name": cfg.name, "task": cfg.task, "packed_from": cfg.format, "splits": {}}
    for split, ds in splits.items():
        manifest.setdefault("class_names", list(ds.class_names))
        if getattr(ds, "category_ids", None) is not None:
            manifest.setdefault("category_ids", [int(c) for c in ds.category_ids])
        entry = manifest["splits"][split] = _pack_split(ds, out, split, shard_samples)
        echo(f"[{split}] {entry['samples']} records in {len(entry['shards'])} shards"
             + (f", {entry['skipped']} bad records left out" if entry["skipped"] else ""))
    text = json.dumps(manifest, indent=1)
    write_atomic(out / MANIFEST, lambda tmp: tmp.write_text(text))
    return manifest


def _pack_split(ds, out: Path, split: str, shard_samples: int) -> dict:
    import webdataset as wds  # lazy: only packing writes shards
    from tqdm import tqdm

    for old in out.glob(f"{split}-*.tar"):  # an unfinished earlier pack's shards
        old.unlink()
    records = getattr(ds, "records", None)
    skipped = list(ds.bad.skipped)
    written = 0
    sink = wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_samples, verbose=0, mtime=0.0)
    try:
        for i in tqdm(range(len(ds)), desc=f"pack {ds.name} {split}", unit="img", leave=False):
            try:
                image, target = ds.load(i) if hasattr(ds, "load") else ds[i]
            except BadSampleError as exc:
                if ds.bad.policy == "error":
                    raise
                skipped.append(str(exc))
                continue
            record = records[i] if records is not None else None
            where = record.where if record is not None else f"{ds.name} {split} record {i}"
            sink.write(_sample(written, image, target, ds.task, where, record.image if record is not None else None))
            written += 1
    finally:
        sink.close()
    if written == 0:
        raise BadSampleError(f"source '{ds.name}' split '{split}': no record could be packed "
                             f"({len(skipped)} bad); fix the records (`xlearner data check`)")
    files = sorted(out.glob(f"{split}-*.tar"))
    shards = [{"file": f.name, "samples": min(shard_samples, written - k * shard_samples),
               "bytes": f.stat().st_size, "sha256": _sha256(f)} for k, f in enumerate(files)]
    entry = {"samples": written, "skipped": len(skipped), "skipped_first": skipped[:20], "shards": shards}
    if getattr(ds, "coco_file", None) is not None:
        entry["coco_file"] = f"{split}.coco.json"
        shutil.copyfile(ds.coco_file, out / entry["coco_file"])
    return entry


def _sample(index: int, image: torch.Tensor, target: dict, task: str, where: str, file: Path | None) -> dict:
    """One record as shard members: the image file's own bytes (decoding them gives the same pixels),
    or a PNG of the decoded image for a source without files (embedded)."""
    if file is not None:
        ext, data = file.suffix.lower().lstrip(".") or "img", file.read_bytes()
    else:
        ext, data = "png", _png(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
    from xlearner import tasks

    fields, planes = tasks.get(task).to_record(target)
    sample = {"__key__": f"{index:09d}", f"img.{ext}": data, "json": json.dumps({"where": where, **fields}).encode()}
    for name, plane in planes.items():  # image-sized integer planes (seg masks) as 8- or 16-bit PNGs
        plane = plane.numpy()
        sample[f"{name}.png"] = _png(plane.astype(np.uint8 if plane.max(initial=0) <= 255 else np.uint16))
    return sample


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _sha256(path: Path) -> str:
    from xlearner.data.embedded.safety import sha256_file  # lazy: the embedded package is heavy to import

    return sha256_file(path)


def read_from_shards(cfg: SourceConfig, root: Path) -> SourceConfig:
    """The same source read from its packed folder: its training settings kept, its file and
    label-mapping fields gone (the shards hold them applied)."""
    from xlearner import tasks

    entry = cfg.model_dump(mode="json", exclude_none=True, exclude={
        "dataset", "annotations", "masks", "val_fraction", "split_seed", "reduce_zero_label", "label_map",
        "composer", "allow_outside_root", *(f"{s}_{k}" for s in ("val", "test") for k in ("root", "annotations", "masks"))})
    entry.update(format="shards", root=str(Path(root).resolve()))
    if cfg.format == "embedded" and cfg.resize is None and tasks.get(cfg.task).dense:
        entry["resize"] = "square"  # as the embedded source was trained (a packed folder is a user's data)
    return SourceConfig(**entry)


# ---------------------------------------------------------------------------------------
# reading


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        hint = ("the pack did not finish: run `xlearner data pack` again" if any(Path(root).glob("*.tar"))
                else "point root at a folder written by `xlearner data pack SOURCE.yaml --out DIR`")
        raise BadSampleError(f"{root}: no {MANIFEST}; {hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadSampleError(f"{path}: cannot read the manifest ({exc}); pack the source again") from None
    if manifest.get("layout") != LAYOUT:
        raise BadSampleError(f"{path}: shard layout {manifest.get('layout')} is not {LAYOUT}, the one this "
                             f"version reads; pack the source again with this version")
    return manifest


class _ShardRecords:
    """``records[i].where`` for messages and `data check`, without a Python object per record."""

    def __init__(self, source: "ShardSource"):
        self.source = source

    def __len__(self) -> int:
        return int(self.source.starts[-1])

    def __getitem__(self, i: int):
        return _Where(self.source.where(i, *self.source.locate(i)))


class _Where:
    __slots__ = ("where",)

    def __init__(self, where: str):
        self.where = where


class ShardSource(RecordSource):
    """A packed folder (``format: shards``, ``root: DIR``): the packed source's samples by number.

    ``shard_sizes`` lets the training sampler give each rank whole shards; ``coco_file`` and
    ``category_ids`` are the packed COCO source's, so detection is scored against the same file."""

    def __init__(self, cfg: SourceConfig, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.cfg, self.name, self.split, self.explicit = cfg, cfg.name, split, True
        self.bad = BadSampleLog(source=cfg.name, policy=cfg.on_bad_sample)
        root = Path(cfg.root)
        manifest = read_manifest(root)
        self.task = manifest["task"]
        self.class_names = list(cfg.class_names or manifest["class_names"])
        if len(self.class_names) != len(manifest["class_names"]):
            raise BadSampleError(f"{root / MANIFEST}: config class_names has {len(self.class_names)} names but "
                                 f"the packed source has {len(manifest['class_names'])}; make them match")
        entry = manifest["splits"].get(split)
        self.test_is_val = split == "test" and entry is None
        if self.test_is_val:
            entry = manifest["splits"].get("val")
        if entry is None:
            raise BadSampleError(f"{root}: the packed source has no {split} split (packed: "
                                 f"{sorted(manifest['splits'])}); pack a source that has one")
        self.shards = [root / s["file"] for s in entry["shards"]]
        missing = [str(p) for p in self.shards if not p.is_file()]
        if missing:
            raise BadSampleError(f"{root}: shards {missing[:3]} of split '{split}' are missing; restore them "
                                 f"or pack the source again")
        self.shard_sizes = [int(s["samples"]) for s in entry["shards"]]
        self.sha256 = [s.get("sha256") for s in entry["shards"]]
        self.starts = np.cumsum([0] + self.shard_sizes)
        if "coco_file" in entry:
            self.coco_file = root / entry["coco_file"]
        if "category_ids" in manifest:
            self.category_ids = list(manifest["category_ids"])
        self.records = _ShardRecords(self)
        self._open: OrderedDict = OrderedDict()
        self.bad.track(len(self.records))

    def where(self, i: int, j: int, inner: int) -> str:
        return f"{self.shards[j]} sample {i:09d} (#{inner} of the shard)"

    def locate(self, i: int) -> tuple[int, int]:
        j = int(np.searchsorted(self.starts, i, side="right")) - 1
        return j, i - int(self.starts[j])

    def _shard(self, j: int):
        """Shard ``j`` mapped and indexed (wids), kept in a per-process LRU."""
        if j in self._open:
            self._open.move_to_end(j)
            return self._open[j]
        from wids.wids import IndexedTarSamples  # lazy: importing webdataset costs seconds

        try:
            samples = IndexedTarSamples(path=str(self.shards[j]))
        except Exception as exc:
            raise BadSampleError(f"{self.shards[j]}: cannot index the shard ({type(exc).__name__}: {exc}); the "
                                 f"shard is damaged: pack the source again") from None
        if len(samples) != self.shard_sizes[j]:
            samples.close()
            raise BadSampleError(f"{self.shards[j]}: holds {len(samples)} samples, the manifest says "
                                 f"{self.shard_sizes[j]}; the shard is damaged: pack the source again")
        self._open[j] = samples
        while len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)[1].close()
        return samples

    def load(self, i: int) -> tuple[torch.Tensor, dict]:
        """Decode sample ``i``; raise BadSampleError on any problem, whatever the policy."""
        j, inner = self.locate(i)
        where = self.where(i, j, inner)
        samples = self._shard(j)
        try:
            sample = samples[inner]
            meta = json.loads(sample[".json"].read())  # wids names members by ".<ext>"
            image_member = next(k for k in sample if k.startswith(".img."))
        except Exception as exc:
            raise BadSampleError(f"{where}: cannot read the sample ({type(exc).__name__}: {exc}); the shard "
                                 f"is damaged: pack the source again") from None
        if sample["__key__"] != f"{i:09d}":
            raise BadSampleError(f"{where}: holds key {sample['__key__']}; the shard is out of order: pack again")
        name = f"{where} [packed from {meta['where']}]"
        image = decode_image(sample[image_member], self.cfg.max_image_pixels, name=name)
        from xlearner import tasks

        planes = {}
        for member in sample:  # ".mask.png" -> "mask"
            if member.endswith(".png") and not member.startswith(".img."):
                plane = planes[member[1:-4]] = decode_mask(sample[member], self.cfg.max_image_pixels,
                                                           name=f"{name} {member[1:]}")
                if tuple(plane.shape) != tuple(image.shape[-2:]):
                    raise BadSampleError(f"{name}: {member[1:]} is {tuple(plane.shape)} but the image "
                                         f"{tuple(image.shape[-2:])}; the shard is damaged: pack the source again")
        return image, tasks.get(self.task).from_record(meta, planes)

    def verify(self) -> list[str]:
        """Shards whose sha256 is not the manifest's (what `data check` reports before decoding)."""
        return [f"{p}: sha256 is not the manifest's; the shard changed after packing: pack the source again"
                for p, want in zip(self.shards, self.sha256) if want is not None and _sha256(p) != want]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # mapped files stay in the process that opened them
        return state

    def __del__(self):
        for samples in getattr(self, "_open", {}).values():
            try:
                samples.close()
            except Exception:
                pass
