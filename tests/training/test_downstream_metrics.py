"""training/metrics.py on hand-made masks and labels, against upstream OpenUS's formulas (eps = 1e-6): batch-pooled and
per-sample Dice/IoU (eval_segmentation.py:54-149, test_segmentation.py:71-177) and the offline script
(calculate_dice_iou.py:15-61)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training.metrics import (EPS, PooledSegmentationMeter, classification_metrics, match_offline_pairs, mean_std,
                              offline_dice_iou, per_sample_dice_iou, pooled_dice_iou)


def _m(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[int(c) for c in r] for r in rows])[None]  # (1, H, W)


GT = _m(["0110", "0110", "0000", "0000"])  # 4 foreground pixels


def test_perfect_prediction():
    assert pooled_dice_iou(GT, GT) == (pytest.approx(1.0), pytest.approx(1.0))


def test_empty_prediction_nonempty_gt():
    dice, iou = pooled_dice_iou(torch.zeros_like(GT), GT)
    assert dice == pytest.approx(EPS / (4 + EPS)) and iou == pytest.approx(EPS / (4 + EPS))
    assert dice < 1e-6


def test_empty_ground_truth_and_empty_prediction():
    empty = torch.zeros_like(GT)
    dice, iou = pooled_dice_iou(empty, empty)
    assert iou == 1.0  # empty union -> 1 (upstream special case)
    assert dice == pytest.approx(1.0)  # eps / eps


def test_empty_ground_truth_nonempty_prediction():
    dice, iou = pooled_dice_iou(GT, torch.zeros_like(GT))
    assert iou == pytest.approx(EPS / (4 + EPS)) and dice == pytest.approx(EPS / (4 + EPS))


def test_partial_overlap():
    pred = _m(["0011", "0011", "0000", "0000"])  # 4 pixels, 2 shared with GT
    dice, iou = pooled_dice_iou(pred, GT)
    assert dice == pytest.approx((2 * 2 + EPS) / (4 + 4 + EPS))  # 0.5
    assert iou == pytest.approx((2 + EPS) / (6 + EPS))  # 1/3


def test_ignore_index_pixels_are_left_out():
    target = GT.clone()
    target[0, 3, :] = 255
    pred = GT.clone()
    pred[0, 3, :] = 1  # predicted foreground on ignored pixels: no penalty
    assert pooled_dice_iou(pred, target) == (pytest.approx(1.0), pytest.approx(1.0))


def test_batch_pooled_differs_from_per_sample_mean():
    a_gt, a_pred = GT[0], GT[0]  # perfect on a 4-pixel object
    b_gt = _m(["1111", "1111", "1111", "1111"])[0]  # 16 pixels
    b_pred = _m(["1111", "1111", "0000", "0000"])[0]  # half of them
    pred, gt = torch.stack([a_pred, b_pred]), torch.stack([a_gt, b_gt])
    dice, iou = pooled_dice_iou(pred, gt)
    assert dice == pytest.approx((2 * 12 + EPS) / (12 + 20 + EPS)) and iou == pytest.approx((12 + EPS) / (20 + EPS))
    ds, js = per_sample_dice_iou(pred, gt)
    assert ds == pytest.approx([1.0, 16 / 24]) and js == pytest.approx([1.0, 0.5])
    meter = PooledSegmentationMeter()
    meter.update(pred, gt)  # batch 1 = both images
    meter.update(torch.zeros_like(GT), torch.zeros_like(GT))  # batch 2 = one empty image: 1.0 / 1.0
    out = meter.compute()
    assert out["dice"] == pytest.approx((dice + 1.0) / 2) and out["iou"] == pytest.approx((iou + 1.0) / 2)
    assert out["dice_per_sample"] == pytest.approx((1 + 16 / 24 + 1) / 3) and out["num_samples"] == 3


def test_offline_rule_is_gt0_and_resizes():
    gt = np.zeros((4, 4), np.uint8)
    gt[:2, 1:3] = 128  # a JPEG-ish value: foreground under the offline rule (> 0), background under == 255
    pred = np.zeros((4, 4, 3), np.uint8)
    pred[:2, 2:4, 0] = 255  # first channel only counts
    dice, iou = offline_dice_iou(pred, gt)
    assert dice == pytest.approx((4 + EPS) / (8 + EPS)) and iou == pytest.approx((2 + EPS) / (6 + EPS))
    assert offline_dice_iou(np.zeros((4, 4)), np.zeros((4, 4))) == (pytest.approx(1.0), pytest.approx(1.0))
    big = np.kron((gt > 0).astype(np.uint8) * 255, np.ones((2, 2), np.uint8))  # 8x8 prediction of the same object
    d, j = offline_dice_iou(big, gt)
    # resized to 4x4 then > 0: the antialiased resize spreads the object by a pixel but keeps all of it
    assert d == pytest.approx(2 * j / (1 + j)) and 0.5 <= d < 1 and j >= 1 / 3
    assert offline_dice_iou(np.kron(gt, np.ones((2, 2), np.uint8))[::2, ::2], gt)[0] == pytest.approx(1.0)


def test_offline_file_matching(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    z = Image.fromarray(np.zeros((4, 4), np.uint8))
    for name in ("pred_mask_7.png", "test12.png", "case_3.png", "nomatch_99.png"):
        z.save(tmp_path / "pred" / name)
    for name in ("7.jpg", "12.png", "3.png"):
        z.save(tmp_path / "gt" / name)
    pairs = {p.name: g.name for p, g in match_offline_pairs(tmp_path / "pred", tmp_path / "gt")}
    assert pairs == {"pred_mask_7.png": "7.jpg", "test12.png": "12.png", "case_3.png": "3.png"}


def test_classification_metrics_match_hand_computation():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class P/R/F1: 0: 1, 2/3, 0.8; 1: 1/2, 1/2, 1/2; 2: 1/2, 1, 2/3
    f1 = [0.8, 0.5, 2 / 3]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert m["macro_precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["weighted_recall"] == pytest.approx(m["accuracy"])  # always true for weighted recall


def test_classification_metrics_zero_division_and_absent_class():
    m = classification_metrics([0, 0, 1, 1], [0, 0, 0, 0])  # class 1 never predicted -> P = R = F1 = 0
    assert m["macro_f1"] == pytest.approx((2 * (0.5 * 1) / 1.5 + 0) / 2)
    assert m["per_class"][1] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    m = classification_metrics([0, 0], [0, 2])  # a predicted class without support counts in the macro mean
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0) / 2) and m["weighted_f1"] == pytest.approx(2 / 3)


def test_mean_std_population():
    assert mean_std([0.90, 0.92]) == (pytest.approx(0.91), pytest.approx(0.01))
    assert all(np.isnan(v) for v in mean_std([]))
