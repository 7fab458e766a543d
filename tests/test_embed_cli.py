"""`openus-hub embed` in-process: good files, a corrupt file, a subfolder, resume, refusal to clobber."""

import shutil

import numpy as np
import pydicom.examples
import pytest
import torch
from PIL import Image

from openus_hub import OpenUSConfig, OpenUSImageProcessor, OpenUSModel
from openus_hub.cli import main, read_output
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.filterwarnings("ignore::openus_hub.io.BurnedInAnnotationWarning")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_openus")
    OpenUSModel(OpenUSConfig(embed_dim=8, depths=[1, 1, 1, 2], drop_path_rate=0.0)).save_pretrained(folder)
    OpenUSImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


@pytest.fixture()
def inputs(tmp_path):
    root = tmp_path / "study"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(pydicom.examples.rgb_color.pixel_array).save(root / "still.png")
    gray16 = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(gray16).save(root / "sub" / "gray16.png")
    shutil.copy(pydicom.examples.get_path("ybr_color"), root / "sub" / "cine.dcm")
    (root / "broken.dcm").write_text("not a dicom file at all\n" * 10)
    (root / "readme.txt").write_text("ignored: not an image extension")
    return root


ARGS = ["--frame-stride", "10", "--batch-size", "4", "--no-progress", "--device", "cpu"]


def test_embed_folder_resume_and_refuse(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "emb.npz"
    rc = main(["embed", str(inputs), "--model", str(model_dir), "--output", str(out), *ARGS])
    err = capsys.readouterr().err
    assert rc == 1  # one input skipped
    assert "broken.dcm" in err and "not a DICOM file" in err
    data, meta = read_output(out)
    sources = [s.rsplit("/", 1)[-1] for s in data["source"]]
    assert sorted(set(sources)) == ["cine.dcm", "gray16.png", "still.png"]  # subfolder included, txt ignored
    assert data["embeddings"].shape == (1 + 1 + 3, 64)  # cine frames 0, 10, 20
    cine = [i for i, s in enumerate(sources) if s == "cine.dcm"]
    assert data["frame_index"][cine].tolist() == [0, 10, 20]
    assert (data["crop_box"][cine] >= 0).all() and (data["crop_box"][cine][:, 2] <= 320).all()
    still = sources.index("still.png")
    assert (data["height"][still], data["width"][still], data["channels"][still]) == (240, 320, 3)
    assert len(set(data["sha256"].tolist())) == 3 and all(len(s) == 64 for s in data["sha256"])
    assert meta["_skipped"]["skipped_source"].tolist()[0].endswith("broken.dcm")
    assert np.isfinite(data["embeddings"]).all()

    # resume: nothing recomputed, file untouched
    mtime = out.stat().st_mtime_ns
    rc = main(["embed", str(inputs), "--model", str(model_dir), "--output", str(out), *ARGS])
    assert rc == 1 and out.stat().st_mtime_ns == mtime
    assert "0 file(s) embedded" in capsys.readouterr().err

    # a new file is appended; the old rows are kept as they were
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(inputs / "new.png")
    main(["embed", str(inputs), "--model", str(model_dir), "--output", str(out), *ARGS])
    data2, _ = read_output(out)
    assert len(data2["source"]) == 6 and np.array_equal(data2["embeddings"][:5], data["embeddings"])
    assert "1 file(s) embedded" in capsys.readouterr().err

    # refuse to clobber: a foreign file, or different settings, without --overwrite
    foreign = tmp_path / "other.npz"
    np.savez(foreign, x=np.arange(3))
    before = foreign.read_bytes()
    assert main(["embed", str(inputs), "--model", str(model_dir), "--output", str(foreign), *ARGS]) == 2
    assert foreign.read_bytes() == before
    assert main(["embed", str(inputs), "--model", str(model_dir), "--output", str(out), "--crop", "none",
                 *ARGS]) == 2
    assert "refusing" in capsys.readouterr().err
    # --overwrite replaces it
    (inputs / "broken.dcm").unlink()
    assert main(["embed", str(inputs), "--model", str(model_dir), "--output", str(foreign), "--overwrite",
                 *ARGS]) == 0
    assert read_output(foreign)[0]["embeddings"].shape[0] == 6
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file


def test_embed_bad_arguments(model_dir, tmp_path, capsys):
    assert main(["embed", str(tmp_path / "nope"), "--model", str(model_dir), "--output", str(tmp_path / "o.npz")]) == 2
    assert main(["embed", str(tmp_path), "--model", str(model_dir), "--output", str(tmp_path / "o.csv")]) == 2
    with pytest.raises(SystemExit):
        main(["embed", "--model", str(model_dir)])  # argparse: inputs and --output missing
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match=r"openus_hub\[parquet\]"):
            main(["embed", str(tmp_path), "--model", str(model_dir), "--output", str(tmp_path / "o.parquet")])


# ---------------------------------------------------------------------------------------------------------------------
# interruption, fingerprints, --overwrite, unreadable outputs


