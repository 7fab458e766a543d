"""Reading ultrasound DICOM files (single frames and cine loops) into plain ``(T, H, W, C)`` arrays.

Policies (each one chosen so that colour is converted exactly once and nothing is silently mis-scaled):

* **Decoding** goes through pydicom 3's ``pixel_array``, which removes YBR_FULL_422 subsampling and converts
  YBR_FULL / YBR_FULL_422 / YBR_ICT / YBR_RCT to RGB itself. We never convert colour again afterwards (older echo
  code that did its own YUV->RGB on already-converted arrays produced green-tinted frames).
* **MONOCHROME1** is inverted (``max - value`` with ``max = 2**BitsStored - 1``) so that bright always means echo.
  **MONOCHROME2** is kept as stored. Grayscale frames come back with ``C = 1``.
* **PALETTE COLOR** goes through pydicom's ``apply_color_lut``; 16-bit LUT entries are reduced to 8 bits
  (``>> 8``), since palettes exist to drive an 8-bit display.
* **Big-endian** and **signed** data: frames are returned in native byte order; signed data is shifted by
  ``2**(BitsStored - 1)`` into the unsigned range. No modality/VOI LUT or windowing is applied.
* **Dtypes**: ``uint8`` when ``BitsAllocated <= 8`` (or after a palette), ``uint16`` otherwise;
  ``metadata.bits_stored`` says which part of the range is used (the image processor scales by it).
* **Deeper than 16 bits** (``BitsStored`` > 16, e.g. 32-bit dose or parametric maps) and **float pixel data**
  (``FloatPixelData``/``DoubleFloatPixelData``, or a float decode): there is no fixed full-scale value, so the
  decoded frames are rescaled by their actual range, ``(x - min) / (max - min)`` over the frames read, to the full
  16-bit range (``bits_stored`` 16); ``metadata.value_range`` records ``(min, max)`` in stored units. A constant
  image becomes zeros. NaN or infinite pixels are an error, never passed on as a NaN embedding.
* **Bounds**, checked from the header before anything is decoded: ``NumberOfFrames`` must be a whole number >= 1,
  the pixel data must hold that many frames (uncompressed: ``frames x rows x columns x samples x bits``; encapsulated:
  at least one fragment per frame), and the frames requested may decode to at most :data:`MAX_DECODED_BYTES`
  (4 GiB; set ``openus_hub.io.dicom.MAX_DECODED_BYTES`` or ``OPENUS_HUB_MAX_DECODED_BYTES`` to change it).
* **Decoding plugin**: JPEG and JPEG 2000 frames are decoded with Pillow (a core dependency) whenever its plugin
  supports the transfer syntax, so the pixels do not change when an optional plugin (pylibjpeg, GDCM, installed
  with the ``[dicom]`` extra) is present; other syntaxes use pydicom's own plugin order. ``decoding_plugin=``
  chooses explicitly.
* **Cropping** (``crop=``): ``"regions"`` uses ``SequenceOfUltrasoundRegions`` (largest 2-D region, tissue regions
  preferred); a region that does not fit inside the image is treated as invalid (some vendors write acquisition
  coordinates; pydicom's bundled SonoSite cine has a region twice the image size). ``"heuristic"`` uses
  :func:`heuristic_crop_box`. ``"auto"`` tries regions, then the heuristic. ``"none"`` (default) keeps full frames.
  The chosen box is reported in ``metadata.crop_box`` / ``metadata.crop_source``.
* **Privacy**: no header value that could identify a patient is logged, put in an error message, or returned.
  If ``BurnedInAnnotation`` is not ``"NO"`` (including when it is absent) a :class:`BurnedInAnnotationWarning` says
  the pixels may carry identifiers: openus_hub does not de-identify.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

logger = logging.getLogger(__name__)

CropMode = Literal["none", "regions", "heuristic", "auto"]
# the most bytes one read_dicom call may decode (the requested frames, before cropping); see the module docstring
MAX_DECODED_BYTES = int(os.environ.get("OPENUS_HUB_MAX_DECODED_BYTES", 4 << 30))
DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")
DICOM_EXTRA_HINT = 'pip install "openus_hub[dicom]"'
# DICOM RegionDataType 1 = tissue (B-mode); 2 = colour flow, both 2-D
_TISSUE, _COLOR_FLOW = 1, 2


class DicomReadError(ValueError):
    """A DICOM file (or dataset) that cannot be turned into image frames; the message says why and what to do."""


class DicomDecoderMissingError(DicomReadError):
    """The pixel data is compressed with a transfer syntax for which no pydicom decoder plugin is installed."""


class BurnedInAnnotationWarning(UserWarning):
    """The pixels of a DICOM image may contain burned-in patient identifiers."""


@dataclass(frozen=True)
class UltrasoundRegion:
    """One entry of ``SequenceOfUltrasoundRegions``; the box is half-open pixel coordinates ``[x0, x1) x [y0, y1)``."""

    x0: int
    y0: int
    x1: int
    y1: int
    spatial_format: int | None = None  # 1 = 2-D, 2 = M-mode, 3 = spectral, 4 = waveform
    data_type: int | None = None  # 1 = tissue, 2 = colour flow, 3 = PW spectral Doppler, ...
    physical_delta_x: float | None = None
    physical_delta_y: float | None = None
    physical_units_x: int | None = None  # 3 = cm
    physical_units_y: int | None = None

    @property
    def area(self) -> int:
        return max(0, self.x1 - self.x0) * max(0, self.y1 - self.y0)

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass
class DicomMetadata:
    """Technical, non-identifying header values of a DICOM image (no patient, study or operator fields)."""

    photometric_interpretation: str
    rows: int
    columns: int
    number_of_frames: int
    bits_allocated: int
    bits_stored: int
    samples_per_pixel: int
    transfer_syntax: str | None
    modality: str | None = None
    manufacturer: str | None = None
    manufacturer_model_name: str | None = None
    pixel_spacing: tuple[float, float] | None = None  # (row, column) spacing in mm
    frame_time_ms: float | None = None
    burned_in_annotation: str | None = None
    regions: list[UltrasoundRegion] = field(default_factory=list)
    value_range: tuple[float, float] | None = None  # (min, max) of >16-bit or float pixels rescaled to 16 bits
    crop_box: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1), half-open, in original pixels
    crop_source: str | None = None  # "regions" | "heuristic" | None
    color_conversion: str | None = None  # what pydicom converted, e.g. "YBR_FULL_422 -> RGB"


@dataclass
class DicomImage:
    """Decoded frames ``(T, H, W, C)`` (uint8/uint16, C = 1 or 3), the original frame indices and the metadata."""

    frames: np.ndarray
    frame_indices: list[int]
    metadata: DicomMetadata

    @property
    def bit_depth(self) -> int:
        """Number of significant bits per sample (8 after a palette, else ``BitsStored``)."""
        return 8 if self.frames.dtype == np.uint8 else self.metadata.bits_stored

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def __repr__(self) -> str:  # one line: never the pixels
        idx = self.frame_indices
        shown = ", ".join(map(str, idx[:4])) + (f", ... ({len(idx)} frames)" if len(idx) > 4 else "")
        return (f"DicomImage(frames={tuple(self.frames.shape)} {self.frames.dtype}, frame_indices=[{shown}], "
                f"photometric_interpretation={self.metadata.photometric_interpretation!r}, "
                f"crop_box={self.metadata.crop_box})")


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when ``path`` has the 128-byte preamble + ``DICM`` marker, or a DICOM extension (checked by reading)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or path.suffix.lower() in DICOM_EXTENSIONS


def select_frames(num_available: int, frame_stride: int = 1, num_frames: int | None = None) -> list[int]:
    """Frame indices of a cine loop: every ``frame_stride``-th frame, or ``num_frames`` evenly spaced frames.

    ``num_frames`` takes precedence over ``frame_stride``; asking for more frames than exist returns every frame
    (no padding or repetition: pad yourself if your model needs a fixed clip length).
    """
    if num_available < 1:
        raise ValueError("the cine loop has no frames")
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if num_frames >= num_available:
            return list(range(num_available))
        return sorted({int(round(i)) for i in np.linspace(0, num_available - 1, num_frames)})
    if frame_stride < 1:
        raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
    return list(range(0, num_available, frame_stride))


def dicom_dataset(source: str | os.PathLike | Dataset) -> Dataset:
    """``pydicom.dcmread`` with the errors of :func:`read_dicom` (not DICOM, truncated header, missing file)."""
    return _as_dataset(source)[0]


def _as_dataset(source: str | os.PathLike | Dataset) -> tuple[Dataset, str]:
    if isinstance(source, Dataset):
        return source, str(getattr(source, "filename", None) or "<dataset>")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"DICOM file not found: {path}")
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise DicomReadError(
            f"{path} is not a DICOM file (no 'DICM' marker after the 128-byte preamble and no readable header)"
        ) from e
    except Exception as e:  # truncated headers raise EOFError, struct.error, ...
        raise DicomReadError(
            f"{path} could not be parsed as DICOM ({type(e).__name__}); the file may be truncated"
        ) from e
    return ds, str(path)


def _header_int(ds: Dataset, keyword: str, where: str, default: int | None = None, minimum: int = 0) -> int:
    """A required whole-number header value; DicomReadError naming the file when it is malformed."""
    try:
        value = ds.get(keyword, None)
    except Exception as e:  # pydicom converts the raw value on access
        raise DicomReadError(f"{where}: the {keyword} header value cannot be read ({type(e).__name__}); the header "
                             "is corrupt") from e
    if value is None or value == "":
        if default is None:
            raise DicomReadError(f"{where}: the header has no {keyword}; it is not a complete image")
        return default
    try:
        number = int(value)
        if number != float(value):
            raise ValueError(value)
    except (TypeError, ValueError) as e:
        raise DicomReadError(f"{where}: {keyword} is {str(value)[:20]!r}, not a whole number; the header is "
                             "corrupt") from e
    if number < minimum:
        raise DicomReadError(f"{where}: {keyword} is {number} (at least {minimum} expected); the header is corrupt")
    return number


def number_of_frames(ds: Dataset, where: str | None = None) -> int:
    """``NumberOfFrames`` (1 when absent), checked against the pixel data before anything is decoded: a corrupt or
    hostile header (say 2**31 - 1 frames in a 4.7 KB file) is a :class:`DicomReadError` naming the file."""
    where = where or str(getattr(ds, "filename", None) or "<dataset>")
    n = _header_int(ds, "NumberOfFrames", where, default=1, minimum=1)
    name = next((k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
    if name is None:
        return n
    rows = _header_int(ds, "Rows", where, minimum=1)
    columns = _header_int(ds, "Columns", where, minimum=1)
    samples = _header_int(ds, "SamplesPerPixel", where, default=1, minimum=1)
    bits = _header_int(ds, "BitsAllocated", where, default={"PixelData": 8, "FloatPixelData": 32}.get(name, 64),
                       minimum=1)
    try:
        data = ds[name].value
    except Exception as e:
        raise DicomReadError(f"{where}: the pixel data element cannot be read ({type(e).__name__}); the file is "
                             "truncated or corrupt") from e
    available = len(data) if data is not None else 0
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if name == "PixelData" and tsyntax is not None and tsyntax.is_encapsulated:
        from pydicom.encaps import parse_fragments

        try:
            items, _ = parse_fragments(data, endianness="<" if tsyntax.is_little_endian else ">")
        except ValueError as e:
            raise DicomReadError(f"{where}: the encapsulated pixel data is damaged ({_safe_message(e)})") from e
        if n > items - 1:  # the first item is the basic offset table; every frame needs a fragment of its own
            raise DicomReadError(f"{where}: the header declares {n:,} frame(s) but the encapsulated pixel data holds "
                                 f"{max(items - 1, 0):,} fragment(s); the file is truncated or its header is corrupt")
        return n
    per_sample = rows * columns * samples
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "YBR_FULL_422":
        per_sample = rows * columns * 2  # chroma subsampled: two samples per pixel are stored
    expected = (n * per_sample * bits + 7) // 8
    if available < expected:
        raise DicomReadError(f"{where}: the header declares {n:,} frame(s) of {rows}x{columns}x{samples} at {bits} "
                             f"bits ({expected:,} bytes) but the pixel data holds {available:,} bytes; the file is "
                             "truncated or its header is corrupt")
    return n


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _float(item: Dataset, keyword: str) -> float | None:
    value = item.get(keyword, None)
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def ultrasound_regions(ds: Dataset) -> list[UltrasoundRegion]:
    """The regions of ``SequenceOfUltrasoundRegions`` (0018,6011), converted to half-open boxes; [] when absent."""
    regions = []
    for item in ds.get("SequenceOfUltrasoundRegions", None) or []:
        x0, y0 = _int(item, "RegionLocationMinX0"), _int(item, "RegionLocationMinY0")
        x1, y1 = _int(item, "RegionLocationMaxX1"), _int(item, "RegionLocationMaxY1")
        if None in (x0, y0, x1, y1):
            continue
        regions.append(
            UltrasoundRegion(
                x0=x0,
                y0=y0,
                x1=x1 + 1,  # DICOM max coordinates are inclusive
                y1=y1 + 1,
                spatial_format=_int(item, "RegionSpatialFormat"),
                data_type=_int(item, "RegionDataType"),
                physical_delta_x=_float(item, "PhysicalDeltaX"),
                physical_delta_y=_float(item, "PhysicalDeltaY"),
                physical_units_x=_int(item, "PhysicalUnitsXDirection"),
                physical_units_y=_int(item, "PhysicalUnitsYDirection"),
            )
        )
    return regions


def region_crop_box(
    regions: Sequence[UltrasoundRegion], height: int, width: int
) -> tuple[int, int, int, int] | None:
    """The largest 2-D region that fits in a ``height x width`` image (tissue regions first), or None.

    A region that reaches outside the image by more than one pixel is ignored with a log message; one pixel is
    tolerated (and clipped) because some vendors write ``MaxX1 = Columns``.
    """
    valid = []
    for r in regions:
        if r.spatial_format not in (None, 1) or r.area == 0:
            continue
        if r.x0 < 0 or r.y0 < 0 or r.x1 > width + 1 or r.y1 > height + 1 or r.x0 >= width or r.y0 >= height:
            logger.info("ignoring an ultrasound region %s that does not fit a %dx%d image", r.box, width, height)
            continue
        valid.append(r)
    if not valid:
        return None
    tissue = [r for r in valid if r.data_type == _TISSUE] or [r for r in valid if r.data_type == _COLOR_FLOW] or valid
    best = max(tissue, key=lambda r: r.area)
    return (best.x0, best.y0, min(best.x1, width), min(best.y1, height))


def _robust_extent(profile: np.ndarray, fraction: float) -> tuple[int, int] | None:
    if profile.max() <= 0:
        return None
    keep = np.flatnonzero(profile >= max(fraction * profile.max(), 1.0))
    if keep.size == 0:
        return None
    return int(keep[0]), int(keep[-1]) + 1


def heuristic_crop_box(
    frames: np.ndarray, motion_threshold: float = 1.0, intensity_threshold: float = 8.0, min_fraction: float = 0.05
) -> tuple[int, int, int, int] | None:
    """Bounding box of the scan area of ``frames`` (T, H, W, C), without header information.

    * Cine loops (T >= 2): the scan sector is where pixels change over time. Pixels whose temporal standard deviation
      (of the channel mean, in 8-bit units) exceeds ``motion_threshold`` are marked; rows and columns with at least
      ``min_fraction`` of the busiest row/column's marked pixels bound the box, so isolated moving pixels (a blinking
      cursor, the ECG trace's tip) do not stretch it. Static overlays (text, logos, scales) fall outside.
    * Single frames: there is no motion cue, so only uniform dark borders are trimmed (every pixel above
      ``intensity_threshold`` counts, so the box is the extent of everything visible); text overlays stay.

    Returns ``(x0, y0, x1, y1)`` half-open, or None when nothing sensible is found (less than 5% of the frame, or the
    whole frame), in which case the caller keeps the frame unchanged.
    """
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise ValueError(f"frames must be (T, H, W, C) with T >= 1, got shape {frames.shape}")
    t, h, w = frames.shape[:3]
    scale = 255.0 / (np.iinfo(frames.dtype).max if np.issubdtype(frames.dtype, np.integer) else 1.0)
    gray = frames.astype(np.float32).mean(axis=-1) * scale  # [T, H, W], 8-bit units
    if t >= 2:
        mask = gray.std(axis=0) > motion_threshold
    else:
        mask, min_fraction = gray[0] > intensity_threshold, 0.0
    rows = _robust_extent(mask.sum(axis=1).astype(np.float64), min_fraction)
    cols = _robust_extent(mask.sum(axis=0).astype(np.float64), min_fraction)
    if rows is None or cols is None:
        return None
    box = (cols[0], rows[0], cols[1], rows[1])
    area = (box[2] - box[0]) * (box[3] - box[1])
    if area < 0.05 * h * w or box == (0, 0, w, h):
        return None
    return box


def _check_decoder(ds: Dataset, where: str) -> None:
    from pydicom.pixels import get_decoder

    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None or not tsyntax.is_compressed:
        return
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as e:
        raise DicomDecoderMissingError(
            f"{where}: pydicom has no decoder for transfer syntax '{tsyntax.name}'; convert the file to an "
            "uncompressed transfer syntax (e.g. with dcmtk's dcmdjpeg) before reading it"
        ) from e
    if not decoder.is_available:
        raise DicomDecoderMissingError(
            f"{where}: the pixel data is compressed with '{tsyntax.name}' and no decoder plugin for it is installed; "
            f"install the DICOM extra with `{DICOM_EXTRA_HINT}` (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg), "
            f"or python-gdcm. pydicom reports: {'; '.join(decoder.missing_dependencies)}"
        )


def _preferred_plugin(ds: Dataset, requested: str | None) -> str:
    """The decoding plugin: ``requested``; else Pillow where it decodes the transfer syntax (a core dependency, so
    the pixels do not depend on which optional plugins are installed); else "" (pydicom's own order)."""
    if requested is not None:
        return requested
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None or not tsyntax.is_compressed:
        return ""
    from pydicom.pixels import get_decoder

    try:
        return "pillow" if "pillow" in get_decoder(tsyntax).available_plugins else ""
    except NotImplementedError:
        return ""


def _decode_frame(ds: Dataset, index: int | None, where: str, plugin: str = "") -> np.ndarray:
    from pydicom.pixels import pixel_array

    try:
        return pixel_array(ds, index=index, decoding_plugin=plugin)  # YBR -> RGB happens here, once
    except Exception as e:
        raise DicomReadError(
            f"{where}: the pixel data could not be decoded ({type(e).__name__}: {_safe_message(e)}); the file may be "
            "truncated or corrupt"
        ) from e


def _safe_message(e: Exception) -> str:
    # pydicom's decoding errors describe byte counts and syntaxes, never header values; cap the length anyway
    return str(e).splitlines()[0][:200] if str(e) else ""


def read_dicom(
    source: str | os.PathLike | Dataset,
    *,
    frames: Sequence[int] | None = None,
    crop: CropMode = "none",
    warn_burned_in: bool = True,
    decoding_plugin: str | None = None,
) -> DicomImage:
    """Decode a DICOM image or cine loop into ``(T, H, W, C)`` frames plus technical metadata.

    Args:
        source: a path to a DICOM file or an already-read ``pydicom.Dataset``.
        frames: indices of the frames to decode (default: all); see :func:`select_frames` for stride/count sampling.
            Only the requested frames are decoded, which matters for long compressed cine loops.
        crop: ``"none"`` (default), ``"regions"``, ``"heuristic"`` or ``"auto"`` (regions, then heuristic); see the
            module docstring. The applied box is in ``metadata.crop_box``.
        warn_burned_in: emit a :class:`BurnedInAnnotationWarning` unless ``BurnedInAnnotation`` is ``"NO"``.
        decoding_plugin: pydicom decoding plugin for compressed pixel data (``"pillow"``, ``"pylibjpeg"``,
            ``"gdcm"``, ...); default: Pillow where it supports the transfer syntax (see the module docstring).

    Returns:
        A :class:`DicomImage`; ``frames`` is uint8 or uint16, C = 1 (grayscale) or 3 (RGB).

    Raises:
        FileNotFoundError: the path does not exist.
        DicomReadError: not a DICOM file, no pixel data (e.g. a structured report), a corrupt header (frame count
            the pixel data cannot hold, malformed values), more than :data:`MAX_DECODED_BYTES` to decode,
            truncated/corrupt pixel data, or NaN/infinite pixels.
        DicomDecoderMissingError: compressed pixel data whose decoder plugin is not installed (names the extra).
    """
    if crop not in ("none", "regions", "heuristic", "auto"):
        raise ValueError(f"crop must be 'none', 'regions', 'heuristic' or 'auto', got {crop!r}")
    ds, where = _as_dataset(source)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomReadError(
            f"{where} has no pixel data (Modality {ds.get('Modality', 'unknown')}): it is not an image, e.g. a "
            "structured report or presentation state; pass the image files instead"
        )
    _check_decoder(ds, where)

    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    n_available = number_of_frames(ds, where)
    indices = list(range(n_available)) if frames is None else [int(i) for i in frames]
    if not indices:
        raise ValueError("frames selects no frame")
    bad = [i for i in indices if not 0 <= i < n_available]
    if bad:
        raise IndexError(f"{where}: frame indices {bad[:5]} out of range for {n_available} frame(s)")

    bits_allocated = _header_int(ds, "BitsAllocated", where, default=8, minimum=1)
    bits_stored = _int(ds, "BitsStored", bits_allocated) or bits_allocated
    signed = _int(ds, "PixelRepresentation", 0) == 1
    samples_out = 3 if photometric == "PALETTE COLOR" else (_int(ds, "SamplesPerPixel", 1) or 1)
    decoded_bytes = len(indices) * (_int(ds, "Rows", 0) or 0) * (_int(ds, "Columns", 0) or 0) * samples_out * max(
        1, bits_allocated // 8)
    if decoded_bytes > MAX_DECODED_BYTES:
        raise DicomReadError(
            f"{where}: the {len(indices)} frame(s) requested decode to {decoded_bytes:,} bytes, more than the limit of "
            f"{MAX_DECODED_BYTES:,} (openus_hub.io.dicom.MAX_DECODED_BYTES); read fewer frames (frames=, "
            "--frame-stride/--num-frames) or raise the limit with OPENUS_HUB_MAX_DECODED_BYTES if you trust the file"
        )
    plugin = _preferred_plugin(ds, decoding_plugin)
    decoded = []
    for i in indices:
        arr = _decode_frame(ds, i if n_available > 1 else None, where, plugin)
        if arr.ndim == 3 and n_available == 1 and arr.shape[-1] not in (1, 3, 4):
            arr = arr[0]  # defensive: a single frame decoded with a leading axis
        decoded.append(arr)
    data = np.stack(decoded)  # [T, H, W] or [T, H, W, 3]
    if data.dtype.byteorder not in ("=", "|"):
        data = data.astype(data.dtype.newbyteorder("="))  # big-endian files decode to '>u2'/'>i2'

    color_conversion, value_range = None, None
    if np.issubdtype(data.dtype, np.floating) or (bits_stored > 16 and photometric != "PALETTE COLOR"):
        data, value_range = _rescale_by_range(data, where)  # -> uint16, full range
        bits_stored, signed = 16, False
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        data = np.asarray(apply_color_lut(data, ds))
        if data.dtype != np.uint8:
            data = (data.astype(np.uint32) >> 8).astype(np.uint8) if data.max() > 255 else data.astype(np.uint8)
        color_conversion = "PALETTE COLOR -> RGB (color LUT)"
        bits_stored_out = 8
    else:
        if signed and np.issubdtype(data.dtype, np.signedinteger):
            data = data.astype(np.int64) + (1 << (bits_stored - 1))
        data = np.clip(data, 0, (1 << bits_stored) - 1)
        data = data.astype(np.uint8 if bits_allocated <= 8 and bits_stored <= 8 else np.uint16)
        if photometric == "MONOCHROME1":
            data = ((1 << bits_stored) - 1 - data.astype(np.int64)).astype(data.dtype)
        if photometric.startswith("YBR") and data.ndim == 4:
            color_conversion = f"{photometric} -> RGB (pydicom)"
        bits_stored_out = bits_stored
    if data.ndim == 3:
        data = data[..., None]  # [T, H, W, 1]

    regions = ultrasound_regions(ds)
    h, w = data.shape[1:3]
    spacing = None
    if ds.get("PixelSpacing", None) is not None:
        spacing = tuple(float(v) for v in ds.PixelSpacing)[:2]
    else:  # the first 2-D region in cm that fits the image (a region that does not fit has suspect spacing too)
        for r in regions:
            fits = r.x1 <= w + 1 and r.y1 <= h + 1 and r.spatial_format in (None, 1)
            if fits and r.physical_units_x == 3 and r.physical_delta_x:
                spacing = (float(r.physical_delta_y or r.physical_delta_x) * 10.0, float(r.physical_delta_x) * 10.0)
                break
    meta = DicomMetadata(
        photometric_interpretation=photometric,
        rows=int(h),
        columns=int(w),
        number_of_frames=n_available,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored_out,
        samples_per_pixel=_int(ds, "SamplesPerPixel", 1) or 1,
        transfer_syntax=(
            str(ds.file_meta.TransferSyntaxUID.name) if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
        ),
        modality=str(ds.get("Modality")) if ds.get("Modality") else None,
        manufacturer=str(ds.get("Manufacturer")) if ds.get("Manufacturer") else None,
        manufacturer_model_name=str(ds.get("ManufacturerModelName")) if ds.get("ManufacturerModelName") else None,
        pixel_spacing=spacing,
        frame_time_ms=_float(ds, "FrameTime"),
        burned_in_annotation=str(ds.get("BurnedInAnnotation")).upper() if ds.get("BurnedInAnnotation") else None,
        regions=regions,
        value_range=value_range,
        color_conversion=color_conversion,
    )

    if crop != "none":
        box, box_source = None, None
        if crop in ("regions", "auto"):
            box = region_crop_box(regions, h, w)
            box_source = "regions" if box else None
        if box is None and crop in ("heuristic", "auto"):
            box = heuristic_crop_box(data)
            box_source = "heuristic" if box else None
        if box is not None:
            x0, y0, x1, y1 = box
            data = np.ascontiguousarray(data[:, y0:y1, x0:x1])
            meta.crop_box, meta.crop_source = box, box_source
            logger.debug("cropped %s to %s (%s)", where, box, box_source)
        else:
            logger.info("no ultrasound region found for %s (crop=%r): kept full frames", where, crop)

    if warn_burned_in and meta.burned_in_annotation != "NO":
        state = "absent" if meta.burned_in_annotation is None else f"'{meta.burned_in_annotation}'"
        warnings.warn(
            f"{where}: BurnedInAnnotation is {state}, so the pixels may contain patient identifiers (names, IDs, "
            "dates burned into the image). openus_hub does not de-identify; crop to the ultrasound region "
            "(crop='auto') and check the images before sharing embeddings or figures.",
            BurnedInAnnotationWarning,
            stacklevel=2,
        )
    return DicomImage(frames=data, frame_indices=indices, metadata=meta)


def _rescale_by_range(data: np.ndarray, where: str) -> tuple[np.ndarray, tuple[float, float]]:
    """Float or >16-bit pixels -> uint16 over their actual range (see the module docstring)."""
    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        if not finite.all():
            raise DicomReadError(f"{where}: {int((~finite).sum()):,} of {data.size:,} pixel values are NaN or "
                                 "infinite; replace them before reading the file")
    lo, hi = float(data.min()), float(data.max())
    if hi > lo:
        scaled = (data.astype(np.float64) - lo) * (65535.0 / (hi - lo))
        out = np.rint(scaled).astype(np.uint16)
    else:
        out = np.zeros(data.shape, np.uint16)
    logger.info("%s: %s pixels rescaled from their range [%g, %g] to 16 bits", where, data.dtype, lo, hi)
    return out, (lo, hi)


__all__ = [
    "MAX_DECODED_BYTES",
    "BurnedInAnnotationWarning",
    "DicomDecoderMissingError",
    "DicomImage",
    "DicomMetadata",
    "DicomReadError",
    "UltrasoundRegion",
    "heuristic_crop_box",
    "is_dicom_file",
    "read_dicom",
    "region_crop_box",
    "select_frames",
    "dicom_dataset",
    "number_of_frames",
    "ultrasound_regions",
]
