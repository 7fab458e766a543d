"""CPU end-to-end: fine-tune a tiny OpenUS segmentation model on real ultrasound frames (pydicom's ``ybr_color``
cine loop, masks = thresholded fan region saved as 0/255 PNG), resume, evaluate, export, reload with
``AutoModelForSemanticSegmentation`` and run ``pipeline("image-segmentation")`` on a DICOM frame; plus a linear-probe
smoke run on the same frames."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pydicom.examples
import pytest
import torch
from PIL import Image, ImageFilter

import openus_hub  # noqa: F401  (registers the classes with transformers)
from openus_hub.io import read_dicom
from training import evaluate as ev
from training import finetune_segmentation, linear_probe
from tests.output_checks import assert_figure, assert_no_local_paths
from training.common.checkpoint import list_checkpoints
from training.common.checkpoint import load_checkpoint as load

SEG_CFG = "training/configs/downstream/debug_cpu_seg.yaml"
LIN_CFG = "training/configs/downstream/debug_cpu_linear.yaml"
DICOM = pydicom.examples.get_path("ybr_color")


def _frames() -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_dicom(DICOM).frames  # (30, 240, 320, 3) uint8


def _fan_mask(frame: np.ndarray) -> Image.Image:
    """The bright ultrasound fan: blurred grey level > 20, as a 0/255 mask."""
    grey = Image.fromarray(frame.mean(-1).astype(np.uint8)).filter(ImageFilter.GaussianBlur(3))
    return Image.fromarray(((np.asarray(grey) > 20) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def seg_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("us_seg")
    frames = _frames()
    splits = {"train": range(0, 12), "val": range(12, 16), "test": range(16, 20)}
    for split, idx in splits.items():
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in idx:
            Image.fromarray(frames[i]).save(root / split / "images" / f"frame_{i:02d}.png")
            _fan_mask(frames[i]).save(root / split / "masks" / f"frame_{i:02d}.png")
    return root


def test_segmentation_finetune_resume_evaluate_export_pipeline(seg_root, tmp_path):
    out = tmp_path / "run"
    common = ["--config", SEG_CFG, "--output-dir", str(out), f"data.root={seg_root}"]
    # 1) 4 steps (epoch 0 = 6 steps at batch 2): stops mid-epoch and saves a resumable checkpoint
    assert finetune_segmentation.main(common + ["train.max_steps=4", "export.enabled=false"]) == 0
    (step, path), = list_checkpoints(out / "checkpoints")
    state = load(path)
    assert step == 4 and state["epoch"] == 0 and state["batch_in_epoch"] == 4
    assert state["format"] == "openus_hub.downstream/1" and state["best_model"] is not None
    # 2) resume to the end of 2 epochs (12 steps), evaluate the best model on test, export
    assert finetune_segmentation.main(common + ["--resume", "auto"]) == 0
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in steps if "loss" in r]
    assert train_steps == list(range(1, 13)), train_steps  # no step lost or repeated by the resume
    assert all(np.isfinite(r["loss"]) for r in steps if "loss" in r)
    assert list_checkpoints(out / "checkpoints")[-1][0] == 12
    # the interrupted + resumed run ends bit-identical to an uninterrupted one
    ref = tmp_path / "ref"
    assert finetune_segmentation.main(["--config", SEG_CFG, "--output-dir", str(ref), f"data.root={seg_root}",
                                       "export.enabled=false"]) == 0
    resumed, straight = (load(list_checkpoints(d / "checkpoints")[-1][1])["model"] for d in (out, ref))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    test = json.loads((out / "eval_test.json").read_text())
    assert test["num_samples"] == 4 and test["task"] == "segmentation"
    for key in ("dice", "iou", "dice_per_sample", "iou_per_sample"):
        assert 0.0 <= test[key] <= 1.0
    assert test["iou_per_sample"] <= test["dice_per_sample"] + 1e-9  # IoU <= Dice for every image
    # the best model's test overlays: 4 images x (image | ground truth | prediction with its Dice)
    assert_figure(out / "figures" / "test_overlays.png", (1100, 1380))

    # 3) the exported folder: config + weights + processor + a card with the round-trip check and test metrics
    folder = out / "model"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
        assert (folder / name).is_file(), name
    assert_no_local_paths(folder, seg_root, tmp_path)  # the data root appears by its base name only
    card = (folder / "README.md").read_text()
    assert f"folder `{seg_root.name}`" in card
    assert "pipeline_tag: image-segmentation" in card and "Maximum absolute difference measured" in card
    assert "| folder | DSC |" in card

    from transformers import AutoModelForSemanticSegmentation, pipeline

    model = AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
    assert type(model).__name__ == "OpenUSForSemanticSegmentation" and model.config.num_labels == 2
    # evaluate CLI on the saved folder reproduces the training script's test numbers
    res_path = tmp_path / "res.json"
    assert ev.main(["segmentation", "--model", str(folder), "--config", SEG_CFG, "--output", str(res_path),
                    "--save-masks", str(tmp_path / "pred"), "--figure", str(tmp_path / "eval.png"),
                    "--figure-images", "2", f"data.root={seg_root}"]) == 0
    res = json.loads(res_path.read_text())
    assert_figure(tmp_path / "eval.png", (1100, 740))
    assert res["dice_per_sample"] == pytest.approx(test["dice_per_sample"], abs=1e-6)
    assert res["iou"] == pytest.approx(test["iou"], abs=1e-6)
    preds = sorted((tmp_path / "pred").glob("pred_frame_*.png"))
    assert len(preds) == 4 and set(np.unique(np.asarray(Image.open(preds[0])))) <= {0, 255}

    # 4) pipeline("image-segmentation") on a DICOM frame: the pipeline's image loader does not read DICOM paths,
    # so the frame is decoded with openus_hub.io.read_dicom and passed as a PIL image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = read_dicom(DICOM, frames=[25]).frames[0]
    pipe = pipeline("image-segmentation", model=str(folder))
    segments = pipe(Image.fromarray(frame))
    assert segments and {s["label"] for s in segments} <= {"background", "foreground"}
    for s in segments:
        assert s["mask"].size == (320, 240)  # resized back to the frame
    # the pipeline's masks are the model's argmax through the processor
    proc = pipe.image_processor
    with torch.no_grad():
        logits = model(**proc(Image.fromarray(frame), return_tensors="pt")).logits
    cls = proc.post_process_semantic_segmentation(type("O", (), {"logits": logits})(), target_sizes=[(240, 320)])[0]
    for s in segments:
        label = model.config.label2id[s["label"]]
        assert np.array_equal(np.asarray(s["mask"]) > 0, cls.numpy() == label)


def test_seg_metrics_summary_over_seeds(tmp_path):
    results = [{"task": "segmentation", "dataset": "busbra", "dice_per_sample": d, "iou_per_sample": j,
                "dice": d, "iou": j} for d, j in ((0.90, 0.82), (0.92, 0.85))]
    for i, r in enumerate(results):
        (tmp_path / f"r{i}.json").write_text(json.dumps(r))
    assert ev.main(["summarize", str(tmp_path / "r0.json"), str(tmp_path / "r1.json"),
                    "--output-dir", str(tmp_path / "sum")]) == 0
    summary = json.loads((tmp_path / "sum" / "summary.json").read_text())
    assert summary["metrics"]["dice_per_sample"]["mean"] == pytest.approx(0.91)
    assert summary["metrics"]["dice_per_sample"]["std"] == pytest.approx(0.01)
    md = (tmp_path / "sum" / "summary.md").read_text()
    assert "| busbra | DSC | 91.0 ± 1.0 | 2 |" in md and "| busbra | IoU | 83.5 ± 1.5 | 2 |" in md


def test_linear_probe_smoke(tmp_path):
    frames = _frames()
    root = tmp_path / "cls"
    # two classes from the same loop: the frame and its left-right mirror (a linear probe can tell them apart)
    for split, idx in {"train": range(0, 12), "val": range(12, 16), "test": range(16, 20)}.items():
        for cls in ("left", "right"):
            (root / split / cls).mkdir(parents=True)
        for i in idx:
            Image.fromarray(frames[i]).save(root / split / "left" / f"{i:02d}.png")
            Image.fromarray(frames[i][:, ::-1]).save(root / split / "right" / f"{i:02d}.png")
    out = tmp_path / "run"
    assert linear_probe.main(["--config", LIN_CFG, "--output-dir", str(out), f"data.root={root}",
                              "train.epochs=2"]) == 0
    test = json.loads((out / "eval_test.json").read_text())
    assert test["num_samples"] == 8 and 0 <= test["accuracy"] <= 1 and 0 <= test["macro_f1"] <= 1
    state = load(list_checkpoints(out / "checkpoints")[-1][1])
    assert state["epoch"] == 2 and state["step"] == 12  # 24 images / batch 4 x 2 epochs
    # frozen backbone: only the classifier moved
    from transformers import AutoModelForImageClassification

    from training.downstream_train import build_model, load_downstream_config

    cfg = load_downstream_config("classification", LIN_CFG, [f"data.root={root}"])
    torch.manual_seed(cfg["train"]["seed"])
    init = build_model(cfg, 2, ["left", "right"])
    trained = state["model"]
    for k, v in init.state_dict().items():
        if k.startswith("openus."):
            assert torch.equal(v, trained[k]), k
    assert not torch.equal(init.classifier.weight, trained["classifier.weight"])
    # the export folds avgpool=2 into the classifier: the reloaded model gives the probe's logits without a setting
    model = AutoModelForImageClassification.from_pretrained(out / "model").eval()
    assert model.config.id2label == {0: "left", 1: "right"}
    assert torch.allclose(model.classifier.weight, 2 * trained["classifier.weight"])
    res = tmp_path / "res.json"
    assert ev.main(["classification", "--model", str(out / "model"), "--config", LIN_CFG, "--output", str(res),
                    f"data.root={root}"]) == 0
    assert json.loads(res.read_text())["accuracy"] == pytest.approx(test["accuracy"])
