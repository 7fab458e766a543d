"""Selective scan (Mamba S6) reference in pure PyTorch.

This is the readable definition every faster path is tested against. It follows the signature of
``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (grouped ``B``/``C``), computes in float32 and
loops over the sequence, exactly like upstream VMamba's ``selective_scan_torch`` (``vmamba_models/csms6s.py:25-68``
in XZheng0427/OpenUS):

    delta(t) = softplus(delta_raw(t) + delta_bias)
    h(t)     = exp(delta(t) * A) * h(t-1) + delta(t) * B(t) * u(t),      h(0) = 0
    y(t)     = <C(t), h(t)> + D * u(t)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_reference"]


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
) -> torch.Tensor:
    """Sequential selective scan.

    Args:
        u: ``(batch, G * D, L)`` input sequence, channel ``c = g * D + d``.
        delta: ``(batch, G * D, L)`` step sizes before ``delta_bias`` and softplus.
        A: ``(G * D, N)`` state matrix (negative for a stable recurrence).
        B: ``(batch, G, N, L)`` input projection, shared by the ``D`` channels of group ``g``.
        C: ``(batch, G, N, L)`` output projection, grouped like ``B``.
        D: ``(G * D,)`` skip connection, or ``None``.
        delta_bias: ``(G * D,)`` added to ``delta`` before the softplus, or ``None``.
        delta_softplus: apply softplus to the biased ``delta``.

    Returns:
        ``(batch, G * D, L)`` float32 output.
    """
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    batch, channels, length = u.shape
    groups, state = B.shape[1], B.shape[2]
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # repeat each group's B/C over its channels
    B = B.repeat_interleave(channels // groups, dim=1)  # [batch, G*D, N, L]
    C = C.repeat_interleave(channels // groups, dim=1)  # [batch, G*D, N, L]
    decay = torch.exp(delta[:, :, None, :] * A[None, :, :, None])  # [batch, G*D, N, L]
    drive = delta[:, :, None, :] * B * u[:, :, None, :]  # [batch, G*D, N, L]
    h = u.new_zeros(batch, channels, state)  # [batch, G*D, N]
    ys = []
    for t in range(length):
        h = decay[..., t] * h + drive[..., t]
        ys.append((h * C[..., t]).sum(-1))  # [batch, G*D]
    y = torch.stack(ys, dim=-1)  # [batch, G*D, L]
    if D is not None:
        y = y + u * D.float()[None, :, None]
    return y
