"""Every metric the training jobs report: binary segmentation Dice/IoU (OpenUS downstream), multi-class mIoU
(TransKD distillation), classification accuracy/F1, and the summaries over runs.

Binary segmentation (foreground = class 1; pixels labelled ``ignore_index`` (255) are left out), eps = 1e-6:

* :func:`pooled_dice_iou`: upstream OpenUS ``eval_segmentation.py:54-149`` (validation): one Dice and one IoU per
  **batch**, pooled over every pixel of the batch, ``IoU = (|P∩G| + eps) / (|P∪G| + eps)`` set to 1 when the union
  is empty, ``Dice = (2|P∩G| + eps) / (|P| + |G| + eps)``. :class:`PooledSegmentationMeter` averages them over
  batches, as upstream does.
* :func:`per_sample_dice_iou`: upstream ``test_segmentation.py:71-177``: the same formulas per image, averaged over
  images.
* :func:`offline_dice_iou`: upstream ``calculate_dice_iou.py:15-40``: first channel, both masks binarised with
  ``> 0`` (not ``== 255``), prediction resized to the ground truth if the sizes differ, IoU without the empty-union
  special case (``(I + eps) / (Σy + Σŷ - I + eps)``, which is also 1 for two empty masks).

Multi-class: :class:`IoUAccumulator` is TransKD's ``iouEval`` (``eval/iouEval.py:10-75``).

Classification: :func:`classification_metrics` gives accuracy and macro/weighted precision, recall and F1 with
sklearn's conventions (upstream ``test_linear.py:211-283``; labels = those present in ``y_true`` or ``y_pred``; a
class with no prediction or no support scores 0, sklearn's ``zero_division`` default).

:func:`mean_std` summarises repeated runs (seeds): population std (``numpy.std``, ddof 0).

Upstream files: XZheng0427/OpenUS at commit 6b9f6d2e, RuipingL/TransKD at commit 39ab795d.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

EPS = 1e-6


def _binary(pred: torch.Tensor, target: torch.Tensor, ignore_index: int | None) -> tuple[torch.Tensor, ...]:
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    p = (pred == 1) & valid
    g = (target == 1) & valid
    return p, g


def pooled_dice_iou(pred: torch.Tensor, target: torch.Tensor, eps: float = EPS,
                    ignore_index: int | None = 255) -> tuple[float, float]:
    """(Dice, IoU) of a whole batch of class maps ``(B, H, W)``, pooled over all its pixels (upstream validation)."""
    p, g = _binary(pred, target, ignore_index)
    inter = (p & g).sum().item()
    union = (p | g).sum().item()
    iou = 1.0 if union == 0 else (inter + eps) / (union + eps)
    dice = (2 * inter + eps) / (p.sum().item() + g.sum().item() + eps)
    return dice, iou


def per_sample_dice_iou(pred: torch.Tensor, target: torch.Tensor, eps: float = EPS,
                        ignore_index: int | None = 255) -> tuple[list[float], list[float]]:
    """Per-image (Dice list, IoU list) of class maps ``(B, H, W)`` (upstream ``test_segmentation.py``)."""
    dices, ious = [], []
    for i in range(pred.shape[0]):
        d, j = pooled_dice_iou(pred[i : i + 1], target[i : i + 1], eps, ignore_index)
        dices.append(d)
        ious.append(j)
    return dices, ious


class PooledSegmentationMeter:
    """Upstream's validation numbers: batch-pooled Dice/IoU, averaged over batches; also keeps per-sample values."""

    def __init__(self, ignore_index: int | None = 255):
        self.ignore_index = ignore_index
        self.batch_dice: list[float] = []
        self.batch_iou: list[float] = []
        self.sample_dice: list[float] = []
        self.sample_iou: list[float] = []

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        d, j = pooled_dice_iou(pred, target, ignore_index=self.ignore_index)
        self.batch_dice.append(d)
        self.batch_iou.append(j)
        ds, js = per_sample_dice_iou(pred, target, ignore_index=self.ignore_index)
        self.sample_dice += ds
        self.sample_iou += js

    def merge(self, other: "PooledSegmentationMeter") -> None:
        for name in ("batch_dice", "batch_iou", "sample_dice", "sample_iou"):
            getattr(self, name).extend(getattr(other, name))

    def state(self) -> dict:
        return {k: list(getattr(self, k)) for k in ("batch_dice", "batch_iou", "sample_dice", "sample_iou")}

    @classmethod
    def from_states(cls, states: Iterable[dict], ignore_index: int | None = 255) -> "PooledSegmentationMeter":
        meter = cls(ignore_index)
        for s in states:
            for k, v in s.items():
                getattr(meter, k).extend(v)
        return meter

    def compute(self) -> dict:
        def mean(v: list[float]) -> float:
            return float(np.mean(v)) if v else float("nan")

        return {"dice": mean(self.batch_dice), "iou": mean(self.batch_iou),
                "dice_per_sample": mean(self.sample_dice), "iou_per_sample": mean(self.sample_iou),
                "dice_per_sample_std": float(np.std(self.sample_dice)) if self.sample_dice else float("nan"),
                "iou_per_sample_std": float(np.std(self.sample_iou)) if self.sample_iou else float("nan"),
                "num_batches": len(self.batch_dice), "num_samples": len(self.sample_dice)}


