"""CSF: cross selective fusion (TransKD ``CSF.py:6-130``, classes ``SK`` and ``SKF``; RuipingL/TransKD at commit
39ab795d).

A ReviewKD-style review path run deep to shallow. Each stage projects the student map to `mid` channels, fuses it
with the nearest-upsampled residual of the deeper stage through SKNet channel attention (a softmax over the two
branches, per channel), and maps the result to the teacher's width for the hierarchical context loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelectiveFusion(nn.Module):
    """One CSF stage (upstream class `SK`). Submodule names follow upstream so the state-dict keys line up:
    `conv1` (1x1 -> mid, BN), `conv2` (3x3 -> out, BN), and with `fuse`: `fc` (1x1 -> hidden, BN, ReLU),
    `fc1` (1x1 -> hidden, ReLU: upstream's batch-size-1 path, own weights, no BN) and `fcs` (two 1x1 hidden -> mid)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        hidden = max(mid_channels // 16, 32)
        self.fuse = fuse
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        if fuse:
            self.fc = nn.Sequential(nn.Conv2d(mid_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())
            # BatchNorm in train mode cannot normalise one value per channel, so upstream switches to this
            # un-normalised copy when the batch has a single sample (CSF.py:27-30, 53-56: e.g. the odd last batch).
            self.fc1 = nn.Sequential(nn.Conv2d(mid_channels, hidden, 1, bias=False), nn.ReLU())
            self.fcs = nn.ModuleList(nn.Conv2d(hidden, mid_channels, 1) for _ in range(2))
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x: student map (B, C_in, H, W); residual: the deeper stage's fused map (B, mid, h, w).
        Returns (teacher-width output (B, C_out, H, W), fused map passed on (B, mid, H, W), branch weights
        (B, 2, mid, 1, 1) or None)."""
        x = self.conv1(x)  # [B, mid, H, W]
        weights = None
        if self.fuse:
            if residual is None:
                raise ValueError("a fusing CSF stage needs the deeper stage's residual")
            y = F.interpolate(residual, size=x.shape[-2:], mode="nearest")  # [B, mid, H, W]
            pooled = (x + y).mean(dim=(2, 3), keepdim=True)  # [B, mid, 1, 1]
            z = self.fc1(pooled) if x.shape[0] == 1 else self.fc(pooled)  # [B, hidden, 1, 1]
            logits = torch.stack([self.fcs[0](z), self.fcs[1](z)], dim=1)  # [B, 2, mid, 1, 1]
            weights = logits.softmax(dim=1)
            x = weights[:, 0] * x + weights[:, 1] * y
        return self.conv2(x), x, weights


class CrossSelectiveFusion(nn.Module):
    """All four CSF stages. `fusions[s]` serves student stage s (shallow to deep); upstream's `skfs` list holds the
    same modules deep to shallow (`skfs.0` = stage 4), see `upstream_keys.py`. The deepest stage does not fuse."""

    def __init__(self, in_channels: list[int], out_channels: list[int], mid_channels: int = 64):
        super().__init__()
        if len(in_channels) != len(out_channels):
            raise ValueError(f"in_channels {in_channels} and out_channels {out_channels} differ in length")
        last = len(in_channels) - 1
        self.fusions = nn.ModuleList(
            SelectiveFusion(c_in, mid_channels, c_out, fuse=s < last)
            for s, (c_in, c_out) in enumerate(zip(in_channels, out_channels))
        )

    def forward(
        self, features: list[torch.Tensor], return_weights: bool = False
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """features: student stage maps, shallow to deep. Returns the teacher-width maps, shallow to deep (and the SK
        branch weights per stage with `return_weights`)."""
        outputs: list[torch.Tensor | None] = [None] * len(features)
        weights: list[torch.Tensor | None] = [None] * len(features)
        residual = None
        for s in range(len(features) - 1, -1, -1):  # deep to shallow
            outputs[s], residual, weights[s] = self.fusions[s](features[s], residual)
        return (outputs, weights) if return_weights else outputs
