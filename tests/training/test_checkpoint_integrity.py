"""Integrity of training checkpoints, output folders and resumes (pretraining, distillation, downstream).

* every checkpoint has a checksum file (``sha256sum`` format, with the run id and step), verified before the
  checkpoint is read; ``--resume auto`` walks back over checkpoints that do not verify or load, naming each and why;
* a non-empty ``--output-dir`` is refused without ``--resume``/``--overwrite``; ``--overwrite`` deletes only what a
  previous run of the same job wrote;
* pruning touches only the current run's checkpoints;
* ``kill -9`` at each step of a checkpoint write leaves the target usable, and the next run cleans up;
* damaged checkpoints (truncations, bit flips, random bytes, empty and 100-byte files, wrong dtypes, missing blocks,
  NaN, foreign pickles, damaged checksum files) end in a one-line error or a resume from an older good checkpoint:
  never a traceback, never a silently different state (``test_damaged_checkpoints_robustness`` prints the counts).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.test_downstream_e2e import seg_root  # noqa: F401  (fixture)
from tests.training.test_pretrain_run import CONFIG as PRETRAIN_CONFIG
from tests.training.test_pretrain_run import manifest  # noqa: F401  (fixture)
from training import distill, downstream_train, export_pretrained, finetune_segmentation, pretrain
from training.common.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint

# (the newer helpers are imported inside the tests that use them, so that this file also runs against code without
# them and shows each behaviour failing there)

REPO = Path(__file__).resolve().parents[2]
DISTILL_CONFIG = str(REPO / "training" / "configs" / "distill" / "debug_cpu.yaml")
SEG_CONFIG = "training/configs/downstream/debug_cpu_seg.yaml"
HAS_SHA256SUM = shutil.which("sha256sum") is not None


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def _tensors(obj, prefix=""):
    """Every tensor in a nested dict/list, by key path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def _same(a: dict, b: dict, keys=None) -> bool:
    """The tensors of ``a`` and ``b`` (under ``keys``) are bit-identical."""
    keys = keys or a.keys()
    ta = dict(_tensors({k: a[k] for k in keys}))
    tb = dict(_tensors({k: b[k] for k in keys}))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _run_id(path: Path) -> str | None:
    """The run id a checkpoint's checksum file records."""
    for line in checksum_path(path).read_text().splitlines():
        for item in line.lstrip("# ").split():
            if item.startswith("run_id="):
                return item[len("run_id="):]
    return None


def _sha256sum_ok(folder: Path, name: str) -> bool:
    proc = subprocess.run(["sha256sum", "-c", name + ".sha256"], cwd=folder, capture_output=True, text=True)
    return proc.returncode == 0


# ---------------------------------------------------------------------------------------------------------------------
# damage


def _rng(name: str) -> random.Random:
    return random.Random(sum(map(ord, name)))


def truncate(frac_or_bytes):
    def damage(p: Path):
        data = p.read_bytes()
        n = frac_or_bytes if isinstance(frac_or_bytes, int) else int(len(data) * frac_or_bytes)
        p.write_bytes(data[:n] if n >= 0 else data[:len(data) + n])
    return damage


def bit_flip(frac):
    def damage(p: Path):
        data = bytearray(p.read_bytes())
        data[min(len(data) - 1, int(len(data) * frac))] ^= 0x10
        p.write_bytes(bytes(data))
    return damage


def random_bytes(frac, n=4096):
    def damage(p: Path):
        data = bytearray(p.read_bytes())
        off = int(len(data) * frac)
        data[off:off + n] = _rng(f"{frac}{n}").randbytes(min(n, len(data) - off))
        p.write_bytes(bytes(data))
    return damage


def replaced_by_random(n):
    return lambda p: p.write_bytes(_rng(str(n)).randbytes(n))


def appended(p: Path):
    p.write_bytes(p.read_bytes() + b"\0" * 1024)


def _resave(edit):
    """Rewrite the checkpoint through save_checkpoint after ``edit(state)``: an intact file (its checksum matches)
    whose content is wrong."""
    def damage(p: Path):
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = edit(state) or state
        save_checkpoint(state, p)
    return damage


def _weights(state: dict) -> dict:
    for key in ("student", "model"):  # pretraining: student; distillation, downstream: model
        if key in state:
            return state[key]
    raise KeyError("no weights")


