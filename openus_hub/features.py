"""Feature extraction with an OpenUS backbone: pooled embeddings and per-stage maps for images, DICOMs and cine loops.

```python
>>> from openus_hub import extract_features
>>> out = extract_features("path/to/openus-folder", ["scan.png", "loop.dcm"], batch_size=8)
>>> out.pooled.shape         # (N, C): one row per image / selected cine frame
>>> out.items[3].frame_index # where each row came from
```
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io.inputs import InputItem, expand_input

logger = logging.getLogger(__name__)


@dataclass(repr=False)
class FeatureOutput:
    """Result of :func:`extract_features`, rows aligned with ``items``."""

    pooled: torch.Tensor  # [N, C] pooler_output (mean of the last-stage tokens)
    stage_maps: list[torch.Tensor] | None  # one [N, C_i, H_i, W_i] per stage (config.num_stages), out-normed
    items: list[InputItem] = field(default_factory=list)

    def __repr__(self) -> str:  # one line: shapes, never values
        def desc(t: torch.Tensor) -> str:
            return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"

        maps = "None" if self.stage_maps is None else \
            f"{len(self.stage_maps)} [{', '.join(desc(m) for m in self.stage_maps)}]"
        sources = len({it.source for it in self.items})
        return (f"FeatureOutput(pooled={desc(self.pooled)}, stage_maps={maps}, items={len(self.items)} from "
                f"{sources} input(s))")


def _check_finite(item: Any, index: int) -> None:
    """An in-memory float image with NaN/Inf would become a NaN embedding row: refuse it."""
    if isinstance(item, torch.Tensor):
        bad = int((~torch.isfinite(item)).sum()) if item.is_floating_point() else 0
    elif isinstance(item, np.ndarray) and np.issubdtype(item.dtype, np.floating):
        bad = int((~np.isfinite(item)).sum())
    else:
        return
    if bad:
        total = item.numel() if isinstance(item, torch.Tensor) else item.size
        raise ValueError(f"<input {index}>: {bad:,} of {total:,} values are NaN or infinite; replace them before "
                         "extracting features")


def _resolve_model(model: Any, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The network to run: an ``.onnx`` file runs in ONNX Runtime (:class:`~openus_hub.onnx.ORTModel`); a folder /
    registry name loads as ``OpenUSBackbone`` (with the out-norms its config lists, plus the last stage's); a head
    model gives its backbone (``OpenUSModel`` or ``OpenUSBackbone``)."""
    if isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx"):  # an exported graph: ONNX Runtime
        from .onnx import ORTModel

        return ORTModel.from_pretrained(model)
    if isinstance(model, (str, os.PathLike)):
        model = load_feature_model(model, dtype)
    return getattr(model, "base_model", model)  # heads (classification, segmentation) share the OpenUS backbone


