"""FLOP counting with TransKD's README convention (its table: B2 113.84, B0 13.67 GFLOPs): multiply-accumulates of
the modules, counted as
"FLOPs", at a 1x3x512x1024 input, *without* the attention matmuls (q@k, attn@v) and the bilinear upsampling. This is
what fvcore reports for Conv/Linear/norm modules (fvcore's norm costs: LayerNorm 5 per element with affine,
BatchNorm in eval 2 per element with affine), minus the `matmul` and `upsample` entries.

Module hooks only, so it runs on the meta device (`count_flops(model, shape, device="meta")`) in milliseconds.
"""

from __future__ import annotations

import torch
from torch import nn


def _hook_flops(module: nn.Module, inputs, output) -> int:
    out = output[0] if isinstance(output, (tuple, list)) else output
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        k = 1
        for size in module.kernel_size:
            k *= size
        return out.numel() * (module.in_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    if isinstance(module, nn.LayerNorm):
        return out.numel() * (5 if module.elementwise_affine else 4)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return out.numel() * (2 if module.affine else 1) if not module.training else out.numel() * (5 if module.affine else 4)
    return 0


@torch.no_grad()
def count_flops(model: nn.Module, input_shape=(1, 3, 512, 1024), device: str | torch.device = "cpu",
                forward=None) -> int:
    """MACs of Conv/Linear/norm modules for one forward of `model` (eval mode) on a zero input of `input_shape`.
    `forward(model, x)` overrides how the model is called (default `model(x)`)."""
    counted = [0]
    handles = []
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
            handles.append(module.register_forward_hook(lambda m, i, o: counted.__setitem__(0, counted[0] + _hook_flops(m, i, o))))
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(input_shape, device=device)
        forward(model, x) if forward is not None else model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return counted[0]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
