"""GL-Mixer: global-local context mixer on the deepest student embedding (TransKD ``CSF_GLMixer.py:72-133``,
RuipingL/TransKD at commit 39ab795d).

mixed = alpha * MHSA(e) + beta * GLU(e) (+ e with `add`), where GLU is Conv1d(t) * sigmoid(Conv1d'(t)) over the
raster-flattened token sequence (1-D: horizontal neighbours, wrapping at row ends, as upstream).

Initial alpha and beta: upstream declares both as `nn.Parameter(torch.FloatTensor(1))` and never initialises them
(``CSF_GLMixer.py:101-102``: their value is whatever memory holds). We initialise both to 1.0 by default (`alpha_init`,
`beta_init`), i.e. an even sum of the global and local branches; the parity tests load the fixture's values.
"""

from __future__ import annotations

import torch
from torch import nn


class GLMultiHeadSelfAttention(nn.Module):
    """Plain MHSA over all tokens: `qkv` Linear(C, 3C, no bias) (q, k, v in that order), scale head_dim^-0.5,
    softmax over keys, `proj` Linear(C, C)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, N, hd]
        attn = (q @ k.transpose(-2, -1)) * self.scale  # [B, heads, N, N]
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)  # [B, N, C]
        return self.proj(out)


class GlobalLocalMixer(nn.Module):
    """Upstream names: `attn4` -> `attn`, `conv1` -> `value_conv`, `conv2` -> `gate_conv`, `atten_weight` -> `alpha`,
    `conv_weight` -> `beta`. PyTorch default init for the layers (upstream's `_init_weights` is never applied)."""

    def __init__(self, dim: int, num_heads: int, add: bool = False, alpha_init: float = 1.0, beta_init: float = 1.0):
        super().__init__()
        self.add = add
        self.attn = GLMultiHeadSelfAttention(dim, num_heads)
        self.value_conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.gate_conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))
        self.beta = nn.Parameter(torch.full((1,), float(beta_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, C]
        t = x.transpose(1, 2)  # [B, C, N]
        local = (self.value_conv(t) * torch.sigmoid(self.gate_conv(t))).transpose(1, 2)  # [B, N, C]
        mixed = self.alpha * self.attn(x) + self.beta * local
        return mixed + x if self.add else mixed
