"""PyTorch OpenUS: VMamba with SS2D cross-scan (OpenUS, arXiv 2511.11510; VMamba, arXiv 2401.10166).

Read top-down: embeddings, the SS2D mixer, the VSS layer, stage and encoder, the pretrained-model base, then the
models (`OpenUSModel`, `OpenUSForImageClassification`, `OpenUSBackbone`) and the segmentation head with
`OpenUSForSemanticSegmentation`.

Layout: between modules (embeddings -> stage -> downsample -> stage ...) a feature map is channel-first
``(B, C, H, W)``, as transformers' hidden states are; its memory is channel-last. Inside a module the network runs on
the channel-last view ``(B, H, W, C)``: LayerNorms and linear layers act on the last dimension and the convolutions
see a channels-last tensor, so switching views never copies.

Upstream references are to XZheng0427/OpenUS at commit 6b9f6d2e (`vmamba_models/dino_vmamba.py`,
`vmamba_models/MambaDecoder.py`).
"""

from __future__ import annotations

import copy
import math
import os
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutput,
    BaseModelOutputWithPooling,
    ImageClassifierOutputWithNoAttention,
    SemanticSegmenterOutput,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, logging
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from openus_hub.ops.ss2d import cross_selective_scan, ss2d_attention_map

from .configuration_openus import OpenUSConfig

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def check_pixel_values(pixel_values: torch.Tensor, num_channels: int, output_stride: int) -> None:
    """One-line errors for inputs the network cannot take: wrong channel count, sides not multiples of the stride."""
    if pixel_values.ndim != 4 or pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"pixel_values must be (batch, {num_channels}, height, width), got {tuple(pixel_values.shape)}; "
            f"replicate grayscale images to {num_channels} channels (the OpenUS image processor does this)"
        )
    height, width = pixel_values.shape[-2:]
    if height % output_stride or width % output_stride:
        fit = [max(output_stride, round(side / output_stride) * output_stride) for side in (height, width)]
        raise ValueError(
            f"OpenUS needs input sides that are multiples of {output_stride}, got {height}x{width}; resize or pad "
            f"the image (e.g. to {fit[0]}x{fit[1]})"
        )


def conv_channels_last(conv: nn.Conv2d, hidden_states: torch.Tensor) -> torch.Tensor:
    """Apply a Conv2d to a channel-last tensor: (B, H, W, C) -> (B, H', W', C').

    The conv sees a channels-last view. For such inputs oneDNN re-lays-out the weight on every call, so when the
    weight is larger than the activation (the downsampling convs of late stages) the activation is copied to NCHW
    instead, which is cheaper; both give the same result.
    """
    hidden_states = hidden_states.permute(0, 3, 1, 2)
    if not torch.compiler.is_compiling() and conv.weight.numel() > hidden_states.numel():
        hidden_states = hidden_states.contiguous()
    return conv(hidden_states).permute(0, 2, 3, 1)


def _tracing() -> bool:
    """True while torch.compile / torch.export (dynamo) or TorchScript (the ONNX exporter) trace the model."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def _bilinear_channels_last(hidden_states: torch.Tensor, size=None, scale_factor=None) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of a channel-last tensor (B, H, W, C)."""
    hidden_states = F.interpolate(
        hidden_states.permute(0, 3, 1, 2), size=size, scale_factor=scale_factor, mode="bilinear", align_corners=False
    )
    return hidden_states.permute(0, 2, 3, 1)


