"""Checkpoint files of every training job.

* :func:`atomic_write` / :func:`atomic_write_text` / :func:`atomic_torch_save`: one file written under a temporary
  name in the same folder (``.NAME.tmp-PID-XXXXXXXX``), flushed to disk, then renamed over the target
  (``os.replace``) and the folder entry synced: a reader sees the old file or the new one, never a part. (Folders are
  swapped in by ``conversion._common.save_atomic``, which this module does not replace.)
* :func:`save_checkpoint` / :func:`load_checkpoint`: the one writer and the one reader of training checkpoints.
  Checkpoints hold plain data (tensors, numbers, strings, lists, dicts), so they load with
  ``torch.load(weights_only=True)``; nothing is unpickled beyond that.
* Integrity: every checkpoint ``X`` has a checksum file ``X.sha256`` beside it, in ``sha256sum`` format (check it by
  hand with ``sha256sum -c X.sha256`` in its folder), with comment lines naming the run id, the step and the size.
  :func:`load_checkpoint` reads nothing from ``X`` before its sha256 matches (:func:`verify_checkpoint`). A checkpoint
  without a checksum file (an older openus_hub wrote it, or it was copied alone) is refused, with the command that
  vouches for it.
* Crash safety: :func:`save_checkpoint` writes ``X`` under a temporary name and syncs it, records the new sha256 in
  ``X.sha256`` as *pending* (beside the confirmed sha256 of the ``X`` still in place), renames the new file over ``X``,
  then records its sha256 as confirmed. At every instant ``X`` matches the confirmed or the pending sha256, so a process
  killed at any step leaves ``X`` (old or new) usable. :func:`finish_interrupted_saves`, run when a job starts,
  confirms a pending record that the file matches and removes the temporaries of processes that no longer run.
* :func:`select_checkpoint`: ``--resume auto`` walks from the newest checkpoint to the oldest and takes the first that
  verifies, loads and passes the job's check, reporting each one it skipped and why.
* :func:`checkpoint_path`, :func:`list_checkpoints`, :func:`latest_checkpoint`, :func:`prune_checkpoints`: the
  step-numbered ``checkpoint_{step:08d}.pth`` files of pretraining and downstream runs. Pruning deletes only
  checkpoints whose checksum file names the current run id.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from openus_hub.io.files import fsync_dir, pid_alive
from openus_hub.pretrained import sha256_file

from . import faults

__all__ = [
    "CHECKPOINT_PATTERN",
    "CheckpointError",
    "TEMP_PATTERN",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_text",
    "checkpoint_path",
    "checksum_path",
    "finish_interrupted_saves",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_optimizer_state_strict",
    "load_state_dict_strict",
    "new_run_id",
    "prune_checkpoints",
    "read_checksum",
    "save_checkpoint",
    "require_parts",
    "select_checkpoint",
    "tensor_like",
    "verify_checkpoint",
]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d{8})\.pth$")
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")  # what atomic_write leaves if killed
CHECKSUM_SUFFIX = ".sha256"
_HEX = re.compile(r"^[0-9a-f]{64}$")
# the fix every "this file cannot be used" message ends with
USE_ANOTHER = "restore the file, or use an earlier checkpoint (--resume auto takes the newest one that verifies)"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line that names the file and the fix."""


def new_run_id() -> str:
    """A fresh run id: UTC start time plus 8 random hex digits, e.g. ``20250101T120000Z-1a2b3c4d``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


# ---------------------------------------------------------------------------------------------------------------------
# atomic files



def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``. Returns ``path``.
    On any error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(obj, path: str | Path) -> Path:
    """``torch.save(obj)`` into ``path`` through :func:`atomic_write` (no checksum file: use :func:`save_checkpoint`
    for training checkpoints)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


# ---------------------------------------------------------------------------------------------------------------------
# checksum files


@dataclass(frozen=True)
class Checksum:
    sha256: str
    size: int | None = None
    run_id: str | None = None
    step: int | None = None

    def fields(self) -> str:
        return " ".join(f"{k}={v}" for k, v in (("run_id", self.run_id), ("step", self.step), ("bytes", self.size))
                        if v is not None)