def load_feature_model(name: str | os.PathLike, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A folder / registry name / Hub id as ``OpenUSBackbone`` holding every out-norm the folder has (the stages its
    config lists, plus the last stage's): the network :func:`out_normed_stage_maps` reads."""
    from .auto import AutoBackbone
    from .models.openus.configuration_openus import OpenUSConfig
    from .pretrained import resolve

    path, _ = resolve(name)
    config = OpenUSConfig.from_pretrained(path)
    config.out_indices = sorted(set(config.out_indices) - {0} | {config.num_stages})
    return AutoBackbone.from_pretrained(path, config=config, **({"dtype": dtype} if dtype is not None else {}))


def out_normed_stage_maps(model: torch.nn.Module, hidden_states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The out-normed stage maps ``(B, C_i, H_i, W_i)``, upstream's dense features, from an OpenUS model's
    ``hidden_states`` (stem output, then the raw stage outputs); see :func:`_out_norm` for stages without a norm."""
    return [_out_norm(model, i, h) for i, h in enumerate(hidden_states[1:])]


def _out_norm(model: torch.nn.Module, stage: int, hidden_state: torch.Tensor) -> torch.Tensor:
    """Stage ``stage``'s raw map ``(B, C, H, W)`` through its out-norm. A model without that norm (``OpenUSModel``
    keeps the last stage's only) uses the norm's initial value, weight 1 and bias 0, which is where upstream
    pretraining leaves ``outnorm0..2``: its forward reads the last stage only (``dino_vmamba.py:1740-1802``), so
    they get no gradient."""
    norms = model.stage_norms
    channels_last = hidden_state.permute(0, 2, 3, 1)
    if str(stage) in norms:
        normed = norms[str(stage)](channels_last)
    else:
        width = model.config.hidden_sizes[stage]  # from the config, so an ONNX trace keeps it a constant
        normed = torch.nn.functional.layer_norm(channels_last, (width,), eps=model.config.layer_norm_eps)
    return normed.permute(0, 3, 1, 2)


def load_processor(model: Any, folder: str | os.PathLike | None = None) -> Any:
    """The image processor of a model: an ORTModel's own, else ``preprocessor_config.json`` in ``folder`` (default:
    the folder the model was loaded from), else ``OpenUSImageProcessor()`` (upstream preprocessing). The one place
    both :func:`extract_features` and ``openus-hub embed`` choose it."""
    if getattr(model, "processor", None) is not None:  # ORTModel: the processor saved beside the .onnx
        return model.processor
    from .models.openus.image_processing_openus import OpenUSImageProcessor

    name = folder if folder is not None else getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if name and Path(name, "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(str(name))
    logger.info("no preprocessor_config.json next to the model: using OpenUSImageProcessor defaults (upstream)")
    return OpenUSImageProcessor()


def batched(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.inference_mode()
def embed_items(
    model: torch.nn.Module,
    processor: Any,
    items: Sequence[InputItem],
    *,
    batch_size: int = 8,
    return_stage_maps: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Run already-expanded items through processor + model in batches on the model's device; CPU float32 out."""
    param = next(model.parameters()) if hasattr(model, "parameters") else None  # no parameters: an ORTModel
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    num_stages = model.config.num_stages
    pooled, maps = [], [[] for _ in range(num_stages)] if return_stage_maps else None
    for batch in batched(list(items), batch_size):
        # cropping and frame selection already happened in expand_input
        pixel_values = processor([it.image for it in batch], return_tensors="pt", dicom_crop="none")["pixel_values"]
        pixel_values = pixel_values.to(device=device, dtype=dtype)
        has_pooler = not hasattr(model, "out_features")  # OpenUSModel, ORTModel; OpenUSBackbone has feature maps only
        out = model(pixel_values=pixel_values, output_hidden_states=return_stage_maps or not has_pooler)
        if param is None and return_stage_maps:  # an ONNX export returns the out-normed stage maps themselves
            stage_maps = list(out.hidden_states)
        elif return_stage_maps or not has_pooler:  # raw stage outputs -> out-normed stage maps
            stage_maps = out_normed_stage_maps(model, out.hidden_states)
        pooled.append((out.pooler_output if has_pooler else stage_maps[-1].mean(dim=(2, 3))).float().cpu())
        if maps is not None:
            for i, m in enumerate(stage_maps):
                maps[i].append(m.float().cpu())
    if not pooled:
        raise ValueError("no inputs to embed")
    return torch.cat(pooled), ([torch.cat(m) for m in maps] if maps is not None else None)


def extract_features(
    model: torch.nn.Module | str | os.PathLike,
    inputs: Any,
    processor: Any | None = None,
    *,
    batch_size: int = 8,
    return_stage_maps: bool = True,
    frame_stride: int = 1,
    num_frames: int | None = None,
    dicom_crop: str | None = None,
) -> FeatureOutput:
    """Pooled embeddings and per-stage feature maps of images, DICOM files and cine loops.

    Args:
        model: an ``OpenUSModel`` / ``OpenUSBackbone`` (or any OpenUS head model: its backbone is used), a folder /
            registry name / Hub id, loaded as ``OpenUSBackbone`` with every out-norm the folder holds, or an exported
            feature-extraction ``.onnx`` file / :class:`~openus_hub.onnx.ORTModel` (run in ONNX Runtime; stage maps
            need an export with ``stage_maps=True``). Inputs go to the model's device and dtype; outputs come back as
            float32 on CPU.
        inputs: one input or a list: PIL images, numpy arrays / tensors (HxW, HxWxC, CxHxW), image or DICOM file
            paths, pydicom Datasets, or :class:`~openus_hub.io.DicomImage`. A cine loop contributes one row per
            selected frame.
        processor: the image processor; default: the model folder's ``preprocessor_config.json`` if there is one,
            else ``OpenUSImageProcessor()`` (upstream preprocessing).
        batch_size: images per forward pass.
        return_stage_maps: also return the out-normed stage maps ``(N, C_i, H_i, W_i)``, one per stage of the
            model's config (memory: stage 1 is 56x56 per image at 224). A stage whose out-norm the model does not
            hold (``OpenUSModel`` keeps the last only) is normalised with that norm's initial weight 1 / bias 0,
            where upstream pretraining leaves it.
        frame_stride / num_frames: cine frame sampling (see :func:`openus_hub.io.select_frames`).
        dicom_crop: ``"auto"`` / ``"regions"`` / ``"heuristic"`` / ``"none"``; default: the processor's ``dicom_crop``.

    Returns:
        :class:`FeatureOutput` with ``pooled`` (N, C), ``stage_maps`` and ``items`` (source, frame index, shape,
        crop box per row).
    """
    base = _resolve_model(model)
    processor = processor if processor is not None else load_processor(base)
    crop = dicom_crop if dicom_crop is not None else getattr(processor, "dicom_crop", "auto")
    if not isinstance(inputs, (list, tuple)):
        inputs = [inputs]
    items: list[InputItem] = []
    for i, inp in enumerate(inputs):
        _check_finite(inp, i)
        items.extend(expand_input(inp, i, frame_stride=frame_stride, num_frames=num_frames, dicom_crop=crop))
    was_training = base.training
    base.eval()
    try:
        pooled, maps = embed_items(base, processor, items, batch_size=batch_size, return_stage_maps=return_stage_maps)
    finally:
        base.train(was_training)
    return FeatureOutput(pooled=pooled, stage_maps=maps, items=items)


__all__ = ["FeatureOutput", "InputItem", "embed_items", "expand_input", "extract_features"]
