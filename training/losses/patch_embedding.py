"""Patch-embedding loss: sum over stages of w_s * MSE(aligned student tokens, teacher tokens), w = (0.1, 0.1, 0.5, 1.0)
(upstream `--embed-weights`; ``train_TransKDBase.py:258-263, 565`` of RuipingL/TransKD at commit 39ab795d)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_STAGE_WEIGHTS = (0.1, 0.1, 0.5, 1.0)


class PatchEmbeddingLoss(torch.nn.Module):
    def __init__(self, stage_weights: tuple[float, ...] = DEFAULT_STAGE_WEIGHTS):
        super().__init__()
        self.stage_weights = tuple(float(w) for w in stage_weights)

    def per_stage(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        if not (len(student) == len(teacher) == len(self.stage_weights)):
            raise ValueError(f"need {len(self.stage_weights)} stages, got {len(student)} student / {len(teacher)} "
                             "teacher embeddings")
        for s, t in zip(student, teacher):
            if s.shape != t.shape:
                raise ValueError(f"student embedding {tuple(s.shape)} and teacher embedding {tuple(t.shape)} differ")
        return [F.mse_loss(s, t) for s, t in zip(student, teacher)]

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for w, loss in zip(self.stage_weights, self.per_stage(student, teacher)):
            total = total + w * loss
        return total
