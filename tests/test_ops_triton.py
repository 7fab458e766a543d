"""The Triton scan against the PyTorch reference: on CPU under Triton's interpreter (TRITON_INTERPRET=1, run in CI),
and on a GPU when there is one (against the reference and mamba-ssm, with timings).

Tolerances: forward within 1e-5 and gradients within 1e-4 of each tensor's largest entry (floor 1), as for the CPU
kernel; measured under the interpreter: at most 4e-7 forward and 5e-7 for gradients (float32 rounding only).
Shapes are tiny because the interpreter runs every program, and every element of a scan, in Python.
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from openus_hub import OpenUSConfig, OpenUSModel
from openus_hub.ops import mamba_ssm_available, triton_scan
from openus_hub.ops.ss2d import _fused_inputs
from tests._scan_utils import assert_matches_reference, forward_and_grads, relative_error, scan_inputs
from tests.conftest import skip_or_fail


@pytest.fixture
def device():
    """``cuda`` on a GPU (compiled Triton); else ``cpu`` under Triton's interpreter, which tests/conftest.py turns on
    before triton is imported. CI (no GPU) fails instead of skipping when the interpreter is not usable."""
    if not triton_scan.triton_available():
        skip_or_fail("triton is not installed (it is in the [test] extra and comes with CUDA builds of torch)")
    if torch.cuda.is_available():
        return "cuda"
    import triton.language as tl

    if not triton_scan.interpreting() or type(tl.zeros).__name__ != "InterpretedFunction":
        skip_or_fail("Triton's interpreter is not active: TRITON_INTERPRET=1 must be set before triton is imported "
                     "(tests/conftest.py does so on machines without CUDA)")
    return "cpu"


def _on(inputs, device):
    return [t.detach().to(device).requires_grad_() for t in inputs]


# (batch, H, W, inner D, dt rank R, d_state N, channels per program, steps per chunk): two channel blocks with a
# partial one, several chunks with a partial last one, odd and non-square maps, H = 1 and W = 1, d_state 1, 2,
# 3 (padded to 4) and 16, batch > 1
SHAPES = [(2, 3, 5, 20, 2, 1, 16, 4), (1, 5, 3, 4, 1, 16, 4, 8), (1, 4, 1, 12, 1, 3, 8, 2), (2, 1, 6, 6, 1, 2, 32, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference_forward_and_backward(device, shape, monkeypatch):
    *sizes, block_d, chunk = shape
    monkeypatch.setattr(triton_scan, "DEFAULT_BLOCK_D", block_d)
    monkeypatch.setattr(triton_scan, "MAX_CHUNK", chunk)
    inputs = scan_inputs(*sizes)
    assert_matches_reference(forward_and_grads(inputs, "reference"), forward_and_grads(_on(inputs, device), "triton"))


@pytest.mark.parametrize("direction", [0, 1, 2, 3])
def test_triton_each_direction_alone(device, direction, monkeypatch):
    monkeypatch.setattr(triton_scan, "MAX_CHUNK", 4)  # 12 steps: three chunks
    """Only direction k contributes (B projection and skip of the others zeroed): each scan order on its own."""
    inputs = scan_inputs(2, 3, 4, 8, 1, 2)
    rank, state, channels = 1, 2, 8
    with torch.no_grad():
        for k in range(4):
            if k != direction:
                inputs[1][k, rank : rank + state] = 0.0  # B_k = 0: direction k's state stays 0
                inputs[5][k * channels : (k + 1) * channels] = 0.0  # no skip term either
    ref = forward_and_grads(inputs, "reference")
    assert ref[0].abs().max() > 0.1  # the remaining direction produces a real output
    assert_matches_reference(ref, forward_and_grads(_on(inputs, device), "triton"))


def test_triton_rejects_mismatched_layouts(device):
    inputs = [t.detach() for t in scan_inputs(1, 2, 3, 8, 1, 1, device=device)]
    u = inputs[0]
    flat, dt, bc, A, Dskip = _fused_inputs(u, inputs[1], inputs[2], -torch.exp(inputs[4]), inputs[5], 1)
    with pytest.raises(ValueError, match="height \\* width"):
        triton_scan.fused_cross_scan_triton(flat, dt, inputs[3], bc, A, Dskip, 3, 3)
    with pytest.raises(ValueError, match="dt must have shape"):
        triton_scan.fused_cross_scan_triton(flat, dt[:, :-1], inputs[3], bc, A, Dskip, 2, 3)


@pytest.mark.parametrize("ssm_ratio,d_state", [(2.0, 2), (1.0, 1)], ids=["ratio2-state2", "ratio1-state1"])
def test_model_gradients_match_between_reference_and_triton(device, monkeypatch, ssm_ratio, d_state):
    """A whole tiny model (four stages) through the Triton scan: output and every gradient.

    Bound: each gradient within 1e-3 of its own largest entry. Measured worst: 3.7e-5, on the stem convolution, whose
    gradient sums the scan's float32 rounding over every position (the CPU kernel gives 2.9e-5 there); a wrong term in
    the scan's backward moves some gradient by more than 1e-2.
    """
    monkeypatch.setattr(triton_scan, "MAX_CHUNK", 16)  # stage 0 (8 x 8): four chunks
    config = OpenUSConfig(embed_dim=4, depths=[1, 1, 1, 1], d_state=d_state, ssm_ratio=ssm_ratio, drop_path_rate=0.0)
    model = OpenUSModel(config).train()
    x = torch.randn(1, 3, 32, 32)
    results = {}
    for impl, dev in (("reference", "cpu"), ("triton", device)):
        model.to(dev).config.scan_implementation = impl  # the mixers read the shared config at call time
        model.zero_grad(set_to_none=True)
        out = model(x.to(dev)).last_hidden_state.cpu()
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
        results[impl] = (out.detach(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None})
    (out_ref, grads_ref), (out_tri, grads_tri) = results["reference"], results["triton"]
    assert relative_error(out_ref, out_tri) <= 1e-5
    assert grads_ref.keys() == grads_tri.keys()
    assert sum(n.endswith("mixer.A_log") for n in grads_ref) == sum(config.depths)
    worst = {n: ((grads_tri[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item() for n, g in grads_ref.items()}
    name = max(worst, key=worst.get)
    print(f"worst parameter gradient difference: {worst[name]:.2e} of its max ({name})")
    assert worst[name] <= 1e-3, f"gradient of {name} differs by {worst[name]:.2e} of its max"


@pytest.mark.slow
def test_triton_kernels_compile_for_a_gpu():
    """Without a GPU the interpreter checks the arithmetic; this checks that Triton's compiler accepts the kernels:
    forward and backward compiled to an sm_90 binary (ptxas ships with triton), d_state 1 and 16, no GPU needed."""
    if not triton_scan.triton_available():
        skip_or_fail("triton is not installed (it is in the [test] extra and comes with CUDA builds of torch)")
    code = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from openus_hub.ops import triton_scan as ts
        fwd, bwd = ts._kernels()
        for state, channels in ((1, 192), (16, 64)):
            for kernel, pointers, backward in ((fwd, 7, False), (bwd, 13, True)):
                block_d, block_n, chunk, warps = ts._launch_config(channels, state, 3136, backward)
                names = kernel.arg_names
                signature = {n: "*fp32" for n in names[:pointers]}
                signature.update({n: "i32" for n in names[pointers:pointers + 5]})
                constants = {"BLOCK_D": block_d, "BLOCK_N": block_n, "CHUNK": chunk}
                signature.update({n: "constexpr" for n in constants})
                compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                                          options={"num_warps": warps})
                assert "cubin" in compiled.asm, compiled.asm.keys()
                print("COMPILED", kernel.__name__, state, block_d, block_n, chunk)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("COMPILED") == 4


@pytest.mark.gpu
def test_triton_on_cuda_matches_reference_and_mamba_ssm():
    """On a GPU: the compiled Triton kernel against the CPU reference (and mamba-ssm when importable), then timings.

    GPU tolerances are ten times the interpreter's (the GPU's exp/log differ from numpy's by a few ulp); not yet
    measured on a GPU.
    """
    inputs = scan_inputs(2, 14, 13, 96, 6, 1)
    ref = forward_and_grads(inputs, "reference")
    cuda_inputs = [t.detach().cuda().requires_grad_() for t in inputs]
    tri = forward_and_grads(cuda_inputs, "triton")
    assert_matches_reference(ref, tri, forward_tol=1e-4, grad_tol=1e-3)
    if mamba_ssm_available():
        mamba = forward_and_grads(cuda_inputs, "mamba_ssm")
        assert_matches_reference(mamba, tri, forward_tol=1e-4, grad_tol=1e-3)
    # stage 0 of openus-small at 224x224, batch 64, forward + backward
    big = [t.detach().cuda().requires_grad_() for t in scan_inputs(64, 56, 56, 192, 6, 1)]
    timings = {}
    for impl in ["triton"] + (["mamba_ssm"] if mamba_ssm_available() else []):
        for _ in range(2):  # warm-up (compilation)
            forward_and_grads(big, impl)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            forward_and_grads(big, impl)
        torch.cuda.synchronize()
        timings[impl] = (time.perf_counter() - start) / 5
    print("stage-0 scan, batch 64, forward + backward:", {k: f"{v * 1e3:.1f} ms" for k, v in timings.items()})