@dataclass(frozen=True)
class ChecksumFile:
    confirmed: Checksum | None
    pending: Checksum | None


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _parse_fields(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def _checksum(sha: str, fields: dict[str, str]) -> Checksum:
    def number(key):
        value = fields.get(key)
        return int(value) if value is not None and value.isdigit() else None

    return Checksum(sha, number("bytes"), fields.get("run_id"), number("step"))


def read_checksum(path: str | Path) -> ChecksumFile:
    """The records of ``path``'s checksum file. Accepts what ``sha256sum FILE > FILE.sha256`` writes (the file may
    be named with a folder). Raises :class:`CheckpointError` when the checksum file is missing or holds no record."""
    path = Path(path)
    side = checksum_path(path)
    fix = f"if you trust the file, record its checksum with: sha256sum {path} > {side}"
    try:
        text = side.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no checksum file {side.name}, so its integrity cannot be "
                              f"checked (an older openus_hub wrote it, or it was copied without it); {fix}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checksum file {side} cannot be read ({type(err).__name__}); {fix}") from None
    confirmed = pending = None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# pending "):
            f = _parse_fields(line[len("# pending "):])
            if _HEX.match(f.get("sha256", "")):
                pending = _checksum(f["sha256"], f)
        elif line.startswith("#"):
            fields.update(_parse_fields(line[1:]))
        elif line:
            parts = line.split(None, 1)
            name = parts[1].lstrip("*") if len(parts) == 2 else ""
            if _HEX.match(parts[0].lower()) and Path(name).name == path.name and confirmed is None:
                confirmed = _checksum(parts[0].lower(), fields)
    if confirmed is None and pending is None:
        raise CheckpointError(f"checksum file {side} holds no sha256 line for {path.name}; {fix}")
    return ChecksumFile(confirmed, pending)


def _write_checksum(path: Path, confirmed: Checksum | None, pending: Checksum | None = None) -> None:
    lines = [f"# openus_hub training checkpoint; check it with: sha256sum -c {path.name}{CHECKSUM_SUFFIX}"]
    if confirmed is not None:
        lines += [f"# {confirmed.fields()}", f"{confirmed.sha256}  {path.name}"]
    if pending is not None:  # a save in progress: the new file is complete and synced, not yet renamed in
        lines.append(f"# pending {pending.fields()} sha256={pending.sha256}")
    atomic_write_text(checksum_path(path), "\n".join(lines) + "\n")


def verify_checkpoint(path: str | Path) -> Checksum:
    """Check ``path`` against its checksum file; returns the record it matches. Raises a one-line
    :class:`CheckpointError` (missing file or checksum, size or sha256 mismatch)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    records = read_checksum(path)
    candidates = [c for c in (records.confirmed, records.pending) if c is not None]
    size = path.stat().st_size
    sizes = [c.size for c in candidates]
    if None not in sizes and size not in sizes:
        raise CheckpointError(f"checkpoint {path} is {size} bytes but {checksum_path(path).name} records "
                              f"{' or '.join(map(str, sizes))} (truncated or overwritten); {USE_ANOTHER}")
    digest = sha256_file(path, cached=False)  # afresh: a file damaged in place must not be vouched for from a cache
    for c in candidates:
        if c.sha256 == digest:
            return c
    raise CheckpointError(f"checkpoint {path} does not match its sha256 in {checksum_path(path).name} (the file "
                          f"changed after it was written: it is damaged); {USE_ANOTHER}")


# ---------------------------------------------------------------------------------------------------------------------
# writing and reading


class _HashingWriter:
    """A write-only file that hashes what goes through it (``torch.save`` writes sequentially)."""

    def __init__(self, f: BinaryIO, name: str):
        self.f, self.name, self.size, self.h = f, name, 0, hashlib.sha256()

    def write(self, data) -> int:
        n = self.f.write(data)  # a buffered file writes everything or raises
        self.h.update(data)
        self.size += len(data)
        if os.environ.get(faults.ENV):  # test hook: killed with the temporary file half written
            self.f.flush()
            faults.point("checkpoint", stage="partial", file=self.name)
        return n

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write a training checkpoint (plain data only) and its checksum file, crash-safely (module docstring). The
    checksum file records ``state["run_id"]`` and ``state["step"]`` when present. Every job saves through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    step = state.get("step")
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f, path.name)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        faults.point("checkpoint", stage="written", file=path.name)
        new = Checksum(writer.h.hexdigest(), writer.size, state.get("run_id"), int(step) if step is not None else None)
        old = None
        if path.exists():
            try:
                old = read_checksum(path).confirmed  # the file still in place stays verifiable until the rename
            except CheckpointError:
                old = None
        _write_checksum(path, old, pending=new)
        faults.point("checkpoint", stage="pending", file=path.name)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        faults.point("checkpoint", stage="replaced", file=path.name)
        _write_checksum(path, new)
        faults.point("checkpoint", stage="confirmed", file=path.name)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path, verify: bool = True) -> dict:
    """Read a training checkpoint onto the CPU: its sha256 checked against its checksum file (unless ``verify`` is
    False: another process has just verified it), then ``torch.load(weights_only=True)``. Every job loads through
    here. Raises a one-line :class:`CheckpointError`."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    elif not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, ...: one line, naming the file
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # torch's weights_only refusal is a paragraph; its reason is the "Unsupported global: ..." line
        reason = next((line for line in lines if "Unsupported" in line or "Unpickler error" in line),
                      lines[0] if lines else type(err).__name__)
        raise CheckpointError(f"checkpoint {path} cannot be read with torch.load(weights_only=True): {reason}; "
                              f"{USE_ANOTHER}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict (got {type(state).__name__}); {USE_ANOTHER}")
    return state


