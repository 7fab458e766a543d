"""Fused four-direction selective scan for CPU: the C++ kernel ``openus_hub/csrc/ss2d_scan_cpu.cpp`` as a torch op.

The kernel walks each of the four SS2D directions over a channel-last map, vectorised over channels, and sums the
four directions into the output as it goes, so the cross-scan and cross-merge copies never exist in memory (the
recurrence and its backward are written out in the C++ file). :mod:`.build` compiles it once per machine into a
shared cache; here it is loaded with ctypes and wrapped in ``torch.library.custom_op`` (with fake tensors for
shapes), so autograd and ``torch.compile`` treat it as an ordinary operator. Nothing is loaded or compiled at import.

Layouts (float32, contiguous; ``p = h * W + w`` is the row-major position, ``K = 4`` directions, ``N = d_state``):

* ``u``      ``(B, L, D)``        the scanned input, shared by the four directions
* ``dt``     ``(K, B*L, Dp)``     step sizes before bias and softplus, channels zero-padded to ``Dp``, a multiple of
  :data:`CHANNEL_BLOCK`: ``delta = softplus(dt + bias)``
* ``bias``   ``(K, D)``;  ``bc`` ``(B, L, K, 2N)``: per-direction B (first N) and C (last N)
* ``A``      ``(K, D, N)``;  ``Dskip`` ``(K, D)``
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
        lib.openus_ss2d_scan_fwd.argtypes = [ptr] * 7 + [i64] * 5 + [ctypes.c_int]
        lib.openus_ss2d_scan_bwd.argtypes = [ptr] * 12 + [i64] * 5 + [ctypes.c_int]
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


def _sizes(u, dt, bias, bc, A, Dskip, height, width) -> tuple[int, int, int, int, int, int]:
    """Validate the layouts (the C code trusts them); returns ``(B, H, W, D, N, Dp)``."""
    tensors = {"u": u, "dt": dt, "bias": bias, "bc": bc, "A": A, "Dskip": Dskip}
    for name, t in tensors.items():
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"fused scan: {name} must be a contiguous float32 CPU tensor")
    if u.dim() != 3:
        raise ValueError(f"fused scan: u must be (B, L, D), got {tuple(u.shape)}")
    batch, length, channels = u.shape
    state = A.shape[-1] if A.dim() == 3 else 0
    padded = -(-channels // CHANNEL_BLOCK) * CHANNEL_BLOCK
    expected = {"dt": (4, batch * length, padded), "bias": (4, channels), "bc": (batch, length, 4, 2 * state),
                "A": (4, channels, state), "Dskip": (4, channels)}
    if length != height * width or height < 1 or width < 1 or state < 1:
        raise ValueError(f"fused scan: u has L = {length} positions, not height * width = {height} * {width}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"fused scan: {name} must have shape {shape}, got {tuple(tensors[name].shape)}")
    return batch, height, width, channels, state, padded


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
        def scan_fwd(u: torch.Tensor, dt: torch.Tensor, bias: torch.Tensor, bc: torch.Tensor, A: torch.Tensor,
                     Dskip: torch.Tensor, height: int, width: int) -> torch.Tensor:
            batch, h, w, channels, state, _ = _sizes(u, dt, bias, bc, A, Dskip, height, width)
            y = torch.empty_like(u)
            rc = _require().openus_ss2d_scan_fwd(
                _ptr(u), _ptr(dt), _ptr(bias), _ptr(bc), _ptr(A), _ptr(Dskip), _ptr(y),
                batch, h, w, channels, state, torch.get_num_threads(),
            )
            _check(rc, "forward")
            return y

        @torch.library.custom_op("openus_hub::ss2d_scan_bwd", mutates_args=(), device_types="cpu")
        def scan_bwd(gy: torch.Tensor, u: torch.Tensor, dt: torch.Tensor, bias: torch.Tensor, bc: torch.Tensor,
                     A: torch.Tensor, Dskip: torch.Tensor, height: int, width: int) -> list[torch.Tensor]:
            batch, h, w, channels, state, padded = _sizes(u, dt, bias, bc, A, Dskip, height, width)
            if gy.shape != u.shape or gy.dtype != torch.float32 or not gy.is_contiguous():
                raise ValueError("fused scan: the output gradient must be a contiguous float32 tensor shaped like u")
            nblk = padded // CHANNEL_BLOCK
            gu, gdt = torch.empty_like(u), torch.empty_like(dt)
            # per-task partial sums (channel blocks for B/C, images for A/Dskip), reduced here in a fixed order
            gbc = torch.empty((nblk,) + tuple(bc.shape), dtype=torch.float32)
            gA = torch.empty((batch,) + tuple(A.shape), dtype=torch.float32)
            gD = torch.empty((batch,) + tuple(Dskip.shape), dtype=torch.float32)
            rc = _require().openus_ss2d_scan_bwd(
                _ptr(gy), _ptr(u), _ptr(dt), _ptr(bias), _ptr(bc), _ptr(A), _ptr(Dskip),
                _ptr(gu), _ptr(gdt), _ptr(gbc), _ptr(gA), _ptr(gD),
                batch, h, w, channels, state, torch.get_num_threads(),
            )
            _check(rc, "backward")
            gbias = gdt.sum(1)[:, :channels].contiguous()
            return [gu, gdt, gbias, gbc.sum(0), gA.sum(0), gD.sum(0)]
    except RuntimeError:  # already defined in this process (e.g. by a remote-code copy of this file)
        return torch.ops.openus_hub.ss2d_scan_fwd, torch.ops.openus_hub.ss2d_scan_bwd

    @scan_fwd.register_fake
    def _(u, dt, bias, bc, A, Dskip, height, width):
        return torch.empty_like(u)

    @scan_bwd.register_fake
    def _(gy, u, dt, bias, bc, A, Dskip, height, width):
        return [torch.empty_like(u), torch.empty_like(dt), torch.empty_like(bias), torch.empty_like(bc),
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
    dt: torch.Tensor,
    bias: torch.Tensor,
    bc: torch.Tensor,
    A: torch.Tensor,
    Dskip: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """Four-direction selective scan summed over directions; layouts in the module docstring. Differentiable."""
    _require()
    tensors = [t.float().contiguous() for t in (u, dt, bias, bc, A, Dskip)]
    return _scan_fwd_op(*tensors, height, width)
