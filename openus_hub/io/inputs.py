"""One input -> the images it stands for: the one place a path, a PIL image, an array, a pydicom Dataset or a
:class:`~openus_hub.io.DicomImage` is expanded (a cine loop into its selected frames). ``extract_features``,
``openus-hub embed``, the feature-extraction pipeline and ``OpenUSImageProcessor`` all expand inputs here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .dicom import DicomImage, dicom_dataset, is_dicom_file, number_of_frames, read_dicom, select_frames
from .images import load_image_file


@dataclass(repr=False)
class InputItem:
    """One image fed to the model: the decoded image and where it came from."""

    image: Any  # PIL image, array or single-frame DicomImage, as the image processor accepts it
    source: str  # file path, or "<input i>" for in-memory inputs
    frame_index: int  # frame of a cine loop; 0 for still images
    shape: tuple[int, ...]  # (H, W, C) of the decoded image before cropping and resizing
    crop_box: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) applied to DICOM frames

    def __repr__(self) -> str:  # one line: never the pixels
        crop = f", crop_box={tuple(self.crop_box)}" if self.crop_box is not None else ""
        return (f"InputItem(source={self.source!r}, frame_index={self.frame_index}, shape={tuple(self.shape)}{crop}, "
                f"image={describe_image(self.image)})")


def describe_image(image: Any) -> str:
    """A short description of an image-like value (type, shape, dtype), for reprs."""
    if isinstance(image, Image.Image):
        return f"<PIL {image.mode} {image.size[0]}x{image.size[1]}>"
    shape = tuple(int(s) for s in np.shape(image.frames if isinstance(image, DicomImage) else image))
    dtype = getattr(image.frames if isinstance(image, DicomImage) else image, "dtype", None)
    return f"<{type(image).__name__} {shape}{f' {dtype}' if dtype is not None else ''}>"


def _shape_of(image: Any) -> tuple[int, ...]:
    if isinstance(image, Image.Image):
        w, h = image.size
        return (h, w, len(image.getbands()))
    return tuple(int(s) for s in np.shape(image))


def expand_input(
    item: Any, index: int = 0, *, frame_stride: int = 1, num_frames: int | None = None, dicom_crop: str = "auto"
) -> list[InputItem]:
    """Turn one input (path, PIL image, array, pydicom Dataset, DicomImage) into the images it stands for.

    A DICOM file or dataset gives one item per selected frame (``frame_stride`` / ``num_frames``, see
    :func:`~openus_hub.io.select_frames`), cropped with ``dicom_crop``; every other input gives one item. Errors from
    reading propagate (see :mod:`openus_hub.io`).
    """
    from pydicom.dataset import Dataset

    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: {path} (URLs are not fetched)")
        if is_dicom_file(path):
            item = dicom_dataset(path)  # read once: frame count, then frames
        else:
            image = load_image_file(path)
            return [InputItem(image, str(path), 0, _shape_of(image))]
    if isinstance(item, Dataset):
        source = str(getattr(item, "filename", None) or f"<input {index}>")
        n = number_of_frames(item, source)
        item = read_dicom(item, frames=select_frames(n, frame_stride, num_frames), crop=dicom_crop)
        item_source = source
    elif isinstance(item, DicomImage):
        keep = select_frames(len(item), frame_stride, num_frames)
        item = DicomImage(item.frames[keep], [item.frame_indices[i] for i in keep], item.metadata)
        item_source = f"<input {index}>"
    else:
        return [InputItem(item, f"<input {index}>", 0, _shape_of(item))]
    meta = item.metadata
    shape = (meta.rows, meta.columns, int(item.frames.shape[-1]))
    return [
        InputItem(DicomImage(item.frames[i : i + 1], [f], meta), item_source, int(f), shape, meta.crop_box)
        for i, f in enumerate(item.frame_indices)
    ]


__all__ = ["InputItem", "describe_image", "expand_input"]