def _first_non_finite(obj, where: str = "") -> str | None:
    """The key path of the first floating-point tensor in ``obj`` (nested dicts/lists) that holds NaN or Inf."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all()):
            return where or "(top level)"
        return None
    if isinstance(obj, float):
        return None  # plain numbers (metrics, histories) may legitimately be NaN, e.g. an undefined F1
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _first_non_finite(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def require_parts(state: dict, required: Iterable[str], path: str | Path) -> None:
    """One-line :class:`CheckpointError` when a loaded checkpoint lacks a part a resume needs."""
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; resume from another checkpoint")


def select_checkpoint(resume: str | os.PathLike | None, candidates: Iterable[Path],
                      check: Callable[[dict, Path], None] | None = None) -> tuple[Path | None, dict | None, list[str]]:
    """The checkpoint a job resumes from: ``(path, state, skipped)``.

    ``resume`` is None (start afresh: ``(None, None, [])``), a path (that checkpoint; any problem is an error) or
    ``"auto"``: ``candidates`` newest first, the first that verifies against its sha256, loads, holds only finite
    tensors and passes ``check(state, path)`` (the job's own test, raising :class:`CheckpointError`); ``skipped``
    says, for each newer one, why it was passed over. No candidate at all: ``(None, None, [])``, a fresh start. None
    usable: :class:`CheckpointError` naming each and why."""
    if resume is None:
        return None, None, []
    explicit = str(resume) != "auto"
    candidates = [Path(resume)] if explicit else list(candidates)
    skipped = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
            bad = _first_non_finite(state)
            if bad:
                raise CheckpointError(f"checkpoint {path} holds NaN/Inf values in {bad}; {USE_ANOTHER}")
            if check is not None:
                check(state, path)
        except CheckpointError as err:
            if explicit:
                raise
            reason = str(err).split("; ")[0].removeprefix(f"checkpoint {path}").lstrip(": ")
            skipped.append(f"{path.name}: {reason}")
            continue
        return path, state, skipped
    if skipped:
        folder = candidates[0].parent
        vouch = ("; to vouch for a checkpoint you trust that has none: sha256sum FILE > FILE.sha256"
                 if any("no checksum file" in reason for reason in skipped) else "")
        raise CheckpointError(f"--resume auto: no checkpoint in {folder} can be used ({'; '.join(skipped)}); "
                              "restore one (a checkpoint whose sha256 matches its .sha256 file), or start afresh "
                              f"with --overwrite{vouch}")
    return None, None, []


def load_state_dict_strict(module: torch.nn.Module, state_dict, path: str | Path, what: str, *,
                           check_only: bool = False, resizable: Iterable[str] = ()) -> None:
    """``module.load_state_dict(state_dict)`` that first checks every key, shape and dtype (``load_state_dict``
    alone converts integer or float64 tensors silently); a mismatch is a one-line :class:`CheckpointError` naming
    ``path``, the part (``what``) and the first offending keys. ``check_only``: check, do not load. Keys ending with
    one of ``resizable`` may differ in shape (buffers the module re-shapes on load), not in dtype or rank."""
    resizable = tuple(resizable)
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"checkpoint {path}: its {what} is a {type(state_dict).__name__}, not a state dict; "
                              f"{USE_ANOTHER}")
    own = module.state_dict()
    problems = [f"missing {k}" for k in own if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in own]
    for k, want in own.items():
        got = state_dict.get(k)
        if k not in state_dict:
            continue
        if not isinstance(got, torch.Tensor):
            problems.append(f"{k} is a {type(got).__name__}")
        elif got.dtype != want.dtype or (got.shape != want.shape and not (
                k.endswith(resizable) and resizable and got.ndim == want.ndim)):
            problems.append(f"{k} is {str(got.dtype).removeprefix('torch.')}{list(got.shape)}, the model has "
                            f"{str(want.dtype).removeprefix('torch.')}{list(want.shape)}")
    if problems:
        shown = ", ".join(problems[:3]) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise CheckpointError(f"checkpoint {path}: its {what} do not fit the model ({shown}); it was written by "
                              f"another configuration or version, or damaged; {USE_ANOTHER}")
    if not check_only:
        module.load_state_dict(state_dict, strict=True)


def load_optimizer_state_strict(optimizer: torch.optim.Optimizer, state_dict, path: str | Path) -> None:
    """``optimizer.load_state_dict(state_dict)`` after checking that each saved per-parameter tensor (momentum,
    second moment, ...) is floating point with its parameter's shape (``load_state_dict`` checks only the number of
    parameters; a wrong dtype or shape would fail later, mid-training). One-line :class:`CheckpointError`."""
    try:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        if len(ids) != len(params):
            raise ValueError(f"{len(ids)} parameters saved, the optimiser has {len(params)}")
        by_id = dict(zip(ids, params))
        for pid, entry in state_dict["state"].items():
            param = by_id[pid]
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.ndim and (
                        not value.is_floating_point() or value.shape != param.shape):
                    raise ValueError(f"state {key} of parameter {pid} is {str(value.dtype).removeprefix('torch.')}"
                                     f"{list(value.shape)}, the parameter {list(param.shape)}")
        optimizer.load_state_dict(state_dict)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {path}: its optimiser state does not fit ({' '.join(str(err).split())}); "
                              f"{USE_ANOTHER}") from None


def tensor_like(value, like: torch.Tensor, path: str | Path, what: str) -> torch.Tensor:
    """``value`` when it is a tensor of ``like``'s dtype and shape, else a one-line :class:`CheckpointError`
    (``copy_`` would broadcast or convert it silently)."""
    if not isinstance(value, torch.Tensor) or value.dtype != like.dtype or value.shape != like.shape:
        got = (f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}" if isinstance(value, torch.Tensor)
               else type(value).__name__)
        raise CheckpointError(f"checkpoint {path}: its {what} is {got}, expected "
                              f"{str(like.dtype).removeprefix('torch.')}{list(like.shape)}; {USE_ANOTHER}")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# interrupted saves


def _pid_running(pid: int) -> bool:
    # our own leftovers cannot be in progress: nothing is being written while this runs
    return pid != os.getpid() and pid_alive(pid)


def finish_interrupted_saves(folder: str | Path) -> list[str]:
    """After a process was killed while writing in ``folder``: remove the temporary files of processes that no
    longer run, and settle each checksum file left with a pending record (confirm it when the checkpoint matches
    it, drop it when the checkpoint still matches the confirmed one). Returns what was done, one line each."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done = []
    for entry in sorted(folder.iterdir()):
        m = TEMP_PATTERN.match(entry.name)
        if m and entry.is_file() and not entry.is_symlink() and not _pid_running(int(m.group("pid"))):
            entry.unlink(missing_ok=True)
            done.append(f"removed {entry.name} (left by an interrupted write)")
    for side in sorted(folder.glob("*" + CHECKSUM_SUFFIX)):
        target = side.with_name(side.name[: -len(CHECKSUM_SUFFIX)])
        try:
            records = read_checksum(target)
        except CheckpointError:
            continue
        if not target.is_file():
            if records.confirmed is None:  # a save killed before its file was renamed in: nothing to vouch for
                side.unlink(missing_ok=True)
                done.append(f"removed {side.name} (its checkpoint was never completed)")
            continue
        if records.pending is None:
            continue
        digest = sha256_file(target, cached=False)
        if digest == records.pending.sha256:
            _write_checksum(target, records.pending)
            done.append(f"confirmed the sha256 of {target.name} (its save was interrupted after the file was "
                        "complete)")
        elif records.confirmed is not None and digest == records.confirmed.sha256:
            _write_checksum(target, records.confirmed)
            done.append(f"kept {target.name} as it was (its replacement was interrupted before it was renamed in)")
    return done


