"""torch.distributed set-up from torchrun's environment (gloo on CPU, nccl on GPU), and the collectives the jobs use.
Without torchrun (or with one process) every helper works as the single-process identity."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["all_gather_object", "all_reduce_sum", "any_true", "barrier", "cleanup", "init_distributed", "is_dist",
           "on_rank0"]


def init_distributed() -> tuple[int, int, torch.device]:
    """Returns (rank, world_size, device). Initialises the process group when launched by torchrun."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device, backend = torch.device("cuda", local), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
        return rank, world, device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place; returns it."""
    if is_dist():
        dist.all_reduce(t)
    return t


def on_rank0(fn):
    """Run ``fn()`` on rank 0 only (file-system checks, choosing a checkpoint); every rank returns its result, or
    raises the exception it raised, so all ranks stop together with the same one-line error."""
    if not is_dist():
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [(True, fn())]
        except Exception as err:  # re-raised on every rank below
            box = [(False, err)]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def barrier() -> None:
    if is_dist():
        dist.barrier()


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any."""
    if not is_dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
