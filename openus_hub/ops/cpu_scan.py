"""Fused four-direction selective scan for CPU: the C++ kernel ``openus_hub/csrc/ss2d_scan_cpu.cpp`` as a torch op.

The kernel walks each of the four SS2D directions over a channel-last map, vectorised over channels, and sums the
four directions into the output as it goes, so the cross-scan and cross-merge copies never exist in memory (the
recurrence and its backward are written out in the C++ file). :mod:`.build` compiles it once per machine into a
shared cache; here it is loaded with ctypes and wrapped in ``torch.library.custom_op`` (with fake tensors for
shapes), so autograd and ``torch.compile`` treat it as an ordinary operator. Nothing is loaded or compiled at import.

Layouts (float32, contiguous; ``p = h * W + w`` is the row-major position, ``K = 4`` directions, ``N = d_state``,
``R`` the step-size rank, ``C = R + 2N``):

* ``u``      ``(B, L, D)``        the scanned input, shared by the four directions
* ``xdbl``   ``(B, L, K, C)``     the x_proj product ``u @ x_proj_weight^T`` as computed, per position and direction:
  R step-size features, then B (N), then C (N)
* ``w``      ``(K, D, R)``        ``dt_proj_weight``; the step sizes ``delta = softplus(w xdbl[..., :R] + bias)`` are
  formed inside the kernel
* ``bias``   ``(K, D)``;  ``A`` ``(K, D, N)``;  ``Dskip`` ``(K, D)``
* returns ``y`` ``(B, L, D)`` = sum over directions of that direction's scan output, at row-major positions.

This equals ``cross_merge(selective_scan_reference(cross_scan(u), ...))`` (see ``ss2d.py``), which the tests check
forward and backward.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

import torch

logger = logging.getLogger(__name__)

__all__ = ["CHANNEL_BLOCK", "fused_cross_scan_cpu", "is_available", "unavailable_reason"]

CHANNEL_BLOCK = 16  # channels per kernel task; the step sizes are laid out in whole blocks of this size
DISABLE_ENV = "OPENUS_HUB_DISABLE_CPU_KERNEL"

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None


def _load() -> ctypes.CDLL | None:
    """The kernel library (built on the first call if this machine has none), or None with the reason in _failed."""
    global _lib, _failed
    if _lib is not None or _failed is not None:  # settled: no lock, so torch.compile traces through without a break
        return _lib
    with _lock:
        if _lib is not None or _failed is not None:
            return _lib
        if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
            _failed = f"disabled by {DISABLE_ENV}"
            return None
        from .build import KernelUnavailable, load_library

        try:
            lib = load_library().handle
        except KernelUnavailable as err:
            _failed = str(err)
            return None
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.openus_ss2d_scan_fwd.argtypes = [ptr] * 7 + [i64] * 6 + [ctypes.c_int]
        lib.openus_ss2d_scan_bwd.argtypes = [ptr] * 13 + [i64] * 6 + [ctypes.c_int]
        lib.openus_ss2d_scan_fwd.restype = lib.openus_ss2d_scan_bwd.restype = ctypes.c_int
        _lib = lib
        return _lib


def is_available() -> bool:
    """True when the kernel is built (building it now if needed) and loads. Never called at import."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why the kernel is unavailable (after :func:`is_available` returned False), else None."""
    _load()
    return _failed


