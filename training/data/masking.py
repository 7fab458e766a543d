"""Masks on the 32-pixel grid: the dataset's BEiT-style block masks (upstream
``dataset/datasets_us308k_flexible.py:134-185``) and the self-adaptive mask (``main_openus.py:508-533``,
``utils.py:1191-1232``)."""

from __future__ import annotations

import math
import random

import numpy as np
import torch


def block_mask(
    height: int,
    width: int,
    ratio: float = 0.3,
    rng: random.Random | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    attempts: int = 10,
) -> np.ndarray:
    """BEiT/iBOT block mask ``(height, width)`` bool with about ``ratio * height * width`` cells.

    Blocks of area ~ U((min(h, w) // 3)^2, remaining) and log-uniform aspect ratio are added (up to ``attempts`` tries
    each) until the masked count reaches the target or a block adds nothing.
    """
    rng = rng or random
    mask = np.zeros((height, width), dtype=bool)
    high = ratio * height * width
    min_patches = (min(height, width) // 3) ** 2
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    while count < high:
        max_patches = high - count
        delta = 0
        for _ in range(attempts):
            target = rng.uniform(min_patches, max_patches)
            ar = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target * ar)))
            w = int(round(math.sqrt(target / ar)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                already = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - already <= max_patches:
                    delta = int(h * w - already)
                    mask[top : top + h, left : left + w] = True
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


def mask_schedules(epoch: int, epochs: int, alpha_init: float = 0.1, alpha_final: float = 0.9,
                   alpha_schedule: str = "cosine", adaptive_weighting: bool = True,
                   m_start: float = 0.1, m_span: float = 0.8) -> tuple[float, float]:
    """Per-epoch ``(alpha, m_t)`` of the adaptive mask (``main_openus.py:508-516``).

    ``m_t = m_start + m_span * epoch / epochs``; ``alpha`` goes cosine (or linearly) from ``alpha_init`` to
    ``alpha_final``, or stays ``alpha_init`` without adaptive weighting.
    """
    m_t = m_start + m_span * epoch / epochs
    if not adaptive_weighting:
        return alpha_init, m_t
    if alpha_schedule == "cosine":
        alpha = alpha_init + (alpha_final - alpha_init) * (1 - math.cos(math.pi * epoch / epochs)) / 2
    elif alpha_schedule == "linear":
        alpha = alpha_init + (alpha_final - alpha_init) * epoch / epochs
    elif alpha_schedule == "constant":  # upstream leaves alpha undefined here (a bug); we take alpha_init
        alpha = alpha_init
    else:
        raise ValueError(f"alpha_schedule must be cosine, linear or constant, got {alpha_schedule!r}")
    return alpha, m_t


def _rowwise_minmax(x: torch.Tensor) -> torch.Tensor:
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    return (x - lo) / (hi - lo + 1e-8)


def mask_scores(attention: torch.Tensor, prev_importance: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Token scores ``(B, L)`` from the batch-normalised teacher attention ``(B, L, L)`` and the previous step's
    reconstruction importance averaged over channels ``(B, L)`` (None on the very first step: attention only)."""
    a_t = attention.mean(1)  # column mean: how much every query attends to token j
    if prev_importance is None:
        return a_t
    return alpha * _rowwise_minmax(a_t) + (1 - alpha) * _rowwise_minmax(prev_importance.to(a_t.dtype))


def adaptive_mask(
    scores: torch.Tensor,
    grid: tuple[int, int],
    masking_ratio: float = 0.6,
    threshold: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Upstream ``GlobalAttGuidedMask_2``: per image, the ``int(L * threshold)`` highest-scoring tokens plus tokens
    drawn uniformly from the rest up to ``ceil(L * masking_ratio)``; only the top ones once that count is reached.
    Returns ``(B, h, w)`` bool."""
    batch, num = scores.shape
    n_mask = math.ceil(num * masking_ratio)
    top_k = int(num * threshold)
    mask = torch.zeros(batch, num, dtype=torch.bool, device=scores.device)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)  # [B, L]
    for b in range(batch):
        if top_k < n_mask:
            rest = order[b, top_k:]
            pick = torch.randperm(rest.numel(), generator=generator)[: n_mask - top_k].to(rest.device)
            chosen = torch.cat([order[b, :top_k], rest[pick]])
        else:
            chosen = order[b, :n_mask]
        mask[b, chosen] = True
    return mask.view(batch, *grid)
