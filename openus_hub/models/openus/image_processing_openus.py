"""Image processor for OpenUS: upstream preprocessing plus explicit policies for ultrasound inputs.

Defaults reproduce upstream OpenUS evaluation preprocessing (``eval_linear.py`` val transform):
``convert('RGB')`` (grayscale replicated to 3 channels), resize to 224x224 with PIL bilinear (antialiased, as
torchvision's ``Resize`` on a PIL image), ``/ 255`` and ImageNet mean/std.

Input policies (with ``do_convert_rgb=True``, the default, every input becomes ``(3, H, W)`` float32; nothing is
silently mis-scaled):

======================  =================================================================================
input                   policy
======================  =================================================================================
PIL ``L`` / ``1``       grayscale, replicated to 3 channels (same as upstream ``convert('RGB')``)
PIL ``LA`` / ``RGBA``   alpha dropped, not composited (same as upstream ``convert('RGB')``); kept with
                        ``do_convert_rgb=False``
PIL ``P`` / ``PA``      palette applied (``convert('RGB')``; ``RGBA`` with ``do_convert_rgb=False`` when the
                        palette has transparency)
PIL ``RGB``/``CMYK``/.. ``convert('RGB')``
PIL ``I;16*``           16-bit grayscale, rescaled by ``1 / (2**16 - 1)`` (or ``input_bit_depth``)
PIL ``I``               32-bit integers; must lie in 0..65535 and are treated as 16-bit, else an error
PIL ``F``               float, taken to be in [0, 1] already (no rescaling; the range check warns otherwise)
numpy / torch           ``HxW``; ``HxWxC`` or ``CxHxW`` with C in 1..4 (2 = gray+alpha, 4 = RGBA; channel-last
                        wins when both ends could be channels; ``input_data_format`` overrides); uint8 -> 8-bit,
                        uint16 -> 16-bit, other non-negative integers <= 65535 -> 16-bit, bool/float -> [0, 1]
                        as is. Alpha (the 2nd of 2, the 4th of 4 channels) is dropped when converting to RGB
                        and kept with ``do_convert_rgb=False`` (then give as many image_mean/image_std values
                        as channels). Empty arrays and arrays with other than 2 or 3 dimensions are refused:
                        pass a cine loop as a list of frames, or as a DICOM file.
DICOM path / Dataset    decoded by :func:`openus_hub.io.read_dicom` (cropped with ``dicom_crop``); each
/ ``DicomImage``        selected frame (``frame_stride`` / ``num_frames``) becomes one image, rescaled by
                        ``BitsStored``
other file paths        opened with PIL at native bit depth (16-bit PNG/TIFF stays 16-bit)
======================  =================================================================================

Rescaling is bit-depth aware: 8-bit data uses ``rescale_factor`` (1/255), deeper integer data
``1 / (2**bits - 1)``: a 16-bit image is never divided by 255. Resizing happens before rescaling, on uint8 data for
8-bit inputs (bit-identical to upstream) and on float32 data otherwise. ``keep_aspect_ratio=True`` resizes the
longer side to fit and pads the rest with black (0), centred.

On the first call, a range check (``do_range_check``) warns once when the rescaled values leave [0, 1] (e.g. floats
in 0..255, already-normalised tensors) or when deep integer data uses a tiny part of its range (e.g. 12-bit data in
a 16-bit container: pass ``input_bit_depth=12``).

OpenUS has no torchvision-backend processor on purpose: upstream resizes with PIL, and matching it to 1e-5 needs
PIL. ``OpenUSImageProcessor`` (the backend-neutral name stored in ``preprocessor_config.json``) therefore is this
PIL implementation as well.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
)
from transformers.processing_utils import ImagesKwargs, Unpack

logger = logging.getLogger(__name__)

_ALPHA_FREE = {1: 1, 2: 1, 3: 3, 4: 3}  # channels in -> channels kept (alpha dropped)


class OpenUSImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    keep_aspect_ratio (`bool`, *optional*, defaults to `False`):
        Resize the longer side to fit `size` and pad the rest with black, centred, instead of stretching.
    input_bit_depth (`int`, *optional*):
        Significant bits of integer inputs (e.g. 12 for 12-bit data stored in uint16). Default: from the dtype
        (uint8 -> 8, 16-bit -> 16) or from DICOM `BitsStored`.
    do_range_check (`bool`, *optional*, defaults to `True`):
        Warn once, on the first batch, when rescaled inputs look wrongly scaled.
    dicom_crop (`str`, *optional*, defaults to `"auto"`):
        Crop DICOM inputs to the ultrasound region: `"auto"`, `"regions"`, `"heuristic"` or `"none"`.
    frame_stride (`int`, *optional*, defaults to 1):
        Take every n-th frame of a DICOM cine loop.
    num_frames (`int`, *optional*):
        Take this many evenly spaced frames of a DICOM cine loop (overrides `frame_stride`).
    """

    keep_aspect_ratio: bool
    input_bit_depth: int | None
    do_range_check: bool
    dicom_crop: str
    frame_stride: int
    num_frames: int | None


