"""Build, cache and find the CPU scan kernel (``openus_hub/csrc/ss2d_scan_cpu.cpp``).

The kernel is plain C++ without torch headers, so one build serves every torch version and takes a second or two.
It is built once per machine, on first use or ahead of time with::

    python -m openus_hub.ops.build        # prebuild (scripts/install.sh runs it); prints where the library lives

Cache: ``$OPENUS_HUB_KERNEL_CACHE`` if set, else ``$XDG_CACHE_HOME/openus_hub/kernels``
(``~/.cache/openus_hub/kernels``; ``%LOCALAPPDATA%\\openus_hub\\kernels`` on Windows). Each build lives in its own
folder named by a hash of the kernel source, the compiler (path and ``--version``), the flags and the platform; nothing
about the Python environment enters the key, so every virtual environment on the machine shares one build. A build
runs under a file lock and appears by an atomic rename of a complete folder, so concurrent first uses build once;
``build.log`` in the cache records every build. A compile error is recorded beside the builds (``*.failed``) so later
processes fall back at once instead of compiling again; a changed source or compiler gets a new key.

Nothing here runs at import: the first call of :func:`load_library` (through the first CPU scan) does the work.
Folders saved for ``trust_remote_code`` carry these Python files but not the C++ source: their copy of this file is
stamped with the source hash (:func:`vendor_ops`) and finds the same build in the cache, or reports it missing.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["ABI_VERSION", "CACHE_ENV", "KernelUnavailable", "cache_dir", "load_library", "main", "vendor_ops"]

CACHE_ENV = "OPENUS_HUB_KERNEL_CACHE"
KERNEL_NAME = "ss2d_scan_cpu"
SOURCE_FILE = "ss2d_scan_cpu.cpp"
LIBRARY_FILE = "libopenus_ss2d_scan_cpu" + (".dll" if os.name == "nt" else ".so")
BUILD_TIMEOUT_S = 600
# The C functions' signatures; the library reports its own (openus_ss2d_abi_version) and a mismatch is refused.
ABI_VERSION = 2
# Set in copies written by vendor_ops() (remote-code folders, which carry no C++ source); None in the package.
_VENDORED_SOURCE_SHA256: str | None = None

PREBUILD = "`python -m openus_hub.ops.build`"


class KernelUnavailable(RuntimeError):
    """The CPU kernel cannot be built or found here; the message says why and how to fix it."""


@dataclass(frozen=True)
class Library:
    path: Path
    handle: ctypes.CDLL
    built: bool  # True when this call compiled it


def cache_dir() -> Path:
    """The kernel cache folder (not created here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "openus_hub" / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "openus_hub" / "kernels"


def _source_path() -> Path:
    return Path(__file__).resolve().parent.parent / "csrc" / SOURCE_FILE


def _source_bytes() -> bytes | None:
    """The kernel source, or None where it is not shipped (remote-code folders)."""
    try:
        return _source_path().read_bytes().replace(b"\r\n", b"\n")
    except OSError:
        return None


def source_sha256() -> str | None:
    source = _source_bytes()
    return hashlib.sha256(source).hexdigest() if source is not None else _VENDORED_SOURCE_SHA256


def _isa_flags() -> list[str]:
    """Vector ISA flags: AVX2 + FMA where the CPU has both (AVX-512 machines get the same code), else the default.

    Deliberately never ``-march=native``: the instructions, and so the results, are the same on every x86-64 machine
    with AVX2, whatever else it supports.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if "avx2" in flags and "fma" in flags else []


def _base_flags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fno-exceptions", "-fno-rtti", "-ffp-contract=fast",
             "-Wno-psabi"]
    if sys.platform == "darwin":
        flags += ["-undefined", "dynamic_lookup"]
    return flags + _isa_flags()


def _variants() -> list[tuple[str, list[str]]]:
    """Builds to try in order: OpenMP threads, then plain pthreads (compilers without OpenMP, e.g. Apple clang)."""
    base = _base_flags()
    return [("openmp", base + ["-fopenmp"]), ("pthreads", base + ["-pthread"])]


_compiler_cache: dict[str, tuple[str, str] | None] = {}


def find_compiler() -> tuple[str, str] | None:
    """``(path, first line of --version)`` of ``$CXX`` or the first of c++, g++, clang++ found; None without one."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    key = "\0".join(names)
    if key not in _compiler_cache:
        found = None
        for name in names:
            path = shutil.which(name)
            if path is None:
                continue
            try:
                out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.SubprocessError):
                continue
            if out.returncode == 0 and out.stdout.strip():
                found = (os.path.realpath(path), out.stdout.strip().splitlines()[0])
                break
        _compiler_cache[key] = found
    return _compiler_cache[key]


