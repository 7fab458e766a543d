"""Opening image files without losing their bit depth, and finding inputs in folders."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .dicom import DICOM_EXTENSIONS, is_dicom_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


class ImageReadError(ValueError):
    """An image file that cannot be opened; the message names the file and the reason."""


def load_image_file(path: str | os.PathLike) -> Image.Image:
    """Open an image file as PIL, keeping its mode (``L``, ``I;16``, ``RGBA``, ...).

    Unlike ``transformers.image_utils.load_image`` this does **not** convert to RGB, so 16-bit grayscale TIFF/PNG
    keeps its 16 bits and the image processor can rescale it by its real range. EXIF orientation is applied.
    Multi-page TIFFs: the first page only.

    Pillow's decompression-bomb guard is kept: an image of more than ``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels is an
    :class:`ImageReadError` naming the limit (raise it with ``PIL.Image.MAX_IMAGE_PIXELS = N``, or
    ``OPENUS_HUB_MAX_IMAGE_PIXELS=N`` for the command line, after checking the file). Float images (mode ``F``) with
    NaN or infinite pixels are an :class:`ImageReadError` too, never a NaN embedding.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    limit = os.environ.get("OPENUS_HUB_MAX_IMAGE_PIXELS")
    saved = Image.MAX_IMAGE_PIXELS
    try:
        if limit:
            Image.MAX_IMAGE_PIXELS = int(limit)
        with Image.open(path) as img:
            img.load()
            out = ImageOps.exif_transpose(img)
            out = out if out is not img else img.copy()
    except Image.DecompressionBombError as e:
        raise ImageReadError(
            f"{path}: {str(e).split(',')[0]}, twice Pillow's PIL.Image.MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS:,}): "
            "refused as a possible decompression bomb; if you trust the file, raise the limit "
            "(PIL.Image.MAX_IMAGE_PIXELS = N in Python, OPENUS_HUB_MAX_IMAGE_PIXELS=N for openus-hub)"
        ) from e
    except MemoryError as e:
        raise ImageReadError(f"{path}: not enough memory to decode the image") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, struct.error, EOFError,
            IndexError, KeyError, ZeroDivisionError) as e:  # Pillow's plugins raise all of these for corrupt files
        raise ImageReadError(f"{path} could not be read as an image ({type(e).__name__}: {str(e)[:200]})") from e
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    if out.mode.startswith("F") or out.mode in ("I", "I;32"):
        arr = np.asarray(out)
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ImageReadError(f"{path}: {bad:,} of {arr.size:,} pixels are NaN or infinite; replace them (e.g. "
                                 "numpy.nan_to_num) before embedding")
    return out


def is_supported_file(path: str | os.PathLike) -> bool:
    """True for files with an image or DICOM extension, and for extension-less files with a DICOM preamble."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS or suffix in DICOM_EXTENSIONS:
        return True
    return suffix == "" and is_dicom_file(path)


def find_inputs(inputs: Iterable[str | os.PathLike], recursive: bool = True) -> list[Path]:
    """Expand files and folders into a sorted, de-duplicated list of image/DICOM files.

    Files named explicitly are kept whatever their extension (a bad one is reported when read); files inside
    folders are kept when :func:`is_supported_file` accepts them. Hidden files and folders are skipped.
    """
    found: dict[Path, None] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            walker = path.rglob("*") if recursive else path.glob("*")
            for p in sorted(walker):
                rel = p.relative_to(path).parts
                if any(part.startswith(".") for part in rel) or not p.is_file():
                    continue
                if is_supported_file(p):
                    found[p.resolve()] = None
        elif path.exists():
            found[path.resolve()] = None
        else:
            raise FileNotFoundError(f"input not found: {path}")
    return sorted(found)


__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "find_inputs", "is_supported_file", "load_image_file"]
