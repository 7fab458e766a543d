"""The SS2D scan of VMamba ("v05_noz"), behind one dispatch point.

``cross_selective_scan`` takes the activated, channel-last input of an SS2D block and its scan parameters, and
returns the four-direction selective scan merged back to row-major order (upstream ``SS2Dv2`` forward,
``vmamba_models/dino_vmamba.py:517-580`` in XZheng0427/OpenUS: cross-scan, projections, selective scan, cross-merge).
Implementations, by name (:data:`SCAN_IMPLEMENTATIONS`):

* ``"reference"``: cross-scan -> per-direction projections -> :func:`selective_scan_reference` -> cross-merge.
  Readable, pure PyTorch, runs anywhere: the definition every other path is tested against (slow: a Python loop).
* ``"chunked"``: a closed-form chunked scan in standard operators (``chunked_scan.py``): any device, the path ONNX
  export uses, and on CUDA the fallback before the reference (a few hundred launches instead of one per position).
* ``"cpu_kernel"``: the fused C++ kernel of :mod:`.cpu_scan` (CPU tensors; built once per machine, see :mod:`.build`).
* ``"triton"``: the fused Triton kernel of :mod:`.triton_scan` (CUDA tensors; on CPU only under Triton's interpreter,
  ``TRITON_INTERPRET=1``, which the tests use).
* ``"mamba_ssm"``: mamba-ssm's CUDA ``selective_scan_fn`` (CUDA tensors, optional ``[cuda]`` extra).
* ``"auto"``: the first available of :data:`AUTO_ORDER` for the tensors' device: on CUDA mamba_ssm, triton, chunked,
  reference; on CPU cpu_kernel, reference (on a CPU the chunked scan is no faster than the reference). Whenever
  that is not the first choice, one warning says what was skipped and the fix.

Adding an implementation is one entry in ``_IMPLEMENTATIONS`` (a function that says why it cannot run on a device,
or None, and the function that runs it) and, if ``auto`` should use it, a place in :data:`AUTO_ORDER`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .chunked_scan import cross_selective_scan_chunked
from .cpu_scan import DISABLE_ENV, fused_cross_scan_cpu, unavailable_reason
from .cpu_scan import is_available as cpu_kernel_available
from .cross_scan import cross_merge, cross_scan
from .selective_scan import selective_scan_reference

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO_ORDER",
    "SCAN_IMPLEMENTATIONS",
    "cross_selective_scan",
    "minmax_normalize",
    "mamba_ssm_available",
    "resolve_scan_implementation",
    "scan_implementation_problem",
    "ss2d_attention_map",
]

SCAN_IMPLEMENTATIONS = ("auto", "reference", "chunked", "cpu_kernel", "triton", "mamba_ssm")
# auto's preference per device type (fastest first); other device types get the reference
AUTO_ORDER = {"cuda": ("mamba_ssm", "triton", "chunked", "reference"), "cpu": ("cpu_kernel", "reference")}

try:  # optional CUDA kernel; importing mamba_ssm without CUDA raises more than ImportError
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
except Exception:
    _mamba_selective_scan_fn = None

_announced: set[tuple[str, str]] = set()


def mamba_ssm_available() -> bool:
    return _mamba_selective_scan_fn is not None


# --- availability: None when the implementation runs on tensors of `device`, else why not and the fix ----------


def _reference_problem(device: torch.device) -> str | None:
    return None


def _chunked_problem(device: torch.device) -> str | None:
    return None


def _cpu_kernel_problem(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "it needs CPU tensors"
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return f"the CPU kernel is disabled by {DISABLE_ENV} (unset it to use the kernel)"
    if not cpu_kernel_available():  # builds the kernel on the first call if this machine has none
        return f"the CPU kernel is unavailable: {unavailable_reason()}"
    return None


def _triton_problem(device: torch.device) -> str | None:
    from .triton_scan import interpreting, triton_available

    if not triton_available():
        return "Triton is not installed (`pip install triton`; it comes with CUDA builds of torch)"
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return "it needs CUDA tensors (on CPU it runs only under Triton's interpreter, TRITON_INTERPRET=1, for tests)"


def _mamba_ssm_problem(device: torch.device) -> str | None:
    install = "`pip install 'openus_hub[cuda]' --no-build-isolation` (mamba-ssm)"
    if device.type != "cuda":
        return f"it needs CUDA tensors and {install}"
    if not mamba_ssm_available():
        return f"mamba-ssm is not installed: {install}"
    return None


# --- runners: (u (B, H, W, D), x_proj_weight, dt_proj_weight, dt_proj_bias, A (K*D, N), D) -> (B, H, W, D) float32


def _run_reference(u, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, mamba: bool = False):
    batch, height, width, channels = u.shape
    k, length = x_proj_weight.shape[0], height * width
    xs = cross_scan(u.permute(0, 3, 1, 2))  # [B, K, D, L]
    dts, Bs, Cs = _projections(xs, x_proj_weight, dt_proj_weight)
    scan = _mamba_selective_scan_fn if mamba else selective_scan_reference
    if mamba:  # the CUDA kernel wants contiguous fp32 B/C and matching dtypes
        Bs, Cs = Bs.float().contiguous(), Cs.float().contiguous()
    ys = scan(
        xs.reshape(batch, k * channels, length),
        dts.reshape(batch, k * channels, length),
        A,
        Bs,
        Cs,
        D.float(),
        delta_bias=dt_proj_bias.reshape(-1).float(),
        delta_softplus=True,
    )  # [B, K*D, L]
    y = cross_merge(ys.view(batch, k, channels, height, width).float())  # [B, D, L]
    return y.view(batch, channels, height, width).permute(0, 2, 3, 1)


def _run_mamba_ssm(u, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D):
    return _run_reference(u, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, mamba=True)


def _run_chunked(u, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D):
    return cross_selective_scan_chunked(u, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D)


def _fused_inputs(u, x_proj_weight, dt_proj_weight, A, D, pad_to: int):
    """Inputs of the fused Triton kernel (layouts in :mod:`.triton_scan`): u (B, L, D), dt (K, B*L, Dp) with the
    channels zero-padded to a multiple of ``pad_to``, bc (B, L, K, 2N), A (K, D, N), Dskip (K, D)."""
    batch, height, width, channels = u.shape
    k, rank = x_proj_weight.shape[0], dt_proj_weight.shape[-1]
    length = height * width
    flat = u.reshape(batch, length, channels)  # [B, L, D]
    x_dbl = (flat @ x_proj_weight.reshape(-1, channels).t()).view(batch, length, k, -1)  # [B, L, K, R+2N]
    dts = x_dbl[..., :rank].permute(2, 0, 1, 3).reshape(k, batch * length, rank)  # [K, B*L, R]
    padded = -(-channels // pad_to) * pad_to
    weight = dt_proj_weight if padded == channels else F.pad(dt_proj_weight, (0, 0, 0, padded - channels))
    dt = torch.bmm(dts, weight.transpose(1, 2))  # [K, B*L, Dp]
    return flat, dt, x_dbl[..., rank:], A.view(k, channels, -1), D.view(k, channels)


def _run_cpu_kernel(u, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D):
    batch, height, width, channels = u.shape
    k = x_proj_weight.shape[0]
    flat = u.reshape(batch, height * width, channels)  # [B, L, D]
    xdbl = (flat @ x_proj_weight.reshape(-1, channels).t()).view(batch, height * width, k, -1)  # [B, L, K, R+2N]
    y = fused_cross_scan_cpu(flat, xdbl, dt_proj_weight, dt_proj_bias, A.view(k, channels, -1), D.view(k, channels),
                             height, width)
    return y.view(batch, height, width, channels)


def _run_triton(u, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D):
    from .triton_scan import fused_cross_scan_triton

    batch, height, width, channels = u.shape
    flat, dt, bc, A, Dskip = _fused_inputs(u, x_proj_weight, dt_proj_weight, A, D, 1)
    y = fused_cross_scan_triton(flat, dt, dt_proj_bias, bc, A, Dskip, height, width)
    return y.view(batch, height, width, channels)


@dataclass(frozen=True)
class _Implementation:
    problem: Callable[[torch.device], str | None]  # None when it runs on tensors of that device, else why not + fix
    run: Callable[..., torch.Tensor]


_IMPLEMENTATIONS: dict[str, _Implementation] = {
    "reference": _Implementation(_reference_problem, _run_reference),
    "chunked": _Implementation(_chunked_problem, _run_chunked),
    "cpu_kernel": _Implementation(_cpu_kernel_problem, _run_cpu_kernel),
    "triton": _Implementation(_triton_problem, _run_triton),
    "mamba_ssm": _Implementation(_mamba_ssm_problem, _run_mamba_ssm),
}
assert set(_IMPLEMENTATIONS) == set(SCAN_IMPLEMENTATIONS) - {"auto"}


def scan_implementation_problem(implementation: str, device: torch.device) -> str | None:
    """None when ``implementation`` runs on tensors of ``device`` here; otherwise why not, and the fix.

    May build the CPU kernel (once per machine) when asked about ``"cpu_kernel"`` on a CPU.
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"scan implementation must be one of {SCAN_IMPLEMENTATIONS}, got {implementation!r}")
    return _IMPLEMENTATIONS[implementation].problem(torch.device(device))


