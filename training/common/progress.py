"""Progress bars for long jobs and the closing line every job ends with: what it wrote and the command to run next.

Bars go to stderr (tqdm) on rank 0 only; ``enabled=False`` (or a non-zero rank) gives a bar that does nothing, so the
training loops call the same methods either way.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["finish", "progress_bar", "redirect_logging", "track"]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_description(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, desc: str, *, initial: int = 0, unit: str = "step", enabled: bool = True):
    """A tqdm bar (rank 0, ``enabled``), else an object with the same methods that does nothing."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                leave=True)


def track(iterable, desc: str, *, unit: str = "batch", enabled: bool = True):
    """``iterable`` with a progress bar (its length as the total when it has one)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)


def redirect_logging():
    """A context manager that routes console logging through tqdm, so log lines do not break a progress bar."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def finish(logger: logging.Logger, wrote: str, next_steps: list[str] | str | None = None) -> str:
    """Log the closing message ``wrote ...; next: ...`` at INFO and return it."""
    if isinstance(next_steps, str):
        next_steps = [next_steps]
    message = f"wrote {wrote}"
    if next_steps:
        message += "\nnext: " + "\n      ".join(next_steps)
    logger.info("%s", message)
    return message