def _first_float(sd: dict) -> str:
    return next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)


def wrong_dtype(dtype):
    def edit(state):
        sd = _weights(state)
        k = _first_float(sd)
        sd[k] = sd[k].to(dtype)
    return _resave(edit)


def missing_block(state):
    sd = _weights(state)
    block = next(k for k in sd if ".blocks." in k or ".block." in k or "layers." in k)
    prefix = block.rsplit(".", 1)[0]
    for k in [k for k in sd if k.startswith(prefix + ".")]:
        del sd[k]


def nan_weight(state):
    sd = _weights(state)
    sd[_first_float(sd)].view(-1)[0] = float("nan")


def optimizer_int_state(state):
    opt = state["optimizer"]["state"]
    entry = next(iter(opt.values()))
    key = next(k for k, v in entry.items() if isinstance(v, torch.Tensor) and v.ndim)
    entry[key] = entry[key].long()


def foreign_pickle(p: Path):  # a class outside the weights_only allowlist, with a matching checksum
    torch.save({"payload": _Foreign()}, p)
    _vouch(p)


def not_a_dict(p: Path):
    torch.save([torch.ones(2)], p)
    _vouch(p)


class _Foreign:
    pass


def _vouch(p: Path):
    """A checksum file in sha256sum's own format, as a user who trusts the file would write it."""
    import hashlib

    checksum_path(p).write_text(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n")


def checksum_missing(p: Path):
    checksum_path(p).unlink()


def checksum_empty(p: Path):
    checksum_path(p).write_text("")


def checksum_garbage(p: Path):
    checksum_path(p).write_bytes(_rng("garbage").randbytes(300))


def checksum_wrong(p: Path):
    side = checksum_path(p)
    text = side.read_text()
    line = next(line for line in text.splitlines() if line and not line.startswith("#"))
    side.write_text(text.replace(line, ("0" if line[0] != "0" else "1") + line[1:]))


DAMAGE = {
    "truncated to 0 bytes (empty)": truncate(0),
    "truncated to 100 bytes": truncate(100),
    "truncated to 1000 bytes": truncate(1000),
    "truncated at 1/4": truncate(0.25),
    "truncated at 1/2": truncate(0.5),
    "truncated at 3/4": truncate(0.75),
    "last byte cut": truncate(-1),
    "last 22 bytes cut (zip end record)": truncate(-22),
    "bit flip at byte 0": bit_flip(0.0),
    "bit flip at 1/3": bit_flip(1 / 3),
    "bit flip at 1/2": bit_flip(0.5),
    "bit flip at 2/3": bit_flip(2 / 3),
    "bit flip near the end": bit_flip(0.999),
    "4 KB of random bytes at 1/2": random_bytes(0.5),
    "4 KB of random bytes at 1/4": random_bytes(0.25),
    "64 random bytes at 3/5": random_bytes(0.6, 64),
    "replaced by 100 random bytes": replaced_by_random(100),
    "1 KB of zeros appended": appended,
    "weights re-saved as int64 (checksum matches)": wrong_dtype(torch.int64),
    "weights re-saved as float64 (checksum matches)": wrong_dtype(torch.float64),
    "weights re-saved as bool (checksum matches)": wrong_dtype(torch.bool),
    "weights re-saved as float16 (checksum matches)": wrong_dtype(torch.float16),
    "a block's weights missing (checksum matches)": _resave(missing_block),
    "a NaN weight (checksum matches)": _resave(nan_weight),
    "optimiser moment as int64 (checksum matches)": _resave(optimizer_int_state),
    "foreign pickle (checksum matches)": foreign_pickle,
    "a list, not a dict (checksum matches)": not_a_dict,
    "checksum file missing": checksum_missing,
    "checksum file empty": checksum_empty,
    "checksum file random bytes": checksum_garbage,
    "checksum file with a wrong sha256": checksum_wrong,
}


# ---------------------------------------------------------------------------------------------------------------------
# real runs of each job (4 steps; checkpoints of an older and a newer step)


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, manifest):  # noqa: F811
    out = tmp_path_factory.mktemp("pretrain") / "run"
    assert pretrain.main(["--config", PRETRAIN_CONFIG, "--output-dir", str(out), f"data.manifest={manifest}",
                          "train.max_steps=4", "log.figure_every_steps=null"]) == 0
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 4]
    return out


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "run"
    assert distill.main(["--config", DISTILL_CONFIG, "--output-dir", str(out), "train.overlay_images=0"]) == 0
    ckpts = out / "checkpoints"
    assert load_checkpoint(ckpts / "last.pt")["state"]["step"] == 4
    assert load_checkpoint(ckpts / "best.pt")["state"]["step"] == 3  # end of epoch 0 (3 steps), evaluated
    return out


