"""Post-processing of OpenUS segmentation outputs, for the image processor (``pipeline("image-segmentation")``).

The image processor exposes :func:`post_process_semantic_segmentation` as its method of the same name; it is kept
here, free of any processor state, so the model side can be tested without the processor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput

__all__ = ["post_process_semantic_segmentation"]


def post_process_semantic_segmentation(
    outputs,
    target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    return_segmentation_scores: bool = False,
) -> list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]:
    """Turn segmentation logits into one class map per image (transformers 5's post-processing API).

    Args:
        outputs: a ``SemanticSegmenterOutput`` (or anything with ``.logits``), or the logits themselves, shaped
            ``(batch, num_labels, height, width)``.
        target_sizes: one ``(height, width)`` per image (a list, or a ``(batch, 2)`` tensor), e.g. the original
            image sizes; each image's logits are resized to it (bilinear, ``align_corners=False``) before the
            argmax. ``None`` keeps the logits' resolution.
        return_segmentation_scores: also return each image's (resized) logits, ``(num_labels, height, width)``.

    Returns:
        ``batch`` long tensors ``(height, width)`` of class indices; with ``return_segmentation_scores``, ``batch``
        ``SemanticSegmentationPostProcessorOutput`` with ``segmentation`` (those maps) and ``segmentation_scores``.
        With a single output channel (``num_labels == 1``) a pixel is class 1 where its logit is > 0, else 0.
    """
    logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
    if logits.ndim != 4:
        raise ValueError(f"expected logits of shape (batch, num_labels, height, width), got {tuple(logits.shape)}")
    if target_sizes is not None:
        if len(target_sizes) != logits.shape[0]:
            raise ValueError(f"got {len(target_sizes)} target_sizes for a batch of {logits.shape[0]} logits")
        sizes = [tuple(int(v) for v in size) for size in target_sizes]
        if any(len(size) != 2 or min(size) < 1 for size in sizes):
            raise ValueError(f"each target size must be (height, width) with positive sides, got {sizes}")
    else:
        sizes = [tuple(logits.shape[-2:])] * logits.shape[0]

    results = []
    for image_logits, size in zip(logits, sizes):  # [K, h, w]
        if tuple(image_logits.shape[-2:]) != size:
            image_logits = F.interpolate(image_logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        if image_logits.shape[0] == 1:
            segmentation = (image_logits[0] > 0).long()  # [H, W]
        else:
            segmentation = image_logits.argmax(dim=0)  # [H, W]
        if return_segmentation_scores:
            results.append(SemanticSegmentationPostProcessorOutput(
                data={"segmentation": segmentation, "segmentation_scores": image_logits}))
        else:
            results.append(segmentation)
    return results
