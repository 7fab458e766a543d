"""End to end on CPU: distillation on real pydicom ultrasound frames (synthetic fan masks), resume, export, and
loading the exported student with plain transformers in a process that cannot import openus_hub."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from conversion.model_card import SECTIONS, validate_card
from training import distill, export_student

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "training" / "configs" / "distill"

pytestmark = pytest.mark.slow


def _run(config: str, out: Path, *overrides: str) -> dict:
    return distill.main(["--config", str(CONFIGS / config), "--output-dir", str(out), *overrides])


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_debug_cpu_resume_matches_uninterrupted(tmp_path):
    straight = _run("debug_cpu.yaml", tmp_path / "straight", "train.max_steps=4")
    assert straight["step"] == 4
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in straight["history"])
    assert {"ce", "hcl", "pe", "hcl.3", "pe.0"} <= set(straight["history"][0])
    # 6 frames / batch 2 = 3 steps per epoch: step 3 ends epoch 0 and is evaluated
    assert straight["evals"][0]["epoch"] == 1 and 0.0 <= straight["evals"][0]["miou"] <= 1.0
    first = _run("debug_cpu.yaml", tmp_path / "resumed", "train.max_steps=2")
    assert first["step"] == 2 and (tmp_path / "resumed" / "checkpoints" / "last.pt").exists()
    resumed = _run("debug_cpu.yaml", tmp_path / "resumed", "train.max_steps=4")  # picks up last.pt
    assert resumed["step"] == 4
    assert [r["step"] for r in resumed["history"]] == [1, 2, 3, 4]
    a, b = _weights(tmp_path / "straight" / "checkpoints" / "last.pt"), _weights(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a.keys() == b.keys() and any(k.startswith("kd.csf.") for k in a)
    # bit-identical, as training/README_distill.md states (same process settings, so no rounding can differ)
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert diff == 0.0, diff
    for x, y in zip(straight["history"], resumed["history"]):
        assert x["loss"] == y["loss"]
    assert not any(p.name.startswith(".tmp_") for p in (tmp_path / "resumed" / "checkpoints").iterdir())


BLOCKED_LOADER = r"""
import importlib.abc, json, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "openus_hub" or name.startswith("openus_hub."):
            raise ImportError("openus_hub is blocked in this process")
sys.meta_path.insert(0, _Block())
try:
    import openus_hub  # noqa: F401
    raise SystemExit("openus_hub was importable")
except ImportError:
    pass
import numpy as np, torch
from PIL import Image
from transformers import AutoImageProcessor, SegformerForSemanticSegmentation
path = sys.argv[1]
model = SegformerForSemanticSegmentation.from_pretrained(path).eval()
processor = AutoImageProcessor.from_pretrained(path)
image = Image.fromarray((np.random.default_rng(0).random((120, 160, 3)) * 255).astype("uint8"))
inputs = processor(images=image, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
print(json.dumps({"model_type": model.config.model_type, "logits": list(logits.shape),
                  "pixel_values": list(inputs["pixel_values"].shape), "finite": bool(torch.isfinite(logits).all()),
                  "modules": sorted(m for m in sys.modules if m.startswith("openus_hub"))}))
"""


def _run_group(cmd, timeout, **kwargs) -> subprocess.CompletedProcess:
    """Run in its own process group and kill the whole group on timeout (no orphaned torchrun workers)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_torchrun_openus_teacher_resume_export_and_plain_load(tmp_path):
    # build the OpenUS CPU scan kernel here first, so two ranks never race for the extension build lock
    from openus_hub import OpenUSConfig, OpenUSModel

    OpenUSModel(OpenUSConfig(embed_dim=8, depths=[1, 1, 1, 1]))(torch.zeros(1, 3, 32, 32))
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "training.distill", "--config", str(CONFIGS / "debug_cpu_openus.yaml"), "--output-dir", str(out)]
    for steps in (2, 3):  # second launch resumes from last.pt
        proc = _run_group(cmd + [f"train.max_steps={steps}"], 300, cwd=REPO, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and summary["last_loss"] is not None
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert ckpt["teacher_type"] == "openus" and ckpt["teacher_channels"] == [8, 16, 32, 64]
    assert any(k.startswith("kd.ea.patch_embeds.") for k in ckpt["model"])
    # 3 frames per rank at batch 2: every epoch ends with a batch of 1 (SK's fc1 path), which DDP must tolerate
    assert [r["step"] for r in ckpt["state"]["history"]] == [1, 2, 3]

    export_dir = tmp_path / "export"
    numbers = export_student.main([str(out / "checkpoints" / "last.pt"), "--output-dir", str(export_dir)])
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {p.name for p in export_dir.iterdir()}
    config = json.loads((export_dir / "config.json").read_text())
    assert config["model_type"] == "segformer" and config["id2label"] == {"0": "background", "1": "fan"}
    assert numbers["export_max_abs_diff"] < 1e-4 and numbers["student_params"] < numbers["teacher_params"]
    # README.md: the model_cards/ template (ModelCardData front matter, parsed back with huggingface_hub.ModelCard)
    # with the numbers the export measured
    card = ModelCard.load(export_dir / "README.md")
    validate_card(export_dir / "README.md", require_verification=True)
    assert [line[3:] for line in card.text.splitlines() if line.startswith("## ")] == list(SECTIONS)
    assert card.data.license == "cc-by-nc-4.0"  # distilled from an OpenUS teacher
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-segmentation"
    assert card.data.model_name == "debug_cpu_openus" and {"transkd", "ultrasound", "openus_hub"} <= set(card.data.tags)
    text = card.text
    for needle in ("**Teacher:**", "**Data:**", "**Recipe:** TransKD-EA", "GFLOPs", "mIoU", "Not for clinical diagnosis",
                   "**This model is not a medical device.**", "arXiv:2202.13393", "arXiv:2511.11510"):
        assert needle in text, needle
    best = max(ckpt["state"]["evals"], key=lambda e: e["miou"])
    (result,) = card.data.eval_results
    assert result.metric_type == "mean_iou" and result.dataset_split == "val"
    assert result.metric_value == pytest.approx(round(100 * best["miou"], 2))
    assert f"best val mIoU: {best['miou']:.4f}" in text
    for key in ("teacher_params", "student_params"):
        assert f"{numbers[key]:,}" in text
    assert f"| teacher | {numbers['teacher_params']:,} | {numbers['teacher_gflops']:.2f} |" in text
    assert f"| student | {numbers['student_params']:,} | {numbers['student_gflops']:.2f} |" in text
    measured = f"{numbers['export_max_abs_diff']:.2e}"
    assert f"Maximum absolute difference measured: **{measured}**" in text
    assert f"max |logit difference| between the trained student and this exported folder: {measured}" in text
    assert f"eps 1e-6 on block/stage norms: {ckpt['config']['student']['upstream_layer_norm_eps']}" in text
    assert hashlib.sha256((export_dir / "model.safetensors").read_bytes()).hexdigest() in text
    assert hashlib.sha256((out / "checkpoints" / "last.pt").read_bytes()).hexdigest() in text

    proc = _run_group([sys.executable, "-c", BLOCKED_LOADER, str(export_dir)], 300, cwd=tmp_path,
                      env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model_type"] == "segformer" and result["modules"] == []
    assert result["pixel_values"] == [1, 3, 64, 64] and result["logits"] == [1, 2, 16, 16] and result["finite"]
