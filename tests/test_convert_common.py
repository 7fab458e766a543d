"""The shared output-folder writer (conversion/_common.py): refusals, crash-safe swap and its recovery.

The swap is killed with SIGKILL at each of its steps (through the module's test hook, in a real subprocess); the
target folder must never be missing (where renameat2 RENAME_EXCHANGE is available) and the next run must finish or
roll back the swap and leave no temporary behind."""

import os
import shutil
import socket
import subprocess
import sys

import pytest

from conversion import _common
from conversion import convert_openus_to_hf as conv
from conversion._common import ConversionError, recover_interrupted_swap, write_folder_atomic
from tests.conftest import REPO_ROOT, parity_path, read_only_dir


def _writer(content: str):
    def write(tmp: str) -> None:
        for name in ("config.json", "model.safetensors", "README.md"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(content)
    return write


def _state(folder) -> str | None:
    """The content every file of a written folder holds, or None when missing / mixed / incomplete."""
    if not os.path.isdir(folder):
        return None
    files = sorted(f for f in os.listdir(folder) if f != ".openus-new")  # the marker of an unfinished swap
    if files != ["README.md", "config.json", "model.safetensors"]:
        return f"files {files}"
    contents = {open(os.path.join(folder, f)).read() for f in files}
    return contents.pop() if len(contents) == 1 else f"mixed {contents}"


def _leftovers(parent) -> list[str]:
    return sorted(p for p in os.listdir(parent) if ".openus-" in p)


def test_refuses_a_folder_that_contains_the_input(tmp_path, monkeypatch, capsys):
    """Finding: `--output-dir . --overwrite` in the folder holding the checkpoint deleted it and the user's files."""
    work = tmp_path / "work"
    work.mkdir()
    ckpt = work / "checkpoint.pth"
    shutil.copy(parity_path("openus", "cfg_b", "checkpoint.pth"), ckpt)
    (work / "notes.txt").write_text("mine")
    before = sorted(os.listdir(work))
    monkeypatch.chdir(work)
    for out in (".", str(work), str(tmp_path)):
        assert conv.main(["--checkpoint", "checkpoint.pth", "--output-dir", out, "--overwrite", "--no-card"]) == 2
        err = capsys.readouterr().err
        assert "contains the input checkpoint.pth" in err and err.count("\n") == 1, err
    assert sorted(os.listdir(work)) == before and (work / "notes.txt").read_text() == "mine"
    assert conv.main(["--checkpoint", "checkpoint.pth", "--output-dir", "checkpoint.pth", "--no-card"]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert ckpt.stat().st_size > 0


def test_overwrite_replaces_only_a_previous_export(tmp_path):
    out = tmp_path / "out"
    write_folder_atomic(out, _writer("v1"))
    with pytest.raises(ConversionError, match="holds a previous export; pass --overwrite"):
        write_folder_atomic(out, _writer("v2"))
    write_folder_atomic(out, _writer("v2"), overwrite=True)
    assert _state(out) == "v2"
    (out / "train.log").write_text("the user's")
    (out / "runs").mkdir()
    with pytest.raises(ConversionError) as err:
        write_folder_atomic(out, _writer("v3"), overwrite=True)
    msg = str(err.value)
    assert "is not a previous export (it also holds runs/, train.log)" in msg and "\n" not in msg
    assert (out / "train.log").read_text() == "the user's" and _state_files(out) == 5
    assert _leftovers(tmp_path) == []


def _state_files(folder) -> int:
    return len(os.listdir(folder))


def test_output_under_a_file_or_unwritable_parent_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConversionError, match=rf"cannot create --output-dir {blocker}/sub/out: {blocker} is a file"):
        write_folder_atomic(blocker / "sub" / "out", _writer("v1"))
    ckpt = str(parity_path("openus", "cfg_b", "checkpoint.pth"))
    assert conv.main(["--checkpoint", ckpt, "--output-dir", str(blocker / "out"), "--no-card"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot create --output-dir") and err.count("\n") == 1
    parent = tmp_path / "locked"
    parent.mkdir()
    with read_only_dir(parent):
        with pytest.raises(ConversionError, match="is not writable"):
            write_folder_atomic(parent / "out", _writer("v1"))
        assert conv.main(["--checkpoint", ckpt, "--output-dir", str(parent / "out"), "--no-card"]) == 2
        err = capsys.readouterr().err
        assert "is not writable" in err and err.count("\n") == 1
    assert os.listdir(parent) == []


def test_write_failure_leaves_the_target_and_no_temporaries(tmp_path):
    out = tmp_path / "out"
    write_folder_atomic(out, _writer("v1"))

    def failing(tmp):
        _writer("v2")(tmp)
        raise ConversionError("self-check failed")

    with pytest.raises(ConversionError, match="self-check failed"):
        write_folder_atomic(out, failing, overwrite=True)
    assert _state(out) == "v1" and _leftovers(tmp_path) == []


def test_a_live_writer_holds_the_lock_a_dead_one_does_not(tmp_path):
    out = tmp_path / "out"
    lock = tmp_path / ".out.openus-lock"
    lock.write_text(f"{os.getpid()} {socket.gethostname()}")  # this process is alive
    with pytest.raises(ConversionError, match=r"being written by another process \(pid \d+"):
        write_folder_atomic(out, _writer("v1"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{int(dead.stdout)} {socket.gethostname()}")  # exited: a stale lock is taken over
    write_folder_atomic(out, _writer("v1"))
    assert _state(out) == "v1" and _leftovers(tmp_path) == []


_KILLER = """
import os, signal, sys
from conversion import _common
target, step, exchange = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
_common._USE_EXCHANGE = exchange
_common._fault_hook = lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == step else None

def write(tmp):
    for i, name in enumerate(("config.json", "model.safetensors", "README.md")):
        with open(os.path.join(tmp, name), "w") as f:
            f.write("new")
        if i == 0:
            _common._step("writing")  # killed half-way through writing the new folder

_common.write_folder_atomic(target, write, overwrite=True)
"""

# steps in the order they happen; before "ready" the new folder is incomplete (roll back), from "ready" on it is
# complete (finish the swap)
EXCHANGE_STEPS = ["writing", "staged", "ready", "exchanged", "old-moved", "old-removed", "done"]
FALLBACK_STEPS = ["writing", "staged", "ready", "aside", "renamed-in", "old-removed", "done"]


@pytest.mark.parametrize("exchange,step", [(True, s) for s in EXCHANGE_STEPS] + [(False, s) for s in FALLBACK_STEPS])
def test_kill_at_each_swap_step_never_loses_the_target(tmp_path, exchange, step):
    if exchange and not _exchange_supported(tmp_path):
        pytest.skip("environment: renameat2(RENAME_EXCHANGE) is not supported by this file system or kernel")
    out = tmp_path / "out"
    write_folder_atomic(out, _writer("old"))
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    res = subprocess.run([sys.executable, str(script), str(out), step, "1" if exchange else "0"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert res.returncode == -9, res.stderr[-2000:]
    expected = "new" if (EXCHANGE_STEPS if exchange else FALLBACK_STEPS).index(step) >= 2 else "old"
    state = _state(out)
    if exchange or step != "aside":
        assert state in ("old", "new"), f"after a kill at {step!r} the target holds {state}"
    else:
        assert state is None  # the one window the two-rename fallback has: the next run restores it
    recover_interrupted_swap(out)
    assert _state(out) == expected and _leftovers(tmp_path) == []
    write_folder_atomic(out, _writer("next"), overwrite=True)  # and the next run works normally
    assert _state(out) == "next" and _leftovers(tmp_path) == []


def test_next_run_recovers_before_writing(tmp_path):
    """A real run into the same folder after a kill: it finishes the interrupted swap, then replaces the folder."""
    out = tmp_path / "out"
    write_folder_atomic(out, _writer("old"))
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    assert subprocess.run([sys.executable, str(script), str(out), "aside", "0"], timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}).returncode == -9
    assert not out.exists() and _leftovers(tmp_path)
    with pytest.raises(ConversionError, match="holds a previous export"):  # recovered first, then refused as usual
        write_folder_atomic(out, _writer("next"))
    assert _state(out) == "new" and _leftovers(tmp_path) == []


def _exchange_supported(tmp_path) -> bool:
    a, b = tmp_path / "xa", tmp_path / "xb"
    a.mkdir()
    b.mkdir()
    try:
        return _common._exchange(str(a), str(b))
    finally:
        a.rmdir()
        b.rmdir()
