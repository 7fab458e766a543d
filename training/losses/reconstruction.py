"""Masked pixel reconstruction loss and the "reconstruction importance" EMA map (upstream
``vmamba_models/dino_vmamba.py:1697-1727, 1779-1822`` of XZheng0427/OpenUS at commit 6b9f6d2e)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _pixel_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, h, w) bool cells -> (B, 1, h*p, w*p) float, nearest upsampling."""
    return mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)[:, None].float()


def reconstruction_loss(x_rec: torch.Tensor, x_orig: torch.Tensor, mask: torch.Tensor, patch_size: int = 32) -> torch.Tensor:
    """Mean squared error over masked pixels x 3 channels: ``sum((x - x_rec)^2 * m) / (sum(m) + 1e-5) / 3``.

    ``x_rec``, ``x_orig``: (B, 3, H, W) normalised pixels (no per-patch normalisation); ``mask``: (B, H/p, W/p) bool.
    """
    m = _pixel_mask(mask, patch_size)  # [B, 1, H, W]
    return ((x_orig - x_rec) ** 2 * m).sum() / (m.sum() + 1e-5) / x_orig.shape[1]


def patch_pixel_loss(x_rec: torch.Tensor, x_orig: torch.Tensor, mask: torch.Tensor, patch_size: int = 32) -> torch.Tensor:
    """Per-cell masked loss ``(B, h*w)``: channel-mean squared error, zeroed off the mask, averaged per p x p cell."""
    pixel = ((x_rec - x_orig) ** 2).mean(dim=1, keepdim=True) * _pixel_mask(mask, patch_size)  # [B, 1, H, W]
    return F.avg_pool2d(pixel, kernel_size=patch_size, stride=patch_size).flatten(1)  # [B, h*w]


class ReconstructionImportance(nn.Module):
    """Upstream ``update_ema_loss_map``: an EMA over steps of the batch-mean per-cell reconstruction loss.

    ``forward(patch_loss (B, L), channels)`` returns the importance ``(B, channels, L)`` (the loss repeated over the
    last stage's channels, as upstream):

    * first call (``initialized`` False): ``ema <- mean_b(loss)``; returns the raw loss;
    * later calls with ``self.training``: ``ema <- m * ema + (1 - m) * mean_b(loss)``, returns
      ``m * loss + (1 - m) * ema`` with the updated ema (m = 0.7);
    * later calls in eval mode: no update, returns the raw loss (upstream leaves this case unspecified).

    The importance is a detached signal for the next step's mask (it never carries gradients). ``ema_loss_map`` is
    kept as ``(channels, L)`` like upstream's buffer so that its checkpoints load unchanged; it is a persistent buffer
    here (zeros until the first call) instead of upstream's ``None``.
    """

    def __init__(self, channels: int, num_cells: int = 49, momentum: float = 0.7):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("ema_loss_map", torch.zeros(channels, num_cells))
        self.register_buffer("ema_initialized", torch.tensor(False))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "ema_loss_map"
        if key in state_dict and state_dict[key].shape != self.ema_loss_map.shape:  # another crop size
            self.ema_loss_map = torch.zeros_like(state_dict[key], device=self.ema_loss_map.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset(self) -> None:
        self.ema_loss_map.zero_()
        self.ema_initialized.fill_(False)

    @torch.no_grad()
    def forward(self, patch_loss: torch.Tensor) -> torch.Tensor:
        channels = self.ema_loss_map.shape[0]
        loss = patch_loss.detach()[:, None, :].expand(-1, channels, -1)  # [B, C, L]
        if loss.shape[-1] != self.ema_loss_map.shape[-1]:  # another crop size: re-shape the map, start over
            self.ema_loss_map = loss.new_zeros(channels, loss.shape[-1])
            self.ema_initialized.fill_(False)
        if not bool(self.ema_initialized):
            self.ema_loss_map.copy_(loss.mean(0))
            self.ema_initialized.fill_(True)
            return loss.clone()
        if not self.training:
            return loss.clone()
        m = self.momentum
        self.ema_loss_map.mul_(m).add_(loss.mean(0), alpha=1 - m)
        return m * loss + (1 - m) * self.ema_loss_map
