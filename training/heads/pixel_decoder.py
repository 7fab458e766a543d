"""Pixel-reconstruction decoder (upstream ``Backbone_DINOv2_VSSM_2.decoder``,
``vmamba_models/dino_vmamba.py:1669-1683`` of XZheng0427/OpenUS at commit 6b9f6d2e)."""

from __future__ import annotations

from torch import nn


class PixelDecoder(nn.Sequential):
    """``Conv2d(C, p*p*3, 1)`` -> ``PixelShuffle(p)``: the last stage map ``(B, C, h, w)`` -> ``(B, 3, p*h, p*w)``.

    A ``Sequential`` so that the keys are upstream's (``0.weight``, ``0.bias``). PyTorch default init, as upstream
    (the decoder is created after the backbone's ``_init_weights``).
    """

    def __init__(self, in_channels: int, patch_size: int = 32, out_channels: int = 3):
        super().__init__(nn.Conv2d(in_channels, patch_size**2 * out_channels, kernel_size=1), nn.PixelShuffle(patch_size))
        self.patch_size = patch_size
