"""Small file-system facts that crash-safe writers need: whether a writer process is still alive, and making a
rename durable."""

from __future__ import annotations

import os

__all__ = ["fsync_dir", "pid_alive"]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one we may not signal, or cannot ask about, counts as alive:
    its files are left alone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder, so that a rename or a new file in it survives a power loss; a no-op where the platform or file
    system cannot open or sync folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
