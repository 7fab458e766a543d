"""The model's CPU fast paths against their readable forms: the chunked block MLP and the truncated-normal init.

(The fused scan kernel has its own tests in test_ops_scan.py.)
"""

import pytest
import torch

from openus_hub import OpenUSConfig
from openus_hub.models.openus.modeling_openus import OpenUSMLP, trunc_normal_init_


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return OpenUSMLP(OpenUSConfig.from_preset("openus-tiny"), 0)


def test_chunked_mlp_matches_the_plain_mlp_forward_and_backward(mlp):
    """3280 positions go through in chunks (2 of 1640). Forward: the same rows through the same products, bit-identical
    here. Gradients: the weight gradients sum over chunks in another order; measured 4e-7 of their largest entry."""
    x = torch.randn(2, 40, 41, 96, requires_grad=True)
    assert x.numel() // 96 > OpenUSMLP.cpu_chunk_rows
    y, y_ref = mlp(x), mlp._mlp(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    params = [x, *mlp.parameters()]
    grads = torch.autograd.grad((y * weights).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * weights).sum(), params)
    for g, g_ref in zip(grads, grads_ref):
        assert ((g - g_ref).abs().max() / g_ref.abs().max()).item() < 1e-5


def test_chunked_mlp_is_not_baked_into_traced_graphs(mlp):
    """A TorchScript trace (the ONNX exporter's) taken on many positions runs on another number of positions: the
    chunking, which depends on that number, stays out of traced graphs."""
    x = torch.randn(1, 64, 64, 96)
    with torch.no_grad():
        traced = torch.jit.trace(mlp, x, check_trace=False)
        other = torch.randn(3, 30, 32, 96)
        torch.testing.assert_close(traced(other), mlp._mlp(other), rtol=1e-5, atol=1e-5)


def _graph_ops(fn, *args) -> list:
    """The call_function targets of the graphs dynamo captures from ``fn(*args)`` (no inductor compile)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return [node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]


def test_chunked_mlp_is_not_in_compiled_or_exported_graphs(mlp):
    """torch.compile and torch.export (strict and not, dynamic sides) capture the plain fc1 -> act -> fc2 on an input
    that eager runs would chunk: no cat, no split, no guard on the number of positions."""
    x = torch.randn(1, 64, 64, 96)
    assert x.numel() // 96 > OpenUSMLP.cpu_chunk_rows
    ops = _graph_ops(mlp, x)
    assert ops and not [op for op in ops if "cat" in str(op) or "chunk" in str(op) or "split" in str(op)], ops
    side = torch.export.Dim("side", max=256)
    for strict in (False, True):
        program = torch.export.export(mlp, (x,), dynamic_shapes={"hidden_states": {1: side, 2: side}}, strict=strict)
        targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
        assert targets == ["aten.linear.default", "aten.gelu.default", "aten.linear.default"], targets
        other = torch.randn(1, 48, 48, 96)  # 2304 positions: chunked in eager runs
        torch.testing.assert_close(program.module()(other), mlp._mlp(other), rtol=1e-6, atol=1e-6)


def _torch_draws_trunc_normal_as_normal() -> bool:
    """Whether this torch's ``trunc_normal_`` draws ``normal_`` and redraws what falls outside (torch >= 2.10 or so;
    earlier versions transform uniforms through erfinv)."""
    a, b = torch.empty(64), torch.empty(64)
    torch.manual_seed(5)
    torch.nn.init.trunc_normal_(a, std=0.02)
    torch.manual_seed(5)
    b.normal_(0.0, 0.02)
    return torch.equal(a, b)


def test_trunc_normal_init_draws_what_torch_draws():
    """std 0.02 with bounds +-2 (100 standard deviations). Where torch draws its truncated normal as a normal with
    redraws, the shortcut gives torch's values, value for value, and leaves the random stream where torch leaves it.
    With any torch, the values have the truncated normal's moments and bounds."""
    same_algorithm = _torch_draws_trunc_normal_as_normal()
    for shape in [(384, 96), (7, 5), (3,)]:
        a, b = torch.empty(shape), torch.empty(shape)
        torch.manual_seed(3)
        torch.nn.init.trunc_normal_(a, std=0.02)
        after_torch = torch.rand(1)
        torch.manual_seed(3)
        trunc_normal_init_(b, std=0.02)
        if same_algorithm:
            assert torch.equal(a, b) and torch.equal(after_torch, torch.rand(1))
    w = torch.empty(200_000)
    torch.manual_seed(0)
    trunc_normal_init_(w, std=0.02)
    assert w.abs().max() <= 2.0
    assert abs(w.mean().item()) < 3 * 0.02 / 200_000**0.5 * 2
    assert abs(w.std().item() / 0.02 - 1) < 0.01
    # the fraction within one standard deviation: 0.6827 for a normal (a uniform-through-erfinv bug would show here)
    assert abs((w.abs() < 0.02).float().mean().item() - 0.6827) < 0.005


def test_trunc_normal_init_truncates_when_the_bounds_are_near():
    """With bounds inside the normal's reach (std 1.5, bounds +-2) the values are truncated."""
    w = torch.empty(20000)
    torch.manual_seed(0)
    trunc_normal_init_(w, std=1.5)
    assert w.abs().max() <= 2.0 and w.std() < 1.2
