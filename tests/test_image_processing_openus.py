"""OpenUSImageProcessor: upstream parity, input policies (modes, dtypes, layouts, bit depth), errors, Auto classes."""

import logging

import numpy as np
import pydicom.examples
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor

from tests.conftest import parity_path, ybr_fixture_frame
from openus_hub import OpenUSConfig, OpenUSImageProcessor, OpenUSImageProcessorPil

pytestmark = pytest.mark.filterwarnings("ignore::openus_hub.io.BurnedInAnnotationWarning")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
LO, HI = (0 - MEAN.max()) / STD.min(), (1 - MEAN.min()) / STD.min()  # normalised range of [0, 1] inputs


def _pv(proc, images, **kw):
    return proc(images, return_tensors="pt", **kw)["pixel_values"]


@pytest.fixture(scope="module")
def ybr_frame0():
    return ybr_fixture_frame()  # RGB uint8 (pydicom converts YBR), decoded as the parity fixtures were


def test_upstream_parity_pixel_values_real(ybr_frame0):
    ref = load_file(parity_path("openus", "cfg_a", "io.safetensors"))["pixel_values_real"]
    proc = OpenUSImageProcessor()
    from_pil = _pv(proc, Image.fromarray(ybr_frame0).convert("RGB"))
    from_array = _pv(proc, ybr_frame0)
    from_dicom = _pv(proc, pydicom.examples.get_path("ybr_color"), dicom_crop="none", num_frames=1)
    for out in (from_pil, from_array, from_dicom):
        assert out.shape == ref.shape == (1, 3, 224, 224)
        assert (out - ref).abs().max().item() < 1e-5


def test_grayscale_is_replicated_and_matches_rgb_conversion(ybr_frame0):
    gray = Image.fromarray(ybr_frame0).convert("L")
    proc = OpenUSImageProcessor()
    out = _pv(proc, gray)
    assert out.shape == (1, 3, 224, 224)
    # replicated: channel c equals (x - mean_c) / std_c of the same values
    raw = out[0] * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    assert torch.allclose(raw[0], raw[1], atol=1e-6) and torch.allclose(raw[0], raw[2], atol=1e-6)
    assert torch.allclose(out, _pv(proc, gray.convert("RGB")), atol=1e-6)  # = upstream convert('RGB')
    for arr in (np.asarray(gray), np.asarray(gray)[..., None], np.asarray(gray)[None]):  # HW, HW1, 1HW
        assert torch.allclose(_pv(proc, arr), out, atol=1e-6)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "1", "CMYK"])
def test_pil_modes_give_rgb_in_range(mode, ybr_frame0):
    img = Image.fromarray(ybr_frame0).convert(mode)
    out = _pv(OpenUSImageProcessor(), img)
    assert out.shape == (1, 3, 224, 224)
    assert out.min() >= LO - 1e-4 and out.max() <= HI + 1e-4


def test_rgba_drops_alpha_like_upstream(ybr_frame0):
    rgba = np.dstack([ybr_frame0, np.full(ybr_frame0.shape[:2], 7, np.uint8)])  # nearly transparent
    proc = OpenUSImageProcessor()
    expected = _pv(proc, Image.fromarray(ybr_frame0))
    assert torch.allclose(_pv(proc, Image.fromarray(rgba)), expected, atol=1e-6)
    assert torch.allclose(_pv(proc, rgba), expected, atol=1e-6)  # HxWx4 array
    assert torch.allclose(_pv(proc, np.moveaxis(rgba, -1, 0)), expected, atol=1e-6)  # 4xHxW array


def test_without_rgb_conversion_channels_are_kept(ybr_frame0):
    """The alpha policy belongs to the RGB conversion: with do_convert_rgb=False every channel is kept (4-value mean and
    std for 4 channels), as transformers' processors do."""
    rgba = np.dstack([ybr_frame0, np.full(ybr_frame0.shape[:2], 7, np.uint8)])
    proc = OpenUSImageProcessor(size={"height": 32, "width": 32})
    kw = {"do_convert_rgb": False, "image_mean": [0.5] * 4, "image_std": [0.5] * 4}
    for image in (rgba, np.moveaxis(rgba, -1, 0), Image.fromarray(rgba)):
        out = _pv(proc, image, **kw)
        assert out.shape == (1, 4, 32, 32)
        torch.testing.assert_close(out[0, 3], torch.full((32, 32), (7 / 255 - 0.5) / 0.5), rtol=0, atol=1e-6)
        rgb = _pv(proc, image, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        torch.testing.assert_close(out[:, :3], rgb, rtol=0, atol=1e-6)
    gray = _pv(proc, ybr_frame0[..., 0], do_convert_rgb=False, image_mean=[0.5], image_std=[0.5])
    assert gray.shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="image_mean"):
        _pv(proc, rgba, do_convert_rgb=False)  # 4 channels, 3 mean values


