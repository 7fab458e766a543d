"""PyTorch OpenUS backbone: VMamba with SS2D cross-scan (OpenUS, arXiv 2511.11510; VMamba, arXiv 2401.10166).

Internally the network runs channel-last (``B, H, W, C``): LayerNorms and linear layers act on the last dimension
and the convolutions see a channels-last view, so no layout copies are made between blocks. Stage outputs are
returned channel-first (``B, C, H, W``), as upstream.
"""

from __future__ import annotations

import math
import os
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithPooling,
    ImageClassifierOutputWithNoAttention,
    SemanticSegmenterOutput,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging

from openus_hub.ops.ss2d import cross_selective_scan, ss2d_attention_map

from .configuration_openus import OpenUSConfig

logger = logging.get_logger(__name__)


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (timm's DropPath)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class OpenUSDropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


def _drop_path_rates(rate: float, count: int) -> list[float]:
    """Stochastic depth rising linearly from 0 to ``rate`` over ``count`` blocks (computed on the CPU, so models can
    also be built on the meta device)."""
    return torch.linspace(0, rate, count, device="cpu").tolist()


def _bilinear_channels_last(x: torch.Tensor, size=None, scale_factor=None) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of a channel-last tensor (B, H, W, C)."""
    x = F.interpolate(x.permute(0, 3, 1, 2), size=size, scale_factor=scale_factor, mode="bilinear",
                      align_corners=False)
    return x.permute(0, 2, 3, 1)


def _conv_channels_last(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a Conv2d to a channel-last tensor: (B, H, W, C) -> (B, H', W', C').

    The conv sees a channels-last view. For such inputs oneDNN re-lays-out the weight on every call, so when the
    weight is larger than the activation (the downsampling convs of late stages) the activation is copied to NCHW
    instead, which is cheaper; both give the same result.
    """
    x = x.permute(0, 3, 1, 2)
    if not torch.compiler.is_compiling() and conv.weight.numel() > x.numel():
        x = x.contiguous()
    return conv(x).permute(0, 2, 3, 1)


class OpenUSEmbeddings(nn.Module):
    """Stem ("v2"): two 3x3 stride-2 convs with LayerNorms and GELU: (B, 3, H, W) -> (B, H/4, W/4, C)."""

    def __init__(self, config: OpenUSConfig):
        super().__init__()
        dim = config.embed_dim
        self.conv1 = nn.Conv2d(config.num_channels, dim // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = nn.LayerNorm(dim // 2, eps=config.layer_norm_eps)
        self.act = ACT2FN[config.hidden_act]
        self.conv2 = nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        # learned token written over masked 32x32 cells in masked-image pretraining (spec §1.6)
        self.mask_token = nn.Parameter(torch.zeros(1, dim)) if config.use_mask_token else None
        self.output_stride = config.output_stride

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv1(pixel_values).permute(0, 2, 3, 1)  # [B, H/2, W/2, C/2]
        x = self.act(self.norm1(x))
        x = self.norm2(_conv_channels_last(self.conv2, x))  # [B, H/4, W/4, C]
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos needs a model built with config.use_mask_token=True")
            scale = self.output_stride // 4  # one mask cell covers scale x scale stem tokens
            expected = (x.shape[0], x.shape[1] // scale, x.shape[2] // scale)
            if tuple(bool_masked_pos.shape) != expected:
                raise ValueError(f"bool_masked_pos must have shape {expected} (one cell per 32x32 pixels), got "
                                 f"{tuple(bool_masked_pos.shape)}")
            mask = bool_masked_pos.repeat_interleave(scale, 1).repeat_interleave(scale, 2)[..., None]
            x = torch.where(mask, self.mask_token.to(x.dtype), x)
        return x


class OpenUSMixer(nn.Module):
    """SS2D ("v05_noz"): in_proj -> depth-wise conv -> activation -> 4-direction selective scan -> LayerNorm ->
    out_proj, channel-last. The backbone builds it from its config (`for_stage`); decoders with other sizes (e.g. the
    segmentation head's d_state 4, GELU, conv bias) pass them explicitly."""

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
        # per-direction parameters, stacked along a leading axis of 4 (upstream layouts, spec §1.9)
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * state, inner))  # [K, R+2N, D]
        self.dt_proj_weight = nn.Parameter(torch.empty(k, inner, rank))  # [K, D, R]
        self.dt_proj_bias = nn.Parameter(torch.empty(k, inner))  # [K, D]
        self.A_log = nn.Parameter(torch.empty(k * inner, state))  # [K*D, N]
        self.D = nn.Parameter(torch.empty(k * inner))  # [K*D]
        self.out_norm = nn.LayerNorm(inner, eps=config.layer_norm_eps)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.reset_scan_parameters()

    @classmethod
    def for_stage(cls, config: OpenUSConfig, stage: int) -> OpenUSMixer:
        return cls(config, config.hidden_sizes[stage], config.inner_sizes[stage], config.dt_ranks[stage],
                   config.d_state, config.d_conv, config.conv_bias, config.ssm_act)

    @torch.no_grad()
    def reset_scan_parameters(self) -> None:
        """Mamba "v0" initialisation (spec §1.4): nn.Linear default for x_proj, U(+-R^-0.5) for dt_proj, dt bias =
        inverse softplus of a log-uniform dt in [dt_min, dt_max], A = -(1..N), D = 1."""
        cfg = self.config
        k, inner, rank = self.dt_proj_weight.shape
        state = self.A_log.shape[1]
        bound = 1.0 / math.sqrt(inner)  # nn.Linear(D, R+2N) default init, per direction
        init.uniform_(self.x_proj_weight, -bound, bound)
        init.uniform_(self.dt_proj_weight, -(rank**-0.5), rank**-0.5)
        dt = torch.exp(torch.rand(k, inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        init.copy_(self.dt_proj_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        a = torch.arange(1, state + 1, dtype=torch.float32).repeat(k * inner, 1)
        init.copy_(self.A_log, torch.log(a))
        init.ones_(self.D)

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Implicit ("CwBw") attention of this block's four scans, summed in row-major order: (B, L, L). Spec §1.8."""
        u = self.act(_conv_channels_last(self.conv2d, self.in_proj(x)))
        return ss2d_attention_map(u, self.x_proj_weight, self.dt_proj_weight, self.dt_proj_bias, self.A_log)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.act(_conv_channels_last(self.conv2d, self.in_proj(x)))  # [B, H, W, D]
        y = cross_selective_scan(
            u, self.x_proj_weight, self.dt_proj_weight, self.dt_proj_bias, self.A_log, self.D,
            implementation=self.config.scan_implementation,
        )  # [B, H, W, D] float32
        y = self.out_norm(y.to(x.dtype))
        return self.out_proj(y)


class OpenUSMLP(nn.Module):
    def __init__(self, config: OpenUSConfig, stage: int):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_sizes[stage], config.mlp_sizes[stage])
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.mlp_sizes[stage], config.hidden_sizes[stage])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class OpenUSLayer(nn.Module):
    """VSS block, pre-norm: x + DropPath(SS2D(LN(x))), then x + DropPath(MLP(LN(x)))."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        x = x + self.drop_path(self.mixer(self.norm(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class OpenUSDownsample(nn.Module):
    """"v3" downsampling: 3x3 stride-2 conv C -> 2C, then LayerNorm."""

    def __init__(self, config: OpenUSConfig, stage: int):
        super().__init__()
        dim = config.hidden_sizes[stage]
        self.conv = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(2 * dim, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_conv_channels_last(self.conv, x))


def _run_layers(owner: nn.Module, layers, x: torch.Tensor) -> torch.Tensor:
    """Apply ``layers`` in turn, through activation checkpointing when ``owner`` has it enabled and is training."""
    for layer in layers:
        if owner.gradient_checkpointing and owner.training:
            x = owner._gradient_checkpointing_func(layer.__call__, x)
        else:
            x = layer(x)
    return x


class OpenUSStage(nn.Module):
    def __init__(self, config: OpenUSConfig, stage: int, drop_path_rates: list[float]):
        super().__init__()
        self.layers = nn.ModuleList(OpenUSLayer(config, stage, rate) for rate in drop_path_rates)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, layers: slice = slice(None)) -> torch.Tensor:
        return _run_layers(self, self.layers[layers], x)


class OpenUSEncoder(nn.Module):
    """Four stages; each stage's output is taken *before* its downsampling (spec §1.2)."""

    def __init__(self, config: OpenUSConfig):
        super().__init__()
        rates = _drop_path_rates(config.drop_path_rate, sum(config.depths))
        starts = [sum(config.depths[:i]) for i in range(config.num_stages)]
        self.stages = nn.ModuleList(
            OpenUSStage(config, i, rates[s : s + d]) for i, (s, d) in enumerate(zip(starts, config.depths))
        )
        self.downsamples = nn.ModuleList(OpenUSDownsample(config, i) for i in range(config.num_stages - 1))

    def forward(self, x: torch.Tensor, output_attentions: bool = False) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Stage outputs (channel-last), and with `output_attentions` the implicit attention map of the last block."""
        outputs, attention = [], None
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            if output_attentions and i == last:
                x = stage(x, slice(None, -1))
                block = stage.layers[-1]
                attention = block.mixer.attention_map(block.norm(x))
                x = stage(x, slice(-1, None))
            else:
                x = stage(x)
            outputs.append(x)  # [B, H_i, W_i, C_i]
            if i < len(self.downsamples):
                x = self.downsamples[i](x)
        return outputs, attention


class OpenUSPreTrainedModel(PreTrainedModel):
    config: OpenUSConfig
    config_class = OpenUSConfig
    base_model_prefix = "openus"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["OpenUSLayer", "OpenUSDownsample"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Upstream initialisation: trunc_normal(0.02) linears with zero bias, LayerNorm (1, 0), PyTorch default
        convs, Mamba "v0" for the scan parameters, zero mask token."""
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
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

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        if self._auto_class is not None and os.path.isdir(save_directory):
            _vendor_ops_for_remote_code(save_directory)


def _vendor_ops_for_remote_code(folder: str) -> None:
    """Make a saved folder's remote code self-contained: copy every ``openus_hub/ops`` module beside the modeling file
    (``openus_hub.ops.build.vendor_ops``, which also lets the copies find the CPU kernel built by openus_hub) and turn
    ``from openus_hub.ops.x import`` into ``from .x import``, so `trust_remote_code=True` works without openus_hub."""
    try:
        from openus_hub.ops.build import vendor_ops
    except ImportError:  # already running as remote code: transformers copied the ops files with this one
        vendor_ops = None
    if vendor_ops is not None:
        vendor_ops(folder)
    path = os.path.join(folder, os.path.basename(__file__))
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            source = f.read()
        source = re.sub(r"^from openus_hub\.ops\.(\w+) import", r"from .\1 import", source, flags=re.MULTILINE)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(source)
        os.replace(path + ".tmp", path)


class OpenUSModel(OpenUSPreTrainedModel):
    """OpenUS backbone returning upstream's feature contract.

    * ``last_hidden_state``: ``(B, 1 + H*W, C)`` last-stage tokens with their mean first (upstream ``x_out``);
    * ``pooler_output``: ``(B, C)``, the mean of the last-stage tokens;
    * ``hidden_states`` (with ``output_hidden_states=True``): the four out-normed stage maps ``(B, C_i, H_i, W_i)``.
    """

    def __init__(self, config: OpenUSConfig):
        super().__init__(config)
        self.embeddings = OpenUSEmbeddings(config)
        self.encoder = OpenUSEncoder(config)
        self.stage_norms = nn.ModuleList(nn.LayerNorm(c, eps=config.layer_norm_eps) for c in config.hidden_sizes)
        self.post_init()

    def _check_input(self, pixel_values: torch.Tensor) -> None:
        stride = self.config.output_stride
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be (batch, {self.config.num_channels}, height, width), got "
                f"{tuple(pixel_values.shape)}; replicate grayscale images to {self.config.num_channels} channels "
                "(the OpenUS image processor does this)"
            )
        h, w = pixel_values.shape[-2:]
        if h % stride or w % stride:
            raise ValueError(
                f"OpenUS needs input sides that are multiples of {stride}, got {h}x{w}; resize or pad the image "
                f"(e.g. to {max(stride, round(h / stride) * stride)}x{max(stride, round(w / stride) * stride)})"
            )

    def _encode(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None,
        stages: list[int] | None,
        output_attentions: bool = False,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        self._check_input(pixel_values)
        x = self.embeddings(pixel_values.to(self.embeddings.conv1.weight.dtype), bool_masked_pos)
        outputs, attention = self.encoder(x, output_attentions)
        stages = range(len(outputs)) if stages is None else stages
        return [self.stage_norms[i](outputs[i]) for i in stages], attention

    def stage_features(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        stages: list[int] | None = None,
    ) -> list[torch.Tensor]:
        """Out-normed stage maps, channel-last ``(B, H_i, W_i, C_i)``: all four, or those listed in ``stages``."""
        return self._encode(pixel_values, bool_masked_pos, stages)[0]

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(batch, 3, height, width)`): sides must be multiples of 32.
            bool_masked_pos (`torch.BoolTensor` of shape `(batch, height / 32, width / 32)`, *optional*):
                cells whose stage-0 features are replaced by the mask token (needs `config.use_mask_token`).
            output_hidden_states (`bool`, *optional*): also return the four out-normed stage maps.
            output_attentions (`bool`, *optional*): also return the implicit attention map of the last block,
                `(batch, L, L)` over the last stage's `L` positions in row-major order: the four scan directions'
                "CwBw" attention (spec §1.8), summed, *not* normalised. Upstream OpenUS min-max normalises it over the
                whole batch before use (`openus_hub.ops.minmax_normalize`).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        last = self.config.num_stages - 1
        maps, attention = self._encode(
            pixel_values, bool_masked_pos, None if output_hidden_states else [last], bool(output_attentions)
        )
        tokens = maps[-1].flatten(1, 2)  # [B, H*W, C] row-major
        pooled = tokens.mean(dim=1)  # [B, C]
        last_hidden_state = torch.cat([pooled[:, None], tokens], dim=1)  # [B, 1+H*W, C]
        hidden_states = tuple(m.permute(0, 3, 1, 2) for m in maps) if output_hidden_states else None
        attentions = (attention,) if attention is not None else None
        if not return_dict:
            return tuple(v for v in (last_hidden_state, pooled, hidden_states, attentions) if v is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state, pooler_output=pooled, hidden_states=hidden_states,
            attentions=attentions,
        )


class OpenUSForImageClassification(OpenUSPreTrainedModel):
    """OpenUS with a linear classifier on the pooled (mean) last-stage feature, as upstream's linear probe (§3.1)."""

    def __init__(self, config: OpenUSConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.openus = OpenUSModel(config)
        self.classifier = nn.Linear(config.hidden_sizes[-1], config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.openus(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        if not return_dict:
            out = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + out) if loss is not None else out
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class OpenUSBackbone(BackboneMixin, OpenUSPreTrainedModel):
    """OpenUS as a transformers backbone: out-normed stage maps for dense heads (UperNet, DPT, ...)."""

    has_attentions = False

    def __init__(self, config: OpenUSConfig):
        super().__init__(config)
        self.openus = OpenUSModel(config)
        self.num_features = [config.embed_dim] + config.hidden_sizes
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput | tuple:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        maps = [m.permute(0, 3, 1, 2) for m in self.openus.stage_features(pixel_values)]
        by_name = dict(zip(self.stage_names[1:], maps))
        if "stem" in self.out_features:
            raise ValueError("OpenUSBackbone has no 'stem' output; use out_features among stage1..stage4")
        feature_maps = tuple(by_name[name] for name in self.out_features)
        hidden_states = tuple(maps) if output_hidden_states else None
        if not return_dict:
            return (feature_maps,) + ((hidden_states,) if hidden_states is not None else ())
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states, attentions=None)

# ---------------------------------------------------------------------------------------------------------------------
# Segmentation: upstream's MambaDecoder head (spec §3.2), channel-last throughout


class OpenUSPatchExpand(nn.Module):
    """Linear C -> 2C, then each token becomes a 2x2 patch of C/2 channels, then LayerNorm: (B, H, W, C) ->
    (B, 2H, 2W, C/2). The channel order of the expansion is upstream's `(p1 p2 c)`."""

    def __init__(self, config: OpenUSConfig, dim: int):
        super().__init__()
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        x = self.expand(x)  # [B, H, W, 2C]
        x = x.view(batch, height, width, 2, 2, -1)  # [B, H, W, p1, p2, C/2]
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, 2 * height, 2 * width, -1)  # [B, 2H, 2W, C/2]
        return self.norm(x)


class OpenUSUpsampleExpand(nn.Module):
    """Linear C -> C/2, bilinear x2 (align_corners=False), LayerNorm: (B, H, W, C) -> (B, 2H, 2W, C/2)."""

    def __init__(self, config: OpenUSConfig, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim // 2, bias=False)
        self.norm = nn.LayerNorm(dim // 2, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_bilinear_channels_last(self.linear(x), scale_factor=2))  # [B, 2H, 2W, C/2]


class OpenUSFinalUpsample(nn.Module):
    """Upstream's FinalUpsample_X4: (Linear C -> C, bilinear x2) twice, then LayerNorm:
    (B, H, W, C) -> (B, 4H, 4W, C)."""

    def __init__(self, config: OpenUSConfig, dim: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, dim, bias=False)
        self.linear2 = nn.Linear(dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for linear in (self.linear1, self.linear2):
            x = _bilinear_channels_last(linear(x), scale_factor=2)  # [B, 2H, 2W, C]
        return self.norm(x)  # [B, 4H, 4W, C]


class OpenUSChannelAttention(nn.Module):
    """x * sigmoid(fc(avgpool x) + fc(maxpool x)), fc = 1x1 conv C -> C/squeeze, SiLU, 1x1 conv back (no biases)."""

    def __init__(self, dim: int, squeeze: int):
        super().__init__()
        hidden = max(1, dim // squeeze)  # upstream has no floor (dim < squeeze would build a 0-channel conv there)
        self.fc1 = nn.Conv2d(dim, hidden, 1, bias=False)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        avg = x.mean(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]
        peak = x.amax(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]
        attn = self.fc2(self.act(self.fc1(avg))) + self.fc2(self.act(self.fc1(peak)))
        return x * torch.sigmoid(attn)


class OpenUSConvAttentionBlock(nn.Module):
    """Upstream's CAB: 3x3 conv C -> C/compress, GELU, 3x3 conv back, channel attention. (B, C, H, W) in and out."""

    def __init__(self, config: OpenUSConfig, dim: int):
        super().__init__()
        hidden = max(1, dim // config.decoder_ca_compress)
        self.conv1 = nn.Conv2d(dim, hidden, 3, padding=1)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(hidden, dim, 3, padding=1)
        self.attention = OpenUSChannelAttention(dim, config.decoder_ca_squeeze)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.conv2(self.act(self.conv1(x))))


class OpenUSDecoderLayer(nn.Module):
    """Upstream's CVSSDecoderBlock, channel-last:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        x = x * self.scale1 + self.drop_path(self.mixer(self.norm1(x)))
        y = self.conv_attention(self.norm2(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # [B, H, W, C]
        return y + x * self.scale2


class OpenUSDecoderStage(nn.Module):
    """CVSS decoder blocks at one level, then (except at the finest level) an UpsampleExpand to the next one."""

    def __init__(self, config: OpenUSConfig, level: int, drop_path_rates: list[float]):
        super().__init__()
        dim = config.decoder_hidden_sizes[level]
        self.layers = nn.ModuleList(OpenUSDecoderLayer(config, dim, rate) for rate in drop_path_rates)
        self.upsample = OpenUSUpsampleExpand(config, dim) if level > 0 else None
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, layers: slice = slice(None)) -> torch.Tensor:
        x = _run_layers(self, self.layers[layers], x)
        return self.upsample(x) if self.upsample is not None else x


class OpenUSMambaDecoder(nn.Module):
    """Upstream's MambaDecoder (spec §3.2) for S backbone stages, channel-last:

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
        y = self.patch_expand(features[-1])  # [B, 2H, 2W, C/2]
        for j, stage in enumerate(self.stages):
            skip = features[len(features) - 2 - j]  # [B, H_l, W_l, C_l]
            if y.shape[1:3] != skip.shape[1:3]:
                y = _bilinear_channels_last(y, size=skip.shape[1:3])
            y = stage(y + skip)
        y = self.final_upsample(self.norm(y))  # [B, 4H_0, 4W_0, C_0]
        return self.classifier(y.permute(0, 3, 1, 2))  # [B, num_labels, 4H_0, 4W_0]


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


class OpenUSForSemanticSegmentation(OpenUSPreTrainedModel):
    """OpenUS backbone + upstream's MambaDecoder head (spec §3.2), as in OpenUS's ``eval_segmentation.py``.

    ``logits`` are ``(B, num_labels, H, W)`` at the input resolution. With ``labels (B, H, W)`` the loss is
    cross-entropy ignoring ``config.loss_ignore_index`` (255), as upstream (binary cross-entropy on the valid pixels
    when ``num_labels == 1``), plus ``dice_loss_weight`` x soft Dice when ``config.use_dice_loss``. Labels of another
    size than the logits are compared with the logits resized to them (bilinear), as transformers' SegFormer does.
    """

    _no_split_modules = ["OpenUSLayer", "OpenUSDownsample", "OpenUSDecoderLayer"]

    def __init__(self, config: OpenUSConfig):
        super().__init__(config)
        if config.num_labels < 1:
            raise ValueError(f"OpenUSForSemanticSegmentation needs num_labels >= 1, got {config.num_labels}")
        self.num_labels = config.num_labels
        self.openus = OpenUSModel(config)
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
        """Segmentation loss of ``logits (B, K, h, w)`` against ``labels (B, H, W)`` (see the class docstring)."""
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

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput | tuple:
        r"""
        pixel_values (`torch.Tensor` of shape `(batch, num_channels, height, width)`):
            Sides must be multiples of `config.output_stride` (32).
        labels (`torch.LongTensor` of shape `(batch, height, width)`, *optional*):
            Class index per pixel; `config.loss_ignore_index` (255) marks pixels left out of the loss.
        output_hidden_states (`bool`, *optional*):
            Also return the backbone's out-normed stage maps, channel-first `(batch, C_i, H_i, W_i)`.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        features = self.openus.stage_features(pixel_values)  # S x [B, H_i, W_i, C_i]
        logits = self.decoder(features)  # [B, K, 4H_0, 4W_0]
        if logits.shape[-2:] != pixel_values.shape[-2:]:  # upstream's resize to the input; a no-op for valid sizes
            logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        loss = self.compute_loss(logits, labels) if labels is not None else None
        hidden_states = tuple(f.permute(0, 3, 1, 2) for f in features) if output_hidden_states else None
        if not return_dict:
            out = (logits,) + ((hidden_states,) if hidden_states is not None else ())
            return ((loss,) + out) if loss is not None else out
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=None)


__all__ = [
    "OpenUSBackbone",
    "OpenUSForImageClassification",
    "OpenUSForSemanticSegmentation",
    "OpenUSModel",
    "OpenUSPreTrainedModel",
]
