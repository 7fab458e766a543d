"""The SS2D scan of VMamba ("v05_noz": cross-scan, projections, selective scan, cross-merge; ``SS2Dv2`` forward,
``vmamba_models/dino_vmamba.py:517-580`` in XZheng0427/OpenUS at commit 6b9f6d2e), behind one dispatch point.

``cross_selective_scan`` takes the activated, channel-last input of an SS2D block and its scan parameters, and
returns the four-direction selective scan merged back to row-major order. Implementations:

* ``"reference"``: cross-scan -> per-direction projections -> :func:`selective_scan_reference` -> cross-merge.
  Readable, pure PyTorch, runs anywhere (slow: a Python loop over ``L``).
* ``"cpu_kernel"``: the fused C++ kernel of :mod:`.cpu_scan` (CPU tensors; compiled on first use).
* ``"mamba_ssm"``: ``mamba_ssm``'s CUDA ``selective_scan_fn`` (CUDA tensors, optional ``[cuda]`` extra).
* ``"chunked"``: :func:`.chunked_scan.cross_selective_scan_chunked`, standard tensor operations only (any device;
  the path ONNX export uses). Never chosen by ``"auto"``.
* ``"auto"``: ``mamba_ssm`` for CUDA tensors when it imports, ``cpu_kernel`` for CPU tensors when it compiles,
  ``reference`` otherwise. The chosen path is logged once.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .chunked_scan import cross_selective_scan_chunked
from .cpu_scan import CHANNEL_BLOCK, fused_cross_scan_cpu
from .cpu_scan import is_available as cpu_kernel_available
from .cross_scan import cross_merge, cross_scan
from .selective_scan import selective_scan_reference

logger = logging.getLogger(__name__)

__all__ = [
    "SCAN_IMPLEMENTATIONS",
    "cross_selective_scan",
    "minmax_normalize",
    "mamba_ssm_available",
    "resolve_scan_implementation",
    "ss2d_attention_map",
]

SCAN_IMPLEMENTATIONS = ("auto", "reference", "cpu_kernel", "mamba_ssm", "chunked")

try:  # optional CUDA kernel; importing mamba_ssm without CUDA raises more than ImportError
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
except Exception:
    _mamba_selective_scan_fn = None

_logged: set[str] = set()


def mamba_ssm_available() -> bool:
    return _mamba_selective_scan_fn is not None


def resolve_scan_implementation(implementation: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete implementation for tensors on ``device``; validate explicit choices."""
    if implementation not in SCAN_IMPLEMENTATIONS:
        raise ValueError(f"scan implementation must be one of {SCAN_IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto":
        if device.type == "cuda" and mamba_ssm_available():
            implementation = "mamba_ssm"
        elif device.type == "cpu" and cpu_kernel_available():
            implementation = "cpu_kernel"
        else:
            implementation = "reference"
    elif implementation == "mamba_ssm" and (device.type != "cuda" or not mamba_ssm_available()):
        raise RuntimeError(
            "scan implementation 'mamba_ssm' needs CUDA tensors and `pip install 'openus_hub[cuda]'`"
            " (mamba-ssm, built with --no-build-isolation); use 'auto' to fall back automatically"
        )
    elif implementation == "cpu_kernel" and (device.type != "cpu" or not cpu_kernel_available()):
        raise RuntimeError(
            "scan implementation 'cpu_kernel' needs CPU tensors and a C++ compiler with `ninja` installed;"
            " use 'auto' to fall back automatically"
        )
    if implementation not in _logged:
        _logged.add(implementation)
        logger.info("OpenUS selective scan: using the %s implementation on %s", implementation, device.type)
    return implementation


def _projections(xs: torch.Tensor, x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor):
    """Per-direction projections of scanned sequences ``xs (B, K, D, L)`` -> ``dts (B, K, D, L)``, ``Bs, Cs (B, K, N, L)``."""
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
    batch, height, width, channels = u.shape
    k = x_proj_weight.shape[0]
    length = height * width
    impl = resolve_scan_implementation(implementation, u.device)
    A = -torch.exp(A_log.float())  # [K*D, N]
    if impl == "chunked":
        return cross_selective_scan_chunked(u, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D)

    if impl == "cpu_kernel":
        rank, block = dt_proj_weight.shape[-1], CHANNEL_BLOCK
        nblk = -(-channels // block)
        flat = u.reshape(batch, length, channels)  # [B, L, D]
        x_dbl = (flat @ x_proj_weight.reshape(-1, channels).t()).view(batch, length, k, -1)  # [B, L, K, R+2N]
        dts = x_dbl[..., :rank].permute(2, 0, 1, 3).reshape(k, batch * length, rank)  # [K, B*L, R]
        # the kernel reads whole 16-channel vectors: zero-pad the step-size projection's output channels
        weight = dt_proj_weight if channels % block == 0 else F.pad(dt_proj_weight, (0, 0, 0, nblk * block - channels))
        dt = torch.bmm(dts, weight.transpose(1, 2))  # [K, B*L, Dp]
        y = fused_cross_scan_cpu(
            flat, dt, dt_proj_bias, x_dbl[..., rank:], A.view(k, channels, -1), D.view(k, channels), height, width
        )
        return y.view(batch, height, width, channels)

    xs = cross_scan(u.permute(0, 3, 1, 2))  # [B, K, D, L]
    dts, Bs, Cs = _projections(xs, x_proj_weight, dt_proj_weight)
    scan = _mamba_selective_scan_fn if impl == "mamba_ssm" else selective_scan_reference
    if impl == "mamba_ssm":  # the CUDA kernel wants contiguous fp32 B/C and matching dtypes
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


def ss2d_attention_map(
    u: torch.Tensor,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_proj_bias: torch.Tensor,
    A_log: torch.Tensor,
    clamp: float = 1e-20,
) -> torch.Tensor:
    """Implicit attention of an SS2D block's selective scans ("CwBw" of ``AttnMamba.get_attnmap_mamba``,
    ``analyze/utils.py:345-478`` in XZheng0427/OpenUS at 6b9f6d2e), summed over the four directions.

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