@pytest.fixture(scope="module")
def downstream_run(tmp_path_factory, seg_root):  # noqa: F811
    out = tmp_path_factory.mktemp("downstream") / "run"
    assert finetune_segmentation.main(["--config", SEG_CONFIG, "--output-dir", str(out), f"data.root={seg_root}",
                                       "train.max_steps=4", "checkpoint.every_steps=2", "export.enabled=false",
                                       "log.overlay_images=0"]) == 0
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 4]
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------------------------
# checksum files, pruning


def test_checksum_file_is_sha256sum_format_with_run_and_step(tmp_path):
    from training.common.checkpoint import read_checksum

    path = save_checkpoint({"step": 7, "run_id": "run-a", "w": torch.arange(5.0)}, tmp_path / "checkpoint_00000007.pth")
    text = checksum_path(path).read_text()
    assert "run_id=run-a step=7 bytes=" in text and text.strip().endswith("  checkpoint_00000007.pth"), text
    rec = read_checksum(path).confirmed
    assert rec.run_id == "run-a" and rec.step == 7 and rec.size == path.stat().st_size
    if HAS_SHA256SUM:
        assert _sha256sum_ok(tmp_path, path.name)
    assert load_checkpoint(path)["step"] == 7
    # a checkpoint without one (an older version's) is refused; the error says how to vouch for it
    from training.common.checkpoint import select_checkpoint

    (tmp_path / "old").mkdir()
    torch.save({"step": 8}, tmp_path / "old" / "checkpoint_00000008.pth")
    with pytest.raises(CheckpointError) as err:
        select_checkpoint("auto", [tmp_path / "old" / "checkpoint_00000008.pth"])
    msg = str(err.value)
    assert "\n" not in msg and "no checksum file" in msg and "sha256sum FILE > FILE.sha256" in msg, msg


def test_prune_touches_only_this_runs_checkpoints(tmp_path):
    from training.common.checkpoint import prune_checkpoints

    for step in (1, 2, 3, 4, 5):
        save_checkpoint({"step": step, "run_id": "mine"}, tmp_path / f"checkpoint_{step:08d}.pth")
    for step in (6, 7):  # another run's, copied in
        save_checkpoint({"step": step, "run_id": "theirs"}, tmp_path / f"checkpoint_{step:08d}.pth")
    torch.save({"step": 8}, tmp_path / "checkpoint_00000008.pth")  # no checksum file: an older version's
    removed = prune_checkpoints(tmp_path, keep_last=2, run_id="mine", upto_step=4)
    assert sorted(p.name for p in removed) == ["checkpoint_00000001.pth", "checkpoint_00000002.pth"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4, 5, 6, 7, 8]  # 5: beyond upto_step; 6-8 not ours
    assert not checksum_path(tmp_path / "checkpoint_00000001.pth").exists()
    assert checksum_path(tmp_path / "checkpoint_00000006.pth").exists()


# ---------------------------------------------------------------------------------------------------------------------
# kill -9 at each step of a checkpoint write

STAGES = ("partial", "written", "pending", "replaced", "confirmed")
KILL_SCRIPT = r"""
import json, os, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from training.common.checkpoint import save_checkpoint
root, stages = Path(sys.argv[1]), sys.argv[2].split(",")
status = {}
for mode in ("new file", "overwrite"):
    for stage in stages:
        d = root / f"{mode.replace(' ', '_')}-{stage}"
        d.mkdir()
        old = d / ("checkpoint_00000002.pth" if mode == "new file" else "last.pt")
        target = d / ("checkpoint_00000004.pth" if mode == "new file" else "last.pt")
        save_checkpoint({"step": 2, "run_id": "r", "w": torch.full((50000,), 2.0)}, old)
        pid = os.fork()
        if pid == 0:  # the child is killed by its own SIGKILL at the stage; exit 0 means it was not
            os.environ["OPENUS_HUB_TEST_KILL_AT"] = f"checkpoint:stage={stage},file={target.name}"
            save_checkpoint({"step": 4, "run_id": "r", "w": torch.full((50000,), 4.0)}, target)
            os._exit(0)
        _, st = os.waitpid(pid, 0)
        status[d.name] = os.WTERMSIG(st) if os.WIFSIGNALED(st) else -os.WEXITSTATUS(st)
print(json.dumps(status))
"""