# ---------------------------------------------------------------------------------------------------------------------
# offline metrics on saved PNG masks (upstream calculate_dice_iou.py)


def _first_channel(arr: np.ndarray) -> np.ndarray:
    return arr[..., 0] if arr.ndim == 3 else arr


def offline_dice_iou(pred: np.ndarray, gt: np.ndarray, eps: float = EPS) -> tuple[float, float]:
    """Dice, IoU of one saved prediction against its ground truth, upstream ``calculate_dice_iou.py``: first channel,
    ``> 0`` binarisation of both. A prediction of another size is resized to the ground truth's size first (PIL
    bilinear on the binary map, then ``> 0``; upstream uses skimage ``resize(anti_aliasing=True)``, which can differ
    by a pixel along edges)."""
    pred, gt = _first_channel(np.asarray(pred)), _first_channel(np.asarray(gt))
    if pred.shape != gt.shape:
        from PIL import Image

        img = Image.fromarray((pred > 0).astype(np.float32), mode="F")
        pred = np.asarray(img.resize((gt.shape[1], gt.shape[0]), Image.BILINEAR))
    y, yhat = (gt > 0).astype(np.float64), (pred > 0).astype(np.float64)
    inter = float((y * yhat).sum())
    dice = (2 * inter + eps) / (y.sum() + yhat.sum() + eps)
    iou = (inter + eps) / (y.sum() + yhat.sum() - inter + eps)
    return float(dice), float(iou)


_PRED_PATTERNS = (re.compile(r"pred_mask_(\d+)"), re.compile(r"test(\d+)"), re.compile(r"(\d+)"))


