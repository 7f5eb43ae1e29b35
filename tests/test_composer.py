"""SceneComposer: deterministic, boxes tight on visible glyph pixels, masks on the glyphs."""
import numpy as np
import pytest

from xlearner.config import ComposerConfig
from xlearner.data.composer import ALPHA_THRESHOLD, SceneComposer, _iou


def _glyphs(n=40, seed=0):
    """Blocky synthetic glyphs of 4 classes (each a filled rectangle of a class-specific shape)."""
    rng = np.random.default_rng(seed)
    g = np.zeros((n, 28, 28), np.uint8)
    labels = np.arange(n) % 4
    for i, k in enumerate(labels):
        h, w = 8 + 4 * k, 20 - 3 * k
        y, x = rng.integers(0, 28 - h), rng.integers(0, 28 - w)
        g[i, y:y + h, x:x + w] = 255
    return g, labels


def _composer(**kw):
    g, y = _glyphs()
    bg = [np.random.default_rng(1).integers(0, 255, (128, 128), dtype=np.uint8)]
    cfg = ComposerConfig(**{"canvas_size": 64, "objects": (2, 5), "num_train": 50, **kw})
    return SceneComposer(g, y, ["a", "b", "c", "d"], bg, cfg)


def test_same_seed_same_scene_other_seed_other_scene():
    a, b, c = _composer(seed=3), _composer(seed=3), _composer(seed=4)
    for i in range(5):
        sa, sb = a.scene(i), b.scene(i)
        for x, y in zip(sa, sb):
            np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(a.scene(i)[0], c.scene(i)[0]) for i in range(5))
    # splits differ too
    assert not np.array_equal(a.scene(0, "train")[0], a.scene(0, "val")[0])


def test_boxes_tight_around_visible_pixels_and_mask_classes():
    comp = _composer(max_overlap=0.5)
    n_boxes = 0
    for i in range(30):
        image, boxes, labels, mask, owner, _ = comp._render(i, "train")
        kept = 0
        for j in range(int(owner.max()) + 1):
            vis = owner == j
            ys, xs = np.nonzero(vis)
            if not len(ys):
                continue
            tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            match = [b for b in boxes.tolist() if b == tight]
            if match:
                kept += 1
            # the mask carries the object's class + 1 on all its visible pixels
            k = np.unique(mask[vis])
            assert len(k) == 1 and k[0] >= 1
        assert kept == len(boxes), f"scene {i}: a box is not tight around one object's visible pixels"
        for b, lab in zip(boxes.astype(int), labels):
            region = mask[b[1]:b[3], b[0]:b[2]]
            assert (region == lab + 1).any()
        # background stays 0 outside glyphs
        assert (mask[owner < 0] == 0).all()
        n_boxes += len(boxes)
    assert n_boxes > 30


def test_mask_is_where_glyph_alpha_above_threshold():
    g, y = _glyphs(4)
    cfg = ComposerConfig(canvas_size=28, objects=(1, 1), scale=(1.0, 1.0), num_train=4)
    comp = SceneComposer(g[:1], y[:1], ["a"], [np.full((64, 64), 100, np.uint8)], cfg)
    _, boxes, labels, mask = comp.scene(0)
    np.testing.assert_array_equal(mask, (g[0] / 255.0 > ALPHA_THRESHOLD).astype(np.int64))
    ys, xs = np.nonzero(g[0])
    assert boxes.tolist() == [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]
    assert labels.tolist() == [0]


@pytest.mark.parametrize("limit", [0.0, 0.2])
def test_overlap_limit(limit):
    comp = _composer(max_overlap=limit, objects=(4, 6))
    for i in range(30):
        _, boxes, _, _, _, placed = comp._render(i, "train")
        for a in range(len(placed)):
            for b in range(a):
                assert _iou(placed[a], placed[b]) <= limit + 1e-6
        if limit == 0.0:
            for a in range(len(boxes)):
                for b in range(a):
                    assert _iou(boxes[a], boxes[b]) == 0.0


def test_image_is_uint8_chw():
    image, boxes, labels, mask = _composer().scene(1)
    assert image.dtype == np.uint8 and image.shape == (3, 64, 64)
    assert boxes.dtype == np.float32 and labels.dtype == np.int64 and mask.shape == (64, 64)
