"""Random-number state of a run, as plain data (so checkpoints load with ``torch.load(weights_only=True)``), and the
per-step seeds that make resuming exact.

Every job re-seeds torch from ``step_seed(seed, step, rank)`` before each step, so the draws of a step (DropPath,
dropout, random mask cells) depend on where the run is, not on how it got there.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["rng_state", "seed_everything", "set_rng_state", "step_seed"]


def step_seed(*keys: int) -> int:
    """A 32-bit seed derived from integer keys, e.g. ``(seed, step, rank)``, with numpy's ``SeedSequence``."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed torch, Python's ``random`` and numpy's global generator."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict:
    """torch / python / numpy (/ CUDA) generator states, as tensors, tuples and numbers only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
