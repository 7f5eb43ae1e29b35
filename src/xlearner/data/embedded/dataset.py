"""The Dataset classes that read a fetched dataset's .npy splits (or compose scenes from them)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from xlearner.config import ComposerConfig
from xlearner.data.embedded.cache import dataset_dir, is_fetched, xlearner_home
from xlearner.data.embedded.catalog import SPLITS, info
from xlearner.data.embedded.convert import texture_half, texture_images
from xlearner.data.embedded.fetching import fetch
from xlearner.data.schema import BadSampleLog

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
    """Composed scenes (glyphs on textures), generated on the fly by SceneComposer, never stored.
    ``ComposedDetDataset`` gives their boxes, ``ComposedSegDataset`` their masks."""

    first_glyph_class = 0
    """Index of the first glyph class in ``class_names`` (seg: 0 is the background)."""

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
            glyph_names = self.class_names[self.first_glyph_class:]
            self._composer = SceneComposer(np.concatenate(glyphs), np.concatenate(labels), glyph_names,
                                           backgrounds, self.config)
        return self._composer

    def __len__(self) -> int:
        return {"train": self.config.num_train, "val": self.config.num_val, "test": self.config.num_test}[self.split]



class ComposedDetDataset(ComposedDataset):
    def __getitem__(self, i: int):
        image, boxes, labels, _ = self.composer.scene(i, self.split)
        return torch.from_numpy(image), {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)}


class ComposedSegDataset(ComposedDataset):
    first_glyph_class = 1

    def __getitem__(self, i: int):
        image, _, _, mask = self.composer.scene(i, self.split)
        return torch.from_numpy(image), {"mask": torch.from_numpy(mask)}


COMPOSED = {"det": ComposedDetDataset, "seg": ComposedSegDataset}
"""The composed dataset class of each task a scene can be labelled for."""
REAL = {"tree_crowns": TreeCrownDataset, "nuclei": NucleiDataset}
"""Embedded datasets with their own reader; the others are image/label arrays (cls)."""


def open_dataset(name: str, split: str, composer: ComposerConfig | None = None,
                 home: Path | str | None = None) -> Dataset:
    """The SourceDataset of an embedded dataset's split; fetches it first if it is missing."""
    i = info(name)
    if not is_fetched(name, home):
        fetch([name], home=home)
    if i.composed:
        return COMPOSED[i.task](name, split, home, composer)
    return REAL.get(name, EmbeddedClsDataset)(name, split, home)
