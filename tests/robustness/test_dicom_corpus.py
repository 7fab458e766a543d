"""Every file pydicom ships for its own tests, through read_dicom and the image processor: a clear error or a result
in the documented range, never a traceback, a hang or a silently wrong image."""

import os
import warnings

import numpy as np
import pydicom.data
import pytest

from openus_hub import OpenUSImageProcessor
from openus_hub.io import DicomReadError, ImageReadError, read_dicom
from tests.robustness.conftest import record, time_limit

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
LO, HI = float(((0 - MEAN) / STD).min()), float(((1 - MEAN) / STD).max())  # normalised range of [0, 1] inputs
CLEAR = (DicomReadError, ImageReadError, FileNotFoundError)


def _files():
    return sorted(p for p in pydicom.data.get_testdata_files() if os.path.isfile(p))


def _classify_error(err: BaseException, path: str) -> str:
    text = str(err)
    if isinstance(err, CLEAR) and os.path.basename(path) in text and "\n" not in text:
        return "clear error"
    return "crash"


def _independent(path):
    """pydicom's own decode of every frame, as (T, H, W, C) float64, or None when pydicom cannot decode it."""
    ds = pydicom.dcmread(path)
    try:
        raw = np.asarray(ds.pixel_array, dtype=np.float64)
    except Exception:
        return None, ds
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1:
        raw = raw[None]
    if raw.ndim == 3:
        raw = raw[..., None]
    return raw, ds


def _check_image(img, path) -> str | None:
    """Why ``img`` contradicts the documented output or pydicom's own decode; None when it agrees."""
    frames = img.frames
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or frames.dtype not in (np.uint8, np.uint16):
        return f"shape {frames.shape} dtype {frames.dtype}"
    if len(img.frame_indices) != frames.shape[0] or frames.shape[0] != img.metadata.number_of_frames:
        return "frame count"
    if int(frames.max()) > 2 ** img.bit_depth - 1:
        return f"values above {img.bit_depth} bits"
    raw, ds = _independent(path)
    if raw is None or img.metadata.photometric_interpretation == "PALETTE COLOR" or raw.shape != frames.shape:
        return None  # nothing independent to compare with (palette LUTs are not linear)
    if np.ptp(raw) == 0:
        return None if np.ptp(frames) == 0 else "a constant image became non-constant"
    if np.ptp(frames) == 0:
        return "a non-constant image became constant"
    corr = np.corrcoef(raw.ravel(), frames.astype(np.float64).ravel())[0, 1]
    inverted = img.metadata.photometric_interpretation == "MONOCHROME1"
    if not (corr < -0.99 if inverted else corr > 0.99):
        return f"correlation {corr:.3f} with pydicom's own decode"
    return None


@pytest.mark.timeout(900)
def test_every_pydicom_test_file_reads_clearly_or_correctly():
    files = _files()
    assert len(files) > 150  # pydicom 3 ships ~190 local test files
    processor = OpenUSImageProcessor()
    problems = []
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with time_limit(60):
                    img = read_dicom(path)
            except Exception as err:
                if record("pydicom test files: read_dicom", _classify_error(err, path)) == "crash":
                    problems.append(f"read_dicom {path}: {type(err).__name__}: {err}")
                img = None
            if img is not None:
                why = _check_image(img, path)
                if record("pydicom test files: read_dicom", "silent wrong result" if why else "result") != "result":
                    problems.append(f"read_dicom {path}: {why}")
            try:
                with time_limit(60):
                    x = processor(path, num_frames=2, return_tensors="np")["pixel_values"]
            except Exception as err:
                if record("pydicom test files: image processor", _classify_error(err, path)) == "crash":
                    problems.append(f"processor {path}: {type(err).__name__}: {err}")
                continue
            ok = (x.ndim == 4 and x.shape[1] == 3 and np.isfinite(x).all()
                  and LO - 1e-4 <= x.min() and x.max() <= HI + 1e-4)
            if record("pydicom test files: image processor", "result" if ok else "silent wrong result") != "result":
                problems.append(f"processor {path}: shape {x.shape}, range [{x.min()}, {x.max()}]")
    assert not problems, "\n".join(problems)
