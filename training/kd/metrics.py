"""Upstream's mIoU (`iouEval`, spec §5.3): TP/FP/FN accumulated over the whole split at the logits' (1/4)
resolution; pixels whose label is the ignore/void class are left out of FP; IoU_c = TP/(TP+FP+FN+1e-15); the mean
runs over the real classes, a class absent from both label and prediction counting as 0."""

from __future__ import annotations

import torch


class IoUAccumulator:
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
        k = self.num_classes
        for c in range(k):
            p, g = pred == c, label == c
            self.tp[c] += (p & g).sum()
            self.fp[c] += (p & ~g & valid).sum()
            self.fn[c] += (~p & g).sum()

    def state(self) -> torch.Tensor:
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