def match_offline_pairs(pred_dir: str | Path, gt_dir: str | Path) -> list[tuple[Path, Path]]:
    """Pair each prediction PNG with its ground truth by the number in its name (``pred_mask_N``, then ``testN``,
    then the first digits), trying ``N.jpg``, ``N.png`` and then the same file name in ``gt_dir`` (upstream
    ``calculate_dice_iou.py:42-61, 168-191``)."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    pairs = []
    for pred in sorted(p for p in pred_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")):
        number = next((m.group(1) for pat in _PRED_PATTERNS if (m := pat.search(pred.stem))), None)
        candidates = ([gt_dir / f"{number}.jpg", gt_dir / f"{number}.png"] if number is not None else []) + \
            [gt_dir / pred.name]
        gt = next((c for c in candidates if c.is_file()), None)
        if gt is not None:
            pairs.append((pred, gt))
    return pairs


def offline_summary(values: Sequence[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)), "min": float(v.min()),
            "max": float(v.max()), "n": int(v.size)}


# ---------------------------------------------------------------------------------------------------------------------
# classification


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict:
    """Accuracy and macro/weighted precision, recall, F1 (sklearn ``precision_recall_fscore_support`` conventions)."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} must be equal-length 1-D sequences")
    if t.size == 0:
        raise ValueError("no samples")
    labels = np.union1d(t, p)
    tp = np.array([np.sum((p == c) & (t == c)) for c in labels], dtype=np.float64)
    pred_n = np.array([np.sum(p == c) for c in labels], dtype=np.float64)
    support = np.array([np.sum(t == c) for c in labels], dtype=np.float64)
    precision = np.divide(tp, pred_n, out=np.zeros_like(tp), where=pred_n > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    w = support / support.sum()
    return {
        "accuracy": float(np.mean(t == p)),
        "macro_precision": float(precision.mean()), "macro_recall": float(recall.mean()), "macro_f1": float(f1.mean()),
        "weighted_precision": float((precision * w).sum()), "weighted_recall": float((recall * w).sum()),
        "weighted_f1": float((f1 * w).sum()),
        "num_samples": int(t.size),
        "per_class": {int(c): {"precision": float(a), "recall": float(b), "f1": float(d), "support": int(s)}
                      for c, a, b, d, s in zip(labels, precision, recall, f1, support)},
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (ddof 0) over runs; (nan, nan) for no values."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std())


# ---------------------------------------------------------------------------------------------------------------------
# multi-class mIoU (distillation)


class IoUAccumulator:
    """TransKD's mIoU (``eval/iouEval.py:10-75``): TP/FP/FN accumulated over the whole split at the logits' (1/4)
    resolution; pixels whose label is the ignore/void class are left out of FP (a prediction of the void class on a
    valid pixel is a FN for the true class and a FP for nothing); IoU_c = TP / (TP + FP + FN + 1e-15); the mean runs
    over the real classes, a class absent from both label and prediction counting as 0.

    ``extra_ignore`` (255) is remapped to ``ignore_index`` first (TransKD remaps 255 to the void class 19)."""

    def __init__(self, num_classes: int, ignore_index: int | None = None, extra_ignore: int | None = 255):
        self.num_classes, self.ignore_index, self.extra_ignore = num_classes, ignore_index, extra_ignore
        self.tp = torch.zeros(num_classes, dtype=torch.float64)
        self.fp = torch.zeros(num_classes, dtype=torch.float64)
        self.fn = torch.zeros(num_classes, dtype=torch.float64)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        pred, label = pred.reshape(-1).cpu().long(), label.reshape(-1).cpu().long()
        if self.extra_ignore is not None and self.ignore_index is not None:
            label = torch.where(label == self.extra_ignore, torch.full_like(label, self.ignore_index), label)
        valid = torch.ones_like(label, dtype=torch.bool)
        if self.ignore_index is not None:
            valid = label != self.ignore_index
        elif self.extra_ignore is not None:
            valid = label != self.extra_ignore
        for c in range(self.num_classes):
            p, g = pred == c, label == c
            self.tp[c] += (p & g).sum()
            self.fp[c] += (p & ~g & valid).sum()
            self.fn[c] += (~p & g).sum()

    def state(self) -> torch.Tensor:
        """``(3, num_classes)``: TP, FP, FN (sum it over ranks to merge shards)."""
        return torch.stack([self.tp, self.fp, self.fn])

    def load(self, state: torch.Tensor) -> None:
        self.tp, self.fp, self.fn = state[0].clone(), state[1].clone(), state[2].clone()

    def iou(self) -> torch.Tensor:
        return self.tp / (self.tp + self.fp + self.fn + 1e-15)

    def miou(self) -> float:
        iou = self.iou()
        if self.ignore_index is not None and self.ignore_index < self.num_classes:
            iou = torch.cat([iou[: self.ignore_index], iou[self.ignore_index + 1 :]])
        return float(iou.mean())


def image_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255,
               exclude: tuple[int, ...] = ()) -> float:
    """The Dice of one image's class map ``(H, W)``, as the segmentation figures title it.

    Two classes: the foreground (class 1) Dice of :func:`pooled_dice_iou` (upstream's formula, eps 1e-6). More
    classes: the mean over the classes present in the target or the prediction (``exclude``: e.g. a void class) of
    ``2|P_c ∩ G_c| / (|P_c| + |G_c|)``, pixels labelled ``ignore_index`` left out."""
    if num_classes == 2:
        return pooled_dice_iou(pred[None], target[None], ignore_index=ignore_index)[0]
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    scores = []
    for c in range(num_classes):
        if c in exclude:
            continue
        p, g = (pred == c) & valid, (target == c) & valid
        total = int(p.sum()) + int(g.sum())
        if total:
            scores.append(2.0 * int((p & g).sum()) / total)
    return float(np.mean(scores)) if scores else 1.0


# ---------------------------------------------------------------------------------------------------------------------
# UltraBench (training.benchmark): ranking metrics from class scores, split-pooled Dice/IoU over foreground classes
#
# UltraBench's experiments (adamtupper/usaugment-experiments, src/usaugment/models/{classification,segmentation}.py)
# log torchmetrics with its defaults: Accuracy (micro: the plain accuracy), AveragePrecision (macro over classes,
# one-vs-rest; binary AP for 2-class tasks; their key metric), and Dice(ignore_index=0) (micro: TP/FP/FN of every
# foreground class summed over the whole test split). The functions below compute those, plus macro-F1 and AUROC.


def _binary_curve_inputs(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores sorted descending with tied scores grouped: (distinct thresholds, cumulative TP, cumulative FP)."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order].astype(np.float64)
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # the last index of each run of equal scores
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    return s[last], tps, fps


def binary_average_precision(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over the distinct thresholds (sklearn's ``average_precision_score`` and
    torchmetrics' ``BinaryAveragePrecision``); nan without a positive."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    if positive.sum() == 0:
        return math.nan
    _, tps, fps = _binary_curve_inputs(scores, positive)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def binary_auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve (ties count one half: the Mann-Whitney U statistic); nan without both classes."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, np.float64)
    s = scores[order]
    i = 0
    while i < s.size:  # average ranks over ties
        j = i
        while j + 1 < s.size and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ranking_metrics(y_true: Sequence[int], scores: np.ndarray) -> dict:
    """AP and AUROC from class scores ``(N, K)``: binary (class 1 against class 0) for K = 2, else the macro mean of
    one-vs-rest values over the classes that have both positives and negatives."""
    t = np.asarray(y_true, np.int64)
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.shape[0] != t.size:
        raise ValueError(f"scores must be (N, K) with N = {t.size}, got {scores.shape}")
    if scores.shape[1] == 2:
        return {"average_precision": binary_average_precision(scores[:, 1], t == 1),
                "auroc": binary_auroc(scores[:, 1], t == 1)}
    ap = [binary_average_precision(scores[:, c], t == c) for c in range(scores.shape[1])]
    auc = [binary_auroc(scores[:, c], t == c) for c in range(scores.shape[1])]

    def macro(v):
        v = [x for x in v if not math.isnan(x)]
        return float(np.mean(v)) if v else math.nan

    return {"average_precision": macro(ap), "auroc": macro(auc)}


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """``(K, K)`` counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


class SplitSegmentationMeter:
    """Dice and IoU over the foreground classes (1..K-1) of a whole split, UltraBench's definition: TP, FP and FN
    summed over every image and foreground class (``dice`` = 2TP / (2TP + FP + FN), ``iou`` = TP / (TP + FP + FN));
    also per class (``dice_per_class``) and the mean over images of each image's foreground Dice
    (``dice_per_image``; an image with neither foreground in the label nor in the prediction scores 1). Pixels
    labelled ``ignore_index`` are left out."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.tp = np.zeros(num_classes, np.int64)
        self.fp = np.zeros(num_classes, np.int64)
        self.fn = np.zeros(num_classes, np.int64)
        self.image_dice: list[float] = []

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred``, ``target``: ``(B, H, W)`` class indices."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        pred, target = pred.cpu().long(), target.cpu().long()
        valid = torch.ones_like(target, dtype=torch.bool) if self.ignore_index is None else target != self.ignore_index
        for b in range(pred.shape[0]):
            tp = fp = fn = 0
            for c in range(1, self.num_classes):
                p, g = (pred[b] == c) & valid[b], (target[b] == c) & valid[b]
                ctp, cfp, cfn = int((p & g).sum()), int((p & ~g).sum()), int((~p & g).sum())
                self.tp[c] += ctp
                self.fp[c] += cfp
                self.fn[c] += cfn
                tp, fp, fn = tp + ctp, fp + cfp, fn + cfn
            self.image_dice.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))

    def compute(self) -> dict:
        tp, fp, fn = int(self.tp[1:].sum()), int(self.fp[1:].sum()), int(self.fn[1:].sum())
        denom = 2 * tp + fp + fn

        def per_class_dice(c):
            d = 2 * self.tp[c] + self.fp[c] + self.fn[c]
            return float(2 * self.tp[c] / d) if d else math.nan

        return {"dice": float(2 * tp / denom) if denom else 1.0,
                "iou": float(tp / (tp + fp + fn)) if denom else 1.0,
                "dice_per_image": float(np.mean(self.image_dice)) if self.image_dice else math.nan,
                "dice_per_class": [per_class_dice(c) for c in range(1, self.num_classes)],
                "num_samples": len(self.image_dice)}
