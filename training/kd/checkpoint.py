"""RNG state as plain data (so checkpoints load with ``torch.load(weights_only=True)``) and a sum all-reduce.

Atomic saving, loading and the process-group set-up are shared with pretraining: ``training.utils.checkpoint`` and
``training.utils.distributed``.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist


def rng_state() -> dict:
    """torch / python / numpy (/ CUDA) generator states, as tensors, tuples and ints only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t
