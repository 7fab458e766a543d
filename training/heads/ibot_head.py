"""iBOT projection head (upstream ``models/head.py:65-199``, ``iBOTHead``, XZheng0427/OpenUS at commit 6b9f6d2e).

3-layer MLP (Linear -> GELU -> Linear -> GELU -> Linear to the bottleneck, no norm), L2-normalisation, then two
weight-normalised linear layers: ``last_layer`` for the CLS token and ``last_layer2`` for the patch tokens. The
teacher's head is *shared* (``last_layer2 is last_layer``). Parameter names equal upstream's
(``mlp.{0,2,4}``, ``last_layer{,2}.weight_{g,v}``) so upstream checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """``torch.nn.utils.weight_norm(nn.Linear(in, out, bias=False))``: W = g * v / ||v||_row.

    Written out (instead of the deprecated hook or the parametrization API) so that the state-dict keys stay
    ``weight_g (out, 1)`` / ``weight_v (out, in)`` as in upstream checkpoints. ``v`` keeps nn.Linear's default init and
    ``g`` starts at 1; with ``freeze_g`` (upstream ``norm_last_layer=True``) g is not trained.
    """

    def __init__(self, in_features: int, out_features: int, freeze_g: bool = True):
        super().__init__()
        weight = nn.Linear(in_features, out_features, bias=False).weight.detach()
        self.weight_v = nn.Parameter(weight.clone())  # [out, in]
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not freeze_g)  # [out, 1]

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class IBOTHead(nn.Module):
    """Tokens ``(B, 1 + L, in_dim)`` -> ``(cls (B, out_dim), patch (B, L, patch_out_dim))``.

    Args:
        in_dim: backbone width (768 for openus-small).
        out_dim / patch_out_dim: prototypes for the CLS / patch tokens (8192 / 8192 in the paper).
        hidden_dim / bottleneck_dim: MLP widths (2048 / 256).
        shared_head: the patch layer is the CLS layer (the teacher's head).
        norm_last_layer: freeze the weight-norm gains at 1.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 8192,
        patch_out_dim: int = 8192,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        shared_head: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_g=norm_last_layer)
        if shared_head:
            if patch_out_dim != out_dim:
                raise ValueError(f"a shared head needs patch_out_dim == out_dim, got {patch_out_dim} vs {out_dim}")
            self.last_layer2 = self.last_layer
        else:
            self.last_layer2 = WeightNormLinear(bottleneck_dim, patch_out_dim, freeze_g=norm_last_layer)

    @property
    def shared(self) -> bool:
        return self.last_layer2 is self.last_layer

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.normalize(self.mlp(tokens), dim=-1, p=2)  # [B, 1+L, bottleneck]
        return self.last_layer(z[:, 0]), self.last_layer2(z[:, 1:])  # [B, K], [B, L, K']
