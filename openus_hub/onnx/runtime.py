"""``ORTModel``: an exported ``.onnx`` file in an ONNX Runtime session, with the config and image processor saved beside
it, called like the PyTorch model (same output classes, so the same post-processing applies)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._deps import require

__all__ = ["ORTModel", "is_onnx_path"]


def is_onnx_path(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx")


class ORTModel:
    """An exported OpenUS / SegFormer graph in an ``onnxruntime.InferenceSession``.

    ``model(pixel_values)`` returns the transformers output class of the exported task
    (``BaseModelOutputWithPooling``, ``ImageClassifierOutput``, ``SemanticSegmenterOutput``) with float32 CPU tensors,
    so ``model.processor.post_process_semantic_segmentation(outputs, target_sizes)`` works as with the PyTorch model.
    A graph exported without ``--dynamic-batch`` is run one image at a time.
    """

    training = False

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None, session_options: Any = None):
        ort = require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.log_severity_level = 3  # errors only (fp16 graphs warn about every unfoldable node)
        self.session = ort.InferenceSession(
            str(self.path), session_options, providers=providers or ["CPUExecutionProvider"]
        )
        meta = self.session.get_modelmeta().custom_metadata_map
        if "openus_hub.task" not in meta:
            raise ValueError(f"{self.path} was not written by openus_hub's exporter (no openus_hub.task metadata); "
                             "export it with `openus-hub export-onnx`")
        self.task = meta["openus_hub.task"]
        self.model_type = meta.get("openus_hub.model_type", "")
        self.image_size = tuple(json.loads(meta["openus_hub.image_size"]))
        self.dynamic_batch = bool(json.loads(meta.get("openus_hub.dynamic_batch", "false")))
        self.precision = meta.get("openus_hub.precision", "fp32")
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.config = self._load_config()
        self.processor = self._load_processor()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> ORTModel:
        """Load ``path`` (a ``.onnx`` file, or a folder holding exactly one)."""
        path = Path(path)
        if path.is_dir():
            found = sorted(path.glob("*.onnx"))
            if len(found) != 1:
                raise FileNotFoundError(f"{path} holds {len(found)} .onnx files; name the one to load")
            path = found[0]
        return cls(path, **kwargs)

    def _load_config(self):
        from transformers import AutoConfig

        import openus_hub  # noqa: F401  (registers the openus model type)

        folder = self.path.parent
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no config.json beside {self.path} (the exporter writes it there)")
        return AutoConfig.from_pretrained(str(folder))

    def _load_processor(self):
        from transformers import AutoImageProcessor

        folder = self.path.parent
        if not (folder / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"no preprocessor_config.json beside {self.path} (the exporter writes it there)")
        kwargs = {"backend": "pil"} if self.model_type == "segformer" else {}
        return AutoImageProcessor.from_pretrained(str(folder), **kwargs)

    # -- torch.nn.Module-like surface used by extract_features / openus-hub embed
    def eval(self) -> ORTModel:
        return self

    def train(self, mode: bool = True) -> ORTModel:
        return self

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def fingerprint(self) -> str:
        """sha256 (first 16 hex digits) of the .onnx file: identifies the weights and the graph."""
        from ..pretrained import sha256_file

        return sha256_file(self.path)[:16]

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """Raw outputs by name for a float32 ``(B, 3, H, W)`` array."""
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        expected = (3, *self.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"{self.path.name} takes pixel_values of shape (batch, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}) (fixed at export), got {tuple(pixel_values.shape)}; use the processor "
                             "saved beside it")
        if self.dynamic_batch or pixel_values.shape[0] == 1:
            results = self.session.run(self.output_names, {"pixel_values": pixel_values})
        else:
            parts = [self.session.run(self.output_names, {"pixel_values": pixel_values[i : i + 1]})
                     for i in range(pixel_values.shape[0])]
            results = [np.concatenate(column) for column in zip(*parts)]
        return dict(zip(self.output_names, results))

    def __call__(self, pixel_values: Any = None, output_hidden_states: bool | None = None, **kwargs):
        from transformers.modeling_outputs import (
            BaseModelOutputWithPooling,
            ImageClassifierOutput,
            SemanticSegmenterOutput,
        )

        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.detach().float().cpu().numpy()
        out = {k: torch.from_numpy(v) for k, v in self.run(pixel_values).items()}
        if self.task == "feature-extraction":
            maps = [out[f"stage_maps.{i}"] for i in range(4) if f"stage_maps.{i}" in out]
            if output_hidden_states and not maps:
                raise ValueError(f"{self.path.name} was exported without stage maps; re-export with --stage-maps (or "
                                 "ask for pooled features only, e.g. extract_features(..., return_stage_maps=False))")
            return BaseModelOutputWithPooling(
                last_hidden_state=out["last_hidden_state"], pooler_output=out["pooler_output"],
                hidden_states=tuple(maps) if output_hidden_states else None,
            )
        if self.task == "image-classification":
            return ImageClassifierOutput(logits=out["logits"])
        return SemanticSegmenterOutput(logits=out["logits"])

    def __repr__(self) -> str:
        return (f"ORTModel({self.path.name}, task={self.task}, image_size={self.image_size[0]}x{self.image_size[1]}, "
                f"{self.precision}, dynamic_batch={self.dynamic_batch})")