def resolve_scan_implementation(implementation: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete implementation for tensors on ``device``; validate explicit choices."""
    if implementation not in SCAN_IMPLEMENTATIONS:
        raise ValueError(f"scan implementation must be one of {SCAN_IMPLEMENTATIONS}, got {implementation!r}")
    device = torch.device(device)
    if implementation != "auto":
        problem = scan_implementation_problem(implementation, device)
        if problem is not None:
            raise RuntimeError(f"scan implementation {implementation!r} cannot run on {device.type}: {problem}; "
                               "use 'auto' to fall back automatically")
        chosen, skipped = implementation, []
    else:
        skipped = []
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            problem = scan_implementation_problem(name, device)
            if problem is None:
                chosen = name
                break
            skipped.append(f"{name}: {problem}")
        else:  # the reference always runs; kept for a custom AUTO_ORDER without it
            chosen = "reference"
    if (device.type, chosen) not in _announced:
        _announced.add((device.type, chosen))
        if skipped:  # a warning (not only a log record: the package logger is silent unless configured)
            warnings.warn(
                f"OpenUS selective scan on {device.type}: using the {chosen} implementation, which is slower than "
                + " and ".join(s.split(":")[0] for s in skipped) + " (" + "; ".join(skipped) + ")",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            logger.info("OpenUS selective scan: using the %s implementation on %s", chosen, device.type)
    return chosen


@torch.compiler.assume_constant_result
def _resolve_for_device_type(implementation: str, device_type: str) -> str:
    """resolve_scan_implementation for a device type; torch.compile runs it once while tracing and keeps the answer
    (loading the CPU kernel takes a lock, which would otherwise break the graph)."""
    return resolve_scan_implementation(implementation, torch.device(device_type))


def _projections(xs: torch.Tensor, x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor):
    """Per-direction projections of the scanned sequences ``xs (B, K, D, L)``.

    Returns ``dts (B, K, D, L)`` and ``Bs, Cs (B, K, N, L)``.
    """
    rank = dt_proj_weight.shape[-1]
    state = (x_proj_weight.shape[1] - rank) // 2
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight)  # [B, K, R+2N, L]
    dts, Bs, Cs = torch.split(x_dbl, [rank, state, state], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, dt_proj_weight)  # [B, K, D, L]
    return dts, Bs, Cs


def cross_selective_scan(
    u: torch.Tensor,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_proj_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
    implementation: str = "auto",
) -> torch.Tensor:
    """Four-direction selective scan of an SS2D block.

    Args:
        u: ``(B, H, W, D)`` channel-last input (after in_proj, depth-wise conv and activation).
        x_proj_weight: ``(K, R + 2N, D)`` per-direction projection to ``(dt, B, C)``.
        dt_proj_weight: ``(K, D, R)``; dt_proj_bias: ``(K, D)``.
        A_log: ``(K * D, N)`` with ``A = -exp(A_log)``; D: ``(K * D,)`` skip weights.
        implementation: one of :data:`SCAN_IMPLEMENTATIONS`.

    Returns:
        ``(B, H, W, D)`` float32: the sum over the four directions, row-major positions.
    """
    impl = _resolve_for_device_type(implementation, u.device.type)
    A = -torch.exp(A_log.float())  # [K*D, N]
    return _IMPLEMENTATIONS[impl].run(u, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D)


def ss2d_attention_map(
    u: torch.Tensor,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_proj_bias: torch.Tensor,
    A_log: torch.Tensor,
    clamp: float = 1e-20,
) -> torch.Tensor:
    """Implicit attention of an SS2D block's selective scans ("CwBw"; upstream ``attnmap_mamba``,
    ``analyze/utils.py:345-478`` in XZheng0427/OpenUS), summed over the four directions.

    For direction ``g`` the scan output at step ``i`` is ``sum_j M_g(i, j) u(j)`` (plus the skip term), with
    ``M_g(i, j) = mean_d sum_n C_n(i) w_n(i) B_n(j) / w_n(j)`` for ``j <= i``, ``w(t) = exp(cumsum_{s<=t} A delta(s))``.
    As upstream, ``w`` is computed in float32 and the divisor clamped at ``clamp``. Each direction's map is taken back
    to row-major order and the four are summed.

    Args:
        u: ``(B, H, W, D)`` channel-last scan input; other arguments as in :func:`cross_selective_scan`.

    Returns:
        ``(B, L, L)`` float32, rows = query positions, columns = key positions, row-major; not normalised.
    """
    batch, height, width, channels = u.shape
    length = height * width
    xs = cross_scan(u.float().permute(0, 3, 1, 2))  # [B, K, D, L]
    dts, Bs, Cs = _projections(xs, x_proj_weight.float(), dt_proj_weight.float())
    k = xs.shape[1]
    delta = F.softplus(dts + dt_proj_bias.float().view(1, k, channels, 1))  # [B, K, D, L]
    A = -torch.exp(A_log.float()).view(k, channels, -1)  # [K, D, N]
    w = torch.exp(torch.cumsum(A[None, :, :, :, None] * delta[:, :, :, None, :], dim=-1))  # [B, K, D, N, L]
    q = Cs[:, :, None] * w  # [B, K, D, N, L]
    key = Bs[:, :, None] / w.clamp(min=clamp)  # [B, K, D, N, L]
    maps = torch.einsum("bgdni,bgdnj->bgij", q, key) / channels  # [B, K, L, L]
    maps = maps * torch.ones(length, length, device=u.device).tril()  # causal: key j <= query i

    def col_to_row(m: torch.Tensor) -> torch.Tensor:  # column-major scan order -> row-major, both axes
        return m.reshape(batch, width, height, width, height).permute(0, 2, 1, 4, 3).reshape(batch, length, length)

    flipped = maps[:, 2:].flip(-1, -2)  # reversed directions back to forward order
    return maps[:, 0] + col_to_row(maps[:, 1]) + flipped[:, 0] + col_to_row(flipped[:, 1])


def minmax_normalize(x: torch.Tensor) -> torch.Tensor:
    """Upstream OpenUS's normalisation of attention maps: min-max over the *whole batch tensor* (no epsilon)."""
    return (x - x.min()) / (x.max() - x.min())
