"""Helpers shared by the converters and the training exports: one-line errors, input integrity and the crash-safe
output-folder swap. Imported as a package (``from conversion._common import ...``) or, by the converter scripts, as a
sibling module.

Output folders (:func:`write_folder_atomic`, :func:`save_atomic`)
-----------------------------------------------------------------
Nothing the user did not name is deleted:

* the output folder may not be, or contain, an input file (``inputs=``);
* a non-empty output folder is refused unless ``overwrite=True``, and even then it is replaced only when it holds a
  previous export, recognised by its files (:data:`EXPORT_FILE_PATTERNS`); otherwise the refusal names the files
  that are not ours;
* an output folder under a file, or whose parent is not writable, is a one-line :class:`ConversionError`.

The new folder is written under a temporary name beside the target (``.<name>.openus-partial-*``), marked complete
(``.<name>.openus-ready``, with a ``.openus-new`` marker file inside) and swapped in: with Linux
``renameat2(RENAME_EXCHANGE)`` the target is never missing; elsewhere the old folder is renamed aside
(``.<name>.openus-old``) and the new one renamed in. A lock file (``.<name>.openus-lock``, holding pid and host)
keeps two writers apart. A process killed at any step leaves enough on disk for the next run on the same folder to
finish the swap (the new folder was complete) or roll it back (it was not), and to remove every temporary
(:func:`recover_interrupted_swap`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fnmatch
import os
import shutil
import socket
import sys
import uuid
import zipfile
from collections.abc import Callable, Iterable, Sequence
from zlib import error as zlib_error

from openus_hub.io.files import fsync_dir, pid_alive


__all__ = [
    "EXPORT_FILE_PATTERNS",
    "ConversionError",
    "blaming",
    "check_floating_point",
    "check_output_dir",
    "check_sha256",
    "max_abs_diff",
    "one_line",
    "recover_interrupted_swap",
    "save_atomic",
    "sha256_file",
    "verify_zip_checkpoint",
    "write_folder_atomic",
]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes: :func:`openus_hub.auto.sha256_file`, the one implementation for the library, the
    converters and the exports (imported on use, so this module stays light for the training processes)."""
    from openus_hub.auto import sha256_file as impl

    return impl(path, chunk)


class ConversionError(ValueError):
    """A checkpoint that cannot be converted, or an output folder that cannot be written; the message is one line
    that names the problem and the fix."""


# ---------------------------------------------------------------------------------------------------------------------
# input integrity


def check_sha256(path: str, expected: str | None) -> str:
    """sha256 of ``path``; :class:`ConversionError` when ``expected`` is given and differs."""
    got = sha256_file(path)
    if expected is not None:
        want = expected.strip().lower()
        if len(want) != 64 or any(c not in "0123456789abcdef" for c in want):
            raise ConversionError(f"--expect-sha256 must be 64 hex digits, got {expected!r}")
        if got != want:
            raise ConversionError(f"{path} has sha256 {got}, not the expected {want}: the file is corrupt, "
                                  "incomplete or a different checkpoint; download or copy it again")
    return got


