"""iBOT loss with centering (upstream ``main_openus.py:641-736``, ``iBOTLoss``; XZheng0427/OpenUS at commit
6b9f6d2e)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..common.distributed import all_reduce_sum


class IBOTLoss(nn.Module):
    """CLS cross-entropy over every (teacher global q, student crop v != q) pair plus the masked patch
    cross-entropy on the student's own global view (v == q), with teacher centering and sharpening.

    ``forward(student_cls, student_patch, teacher_cls, teacher_patch, masks, epoch)``:

    * ``student_cls`` (n_crops * B, K): global crops first, then local crops; ``student_patch`` (n_global * B, L, K');
    * ``teacher_cls`` (n_global * B, K), ``teacher_patch`` (n_global * B, L, K'): raw (un-centered) outputs;
    * ``masks`` (n_global * B, h, w) bool: the positions the patch loss is taken on.

    Returns ``{'cls', 'patch', 'loss'}``. The centers are updated afterwards (all-reduced mean over every rank's batch,
    momentum ``center_momentum``); they are buffers, so they travel in ``state_dict()``.
    """

    def __init__(
        self,
        out_dim: int,
        patch_out_dim: int,
        n_global_crops: int,
        n_local_crops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp2: float,
        teacher_temp2: float,
        warmup_teacher_temp_epochs: int,
        epochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_momentum2: float = 0.9,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
    ):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_momentum2 = center_momentum2
        self.n_global, self.n_local = n_global_crops, n_local_crops
        self.lambda1, self.lambda2 = lambda1, lambda2
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))
        self.teacher_temp_schedule = teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epochs)
        self.teacher_temp2_schedule = teacher_temp_schedule(warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs, epochs)

    def forward(
        self,
        student_cls: torch.Tensor,
        student_patch: torch.Tensor,
        teacher_cls: torch.Tensor,
        teacher_patch: torch.Tensor,
        masks: torch.Tensor,
        epoch: int,
    ) -> dict[str, torch.Tensor]:
        temp = float(self.teacher_temp_schedule[epoch])
        temp2 = float(self.teacher_temp2_schedule[epoch])
        s_cls = (student_cls / self.student_temp).chunk(self.n_global + self.n_local)
        s_patch = (student_patch / self.student_temp).chunk(self.n_global)
        t_cls = F.softmax((teacher_cls - self.center) / temp, dim=-1).detach().chunk(self.n_global)
        t_patch = F.softmax((teacher_patch - self.center2) / temp2, dim=-1).detach().chunk(self.n_global)
        masks = masks.flatten(1).chunk(self.n_global)  # [B, L] each

        loss_cls, n_cls, loss_patch, n_patch = 0.0, 0, 0.0, 0
        for q in range(self.n_global):
            for v in range(self.n_global + self.n_local):
                if v == q:
                    ce = torch.sum(-t_patch[q] * F.log_softmax(s_patch[v], dim=-1), dim=-1)  # [B, L]
                    m = masks[v].float()
                    loss_patch = loss_patch + (torch.sum(ce * m, dim=-1) / m.sum(dim=-1).clamp(min=1.0)).mean()
                    n_patch += 1
                else:
                    ce = torch.sum(-t_cls[q] * F.log_softmax(s_cls[v], dim=-1), dim=-1)  # [B]
                    loss_cls = loss_cls + ce.mean()
                    n_cls += 1
        loss_cls = loss_cls / n_cls * self.lambda1
        loss_patch = loss_patch / n_patch * self.lambda2
        self.update_center(teacher_cls, teacher_patch)
        return {"cls": loss_cls, "patch": loss_patch, "loss": loss_cls + loss_patch}

    @torch.no_grad()
    def update_center(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        """``c <- m c + (1 - m) mean(teacher)``, the mean over every rank's batch (patch: over all L tokens too)."""
        cls_sum = teacher_cls.sum(dim=0, keepdim=True)  # [1, K]
        patch_sum = teacher_patch.mean(1).sum(dim=0, keepdim=True)  # [1, K']
        count = torch.tensor([float(teacher_cls.shape[0])], device=teacher_cls.device)
        for t in (cls_sum, patch_sum, count):
            all_reduce_sum(t)
        self.center.mul_(self.center_momentum).add_(cls_sum / count, alpha=1 - self.center_momentum)
        self.center2.mul_(self.center_momentum2).add_((patch_sum / count)[:, None], alpha=1 - self.center_momentum2)


def teacher_temp_schedule(warmup: float, final: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear ``warmup -> final`` over ``warmup_epochs``, then ``final``."""
    warmup_epochs = min(warmup_epochs, epochs)
    return np.concatenate((np.linspace(warmup, final, warmup_epochs), np.ones(epochs - warmup_epochs) * final))
