"""Scan operators of the OpenUS (VMamba) backbone: references in PyTorch and faster paths behind one dispatch."""

from .cross_scan import cross_merge, cross_scan, scan_order
from .selective_scan import selective_scan_reference
from .ss2d import (
    AUTO_ORDER,
    SCAN_IMPLEMENTATIONS,
    cross_selective_scan,
    mamba_ssm_available,
    minmax_normalize,
    resolve_scan_implementation,
    scan_implementation_problem,
    ss2d_attention_map,
)

__all__ = [
    "AUTO_ORDER",
    "SCAN_IMPLEMENTATIONS",
    "cross_merge",
    "cross_scan",
    "cross_selective_scan",
    "mamba_ssm_available",
    "minmax_normalize",
    "resolve_scan_implementation",
    "scan_implementation_problem",
    "scan_order",
    "selective_scan_reference",
    "ss2d_attention_map",
]