def _pngs(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(folder / f"img_{i:03d}.png")
    return folder


def _embed_subprocess(args, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "openus_hub.cli", "embed", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(proc, out, timeout=240.0):
    """Poll until ``out`` holds rows (the first flush), while the process still runs."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if out.exists():
            try:
                if len(read_output(out)[0]["source"]):
                    return
            except ValueError:
                pass
        time.sleep(0.02)
    raise AssertionError("no flush seen")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_embed_keeps_its_work_and_a_rerun_continues(model_dir, tmp_path, sig):
    """Finding: results were written only at the end: SIGINT or SIGKILL at file 25 of 60 lost all 25, and SIGINT
    printed a traceback."""
    import signal

    inputs = _pngs(tmp_path / "many", 24)
    out = tmp_path / "emb.npz"
    args = [str(inputs), "--model", str(model_dir), "--output", str(out), "--batch-size", "1", "--flush-every", "2",
            "--no-progress", "--device", "cpu"]
    proc = _embed_subprocess(args, tmp_path)
    _wait_for_rows(proc, out)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=240)
    saved, _ = read_output(out)
    assert 2 <= len(saved["source"]) < 24, "the run was not interrupted part-way"
    if sig == "SIGKILL":
        assert proc.returncode == -9
    else:
        assert proc.returncode == {"SIGINT": 130, "SIGTERM": 143}[sig], err
        assert "Traceback" not in err
        (line,) = [ln for ln in err.splitlines() if "interrupted" in ln]
        assert line.startswith(f"openus-hub embed: interrupted by {sig}: {len(saved['source'])} rows saved in")
        assert line.endswith("run the same command again to continue")
    assert main(["embed", *args]) == 0
    data, _ = read_output(out)
    assert len(data["source"]) == 24 and len(set(data["source"].tolist())) == 24
    assert np.array_equal(data["embeddings"][: len(saved["source"])], saved["embeddings"])  # kept, not recomputed
    if sig == "SIGKILL":  # the resumed table equals an uninterrupted run's
        fresh = tmp_path / "fresh.npz"
        assert main(["embed", *args[:4], str(fresh), *args[5:]]) == 0
        got, want = data, read_output(fresh)[0]
        assert np.array_equal(got["embeddings"][np.argsort(got["source"])],
                              want["embeddings"][np.argsort(want["source"])])
    assert not list(tmp_path.glob(".emb.npz.*.tmp")) or sig == "SIGKILL"
    main(["embed", *args])  # the next run removes a killed run's temporary file
    assert not list(tmp_path.glob(".emb.npz.*.tmp"))


def test_fingerprint_covers_every_weight(model_dir, inputs, tmp_path, capsys):
    """Finding: the fingerprint hashed only the first 64 values of the first parameter, so another model with the
    same first values appended its rows to the old file."""
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other_model"
    shutil.copytree(model_dir, other)
    weights = load_file(other / "model.safetensors")
    key = sorted(weights)[-1]
    weights[key] = weights[key] + 1.0  # a late tensor: the first parameter is unchanged
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "emb.npz"
    (inputs / "broken.dcm").unlink()
    assert main(["embed", str(inputs), "--model", str(model_dir), "--output", str(out), *ARGS]) == 0
    before = out.read_bytes()
    (inputs / "late.png").write_bytes((inputs / "still.png").read_bytes())
    assert main(["embed", str(inputs), "--model", str(other), "--output", str(out), *ARGS]) == 2
    assert "written with different model_fingerprint" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_overwrite_builds_the_new_file_first(model_dir, inputs, tmp_path, capsys):
    """Finding: `embed --overwrite` replaced an 1800-row output with a 0-row file when every input failed."""
    out = tmp_path / "emb.npz"
    assert main(["embed", str(inputs), "--model", str(model_dir), "--output", str(out), *ARGS]) == 1
    before = out.read_bytes()
    rows = len(read_output(out)[0]["source"])
    broken = tmp_path / "all_broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"b{i}.dcm").write_text("not a dicom\n" * 5)
    capsys.readouterr()
    assert main(["embed", str(broken), "--model", str(model_dir), "--output", str(out), "--overwrite", *ARGS]) == 2
    err = capsys.readouterr().err
    assert f"no input could be embedded (3 skipped); kept the existing {out} ({rows} rows) unchanged" in err
    assert out.read_bytes() == before and not list(tmp_path.glob(".emb*"))
    (inputs / "broken.dcm").unlink()
    assert main(["embed", str(inputs / "still.png"), "--model", str(model_dir), "--output", str(out), "--overwrite",
                 *ARGS]) == 0
    assert len(read_output(out)[0]["source"]) == 1 and not list(tmp_path.glob(".emb*"))


def test_truncated_output_and_unwritable_folder_are_one_line_errors(model_dir, inputs, tmp_path, capsys):
    """Finding: a truncated .npz output and a read-only output folder gave tracebacks."""
    from tests.conftest import read_only_dir

    out = tmp_path / "emb.npz"
    (inputs / "broken.dcm").unlink()
    assert main(["embed", str(inputs), "--model", str(model_dir), "--output", str(out), *ARGS]) == 0
    out.write_bytes(out.read_bytes()[:300])
    capsys.readouterr()
    assert main(["embed", str(inputs), "--model", str(model_dir), "--output", str(out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} is not a readable openus-hub embeddings file (truncated or corrupt?")
    assert err.count("\n") == 1 and "refusing to overwrite it (pass --overwrite" in err
    assert main(["embed", str(inputs), "--model", str(model_dir), "--output", str(out), "--overwrite", *ARGS]) == 0
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only_dir(locked):
        capsys.readouterr()
        assert main(["embed", str(inputs), "--model", str(model_dir), "--output", str(locked / "e.npz"), *ARGS]) == 2
        err = capsys.readouterr().err
        assert err == f"error: cannot write {locked / 'e.npz'}: {locked} is not writable\n"
