"""Errors every training job turns into an exit status: :class:`ConfigError` and :class:`CheckpointError` exit 2
with a one-line message (``error: ...``), :class:`NonFiniteLossError` exits 3."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from .checkpoint import CheckpointError
from .config import ConfigError
from .distributed import cleanup
from .progress import redirect_logging

__all__ = ["EXIT_NON_FINITE", "EXIT_USAGE", "CheckpointError", "ConfigError", "NonFiniteLossError", "run_job"]

EXIT_USAGE = 2  # bad configuration, arguments or input files
EXIT_NON_FINITE = 3  # the loss became NaN/inf; the message names the step and the last good checkpoint


class NonFiniteLossError(RuntimeError):
    """The loss of a step is NaN or infinite."""


def run_job(job: Callable[[], int], logger: logging.Logger) -> int:
    """A job's command line around its body ``job`` (which returns its exit status): log records go through the
    progress bars, the errors above become their exit statuses with a one-line message, and the process group (under
    torchrun) is torn down either way."""
    try:
        with redirect_logging():
            return job()
    except NonFiniteLossError as err:
        logger.error("%s", err)
        return EXIT_NON_FINITE
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        cleanup()
