"""Fused four-direction selective scan in Triton: the CUDA path when mamba-ssm is not installed.

Same operator and layouts as the CPU kernel (:mod:`.cpu_scan`; the recurrence and its backward are written out in
``openus_hub/csrc/ss2d_scan_cpu.cpp``): one program scans one image and one block of channels through all four
directions, reading the channel-last input at each direction's scan order and adding its output into the row-major
result, so neither the cross-scan nor the cross-merge is ever materialised. d_state 1..16 (any, in fact: the state
block is padded to a power of two), any inner width (ssm_ratio 1 and 2 included).

Layouts (float32, contiguous; ``p = h * W + w``, ``K = 4`` directions, ``N = d_state``): ``u (B, L, D)``,
``dt (K, B*L, D)`` step sizes before bias and softplus, ``bias (K, D)``, ``bc (B, L, K, 2N)`` (B then C),
``A (K, D, N)``, ``Dskip (K, D)``; output ``y (B, L, D)``.

Backward: the program recomputes one direction's states into a scratch buffer (``L`` states per program), then walks
back through them. Sums across programs (dLoss/dB, dC over channel blocks; dLoss/dA, dDskip over images) are written
as partials and reduced here in a fixed order, so results are deterministic (no atomics).

On a CPU, Triton's interpreter (``TRITON_INTERPRET=1``) runs the same kernels; the tests use it. Nothing is compiled
at import: kernels are created on first use (for the interpreter or the GPU, whichever is active then).
"""

from __future__ import annotations

import os

import torch

try:  # optional: comes with CUDA builds of torch; a folder loaded with trust_remote_code must not require it
    import triton
    import triton.language as tl
except Exception:
    triton = tl = None

__all__ = ["fused_cross_scan_triton", "interpreting", "triton_available"]

DEFAULT_BLOCK_D = 32  # channels per program


def triton_available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no")


# --- kernels (plain functions, jitted on first use by _kernels) -------------------------------------------------


# The position visited at step l of direction k (0 row-major, 1 column-major, 2 and 3 reversed) is, with k a
# compile-time constant: m = l (k < 2) or L - 1 - l; p = m (k even) or (m % H) * W + m // H.
# softplus(x) = max(x, 0) + log(1 + exp(-|x|)), as in the CPU kernel (no overflow for large |x|).


