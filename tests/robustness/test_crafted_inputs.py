"""Crafted hostile inputs (decompression bombs, impossible headers, truncations, NaN pixels) through read_dicom,
the image processor, load_image_file and expand_input: each a clear one-line error naming the file, quickly and
without a large allocation, or a correct result."""

import io
import struct
import tracemalloc
import warnings
import zlib

import numpy as np
import pydicom
import pydicom.examples
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from openus_hub import OpenUSImageProcessor
from openus_hub.features import expand_input
from openus_hub.io import DicomReadError, ImageReadError, load_image_file, read_dicom
from tests.robustness.conftest import record, time_limit

CLEAR = (DicomReadError, ImageReadError, FileNotFoundError)
PEAK_LIMIT = 200e6  # bytes traced while handling one crafted file (the bombs below would need GBs)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(side: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + _png_chunk(b"IEND", b"")


def _image_bytes(fmt: str, array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _dicom(source: str, **changes) -> bytes:
    ds = pydicom.dcmread(get_testdata_file(source) if source.endswith(".dcm") else pydicom.examples.get_path(source))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


PNG_PIXELS = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)


def _cases():
    """(name, file name, bytes, expected outcome): 'error', 'result', 'any' (a clear error or a result), or
    'png-or-error' (a clear error, or exactly PNG_PIXELS: a PNG cut after its last image byte still decodes)."""
    png = _image_bytes("PNG", PNG_PIXELS)
    jpeg = _image_bytes("JPEG", np.full((64, 64, 3), 100, np.uint8))
    nan = np.ones((16, 16), np.float32)
    nan[2, 2] = np.nan
    inf = np.ones((16, 16), np.float32)
    inf[3, 3] = np.inf
    mr = open(get_testdata_file("MR_small.dcm"), "rb").read()
    ybr = open(pydicom.examples.get_path("ybr_color"), "rb").read()
    cases = [
        ("png bomb 30000^2", "bomb.png", _png_bomb(30000), "error"),
        ("png bomb 100000^2", "bomb2.png", _png_bomb(100000), "error"),
        ("tiff nan", "nan.tif", _image_bytes("TIFF", nan), "error"),
        ("tiff inf", "inf.tif", _image_bytes("TIFF", inf), "error"),
        ("empty png", "empty.png", b"", "error"),
        ("random bytes as png", "random.png", np.random.default_rng(0).bytes(4096), "error"),
        ("text as jpeg", "text.jpg", b"hello\n" * 100, "error"),
        ("dicom 2^31-1 frames", "frames.dcm", _dicom("MR_small.dcm", NumberOfFrames=2**31 - 1), "error"),
        ("dicom jpeg 2^31-1 frames", "jframes.dcm", _dicom("ybr_color", NumberOfFrames=2**31 - 1), "error"),
        ("dicom 0 frames", "zero.dcm", _dicom("MR_small.dcm", NumberOfFrames=0), "error"),
        ("dicom frames '1A'", "bad.dcm", open(get_testdata_file("badVR.dcm"), "rb").read(), "error"),
        ("dicom rows 65535", "rows.dcm", _dicom("MR_small.dcm", Rows=65535, Columns=65535), "error"),
        ("dicom bits 0", "bits.dcm", _dicom("MR_small.dcm", BitsAllocated=0), "error"),
        ("dicom not dicom", "notes.dcm", b"not a dicom\n" * 50, "error"),
        ("dicom empty", "empty.dcm", b"", "error"),
        ("valid png", "ok.png", png, "result"),
        ("valid jpeg", "ok.jpg", jpeg, "result"),
        ("valid dicom", "ok.dcm", mr, "result"),
    ]
    for fraction in (0.05, 0.3, 0.6, 0.95):  # truncations at several offsets
        cases.append((f"png cut at {fraction:.0%}", f"cut{fraction}.png", png[: int(len(png) * fraction)],
                      "png-or-error"))
        cases.append((f"jpeg cut at {fraction:.0%}", f"cut{fraction}.jpg", jpeg[: int(len(jpeg) * fraction)], "any"))
        cases.append((f"dicom cut at {fraction:.0%}", f"cut{fraction}.dcm", mr[: int(len(mr) * fraction)], "error"))
        cases.append((f"jpeg dicom cut at {fraction:.0%}", f"jcut{fraction}.dcm", ybr[: int(len(ybr) * fraction)],
                      "error"))
    return cases


CASES = _cases()


@pytest.mark.parametrize("name,filename,data,expected", CASES, ids=[c[0] for c in CASES])
def test_crafted_input(tmp_path, name, filename, data, expected):
    path = tmp_path / filename
    path.write_bytes(data)
    is_dicom = filename.endswith(".dcm")
    calls = {"read": (lambda: read_dicom(path)) if is_dicom else (lambda: load_image_file(path)),
             "expand_input": lambda: expand_input(path),
             "processor": lambda: OpenUSImageProcessor()(str(path), return_tensors="np")["pixel_values"]}
    for what, call in calls.items():
        group = f"crafted inputs: {what}"
        tracemalloc.start()
        try:
            with warnings.catch_warnings(), time_limit(30):
                warnings.simplefilter("ignore")
                out = call()
        except Exception as err:
            text = str(err)
            clear = isinstance(err, CLEAR) and str(path) in text and "\n" not in text
            outcome = record(group, "clear error" if clear else "crash")
            assert clear, f"{what}: {type(err).__name__}: {text}"
            assert expected != "result", f"{what}: a valid file was refused: {text}"
        else:
            wrong = expected == "error"
            if expected == "png-or-error" and what != "processor":
                image = out if what == "read" else out[0].image
                wrong = not np.array_equal(np.asarray(image), PNG_PIXELS)
            if what == "processor":
                wrong = wrong or not np.isfinite(out).all()
            outcome = record(group, "silent wrong result" if wrong else "result")
            assert outcome == "result", f"{what}: {name} was accepted"
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert peak < PEAK_LIMIT, f"{what}: {peak / 1e6:.0f} MB traced"
