import contextlib
import io
import json

import numpy as np
import pytest
import torch

from xlearner.metrics import ConfusionMatrix, coco_map, miou, to_coco, top1


def test_top1_logits_and_indices():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = torch.tensor([1, 0, 0, 0])
    assert top1(logits, labels) == pytest.approx(0.75)
    assert top1(np.array([1, 0, 0, 0]), [1, 0, 1, 1]) == pytest.approx(0.5)
    assert top1([], []) == 0.0


def _targets():
    return [
        {"boxes": torch.tensor([[2.0, 3.0, 20.0, 30.0], [30.0, 30.0, 50.0, 60.0]]), "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[10.0, 10.0, 40.0, 25.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},  # no gt
    ]


def _preds(targets, shift=0.0):
    out = []
    for t in targets:
        n = len(t["labels"])
        out.append({"boxes": t["boxes"] + shift, "scores": torch.linspace(0.9, 0.5, n) if n else torch.zeros(0),
                    "labels": t["labels"].clone()})
    return out


def test_coco_map_perfect_and_shifted():
    tg = _targets()
    perfect = coco_map(_preds(tg), tg, num_classes=3)
    assert perfect["mAP"] == pytest.approx(1.0)
    assert perfect["AP50"] == pytest.approx(1.0)
    shifted = coco_map(_preds(tg, shift=4.0), tg, num_classes=3)
    assert 0.0 <= shifted["mAP"] < 1.0
    assert shifted["AP50"] >= shifted["mAP"]


def test_coco_map_empty_is_zero():
    tg = _targets()
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
             for _ in tg]
    zero = {"mAP": 0.0, "AP50": 0.0, "AP40": 0.0, "recall40": 0.0}
    assert coco_map(empty, tg, 3) == zero
    no_gt = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    assert coco_map(_preds(tg)[:1], no_gt, 3) == zero


def test_ap_and_recall_at_iou_04_count_a_match_that_iou_05_misses():
    """Tree-crown benchmarks report box recall at IoU 0.4: a box at IoU 0.45 is a hit there, a miss at 0.5."""
    gt = [{"boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0], [40.0, 40.0, 60.0, 60.0]]), "labels": torch.tensor([0, 0])}]
    # first box exact; second shifted so that its IoU is 0.45 (overlap 20 x h, union 2 * 400 - overlap)
    h = 2 * 400 * 0.45 / 1.45 / 20
    pred = [{"boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0], [40.0, 40.0 + 20.0 - h, 60.0, 60.0 + 20.0 - h]]),
             "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 0])}]
    r = coco_map(pred, gt, 1)
    assert r["AP50"] == pytest.approx(0.5, abs=0.02)   # one of two found at 0.5
    assert r["AP40"] == pytest.approx(1.0) and r["recall40"] == pytest.approx(1.0)
    miss = coco_map([{**pred[0], "boxes": pred[0]["boxes"][:1], "scores": pred[0]["scores"][:1],
                      "labels": pred[0]["labels"][:1]}], gt, 1)
    assert miss["recall40"] == pytest.approx(0.5)


def test_coco_map_agrees_with_pycocotools_files(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    tg = _targets()
    rng = np.random.default_rng(0)
    preds = []
    for t in tg:
        n = len(t["labels"])
        preds.append({"boxes": t["boxes"] + torch.tensor(rng.normal(0, 3, (n, 4)), dtype=torch.float32),
                      "scores": torch.tensor(rng.uniform(0.2, 1.0, n), dtype=torch.float32),
                      "labels": t["labels"].clone()})
    # one false positive on the gt-less image
    preds[2] = {"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "scores": torch.tensor([0.7]), "labels": torch.tensor([0])}
    ours = coco_map(preds, tg, 3)

    gt, res = to_coco(preds, tg, 3)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(res))
    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO(str(tmp_path / "gt.json"))
        cd = cg.loadRes(str(tmp_path / "res.json"))
        ev = COCOeval(cg, cd, "bbox")
        ev.evaluate(); ev.accumulate(); ev.summarize()
    assert ours["mAP"] == pytest.approx(max(ev.stats[0], 0.0))
    assert ours["AP50"] == pytest.approx(max(ev.stats[1], 0.0))
    assert 0.0 < ours["mAP"] < 1.0


def test_miou_hand_computed():
    target = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    # class 0: tp 1, fp 0, fn 1 -> 1/2 ; class 1: tp 2, fp 1, fn 0 -> 2/3 ; class 2: 1/1 ; class 3 absent
    expected = (1 / 2 + 2 / 3 + 1.0) / 3
    assert miou(pred, target, num_classes=4) == pytest.approx(expected)


def test_confusion_matrix_streaming_matches_batch():
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 3, (4, 8, 8))
    target = rng.integers(0, 3, (4, 8, 8))
    target[0, 0, :] = 255
    cm = ConfusionMatrix(3)
    for p, t in zip(pred, target):
        cm.update(torch.as_tensor(p), torch.as_tensor(t))
    assert cm.miou() == pytest.approx(miou(pred, target, 3))
    assert cm.mat.sum() == (target != 255).sum()
