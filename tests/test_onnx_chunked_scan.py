"""The "chunked" scan implementation (standard operators, exported to ONNX) against the sequential reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from openus_hub import OpenUSConfig, OpenUSModel
from openus_hub.ops import SCAN_IMPLEMENTATIONS, cross_selective_scan, selective_scan_reference
from openus_hub.ops.chunked_scan import chunked_linear_recurrence, selective_scan_chunked, softplus

# Measured: forward and gradients within 5e-7 of the reference, relative to the largest value (float32 rounding of a
# different summation order), worst over the cases below; 1e-5 leaves a 20x margin.
RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def _scan_inputs(batch, groups, dim, state, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    channels = groups * dim
    return dict(
        u=torch.randn(batch, channels, length, generator=g),
        delta=torch.randn(batch, channels, length, generator=g),
        A=-torch.exp(torch.randn(channels, state, generator=g) * 0.5),
        B=torch.randn(batch, groups, state, length, generator=g),
        C=torch.randn(batch, groups, state, length, generator=g),
        D=torch.randn(channels, generator=g),
        delta_bias=torch.randn(channels, generator=g) - 1.0,
    )


@pytest.mark.parametrize("state", [1, 3])
@pytest.mark.parametrize("length,chunk", [(37, 8), (64, 16), (5, 64), (30, 1)])
def test_selective_scan_chunked_matches_reference_forward_and_backward(state, length, chunk):
    inputs = _scan_inputs(2, 3, 5, state, length)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    ref = selective_scan_reference(**leaves)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, list(leaves.values()), grad_out)
    leaves2 = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    out = selective_scan_chunked(**leaves2, chunk_size=chunk)
    grads = torch.autograd.grad(out, list(leaves2.values()), grad_out)
    assert out.shape == ref.shape
    assert _rel(out, ref) <= RTOL
    for name, a, b in zip(leaves, grads, ref_grads):
        assert _rel(a, b) <= RTOL, name


def test_selective_scan_chunked_without_skip_bias_or_softplus():
    inputs = _scan_inputs(1, 2, 4, 2, 19)
    inputs["delta"] = inputs["delta"].abs()
    for kwargs in ({"D": None}, {"delta_bias": None}, {"delta_softplus": False}):
        args = {**inputs, **kwargs}
        assert _rel(selective_scan_chunked(**args, chunk_size=4), selective_scan_reference(**args)) <= RTOL


def _ss2d_params(channels, state, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = 4
    return dict(
        x_proj_weight=torch.randn(k, rank + 2 * state, channels, generator=g) * channels**-0.5 * 3,
        dt_proj_weight=torch.randn(k, channels, rank, generator=g) * rank**-0.5,
        dt_proj_bias=torch.randn(k, channels, generator=g) - 1.0,
        A_log=torch.randn(k * channels, state, generator=g) * 0.5,
        D=torch.randn(k * channels, generator=g),
    )


@pytest.mark.parametrize("height,width,state", [(5, 7, 1), (6, 6, 4), (1, 9, 2), (8, 3, 1)])
def test_cross_selective_scan_chunked_matches_reference(height, width, state):
    """All four directions on odd, non-square maps, forward and backward (every input and parameter)."""
    assert "chunked" in SCAN_IMPLEMENTATIONS
    params = _ss2d_params(12, state, 3)
    u = torch.randn(2, height, width, 12)
    leaves = [u, *params.values()]

    def run(implementation):
        xs = [t.clone().requires_grad_(True) for t in leaves]
        y = cross_selective_scan(xs[0], *xs[1:], implementation=implementation)
        grads = torch.autograd.grad(y, xs, grad_out)
        return y, grads

    grad_out = torch.randn(2, height, width, 12)
    ref, ref_grads = run("reference")
    out, grads = run("chunked")
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert _rel(out, ref) <= RTOL
    for name, a, b in zip(["u", *params], grads, ref_grads):
        assert _rel(a, b) <= RTOL, name


def test_no_overflow_where_a_factorised_closed_form_breaks():
    """Cumulative decays far below -88 (exp(-S) overflows float32): the chunked scan stays finite and exact.

    delta*A reaches -40 per step, so the running sum passes -10000 within a chunk; every exponent the chunked scan
    takes is <= 0 (products of decays in (0, 1]), so nothing overflows.
    """
    length = 300
    u = torch.randn(1, 4, length)
    delta = torch.full((1, 4, length), 3.0)
    delta[..., ::7] = -8.0  # mixes tiny and large steps
    A = torch.tensor([[-20.0], [-1.0], [-0.01], [-200.0]])
    B = torch.randn(1, 1, 1, length)
    C = torch.randn(1, 1, 1, length)
    ref = selective_scan_reference(u, delta, A, B, C, delta_softplus=True)
    out = selective_scan_chunked(u, delta, A, B, C, delta_softplus=True, chunk_size=128)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) <= RTOL
    # the running sum really is out of float32's exp range
    assert (torch.cumsum(F.softplus(delta[0, 0]) * A[0, 0], 0).min() < -1e4).item()


def test_recurrence_directions_and_layouts():
    """chunked_linear_recurrence on a (chunk, step) grid in both dimension orders and both directions."""
    g = torch.rand(3, 4, 6)  # [batch, P, Q]
    x = torch.randn(3, 4, 6)

    def sequential(decay, drive):  # over the flattened (P, Q) sequence
        h, out = torch.zeros(decay.shape[0]), []
        for t in range(decay.shape[1]):
            h = decay[:, t] * h + drive[:, t]
            out.append(h)
        return torch.stack(out, 1)

    flat_g, flat_x = g.reshape(3, -1), x.reshape(3, -1)
    expected = sequential(flat_g, flat_x).view(3, 4, 6)
    assert torch.allclose(chunked_linear_recurrence(g, x, chunk_dim=1, step_dim=2), expected, atol=1e-6)
    # the same sequence stored transposed: chunks on the last dimension
    got = chunked_linear_recurrence(g.transpose(1, 2), x.transpose(1, 2), chunk_dim=2, step_dim=1)
    assert torch.allclose(got.transpose(1, 2), expected, atol=1e-6)
    backward = sequential(flat_g.flip(1), flat_x.flip(1)).flip(1).view(3, 4, 6)
    assert torch.allclose(chunked_linear_recurrence(g, x, 1, 2, reverse=True), backward, atol=1e-6)
    with pytest.raises(ValueError, match="different dimensions"):
        chunked_linear_recurrence(g, x, 1, 1)


def test_softplus_matches_torch():
    x = torch.cat([torch.linspace(-100, 100, 2001), torch.tensor([0.0, 1e-8, -1e-8, 30.0, -30.0])])
    assert (softplus(x) - F.softplus(x)).abs().max().item() <= 1e-6
    assert torch.isfinite(softplus(torch.tensor([1e4, -1e4]))).all()


@pytest.mark.parametrize("d_state", [1, 2])
def test_model_with_chunked_scan_matches_reference(d_state):
    config = OpenUSConfig(embed_dim=16, depths=[1, 1, 2, 1], d_state=d_state, drop_path_rate=0.0,
                          scan_implementation="reference")
    model = OpenUSModel(config).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = model(x, output_hidden_states=True)
        model.config.scan_implementation = "chunked"
        out = model(x, output_hidden_states=True)
    assert _rel(out.last_hidden_state, ref.last_hidden_state) <= RTOL
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert _rel(a, b) <= RTOL