def verify_zip_checkpoint(path: str) -> None:
    """Check the CRC-32 of every member of a zip-format ``torch.save`` file before anything in it is trusted.

    ``torch.load`` reads tensor storages without checking their CRC-32, so random bytes written into a checkpoint
    become silently different weights. A member saved without a CRC (``torch.serialization.set_crc32_options(False)``
    writes 0) cannot be checked and is skipped. Legacy (non-zip) ``torch.save`` files carry no checksum: they pass
    here and only ``--expect-sha256`` can vouch for them.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.CRC == 0 and info.file_size > 0:
                    continue
                try:
                    with zf.open(info) as member:
                        while member.read(1 << 22):
                            pass
                except zipfile.BadZipFile as err:
                    if "CRC" in str(err):
                        raise ConversionError(
                            f"{path} is corrupt: the CRC-32 of its member {info.filename!r} does not match (bytes "
                            "changed after it was saved); download or copy it again") from None
                    raise
    except ConversionError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, zlib_error) as err:
        raise ConversionError(f"{path} is a damaged zip checkpoint ({type(err).__name__}: "
                              f"{_first_line(err)}); download or copy it again") from None


def check_floating_point(tensors: dict, path: str, allow_nonfinite: bool = False,
                         exempt: Callable[[str], bool] = lambda key: False) -> None:
    """Every tensor is floating point and (unless ``allow_nonfinite``) finite; ``exempt(key)`` skips bookkeeping
    entries (e.g. BatchNorm's ``num_batches_tracked``). Raises a one-line :class:`ConversionError` blaming ``path``."""
    import torch

    wrong = [f"{k} ({str(v.dtype).replace('torch.', '')})" for k, v in tensors.items()
             if not exempt(k) and not v.is_floating_point()]
    if wrong:
        raise ConversionError(f"{path}: {len(wrong)} weight(s) are not floating point, e.g. {', '.join(wrong[:3])}; "
                              "weights are float16/bfloat16/float32/float64, so the file is corrupt or not a "
                              "checkpoint of this model")
    if allow_nonfinite:
        return
    bad = []
    for key, value in tensors.items():
        if exempt(key) or value.device.type == "meta":
            continue
        n = int((~torch.isfinite(value)).sum())
        if n:
            bad.append(f"{key} ({n} of {value.numel()})")
    if bad:
        raise ConversionError(f"{path} holds non-finite weights (NaN/Inf) in {len(bad)} tensor(s), e.g. "
                              f"{', '.join(bad[:3])}: the checkpoint is corrupt or training diverged; pass "
                              "--allow-nonfinite to convert it anyway")


def max_abs_diff(a, b, nonfinite_ok: bool = False) -> float:
    """Max |a - b|. NaN/Inf must sit at the same places with the same values, or the result is inf; with
    ``nonfinite_ok`` (weights converted with --allow-nonfinite, whose NaN spreads differently through each scan
    implementation) only the entries finite in both are compared."""
    import torch

    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if nonfinite_ok:
        both = fa & fb
        return (a[both] - b[both]).abs().max().item() if both.any() else 0.0
    if not torch.equal(fa, fb) or not torch.equal(torch.isnan(a), torch.isnan(b)) or not torch.equal(
            a[~fa & ~torch.isnan(a)], b[~fb & ~torch.isnan(b)]):
        return float("inf")
    return (a[fa] - b[fb]).abs().max().item() if fa.any() else 0.0


@contextlib.contextmanager
def blaming(*paths: str):
    """Prefix the input file(s) to a :class:`ConversionError` raised inside that names none of them yet, so every
    error about a checkpoint's content names the file."""
    try:
        yield
    except ConversionError as err:
        if any(str(p) in str(err) for p in paths if p):
            raise
        raise ConversionError(f"{' + '.join(str(p) for p in paths if p)}: {err}") from None


def one_line(err: BaseException | str) -> str:
    """An error message on one line (newlines and runs of spaces collapsed), for ``error: ...`` output."""
    return " ".join(str(err).split()) or (type(err).__name__ if isinstance(err, BaseException) else "")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


# ---------------------------------------------------------------------------------------------------------------------
# output folders

# files a previous export consists of: save_pretrained (config, weights, sharded weights and their index), processor
# configs, the model card and ONNX exports; a folder holding anything else is not replaced by --overwrite
EXPORT_FILE_PATTERNS = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                        "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                        "README.md", "*.onnx", "*.onnx.data", "*.onnx_data")
_MARKER = ".openus-new"  # inside a complete, not yet finished new folder

# test hook: called with the name of each step of the swap (fault injection kills the process there)
_fault_hook: Callable[[str], None] | None = None
# renameat2(RENAME_EXCHANGE) when the platform and file system support it; tests turn it off to cover the fallback
_USE_EXCHANGE = True


def _step(name: str) -> None:
    if _fault_hook is not None:
        _fault_hook(name)


def _names(target: str) -> dict[str, str]:
    parent, name = os.path.split(target)
    return {k: os.path.join(parent, f".{name}.openus-{k}") for k in ("ready", "old", "lock")} | {
        "partial_prefix": f".{name}.openus-partial-", "parent": parent}


def _listing(folder: str) -> list[str]:
    """Relative paths of every file and folder under ``folder`` (folders end with '/'), sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = os.path.relpath(root, folder)
        out += [os.path.normpath(os.path.join(rel, d)) + "/" for d in dirs]
        out += [os.path.normpath(os.path.join(rel, f)) for f in files]
    return sorted(out)


def _remote_code_files() -> set[str]:
    """Names of the source files ``save_pretrained`` copies beside an OpenUS model for ``trust_remote_code``: the
    modeling and ops modules and the kernel sources, at the top level or under ``csrc/``."""
    import importlib.util

    spec = importlib.util.find_spec("openus_hub")  # located, not imported (importing it loads torch)
    if spec is None or not spec.submodule_search_locations:
        return set()
    root = os.path.abspath(list(spec.submodule_search_locations)[0])
    names = set()
    for sub in ("ops", os.path.join("models", "openus"), "csrc"):
        folder = os.path.join(root, sub)
        if os.path.isdir(folder):
            names |= {n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)) and n != "__init__.py"
                      and not n.endswith(".pyc")}
    return names | {f"csrc/{n}" for n in names} | ({"csrc/"} if names else set())


def unexpected_files(folder: str) -> list[str]:
    """Entries of ``folder`` that no export of ours writes (:data:`EXPORT_FILE_PATTERNS` and the remote-code
    sources copied beside an OpenUS model)."""
    ours = _remote_code_files()
    return [p for p in _listing(folder) if p != _MARKER and p not in ours
            and not any(fnmatch.fnmatchcase(p, pat) for pat in EXPORT_FILE_PATTERNS)]


def _first_existing_ancestor(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_target(target: str, overwrite: bool, inputs: Iterable[str], what: str) -> None:
    if os.path.islink(target):
        raise ConversionError(f"{what} {target} is a symlink; give the folder it points to "
                              f"({os.path.realpath(target)}) or a new path")
    if os.path.lexists(target) and not os.path.isdir(target):
        raise ConversionError(f"{what} {target} exists and is not a folder; choose another path")
    anc = _first_existing_ancestor(os.path.dirname(target))
    if not os.path.isdir(anc):
        raise ConversionError(f"cannot create {what} {target}: {anc} is a file, not a folder")
    real_target = os.path.realpath(target)
    for inp in inputs:
        real = os.path.realpath(inp)
        if real == real_target or real.startswith(real_target.rstrip(os.sep) + os.sep):
            raise ConversionError(f"{what} {target} contains the input {inp}; write the output to another folder "
                                  "(nothing was written)")
    if not os.path.isdir(target) or not os.listdir(target):
        return
    foreign = unexpected_files(target)
    is_export = not foreign and os.path.isfile(os.path.join(target, "config.json"))
    listed = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
    if is_export and not overwrite:
        raise ConversionError(f"{what} {target} holds a previous export; pass --overwrite to replace it")
    if not is_export:
        detail = f"it also holds {listed}" if foreign else "it has no config.json"
        raise ConversionError(f"{what} {target} is not empty and is not a previous export ({detail}); "
                              + ("--overwrite replaces only a folder written by an export: " if overwrite else "")
                              + "choose a new or empty folder, or move those files away")



def _acquire_lock(lock: str, target: str) -> None:
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(lock, encoding="utf-8") as f:
                    pid_text, _, host = f.read().strip().partition(" ")
                pid = int(pid_text)
            except (OSError, ValueError):
                pid, host = -1, socket.gethostname()  # unreadable or half-written: left by a killed process
            if host != socket.gethostname() or (pid > 0 and pid_alive(pid)):
                raise ConversionError(f"{target} is being written by another process (pid {pid} on {host}); wait "
                                      f"for it, or delete {lock} if that process no longer runs") from None
            os.unlink(lock)  # stale: its process was killed
            continue
        except PermissionError as err:
            raise ConversionError(f"cannot write into {os.path.dirname(target)}: {_first_line(err)}") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(me)
        return
    raise ConversionError(f"could not take the lock {lock}; delete it if no other process writes {target}")


_RENAME_EXCHANGE = 2
_renameat2 = None


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False when unsupported here."""
    global _renameat2
    if not _USE_EXCHANGE or not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _renameat2 = getattr(libc, "renameat2", False)
        if _renameat2:
            _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if not _renameat2:
        return False
    at_fdcwd = -100
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: file system or kernel without RENAME_EXCHANGE
        return False
    raise OSError(errno, os.strerror(errno), a)



def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def _swap_in(ready: str, target: str, old: str) -> None:
    """``ready`` (complete, with the marker) becomes ``target``; the previous ``target`` is removed."""
    parent = os.path.dirname(target)
    if os.path.isdir(target):
        if _exchange(ready, target):  # target holds the new folder now, ready the old one
            _step("exchanged")
            os.replace(ready, old)
            _step("old-moved")
        else:
            os.replace(target, old)  # target missing until the next rename (a killed run is finished by recovery)
            _step("aside")
            os.replace(ready, target)
            _step("renamed-in")
    else:
        os.replace(ready, target)
        _step("renamed-in")
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)
    _step("old-removed")
    os.unlink(os.path.join(target, _MARKER))
    fsync_dir(target)
    _step("done")


