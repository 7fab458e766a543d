"""The ``image-feature-extraction`` pipeline for OpenUS models: it reads what the image processor reads.

``pipeline("image-feature-extraction", model=FOLDER)`` (``openus_hub.pipeline`` or ``transformers.pipeline`` once
openus_hub is imported) returns :class:`OpenUSImageFeatureExtractionPipeline` for an OpenUS model, and transformers'
own ``ImageFeatureExtractionPipeline``, untouched, for any other model. The OpenUS pipeline accepts, besides PIL
images, image paths and URLs:

* a DICOM path or a ``pydicom`` Dataset (cropped to the ultrasound region as the processor's ``dicom_crop`` says);
* a cine loop, one row per selected frame, with the processor's frame options: ``num_frames`` (evenly spaced) or
  ``frame_stride``, given to the call (``pipe(loop, num_frames=8)``) or in ``image_processor_kwargs``;
* numpy arrays and tensors, as the processor takes them.

Each input gives an array ``(F, ...)``: F = 1 for a still image, the number of selected frames for a cine loop;
``pool=True`` returns the pooled embeddings ``(F, C)``, otherwise the tokens ``(F, N, C)``. Frames are batched across
inputs with ``batch_size``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.pipelines.base import ChunkPipeline
from transformers.pipelines.image_feature_extraction import ImageFeatureExtractionPipeline

_FRAME_OPTIONS = ("num_frames", "frame_stride", "dicom_crop")


class OpenUSImageFeatureExtractionPipeline(ChunkPipeline):
    """Features of images, DICOM files and cine loops with an OpenUS model (see the module docstring)."""

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(self, image_processor_kwargs=None, return_tensors=None, pool=None, timeout=None,
                             **kwargs):
        preprocess = dict(image_processor_kwargs or {})
        for key in _FRAME_OPTIONS:
            if kwargs.get(key) is not None:
                preprocess[key] = kwargs.pop(key)
        if timeout is not None:
            preprocess["timeout"] = timeout
        postprocess = {}
        if pool is not None:
            postprocess["pool"] = pool
        if return_tensors is not None:
            postprocess["return_tensors"] = return_tensors
        return preprocess, {}, postprocess

    def preprocess(self, image, timeout=None, num_frames=None, frame_stride=None, dicom_crop=None,
                   **image_processor_kwargs):
        from .io.inputs import expand_input

        if isinstance(image, str) and image.startswith(("http://", "https://")):
            from transformers.image_utils import load_image

            image = load_image(image, timeout=timeout)
        proc = self.image_processor
        items = expand_input(
            image,
            frame_stride=frame_stride if frame_stride is not None else getattr(proc, "frame_stride", 1),
            num_frames=num_frames if num_frames is not None else getattr(proc, "num_frames", None),
            dicom_crop=dicom_crop if dicom_crop is not None else getattr(proc, "dicom_crop", "auto"),
        )
        for i, item in enumerate(items):  # one chunk per frame: frames of all inputs batch together
            # frames are selected and cropped already
            inputs = proc([item.image], return_tensors="pt", dicom_crop="none", **image_processor_kwargs)
            yield {"pixel_values": inputs["pixel_values"].to(self.dtype), "is_last": i == len(items) - 1}

    def _forward(self, model_inputs):
        is_last = model_inputs.pop("is_last")
        outputs = self.model(**model_inputs)
        return {"is_last": is_last, "last_hidden_state": outputs[0], "pooler_output": outputs.get("pooler_output")}

    def postprocess(self, all_outputs, pool=None, return_tensors=False):
        key = "pooler_output" if pool else "last_hidden_state"
        if any(out[key] is None for out in all_outputs):
            raise ValueError("No pooled output was returned. Make sure the model has a `pooler` layer when using "
                             "the `pool` option.")
        outputs = torch.cat([out[key] for out in all_outputs])  # (F, ...): one row per frame
        return outputs if return_tensors else outputs.tolist()


class ImageFeatureExtractionPipelineFactory:
    """The ``impl`` of transformers' ``image-feature-extraction`` task once openus_hub is imported: builds
    :class:`OpenUSImageFeatureExtractionPipeline` for OpenUS models and transformers' own
    ``ImageFeatureExtractionPipeline`` for every other model."""

    _load_processor = ImageFeatureExtractionPipeline._load_processor
    _load_image_processor = ImageFeatureExtractionPipeline._load_image_processor
    _load_feature_extractor = ImageFeatureExtractionPipeline._load_feature_extractor
    _load_tokenizer = ImageFeatureExtractionPipeline._load_tokenizer
    _load_video_processor = getattr(ImageFeatureExtractionPipeline, "_load_video_processor", False)

    def __new__(cls, model: Any = None, **kwargs: Any):
        is_openus = getattr(getattr(model, "config", None), "model_type", None) == "openus"
        impl = OpenUSImageFeatureExtractionPipeline if is_openus else ImageFeatureExtractionPipeline
        return impl(model=model, **kwargs)


def register() -> None:
    """Make transformers' ``image-feature-extraction`` task build the OpenUS pipeline for OpenUS models."""
    from transformers.pipelines import PIPELINE_REGISTRY

    PIPELINE_REGISTRY.supported_tasks["image-feature-extraction"]["impl"] = ImageFeatureExtractionPipelineFactory


__all__ = ["ImageFeatureExtractionPipelineFactory", "OpenUSImageFeatureExtractionPipeline", "register"]
