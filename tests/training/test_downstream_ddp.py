"""``torchrun --nproc_per_node=2`` (gloo, CPU) runs of training.finetune_segmentation: sharded training and
evaluation gathered over ranks, rank-0 checkpoints and export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from training.common.checkpoint import list_checkpoints
from training.common.checkpoint import load_checkpoint as load

REPO = Path(__file__).resolve().parents[2]


def test_torchrun_two_ranks_segmentation(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3), ("test", 3)):
        for i in range(n):
            img = (rng.random((64, 64)) * 80).astype(np.uint8)
            img[16:48, 20:40] += 120  # a bright object
            mask = np.zeros((64, 64), np.uint8)
            mask[16:48, 20:40] = 255
            for sub, arr in (("images", np.stack([img] * 3, -1)), ("masks", mask)):
                (tmp_path / "data" / split / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(tmp_path / "data" / split / sub / f"{i}.png")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training.finetune_segmentation", "--config", "training/configs/downstream/debug_cpu_seg.yaml",
           "--output-dir", str(out), f"data.root={tmp_path / 'data'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (step, path), = list_checkpoints(out / "checkpoints")[-1:]
    state = load(path)
    assert state["world_size"] == 2 and step == 4 and state["epoch"] == 2  # 8 images / 2 ranks / batch 2 x 2 epochs
    test = json.loads((out / "eval_test.json").read_text())
    assert test["world_size"] == 2 and test["num_samples"] == 3  # 3 test images split 2 + 1 over ranks, gathered
    assert (out / "model" / "model.safetensors").is_file()
    val = [json.loads(line)["val"] for line in (out / "log.jsonl").read_text().splitlines() if "val" in line]
    assert len(val) == 2 and all(v["num_samples"] == 3 for v in val)
