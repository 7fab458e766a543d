"""The trainable TransKD wrapper: the student plus its KD modules (upstream ``SKF`` built by ``build_kd_trans``,
``CSF.py:133-137`` of RuipingL/TransKD at commit 39ab795d). The teacher is not part of it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .csf import CrossSelectiveFusion
from .ea import EmbeddingAssistant
from .features import FeatureTap, hierarchical_channels
from .gl_mixer import GlobalLocalMixer
from .pea import PatchEmbeddingAlignment

VARIANTS = ("base", "gl", "ea")


class TransKDModules(nn.Module):
    """CSF + PEA, plus the GL-Mixer (`variant="gl"`) or the embedding assistant (`variant="ea"`).

    `student_channels`/`teacher_channels` are the per-stage widths (from the two configs' `hidden_sizes`).
    """

    def __init__(
        self,
        student_channels: list[int],
        teacher_channels: list[int],
        variant: str = "base",
        mid_channels: int = 64,
        gl_num_heads: int = 8,
        gl_add: bool = False,
        gl_alpha_init: float = 1.0,
        gl_beta_init: float = 1.0,
        num_channels: int = 3,
        patch_sizes: tuple[int, ...] = (7, 3, 3, 3),
        strides: tuple[int, ...] = (4, 2, 2, 2),
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.csf = CrossSelectiveFusion(student_channels, teacher_channels, mid_channels)
        self.pea = PatchEmbeddingAlignment(student_channels, teacher_channels)
        self.gl_mixer = (
            GlobalLocalMixer(student_channels[-1], gl_num_heads, gl_add, gl_alpha_init, gl_beta_init)
            if variant == "gl" else None
        )
        self.ea = (
            EmbeddingAssistant(student_channels, teacher_channels, num_channels, patch_sizes, strides)
            if variant == "ea" else None
        )

    def align_embeddings(
        self, embeddings: list[torch.Tensor], pixel_values: torch.Tensor, features: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        if self.gl_mixer is not None:
            embeddings = list(embeddings[:-1]) + [self.gl_mixer(embeddings[-1])]
        aligned = self.pea(embeddings)
        if self.ea is not None:
            aligned, _ = self.ea(aligned, pixel_values, features)
        return aligned

    def forward(self, features: list[torch.Tensor], embeddings: list[torch.Tensor], pixel_values: torch.Tensor):
        """Student stage maps and tokens -> (CSF outputs, aligned embeddings), both at the teacher's widths."""
        return self.csf(features), self.align_embeddings(embeddings, pixel_values, features)


@dataclass
class DistillerOutput:
    logits: torch.Tensor  # [B, K, H/4, W/4]
    fused_features: list[torch.Tensor]  # CSF outputs, teacher widths, shallow to deep
    aligned_embeddings: list[torch.Tensor]  # PEA (+GL/EA) outputs (B, N_s, C_t)


class TransKDDistiller(nn.Module):
    """`student` (a transformers SegFormer) + `kd` (TransKDModules). Saves as `student.*` + `kd.*`; only the student
    is exported. The patch-embedding hooks live on the student's own modules."""

    def __init__(self, student: nn.Module, teacher_channels: list[int], variant: str = "base", **kd_kwargs):
        super().__init__()
        self.student = student
        cfg = student.config
        kd_kwargs.setdefault("gl_num_heads", cfg.num_attention_heads[-1])
        kd_kwargs.setdefault("num_channels", cfg.num_channels)
        kd_kwargs.setdefault("patch_sizes", tuple(cfg.patch_sizes))
        kd_kwargs.setdefault("strides", tuple(cfg.strides))
        self.kd = TransKDModules(hierarchical_channels(cfg), list(teacher_channels), variant, **kd_kwargs)
        self._tap = FeatureTap(student)

    def forward(self, pixel_values: torch.Tensor) -> DistillerOutput:
        self._tap.clear()
        out = self.student(pixel_values, output_hidden_states=True, return_dict=True)
        features = list(out.hidden_states)[-len(self.kd.pea.proj):]
        embeddings = self._tap.pop()
        fused, aligned = self.kd(features, embeddings, pixel_values)
        return DistillerOutput(out.logits, fused, aligned)
