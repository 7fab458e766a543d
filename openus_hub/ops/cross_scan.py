"""SS2D cross-scan and cross-merge (VMamba): the four scan orders of a 2-D feature map, as pure index operations.

Directions, for a map of ``H x W`` positions flattened to ``L = H * W`` (upstream cross-scan,
``vmamba_models/csm_triton.py:22-53`` in XZheng0427/OpenUS):

* ``k = 0``: row-major, ``l = h * W + w``
* ``k = 1``: column-major, ``l = w * H + h``
* ``k = 2``: ``k = 0`` reversed
* ``k = 3``: ``k = 1`` reversed

``cross_merge`` is the adjoint of ``cross_scan``: it maps each direction back to row-major order and sums them.
Both are built from ``flatten``/``transpose``/``flip``, so autograd gives the exact adjoint for free.
"""

from __future__ import annotations

import torch

__all__ = ["cross_scan", "cross_merge", "scan_order"]


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """``(B, D, H, W)`` -> ``(B, 4, D, L)``: the four scan orders of a channel-first map."""
    row = x.flatten(2)  # [B, D, L] row-major
    col = x.transpose(2, 3).flatten(2)  # [B, D, L] column-major
    fwd = torch.stack([row, col], dim=1)  # [B, 2, D, L]
    return torch.cat([fwd, fwd.flip(-1)], dim=1)  # [B, 4, D, L]


def cross_merge(ys: torch.Tensor) -> torch.Tensor:
    """``(B, 4, D, H, W)`` -> ``(B, D, L)``: undo each scan order and sum, as upstream's ``CrossMergeF``.

    The summation order ``(y0 + flip(y2)) + T(y1 + flip(y3))`` follows upstream so fp32 rounding matches.
    """
    b, _, d, h, w = ys.shape
    ys = ys.flatten(3)  # [B, 4, D, L]
    ys = ys[:, 0:2] + ys[:, 2:4].flip(-1)  # [B, 2, D, L]
    col = ys[:, 1].view(b, d, w, h).transpose(2, 3).flatten(2)  # column-major -> row-major
    return ys[:, 0] + col  # [B, D, L]


def scan_order(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """``(4, L)`` long tensor: ``order[k, l]`` is the row-major position visited at step ``l`` of direction ``k``."""
    grid = torch.arange(height * width, device=device).view(height, width)
    row, col = grid.flatten(), grid.t().flatten()
    return torch.stack([row, col, row.flip(0), col.flip(0)])