def recover_interrupted_swap(target: str | os.PathLike) -> list[str]:
    """Finish or roll back a swap into ``target`` that a killed process left behind, and remove its temporaries
    (:func:`write_folder_atomic` does this itself before writing). Returns what it did, one phrase per action;
    :class:`ConversionError` when another live process is writing ``target``."""
    target = os.path.abspath(os.fspath(target))
    lock = _names(target)["lock"]
    if not os.path.isdir(os.path.dirname(target)):
        return []
    _acquire_lock(lock, target)
    try:
        return _recover(target)
    finally:
        os.unlink(lock)


def _recover(target: str) -> list[str]:
    n = _names(target)
    ready, old, parent = n["ready"], n["old"], n["parent"]
    done = []
    if not os.path.isdir(parent):
        return done
    for name in sorted(os.listdir(parent)):
        if name.startswith(n["partial_prefix"]):  # never completed: roll back
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            done.append(f"removed the incomplete {name}")
    target_is_new = os.path.isfile(os.path.join(target, _MARKER))
    ready_is_new = os.path.isfile(os.path.join(ready, _MARKER))
    if os.path.isdir(ready) and not ready_is_new:  # after an exchange: 'ready' holds the previous folder
        if os.path.isdir(target):
            shutil.rmtree(ready, ignore_errors=True)
            done.append("removed the previous folder left after an exchange")
        else:
            os.replace(ready, target)
            done.append("restored the previous folder")
    if not os.path.isdir(target):
        if ready_is_new:
            os.replace(ready, target)
            target_is_new = True
            done.append("finished an interrupted swap (the new folder was complete)")
        elif os.path.isdir(old):
            os.replace(old, target)
            done.append("rolled back an interrupted swap (restored the previous folder)")
    elif ready_is_new and not target_is_new:
        _swap_in(ready, target, old)
        target_is_new = False  # _swap_in removed the marker
        done.append("finished an interrupted swap (the new folder was complete)")
    if os.path.isdir(old):
        shutil.rmtree(old, ignore_errors=True)
        done.append("removed the previous folder left aside")
    if target_is_new:
        os.unlink(os.path.join(target, _MARKER))
        done.append("completed the last step of an interrupted swap")
    return done


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False, inputs: Sequence[str | os.PathLike] = (),
                     what: str = "--output-dir") -> None:
    """The refusals of :func:`write_folder_atomic`, before any work: call it first so a long conversion does not end
    in a refusal. Raises :class:`ConversionError`."""
    target = os.path.abspath(os.fspath(output_dir))
    _check_target(target, overwrite, [os.fspath(p) for p in inputs], what)
    anc = _first_existing_ancestor(os.path.dirname(target))
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ConversionError(f"cannot write {what} {target}: {anc} is not writable")