def test_16bit_is_scaled_by_its_range_not_255():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    proc = OpenUSImageProcessor(size={"height": 64, "width": 64})
    outs = [
        _pv(proc, ramp),
        _pv(proc, Image.fromarray(ramp)),
        _pv(proc, Image.fromarray(ramp.astype(np.int32))),
    ]
    for out in outs:
        raw = out[0, 0] * STD[0] + MEAN[0]  # undo normalisation: back in [0, 1]
        assert abs(raw.max().item() - 1.0) < 1e-5 and abs(raw.min().item()) < 1e-5  # not clipped, not 256x off
        assert torch.allclose(raw.flatten(), torch.tensor(ramp.flatten() / 65535.0, dtype=torch.float32), atol=1e-5)
    # the same picture as 8 bits gives (nearly) the same tensor
    eight = _pv(proc, (ramp // 257).astype(np.uint8))
    assert (eight - outs[0]).abs().max() < 0.02
    # 12-bit data in a 16-bit container, declared
    twelve = (ramp >> 4).astype(np.uint16)
    out12 = _pv(OpenUSImageProcessor(size={"height": 64, "width": 64}, input_bit_depth=12), twelve)
    assert (out12 - outs[0]).abs().max() < 1e-3


def test_float_inputs_are_taken_as_unit_range_and_pil_F():
    x = np.random.default_rng(0).random((50, 60)).astype(np.float32)
    proc = OpenUSImageProcessor(size={"height": 32, "width": 32})
    a, b = _pv(proc, x), _pv(proc, Image.fromarray(x))
    assert torch.allclose(a, b, atol=1e-6)
    raw = a[0, 0] * STD[0] + MEAN[0]
    assert 0 <= raw.min() and raw.max() <= 1
    assert torch.allclose(_pv(proc, torch.from_numpy(x)), a)


def test_range_check_warns_once_on_first_batch(caplog):
    proc = OpenUSImageProcessor(size={"height": 32, "width": 32})
    bad = np.random.default_rng(0).random((40, 40, 3)).astype(np.float32) * 255  # floats in 0..255
    with caplog.at_level(logging.WARNING, logger="openus_hub"):
        proc(bad)
        proc(bad)
    msgs = [r.getMessage() for r in caplog.records if "outside [0, 1]" in r.getMessage()]
    assert len(msgs) == 1 and "divide 0..255 floats by 255" in msgs[0]
    caplog.clear()
    dim12 = (np.random.default_rng(1).random((40, 40)) * 4095).astype(np.uint16)  # 12-bit data in uint16
    with caplog.at_level(logging.WARNING, logger="openus_hub"):
        OpenUSImageProcessor(size={"height": 32, "width": 32})(dim12)
    assert any("input_bit_depth=12" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="openus_hub"):
        OpenUSImageProcessor()(np.zeros((30, 30), np.uint8) + 100)
    assert not caplog.records


def test_keep_aspect_ratio_pads_with_black():
    img = np.full((100, 200), 255, np.uint8)
    out = _pv(OpenUSImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=True), img)
    raw = out[0, 0] * STD[0] + MEAN[0]
    assert raw.shape == (64, 64)
    assert torch.allclose(raw[:16], torch.zeros(16, 64), atol=1e-6)  # 64x32 content centred: 16 rows pad each side
    assert torch.allclose(raw[16:48], torch.ones(32, 64), atol=1e-6)
    assert torch.allclose(raw[48:], torch.zeros(16, 64), atol=1e-6)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((0, 10), np.uint8), "empty"),
        (np.zeros((2, 32, 32, 3), np.uint8), "4-D"),
        (np.zeros((10, 10, 7), np.uint8), "channel"),
        (np.full((8, 8), -3, np.int16), "outside 0..65535"),
        ("definitely/not/here.png", "not found"),
        ([], "no images"),
    ],
)
def test_wrong_inputs_get_clear_errors(bad, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        OpenUSImageProcessor()(bad)


def test_dicom_cine_frame_sampling():
    proc = OpenUSImageProcessor(size={"height": 32, "width": 32})
    path = pydicom.examples.get_path("ybr_color")
    assert _pv(proc, path, frame_stride=7).shape[0] == 5  # frames 0, 7, 14, 21, 28
    assert _pv(proc, path, num_frames=3).shape[0] == 3
    assert _pv(proc, [path, pydicom.examples.rgb_color], num_frames=2).shape[0] == 3  # 2 cine frames + 1 still


def test_save_load_and_auto_registration(tmp_path):
    proc = OpenUSImageProcessor(keep_aspect_ratio=True, input_bit_depth=12, dicom_crop="regions")
    proc.save_pretrained(tmp_path)
    OpenUSConfig(embed_dim=8, depths=[1, 1, 1, 2]).save_pretrained(tmp_path)
    import json

    stored = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert stored["image_processor_type"] == "OpenUSImageProcessor" and "_range_checked" not in stored
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, OpenUSImageProcessorPil)
    assert loaded.keep_aspect_ratio and loaded.input_bit_depth == 12 and loaded.dicom_crop == "regions"
    assert loaded.size.height == 224 and list(loaded.image_mean) == [0.485, 0.456, 0.406]


def test_post_process_semantic_segmentation_is_exposed():
    logits = torch.zeros(2, 3, 4, 4)
    logits[0, 2] = 1.0
    logits[1, 1, :2] = 1.0
    maps = OpenUSImageProcessor().post_process_semantic_segmentation(logits, target_sizes=[(8, 8), (4, 4)])
    assert maps[0].shape == (8, 8) and (maps[0] == 2).all()
    assert (maps[1][:2] == 1).all() and (maps[1][2:] == 0).all()
