"""Throughput of one OpenUS pretraining step (teacher + adaptive mask + student on 2 global and N local crops +
losses + backward + AdamW + EMA), on random inputs, one process.

    python -m benchmarks.bench_pretrain --device cuda                 # openus-small, paper batch 32 per GPU
    python -m benchmarks.bench_pretrain --tiny --batch-size 2 --steps 2  # CPU smoke run

Run from the repository root (``-m``): it imports ``training``, which is not installed.

Prints images/s (images = source images, each giving 2 + N crops), seconds per step and peak memory.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from openus_hub import OpenUSConfig
from training.losses.ibot_loss import IBOTLoss
from training.pretrain import DEFAULTS, forward_step
from training.ssl_meta_arch import (
    OpenUSPretrainNetwork,
    build_teacher,
    clip_gradients,
    ema_update,
    param_groups,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--tiny", action="store_true", help="tiny model, 64/32 px crops, small head (CPU smoke)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.tiny:
        config = OpenUSConfig(embed_dim=8, depths=[1, 1, 1, 2], drop_path_rate=0.1, use_mask_token=True)
        head = dict(out_dim=32, patch_out_dim=32, hidden_dim=32, bottleneck_dim=16)
        g_size, l_size = 64, 32
    else:
        config = OpenUSConfig.from_preset("openus-small", use_mask_token=True)
        head = dict(out_dim=8192, patch_out_dim=8192, hidden_dim=2048, bottleneck_dim=256)
        g_size, l_size = 224, 96
    student = OpenUSPretrainNetwork(config, head).to(device).train()
    teacher = build_teacher(student, head).to(device).eval()
    loss_fn = IBOTLoss(head["out_dim"], head["patch_out_dim"], 2, args.local_crops, 0.04, 0.04, 0.04, 0.07, 30, 151).to(device)
    opt = torch.optim.AdamW(param_groups(student), lr=5e-4)
    b, n = args.batch_size, args.local_crops
    globals_ = torch.randn(2 * b, 3, g_size, g_size, device=device)
    locals_ = torch.randn(n * b, 3, l_size, l_size, device=device) if n else None
    grid = g_size // 32
    g_masks = torch.rand(2 * b, grid, grid, device=device) < 0.3
    l_masks = torch.rand(n * b, l_size // 32, l_size // 32, device=device) < 0.3 if n else None
    mcfg = DEFAULTS["masking"]
    prev = None

    def step():
        nonlocal prev
        loss, _, _, _, prev = forward_step(student, teacher, loss_fn, globals_, locals_, g_masks, l_masks, prev, 1,
                                           151, mcfg, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(student, 3.0)
        opt.step()
        ema_update(student, teacher, 0.996)
        return loss

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    peak = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU" if device.type == "cuda"
            else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS")
    name = "tiny" if args.tiny else "openus-small"
    sys.stdout.write(f"{name} on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}): "
                     f"batch {b} x (2 global {g_size}px + {n} local {l_size}px), {dt:.3f} s/step, "
                     f"{b / dt:.1f} images/s, peak {peak}, loss {float(loss.detach()):.3f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