def _key_material(source_sha: str, compiler: tuple[str, str] | None, flags: list[str]) -> dict:
    return {
        "kernel": KERNEL_NAME,
        "abi_version": ABI_VERSION,
        "source_sha256": source_sha,
        "compiler": list(compiler) if compiler else None,
        "flags": flags,
        "machine": platform.machine(),
        "system": platform.system(),
    }


def _entry_name(material: dict) -> str:
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return f"{KERNEL_NAME}-{digest[:24]}"


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float = BUILD_TIMEOUT_S):
    """Exclusive lock on ``path`` across processes (flock on POSIX, msvcrt on Windows), waiting up to ``timeout``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, announced = time.monotonic() + timeout, False
        while True:
            try:
                if os.name == "nt":
                    import msvcrt

                    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                else:
                    import fcntl

                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise KernelUnavailable(f"timed out after {timeout:.0f} s waiting for another process building "
                                            f"the kernel (lock {path})") from None
                if not announced:
                    logger.info("waiting for another process to finish building the OpenUS CPU scan kernel")
                    announced = True
                time.sleep(0.05)
        yield
    finally:
        with contextlib.suppress(OSError):
            if os.name == "nt":
                import msvcrt

                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
            else:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _log_build(cache: Path, line: str) -> None:
    with contextlib.suppress(OSError), open(cache / "build.log", "a", encoding="utf-8") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()} {line}\n")


class _CompileError(Exception):
    pass


def _compile(cache: Path, entry: Path, material: dict, source: bytes, compiler: tuple[str, str], flags: list[str]):
    """Compile into a temporary folder inside ``cache``, then rename the complete folder to ``entry``."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=cache))
    try:
        (tmp / SOURCE_FILE).write_bytes(source)
        cmd = [compiler[0], *flags, str(tmp / SOURCE_FILE), "-o", str(tmp / LIBRARY_FILE)]
        start = time.perf_counter()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, cwd=tmp)
        except subprocess.TimeoutExpired as err:
            raise KernelUnavailable(f"the compiler ran for more than {BUILD_TIMEOUT_S} s") from err
        seconds = time.perf_counter() - start
        if out.returncode != 0 or not (tmp / LIBRARY_FILE).is_file():
            raise _CompileError((out.stderr or out.stdout).strip()[-2000:] or f"exit code {out.returncode}")
        info = dict(material, command=cmd[:1] + flags, build_seconds=round(seconds, 3),
                    built_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        (tmp / "build.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, entry)  # atomic: the entry appears complete or not at all
        except OSError:
            if not (entry / LIBRARY_FILE).is_file():
                raise
            # another process built the same entry at the same time (a file system where locks do not hold)
            _log_build(cache, f"built {entry.name} in {seconds:.2f} s ({sys.executable}); kept the other build")
            return
        _log_build(cache, f"built {entry.name} in {seconds:.2f} s ({sys.executable})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _find_prebuilt(cache: Path, source_sha: str) -> Path | None:
    """A build of this source for this platform and ISA by any compiler (used when no compiler is found here)."""
    isa = _isa_flags()
    candidates = []
    for info_path in cache.glob(f"{KERNEL_NAME}-*/build.json"):
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (info.get("source_sha256") == source_sha and info.get("abi_version") == ABI_VERSION
                and info.get("machine") == platform.machine() and info.get("system") == platform.system()
                and all(f in isa for f in info.get("flags", []) if f.startswith("-m"))
                and (info_path.parent / LIBRARY_FILE).is_file()):
            candidates.append((("-fopenmp" in info.get("flags", [])), info_path.stat().st_mtime, info_path.parent))
    return max(candidates)[2] / LIBRARY_FILE if candidates else None


def _locate(allow_build: bool, retry_failed: bool = False) -> tuple[Path, bool]:
    """Path of a usable library (building it if needed and allowed) and whether this call built it.

    A recorded compile failure is returned as an error at once, unless ``retry_failed`` (the build command) asks to
    compile again.
    """
    source_sha, source = source_sha256(), _source_bytes()
    if source_sha is None:
        raise KernelUnavailable(f"the kernel source {_source_path()} is missing from this installation")
    cache = cache_dir()
    compiler = find_compiler()
    if compiler is not None:
        errors = []
        for variant, flags in _variants():
            material = _key_material(source_sha, compiler, flags)
            entry = cache / _entry_name(material)
            if (entry / LIBRARY_FILE).is_file():
                return entry / LIBRARY_FILE, False
            failed = cache / f"{entry.name}.failed"
            if failed.is_file() and not (retry_failed and allow_build and source is not None):
                errors.append(f"{variant}: " + failed.read_text(encoding="utf-8", errors="replace").strip()[-300:])
                continue
            if source is None or not allow_build:
                break
            try:
                cache.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise KernelUnavailable(f"cannot create the kernel cache {cache} ({err}); set {CACHE_ENV} to a "
                                        "writable folder") from err
            with _file_lock(cache / f"{entry.name}.lock"):
                if (entry / LIBRARY_FILE).is_file():  # built by another process while we waited
                    return entry / LIBRARY_FILE, False
                if entry.exists():  # an entry without its library (deleted by hand): rebuild it
                    shutil.rmtree(entry)
                logger.info("compiling the OpenUS CPU scan kernel (%s, once per machine) into %s", variant, entry)
                try:
                    _compile(cache, entry, material, source, compiler, flags)
                    failed.unlink(missing_ok=True)  # a retry that worked
                    return entry / LIBRARY_FILE, True
                except _CompileError as err:
                    failed.write_text(f"{compiler[1]}: {err}\n", encoding="utf-8")
                    _log_build(cache, f"FAILED {entry.name} ({variant}); see {failed.name}")
                    errors.append(f"{variant}: {str(err)[-300:]}")
                except OSError as err:
                    raise KernelUnavailable(f"cannot build the kernel in {cache} ({err}); set {CACHE_ENV} to a "
                                            "writable folder") from err
        if errors:
            raise KernelUnavailable("the CPU scan kernel failed to compile (" + " | ".join(errors) + "). Fix: set CXX "
                                    f"to another C++ compiler and run {PREBUILD} (it retries), and please report the "
                                    "error")
    prebuilt = _find_prebuilt(cache, source_sha) if cache.is_dir() else None
    if prebuilt is not None:
        return prebuilt, False
    if compiler is None:
        raise KernelUnavailable(f"no C++ compiler found (tried {os.environ.get('CXX') or 'c++, g++, clang++'}). Fix: "
                                "install one (e.g. `apt install g++` or `xcode-select --install`) or set CXX, then "
                                f"run {PREBUILD}")
    if source is None:
        raise KernelUnavailable("the kernel is not built on this machine and this folder carries no C++ source. "
                                f"Fix: `pip install openus_hub`, then run {PREBUILD} once")
    raise KernelUnavailable(f"the kernel is not built yet. Fix: run {PREBUILD}")


_lock = threading.Lock()
_library: Library | None = None


def load_library(allow_build: bool = True, retry_failed: bool = False) -> Library:
    """Load the kernel library, building it first if this machine has none. Raises :class:`KernelUnavailable`.

    ``retry_failed`` compiles again where an earlier compile failed (the failure is otherwise remembered).
    """
    global _library
    with _lock:
        if _library is None:
            path, built = _locate(allow_build, retry_failed)
            try:
                handle = ctypes.CDLL(str(path))
                abi = handle.openus_ss2d_abi_version()
            except (OSError, AttributeError) as err:
                raise KernelUnavailable(f"cannot load {path}: {err}") from err
            if abi != ABI_VERSION:
                raise KernelUnavailable(f"{path} has ABI version {abi}, this code needs {ABI_VERSION}")
            _library = Library(path, handle, built)
        return _library


def vendor_ops(folder: str | os.PathLike) -> list[str]:
    """Copy every ``openus_hub/ops`` module into ``folder`` (a model saved for ``trust_remote_code``).

    The copy of this file is stamped with the kernel source's sha256, so the folder's code, which carries no C++
    source, finds the kernel built by openus_hub on the same machine and never compiles a copy of its own.
    """
    ops_dir, folder = Path(__file__).resolve().parent, Path(folder)
    sha = source_sha256()
    copied = []
    for path in sorted(ops_dir.glob("*.py")):
        if path.name == "__init__.py" or path.resolve() == (folder / path.name).resolve():
            continue
        text = path.read_text(encoding="utf-8")
        if path.name == "build.py" and sha is not None:
            text = text.replace("_VENDORED_SOURCE_SHA256: str | None = None",
                                f"_VENDORED_SOURCE_SHA256: str | None = {sha!r}", 1)
        tmp = folder / f".{path.name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / path.name)
        copied.append(path.name)
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m openus_hub.ops.build",
        description="Build the OpenUS CPU scan kernel into the kernel cache (once per machine) and print where it is. "
        f"Cache: ${CACHE_ENV}, else ~/.cache/openus_hub/kernels.",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the library path")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        lib = load_library(retry_failed=True)
    except KernelUnavailable as err:
        print(f"error: {err}. Without the kernel, openus_hub uses the slower PyTorch scan.", file=sys.stderr)
        return 1
    if args.quiet:
        print(lib.path)
    else:
        what = f"built in {time.perf_counter() - start:.1f} s" if lib.built else "already built"
        print(f"OpenUS CPU scan kernel: {lib.path} ({what}; cache {cache_dir()}, override with ${CACHE_ENV})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
