"""The CPU kernel's build and cache: built once per machine, shared by every environment, safe under concurrency,
never built at import or test collection, and never compiled a second time by a folder loaded with remote code."""

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from openus_hub import OpenUSConfig, OpenUSModel
from openus_hub.ops import build
from tests.conftest import REPO_ROOT, skip_or_fail

# import + first forward through the kernel, then where the library came from; READY_DIR (if set) is a barrier
# that holds every process until READY_COUNT of them have finished importing, so their first uses really overlap
FIRST_USE = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    from openus_hub.ops import cross_selective_scan
    from openus_hub.ops.build import load_library
    from tests._scan_utils import scan_inputs
    if os.environ.get("READY_DIR"):
        ready = os.environ["READY_DIR"]
        open(os.path.join(ready, str(os.getpid())), "w").close()
        deadline = time.monotonic() + 300
        while len(os.listdir(ready)) < int(os.environ["READY_COUNT"]) and time.monotonic() < deadline:
            time.sleep(0.01)
    x = [t.detach() for t in scan_inputs(1, 3, 4, 16, 1, 1)]
    y = cross_selective_scan(*x, implementation="cpu_kernel")
    lib = load_library()
    print("RESULT", json.dumps({"prefix": sys.prefix, "path": str(lib.path), "built": lib.built,
                                "sum": float(y.sum())}))
    """
)


@pytest.fixture
def compiler():
    """A C++ compiler (CI always has one: without it these tests fail there, and skip on a user's machine)."""
    if build.find_compiler() is None:
        skip_or_fail("no C++ compiler found (set CXX or install g++/clang++)")


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENUS_HUB_DISABLE_CPU_KERNEL", "VIRTUAL_ENV")}
    env.update(OPENUS_HUB_KERNEL_CACHE=str(cache), PYTHONPATH=str(REPO_ROOT), **extra)
    return env


def _result(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.split("RESULT", 1)[1])


def _builds(cache: Path) -> list[str]:
    log = cache / "build.log"
    return [line for line in log.read_text().splitlines() if " built " in line] if log.exists() else []


def _second_venv(path: Path) -> Path:
    """A second virtual environment (its own sys.prefix) that sees this environment's packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=300)
    python = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # an "import" line in a .pth file runs at start-up: add this environment's site-packages (and its .pth files)
    Path(site, "shared_env.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    return python


def test_two_environments_share_one_build(compiler, tmp_path):
    """Two virtual environments, one cache: the second imports and runs without building (log and mtime unchanged)."""
    cache = tmp_path / "cache"
    other_python = _second_venv(tmp_path / "venv2")
    first = _result(subprocess.run([sys.executable, "-c", FIRST_USE], env=_env(cache), capture_output=True,
                                   text=True, timeout=600))
    library = Path(first["path"])
    stamp = library.stat().st_mtime_ns
    second = _result(subprocess.run([str(other_python), "-c", FIRST_USE], env=_env(cache), capture_output=True,
                                    text=True, timeout=600))
    assert first["prefix"] != second["prefix"]
    assert first["built"] and not second["built"]
    assert second["path"] == first["path"] and library.stat().st_mtime_ns == stamp
    assert len(_builds(cache)) == 1
    assert second["sum"] == first["sum"]


def test_concurrent_first_uses_build_once(compiler, tmp_path):
    """Two processes reach their first scan together on an empty cache: both succeed, one build, one entry."""
    cache, ready = tmp_path / "cache", tmp_path / "ready"
    ready.mkdir()
    env = _env(cache, READY_DIR=str(ready), READY_COUNT="2")
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_USE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        results.append(_result(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)))
    assert results[0]["path"] == results[1]["path"]
    assert sorted(r["built"] for r in results) == [False, True]
    assert len(_builds(cache)) == 1
    entries = [p.name for p in cache.iterdir() if p.is_dir()]
    assert entries == [Path(results[0]["path"]).parent.name]  # no leftover temporary folder


@pytest.mark.slow
def test_collection_compiles_nothing(tmp_path):
    """Collecting the whole suite builds and loads no kernel: the cache folder is never even created."""
    cache = tmp_path / "cache"
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=REPO_ROOT, env=_env(cache), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "test_collection_compiles_nothing" in out.stdout
    assert not cache.exists(), sorted(p.name for p in cache.iterdir())


def test_build_cli_prints_where_the_kernel_lives(compiler, tmp_path):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "openus_hub.ops.build"]
    first = subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""  # quiet apart from the result line (and no runpy warning)
    assert "built in" in first.stdout and str(cache) in first.stdout
    second = subprocess.run(cmd + ["--quiet"], env=_env(cache), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and Path(second.stdout.strip()).is_file()
    assert Path(second.stdout.strip()).parent.parent == cache
    assert len(_builds(cache)) == 1
    info = json.loads((Path(second.stdout.strip()).parent / "build.json").read_text())
    assert info["source_sha256"] == build.source_sha256() and info["compiler"]


def test_compile_error_is_recorded_and_not_retried(compiler, tmp_path, monkeypatch):
    """A source that does not compile: a clear error, a *.failed record per variant, and no second compile."""
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(build, "_source_bytes", lambda: b"this is not C++\n")
    monkeypatch.setattr(build, "source_sha256", lambda: "0" * 64)
    with pytest.raises(build.KernelUnavailable, match="failed to compile"):
        build._locate(allow_build=True)
    assert len(list(tmp_path.glob("ss2d_scan_cpu-*.failed"))) == 2
    assert "FAILED" in (tmp_path / "build.log").read_text()

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(build, "_compile", no_compile)
    with pytest.raises(build.KernelUnavailable, match="failed to compile"):
        build._locate(allow_build=True)
    with pytest.raises(AssertionError, match="compiled again"):  # the build command retries
        build._locate(allow_build=True, retry_failed=True)


def test_without_a_compiler_a_prebuilt_kernel_is_used(compiler, tmp_path, monkeypatch):
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(build, "find_compiler", lambda: None)
    with pytest.raises(build.KernelUnavailable, match="no C\\+\\+ compiler found"):
        build._locate(allow_build=True)
    assert not (tmp_path / "cache").exists()
    monkeypatch.undo()
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
    path, built = build._locate(allow_build=True)  # built once with the compiler, e.g. at install time
    assert built
    monkeypatch.setattr(build, "find_compiler", lambda: None)
    assert build._locate(allow_build=True) == (path, False)


def test_vendored_copies_find_the_same_build_and_never_compile(compiler, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    copied = build.vendor_ops(folder)
    ops_dir = Path(build.__file__).parent
    assert sorted(copied) == sorted(p.name for p in ops_dir.glob("*.py") if p.name != "__init__.py")
    spec = importlib.util.spec_from_file_location("vendored_build", folder / "build.py")
    vendored = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, vendored)  # dataclasses look their module up there
    spec.loader.exec_module(vendored)
    assert vendored._source_bytes() is None  # the folder carries no C++ source ...
    assert vendored.source_sha256() == build.source_sha256()  # ... but knows which build it needs

    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "empty"))
    with pytest.raises(vendored.KernelUnavailable, match="not built on this machine"):
        vendored._locate(allow_build=True)
    assert not (tmp_path / "empty").exists()

    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
    path, built = build._locate(allow_build=True)
    assert built
    assert vendored._locate(allow_build=True) == (path, False)
    assert len(_builds(tmp_path / "cache")) == 1


@pytest.mark.slow
def test_remote_code_folder_reuses_the_kernel_or_falls_back_without_compiling(compiler, tmp_path):
    """A saved folder loaded with trust_remote_code (openus_hub blocked): with a built kernel in the cache it runs
    the kernel without building; with an empty cache it warns, runs the reference scan, and compiles nothing."""
    model = OpenUSModel(OpenUSConfig(embed_dim=8, depths=[1, 1, 1, 1])).eval()
    model.save_pretrained(tmp_path / "model")
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "openus_hub" or name.startswith("openus_hub."):
                    raise ImportError("openus_hub is blocked in this test")
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True).eval()
        package = type(model).__module__.rsplit(".", 1)[0]
        model(torch.randn(1, 3, 32, 32))
        print("KERNEL", sys.modules[package + ".cpu_scan"]._lib is not None)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OPENUS_HUB_DISABLE_CPU_KERNEL")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")

    cache = tmp_path / "cache"
    prebuilt = subprocess.run([sys.executable, "-m", "openus_hub.ops.build"], env=_env(cache), capture_output=True,
                              text=True, timeout=600)
    assert prebuilt.returncode == 0, prebuilt.stderr
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                         env=dict(env, OPENUS_HUB_KERNEL_CACHE=str(cache)), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "KERNEL True" in out.stdout and len(_builds(cache)) == 1

    empty = tmp_path / "empty"
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                         env=dict(env, OPENUS_HUB_KERNEL_CACHE=str(empty)), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "KERNEL False" in out.stdout
    warnings = [line for line in out.stderr.splitlines() if "using the reference implementation" in line]
    assert len(warnings) == 1 and "python -m openus_hub.ops.build" in warnings[0], out.stderr[-3000:]
    assert not empty.exists()
