"""Teacher/student feature extraction on transformers models. TransKD distils, per stage, the stage output after the
stage-end LayerNorm and the patch-embedding tokens after the patch embedding's LayerNorm
(``train/models/Segformer4EmbeddingKD.py:334-374`` of RuipingL/TransKD at commit 39ab795d).

Stage features come from the backbone: SegFormer's `hidden_states` (`output_hidden_states=True`), OpenUS's
out-normed `feature_maps` (`OpenUSBackbone`, the maps its segmentation decoder reads); patch embeddings from forward
hooks on the modules that produce each stage's input tokens:

* SegFormer (transformers 5): `segformer.stages[i].patch_embeddings` (4.x: `segformer.encoder.patch_embeddings[i]`),
  output `(tokens (B, N, C), H, W)`;
* OpenUS: the stem `openus.embeddings` and the downsampling convs `openus.encoder.downsamples[i]`, channel-first
  `(B, C, H, W)` LayerNorm outputs, flattened row-major to `(B, N, C)` like SegFormer's tokens.

Any hierarchical model with `config.hidden_sizes` and one of these layouts works; other layouts can pass their
modules to `FeatureTap(model, modules=[...])`.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn


def backbone_of(model: nn.Module) -> nn.Module:
    """The bare backbone of a task model (`model.segformer`, `model.openus`), or the model itself."""
    for attr in ("segformer", "openus"):
        child = getattr(model, attr, None)
        if isinstance(child, nn.Module):
            return child
    return model


def hierarchical_channels(config) -> list[int]:
    """Per-stage widths from a model config (SegformerConfig and OpenUSConfig both expose `hidden_sizes`)."""
    sizes = getattr(config, "hidden_sizes", None)
    if not sizes:
        raise ValueError(f"{type(config).__name__} has no `hidden_sizes`: not a hierarchical backbone config")
    return [int(c) for c in sizes]


def patch_embedding_modules(model: nn.Module) -> list[nn.Module]:
    base = backbone_of(model)
    stages = getattr(base, "stages", None)
    if stages is not None and all(hasattr(stage, "patch_embeddings") for stage in stages):  # SegFormer, transformers 5
        return [stage.patch_embeddings for stage in stages]
    encoder = getattr(base, "encoder", None)
    if encoder is not None and hasattr(encoder, "patch_embeddings"):  # SegFormer, transformers 4
        return list(encoder.patch_embeddings)
    if encoder is not None and hasattr(encoder, "downsamples") and hasattr(base, "embeddings"):  # OpenUS
        return [base.embeddings, *encoder.downsamples]
    raise TypeError(f"don't know where the patch embeddings of {type(model).__name__} are; pass modules=[...]")


def _as_tokens(output) -> torch.Tensor:
    if isinstance(output, (tuple, list)):  # SegFormer: (tokens, height, width)
        output = output[0]
    if output.ndim == 4:  # channel-first map (B, C, H, W) -> (B, H*W, C), row-major
        output = output.flatten(2).transpose(1, 2)
    if output.ndim != 3:
        raise ValueError(f"patch embedding must be (B, N, C) or (B, H, W, C), got {tuple(output.shape)}")
    return output


class FeatureTap:
    """Forward hooks that record the patch-embedding tokens of one model, stage by stage.

    Use `pop()` after a forward pass to get the `(B, N_s, C_s)` tokens and clear the record. The hooks stay until
    `remove()` is called. Under gradient checkpointing a stage may run twice: the last run wins.
    """

    def __init__(self, model: nn.Module, modules: list[nn.Module] | None = None):
        self.modules = list(modules) if modules is not None else patch_embedding_modules(model)
        self._record: dict[int, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(partial(self._hook, i)) for i, m in enumerate(self.modules)]

    def _hook(self, index: int, module: nn.Module, args, output) -> None:
        self._record[index] = _as_tokens(output)

    def clear(self) -> None:
        self._record = {}

    def pop(self) -> list[torch.Tensor]:
        missing = [i for i in range(len(self.modules)) if i not in self._record]
        if missing:
            raise RuntimeError(f"patch embeddings of stages {missing} were not recorded; run a forward pass first")
        out = [self._record[i] for i in range(len(self.modules))]
        self._record = {}
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def stage_features(model: nn.Module, pixel_values: torch.Tensor, num_stages: int | None = None) -> list[torch.Tensor]:
    """Channel-first stage maps `(B, C_s, H_s, W_s)` from the backbone (decoder not run): a transformers backbone's
    `feature_maps` (OpenUS: the out-normed stage maps), else its `hidden_states` (SegFormer)."""
    out = backbone_of(model)(pixel_values, output_hidden_states=True, return_dict=True)
    maps = getattr(out, "feature_maps", None)
    hidden = list(maps) if maps is not None else list(out.hidden_states)
    return hidden[-num_stages:] if num_stages else hidden


class TeacherFeatures(nn.Module):
    """Frozen teacher: `forward(pixel_values)` -> (stage maps, patch-embedding tokens), under `no_grad`, in eval mode
    whatever `train()` is called with (the teacher's dropout and drop-path stay off, as upstream's `teacher.eval()`)."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.channels = hierarchical_channels(teacher.config)
        self.tap = FeatureTap(teacher)

    def train(self, mode: bool = True) -> "TeacherFeatures":
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        self.tap.clear()
        feats = stage_features(self.teacher, pixel_values, len(self.channels))
        return feats, self.tap.pop()