def _fwd_kernel(u_ptr, dt_ptr, bias_ptr, bc_ptr, A_ptr, Dskip_ptr, y_ptr,
                batch, height, width, channels, state,
                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    nblk = (channels + BLOCK_D - 1) // BLOCK_D
    b = (pid // nblk).to(tl.int64)
    offs_d = (pid % nblk) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d, mask_n = offs_d < channels, offs_n < state
    length = height * width
    for k in tl.static_range(4):
        # padded lanes (channels, states) load zeros and stay exactly zero through the recurrence
        a = tl.load(A_ptr + (k * channels + offs_d[:, None]) * state + offs_n[None, :],
                    mask=mask_d[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        bias = tl.load(bias_ptr + k * channels + offs_d, mask=mask_d, other=0.0)
        dskip = tl.load(Dskip_ptr + k * channels + offs_d, mask=mask_d, other=0.0)
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for step in range(length):
            m = step if k < 2 else length - 1 - step
            row = b * length + (m if k % 2 == 0 else (m % height) * width + m // height)  # row of u, y and bc
            x = tl.load(dt_ptr + (k * batch * length + row) * channels + offs_d, mask=mask_d, other=0.0) + bias
            delta = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
            uu = tl.load(u_ptr + row * channels + offs_d, mask=mask_d, other=0.0)
            bvec = tl.load(bc_ptr + (row * 4 + k) * 2 * state + offs_n, mask=mask_n, other=0.0)
            cvec = tl.load(bc_ptr + (row * 4 + k) * 2 * state + state + offs_n, mask=mask_n, other=0.0)
            h = tl.exp(delta[:, None] * a) * h + (delta * uu)[:, None] * bvec[None, :]  # h = exp(delta A) h + delta B u
            out = tl.sum(h * cvec[None, :], axis=1) + dskip * uu  # C h + Dskip u
            if k > 0:  # directions after the first add into the row-major output
                out += tl.load(y_ptr + row * channels + offs_d, mask=mask_d, other=0.0)
            tl.store(y_ptr + row * channels + offs_d, out, mask=mask_d)
        tl.debug_barrier()  # this direction's writes are visible to every thread before the next one reads them


def _bwd_kernel(gy_ptr, u_ptr, dt_ptr, bias_ptr, bc_ptr, A_ptr, Dskip_ptr,
                hs_ptr, gu_ptr, gdt_ptr, gbc_ptr, gA_ptr, gD_ptr,
                batch, height, width, channels, state,
                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    nblk = (channels + BLOCK_D - 1) // BLOCK_D
    b = (pid // nblk).to(tl.int64)
    blk = pid % nblk
    offs_d = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d, mask_n = offs_d < channels, offs_n < state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    length = height * width
    tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]  # offsets of one state tile in the scratch
    hs = hs_ptr + pid.to(tl.int64) * length * BLOCK_D * BLOCK_N  # this program's (L, BLOCK_D, BLOCK_N) states
    for k in tl.static_range(4):
        a = tl.load(A_ptr + (k * channels + offs_d[:, None]) * state + offs_n[None, :], mask=mask_dn, other=0.0)
        bias = tl.load(bias_ptr + k * channels + offs_d, mask=mask_d, other=0.0)
        dskip = tl.load(Dskip_ptr + k * channels + offs_d, mask=mask_d, other=0.0)
        # forward recurrence, keeping every state: hs[step] = h(step)
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for step in range(length):
            m = step if k < 2 else length - 1 - step
            row = b * length + (m if k % 2 == 0 else (m % height) * width + m // height)
            x = tl.load(dt_ptr + (k * batch * length + row) * channels + offs_d, mask=mask_d, other=0.0) + bias
            delta = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
            uu = tl.load(u_ptr + row * channels + offs_d, mask=mask_d, other=0.0)
            bvec = tl.load(bc_ptr + (row * 4 + k) * 2 * state + offs_n, mask=mask_n, other=0.0)
            h = tl.exp(delta[:, None] * a) * h + (delta * uu)[:, None] * bvec[None, :]
            tl.store(hs + step * BLOCK_D * BLOCK_N + tile, h)
        tl.debug_barrier()
        # reverse pass (derivation in openus_hub/csrc/ss2d_scan_cpu.cpp); gh carries a(l + 1) g(l + 1) to step l
        gh = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        ga = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        gdskip = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for rstep in range(length):
            step = length - 1 - rstep
            m = step if k < 2 else length - 1 - step
            row = b * length + (m if k % 2 == 0 else (m % height) * width + m // height)
            x = tl.load(dt_ptr + (k * batch * length + row) * channels + offs_d, mask=mask_d, other=0.0) + bias
            delta = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
            uu = tl.load(u_ptr + row * channels + offs_d, mask=mask_d, other=0.0)
            gyv = tl.load(gy_ptr + row * channels + offs_d, mask=mask_d, other=0.0)
            bvec = tl.load(bc_ptr + (row * 4 + k) * 2 * state + offs_n, mask=mask_n, other=0.0)
            cvec = tl.load(bc_ptr + (row * 4 + k) * 2 * state + state + offs_n, mask=mask_n, other=0.0)
            h_now = tl.load(hs + step * BLOCK_D * BLOCK_N + tile)
            h_prev = tl.load(hs + (step - 1) * BLOCK_D * BLOCK_N + tile, mask=(tile >= 0) & (step > 0), other=0.0)
            decay = tl.exp(delta[:, None] * a)
            g = gh + gyv[:, None] * cvec[None, :]  # dLoss/dh(l)
            gdelta = tl.sum(g * (a * decay * h_prev + bvec[None, :] * uu[:, None]), axis=1)
            ga += g * delta[:, None] * decay * h_prev
            gdskip += gyv * uu
            gu = tl.sum(g * bvec[None, :], axis=1) * delta + gyv * dskip
            gh = g * decay
            tl.store(gdt_ptr + (k * batch * length + row) * channels + offs_d, gdelta * tl.sigmoid(x), mask=mask_d)
            if k > 0:  # dLoss/du sums the four directions
                gu += tl.load(gu_ptr + row * channels + offs_d, mask=mask_d, other=0.0)
            tl.store(gu_ptr + row * channels + offs_d, gu, mask=mask_d)
            # this channel block's share of dLoss/dB and dLoss/dC (summed over blocks by the caller)
            part = gbc_ptr + ((blk * batch * length + row) * 4 + k) * 2 * state
            tl.store(part + offs_n, tl.sum(g * (delta * uu)[:, None], axis=0), mask=mask_n)
            tl.store(part + state + offs_n, tl.sum(gyv[:, None] * h_now, axis=0), mask=mask_n)
        tl.store(gA_ptr + ((b * 4 + k) * channels + offs_d[:, None]) * state + offs_n[None, :], ga, mask=mask_dn)
        tl.store(gD_ptr + (b * 4 + k) * channels + offs_d, gdskip, mask=mask_d)
        tl.debug_barrier()


_KERNELS: dict[bool, tuple] = {}


def _kernels():
    """(forward, backward) jitted for the current mode: Triton's interpreter when TRITON_INTERPRET=1, else the GPU."""
    mode = interpreting()
    if mode not in _KERNELS:
        if mode and type(tl.zeros).__name__ != "InterpretedFunction":
            raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported; Triton's interpreter needs it "
                               "in the environment before Python starts")
        _KERNELS[mode] = (triton.jit(_fwd_kernel), triton.jit(_bwd_kernel))
    return _KERNELS[mode]


def _launch_config(channels: int, state: int, block_d: int | None) -> tuple[int, int, int]:
    block_d = block_d or min(DEFAULT_BLOCK_D, triton.next_power_of_2(channels))
    block_n = triton.next_power_of_2(state)
    num_warps = 1 if block_d * block_n <= 256 else 4
    return block_d, block_n, num_warps


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, bias, bc, A, Dskip, height, width, block_d):
        batch, length, channels = u.shape
        state = A.shape[-1]
        block_d, block_n, num_warps = _launch_config(channels, state, block_d)
        grid = (batch * triton.cdiv(channels, block_d),)
        y = torch.empty_like(u)
        fwd, _ = _kernels()
        fwd[grid](u, dt, bias, bc, A, Dskip, y, batch, height, width, channels, state,
                  BLOCK_D=block_d, BLOCK_N=block_n, num_warps=num_warps)
        ctx.save_for_backward(u, dt, bias, bc, A, Dskip)
        ctx.config = (height, width, block_d)
        return y

    @staticmethod
    def backward(ctx, gy):
        u, dt, bias, bc, A, Dskip = ctx.saved_tensors
        height, width, block_d = ctx.config
        batch, length, channels = u.shape
        state = A.shape[-1]
        block_d, block_n, num_warps = _launch_config(channels, state, block_d)
        nblk = triton.cdiv(channels, block_d)
        grid = (batch * nblk,)
        hs = torch.empty((batch * nblk, length, block_d, block_n), device=u.device, dtype=torch.float32)
        gu, gdt = torch.empty_like(u), torch.empty_like(dt)
        gbc = torch.empty((nblk,) + tuple(bc.shape), device=u.device, dtype=torch.float32)
        gA = torch.empty((batch,) + tuple(A.shape), device=u.device, dtype=torch.float32)
        gD = torch.empty((batch,) + tuple(Dskip.shape), device=u.device, dtype=torch.float32)
        _, bwd = _kernels()
        bwd[grid](gy.float().contiguous(), u, dt, bias, bc, A, Dskip, hs, gu, gdt, gbc, gA, gD,
                  batch, height, width, channels, state, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=num_warps)
        return gu, gdt, gdt.sum(1), gbc.sum(0), gA.sum(0), gD.sum(0), None, None, None


def fused_cross_scan_triton(
    u: torch.Tensor,
    dt: torch.Tensor,
    bias: torch.Tensor,
    bc: torch.Tensor,
    A: torch.Tensor,
    Dskip: torch.Tensor,
    height: int,
    width: int,
    block_d: int | None = None,
) -> torch.Tensor:
    """Four-direction selective scan summed over directions; layouts in the module docstring. Differentiable.

    ``block_d`` (channels per program, a power of two) defaults to 32; the tests use smaller blocks to cover
    several blocks and a partial one on tiny shapes.
    """
    if triton is None:
        raise RuntimeError("the Triton scan needs the `triton` package (it comes with CUDA builds of torch)")
    batch, length, channels = u.shape
    state = A.shape[-1]
    expected = {"dt": (4, batch * length, channels), "bias": (4, channels), "bc": (batch, length, 4, 2 * state),
                "A": (4, channels, state), "Dskip": (4, channels)}
    for name, t in zip(expected, (dt, bias, bc, A, Dskip)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"Triton scan: {name} must have shape {expected[name]}, got {tuple(t.shape)}")
    if length != height * width:
        raise ValueError(f"Triton scan: u has L = {length} positions, not height * width = {height} * {width}")
    tensors = [t.float().contiguous() for t in (u, dt, bias, bc, A, Dskip)]
    return _FusedScan.apply(*tensors, height, width, block_d)
