"""Stock transformers SegFormer students, built from scratch as TransKD's (``train/models/Segformer.py`` of
RuipingL/TransKD at commit 39ab795d: its init, LayerNorm eps and decode-head dropout)."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import SegformerConfig, SegformerForSemanticSegmentation

# MiT sizes (Segformer.py:445-468); heads 1/2/5/8 and sr 8/4/2/1 everywhere.
MIT_PRESETS: dict[str, dict] = {
    "b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768},
}


def segformer_config(preset: str | None = None, **overrides) -> SegformerConfig:
    """SegformerConfig for a MiT preset (or fully from `overrides`) with upstream's defaults: patch sizes 7/3/3/3,
    strides 4/2/2/2, MLP ratio 4, GELU, drop path 0.1, classifier dropout 0.1, 20 labels (Segformer.py:218-297)."""
    kwargs = dict(
        num_attention_heads=[1, 2, 5, 8], sr_ratios=[8, 4, 2, 1], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2],
        mlp_ratios=[4, 4, 4, 4], hidden_act="gelu", drop_path_rate=0.1, classifier_dropout_prob=0.1,
        layer_norm_eps=1e-6,
    )
    if preset is not None:
        kwargs.update(MIT_PRESETS[preset])
    kwargs.update(overrides)
    return SegformerConfig(**kwargs)


@torch.no_grad()
def init_segformer_like_upstream(model: SegformerForSemanticSegmentation) -> None:
    """SegFormer's original init (Segformer.py:273: applied before the decoder is built), replacing transformers'
    N(0, 0.02) everywhere.

    Encoder: Linear trunc_normal(std .02, bounds +-2), bias 0; LayerNorm 1/0; Conv normal(0, sqrt(2/fan_out)),
    fan_out = kh*kw*out/groups, bias 0. Decoder (built after upstream's `apply`, so it keeps other inits): the
    per-stage Linears and the classifier PyTorch's defaults, `linear_fuse` kaiming_normal(fan_out, relu) (mmcv
    ConvModule), BatchNorm 1/0.
    """
    for module in model.segformer.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    head = model.decode_head
    for proj in head.linear_projections:
        proj.proj.reset_parameters()
    nn.init.kaiming_normal_(head.linear_fuse.weight, mode="fan_out", nonlinearity="relu")
    head.batch_norm.reset_parameters()
    head.classifier.reset_parameters()


def apply_upstream_numerics(model: SegformerForSemanticSegmentation, layer_norm_eps: bool = True,
                            dropout2d: bool = True) -> None:
    """Upstream numerics: TransKD's block and stage-end LayerNorms use eps 1e-6 (Segformer.py:449, 467) and its decode
    head ``Dropout2d`` (Segformer.py:292-295); transformers builds every LayerNorm with eps 1e-5 and uses element-wise
    Dropout in the head.
    `layer_norm_eps` sets eps 1e-6 on the block and stage-end LayerNorms (patch-embed and sr norms keep 1e-5);
    `dropout2d` swaps the head dropout for channel-wise Dropout2d(p). Neither is stored in a stock SegFormer config:
    an exported student runs with transformers' eps 1e-5 (logits move by ~1e-5 on a random B0) and inference ignores
    dropout."""
    if layer_norm_eps:
        for stage in model.segformer.stages:
            stage.layer_norm.eps = 1e-6
            for block in stage.blocks:
                block.layernorm_before.eps = 1e-6
                block.layernorm_after.eps = 1e-6
    if dropout2d:
        model.decode_head.dropout = nn.Dropout2d(model.config.classifier_dropout_prob)


def build_student(config: SegformerConfig, init: str = "upstream", upstream_layer_norm_eps: bool = True,
                  dropout2d: bool = True) -> SegformerForSemanticSegmentation:
    """A from-scratch student. `init="upstream"`: SegFormer's own init; `"transformers"`: keep HF's N(0, 0.02)."""
    model = SegformerForSemanticSegmentation(config)
    if init == "upstream":
        init_segformer_like_upstream(model)
    elif init != "transformers":
        raise ValueError(f"student init must be 'upstream' or 'transformers', got {init!r}")
    apply_upstream_numerics(model, upstream_layer_norm_eps, dropout2d)
    return model
