"""Optional dependencies of :mod:`openus_hub.onnx`, imported on first use with an error that names the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA_HINT = 'pip install "openus_hub[onnx]"'


class MissingExtraError(ImportError):
    """An optional package of the ``onnx`` extra is not installed."""


def require(module: str) -> ModuleType:
    """Import ``module`` (e.g. ``"onnxruntime"``), or raise :class:`MissingExtraError` with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split(".")[0]
        raise MissingExtraError(f"{package} is not installed; ONNX export and inference need the onnx extra: "
                                f"{EXTRA_HINT}") from e
