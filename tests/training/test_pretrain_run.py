"""End-to-end pretraining runs on real echo frames (pydicom.examples.ybr_color written as PNGs).

* one process, in-process ``main``: finite losses, log/figure/checkpoint files, weights_only checkpoints, pruning,
  non-finite loss handling;
* ``torchrun --nproc_per_node=2`` (gloo): both workers killed (SIGKILL) one step after a checkpoint, resumed with
  ``--resume auto`` from that checkpoint, ends with the same parameters, optimiser state, centers, per-rank EMA maps
  and feedback signals, and the same log, as an uninterrupted run; then exported and loaded with AutoModel;
* the export's README.md is the model_cards/ template with the numbers the export measured.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.output_checks import assert_figure, assert_no_local_paths
from training import pretrain
from training.data.datasets import build_manifest
from training.common.checkpoint import list_checkpoints
from training.common.checkpoint import load_checkpoint as load

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "training" / "configs" / "debug_cpu.yaml")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    import pydicom
    from PIL import Image
    from pydicom.pixels import pixel_array

    folder = tmp_path_factory.mktemp("echo")
    (folder / "frames").mkdir()
    ds = pydicom.dcmread(pydicom.examples.get_path("ybr_color"))
    for i in range(8):  # the first 8 frames of the SonoSite echo cine, RGB uint8 240x320
        Image.fromarray(pixel_array(ds, index=i)).save(folder / "frames" / f"frame_{i:02d}.png")
    path = folder / "manifest.txt"
    assert build_manifest([folder / "frames"], path) == 8
    return path


def test_single_process_run(tmp_path, manifest):
    out = tmp_path / "run"
    rc = pretrain.main(["--config", CONFIG, "--output-dir", str(out), f"data.manifest={manifest}",
                        "train.max_steps=4", "log.figure_every_steps=2"])
    assert rc == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for r in records:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("cls", "patch", "global_rec", "loss"))
    assert records[0]["lr"] == 0.0 and records[0]["alpha"] == pytest.approx(0.1)
    assert (out / "config.yaml").is_file()
    # figures at steps 0, 2 and the last (3): 4 global crops (2 images x 2 crops) x 4 titled columns
    assert sorted(p.name for p in (out / "figures").iterdir()) == [f"step_{i:08d}.png" for i in (0, 2, 3)]
    for fig in (out / "figures").iterdir():
        assert_figure(fig, (1400, 1380))
    steps = [s for s, _ in list_checkpoints(out / "checkpoints")]
    assert steps == [2, 4]  # keep_last 2
    state = load(out / "checkpoints" / "checkpoint_00000004.pth")  # weights_only=True
    assert state["step"] == 4 and state["world_size"] == 1 and state["data_manifest"]["samples"] == 8
    assert bool(state["per_rank"][0]["ema_initialized"]) and state["per_rank"][0]["prev_importance"].shape == (4, 4)
    assert torch.equal(state["teacher"]["head.last_layer.weight_v"], state["teacher"]["head.last_layer2.weight_v"])
    # export refuses a folder holding the user's files, even with --overwrite, and leaves it as it was; --overwrite
    # replaces only a previous export
    from training import export_pretrained

    target = tmp_path / "export"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    ckpt = str(out / "checkpoints" / "checkpoint_00000004.pth")
    assert export_pretrained.main([ckpt, "--output-dir", str(target)]) == 2
    assert export_pretrained.main([ckpt, "--output-dir", str(target), "--overwrite"]) == 2
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    (target / "notes.txt").unlink()
    assert export_pretrained.main([ckpt, "--output-dir", str(target)]) == 0
    assert export_pretrained.main([ckpt, "--output-dir", str(target)]) == 2
    assert export_pretrained.main([ckpt, "--output-dir", str(target), "--overwrite"]) == 0
    assert (target / "model.safetensors").is_file()


def test_non_finite_loss_stops_with_step_terms_and_checkpoint(tmp_path, manifest, caplog):
    out = tmp_path / "nan"
    with caplog.at_level("ERROR", logger="training.pretrain"):
        rc = pretrain.main(["--config", CONFIG, "--output-dir", str(out), f"data.manifest={manifest}",
                            "checkpoint.every_steps=1", "train.lr=1e30", "train.warmup_epochs=0", "train.clip_grad=0"])
    assert rc == 3
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "non-finite loss at step" in msg and "'cls'" in msg and "checkpoint_0000000" in msg, msg


def _check_export_card(folder: Path, checkpoint: Path, samples: int, local_root: Path) -> str:
    """The exported README.md: rendered from model_cards/ (ModelCardData front matter), parses back with
    huggingface_hub.ModelCard, has a licence, every template section and the numbers the export measured; no file of
    the folder names a local path (the manifest, the checkpoint and the output lie under ``local_root``)."""
    from huggingface_hub import ModelCard

    assert_no_local_paths(folder, local_root, REPO)

    from conversion.model_card import SECTIONS, validate_card

    card = ModelCard.load(folder / "README.md")
    validate_card(folder / "README.md", require_verification=True)
    assert card.data.license == "apache-2.0"  # trained from random initialisation (no init_from)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-feature-extraction"
    assert card.data.model_name == folder.name and "openus_hub" in card.data.tags
    assert [line[3:] for line in card.text.splitlines() if line.startswith("## ")] == list(SECTIONS)
    text = card.text
    assert "Not for clinical diagnosis" in text and "**This model is not a medical device.**" in text
    assert f'"samples": {samples}' in text and f"{samples} samples" in text  # manifest summary (JSON + table)
    assert "Training configuration:" in text and "global_size: 64" in text
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() in text
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() in text
    assert "Maximum absolute difference measured: **0.00e+00**" in text  # weights and features reproduced exactly
    rows = re.findall(r"^\| (saved model.safetensors|reloaded folder)[^|]*\| [^|]* \| ([0-9.e+-]+) \|", text, re.M)
    assert [(r[0], float(r[1])) for r in rows] == [("saved model.safetensors", 0.0), ("reloaded folder", 0.0)]
    assert "CC BY-NC 4.0" not in text.split("## Out-of-scope use")[1].split("## Bias")[0]
    return text


def _torchrun(out: Path, manifest: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "training.pretrain", "--config", CONFIG, "--output-dir", str(out), *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_torchrun_interrupt_resume_equals_uninterrupted_then_export(tmp_path, manifest):
    overrides = [f"data.manifest={manifest}", "train.epochs=15", "train.max_steps=null", "checkpoint.every_steps=2",
                 "log.figure_every_steps=null"]  # 8 frames / 2 ranks / batch 2 = 2 steps per epoch: 30 steps
    ref, run = tmp_path / "reference", tmp_path / "interrupted"
    done = subprocess.run(_torchrun(ref, manifest, *overrides), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    # Interrupt the workers themselves (torchrun starts them in their own sessions, so killing the launcher's
    # process group would leave them running to the end): each rank sends itself SIGKILL once step 5 is done,
    # one step after the checkpoint of step 4 (the test hook of training/common/faults.py).
    killed = subprocess.run(_torchrun(run, manifest, *overrides), cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={**_env(), "OPENUS_HUB_TEST_KILL_AT": "step:step=5"})
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert "Signal 9" in killed.stderr or "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    saved = [s for s, _ in list_checkpoints(run / "checkpoints")]
    assert saved == [2, 4], f"the run was not interrupted after step 5 (checkpoints {saved})"
    logged = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2, 3, 4], logged  # step 5 (index 4) was trained and logged, then lost

    resumed = subprocess.run(_torchrun(run, manifest, "--resume", "auto", *overrides), cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    starts = re.findall(r"resumed from \S*checkpoint_(\d{8})\.pth at step (\d+)", resumed.stderr)
    assert starts == [("00000004", "4")], resumed.stderr[-3000:]  # a real resume, well before the end (30)
    # the log holds each step once, as the uninterrupted run's does (the resumed run redid step 5 and dropped the
    # interrupted run's record of it), with the same values
    assert (run / "log.jsonl").read_text() == (ref / "log.jsonl").read_text()

    a = load(ref / "checkpoints" / "checkpoint_00000030.pth")
    b = load(run / "checkpoints" / "checkpoint_00000030.pth")
    for net in ("student", "teacher"):
        assert a[net].keys() == b[net].keys()
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k} differs after resume"
    for k in a["ibot_loss"]:
        assert torch.equal(a["ibot_loss"][k], b["ibot_loss"][k])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for ra, rb in zip(a["per_rank"], b["per_rank"]):  # each rank's own EMA map and feedback signal
        assert torch.equal(ra["ema_loss_map"], rb["ema_loss_map"]) and torch.equal(ra["prev_importance"], rb["prev_importance"])
    assert not torch.equal(a["per_rank"][0]["ema_loss_map"], a["per_rank"][1]["ema_loss_map"])
    assert not torch.equal(a["student"]["backbone.embeddings.conv1.weight"],
                           load(ref / "checkpoints" / "checkpoint_00000028.pth")["student"]["backbone.embeddings.conv1.weight"])

    export = subprocess.run([sys.executable, "-m", "training.export_pretrained",
                             str(run / "checkpoints" / "checkpoint_00000030.pth"), "--output-dir", str(tmp_path / "hf")],
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert export.returncode == 0, export.stderr[-3000:]
    import openus_hub  # noqa: F401  registers the Auto classes
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(tmp_path / "hf")
    assert type(model).__name__ == "OpenUSModel" and not model.config.use_mask_token
    for k, v in model.state_dict().items():
        assert torch.equal(v, b["teacher"]["backbone." + k]), k
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    text = _check_export_card(tmp_path / "hf", run / "checkpoints" / "checkpoint_00000030.pth", samples=8,
                              local_root=manifest.parent.parent)
    assert "manifest.txt (sha256 " in text  # data.manifest in the shown config: base name + sha256
    assert "step 30 (epoch 15, 2 process(es))" in text and "batch_size_per_gpu: 2" in text
    with torch.no_grad():
        feats = model(**processor(torch.zeros(3, 64, 64, dtype=torch.uint8), return_tensors="pt"))
    assert torch.isfinite(feats.last_hidden_state).all()


def test_quickstart_produces_its_files(tmp_path, caplog):
    from training import quickstart

    with caplog.at_level("WARNING", logger="training.quickstart"):
        assert quickstart.main(["--output-dir", str(tmp_path), "--steps", "2", "--frames", "4"]) == 0
    assert "NOT a useful pretrained model" in caplog.text
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    assert_figure(tmp_path / "frame_similarity.png", (1100, 480))
    from training.common.checkpoint import latest_checkpoint

    _check_export_card(tmp_path / "exported", latest_checkpoint(tmp_path / "run" / "checkpoints"), samples=4,
                       local_root=tmp_path)
    assert sorted(p.name for p in (tmp_path / "run" / "figures").iterdir())
    # a second run refuses to replace the first one's files unless told to
    before = (tmp_path / "exported" / "model.safetensors").read_bytes()
    assert quickstart.main(["--output-dir", str(tmp_path), "--steps", "2", "--frames", "4"]) == 2
    assert (tmp_path / "exported" / "model.safetensors").read_bytes() == before
    # --overwrite replaces only a quickstart's own files: one of the user's inside run/ stops it, named, untouched
    (tmp_path / "run" / "checkpoints" / "notes.txt").write_text("mine")
    assert quickstart.main(["--output-dir", str(tmp_path), "--steps", "2", "--frames", "4", "--overwrite"]) == 2
    assert (tmp_path / "run" / "checkpoints" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "exported" / "model.safetensors").read_bytes() == before
    (tmp_path / "run" / "checkpoints" / "notes.txt").unlink()
    assert quickstart.main(["--output-dir", str(tmp_path), "--steps", "2", "--frames", "4", "--overwrite"]) == 0
    assert (tmp_path / "exported" / "model.safetensors").is_file()
