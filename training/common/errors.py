"""Errors every training job turns into an exit status: :class:`ConfigError` and :class:`CheckpointError` exit 2
with a one-line message (``error: ...``), :class:`NonFiniteLossError` exits 3."""

from __future__ import annotations

from .checkpoint import CheckpointError
from .config import ConfigError

__all__ = ["EXIT_NON_FINITE", "EXIT_USAGE", "CheckpointError", "ConfigError", "NonFiniteLossError"]

EXIT_USAGE = 2  # bad configuration, arguments or input files
EXIT_NON_FINITE = 3  # the loss became NaN/inf; the message names the step and the last good checkpoint


class NonFiniteLossError(RuntimeError):
    """The loss of a step is NaN or infinite."""