class OpenUSImageProcessorPil(PilBackend):
    """OpenUS preprocessing (PIL backend, no torchvision needed); see the module docstring for every input policy.

    Example:

    ```python
    >>> from openus_hub import OpenUSImageProcessor
    >>> processor = OpenUSImageProcessor()  # upstream defaults: 224x224 bilinear, ImageNet mean/std
    >>> batch = processor(pil_images_or_arrays_or_dicom_paths, return_tensors="pt")
    >>> batch["pixel_values"].shape  # (N, 3, 224, 224); a DICOM cine contributes one row per selected frame
    ```
    """

    valid_kwargs = OpenUSImageProcessorKwargs
    model_input_names = ["pixel_values"]

    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"height": 224, "width": 224}
    default_to_square = True
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    do_center_crop = False
    do_pad = False
    keep_aspect_ratio = False
    input_bit_depth = None
    do_range_check = True
    dicom_crop = "auto"
    frame_stride = 1
    num_frames = None

    def __init__(self, **kwargs: Unpack[OpenUSImageProcessorKwargs]):
        super().__init__(**kwargs)
        if self.dicom_crop not in ("auto", "regions", "heuristic", "none"):
            raise ValueError(f"dicom_crop must be 'auto', 'regions', 'heuristic' or 'none', got {self.dicom_crop!r}")
        self._range_checked = False

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_range_checked", None)
        return out

    # ------------------------------------------------------------------------------------------------- inputs
    def _expand_inputs(self, images: Any, frame_stride: int, num_frames: int | None, dicom_crop: str) -> list:
        """Flatten the input structure into a list of ``(image, bit_depth)``; each input is expanded by
        :func:`openus_hub.io.inputs.expand_input` (DICOM files and datasets become their selected frames)."""
        from openus_hub.io import DicomImage
        from openus_hub.io.inputs import expand_input

        out: list = []

        def visit(item: Any) -> None:
            if isinstance(item, (list, tuple)):
                for sub in item:
                    visit(sub)
                return
            for it in expand_input(item, frame_stride=frame_stride, num_frames=num_frames, dicom_crop=dicom_crop):
                if isinstance(it.image, DicomImage):  # one frame each, rescaled by its BitsStored
                    out.extend((frame, it.image.bit_depth) for frame in it.image.frames)
                else:
                    out.append((it.image, None))

        visit(images)
        if not out:
            raise ValueError("no images given: pass a PIL image, an array, a DICOM path/dataset, or a list of them")
        return out

    def _to_hwc(
        self,
        image: Any,
        bit_depth: int | None,
        input_data_format: str | ChannelDimension | None,
        input_bit_depth: int | None = None,
        convert_rgb: bool = True,
    ) -> tuple[np.ndarray, int | None]:
        """One input as ``(H, W, C)`` and its bit depth (None for floats in [0, 1]). With ``convert_rgb`` C is 1 or 3
        (alpha dropped, as upstream's ``convert('RGB')``); without it the channels are kept as given."""
        if isinstance(image, Image.Image):
            mode = image.mode
            if not convert_rgb and mode in ("LA", "RGB", "RGBA"):  # channels kept as they are
                arr = np.asarray(image)
                arr, bits = (arr if arr.ndim == 3 else arr[..., None]), 8
            elif not convert_rgb and mode in ("P", "PA") and (mode == "PA" or "transparency" in image.info):
                arr, bits = np.asarray(image.convert("RGBA")), 8  # palette applied, transparency kept as alpha
            elif mode in ("L",):
                arr, bits = np.asarray(image)[..., None], 8
            elif mode == "1":
                arr, bits = np.asarray(image.convert("L"))[..., None], 8
            elif mode in ("LA", "La"):
                arr, bits = np.asarray(image.convert("L"))[..., None], 8
            elif mode.startswith("I;16"):
                arr, bits = np.asarray(image).astype(np.uint16)[..., None], 16
            elif mode == "I":
                arr = np.asarray(image)
                if arr.size and (arr.min() < 0 or arr.max() > 65535):
                    raise ValueError(
                        f"PIL mode 'I' image with values {arr.min()}..{arr.max()} outside 0..65535: openus_hub reads "
                        "mode 'I' as 16-bit data; convert it to float in [0, 1] (mode 'F' or a float array) first"
                    )
                arr, bits = arr.astype(np.uint16)[..., None], 16
            elif mode == "F":
                arr, bits = np.asarray(image, dtype=np.float32)[..., None], None
            else:  # RGB, RGBA, RGBX, P, PA, CMYK, YCbCr, LAB, HSV: PIL's own conversion, as upstream
                arr, bits = np.asarray(image.convert("RGB")), 8
            if arr.size == 0:
                raise ValueError(f"empty image (size {image.size})")
            return arr, (_deep_bits(bit_depth or bits, input_bit_depth) if bits == 16 else bits)

        if hasattr(image, "detach") and hasattr(image, "cpu"):  # torch.Tensor
            image = image.detach().cpu().numpy()
        if not isinstance(image, np.ndarray):
            raise TypeError(
                f"unsupported input type {type(image).__name__}: pass PIL images, numpy arrays, torch tensors, image "
                "or DICOM file paths, pydicom Datasets, or lists of these"
            )
        arr = image
        if arr.size == 0:
            raise ValueError(f"empty array of shape {arr.shape}: nothing to process")
        if arr.ndim == 2:
            arr = arr[..., None]
        elif arr.ndim == 3:
            fmt = ChannelDimension(input_data_format) if input_data_format is not None else None
            if fmt is None:
                if arr.shape[-1] in _ALPHA_FREE:
                    fmt = ChannelDimension.LAST
                elif arr.shape[0] in _ALPHA_FREE:
                    fmt = ChannelDimension.FIRST
                else:
                    raise ValueError(
                        f"cannot tell the channel axis of an array of shape {arr.shape}: expected HxW, HxWxC or CxHxW "
                        "with C in 1..4; pass input_data_format='channels_first' or 'channels_last'"
                    )
            if fmt == ChannelDimension.FIRST:
                arr = np.moveaxis(arr, 0, -1)
            if arr.shape[-1] not in _ALPHA_FREE:
                raise ValueError(f"arrays need 1 to 4 channels, got shape {image.shape} ({fmt.value})")
        else:
            raise ValueError(
                f"expected one image as a 2-D (HxW) or 3-D (HxWxC / CxHxW) array, got {arr.ndim}-D shape {arr.shape}; "
                "pass a batch or a cine loop as a list of frames (e.g. list(frames)), or a DICOM file"
            )
        if convert_rgb:
            arr = arr[..., : _ALPHA_FREE[arr.shape[-1]]]  # drop alpha
        if arr.dtype.byteorder not in ("=", "|"):
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if arr.dtype == np.bool_:
            return arr.astype(np.float32), None
        if np.issubdtype(arr.dtype, np.floating):
            return arr.astype(np.float32), None
        if arr.dtype == np.uint8:
            return arr, 8
        if np.issubdtype(arr.dtype, np.integer):
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > 65535:
                raise ValueError(
                    f"integer array ({arr.dtype}) with values {lo}..{hi} outside 0..65535: openus_hub reads integer "
                    "images as unsigned 8/16-bit data; convert to float in [0, 1] first"
                )
            return arr.astype(np.uint16), _deep_bits(bit_depth or 16, input_bit_depth)
        raise TypeError(f"unsupported array dtype {arr.dtype}")

    # -------------------------------------------------------------------------------------------- transforms
    @staticmethod
    def _resize_hwc(arr: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
        if arr.shape[:2] == (height, width):
            return arr
        if arr.dtype == np.uint8 and arr.shape[-1] in (1, 3):  # what upstream does: PIL on the uint8 image, rounded
            img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
            out = np.asarray(img.resize((width, height), resample=resample))
            return out[..., None] if out.ndim == 2 else out
        if arr.dtype == np.uint8:  # with alpha (do_convert_rgb=False): channel by channel, as PIL resizes LA/RGBA
            # images with premultiplied alpha, which would change the colours under transparent pixels
            chans = [np.asarray(Image.fromarray(arr[..., c]).resize((width, height), resample=resample))
                     for c in range(arr.shape[-1])]
            return np.stack(chans, axis=-1)
        # deeper or float data: per-channel PIL 'F' resize (same antialiased filter, no rounding, no clipping)
        chans = [
            np.asarray(Image.fromarray(arr[..., c].astype(np.float32)).resize((width, height), resample))
            for c in range(arr.shape[-1])
        ]
        return np.stack(chans, axis=-1)

    def _resize_keep_aspect(self, arr: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
        h, w = arr.shape[:2]
        scale = min(height / h, width / w)
        nh, nw = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
        resized = self._resize_hwc(arr, nh, nw, resample)
        out = np.zeros((height, width, arr.shape[-1]), dtype=resized.dtype)
        top, left = (height - nh) // 2, (width - nw) // 2
        out[top : top + nh, left : left + nw] = resized
        return out

    def _range_check(self, values: list[np.ndarray], bit_depths: list[int | None]) -> None:
        lo = min(float(v.min()) for v in values)
        hi = max(float(v.max()) for v in values)
        if lo < -1e-3 or hi > 1 + 1e-3:
            hint = (
                "float inputs must be in [0, 1] (divide 0..255 floats by 255, or pass uint8)"
                if hi > 1
                else "inputs look already normalised; pass raw images (or set do_normalize=False and do_rescale=False)"
            )
            logger.warning("OpenUS processor: rescaled inputs span %.3g..%.3g, outside [0, 1]: %s", lo, hi, hint)
            return
        deep = [v for v, b in zip(values, bit_depths) if b is not None and b > 8]
        if deep and max(float(v.max()) for v in deep) < 1 / 16:
            logger.warning(
                "OpenUS processor: %d-bit inputs use under 1/16 of their range (max %.4f after rescaling); if the "
                "data has fewer significant bits (e.g. 12-bit in uint16), pass input_bit_depth=12",
                max(b for b in bit_depths if b is not None),
                max(float(v.max()) for v in deep),
            )

    # ------------------------------------------------------------------------------------------ entry points
    def _preprocess_image_like_inputs(self, images: Any, *args: Any, **kwargs: Any) -> BatchFeature:
        return self._openus_preprocess(images, **kwargs)

    def _openus_preprocess(
        self,
        images: Any,
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | int | None,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | Sequence[float],
        image_std: float | Sequence[float],
        do_convert_rgb: bool | None = True,
        keep_aspect_ratio: bool = False,
        input_bit_depth: int | None = None,
        do_range_check: bool = True,
        dicom_crop: str = "auto",
        frame_stride: int = 1,
        num_frames: int | None = None,
        input_data_format: str | ChannelDimension | None = None,
        return_tensors: str | None = None,
        do_center_crop: bool | None = None,
        do_pad: bool | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        if do_center_crop or do_pad:
            raise ValueError("OpenUSImageProcessor does not center-crop or pad; use keep_aspect_ratio=True instead")
        items = self._expand_inputs(images, frame_stride, num_frames, dicom_crop)
        resample = int(resample if resample is not None else PILImageResampling.BILINEAR)
        processed, depths = [], []
        for image, depth in items:
            arr, bits = self._to_hwc(image, depth, input_data_format, input_bit_depth, bool(do_convert_rgb))
            if do_resize:
                if keep_aspect_ratio:
                    arr = self._resize_keep_aspect(arr, size.height, size.width, resample)
                else:
                    arr = self._resize_hwc(arr, size.height, size.width, resample)
            if arr.shape[-1] == 1 and do_convert_rgb:
                arr = np.repeat(arr, 3, axis=-1)  # grayscale replicated, as upstream convert('RGB')
            x = arr.astype(np.float32)
            if do_rescale and bits is not None:
                x = x * np.float32(rescale_factor if bits == 8 else 1.0 / (2**bits - 1))
            processed.append(x)
            depths.append(bits)
        if do_range_check and not self._range_checked:
            self._range_checked = True
            self._range_check(processed, depths)
        out = []
        for x in processed:
            if do_normalize:
                c = x.shape[-1]
                mean, std = np.asarray(image_mean, dtype=np.float32), np.asarray(image_std, dtype=np.float32)
                if mean.size not in (1, c) or std.size not in (1, c):
                    raise ValueError(
                        f"image has {c} channel(s) but image_mean/image_std have {np.size(image_mean)}/"
                        f"{np.size(image_std)} values; keep do_convert_rgb=True for 3-channel OpenUS models"
                    )
                x = (x - mean.reshape(-1)) / std.reshape(-1)
            out.append(np.ascontiguousarray(np.moveaxis(x, -1, 0), dtype=np.float32))  # [C, H, W]
        shapes = {o.shape for o in out}
        if return_tensors is not None and len(shapes) > 1:
            raise ValueError(f"images of different sizes {sorted(shapes)} cannot be stacked; keep do_resize=True")
        return BatchFeature(data={"pixel_values": out}, tensor_type=return_tensors)


    def post_process_semantic_segmentation(
        self, outputs: Any, target_sizes: Any = None, return_segmentation_scores: bool = False
    ) -> list:
        """Class maps from segmentation logits (for ``pipeline("image-segmentation")``), with the per-class scores
        when ``return_segmentation_scores``; see ``segmentation_utils.post_process_semantic_segmentation``."""
        from .segmentation_utils import post_process_semantic_segmentation

        return post_process_semantic_segmentation(outputs, target_sizes, return_segmentation_scores)


def _deep_bits(default: int, override: int | None) -> int:
    """Bit depth of 16-bit-container data: the user's ``input_bit_depth``, else DICOM BitsStored / 16."""
    if override is None:
        return default
    if not 1 <= int(override) <= 16:
        raise ValueError(f"input_bit_depth must be between 1 and 16, got {override}")
    return int(override)


class OpenUSImageProcessor(OpenUSImageProcessorPil):
    """Backend-neutral name of the OpenUS processor (what ``preprocessor_config.json`` stores).

    It is the PIL implementation: upstream preprocessing is PIL-based and parity with it needs PIL's resize, so
    there is no separate torchvision backend.
    """


__all__ = ["OpenUSImageProcessor", "OpenUSImageProcessorKwargs", "OpenUSImageProcessorPil"]
