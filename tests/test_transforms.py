"""Transforms keep boxes and masks aligned with the pixels they describe."""
import torch

from xlearner.config import AugmentConfig
from xlearner.data.transforms import build_transform, denormalize


def _square_image(h=48, w=80, box=(50, 10, 70, 30)):
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    img[:, y1:y2, x1:x2] = 255
    mask = torch.zeros(h, w, dtype=torch.int64)
    mask[y1:y2, x1:x2] = 1
    return img, mask, box


def _white(image):
    return denormalize(image).float().mean(0) > 127


def test_det_box_encloses_white_pixels_after_flip_and_crop():
    aug = AugmentConfig(random_resized_crop=(0.5, 1.0), hflip=True)
    t = build_transform("det", 32, train=True, augment=aug)
    img, _, box = _square_image()
    kept = 0
    for seed in range(30):
        torch.manual_seed(seed)
        out, tgt = t(img, {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([3])})
        assert out.dtype == torch.float32 and out.shape == (3, 32, 32)
        assert tgt["boxes"].dtype == torch.float32 and tgt["labels"].dtype == torch.int64
        white = _white(out)
        if len(tgt["boxes"]) == 0:  # cropped away: hardly any white left
            assert white.sum() <= 4
            continue
        kept += 1
        assert tgt["labels"].tolist() == [3]
        x1, y1, x2, y2 = tgt["boxes"][0].tolist()
        ys, xs = torch.nonzero(white, as_tuple=True)
        assert len(xs) > 0
        assert xs.min() >= x1 - 1 and xs.max() + 1 <= x2 + 1
        assert ys.min() >= y1 - 1 and ys.max() + 1 <= y2 + 1
    assert kept > 5


def test_det_eval_resize_scales_boxes():
    t = build_transform("det", 40, train=False)
    img, _, box = _square_image()
    out, tgt = t(img, {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([0])})
    assert torch.allclose(tgt["boxes"][0], torch.tensor([50 / 2, 10 * 40 / 48, 70 / 2, 30 * 40 / 48]), atol=1e-4)


def test_seg_mask_follows_image():
    aug = AugmentConfig(random_resized_crop=(0.6, 1.0), hflip=True)
    t = build_transform("seg", 32, train=True, augment=aug)
    img, mask, _ = _square_image()
    mask[0, 0] = 255
    for seed in range(20):
        torch.manual_seed(seed)
        out, tgt = t(img, {"mask": mask})
        m = tgt["mask"]
        assert m.dtype == torch.int64 and m.shape == (32, 32)
        assert set(m.unique().tolist()) <= {0, 1, 255}  # nearest: no interpolated labels
        white, fg = _white(out), m == 1
        if fg.sum() == 0:
            assert white.sum() <= 4
            continue
        iou = (white & fg).sum() / (white | fg).sum()
        assert iou > 0.5, (seed, float(iou))  # small squares: interpolated edges
        shift = torch.nonzero(white).float().mean(0) - torch.nonzero(fg).float().mean(0)
        assert shift.abs().max() <= 1.5, (seed, shift)


def test_cls_label_unchanged_and_normalised():
    t = build_transform("cls", 16, train=True, augment=AugmentConfig(random_resized_crop=(0.5, 1.0), hflip=True))
    img = torch.full((3, 20, 30), 255, dtype=torch.uint8)
    out, tgt = t(img, {"label": 4})
    assert tgt == {"label": 4} and out.shape == (3, 16, 16)
    assert torch.allclose(denormalize(out).float(), torch.full((3, 16, 16), 255.0))


def test_same_seed_same_augmentation():
    t = build_transform("seg", 24, train=True, augment=AugmentConfig(random_resized_crop=(0.3, 1.0), hflip=True))
    img, mask, _ = _square_image()
    torch.manual_seed(5)
    a = t(img, {"mask": mask})
    torch.manual_seed(5)
    b = t(img, {"mask": mask})
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["mask"], b[1]["mask"])