def test_kill_at_each_step_of_a_checkpoint_write_leaves_a_usable_checkpoint(tmp_path):
    from training.common.checkpoint import finish_interrupted_saves, select_checkpoint

    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path), ",".join(STAGES)], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(status) == 2 * len(STAGES)
    for name, sig in status.items():
        assert sig == signal.SIGKILL, f"{name}: the writer was not killed at its stage ({sig})"
        d = tmp_path / name
        mode, stage = name.split("-")
        if mode == "overwrite":  # last.pt is never missing: the old or the new one, verified
            step = load_checkpoint(d / "last.pt")["step"]
            assert step == (4 if stage in ("replaced", "confirmed") else 2), (name, step)
            candidates = [d / "last.pt"]
        else:  # the previous checkpoint stays usable; the new one is absent or verifies
            assert load_checkpoint(d / "checkpoint_00000002.pth")["step"] == 2
            new = d / "checkpoint_00000004.pth"
            assert new.exists() == (stage in ("replaced", "confirmed")), name
            candidates = [p for _, p in reversed(list_checkpoints(d))]
        path, state, skipped = select_checkpoint("auto", candidates)
        assert skipped == [] and state["step"] == (4 if stage in ("replaced", "confirmed") else 2), (name, skipped)
        # the next run settles the interrupted save: no temporary, no pending record, sha256sum -c passes
        done = finish_interrupted_saves(d)
        left = sorted(p.name for p in d.iterdir())
        assert not [n for n in left if ".tmp-" in n], (name, left, done)
        for side in d.glob("*.sha256"):
            target = side.with_name(side.name[:-7])
            assert target.exists(), (name, left)  # no checksum file of a file that was never renamed in
            assert "pending" not in side.read_text(), (name, side.read_text())
            if HAS_SHA256SUM:
                assert _sha256sum_ok(d, target.name), name
        if stage in ("partial", "written"):
            assert any(line.startswith("removed .") for line in done), (name, done)


# ---------------------------------------------------------------------------------------------------------------------
# robustness: every damage to the newest checkpoint of each job, resumed with --resume auto and with the path


def _pretrain_restore(state, path):
    student, teacher, _, ibot_loss, optimizer = pretrain.build_training(state["config"])
    step, prev = pretrain.restore(state, path, student, teacher, optimizer, ibot_loss, 0, 1, torch.device("cpu"))
    return {"step": step, "student": student.state_dict(), "teacher": teacher.state_dict(),
            "ibot_loss": ibot_loss.state_dict(), "prev_importance": prev}


def _pretrain_expected(state):
    return {"step": state["step"], "student": state["student"], "teacher": state["teacher"],
            "ibot_loss": state["ibot_loss"], "prev_importance": state["per_rank"][0]["prev_importance"]}


def _distill_restore(ckpt, path):
    _, distiller, optimizer = distill.build_training(ckpt["config"])
    state = distill.restore(ckpt, path, distiller, optimizer, 0)
    return {"step": state["step"], "model": distiller.state_dict(), "optimizer": optimizer.state_dict()["state"]}


def _distill_expected(ckpt):
    return {"step": ckpt["state"]["step"], "model": ckpt["model"], "optimizer": ckpt["optimizer"]["state"]}


def _downstream_restore(state, path):
    model = downstream_train.build_model(state["config"], 2, None)
    opt, sched = downstream_train.build_optimizer(state["config"], model)
    step, *_ = downstream_train.restore(state, path, model, opt, sched)
    return {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict()["state"]}


def _downstream_expected(state):
    return {"step": state["step"], "model": state["model"], "optimizer": state["optimizer"]["state"]}


def _jobs() -> dict:  # job -> (fixture, newest, older, job check, restore, expected restored state)
    return {
        "pretrain": ("pretrain_run", "checkpoint_00000004.pth", "checkpoint_00000002.pth", pretrain.check_state,
                     _pretrain_restore, _pretrain_expected),
        "distill": ("distill_run", "last.pt", "best.pt", distill.check_state, _distill_restore, _distill_expected),
        "downstream": ("downstream_run", "checkpoint_00000004.pth", "checkpoint_00000002.pth",
                       lambda state, path: downstream_train.check_state(state, path, "segmentation"),
                       _downstream_restore, _downstream_expected),
    }


