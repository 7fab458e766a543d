"""Shared inputs and comparisons for the scan-implementation tests (not a test module)."""

from __future__ import annotations

import torch

from openus_hub.ops import cross_selective_scan

GRAD_NAMES = ["u", "x_proj_weight", "dt_proj_weight", "dt_proj_bias", "A_log", "D"]


def scan_inputs(b, h, w, d, r, n, dtype=torch.float32, device="cpu", seed=0):
    """Random SS2D scan arguments: u (b, h, w, d), rank r, d_state n; leaves requiring grad."""
    g = torch.Generator().manual_seed(seed)
    k = 4

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype).requires_grad_()

    return [
        rand(b, h, w, d, scale=0.5),  # u
        rand(k, r + 2 * n, d, scale=0.4),  # x_proj_weight
        rand(k, d, r, scale=0.5),  # dt_proj_weight
        rand(k, d, scale=0.5, shift=-1.0),  # dt_proj_bias
        rand(k * d, n, scale=0.3),  # A_log
        rand(k * d),  # D
    ]


def forward_and_grads(inputs, implementation, seed=2):
    """Output and the gradients of <y, g> (g a fixed random tensor) for one implementation."""
    y = cross_selective_scan(*inputs, implementation=implementation)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device)
    grads = torch.autograd.grad((y * g).sum(), inputs)
    return y.detach(), grads


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |other - reference| / max(max |reference|, 1): the measure every scan parity test bounds."""
    reference, other = reference.detach().float().cpu(), other.detach().float().cpu()
    return ((other - reference).abs().max() / reference.abs().max().clamp(min=1.0)).item()


def assert_matches_reference(ref, fast, forward_tol=1e-5, grad_tol=1e-4):
    (y_ref, g_ref), (y_fast, g_fast) = ref, fast
    assert y_fast.dtype == torch.float32 and y_fast.shape == y_ref.shape
    err = relative_error(y_ref, y_fast)
    assert err <= forward_tol, f"forward differs by {err:.2e} (relative to its max)"
    for name, a, b in zip(GRAD_NAMES, g_ref, g_fast):
        err = relative_error(a, b)
        assert err <= grad_tol, f"gradient of {name} differs by {err:.2e} (relative to its max)"
