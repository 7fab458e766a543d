"""Fused four-direction selective scan in Triton: the CUDA path when mamba-ssm is not installed.

Same operator and layouts as the CPU kernel (:mod:`.cpu_scan`; the recurrence and its backward are written out in
``openus_hub/csrc/ss2d_scan_cpu.cpp``). One program scans one image and one block of channels through all four
directions, reading the channel-last input at each direction's scan order and adding its output into the row-major
result, so neither the cross-scan nor the cross-merge is ever materialised. d_state 1..16 (any, in fact: the state
block is padded to a power of two), any inner width (ssm_ratio 1 and 2 included).

Each direction is processed in chunks of ``T`` steps. Step ``t`` of the recurrence is the affine map
``h -> a_t h + b_t`` (``a_t = exp(delta_t A)``, ``b_t = delta_t B_t u_t``); an associative scan of these maps over
the chunk (composition is associative) gives every state of the chunk at once from the state before it, so a program
loops over ``L / T`` chunks instead of ``L`` steps.

Backward, per direction: a first pass stores the state before every chunk; a second pass walks the chunks in reverse,
recomputes their states, and gets ``g_t = dLoss/dh_t`` from a reverse associative scan of
``g_t = gy_t C_t + a_{t+1} g_{t+1}``; the ``a_t h_{t-1}`` terms of the gradients are ``h_t - b_t``. Sums across
programs (dLoss/dB, dC over channel blocks; dLoss/dA, dDskip over images) are written as partials and reduced here in
a fixed order, so results are deterministic (no atomics).

Layouts (float32, contiguous; ``p = h * W + w``, ``K = 4`` directions, ``N = d_state``): ``u (B, L, D)``,
``dt (K, B*L, D)`` step sizes before bias and softplus, ``bias (K, D)``, ``bc (B, L, K, 2N)`` (B then C),
``A (K, D, N)``, ``Dskip (K, D)``; output ``y (B, L, D)``.

On a CPU, Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is imported) runs the same kernels; the
tests use it. Nothing is compiled at import: kernels are created on first use.
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

DEFAULT_BLOCK_D = 32  # channels per program (at most; 16 for d_state > 2)
MAX_CHUNK = 64  # steps per chunk (at most; fewer where the tile would exceed TILE elements)
TILE = 2048  # chunk x channels x states elements held per program (forward; half of it in the backward)


def triton_available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no")


# --- kernels (plain functions, jitted on first use by _kernels) -------------------------------------------------
# Step l of direction k (a compile-time constant) visits row-major position p: m = l (k < 2) or L - 1 - l, then
# p = m (k even) or (m % H) * W + m // H. softplus(x) = max(x, 0) + log(1 + exp(-|x|)), as in the CPU kernel.


def _compose(a1, b1, a2, b2):
    """Affine maps h -> a h + b, the first applied before the second."""
    return a1 * a2, a2 * b1 + b2


def _fwd_kernel(u_ptr, dt_ptr, bias_ptr, bc_ptr, A_ptr, Dskip_ptr, y_ptr,
                batch, height, width, channels, state,
                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    nblk = (channels + BLOCK_D - 1) // BLOCK_D
    b = (pid // nblk).to(tl.int64)
    offs_d = (pid % nblk) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, CHUNK)
    mask_d, mask_n = offs_d < channels, offs_n < state
    length = height * width
    for k in tl.static_range(4):
        # padded lanes (channels, states) load zeros and stay exactly zero through the recurrence
        a = tl.load(A_ptr + (k * channels + offs_d[:, None]) * state + offs_n[None, :],
                    mask=mask_d[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        bias = tl.load(bias_ptr + k * channels + offs_d, mask=mask_d, other=0.0)
        dskip = tl.load(Dskip_ptr + k * channels + offs_d, mask=mask_d, other=0.0)
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # the state before the chunk
        for start in range(0, length, CHUNK):
            steps = start + offs_t
            valid = steps < length
            m = steps if k < 2 else length - 1 - steps
            rows = b * length + (m if k % 2 == 0 else (m % height) * width + m // height)  # [T] rows of u, y, bc
            mask_td = valid[:, None] & mask_d[None, :]
            mask_tn = valid[:, None] & mask_n[None, :]
            x = tl.load(dt_ptr + (k * batch * length + rows)[:, None] * channels + offs_d[None, :], mask=mask_td,
                        other=0.0) + bias[None, :]
            delta = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))  # [T, BLOCK_D]
            uu = tl.load(u_ptr + rows[:, None] * channels + offs_d[None, :], mask=mask_td, other=0.0)
            bc_row = (rows * 4 + k) * 2 * state
            bvec = tl.load(bc_ptr + bc_row[:, None] + offs_n[None, :], mask=mask_tn, other=0.0)  # [T, BLOCK_N]
            cvec = tl.load(bc_ptr + bc_row[:, None] + state + offs_n[None, :], mask=mask_tn, other=0.0)
            # step t maps h to decay_t h + drive_t; steps past the end are identities
            decay = tl.where(valid[:, None, None], tl.exp(delta[:, :, None] * a[None, :, :]), 1.0)  # [T, D, N]
            drive = (delta * uu)[:, :, None] * bvec[:, None, :]
            acc_a, acc_b = tl.associative_scan((decay, drive), 0, _compose)
            hs = acc_a * h[None, :, :] + acc_b  # h(t) for every step t of the chunk
            out = tl.sum(hs * cvec[:, None, :], axis=2) + dskip[None, :] * uu  # C h + Dskip u
            ptrs = y_ptr + rows[:, None] * channels + offs_d[None, :]
            if k > 0:  # directions after the first add into the row-major output
                out += tl.load(ptrs, mask=mask_td, other=0.0)
            tl.store(ptrs, out, mask=mask_td)
            h = tl.sum(tl.where((offs_t == CHUNK - 1)[:, None, None], hs, 0.0), axis=0)  # the chunk's last state
        tl.debug_barrier()  # this direction's writes are visible to every thread before the next one reads them


def _bwd_kernel(gy_ptr, u_ptr, dt_ptr, bias_ptr, bc_ptr, A_ptr, Dskip_ptr,
                hc_ptr, gu_ptr, gdt_ptr, gbc_ptr, gA_ptr, gD_ptr,
                batch, height, width, channels, state,
                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    nblk = (channels + BLOCK_D - 1) // BLOCK_D
    b = (pid // nblk).to(tl.int64)
    blk = pid % nblk
    offs_d = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, CHUNK)
    mask_d, mask_n = offs_d < channels, offs_n < state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    length = height * width
    nchunks = (length + CHUNK - 1) // CHUNK
    tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]  # offsets of one state in the scratch
    hc = hc_ptr + pid.to(tl.int64) * nchunks * BLOCK_D * BLOCK_N  # this program's states before each chunk
    for k in tl.static_range(4):
        a = tl.load(A_ptr + (k * channels + offs_d[:, None]) * state + offs_n[None, :], mask=mask_dn, other=0.0)
        bias = tl.load(bias_ptr + k * channels + offs_d, mask=mask_d, other=0.0)
        dskip = tl.load(Dskip_ptr + k * channels + offs_d, mask=mask_d, other=0.0)
        # pass 1: the state before every chunk
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for c in range(nchunks):
            tl.store(hc + c * BLOCK_D * BLOCK_N + tile, h)
            steps = c * CHUNK + offs_t
            valid = steps < length
            m = steps if k < 2 else length - 1 - steps
            rows = b * length + (m if k % 2 == 0 else (m % height) * width + m // height)
            mask_td = valid[:, None] & mask_d[None, :]
            x = tl.load(dt_ptr + (k * batch * length + rows)[:, None] * channels + offs_d[None, :], mask=mask_td,
                        other=0.0) + bias[None, :]
            delta = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
            uu = tl.load(u_ptr + rows[:, None] * channels + offs_d[None, :], mask=mask_td, other=0.0)
            bvec = tl.load(bc_ptr + ((rows * 4 + k) * 2 * state)[:, None] + offs_n[None, :],
                           mask=valid[:, None] & mask_n[None, :], other=0.0)
            decay = tl.where(valid[:, None, None], tl.exp(delta[:, :, None] * a[None, :, :]), 1.0)
            drive = (delta * uu)[:, :, None] * bvec[:, None, :]
            acc_a, acc_b = tl.associative_scan((decay, drive), 0, _compose)
            h = tl.sum(tl.where((offs_t == CHUNK - 1)[:, None, None], acc_a * h[None, :, :] + acc_b, 0.0), axis=0)
        tl.debug_barrier()
        # pass 2: chunks in reverse; g_next = dLoss/dh at the first step of the chunk after this one
        g_next = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        ga = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        gdskip = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for rc in range(nchunks):
            c = nchunks - 1 - rc
            steps = c * CHUNK + offs_t
            valid = steps < length
            m = steps if k < 2 else length - 1 - steps
            rows = b * length + (m if k % 2 == 0 else (m % height) * width + m // height)
            # the following step (t + 1) of each step: its decay carries dLoss/dh back to step t
            valid_next = steps + 1 < length
            m_next = steps + 1 if k < 2 else length - 2 - steps
            rows_next = b * length + (m_next if k % 2 == 0 else (m_next % height) * width + m_next // height)
            mask_td = valid[:, None] & mask_d[None, :]
            mask_tn = valid[:, None] & mask_n[None, :]
            x = tl.load(dt_ptr + (k * batch * length + rows)[:, None] * channels + offs_d[None, :], mask=mask_td,
                        other=0.0) + bias[None, :]
            delta = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
            x_next = tl.load(dt_ptr + (k * batch * length + rows_next)[:, None] * channels + offs_d[None, :],
                             mask=valid_next[:, None] & mask_d[None, :], other=0.0) + bias[None, :]
            delta_next = tl.maximum(x_next, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x_next)))
            uu = tl.load(u_ptr + rows[:, None] * channels + offs_d[None, :], mask=mask_td, other=0.0)
            gyv = tl.load(gy_ptr + rows[:, None] * channels + offs_d[None, :], mask=mask_td, other=0.0)
            bc_row = (rows * 4 + k) * 2 * state
            bvec = tl.load(bc_ptr + bc_row[:, None] + offs_n[None, :], mask=mask_tn, other=0.0)
            cvec = tl.load(bc_ptr + bc_row[:, None] + state + offs_n[None, :], mask=mask_tn, other=0.0)
            # recompute the chunk's states from the stored state before it
            decay = tl.where(valid[:, None, None], tl.exp(delta[:, :, None] * a[None, :, :]), 1.0)
            drive = (delta * uu)[:, :, None] * bvec[:, None, :]
            acc_a, acc_b = tl.associative_scan((decay, drive), 0, _compose)
            hs = acc_a * tl.load(hc + c * BLOCK_D * BLOCK_N + tile)[None, :, :] + acc_b  # h(t)
            ah_prev = hs - drive  # a(t) h(t - 1)
            # g(t) = gy(t) C(t) + a(t + 1) g(t + 1): a reverse scan of the maps g -> a(t + 1) g + gy(t) C(t)
            decay_next = tl.where(valid_next[:, None, None], tl.exp(delta_next[:, :, None] * a[None, :, :]), 0.0)
            emit = gyv[:, :, None] * cvec[:, None, :]
            rev_a, rev_b = tl.associative_scan((decay_next, emit), 0, _compose, reverse=True)
            g = rev_a * g_next[None, :, :] + rev_b  # [T, BLOCK_D, BLOCK_N]
            g_next = tl.sum(tl.where((offs_t == 0)[:, None, None], g, 0.0), axis=0)
            gdelta = tl.sum(g * (a[None, :, :] * ah_prev + bvec[:, None, :] * uu[:, :, None]), axis=2)
            ga += tl.sum(g * delta[:, :, None] * ah_prev, axis=0)
            gdskip += tl.sum(gyv * uu, axis=0)
            gu = tl.sum(g * bvec[:, None, :], axis=2) * delta + gyv * dskip[None, :]
            tl.store(gdt_ptr + (k * batch * length + rows)[:, None] * channels + offs_d[None, :],
                     gdelta * tl.sigmoid(x), mask=mask_td)  # softplus' = sigmoid
            gu_ptrs = gu_ptr + rows[:, None] * channels + offs_d[None, :]
            if k > 0:  # dLoss/du sums the four directions
                gu += tl.load(gu_ptrs, mask=mask_td, other=0.0)
            tl.store(gu_ptrs, gu, mask=mask_td)
            # this channel block's share of dLoss/dB and dLoss/dC (summed over blocks by the caller)
            part = gbc_ptr + ((blk * batch * length + rows) * 4 + k) * 2 * state
            tl.store(part[:, None] + offs_n[None, :], tl.sum(g * (delta * uu)[:, :, None], axis=1), mask=mask_tn)
            tl.store(part[:, None] + state + offs_n[None, :], tl.sum(gyv[:, :, None] * hs, axis=1), mask=mask_tn)
        tl.store(gA_ptr + ((b * 4 + k) * channels + offs_d[:, None]) * state + offs_n[None, :], ga, mask=mask_dn)
        tl.store(gD_ptr + (b * 4 + k) * channels + offs_d, gdskip, mask=mask_d)
        tl.debug_barrier()


if triton is not None:  # the combine function is called from inside the kernels, so it is a jit function itself
    _compose = triton.jit(_compose)

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


def _launch_config(channels: int, state: int, length: int, backward: bool) -> tuple[int, int, int, int]:
    """(channels per program, padded states, steps per chunk, warps)."""
    block_n = triton.next_power_of_2(state)
    block_d = min(DEFAULT_BLOCK_D if block_n <= 2 else min(DEFAULT_BLOCK_D, 16), triton.next_power_of_2(channels))
    tile = TILE // 2 if backward else TILE
    chunk = max(2, min(MAX_CHUNK, tile // (block_d * block_n), triton.next_power_of_2(length)))  # a power of two
    return block_d, block_n, chunk, 4


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, bias, bc, A, Dskip, height, width):
        batch, length, channels = u.shape
        state = A.shape[-1]
        block_d, block_n, chunk, num_warps = _launch_config(channels, state, length, backward=False)
        grid = (batch * triton.cdiv(channels, block_d),)
        y = torch.empty_like(u)
        fwd, _ = _kernels()
        fwd[grid](u, dt, bias, bc, A, Dskip, y, batch, height, width, channels, state,
                  BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk, num_warps=num_warps)
        ctx.save_for_backward(u, dt, bias, bc, A, Dskip)
        ctx.hw = (height, width)
        return y

    @staticmethod
    def backward(ctx, gy):
        u, dt, bias, bc, A, Dskip = ctx.saved_tensors
        height, width = ctx.hw
        batch, length, channels = u.shape
        state = A.shape[-1]
        block_d, block_n, chunk, num_warps = _launch_config(channels, state, length, backward=True)
        nblk = triton.cdiv(channels, block_d)
        grid = (batch * nblk,)
        hc = torch.empty((batch * nblk, triton.cdiv(length, chunk), block_d, block_n), device=u.device,
                         dtype=torch.float32)
        gu, gdt = torch.empty_like(u), torch.empty_like(dt)
        gbc = torch.empty((nblk,) + tuple(bc.shape), device=u.device, dtype=torch.float32)
        gA = torch.empty((batch,) + tuple(A.shape), device=u.device, dtype=torch.float32)
        gD = torch.empty((batch,) + tuple(Dskip.shape), device=u.device, dtype=torch.float32)
        _, bwd = _kernels()
        bwd[grid](gy.float().contiguous(), u, dt, bias, bc, A, Dskip, hc, gu, gdt, gbc, gA, gD,
                  batch, height, width, channels, state, BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk,
                  num_warps=num_warps)
        return gu, gdt, gdt.sum(1), gbc.sum(0), gA.sum(0), gD.sum(0), None, None


def fused_cross_scan_triton(
    u: torch.Tensor,
    dt: torch.Tensor,
    bias: torch.Tensor,
    bc: torch.Tensor,
    A: torch.Tensor,
    Dskip: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """Four-direction selective scan summed over directions; layouts in the module docstring. Differentiable."""
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
    return _FusedScan.apply(*tensors, height, width)