def _classify(folder: Path, newest: str, older: str, check, restore, expected, originals, explicit: bool):
    """'clear error' | 'older good one' | 'crash' | 'silent wrong result', for one resume attempt."""
    from training.common.checkpoint import select_checkpoint

    try:
        if explicit:
            path, state, skipped = select_checkpoint(folder / newest, [], check)
        else:
            path, state, skipped = select_checkpoint("auto", [folder / newest, folder / older], check)
        restored = restore(state, path)
    except CheckpointError as err:
        msg = str(err)
        assert "\n" not in msg and (newest in msg or older in msg), msg  # one line, naming the file
        return "clear error", msg
    except Exception as err:  # noqa: BLE001  (a traceback for the user: counted, must stay 0)
        return "crash", f"{type(err).__name__}: {err}"
    want = expected(originals[path.name])
    if not _same(restored, want):
        return "silent wrong result", f"resumed from {path.name} with a different state"
    if path.name == older and skipped and newest in skipped[0]:
        return "older good one", skipped[0]
    return "silent wrong result", f"resumed from {path.name} although it was damaged (skipped {skipped})"


@pytest.mark.parametrize("job", ["pretrain", "distill", "downstream"])
def test_damaged_checkpoints_robustness(job, request, tmp_path, capsys):
    from training.common.checkpoint import select_checkpoint

    fixture, newest, older, check, restore, expected = _jobs()[job]
    run = request.getfixturevalue(fixture)
    pristine = run / "checkpoints"
    originals = {name: load_checkpoint(pristine / name) for name in (newest, older)}
    # the undamaged run resumes from its newest checkpoint, exactly
    path, state, skipped = select_checkpoint("auto", [pristine / newest, pristine / older], check)
    assert path.name == newest and skipped == [] and _same(restore(state, path), expected(originals[newest]))

    counts = {"tried": 0, "clear error": 0, "older good one": 0, "crash": 0, "silent wrong result": 0}
    rows = []
    for name, damage in DAMAGE.items():
        for explicit in (False, True):
            folder = tmp_path / f"{len(rows)}"
            shutil.copytree(pristine, folder)
            damage(folder / newest)
            outcome, detail = _classify(folder, newest, older, check, restore, expected, originals, explicit)
            counts["tried"] += 1
            counts[outcome] += 1
            rows.append((name, "--resume PATH" if explicit else "--resume auto", outcome, detail))
    with capsys.disabled():
        print(f"\n{job}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        for row in rows:
            if row[2] in ("crash", "silent wrong result"):
                print("   ", row)
    bad = [r for r in rows if r[2] in ("crash", "silent wrong result")]
    assert not bad, bad
    # explicit paths are refused; --resume auto falls back unless the file is intact but its content is wrong
    for name, mode, outcome, detail in rows:
        if mode == "--resume PATH":
            assert outcome == "clear error", (name, detail)
        elif "(checksum matches)" in name and not any(w in name for w in ("NaN", "foreign", "not a dict")):
            assert outcome == "clear error", (name, detail)  # verified, loaded, and refused by the model check
        else:
            assert outcome == "older good one", (name, detail)


# ---------------------------------------------------------------------------------------------------------------------
# the jobs, end to end


def _pretrain(out: Path, manifest: Path, *flags: str, steps: int = 4) -> int:  # noqa: F811
    return pretrain.main(["--config", PRETRAIN_CONFIG, "--output-dir", str(out), *flags, f"data.manifest={manifest}",
                          f"train.max_steps={steps}", "log.figure_every_steps=null"])


def _errors(capsys) -> list[str]:
    """The ``error: ...`` lines a job printed on stderr."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_pretrain_refuses_a_used_output_dir_and_overwrite_replaces_only_its_own_files(  # noqa: F811
        pretrain_run, manifest, tmp_path, capsys):
    out = _copy_run(pretrain_run, tmp_path / "run")
    before = _snapshot(out)
    # a second run into the finished run's folder: refused, one line, nothing touched
    assert _pretrain(out, manifest) == 2
    err = _errors(capsys)
    assert len(err) == 1 and str(out) in err[0] and "--resume auto" in err[0] and "--overwrite" in err[0], err
    assert _snapshot(out) == before
    # --overwrite with a file the job did not write: refused, naming it, nothing deleted
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "keep.me").write_text("mine too")
    assert _pretrain(out, manifest, "--overwrite") == 2
    err = _errors(capsys)
    assert len(err) == 1 and "notes.txt" in err[0] and "checkpoints/keep.me" in err[0], err
    assert _snapshot(out) == {**before, "notes.txt": b"mine", "checkpoints/keep.me": b"mine too"}
    assert _pretrain(out, manifest, "--resume", "auto", "--overwrite") == 2  # contradictory
    # without them, --overwrite starts afresh: one run's log, config and checkpoints (a new run id)
    (out / "notes.txt").unlink()
    (out / "checkpoints" / "keep.me").unlink()
    old_run = _run_id(out / "checkpoints" / "checkpoint_00000004.pth")
    assert _pretrain(out, manifest, "--overwrite", steps=2) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert "max_steps: 2" in (out / "config.yaml").read_text()
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2]
    new_run = _run_id(out / "checkpoints" / "checkpoint_00000002.pth")
    assert new_run and new_run != old_run
    assert load_checkpoint(out / "checkpoints" / "checkpoint_00000002.pth")["run_id"] == new_run


@pytest.mark.parametrize("damage", ["4 KB of random bytes at 1/2", "truncated at 1/2", "truncated to 0 bytes (empty)",
                                    "replaced by 100 random bytes"])
def test_pretrain_resume_auto_walks_back_to_the_newest_good_checkpoint(  # noqa: F811
        damage, pretrain_run, manifest, tmp_path, caplog):
    out = _copy_run(pretrain_run, tmp_path / "run")
    original = load_checkpoint(pretrain_run / "checkpoints" / "checkpoint_00000004.pth")
    DAMAGE[damage](out / "checkpoints" / "checkpoint_00000004.pth")
    with caplog.at_level("INFO", logger="training.pretrain"):
        assert _pretrain(out, manifest, "--resume", "auto") == 0
    text = caplog.text
    assert "--resume auto: skipped checkpoint_00000004.pth: " in text, text
    assert "resumed from " in text and "checkpoint_00000002.pth at step 2" in text, text
    again = load_checkpoint(out / "checkpoints" / "checkpoint_00000004.pth")  # redone: the same as before
    assert _same(again, original, ["student", "teacher", "optimizer", "ibot_loss", "per_rank"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]  # steps 2 and 3 logged once, by the resumed run


def test_pretrain_refuses_damaged_or_unverifiable_checkpoints_in_one_line(  # noqa: F811
        pretrain_run, manifest, tmp_path, capsys):
    out = _copy_run(pretrain_run, tmp_path / "run")
    ckpt = out / "checkpoints" / "checkpoint_00000004.pth"
    DAMAGE["4 KB of random bytes at 1/2"](ckpt)
    assert _pretrain(out, manifest, "--resume", str(ckpt)) == 2
    err = _errors(capsys)
    assert len(err) == 1 and str(ckpt) in err[0] and "sha256" in err[0] and "--resume auto" in err[0], err
    # exporting it is refused too
    assert export_pretrained.main([str(ckpt), "--output-dir", str(tmp_path / "export")]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and str(ckpt) in err[0] and "sha256" in err[0], err
    assert not (tmp_path / "export").exists()
    # intact, but its weights re-saved as int64: refused by name, not converted silently
    shutil.copy(pretrain_run / "checkpoints" / "checkpoint_00000004.pth", ckpt)
    shutil.copy(pretrain_run / "checkpoints" / "checkpoint_00000004.pth.sha256", checksum_path(ckpt))
    DAMAGE["weights re-saved as int64 (checksum matches)"](ckpt)
    assert _pretrain(out, manifest, "--resume", "auto") == 2
    err = _errors(capsys)
    assert len(err) == 1 and str(ckpt) in err[0] and "int64" in err[0] and "student weights" in err[0], err
    # every checkpoint unusable: one line naming each and why
    DAMAGE["truncated at 1/2"](out / "checkpoints" / "checkpoint_00000002.pth")
    DAMAGE["bit flip at 1/2"](ckpt)
    assert _pretrain(out, manifest, "--resume", "auto") == 2
    err = _errors(capsys)
    assert len(err) == 1 and "checkpoint_00000004.pth: " in err[0] and "checkpoint_00000002.pth: " in err[0], err
    assert "--overwrite" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("stage,resumed_at", [("partial", 2), ("replaced", 4)])
def test_pretrain_killed_while_writing_a_checkpoint_resumes(  # noqa: F811
        stage, resumed_at, pretrain_run, manifest, tmp_path, caplog):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.pretrain", "--config", PRETRAIN_CONFIG, "--output-dir", str(out),
           f"data.manifest={manifest}", "train.max_steps=4", "log.figure_every_steps=null"]
    killed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=_env(OPENUS_HUB_TEST_KILL_AT=f"checkpoint:stage={stage},file=checkpoint_00000004.pth"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert any(".tmp-" in n for n in left) == (stage == "partial"), left
    with caplog.at_level("INFO", logger="training.pretrain"):
        assert _pretrain(out, manifest, "--resume", "auto") == 0
    assert f"at step {resumed_at} " in caplog.text, caplog.text
    assert not [p for p in (out / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert "pending" not in checksum_path(out / "checkpoints" / "checkpoint_00000004.pth").read_text()
    original = load_checkpoint(pretrain_run / "checkpoints" / "checkpoint_00000004.pth")
    again = load_checkpoint(out / "checkpoints" / "checkpoint_00000004.pth")
    assert _same(again, original, ["student", "teacher", "optimizer", "ibot_loss", "per_rank"])


def test_distill_refuses_a_used_output_dir_and_resume_auto_falls_back_to_best(distill_run, tmp_path, capsys, caplog):
    out = _copy_run(distill_run, tmp_path / "run")
    before = _snapshot(out)
    args = ["--config", DISTILL_CONFIG, "--output-dir", str(out)]
    # re-running into a finished run's folder used to resume silently, with the new configuration
    assert distill.main(args + ["train.overlay_images=0", "train.max_steps=6"]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and str(out) in err[0] and "--resume auto" in err[0], err
    assert _snapshot(out) == before
    # last.pt damaged: --resume auto says so and continues from best.pt (step 3); the redone step 4 is the same
    original = load_checkpoint(distill_run / "checkpoints" / "last.pt")
    DAMAGE["4 KB of random bytes at 1/2"](out / "checkpoints" / "last.pt")
    with caplog.at_level("INFO", logger="training.distill"):
        assert distill.main(args + ["--resume", "auto", "train.overlay_images=0"]) == 0
    assert "--resume auto: skipped last.pt: " in caplog.text and "best.pt at step 3" in caplog.text, caplog.text
    again = load_checkpoint(out / "checkpoints" / "last.pt")
    assert again["state"]["step"] == 4 and _same(again, original, ["model", "optimizer"])


def test_downstream_resume_auto_walks_back_and_refuses_a_used_output_dir(  # noqa: F811
        downstream_run, seg_root, tmp_path, capsys, caplog):
    out = _copy_run(downstream_run, tmp_path / "run")
    args = ["--config", SEG_CONFIG, "--output-dir", str(out)]
    overrides = [f"data.root={seg_root}", "train.max_steps=4", "checkpoint.every_steps=2", "export.enabled=false",
                 "log.overlay_images=0"]
    before = _snapshot(out)
    assert finetune_segmentation.main(args + overrides) == 2
    err = _errors(capsys)
    assert len(err) == 1 and str(out) in err[0] and "--overwrite" in err[0], err
    assert _snapshot(out) == before
    original = load_checkpoint(downstream_run / "checkpoints" / "checkpoint_00000004.pth")
    DAMAGE["truncated at 1/2"](out / "checkpoints" / "checkpoint_00000004.pth")
    with caplog.at_level("INFO", logger="training.downstream"):
        assert finetune_segmentation.main(args + ["--resume", "auto"] + overrides) == 0
    assert "--resume auto: skipped checkpoint_00000004.pth: " in caplog.text, caplog.text
    assert "checkpoint_00000002.pth (step 2," in caplog.text, caplog.text
    again = load_checkpoint(out / "checkpoints" / "checkpoint_00000004.pth")
    assert _same(again, original, ["model", "optimizer", "best_model"])
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(3) == 1, steps  # no record of a redone step twice