def trunc_normal_init_(tensor: torch.Tensor, std: float, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    """``trunc_normal_(tensor, std=std, a=a, b=b)`` (mean 0; timm's and upstream's linear init, with absolute bounds).

    When both bounds lie 10 or more standard deviations out, no sample can reach them: torch's normal generators
    (Box-Muller on CPU and CUDA) produce at most about 8.6 standard deviations from a double-precision uniform. There
    torch's rejection loop never redraws, so a plain ``normal_`` gives the same values from the same random stream,
    without the loop's comparisons and reductions over every weight (a tenth of a 50M-parameter model's construction
    time on a loaded 2-core machine). Tensors loaded from a checkpoint are left alone, as by transformers' ``init``.
    """
    if min(-a, b) >= 10.0 * std:
        return init.normal_(tensor, mean=0.0, std=std)
    return init.trunc_normal_(tensor, std=std, a=a, b=b)


def _drop_path_rates(rate: float, count: int) -> list[float]:
    """Stochastic depth rising linearly from 0 to ``rate`` over ``count`` blocks (computed on the CPU, so models can
    also be built on the meta device)."""
    return torch.linspace(0, rate, count, device="cpu").tolist()


class OpenUSDropPath(nn.Module):
    """Stochastic depth per sample (timm's DropPath): identity when ``drop_prob`` is 0 or outside training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep = 1.0 - self.drop_prob
        mask = hidden_states.new_empty((hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)).bernoulli_(keep)
        return hidden_states * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


# ---------------------------------------------------------------------------------------------------------------------
# Embeddings, mixer, layer, stage, encoder


class OpenUSEmbeddings(nn.Module):
    """Stem ("v2", `dino_vmamba.py:879-893`): two 3x3 stride-2 convs with LayerNorms and GELU,
    (B, 3, H, W) -> (B, C, H/4, W/4), and the masked-image-modelling token of pretraining."""

    def __init__(self, config: OpenUSConfig):
        super().__init__()
        dim = config.embed_dim
        self.conv1 = nn.Conv2d(config.num_channels, dim // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = nn.LayerNorm(dim // 2, eps=config.layer_norm_eps)
        self.act = ACT2FN[config.hidden_act]
        self.conv2 = nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        # upstream `masked_embed` (dino_vmamba.py:1665, 1825-1833): written over masked 32x32 cells before stage 1
        self.mask_token = nn.Parameter(torch.zeros(1, dim)) if config.use_mask_token else None
        self.num_channels = config.num_channels
        self.output_stride = config.output_stride

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        check_pixel_values(pixel_values, self.num_channels, self.output_stride)
        pixel_values = pixel_values.to(self.conv1.weight.dtype)
        embeddings = self.conv1(pixel_values).permute(0, 2, 3, 1)  # [B, H/2, W/2, C/2]
        embeddings = self.act(self.norm1(embeddings))
        embeddings = self.norm2(conv_channels_last(self.conv2, embeddings))  # [B, H/4, W/4, C]
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos needs a model built with config.use_mask_token=True")
            scale = self.output_stride // 4  # one mask cell covers scale x scale stem tokens
            expected = (embeddings.shape[0], embeddings.shape[1] // scale, embeddings.shape[2] // scale)
            if tuple(bool_masked_pos.shape) != expected:
                raise ValueError(f"bool_masked_pos must have shape {expected} (one cell per 32x32 pixels), got "
                                 f"{tuple(bool_masked_pos.shape)}")
            mask = bool_masked_pos.repeat_interleave(scale, 1).repeat_interleave(scale, 2)[..., None]
            embeddings = torch.where(mask, self.mask_token.to(embeddings.dtype), embeddings)
        return embeddings.permute(0, 3, 1, 2)  # [B, C, H/4, W/4]


class OpenUSMixer(nn.Module):
    """SS2D ("v05_noz", `dino_vmamba.py:297-580`): in_proj -> depth-wise conv -> activation -> 4-direction selective
    scan -> LayerNorm -> out_proj, channel-last. The backbone builds it from its config (`for_stage`); the
    segmentation decoder, whose SS2D has other sizes (d_state 4, GELU, conv bias), passes them explicitly."""

    num_directions = 4

    def __init__(
        self,
        config: OpenUSConfig,
        dim: int,
        inner: int,
        rank: int,
        d_state: int,
        d_conv: int = 3,
        conv_bias: bool = False,
        act: str = "silu",
    ):
        super().__init__()
        state, k = d_state, self.num_directions
        self.config = config
        self.in_proj = nn.Linear(dim, inner, bias=False)
        self.conv2d = nn.Conv2d(inner, inner, d_conv, padding=d_conv // 2, groups=inner, bias=conv_bias)
        self.act = ACT2FN[act]
        # per-direction parameters stacked along a leading axis of 4, in upstream's layouts (dino_vmamba.py:287-293,
        # 380-385), so checkpoints load without reshaping
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * state, inner))  # [K, R+2N, D]
        self.dt_proj_weight = nn.Parameter(torch.empty(k, inner, rank))  # [K, D, R]
        self.dt_proj_bias = nn.Parameter(torch.empty(k, inner))  # [K, D]
        self.A_log = nn.Parameter(torch.empty(k * inner, state))  # [K*D, N]
        self.D = nn.Parameter(torch.empty(k * inner))  # [K*D]
        self.out_norm = nn.LayerNorm(inner, eps=config.layer_norm_eps)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        # Mamba "v0" values right away, so that a mixer built on its own (the segmentation decoder's) works; the model's
        # `_init_weights` sets them again. Drawing them here also keeps the random stream, and so every seeded model,
        # as it was.
        self.reset_scan_parameters()

    @classmethod
    def for_stage(cls, config: OpenUSConfig, stage: int) -> OpenUSMixer:
        return cls(config, config.hidden_sizes[stage], config.inner_sizes[stage], config.dt_ranks[stage],
                   config.d_state, config.d_conv, config.conv_bias, config.ssm_act)

    @torch.no_grad()
    def reset_scan_parameters(self) -> None:
        """Mamba "v0" initialisation (`mamba_init`, dino_vmamba.py:227-294): nn.Linear default for x_proj,
        U(+-R^-0.5) for dt_proj, dt bias = inverse softplus of a log-uniform dt in [dt_min, dt_max] (floored at
        dt_init_floor), A = -(1..N), D = 1."""
        cfg = self.config
        k, inner, rank = self.dt_proj_weight.shape
        state = self.A_log.shape[1]
        bound = 1.0 / math.sqrt(inner)  # nn.Linear(D, R+2N) default init, per direction
        init.uniform_(self.x_proj_weight, -bound, bound)
        init.uniform_(self.dt_proj_weight, -(rank**-0.5), rank**-0.5)
        dt = torch.exp(torch.rand(k, inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        init.copy_(self.dt_proj_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        init.copy_(self.A_log, torch.log(torch.arange(1, state + 1, dtype=torch.float32)).expand(k * inner, state))
        init.ones_(self.D)

    def _scan_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act(conv_channels_last(self.conv2d, self.in_proj(hidden_states)))  # [B, H, W, D]

    @torch.no_grad()
    def attention_map(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Implicit ("CwBw") attention of this SS2D's four scans for its input ``hidden_states (B, H, W, C)``,
        summed in row-major order: (B, L, L). Upstream computes it for the last block (dino_vmamba.py:1767-1777,
        `analyze/utils.py:363-447`); see `openus_hub.ops.ss2d.ss2d_attention_map`."""
        u = self._scan_input(hidden_states)
        return ss2d_attention_map(u, self.x_proj_weight, self.dt_proj_weight, self.dt_proj_bias, self.A_log)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        u = self._scan_input(hidden_states)  # [B, H, W, D]
        if u.device.type == "meta":  # meta tensors hold no values: the scan's output is its shape and dtype
            y = u.new_empty(u.shape, dtype=torch.float32)
        else:
            y = cross_selective_scan(
                u, self.x_proj_weight, self.dt_proj_weight, self.dt_proj_bias, self.A_log, self.D,
                implementation=self.config.scan_implementation,
            )  # [B, H, W, D] float32
        y = self.out_norm(y.to(hidden_states.dtype))
        return self.out_proj(y)  # [B, H, W, C]


class OpenUSMLP(nn.Module):
    """fc1 -> activation -> fc2 over the last (channel) dimension, position by position.

    On a CPU, in eager runs, more than ``cpu_chunk_rows`` positions (large maps, large batches) go through in chunks of
    at most that many: the hidden activation (4x the width) then stays in the processor's cache instead of streaming
    through memory and back three times. Same result (position-wise); the first stage's MLP of openus-small measured
    1.7x faster at batch 1 and 8 (1 thread, 2-core CPU), chunks of 1024 to 2048 rows alike. The larger size keeps the
    number of parallel regions, each a chance to wait for a busy core, low. Never while torch.compile, torch.export or
    the TorchScript-based ONNX exporter trace the model (their graphs must not depend on the number of positions;
    inductor fuses the MLP anyway), nor on other devices.
    """

    cpu_chunk_rows = 2048

    def __init__(self, config: OpenUSConfig, stage: int):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_sizes[stage], config.mlp_sizes[stage])
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.mlp_sizes[stage], config.hidden_sizes[stage])

    def _mlp(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [..., C]
        if _tracing() or hidden_states.device.type != "cpu":
            return self._mlp(hidden_states)
        rows = hidden_states.numel() // hidden_states.shape[-1]
        if rows <= self.cpu_chunk_rows:
            return self._mlp(hidden_states)
        flat = hidden_states.reshape(rows, -1)  # [positions, C]
        chunks = flat.chunk(-(-rows // self.cpu_chunk_rows))
        return torch.cat([self._mlp(chunk) for chunk in chunks]).view(hidden_states.shape)


class OpenUSLayer(GradientCheckpointingLayer):
    """VSS block, pre-norm (`VSSBlock`, dino_vmamba.py:631-717): x + DropPath(SS2D(LN(x))), then
    x + DropPath(MLP(LN(x))). Channel-last in and out."""

    def __init__(self, config: OpenUSConfig, stage: int, drop_path_rate: float):
        super().__init__()
        dim = config.hidden_sizes[stage]
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mixer = OpenUSMixer.for_stage(config, stage)
        self.drop_path = OpenUSDropPath(drop_path_rate)
        if config.mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
            self.mlp = OpenUSMLP(config, stage)
        else:
            self.norm2 = self.mlp = None

    def attention_map(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The implicit attention map of this block's SS2D for the block input ``hidden_states (B, H, W, C)``."""
        return self.mixer.attention_map(self.norm(hidden_states))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        hidden_states = hidden_states + self.drop_path(self.mixer(self.norm(hidden_states)))
        if self.mlp is not None:
            hidden_states = hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))
        return hidden_states


class OpenUSDownsample(nn.Module):
    """"v3" downsampling between stages: 3x3 stride-2 conv C -> 2C, then LayerNorm. Channel-first in and out."""

    def __init__(self, config: OpenUSConfig, stage: int):
        super().__init__()
        dim = config.hidden_sizes[stage]
        self.conv = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(2 * dim, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        hidden_states = self.norm(conv_channels_last(self.conv, hidden_states.permute(0, 2, 3, 1)))
        return hidden_states.permute(0, 3, 1, 2)  # [B, 2C, H/2, W/2]


class OpenUSStage(nn.Module):
    """The VSS blocks of one stage. Returns the stage output (channel-first) and, with ``output_attentions``, the
    implicit attention map of its last block, computed from that block's input (upstream's `return_attn` read-out)."""

    def __init__(self, config: OpenUSConfig, stage: int, drop_path_rates: list[float]):
        super().__init__()
        self.layers = nn.ModuleList(OpenUSLayer(config, stage, rate) for rate in drop_path_rates)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden_states = hidden_states.permute(0, 2, 3, 1)  # [B, H, W, C]
        attention = None
        for index, layer in enumerate(self.layers):
            if output_attentions and index == len(self.layers) - 1:
                attention = layer.attention_map(hidden_states)  # [B, H*W, H*W]
            hidden_states = layer(hidden_states)
        return hidden_states.permute(0, 3, 1, 2), attention  # [B, C, H, W]


class OpenUSPreTrainedModel(PreTrainedModel):
    config: OpenUSConfig
    config_class = OpenUSConfig
    base_model_prefix = "openus"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["OpenUSLayer", "OpenUSDownsample"]
    # the first layer the pixels reach (embeddings.conv1): `get_input_embeddings`, which `enable_input_require_grads`
    # hooks so that gradient checkpointing works with a frozen stem (PEFT)
    _input_embed_layer = "conv1"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Upstream initialisation (dino_vmamba.py:850-857): trunc_normal(0.02) linears with zero bias, LayerNorm
        (1, 0), PyTorch default convs, Mamba "v0" for the scan parameters, zero mask token."""
        if isinstance(module, nn.Linear):
            trunc_normal_init_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))  # nn.Conv2d.reset_parameters
            if module.bias is not None:
                fan_in = module.weight.shape[1] * module.weight[0, 0].numel()
                bound = 1 / math.sqrt(fan_in)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, OpenUSMixer):
            module.reset_scan_parameters()
        elif isinstance(module, OpenUSEmbeddings) and module.mask_token is not None:
            init.zeros_(module.mask_token)

    def _build_stage_norms(self, stages: list[int]) -> nn.ModuleDict:
        """Upstream's per-stage out-norms (`outnorm{i}`, dino_vmamba.py:1740-1765) for ``stages``, keyed by stage index.
        Every model keeps the same keys (`stage_norms.<i>`) for the norms it uses, so any saved folder loads into any
        head; the norms a model does not use are neither built nor reported when a checkpoint has them."""
        config = self.config
        unused = sorted(set(range(config.num_stages)) - set(stages))
        if unused:
            self._keys_to_ignore_on_load_unexpected = [rf"(^|\.)stage_norms\.({'|'.join(map(str, unused))})\."]
        return nn.ModuleDict(
            {str(i): nn.LayerNorm(config.hidden_sizes[i], eps=config.layer_norm_eps) for i in sorted(stages)}
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        if self._auto_class is not None and os.path.isdir(save_directory):
            _vendor_ops_for_remote_code(save_directory)


def _vendor_ops_for_remote_code(folder: str) -> None:
    """Make a saved folder's remote code self-contained: copy every ``openus_hub/ops`` module beside the modeling file
    (``openus_hub.ops.build.vendor_ops``, which also lets the copies find the CPU kernel built by openus_hub) and turn
    ``from openus_hub.ops.x import`` into ``from .x import`` (modeling and configuration files), so
    `trust_remote_code=True` works without openus_hub."""
    try:
        from openus_hub.ops.build import vendor_ops
    except ImportError:  # already running as remote code: transformers copied the ops files with this one
        vendor_ops = None
    if vendor_ops is not None:
        vendor_ops(folder)
    for code_file in (os.path.basename(__file__), "configuration_openus.py"):
        path = os.path.join(folder, code_file)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            source = f.read()
        source = re.sub(r"^from openus_hub\.ops\.(\w+) import", r"from .\1 import", source, flags=re.MULTILINE)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(source)
        os.replace(path + ".tmp", path)


class OpenUSEncoder(OpenUSPreTrainedModel):
    """The stages, with a downsampling between them. Each stage's output is taken *before* its downsampling, as
    upstream (dino_vmamba.py:1740-1765). ``hidden_states`` (recorded by transformers' output capturing) are the stem
    output followed by the raw stage outputs, channel-first; ``attentions`` hold the last block's implicit attention
    map when ``output_attentions`` is set."""

    main_input_name = "hidden_states"
    _can_record_outputs = {
        "hidden_states": OutputRecorder(OpenUSStage, index=0),
        "attentions": OutputRecorder(OpenUSStage, index=1),
    }

    def __init__(self, config: OpenUSConfig):
        super().__init__(config)
        rates = _drop_path_rates(config.drop_path_rate, sum(config.depths))
        starts = [sum(config.depths[:i]) for i in range(config.num_stages)]
        self.stages = nn.ModuleList(
            OpenUSStage(config, i, rates[s : s + d]) for i, (s, d) in enumerate(zip(starts, config.depths))
        )
        self.downsamples = nn.ModuleList(OpenUSDownsample(config, i) for i in range(config.num_stages - 1))
        self.post_init()

    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BaseModelOutput:
        output_attentions = bool(kwargs.get("output_attentions", self.config.output_attentions))
        last = len(self.stages) - 1
        for index, stage in enumerate(self.stages):
            hidden_states, _ = stage(hidden_states, output_attentions=output_attentions and index == last)
            if index < last:
                hidden_states = self.downsamples[index](hidden_states)
        return BaseModelOutput(last_hidden_state=hidden_states)  # the last stage's raw output, [B, C, H, W]


# ---------------------------------------------------------------------------------------------------------------------
# Models


@auto_docstring
class OpenUSModel(OpenUSPreTrainedModel):
    r"""
    OpenUS backbone with upstream's feature contract (dino_vmamba.py:1740-1765): the last stage's out-normed tokens.
    Only the last stage's out-norm is part of this model; `OpenUSBackbone` holds the others.
    """

    def __init__(self, config: OpenUSConfig):
        super().__init__(config)
        self.embeddings = OpenUSEmbeddings(config)
        self.encoder = OpenUSEncoder(config)
        self.stage_norms = self._build_stage_norms([config.num_stages - 1])
        self.post_init()

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Input images; both sides must be multiples of `config.output_stride` (32).
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, height / 32, width / 32)`, *optional*):
            Cells whose stage-1 features are replaced by the mask token (needs `config.use_mask_token`), as in OpenUS
            pretraining.

        Returns:
            `last_hidden_state` `(batch, 1 + H*W, C)`: the last stage's out-normed tokens (row-major) with their mean
            first, upstream's `x_out`; `pooler_output` `(batch, C)`: that mean; `hidden_states` (with
            `output_hidden_states`): the stem output and the raw (un-normed) output of each stage, `(batch, C_i,
            H_i, W_i)`; `attentions` (with `output_attentions`): one `(batch, L, L)` map, the implicit attention of
            the last block over the last stage's `L` positions in row-major order, the four scan directions' "CwBw"
            attention summed and *not* normalised (upstream min-max normalises it over the whole batch before use:
            `openus_hub.ops.minmax_normalize`).

        Example:

        ```python
        >>> import torch
        >>> from openus_hub import OpenUSConfig, OpenUSModel

        >>> model = OpenUSModel(OpenUSConfig.from_preset("openus-tiny")).eval()
        >>> outputs = model(torch.randn(1, 3, 224, 224))
        >>> outputs.last_hidden_state.shape, outputs.pooler_output.shape
        (torch.Size([1, 50, 768]), torch.Size([1, 768]))
        ```"""
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        embedding_output = self.embeddings(pixel_values, bool_masked_pos)  # [B, C, H/4, W/4]
        encoder_outputs = self.encoder(embedding_output, return_dict=True, **kwargs)
        last_stage = encoder_outputs.last_hidden_state.permute(0, 2, 3, 1)  # [B, h, w, C]
        tokens = self.stage_norms[str(self.config.num_stages - 1)](last_stage).flatten(1, 2)  # [B, h*w, C] row-major
        pooled = tokens.mean(dim=1)  # [B, C]
        return BaseModelOutputWithPooling(
            last_hidden_state=torch.cat([pooled[:, None], tokens], dim=1),  # [B, 1+h*w, C]
            pooler_output=pooled,
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
        )


@auto_docstring(
    custom_intro="""
    OpenUS with a linear classifier on the pooled (mean) last-stage feature, as upstream's linear probe
    (`eval_linear.py`).
    """
)
class OpenUSForImageClassification(OpenUSPreTrainedModel):
    accepts_loss_kwargs = False

    def __init__(self, config: OpenUSConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.openus = OpenUSModel(config)
        self.classifier = (
            nn.Linear(config.hidden_sizes[-1], config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutputWithNoAttention:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Labels for computing the image classification/regression loss. Indices should be in `[0, ...,
            config.num_labels - 1]`. If `config.num_labels == 1` a regression loss is computed (Mean-Square loss), If
            `config.num_labels > 1` a classification loss is computed (Cross-Entropy).

        Example:

        ```python
        >>> import torch
        >>> from openus_hub import OpenUSConfig, OpenUSForImageClassification

        >>> model = OpenUSForImageClassification(OpenUSConfig.from_preset("openus-tiny", num_labels=3)).eval()
        >>> model(torch.randn(1, 3, 224, 224)).logits.shape
        torch.Size([1, 3])
        ```"""
        outputs = self.openus(pixel_values, **kwargs)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


@auto_docstring(
    custom_intro="""
    OpenUS as a transformers backbone, for dense heads (UperNet, DPT, ...): upstream's out-normed stage maps
    (`Backbone_VSSM`'s `outnorm{i}`) for the stages in `config.out_features` (default: the last stage, the
    transformers convention). `"stem"` gives the stem output, which ends in its own LayerNorm.
    """
)
class OpenUSBackbone(BackboneMixin, OpenUSPreTrainedModel):
    has_attentions = False

    def __init__(self, config: OpenUSConfig):
        super().__init__(config)
        self.embeddings = OpenUSEmbeddings(config)
        self.encoder = OpenUSEncoder(config)
        self.num_features = [config.embed_dim] + config.hidden_sizes
        stages = [self.stage_names.index(name) - 1 for name in self.out_features if name != "stem"]
        self.stage_norms = self._build_stage_norms(stages)
        self.post_init()

    @can_return_tuple
    @filter_output_hidden_states
    @auto_docstring
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BackboneOutput:
        r"""
        Returns:
            `feature_maps`: one `(batch, C_i, H_i, W_i)` map per entry of `config.out_features`, out-normed;
            `hidden_states` (with `output_hidden_states`): as `OpenUSModel`'s, the stem output and the raw stage
            outputs.

        Example:

        ```python
        >>> import torch
        >>> from openus_hub import OpenUSBackbone, OpenUSConfig

        >>> config = OpenUSConfig.from_preset("openus-tiny", out_features=["stage1", "stage2", "stage3", "stage4"])
        >>> maps = OpenUSBackbone(config).eval()(torch.randn(1, 3, 224, 224)).feature_maps
        >>> [tuple(m.shape) for m in maps]
        [(1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)]
        ```"""
        embedding_output = self.embeddings(pixel_values)
        encoder_outputs = self.encoder(embedding_output, return_dict=True, **kwargs)
        hidden_states = encoder_outputs.hidden_states  # stem, stage 1..S: [B, C_i, H_i, W_i]
        feature_maps = []
        for index, (name, hidden_state) in enumerate(zip(self.stage_names, hidden_states)):
            if name in self.out_features:
                if index > 0:
                    norm = self.stage_norms[str(index - 1)]
                    hidden_state = norm(hidden_state.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                feature_maps.append(hidden_state)
        return BackboneOutput(
            feature_maps=tuple(feature_maps), hidden_states=hidden_states, attentions=encoder_outputs.attentions
        )


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation: upstream's MambaDecoder head (`MambaDecoder.py:151-280`), channel-last throughout


class OpenUSPatchExpand(nn.Module):
    """Linear C -> 2C, then each token becomes a 2x2 patch of C/2 channels, then LayerNorm: (B, H, W, C) ->
    (B, 2H, 2W, C/2). The channel order of the expansion is upstream's `(p1 p2 c)`."""

    def __init__(self, config: OpenUSConfig, dim: int):
        super().__init__()
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = hidden_states.shape
        hidden_states = self.expand(hidden_states)  # [B, H, W, 2C]
        hidden_states = hidden_states.view(batch, height, width, 2, 2, -1)  # [B, H, W, p1, p2, C/2]
        hidden_states = hidden_states.permute(0, 1, 3, 2, 4, 5).reshape(batch, 2 * height, 2 * width, -1)
        return self.norm(hidden_states)  # [B, 2H, 2W, C/2]


class OpenUSUpsampleExpand(nn.Module):
    """Linear C -> C/2, bilinear x2 (align_corners=False), LayerNorm: (B, H, W, C) -> (B, 2H, 2W, C/2)."""

    def __init__(self, config: OpenUSConfig, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim // 2, bias=False)
        self.norm = nn.LayerNorm(dim // 2, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(_bilinear_channels_last(self.linear(hidden_states), scale_factor=2))  # [B, 2H, 2W, C/2]


class OpenUSFinalUpsample(nn.Module):
    """Upstream's FinalUpsample_X4: (Linear C -> C, bilinear x2) twice, then LayerNorm:
    (B, H, W, C) -> (B, 4H, 4W, C)."""

    def __init__(self, config: OpenUSConfig, dim: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, dim, bias=False)
        self.linear2 = nn.Linear(dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for linear in (self.linear1, self.linear2):
            hidden_states = _bilinear_channels_last(linear(hidden_states), scale_factor=2)  # [B, 2H, 2W, C]
        return self.norm(hidden_states)  # [B, 4H, 4W, C]


class OpenUSChannelAttention(nn.Module):
    """x * sigmoid(fc(avgpool x) + fc(maxpool x)), fc = 1x1 conv C -> C/squeeze, SiLU, 1x1 conv back (no biases)
    (dino_vmamba.py:1025-1057)."""

    def __init__(self, dim: int, squeeze: int):
        super().__init__()
        hidden = max(1, dim // squeeze)  # upstream has no floor (dim < squeeze would build a 0-channel conv there)
        self.fc1 = nn.Conv2d(dim, hidden, 1, bias=False)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        avg = hidden_states.mean(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]
        peak = hidden_states.amax(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]
        attn = self.fc2(self.act(self.fc1(avg))) + self.fc2(self.act(self.fc1(peak)))
        return hidden_states * torch.sigmoid(attn)


class OpenUSConvAttentionBlock(nn.Module):
    """Upstream's CAB: 3x3 conv C -> C/compress, GELU, 3x3 conv back, channel attention. (B, C, H, W) in and out."""

    def __init__(self, config: OpenUSConfig, dim: int):
        super().__init__()
        hidden = max(1, dim // config.decoder_ca_compress)
        self.conv1 = nn.Conv2d(dim, hidden, 3, padding=1)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(hidden, dim, 3, padding=1)
        self.attention = OpenUSChannelAttention(dim, config.decoder_ca_squeeze)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.attention(self.conv2(self.act(self.conv1(hidden_states))))


class OpenUSDecoderLayer(GradientCheckpointingLayer):
    """Upstream's CVSSDecoderBlock (dino_vmamba.py:1060-1105), channel-last:
    ``x = scale1 * x + DropPath(SS2D(LN(x)))``, then ``x = CAB(LN(x)) + scale2 * x``.
    Its SS2D has d_state 4 (``decoder_d_state``), GELU after a depth-wise conv *with* bias, and rank ceil(C/16)."""

    def __init__(self, config: OpenUSConfig, dim: int, drop_path_rate: float):
        super().__init__()
        self.scale1 = nn.Parameter(torch.ones(dim))
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mixer = OpenUSMixer(
            config, dim, int(config.decoder_ssm_ratio * dim), math.ceil(dim / 16), config.decoder_d_state,
            d_conv=3, conv_bias=True, act="gelu",
        )
        self.drop_path = OpenUSDropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.conv_attention = OpenUSConvAttentionBlock(config, dim)
        self.scale2 = nn.Parameter(torch.ones(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        hidden_states = hidden_states * self.scale1 + self.drop_path(self.mixer(self.norm1(hidden_states)))
        attended = self.conv_attention(self.norm2(hidden_states).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return attended + hidden_states * self.scale2  # [B, H, W, C]


class OpenUSDecoderStage(nn.Module):
    """CVSS decoder blocks at one level, then (except at the finest level) an UpsampleExpand to the next one."""

    def __init__(self, config: OpenUSConfig, level: int, drop_path_rates: list[float]):
        super().__init__()
        dim = config.decoder_hidden_sizes[level]
        self.layers = nn.ModuleList(OpenUSDecoderLayer(config, dim, rate) for rate in drop_path_rates)
        self.upsample = OpenUSUpsampleExpand(config, dim) if level > 0 else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.upsample(hidden_states) if self.upsample is not None else hidden_states


class OpenUSMambaDecoder(nn.Module):
    """Upstream's MambaDecoder (MambaDecoder.py:151-280) for S backbone stages, channel-last:

    * ``patch_expand`` (upstream ``layers_up.0``): the last stage map -> twice the resolution, half the width;
    * ``stages[j]`` (upstream ``layers_up.{j+1}``) at level ``l = S-2-j``: add backbone stage ``l`` (after resizing
      the running map to it, a no-op for inputs that are multiples of the output stride), ``decoder_depths[l]`` CVSS
      blocks, then UpsampleExpand unless ``l = 0``;
    * ``norm`` (``norm_up``) -> ``final_upsample`` (x4, ``up``) -> 1x1 ``classifier`` conv without bias (``output``).
    """

    def __init__(self, config: OpenUSConfig):
        super().__init__()
        sizes, depths = config.decoder_hidden_sizes, config.decoder_depths
        rates = _drop_path_rates(config.decoder_drop_path_rate, sum(depths))
        self.patch_expand = OpenUSPatchExpand(config, sizes[-1])
        levels = range(config.num_stages - 2, -1, -1)
        self.stages = nn.ModuleList(
            OpenUSDecoderStage(config, level, rates[sum(depths[:level]) : sum(depths[: level + 1])]) for level in levels
        )
        self.norm = nn.LayerNorm(sizes[0], eps=config.layer_norm_eps)
        self.final_upsample = OpenUSFinalUpsample(config, sizes[0])
        self.classifier = nn.Conv2d(sizes[0], config.num_labels, kernel_size=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """``features``: the S out-normed backbone stage maps, channel-last ``(B, H_i, W_i, C_i)``.
        Returns logits ``(B, num_labels, 4 * H_0, 4 * W_0)``."""
        hidden_states = self.patch_expand(features[-1])  # [B, 2H, 2W, C/2]
        for j, stage in enumerate(self.stages):
            skip = features[len(features) - 2 - j]  # [B, H_l, W_l, C_l]
            if hidden_states.shape[1:3] != skip.shape[1:3]:
                hidden_states = _bilinear_channels_last(hidden_states, size=skip.shape[1:3])
            hidden_states = stage(hidden_states + skip)
        hidden_states = self.final_upsample(self.norm(hidden_states))  # [B, 4H_0, 4W_0, C_0]
        return self.classifier(hidden_states.permute(0, 3, 1, 2))  # [B, num_labels, 4H_0, 4W_0]


def soft_dice_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, eps: float = 1e-6
) -> torch.Tensor:
    """1 - mean over classes of the batch-pooled soft Dice ``(2 sum p*g + eps) / (sum p + sum g + eps)``.

    ``logits (B, K, H, W)``: softmax over K classes, or a sigmoid when K = 1 (foreground vs background).
    ``labels (B, H, W)`` integer class indices; pixels equal to ``ignore_index`` are left out.
    """
    valid = labels != ignore_index  # [B, H, W]
    target = torch.where(valid, labels, torch.zeros_like(labels))
    if logits.shape[1] == 1:
        probs = torch.sigmoid(logits.float())  # [B, 1, H, W]
        onehot = target[:, None].to(probs.dtype)
    else:
        probs = logits.float().softmax(dim=1)  # [B, K, H, W]
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    mask = valid[:, None].to(probs.dtype)
    probs, onehot = probs * mask, onehot * mask
    inter = (probs * onehot).sum(dim=(0, 2, 3))  # [K]
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))  # [K]
    return 1.0 - ((2.0 * inter + eps) / (denom + eps)).mean()


@auto_docstring(
    custom_intro="""
    OpenUS backbone (all stages, out-normed) + upstream's MambaDecoder head, as in OpenUS's `eval_segmentation.py`.
    `logits` are `(batch, num_labels, height, width)` at the input resolution.
    """
)
class OpenUSForSemanticSegmentation(OpenUSPreTrainedModel):
    _no_split_modules = ["OpenUSLayer", "OpenUSDownsample", "OpenUSDecoderLayer"]

    def __init__(self, config: OpenUSConfig):
        every_stage = list(range(1, config.num_stages + 1))
        if config.out_indices != every_stage:
            # the decoder reads every stage, so its backbone returns them all: a copy of the config says so (the
            # caller's config is left as it was)
            config = copy.deepcopy(config)
            config.out_indices = every_stage
        super().__init__(config)
        if config.num_labels < 1:
            raise ValueError(f"OpenUSForSemanticSegmentation needs num_labels >= 1, got {config.num_labels}")
        self.num_labels = config.num_labels
        self.openus = OpenUSBackbone(config)
        self.decoder = OpenUSMambaDecoder(config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Upstream's head init: PyTorch's default (kaiming-uniform) linears instead of the backbone's
        trunc_normal(0.02), skip scales 1, the backbone rule otherwise (LayerNorm 1/0, default convs, Mamba "v0"
        scans). Only head modules reach this method: transformers initialises the backbone, a `PreTrainedModel`
        child, with its own `_init_weights`. Tensors loaded from a checkpoint are skipped by the `init` helpers."""
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))  # nn.Linear.reset_parameters
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight.shape[1])
                init.uniform_(module.bias, -bound, bound)
            return
        super()._init_weights(module)
        if isinstance(module, OpenUSDecoderLayer):
            init.ones_(module.scale1)
            init.ones_(module.scale2)

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Segmentation loss of ``logits (B, K, h, w)`` against ``labels (B, H, W)``: cross-entropy ignoring
        ``config.loss_ignore_index`` (255), as upstream (binary cross-entropy on the valid pixels when
        ``num_labels == 1``), plus ``dice_loss_weight`` x soft Dice when ``config.use_dice_loss``. Labels of another
        size than the logits are compared with the logits resized to them (bilinear), as transformers' SegFormer
        does."""
        if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
            raise ValueError(f"labels must be (batch, height, width) with batch {logits.shape[0]}, got "
                             f"{tuple(labels.shape)}")
        if labels.is_floating_point():
            raise ValueError(f"labels must hold integer class indices, got dtype {labels.dtype}")
        labels = labels.long()
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        ignore = self.config.loss_ignore_index
        valid = labels != ignore  # [B, H, W]
        if not bool(valid.any()):  # every pixel ignored: a zero that still reaches every logit (no NaN)
            return logits.sum() * 0.0
        if self.num_labels == 1:
            loss = F.binary_cross_entropy_with_logits(logits[:, 0][valid].float(), labels[valid].float())
        else:
            loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore)
        if self.config.use_dice_loss:
            loss = loss + self.config.dice_loss_weight * soft_dice_loss(logits, labels, ignore)
        return loss

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SemanticSegmenterOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Input images; both sides must be multiples of `config.output_stride` (32).
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            Class index per pixel; `config.loss_ignore_index` (255) marks pixels left out of the loss.

        Returns:
            `logits`, `loss` (with `labels`), and with `output_hidden_states` the backbone's `hidden_states` (the
            stem output and the raw stage outputs, as `OpenUSModel`'s). The out-normed stage maps the decoder reads
            are `model.openus(pixel_values).feature_maps`.

        Example:

        ```python
        >>> import torch
        >>> from openus_hub import OpenUSConfig, OpenUSForSemanticSegmentation

        >>> model = OpenUSForSemanticSegmentation(OpenUSConfig.from_preset("openus-tiny")).eval()
        >>> model(torch.randn(1, 3, 224, 224)).logits.shape
        torch.Size([1, 2, 224, 224])
        ```"""
        outputs = self.openus(pixel_values, **kwargs)
        features = [m.permute(0, 2, 3, 1) for m in outputs.feature_maps]  # S x [B, H_i, W_i, C_i]
        logits = self.decoder(features)  # [B, K, 4H_0, 4W_0]
        if logits.shape[-2:] != pixel_values.shape[-2:]:  # upstream's resize to the input; a no-op for valid sizes
            logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        loss = self.compute_loss(logits, labels) if labels is not None else None
        return SemanticSegmenterOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "OpenUSBackbone",
    "OpenUSForImageClassification",
    "OpenUSForSemanticSegmentation",
    "OpenUSModel",
    "OpenUSPreTrainedModel",
]
