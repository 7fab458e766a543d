"""`openus-hub embed` in-process: good files, a corrupt file, a subfolder, resume, refusal to clobber."""

import shutil

import numpy as np
import pydicom.examples
import pytest
import torch
from PIL import Image

from openus_hub import OpenUSConfig, OpenUSImageProcessor, OpenUSModel
from openus_hub.cli import main, read_output

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
