"""Hierarchical context loss (ReviewKD's `hcl`, TransKD ``CSF.py:139-156`` of RuipingL/TransKD at commit 39ab795d).

Per stage: MSE of the full maps plus MSE of 4x4, 2x2 and 1x1 average-pooled maps with weights 1, 1/2, 1/4, 1/8,
divided by the sum of the weights used (1.875 when no level is skipped). A level l is skipped when l >= the map's
*height* (width is not looked at, as upstream), and each level that is used halves the weight of the next, so at
height 4 the levels are full/2x2/1x1 with weights 1, 1/2, 1/4 and normaliser 1.75. Stages are summed with equal
weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PYRAMID_LEVELS = (4, 2, 1)


def _stage_loss(student: torch.Tensor, teacher: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    height = student.shape[2]
    loss = F.mse_loss(student, teacher)
    weight, total = 1.0, 1.0
    for level in levels:
        if level >= height:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, level), F.adaptive_avg_pool2d(teacher, level))
        total += weight
    return loss / total


def hierarchical_context_loss_per_stage(
    student: list[torch.Tensor], teacher: list[torch.Tensor], levels: tuple[int, ...] = PYRAMID_LEVELS
) -> list[torch.Tensor]:
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student maps vs {len(teacher)} teacher maps")
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise ValueError(f"student map {tuple(s.shape)} and teacher map {tuple(t.shape)} differ")
    return [_stage_loss(s, t, levels) for s, t in zip(student, teacher)]


def hierarchical_context_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], levels: tuple[int, ...] = PYRAMID_LEVELS
) -> torch.Tensor:
    total = 0.0
    for stage_loss in hierarchical_context_loss_per_stage(student, teacher, levels):
        total = total + stage_loss
    return total