def _sizes(u, xdbl, w, bias, A, Dskip, height, width) -> tuple[int, int, int, int, int, int, int]:
    """Validate the layouts (the C code trusts them); returns ``(B, H, W, D, R, N, Dp)``."""
    tensors = {"u": u, "xdbl": xdbl, "w": w, "bias": bias, "A": A, "Dskip": Dskip}
    for name, t in tensors.items():
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"fused scan: {name} must be a contiguous float32 CPU tensor")
    if u.dim() != 3 or w.dim() != 3 or A.dim() != 3:
        raise ValueError(f"fused scan: u, w and A must be 3-d, got {tuple(u.shape)}, {tuple(w.shape)}, {tuple(A.shape)}")
    batch, length, channels = u.shape
    rank, state = w.shape[2], A.shape[-1]
    padded = -(-channels // CHANNEL_BLOCK) * CHANNEL_BLOCK
    expected = {"xdbl": (batch, length, 4, rank + 2 * state), "w": (4, channels, rank), "bias": (4, channels),
                "A": (4, channels, state), "Dskip": (4, channels)}
    if length != height * width or height < 1 or width < 1 or state < 1 or rank < 1:
        raise ValueError(f"fused scan: u has L = {length} positions, not height * width = {height} * {width}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"fused scan: {name} must have shape {shape}, got {tuple(tensors[name].shape)}")
    return batch, height, width, channels, rank, state, padded


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _check(rc: int, what: str) -> None:
    if rc != 0:
        reason = "invalid sizes" if rc == 1 else "out of memory for the scan's scratch buffers"
        raise RuntimeError(f"OpenUS CPU scan kernel ({what}) failed: {reason}")


def _require() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the OpenUS CPU scan kernel is unavailable: {_failed}")
    return lib


# The kernel is a torch custom op (with fake tensors for shapes), so torch.compile traces through it.
def _define_ops():
    try:
        @torch.library.custom_op("openus_hub::ss2d_scan_fwd", mutates_args=(), device_types="cpu")
        def scan_fwd(u: torch.Tensor, xdbl: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, A: torch.Tensor,
                     Dskip: torch.Tensor, height: int, width: int) -> torch.Tensor:
            batch, h, wd, channels, rank, state, _ = _sizes(u, xdbl, w, bias, A, Dskip, height, width)
            y = torch.empty_like(u)
            rc = _require().openus_ss2d_scan_fwd(
                _ptr(u), _ptr(xdbl), _ptr(w), _ptr(bias), _ptr(A), _ptr(Dskip), _ptr(y),
                batch, h, wd, channels, rank, state, torch.get_num_threads(),
            )
            _check(rc, "forward")
            return y

        @torch.library.custom_op("openus_hub::ss2d_scan_bwd", mutates_args=(), device_types="cpu")
        def scan_bwd(gy: torch.Tensor, u: torch.Tensor, xdbl: torch.Tensor, w: torch.Tensor, bias: torch.Tensor,
                     A: torch.Tensor, Dskip: torch.Tensor, height: int, width: int) -> list[torch.Tensor]:
            batch, h, wd, channels, rank, state, padded = _sizes(u, xdbl, w, bias, A, Dskip, height, width)
            if gy.shape != u.shape or gy.dtype != torch.float32 or not gy.is_contiguous():
                raise ValueError("fused scan: the output gradient must be a contiguous float32 tensor shaped like u")
            nblk, length = padded // CHANNEL_BLOCK, h * wd
            gu = torch.empty_like(u)
            gdt = torch.empty((4, batch * length, padded), dtype=torch.float32)  # dLoss/d(w xdbl[..., :R])
            # per-task partial sums (channel blocks for B/C, images for bias/A/Dskip), reduced here in a fixed order
            gbc = torch.empty((nblk, batch, length, 4, 2 * state), dtype=torch.float32)
            gbias = torch.empty((batch,) + tuple(bias.shape), dtype=torch.float32)
            gA = torch.empty((batch,) + tuple(A.shape), dtype=torch.float32)
            gD = torch.empty((batch,) + tuple(Dskip.shape), dtype=torch.float32)
            rc = _require().openus_ss2d_scan_bwd(
                _ptr(gy), _ptr(u), _ptr(xdbl), _ptr(w), _ptr(bias), _ptr(A), _ptr(Dskip),
                _ptr(gu), _ptr(gdt), _ptr(gbc), _ptr(gbias), _ptr(gA), _ptr(gD),
                batch, h, wd, channels, rank, state, torch.get_num_threads(),
            )
            _check(rc, "backward")
            # dt = w x_dt per direction: the gradients of x_dt and w are products with gdt
            gdt = gdt[:, :, :channels]  # [K, B*L, D]
            x_dt = xdbl.view(batch * length, 4, -1)[:, :, :rank].transpose(0, 1)  # [K, B*L, R]
            gxdbl = torch.empty_like(xdbl)
            gxdbl[..., :rank] = torch.bmm(gdt, w).transpose(0, 1).view(batch, length, 4, rank)
            gxdbl[..., rank:] = gbc.sum(0)
            # as x_dt^T gdt: BLAS runs this orientation several times faster than gdt^T x_dt (long reduction axis)
            gw = torch.bmm(x_dt.transpose(1, 2), gdt).transpose(1, 2).contiguous()  # [K, D, R]
            return [gu, gxdbl, gw, gbias.sum(0), gA.sum(0), gD.sum(0)]
    except RuntimeError:  # already defined in this process (e.g. by a remote-code copy of this file)
        return torch.ops.openus_hub.ss2d_scan_fwd, torch.ops.openus_hub.ss2d_scan_bwd

    @scan_fwd.register_fake
    def _(u, xdbl, w, bias, A, Dskip, height, width):
        return torch.empty_like(u)

    @scan_bwd.register_fake
    def _(gy, u, xdbl, w, bias, A, Dskip, height, width):
        return [torch.empty_like(u), torch.empty_like(xdbl), torch.empty_like(w), torch.empty_like(bias),
                torch.empty_like(A), torch.empty_like(Dskip)]

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:6])
        ctx.hw = inputs[6:]

    def backward(ctx, gy):
        grads = scan_bwd(gy.contiguous(), *ctx.saved_tensors, *ctx.hw)
        return (*grads, None, None)

    scan_fwd.register_autograd(backward, setup_context=setup_context)
    return scan_fwd, scan_bwd


_scan_fwd_op, _scan_bwd_op = _define_ops()


def fused_cross_scan_cpu(
    u: torch.Tensor,
    xdbl: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    bias: torch.Tensor,
    A: torch.Tensor,
    Dskip: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """Four-direction selective scan summed over directions. Differentiable.

    ``u (B, L, D)``, ``xdbl (B, L, K, R + 2N)``, ``dt_proj_weight (K, D, R)``, ``bias (K, D)``, ``A (K, D, N)``,
    ``Dskip (K, D)``; returns ``y (B, L, D)`` float32 (module docstring).
    """
    _require()
    tensors = [t.float().contiguous() for t in (u, xdbl, dt_proj_weight, bias, A, Dskip)]
    return _scan_fwd_op(*tensors, height, width)