# ---------------------------------------------------------------------------------------------------------------------
# step-numbered checkpoints


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


def _run_of(path: Path) -> str | None:
    try:
        records = read_checksum(path)
    except CheckpointError:
        return None
    return records.confirmed.run_id if records.confirmed is not None and records.pending is None else None


def prune_checkpoints(folder: str | Path, keep_last: int, keep_every: int | None = None, *, run_id: str,
                      upto_step: float = math.inf) -> list[Path]:
    """Delete (with their checksum files) all but the last ``keep_last`` checkpoints of run ``run_id`` at steps up
    to ``upto_step``, except those whose step is a multiple of ``keep_every``; returns the deleted paths.

    Only checkpoints whose checksum file names ``run_id`` are candidates: another run's checkpoints, files without a
    checksum, one whose save is unfinished and any beyond ``upto_step`` (left by an interrupted run, replaced when
    the run gets there) are never touched."""
    ours = [(step, path) for step, path in list_checkpoints(folder) if step <= upto_step and _run_of(path) == run_id]
    removed = []
    for step, path in ours[: max(0, len(ours) - keep_last)]:
        if keep_every and step % keep_every == 0:
            continue
        path.unlink(missing_ok=True)
        checksum_path(path).unlink(missing_ok=True)
        removed.append(path)
    return removed
