"""SegFormer students (stock transformers folders, as training.export_student writes them): fp32 export parity and
int8 quantisation calibrated on echo frames."""

from __future__ import annotations

import numpy as np
import pydicom.examples
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from tests.conftest import skip_or_fail

try:
    import onnx
    import onnxruntime
except ImportError:
    onnx = onnxruntime = None

from openus_hub.cli import main as cli_main

ATOL = 1e-4  # fp32 export bound (export_onnx refuses more); measured <= 1e-7 on these inputs
MIN_AGREEMENT = 0.95  # int8 vs fp32 predicted-mask pixels on held-out frames (measured 99.6%)
SIZE = 224
TRAIN_SIZE = 128  # the quantisation test trains and exports at 128x128 to stay fast


@pytest.fixture(autouse=True)
def _need_onnxruntime():
    if onnxruntime is None:
        skip_or_fail('onnx/onnxruntime not installed (pip install "openus_hub[onnx]")')


def b0_config(**overrides) -> SegformerConfig:
    """SegFormer-B0 (MiT-B0 encoder, 256-wide all-MLP decoder), two classes."""
    kwargs = dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256,
                  num_attention_heads=[1, 2, 5, 8], sr_ratios=[8, 4, 2, 1], patch_sizes=[7, 3, 3, 3],
                  strides=[4, 2, 2, 2], mlp_ratios=[4, 4, 4, 4], num_labels=2, drop_path_rate=0.0,
                  classifier_dropout_prob=0.0, layer_norm_eps=1e-6)
    kwargs.update(overrides)
    return SegformerConfig(**kwargs)


def processor(size=SIZE):
    from transformers import SegformerImageProcessorPil

    return SegformerImageProcessorPil(size={"height": size, "width": size}, do_reduce_labels=False)


def echo_frames() -> np.ndarray:
    return pydicom.examples.ybr_color.pixel_array  # (30, 240, 320, 3) RGB


def synthetic_masks(frames: np.ndarray) -> np.ndarray:
    """A learnable target: the brightest 30% of each (blurred) frame, i.e. the echogenic tissue."""
    gray = torch.from_numpy(frames.mean(-1, dtype=np.float32))[:, None]  # [T, 1, H, W]
    blurred = F.avg_pool2d(gray, 9, stride=1, padding=4)[:, 0]
    thresholds = torch.quantile(blurred.flatten(1), 0.7, dim=1)[:, None, None]
    return (blurred > thresholds).long().numpy()


def _save(model, folder, proc=None):
    model.save_pretrained(folder)
    (proc or processor()).save_pretrained(folder)
    return folder


def _logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits.numpy()


def test_b0_student_fp32_export_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(b0_config()).eval()
    _save(model, tmp_path / "student")
    out = tmp_path / "onnx" / "student.onnx"
    out.parent.mkdir()
    assert cli_main(["export-onnx", str(tmp_path / "student"), "--output", str(out), "--dynamic-batch"]) == 0
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    from openus_hub.onnx import ORTModel

    ort_model = ORTModel.from_pretrained(out)
    assert ort_model.task == "semantic-segmentation"
    frames = echo_frames()[:3]
    echo = ort_model.processor(list(frames), return_tensors="pt")["pixel_values"]
    for x in (torch.randn(1, 3, SIZE, SIZE), torch.randn(3, 3, SIZE, SIZE), echo):
        err = float(np.abs(ort_model(x).logits.numpy() - _logits(model, x)).max())
        assert err <= ATOL, (x.shape, err)
    # the same post-processing as the PyTorch model
    sizes = [f.shape[:2] for f in frames]
    with torch.no_grad():
        ref = ort_model.processor.post_process_semantic_segmentation(model(pixel_values=echo), sizes)
    ours = ort_model.processor.post_process_semantic_segmentation(ort_model(echo), sizes)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape == (240, 320) and (a == b).float().mean().item() >= 0.999


