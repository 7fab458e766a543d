"""PEA: patch-embedding alignment (TransKD ``CSF.py:81-85, 109-114``, RuipingL/TransKD at commit 39ab795d): one
Linear(C_s -> C_t) per stage on the embedding tokens."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbeddingAlignment(nn.Module):
    """`proj[s]` maps student tokens (B, N_s, C_s) to the teacher width (B, N_s, C_t). PyTorch's default Linear init,
    as upstream."""

    def __init__(self, in_channels: list[int], out_channels: list[int]):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(c_in, c_out) for c_in, c_out in zip(in_channels, out_channels))

    def forward(self, embeddings: list[torch.Tensor]) -> list[torch.Tensor]:
        return [proj(e) for proj, e in zip(self.proj, embeddings)]
