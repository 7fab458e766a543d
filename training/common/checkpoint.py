"""Checkpoint files of every training job.

* :func:`atomic_write` / :func:`atomic_write_text` / :func:`atomic_torch_save`: one file written under a temporary
  name in the same folder, flushed to disk, then renamed over the target (``os.replace``) and the folder entry synced:
  a reader sees the old file or the new one, never a part. (Folders are swapped in by
  ``conversion._common.save_atomic``, which this module does not replace.)
* :func:`save_checkpoint` / :func:`load_checkpoint`: the one writer and the one reader of training checkpoints.
  Checkpoints hold plain data (tensors, numbers, strings, lists, dicts), so they load with
  ``torch.load(weights_only=True)``; nothing is unpickled beyond that.
* :func:`checkpoint_path`, :func:`list_checkpoints`, :func:`latest_checkpoint`, :func:`prune_checkpoints`: the
  step-numbered ``checkpoint_{step:08d}.pth`` files of pretraining and downstream runs.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

__all__ = [
    "CHECKPOINT_PATTERN",
    "CheckpointError",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_text",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d{8})\.pth$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on this platform/file system
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``. Returns ``path``.
    On any error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(obj, path: str | Path) -> Path:
    """``torch.save(obj)`` into ``path`` through :func:`atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write a training checkpoint (plain data only) atomically. Every job saves through here."""
    return atomic_torch_save(state, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint with ``torch.load(weights_only=True)`` onto the CPU. Every job loads through here."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, ...: one line, naming the file
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # torch's weights_only refusal is a paragraph; its reason is the "Unsupported global: ..." line
        reason = next((line for line in lines if "Unsupported" in line or "Unpickler error" in line),
                      lines[0] if lines else type(err).__name__)
        raise CheckpointError(f"checkpoint {path} cannot be read with torch.load(weights_only=True): {reason}") \
            from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict (got {type(state).__name__})")
    return state


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"checkpoint_{step:08d}.pth"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint_{step:08d}.pth`` in ``folder``, by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := CHECKPOINT_PATTERN.match(name))]
    return sorted(found)


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def prune_checkpoints(folder: str | Path, keep_last: int, keep_every: int | None = None) -> list[Path]:
    """Delete all but the last ``keep_last`` checkpoints and those whose step is a multiple of ``keep_every``;
    returns the deleted paths."""
    found = list_checkpoints(folder)
    removed = []
    for step, path in found[: max(0, len(found) - keep_last)]:
        if keep_every and step % keep_every == 0:
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
