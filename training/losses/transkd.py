"""TransKD's total loss, summed in upstream's order (``train_TransKDBase.py:242-263`` of RuipingL/TransKD at commit
39ab795d):

    loss = hcl * lambda_hcl + ce
    loss += w_s * mse(pe_s)      for s = 1..4

No logit distillation (upstream's `--kd-tau/--kd-alpha` are never used).
"""

from __future__ import annotations

import torch

from .hcl import PYRAMID_LEVELS, hierarchical_context_loss_per_stage
from .patch_embedding import DEFAULT_STAGE_WEIGHTS, PatchEmbeddingLoss
from .weighted_ce import WeightedCrossEntropyLoss


class TransKDLoss(torch.nn.Module):
    def __init__(self, ce: WeightedCrossEntropyLoss, hcl_weight: float = 1.0,
                 embed_weights: tuple[float, ...] = DEFAULT_STAGE_WEIGHTS, hcl_levels: tuple[int, ...] = PYRAMID_LEVELS):
        super().__init__()
        self.ce = ce
        self.hcl_weight = float(hcl_weight)
        self.hcl_levels = tuple(hcl_levels)
        self.pe = PatchEmbeddingLoss(embed_weights)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, fused_features: list[torch.Tensor],
                teacher_features: list[torch.Tensor], aligned_embeddings: list[torch.Tensor],
                teacher_embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (total, parts): parts has `ce`, `hcl`, `hcl.{s}`, `pe.{s}` (unweighted MSE) and `pe` (weighted)."""
        hcl_stages = hierarchical_context_loss_per_stage(fused_features, teacher_features, self.hcl_levels)
        hcl = hcl_stages[0]
        for stage_loss in hcl_stages[1:]:
            hcl = hcl + stage_loss
        ce = self.ce(logits, labels)
        loss = hcl * self.hcl_weight + ce
        pe_stages = self.pe.per_stage(aligned_embeddings, teacher_embeddings)
        pe = 0.0
        for w, pe_s in zip(self.pe.stage_weights, pe_stages):
            loss = loss + w * pe_s
            pe = pe + w * pe_s
        parts = {"ce": ce.detach(), "hcl": hcl.detach(), "pe": pe.detach()}
        parts.update({f"hcl.{s}": v.detach() for s, v in enumerate(hcl_stages)})
        parts.update({f"pe.{s}": v.detach() for s, v in enumerate(pe_stages)})
        return loss, parts
