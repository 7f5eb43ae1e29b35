"""SceneComposer: composed det/seg scenes of glyphs pasted on texture backgrounds.

The scenes are *composed* (synthetic layouts of real glyph images), deterministic by
seed: scene ``(seed, split, index)`` is drawn from its own numpy Generator, so it is
the same in every process and never needs to be stored.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from xlearner.config import ComposerConfig

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
ALPHA_THRESHOLD = 0.5
"""A glyph pixel counts as visible (box, mask) where its alpha (intensity/255) is above this."""
MIN_VISIBLE_PIXELS = 12
"""An object with fewer visible pixels than this (after occlusion) gets no box..."""
MIN_VISIBLE_FRACTION = 0.3
"""...and so does one with less than this fraction of its own glyph pixels left visible."""


def _resize(a: np.ndarray, size: int, resample=Image.BILINEAR) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((size, size), resample))


class SceneComposer:
    """Composes scenes from glyphs (N,28,28 uint8) and grey or RGB background textures."""

    def __init__(self, glyphs: np.ndarray, labels: np.ndarray, class_names: list[str],
                 backgrounds: list[np.ndarray], config: ComposerConfig | None = None):
        self.glyphs = glyphs
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.backgrounds = [np.asarray(b) for b in backgrounds]
        self.config = config or ComposerConfig()
        if len(self.glyphs) != len(self.labels) or not len(self.glyphs):
            raise ValueError(f"SceneComposer needs as many glyph labels as glyphs (got {len(self.glyphs)} glyphs, "
                             f"{len(self.labels)} labels) and at least one glyph")
        # pick a class first, then a glyph of it: classes with few glyphs are as frequent as others
        self._by_class = [np.flatnonzero(self.labels == k) for k in range(len(self.class_names))]
        self._classes = np.array([k for k, idx in enumerate(self._by_class) if len(idx)])

    def __len__(self) -> int:
        return self.config.num_train

    def count(self, split: str) -> int:
        return {"train": self.config.num_train, "val": self.config.num_val, "test": self.config.num_test}[split]

    def rng(self, index: int, split: str) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, SPLIT_IDS[split], index])

    def _background(self, rng: np.random.Generator, size: int) -> np.ndarray:
        bg = self.backgrounds[rng.integers(len(self.backgrounds))]
        h, w = bg.shape[:2]
        side = int(rng.integers(min(size, h, w), min(2 * size, h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = np.ascontiguousarray(bg[y:y + side, x:x + side])
        crop = _resize(crop, size).astype(np.float32) / 255.0
        if crop.ndim == 2:
            crop = crop[..., None].repeat(3, axis=2)
        # squeeze the texture's contrast into a band so a glyph of a contrasting colour stands out
        lo = rng.uniform(0.05, 0.5)
        crop = lo + 0.4 * (crop - crop.min()) / max(float(crop.max() - crop.min()), 1e-6)
        tint = rng.uniform(0.5, 1.0, size=3)
        return crop * tint

    def _render(self, index: int, split: str):
        """Return image float (S,S,3), boxes, labels, mask, owner map (-1 = background), placed boxes.

        Placed boxes are the full glyph extents at paste time (the overlap limit applies to them).
        """
        cfg, rng = self.config, self.rng(index, split)
        s = cfg.canvas_size
        image = self._background(rng, s)
        owner = np.full((s, s), -1, dtype=np.int64)
        placed_boxes: list[np.ndarray] = []
        placed_labels: list[int] = []
        placed_pixels: list[int] = []
        n_objects = int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))
        for _ in range(n_objects):
            k = int(self._classes[rng.integers(len(self._classes))])
            glyph = np.asarray(self.glyphs[self._by_class[k][rng.integers(len(self._by_class[k]))]])
            side = min(s, max(6, int(round(28 * rng.uniform(*cfg.scale)))))
            alpha = _resize(glyph, side).astype(np.float32) / 255.0
            on = alpha > ALPHA_THRESHOLD
            if on.sum() < MIN_VISIBLE_PIXELS:
                continue
            ys, xs = np.nonzero(on)
            for _attempt in range(20):
                y0, x0 = int(rng.integers(0, s - side + 1)), int(rng.integers(0, s - side + 1))
                box = np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1], dtype=np.float32)
                if all(_iou(box, b) <= cfg.max_overlap for b in placed_boxes):
                    break
            else:
                continue
            region = image[y0:y0 + side, x0:x0 + side]
            luminance = float(region.mean())
            colour = rng.uniform(0.0, 0.25, 3) if luminance > 0.45 else rng.uniform(0.8, 1.0, 3)
            region[:] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
            owner[y0:y0 + side, x0:x0 + side][on] = len(placed_boxes)
            placed_boxes.append(box)
            placed_labels.append(k)
            placed_pixels.append(int(on.sum()))
        boxes, labels = [], []
        mask = np.zeros((s, s), dtype=np.int64)
        for j, k in enumerate(placed_labels):
            vis = owner == j
            mask[vis] = k + 1
            n_vis = int(vis.sum())
            if n_vis < MIN_VISIBLE_PIXELS or n_vis < MIN_VISIBLE_FRACTION * placed_pixels[j]:
                continue
            ys, xs = np.nonzero(vis)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(k)
        boxes_a = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        placed = np.asarray(placed_boxes, dtype=np.float32).reshape(-1, 4)
        return image, boxes_a, np.asarray(labels, dtype=np.int64), mask, owner, placed

    def scene(self, index: int, split: str = "train"):
        """Scene ``index`` of ``split``: image uint8 (3,S,S), boxes xyxy (N,4), labels (N,), mask (S,S).

        The mask holds class index + 1 on visible glyph pixels (0 = background).
        """
        if not 0 <= index < self.count(split):
            raise IndexError(f"scene {index} out of range: split {split} has {self.count(split)} scenes")
        image, boxes, labels, mask, _, _ = self._render(index, split)
        image_u8 = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(2, 0, 1)
        return np.ascontiguousarray(image_u8), boxes, labels, mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0
