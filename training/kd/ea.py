"""EA: embedding assistant (TransKD ``CSF_EA.py:80-143``, RuipingL/TransKD at commit 39ab795d).

Four extra teacher-width overlapping patch embeddings (Conv then LayerNorm eps 1e-5) fed with the same tensors as the
student's own patch embeddings (the image, then student stage outputs f1..f3), mixed with PEA by learnable scalars:
e_s = w_s * PEA_s(e_s^student) + w_{s+4} * PE_s(input_s), w initialised to 0.1 * (i + 1) (0.1..0.4 for PEA,
0.5..0.8 for EA). Gradients of the embedding loss therefore also reach f1..f3 through PE2..PE4.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class OverlapPatchEmbed(nn.Module):
    """Conv(k, stride, pad k//2) -> tokens -> LayerNorm (eps 1e-5); SegFormer's init (conv normal(0, sqrt(2/fan_out)),
    LayerNorm 1/0), as upstream's `OverlapPatchEmbed`."""

    def __init__(self, in_channels: int, out_channels: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(out_channels)
        fan_out = patch_size * patch_size * out_channels
        nn.init.normal_(self.proj.weight, 0.0, math.sqrt(2.0 / fan_out))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, H, W] -> [B, N, C_out]
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class EmbeddingAssistant(nn.Module):
    def __init__(
        self,
        in_channels: list[int],
        out_channels: list[int],
        num_channels: int = 3,
        patch_sizes: tuple[int, ...] = (7, 3, 3, 3),
        strides: tuple[int, ...] = (4, 2, 2, 2),
    ):
        super().__init__()
        sources = [num_channels] + list(in_channels[:-1])  # image, then student stage outputs f1..f3
        self.patch_embeds = nn.ModuleList(
            OverlapPatchEmbed(c_in, c_out, k, s) for c_in, c_out, k, s in zip(sources, out_channels, patch_sizes, strides)
        )
        n = len(out_channels)
        self.fuse_weights = nn.ParameterList(nn.Parameter(torch.full((1,), 0.1 * (i + 1))) for i in range(2 * n))

    def forward(
        self, aligned: list[torch.Tensor], pixel_values: torch.Tensor, student_features: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """aligned: PEA outputs (B, N_s, C_t). Returns (mixed embeddings, the EA patch-embed outputs)."""
        n = len(aligned)
        inputs = [pixel_values] + list(student_features[: n - 1])
        assist = [pe(x) for pe, x in zip(self.patch_embeds, inputs)]
        mixed = [self.fuse_weights[s] * aligned[s] + self.fuse_weights[s + n] * assist[s] for s in range(n)]
        return mixed, assist