def _iou_dice(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """mIoU over the two classes and foreground Dice."""
    ious = []
    for c in (0, 1):
        inter = np.logical_and(pred == c, target == c).sum()
        union = np.logical_or(pred == c, target == c).sum()
        ious.append(inter / max(union, 1))
    inter = np.logical_and(pred == 1, target == 1).sum()
    dice = 2 * inter / max((pred == 1).sum() + (target == 1).sum(), 1)
    return float(np.mean(ious)), float(dice)


@pytest.fixture(scope="module")
def trained_student(tmp_path_factory):
    """B0 trained for 50 steps on the synthetic masks of the even frames (held-out Dice 0.955 against the synthetic
    masks); odd frames are held out."""
    root = tmp_path_factory.mktemp("student")
    frames, masks = echo_frames(), synthetic_masks(echo_frames())
    proc = processor(TRAIN_SIZE)
    pixels = proc(list(frames), return_tensors="pt")["pixel_values"]
    labels = F.interpolate(torch.from_numpy(masks)[:, None].float(), size=(TRAIN_SIZE, TRAIN_SIZE),
                           mode="nearest")[:, 0].long()
    train = list(range(0, 30, 2))
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(b0_config())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step in range(50):
        idx = [train[(step * 4 + i) % len(train)] for i in range(4)]
        loss = model(pixel_values=pixels[idx], labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    # The decode head's BatchNorm keeps running statistics from batches of 4 while the weights still move; evaluated
    # with them, held-out Dice swings between 0.59 and 0.94 with the step count (and so with the CPU's rounding), and
    # pixels near the boundary decide the int8 agreement. Recomputing the statistics over the training frames with the
    # final weights gives held-out Dice 0.955 and int8 agreement 99.6% (95.6% without), steady from 50 to 150 steps.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the batches below
    with torch.no_grad():
        for start in range(0, len(train), 5):
            model(pixel_values=pixels[train[start:start + 5]])
    model.eval()
    _save(model, root / "student", proc)
    calibration = root / "calibration"
    calibration.mkdir()
    for i in train:
        Image.fromarray(frames[i]).save(calibration / f"frame{i:02d}.png")
    return model, root, frames, masks


def test_int8_static_quantisation_keeps_the_mask(trained_student, capsys):
    from openus_hub.onnx import ORTModel

    model, root, frames, masks = trained_student
    held_out = list(range(1, 30, 2))
    results = {}
    static = ["--quantize", "static", "--calibration-dir", str(root / "calibration")]
    for name, extra in (("fp32", []), ("int8", static)):
        out = root / name / "student.onnx"
        out.parent.mkdir()
        assert cli_main(["export-onnx", str(root / "student"), "--output", str(out), "--dynamic-batch", *extra]) == 0
        proto = onnx.load(str(out))
        onnx.checker.check_model(proto, full_check=True)
        ops = {n.op_type for n in proto.graph.node}
        assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
        if name == "int8":
            assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        ort_model = ORTModel.from_pretrained(out)
        x = ort_model.processor([frames[i] for i in held_out], return_tensors="pt")["pixel_values"]
        sizes = [frames[i].shape[:2] for i in held_out]
        results[name] = np.stack([m.numpy() for m in
                                  ort_model.processor.post_process_semantic_segmentation(ort_model(x), sizes)])
    target = masks[held_out]
    agreement = float((results["int8"] == results["fp32"]).mean())
    fp32_miou, fp32_dice = _iou_dice(results["fp32"], target)
    int8_miou, int8_dice = _iou_dice(results["int8"], target)
    with capsys.disabled():
        print(f"\nint8 static vs fp32 on {len(held_out)} held-out echo frames: mask agreement {100 * agreement:.2f}%, "
              f"mIoU {fp32_miou:.4f} -> {int8_miou:.4f}, Dice {fp32_dice:.4f} -> {int8_dice:.4f}")
    # the model learned something (a constant mask would agree trivially)
    assert 0.1 < results["fp32"].mean() < 0.9 and fp32_dice > 0.9
    assert agreement >= MIN_AGREEMENT


def test_int8_dynamic_quantisation_runs(trained_student):
    from openus_hub.onnx import ORTModel

    _, root, frames, _ = trained_student
    out = root / "dynamic" / "student.onnx"
    out.parent.mkdir()
    assert cli_main(["export-onnx", str(root / "student"), "--output", str(out), "--quantize", "dynamic"]) == 0
    proto = onnx.load(str(out))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert "DynamicQuantizeLinear" in {n.op_type for n in proto.graph.node}
    ort_model = ORTModel.from_pretrained(out)
    assert ort_model.precision == "int8-dynamic" and not ort_model.dynamic_batch
    x = ort_model.processor(list(frames[:2]), return_tensors="pt")["pixel_values"]
    assert ort_model(x).logits.shape == (2, 2, TRAIN_SIZE // 4, TRAIN_SIZE // 4)  # run one image at a time


def test_static_quantisation_needs_calibration_images(trained_student, tmp_path, capsys):
    _, root, _, _ = trained_student
    (tmp_path / "empty").mkdir()
    empty = ["--quantize", "static", "--calibration-dir", str(tmp_path / "empty")]
    for extra, match in ((["--quantize", "static"], "--calibration-dir"), (empty, "no readable images")):
        assert cli_main(["export-onnx", str(root / "student"), "--output", str(tmp_path / "q.onnx"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and match in err and "\n" not in err, err
    assert not (tmp_path / "q.onnx").exists()
