"""Per-iteration schedules (DINO/iBOT ``cosine_scheduler``, upstream OpenUS ``utils.py:215-226``)."""

from __future__ import annotations

import numpy as np


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """``epochs * niter_per_ep`` values: linear warm-up from ``start_warmup_value`` over ``warmup_epochs``, then a
    half cosine from ``base_value`` to ``final_value``. Indexed by the global iteration."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule
