"""openus_hub.io.read_dicom on the real ultrasound files that ship with pydicom, plus error and privacy policies."""

import copy
import logging

import numpy as np
import pydicom
import pydicom.examples
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, convert_color_space, pixel_array
from pydicom.sequence import Sequence

from openus_hub.io import (
    BurnedInAnnotationWarning,
    DicomDecoderMissingError,
    DicomReadError,
    heuristic_crop_box,
    read_dicom,
    select_frames,
)

pytestmark = pytest.mark.filterwarnings("ignore::openus_hub.io.BurnedInAnnotationWarning")


def test_ybr_full_422_cine_is_converted_once():
    path = pydicom.examples.get_path("ybr_color")
    img = read_dicom(path)
    assert img.frames.shape == (30, 240, 320, 3) and img.frames.dtype == np.uint8
    assert img.metadata.number_of_frames == 30 and img.metadata.photometric_interpretation == "YBR_FULL_422"
    assert img.metadata.frame_time_ms == pytest.approx(33.333)
    assert img.metadata.manufacturer == "SonoSite, Inc."
    raw = pixel_array(path, index=0, raw=True, decoding_plugin="pillow")  # still YCbCr, decoded as read_dicom does
    expected = convert_color_space(raw, "YBR_FULL", "RGB")
    assert np.abs(img.frames[0].astype(int) - expected.astype(int)).max() <= 1
    # no green tint: on the gray B-mode sector the channels agree (a second YBR->RGB would split them by ~100)
    x0, y0, x1, y1 = 100, 60, 220, 180
    sector = img.frames[:, y0:y1, x0:x1].astype(float)
    bright = sector.mean(-1) > 30
    diffs = [abs(sector[..., a][bright] - sector[..., b][bright]).mean() for a, b in ((0, 1), (1, 2), (0, 2))]
    assert max(diffs) < 3.0


def test_frame_selection_decodes_only_requested_frames():
    path = pydicom.examples.get_path("ybr_color")
    full = read_dicom(path)
    sub = read_dicom(path, frames=select_frames(30, num_frames=4))
    assert sub.frame_indices == [0, 10, 19, 29]
    assert np.array_equal(sub.frames, full.frames[[0, 10, 19, 29]])
    assert select_frames(30, frame_stride=7) == [0, 7, 14, 21, 28]
    with pytest.raises(IndexError):
        read_dicom(path, frames=[30])


def test_jpeg2k_rgb_and_big_endian_match_pydicom():
    for path in (pydicom.examples.get_path("jpeg2k"), pydicom.examples.get_path("rgb_color")):
        img = read_dicom(path)
        ref = pydicom.dcmread(path).pixel_array
        assert img.frames.shape == (1, *ref.shape) and np.array_equal(img.frames[0], ref)
    big = get_testdata_file("ExplVR_BigEnd.dcm")
    img = read_dicom(big)
    assert img.metadata.transfer_syntax == "Explicit VR Big Endian"
    assert img.frames.shape == (1, 60, 80, 3) and img.frames.dtype.byteorder in "=|"
    assert np.array_equal(img.frames[0], pydicom.dcmread(big).pixel_array)
    mr = read_dicom(get_testdata_file("MR_small_bigendian.dcm"))  # 16-bit signed big-endian
    ref = pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm")).pixel_array.astype(np.int64)
    assert mr.frames.dtype == np.uint16 and mr.frames.dtype.byteorder in "=|"
    assert np.array_equal(mr.frames[0, ..., 0].astype(np.int64), ref + 2 ** (mr.metadata.bits_stored - 1))


def test_palette_color_lut_applied():
    path = pydicom.examples.get_path("palette_color")
    img = read_dicom(path)
    ds = pydicom.dcmread(path)
    expected = (apply_color_lut(ds.pixel_array, ds) >> 8).astype(np.uint8)  # 16-bit LUT entries -> 8 bits
    assert img.frames.shape == (1, 350, 800, 3) and img.frames.dtype == np.uint8
    assert np.array_equal(img.frames[0], expected)
    assert img.bit_depth == 8


def test_monochrome1_is_inverted_monochrome2_kept():
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    stored = ds.pixel_array.astype(np.int64)
    ds2 = copy.deepcopy(ds)
    ds2.PixelRepresentation = 1 if ds.PixelRepresentation else 0
    m2 = read_dicom(ds2)
    ds1 = copy.deepcopy(ds)
    ds1.PhotometricInterpretation = "MONOCHROME1"
    m1 = read_dicom(ds1)
    top = 2**ds.BitsStored - 1
    assert m1.frames.shape == m2.frames.shape == (1, 64, 64, 1)
    assert np.array_equal(m1.frames.astype(np.int64), top - m2.frames.astype(np.int64))
    assert m2.frames[0, ..., 0].astype(np.int64).std() == pytest.approx(stored.std())


def _with_region(ds: Dataset, box, spatial=1, dtype=1) -> Dataset:
    item = Dataset()
    item.RegionLocationMinX0, item.RegionLocationMinY0, item.RegionLocationMaxX1, item.RegionLocationMaxY1 = box
    item.RegionSpatialFormat, item.RegionDataType = spatial, dtype
    item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = 3
    item.PhysicalDeltaX = item.PhysicalDeltaY = 0.02
    ds.SequenceOfUltrasoundRegions = Sequence([*ds.get("SequenceOfUltrasoundRegions", []), item])
    return ds


def test_region_crop_picks_largest_tissue_region():
    ds = pydicom.dcmread(pydicom.examples.get_path("rgb_color"))  # 240 x 320
    _with_region(ds, (10, 20, 109, 119))  # tissue 100 x 100
    _with_region(ds, (0, 0, 319, 239), dtype=2)  # larger colour-flow region: tissue wins
    _with_region(ds, (0, 0, 319, 30), spatial=4)  # waveform: never chosen
    full = read_dicom(ds)
    img = read_dicom(ds, crop="regions")
    assert img.metadata.crop_box == (10, 20, 110, 120) and img.metadata.crop_source == "regions"
    assert img.frames.shape == (1, 100, 100, 3)
    assert np.array_equal(img.frames, full.frames[:, 20:120, 10:110])
    assert img.metadata.pixel_spacing == pytest.approx((0.2, 0.2))  # 0.02 cm


def test_region_outside_image_falls_back_to_heuristic_within_bounds():
    path = pydicom.examples.get_path("ybr_color")  # its region is in 640x480 coordinates for a 320x240 image
    img = read_dicom(path, crop="auto")
    assert img.metadata.regions and img.metadata.crop_source == "heuristic"
    x0, y0, x1, y1 = img.metadata.crop_box
    assert 0 <= x0 < x1 <= 320 and 0 <= y0 < y1 <= 240
    assert (x1 - x0) * (y1 - y0) < 0.75 * 320 * 240  # the static text panels are cut off
    assert img.frames.shape == (30, y1 - y0, x1 - x0, 3)
    assert read_dicom(path, crop="regions").metadata.crop_box is None  # invalid region: no crop


def test_heuristic_single_frame_trims_black_borders():
    frame = np.zeros((1, 50, 60, 1), np.uint8)
    frame[0, 10:40, 5:55] = 120
    assert heuristic_crop_box(frame) == (5, 10, 55, 40)
    assert heuristic_crop_box(np.zeros((1, 50, 60, 1), np.uint8)) is None


def test_burned_in_annotation_warning_and_no_phi_in_logs(caplog):
    ds = pydicom.dcmread(pydicom.examples.get_path("rgb_color"))
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-123"
    with caplog.at_level(logging.DEBUG, logger="openus_hub"):
        with pytest.warns(BurnedInAnnotationWarning, match="patient identifiers") as rec:
            img = read_dicom(ds, crop="auto")
    text = " ".join(str(w.message) for w in rec) + caplog.text + repr(img.metadata)
    assert "Doe" not in text and "SECRET-123" not in text
    ds.BurnedInAnnotation = "NO"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", BurnedInAnnotationWarning)
        read_dicom(ds)


def test_errors_are_clear(tmp_path):
    text = tmp_path / "notes.dcm"
    text.write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(DicomReadError, match="not a DICOM file"):
        read_dicom(text)
    with pytest.raises(DicomReadError, match="MR_truncated.dcm: .* the file is truncated"):
        read_dicom(get_testdata_file("MR_truncated.dcm"))
    with pytest.raises(DicomReadError, match="no pixel data"):
        read_dicom(get_testdata_file("test-SR.dcm"))
    with pytest.raises(FileNotFoundError):
        read_dicom(tmp_path / "missing.dcm")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(open(pydicom.examples.get_path("ybr_color"), "rb").read()[:2000])
    with pytest.raises(DicomReadError):
        read_dicom(cut)


def test_missing_decoder_names_the_extra():
    from pydicom.pixels import get_decoder

    ds = pydicom.dcmread(get_testdata_file("JPEGLSNearLossless_08.dcm"))
    if get_decoder(ds.file_meta.TransferSyntaxUID).is_available:
        pytest.skip("environment: a JPEG-LS decoder is installed here (e.g. the [dicom] extra)")
    with pytest.raises(DicomDecoderMissingError, match=r"openus_hub\[dicom\]"):
        read_dicom(ds)


# ---------------------------------------------------------------------------------------------------------------------
# bounded inputs: headers are checked against the data before anything is allocated; every file error names the file


def _small_with_frames(tmp_path, n: int, source: str = "MR_small.dcm"):
    ds = pydicom.dcmread(get_testdata_file(source) if source.endswith(".dcm") else pydicom.examples.get_path(source))
    ds.NumberOfFrames = n
    path = tmp_path / f"frames_{n}.dcm"
    ds.save_as(path)
    return path


@pytest.mark.parametrize("source", ["MR_small.dcm", "ybr_color"])  # uncompressed; JPEG (encapsulated)
def test_a_frame_count_the_pixel_data_cannot_hold_is_refused_before_allocating(tmp_path, source):
    """Finding: a 4.7 KB DICOM declaring 2**31 - 1 frames built a multi-GB list of frame indices (MemoryError)."""
    import tracemalloc

    from openus_hub import OpenUSImageProcessor
    from openus_hub.features import expand_input

    path = _small_with_frames(tmp_path, 2**31 - 1, source)
    tracemalloc.start()
    try:
        for call in (lambda: read_dicom(path), lambda: expand_input(path),
                     lambda: OpenUSImageProcessor()(str(path), return_tensors="np")):
            with pytest.raises(DicomReadError, match=rf"^{path}: the header declares 2,147,483,647 frame\(s\)"):
                call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50e6, f"peak {peak / 1e6:.0f} MB"


def test_decoded_size_limit_names_the_limit(monkeypatch):
    from openus_hub.io import dicom

    monkeypatch.setattr(dicom, "MAX_DECODED_BYTES", 1_000_000)
    path = pydicom.examples.get_path("ybr_color")  # 30 x 240 x 320 x 3 bytes
    with pytest.raises(DicomReadError, match=r"decode to 6,912,000 bytes, more than the limit of 1,000,000 .*"
                                             r"OPENUS_HUB_MAX_DECODED_BYTES"):
        read_dicom(path)
    assert read_dicom(path, frames=[0]).frames.shape == (1, 240, 320, 3)  # fewer frames fit


def test_bad_header_value_names_the_file():
    """Finding: badVR.dcm (NumberOfFrames '1A') raised `ValueError: invalid literal for int()` without a file name."""
    from openus_hub import OpenUSImageProcessor
    from openus_hub.features import expand_input

    path = get_testdata_file("badVR.dcm")
    for call in (lambda: read_dicom(path), lambda: expand_input(path),
                 lambda: OpenUSImageProcessor()(path, return_tensors="np")):
        with pytest.raises(DicomReadError, match=rf"^{path}: NumberOfFrames is '1A', not a whole number"):
            call()


@pytest.mark.parametrize("name", ["rtdose.dcm", "SC_rgb_rle_32bit.dcm"])
def test_32_bit_pixels_are_rescaled_by_their_range(name):
    """Finding: 32-bit pixels were clipped into uint16 (a uint32 file became all zeros or all 65535)."""
    path = get_testdata_file(name)
    raw = pixel_array(path).astype(np.float64)
    img = read_dicom(path)
    lo, hi = raw.min(), raw.max()
    assert img.frames.dtype == np.uint16 and img.metadata.bits_stored == 16 and img.bit_depth == 16
    assert img.metadata.value_range == (lo, hi) and img.frames.min() == 0 and img.frames.max() == 65535
    expected = np.rint((raw - lo) * (65535 / (hi - lo))).astype(np.uint16).reshape(img.frames.shape)
    assert np.array_equal(img.frames, expected)


def _float_dicom(tmp_path, values):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    del ds.PixelData
    ds.FloatPixelData = values.astype(np.float32).tobytes()
    ds.BitsAllocated = 32
    for keyword in ("BitsStored", "HighBit", "PixelRepresentation"):
        delattr(ds, keyword)
    path = tmp_path / "float.dcm"
    ds.save_as(path)
    return path


def test_float_pixels_are_rescaled_and_non_finite_ones_refused(tmp_path):
    values = np.linspace(-2.5, 7.5, 64 * 64, dtype=np.float32).reshape(64, 64)
    img = read_dicom(_float_dicom(tmp_path, values))
    assert img.metadata.value_range == (-2.5, 7.5) and img.frames.dtype == np.uint16
    assert img.frames[0, 0, 0, 0] == 0 and img.frames[0, -1, -1, 0] == 65535
    values[10, 20] = np.nan
    path = _float_dicom(tmp_path, values)
    with pytest.raises(DicomReadError, match=rf"^{path}: 1 of 4,096 pixel values are NaN or infinite"):
        read_dicom(path)


def test_image_bombs_and_nan_images_are_clear_errors(tmp_path, monkeypatch):
    """Finding: PIL's DecompressionBombError escaped; a NaN TIFF gave an all-NaN embedding row."""
    import struct
    import zlib

    from PIL import Image

    from openus_hub.io import ImageReadError, load_image_file

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"  # 57 bytes declaring 30000 x 30000 pixels
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    with pytest.raises(ImageReadError, match=rf"^{bomb}: Image size \(900000000 pixels\) exceeds limit .*"
                                             r"PIL.Image.MAX_IMAGE_PIXELS .*OPENUS_HUB_MAX_IMAGE_PIXELS"):
        load_image_file(bomb)
    monkeypatch.setenv("OPENUS_HUB_MAX_IMAGE_PIXELS", str(10**9))  # raised: now it is read, and found truncated
    with pytest.raises(ImageReadError, match=rf"^{bomb} could not be read as an image") as err:
        load_image_file(bomb)
    assert "bomb" not in str(err.value).split(":", 1)[1]
    assert Image.MAX_IMAGE_PIXELS == 89478485  # the global is restored
    values = np.ones((16, 16), np.float32)
    values[3, 4], values[5, 6] = np.nan, np.inf
    tif = tmp_path / "nan.tif"
    Image.fromarray(values).save(tif)
    with pytest.raises(ImageReadError, match=rf"^{tif}: 2 of 256 pixels are NaN or infinite"):
        load_image_file(tif)


def test_jpeg_frames_decode_the_same_whichever_plugins_are_installed():
    """Pillow decodes JPEG when it can, so installing the [dicom] extra (pylibjpeg) does not change the pixels; the
    parity fixtures were made with it (sha256 in tests/conftest.py)."""
    import hashlib

    from tests.conftest import YBR_FRAME0_SHA256

    img = read_dicom(pydicom.examples.get_path("ybr_color"), frames=[0])
    assert hashlib.sha256(img.frames[0].tobytes()).hexdigest() == YBR_FRAME0_SHA256