def write_folder_atomic(output_dir: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool = False,
                        inputs: Sequence[str | os.PathLike] = (), what: str = "--output-dir") -> list[str]:
    """Create ``output_dir`` with ``write(tmp_dir)``, crash-safely (see the module docstring).

    ``write`` fills an empty temporary folder beside the target; a :class:`ConversionError` it raises passes through
    unchanged and leaves the target as it was. ``inputs`` are files the output folder may not contain. Returns the
    recovery actions taken for an earlier interrupted run (usually [])."""
    import logging

    target = os.path.abspath(os.fspath(output_dir))
    inputs = [os.fspath(p) for p in inputs]
    check_output_dir(target, overwrite, inputs, what)
    n = _names(target)
    parent = n["parent"]
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise ConversionError(f"cannot create {what} {target}: {_first_line(err)}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"cannot write {what} {target}: its parent {parent} is not writable")
    _acquire_lock(n["lock"], target)
    try:
        recovered = _recover(target)
        for action in recovered:
            logging.getLogger(__name__).warning("%s: %s", target, action)
        _check_target(target, overwrite, inputs, what)  # again: recovery may have restored a folder
        partial = os.path.join(parent, n["partial_prefix"] + uuid.uuid4().hex[:12])
        try:
            os.mkdir(partial)
        except OSError as err:
            raise ConversionError(f"cannot write {what} {target}: {_first_line(err)}") from None
        try:
            try:
                write(partial)
            except OSError as err:  # disk full, permissions, ...: the target is untouched
                raise ConversionError(f"writing {what} {target} failed: {_first_line(err)}") from None
            _step("staged")
            with open(os.path.join(partial, _MARKER), "w", encoding="utf-8"):
                pass
            _fsync_tree(partial)
            os.replace(partial, n["ready"])
            fsync_dir(parent)
            _step("ready")
            _swap_in(n["ready"], target, n["old"])
        finally:
            if os.path.isdir(partial):
                shutil.rmtree(partial, ignore_errors=True)
    finally:
        try:
            os.unlink(n["lock"])
        except FileNotFoundError:
            pass
    return recovered


def save_atomic(model, output_dir: str | os.PathLike, overwrite: bool = False, finalize=None, *,
                inputs: Sequence[str | os.PathLike] = ()) -> None:
    """``model.save_pretrained`` into ``output_dir`` through :func:`write_folder_atomic`. ``finalize(tmp_dir)``, when
    given, runs after ``save_pretrained`` and before the swap (e.g. to check the saved files and write README.md);
    ``inputs`` are the files the model was read from (the output folder may not contain them)."""

    def write(tmp: str) -> None:
        model.save_pretrained(tmp)
        if finalize is not None:
            finalize(tmp)

    write_folder_atomic(output_dir, write, overwrite=overwrite, inputs=inputs)
