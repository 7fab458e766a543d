"""OpenUS backbones as timm models: ``timm.create_model("openus_small", features_only=True)``.

:func:`register` adds three timm entry points, ``openus_tiny``, ``openus_small`` and ``openus_base`` (the presets of
:meth:`OpenUSConfig.from_preset`), each with a ``pretrained_cfg`` built from the openus_hub registry
(:func:`openus_hub.pretrained.get_pretrained`): input size, mean/std, licence and, once the registry lists the
weights as published, the Hub repo (``hf_hub_id``, ``repo@revision``). No OpenUS weights are published yet, so timm
lists the models without pretrained weights (``timm.list_pretrained("openus*")`` is empty). timm reads
``model.safetensors``, the very file a transformers folder holds, and :func:`checkpoint_filter_fn` maps its keys onto
:class:`OpenUS`. ``import openus_hub`` calls :func:`register` when timm is installed:

    import openus_hub, timm
    timm.list_models("openus*")                    # ['openus_base', 'openus_small', 'openus_tiny']
    backbone = timm.create_model("openus_small", features_only=True, out_indices=(1, 3),
                                 pretrained=True, pretrained_cfg_overlay=dict(file="openus-small/model.safetensors"))

:class:`OpenUS` wraps an :class:`OpenUSBackbone` under ``openus.`` (the transformers layers, not a copy) and adds
timm's interface: ``forward_features`` (the last stage map, out-normed, NCHW), ``forward_head`` (mean pool, dropout,
linear), ``reset_classifier``, ``forward_intermediates`` / ``prune_intermediate_layers`` (``features_only`` goes
through timm's ``FeatureGetterNet`` with ``norm=True``) and ``feature_info``.

Stage norms: a classification model holds the last stage's out-norm only (every parameter is trained; DDP needs no
``find_unused_parameters``). A ``features_only`` model is built with the out-norm of every stage, so its maps are
upstream's out-normed stage maps, the same tensors as ``OpenUSBackbone(...).feature_maps`` for the same weights.
``forward_intermediates(norm=True)`` applies a stage's out-norm where the model has it (timm's "compatible
intermediates"), ``norm=False`` returns the raw stage outputs.

Architecture keywords (any :class:`OpenUSConfig` field: ``embed_dim``, ``depths``, ``d_state``, ``ssm_ratio``, ...)
pass through ``timm.create_model`` and override the preset; anything else raises ``TypeError``, as for every timm
model. ``drop_path_rate`` defaults to 0 (timm's convention), not the preset's pretraining rate. ``device`` and
``dtype`` place the weights.

``torch.fx``: the SS2D mixer (its scan dispatch has Python control flow on shapes and devices) and the block MLP (it
processes large inputs in chunks on a CPU) are registered with timm as leaf modules, and the input check and the
channel-last conv helper as leaf functions, the way timm registers its own layers that symbolic tracing cannot
enter. ``torch.export`` traces the whole model. TorchScript is not supported (the layers are transformers modules).

While an entry has no published weights, ``pretrained=True`` without a ``file``, ``url`` or ``state_dict`` in
``pretrained_cfg_overlay`` raises :class:`~openus_hub.pretrained.UnpublishedModelError`: never random weights.
Weights are read as timm reads them, without the registry's sha256 check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from typing import Any

import torch
from torch import nn

from .models.openus.configuration_openus import OPENUS_PRESETS, OpenUSConfig
from .models.openus.modeling_openus import (
    OpenUSBackbone,
    OpenUSMixer,
    OpenUSMLP,
    check_pixel_values,
    conv_channels_last,
)
from .pretrained import WEIGHTS_NAME, UnpublishedModelError, get_pretrained, resolve

__all__ = ["TIMM_NAMES", "OpenUS", "checkpoint_filter_fn", "register"]

logger = logging.getLogger(__name__)

# timm entry point -> openus_hub registry name (also the OpenUSConfig preset)
TIMM_NAMES = {"openus_tiny": "openus-tiny", "openus_small": "openus-small", "openus_base": "openus-base"}
_FEATURE_MODULE = "openus.encoder.stages.{}"
# OpenUSConfig fields a timm model takes as keywords (in_chans stands for num_channels; the stage norms follow
# all_stage_norms; the rest of PreTrainedConfig is not architecture)
_ARCHITECTURE_FIELDS = frozenset(
    f.name for f in dataclasses.fields(OpenUSConfig)
    if f.name in OpenUSConfig.__annotations__ and not f.name.startswith("_") and f.name != "num_channels"
)


class OpenUS(nn.Module):
    """OpenUS (VMamba) for timm: the transformers :class:`OpenUSBackbone` under ``openus.``, plus a classifier head.

    Args:
        num_classes: classes of the linear head on the mean-pooled last stage; 0 gives pooled features.
        in_chans: input channels (``OpenUSConfig.num_channels``).
        global_pool: ``"avg"`` (mean over positions, as ``OpenUSModel.pooler_output``) or ``""`` (no pooling).
        drop_rate: dropout before the head.
        all_stage_norms: also build the out-norms of the stages before the last (upstream's ``outnorm0..S-2``),
            which only feature extraction uses; ``features_only=True`` sets it.
        device, dtype: where and in which dtype the weights are created.
        **config_kwargs: :class:`OpenUSConfig` architecture fields (``embed_dim``, ``depths``, ``d_state``,
            ``ssm_ratio``, ``drop_path_rate``, ``scan_implementation``, ...); any other keyword is a ``TypeError``.
    """

    def __init__(
        self,
        num_classes: int = 0,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        all_stage_norms: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **config_kwargs: Any,
    ):
        super().__init__()
        unknown = sorted(set(config_kwargs) - _ARCHITECTURE_FIELDS)
        if unknown:
            raise TypeError(f"OpenUS got unexpected keyword argument(s) {unknown}; architecture keywords are "
                            f"OpenUSConfig fields: {sorted(_ARCHITECTURE_FIELDS)}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        config = OpenUSConfig(num_channels=in_chans, **config_kwargs)
        config.out_indices = list(range(1, config.num_stages + 1)) if all_stage_norms else [config.num_stages]
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.openus = OpenUSBackbone(config)
        if dtype is not None:
            self.openus.to(dtype=dtype)
        self.config = config
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = config.hidden_sizes[-1]
        self.feature_info = [
            {"num_chs": c, "reduction": 4 * 2**i, "module": _FEATURE_MODULE.format(i)}
            for i, c in enumerate(config.hidden_sizes)
        ]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(num_classes)

    def _make_head(self, num_classes: int) -> nn.Module:
        """A new head on the device and in the dtype of the weights, in the model's train/eval mode; a linear head
        gets upstream's init (trunc_normal(0.02), zero bias)."""
        if num_classes <= 0:
            return nn.Identity()
        ref = next(self.openus.parameters())
        head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
        self.openus._init_weights(head)
        return head.train(self.training)

    # -- timm interface ------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return {
            "stem": r"^openus\.embeddings",
            "blocks": r"^openus\.encoder\.(?:stages|downsamples)\.(\d+)|^openus\.stage_norms\.(\d+)" if coarse else [
                (r"^openus\.encoder\.stages\.(\d+)\.layers\.(\d+)", None),
                (r"^openus\.encoder\.downsamples\.(\d+)", (0,)),
                (r"^openus\.stage_norms\.(\d+)", (99999,)),
            ],
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # transformers 5 checkpoints its GradientCheckpointingLayer blocks (activation_checkpointing_*)
        if enable:
            self.openus.activation_checkpointing_enable()
        else:
            self.openus.activation_checkpointing_disable()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)

    def _stage_norm(self, index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """The out-norm of stage ``index`` applied to its channel-first map, if this model has that norm."""
        norms = self.openus.stage_norms
        if str(index) not in norms:
            return hidden_states
        return norms[str(index)](hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage maps: raw, or with ``norm`` out-normed where the model has the stage's norm (all stages for a
        ``features_only`` model, the last for a classifier).

        ``indices``: last n stages if an int, those listed if a sequence, all if None. Returns the maps (NCHW or
        NHWC), or ``(final map, maps)`` unless ``intermediates_only``; the final map is the last stage run,
        out-normed when the model has its norm, i.e. ``forward_features``' output.
        """
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        encoder = self.openus.encoder
        take_indices, max_index = feature_take_indices(len(encoder.stages), indices)
        last = max_index if stop_early else len(encoder.stages) - 1
        hidden_states = self.openus.embeddings(x)  # [B, C, H/4, W/4]
        intermediates = []
        for index in range(last + 1):
            hidden_states, _ = encoder.stages[index](hidden_states)  # [B, C_i, H_i, W_i]
            if index in take_indices:
                intermediates.append(self._stage_norm(index, hidden_states) if norm else hidden_states)
            if index < last:
                hidden_states = encoder.downsamples[index](hidden_states)
        if output_fmt == "NHWC":
            intermediates = [m.permute(0, 2, 3, 1) for m in intermediates]
        if intermediates_only:
            return intermediates
        return self._stage_norm(last, hidden_states), intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] | tuple[int, ...] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages after the last one ``indices`` needs, the out-norms nothing reads any more (all of them with
        ``prune_norm``), and with ``prune_head`` the head. What is left is all used: every parameter gets a gradient."""
        from timm.models._features import feature_take_indices

        encoder = self.openus.encoder
        take_indices, max_index = feature_take_indices(len(encoder.stages), indices)
        encoder.stages = encoder.stages[: max_index + 1]
        encoder.downsamples = encoder.downsamples[:max_index]
        keep = set() if prune_norm else {str(i) for i in (*take_indices, max_index)}
        for key in list(self.openus.stage_norms):
            if key not in keep:
                del self.openus.stage_norms[key]
        self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or max_index < len(self.feature_info) - 1:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage map, out-normed (if the model still has that norm), ``(B, C, H/32, W/32)``."""
        return self.forward_intermediates(x, indices=1)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))  # [B, C], = OpenUSModel pooler_output
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: OpenUS) -> dict[str, torch.Tensor]:
    """Map a transformers OpenUS state dict onto :class:`OpenUS`.

    Accepts the key layouts of every OpenUS folder: ``OpenUSModel`` and ``OpenUSBackbone`` (``embeddings.``,
    ``encoder.``, ``stage_norms.``), the head models (``openus.``; ``OpenUSForImageClassification``'s ``classifier.``
    becomes ``head.``, ``OpenUSForSemanticSegmentation``'s decoder is dropped) and timm's own. Dropped as well: a
    pretraining ``mask_token`` when the model has none, and out-norms of stages the model does not hold (a classifier
    keeps the last stage's only). Everything else is kept as it is, so an architecture mismatch still fails timm's
    strict load."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    model_keys = set(model.state_dict())
    out, dropped = {}, []
    for key, value in state_dict.items():
        if key.startswith(("embeddings.", "encoder.", "stage_norms.")):
            key = "openus." + key
        elif key.startswith("classifier."):
            key = "head." + key[len("classifier."):]
        optional = key == "openus.embeddings.mask_token" or re.match(r"^openus\.stage_norms\.\d+\.", key)
        backbone = key.startswith("openus.") and (not optional or key in model_keys)
        if backbone or (key.startswith("head.") and key in model_keys):
            out[key] = value
        else:
            dropped.append(key)
    if dropped:
        logger.info("OpenUS checkpoint: %d key(s) not used by the timm model, dropped: %s", len(dropped),
                    ", ".join(dropped[:8]) + (" ..." if len(dropped) > 8 else ""))
    return out


def _cfg(name: str) -> dict:
    entry = get_pretrained(TIMM_NAMES[name])
    cfg = {
        "num_classes": 0,  # a self-supervised backbone: no classifier in the weights
        "input_size": tuple(entry.input_size),
        "pool_size": (entry.input_size[1] // 32, entry.input_size[2] // 32),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": tuple(entry.mean),
        "std": tuple(entry.std),
        "first_conv": "openus.embeddings.conv1",
        "classifier": "head",
        "license": entry.license,
        "origin_url": "https://github.com/XZheng0427/OpenUS",
        "paper_ids": "arXiv:2511.11510",
        "description": entry.description,
    }
    if entry.published:  # timm lists a model as pretrained when its cfg names weights: only published ones
        cfg["hf_hub_id"] = f"{entry.resolved_repo_id}@{entry.revision}"  # the transformers folder
    return cfg


def _has_explicit_weights(kwargs: dict) -> bool:
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    cfg = kwargs.get("pretrained_cfg")
    cfg = cfg if isinstance(cfg, dict) else (cfg.to_dict() if hasattr(cfg, "to_dict") else {})
    return any(overlay.get(k) or cfg.get(k) for k in ("file", "url", "state_dict")) or "hf_hub_id" in overlay


def _create_openus(variant: str, pretrained: bool = False, **kwargs: Any) -> OpenUS:
    from timm.models import build_model_with_cfg

    entry = get_pretrained(TIMM_NAMES[variant])
    if pretrained and not _has_explicit_weights(kwargs):
        if not entry.published:
            raise UnpublishedModelError(
                entry.unpublished_message()
                + f" With timm: timm.create_model('{variant}', pretrained=True, "
                "pretrained_cfg_overlay=dict(file='<folder>/model.safetensors'))"
            )
        # openus_hub's resolver fetches the pinned revision (HF cache first, fails fast offline) and checks its
        # sha256; timm then reads that local file
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
        overlay["file"] = os.path.join(resolve(entry.name)[0], WEIGHTS_NAME)
        kwargs["pretrained_cfg_overlay"] = overlay
    # the preset's architecture; stochastic depth off unless asked for (timm's convention; the preset's rate is
    # the pretraining one). Feature extraction reads every stage's out-norm: build them (before weights load).
    model_args = {**OPENUS_PRESETS[entry.name], "drop_path_rate": 0.0, **kwargs}
    if model_args.get("features_only"):
        model_args.setdefault("all_stage_norms", True)
    return build_model_with_cfg(
        OpenUS, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"feature_cls": "getter", "out_indices": (0, 1, 2, 3), "norm": True},
        **model_args,
    )


def openus_tiny(pretrained: bool = False, **kwargs: Any) -> OpenUS:
    """OpenUS VMamba-T (depths 2-2-8-2, width 96)."""
    return _create_openus("openus_tiny", pretrained=pretrained, **kwargs)


def openus_small(pretrained: bool = False, **kwargs: Any) -> OpenUS:
    """OpenUS VMamba-S (depths 2-2-15-2, width 96), the paper's model."""
    return _create_openus("openus_small", pretrained=pretrained, **kwargs)


def openus_base(pretrained: bool = False, **kwargs: Any) -> OpenUS:
    """OpenUS VMamba-B (depths 2-2-15-2, width 128)."""
    return _create_openus("openus_base", pretrained=pretrained, **kwargs)


default_cfgs: dict = {}  # read by timm's register_model from this module
_REGISTERED = False


def register() -> bool:
    """Register the OpenUS entry points with timm (once). Returns False, and logs why, when timm cannot be imported."""
    global _REGISTERED, default_cfgs
    if _REGISTERED:
        return True
    try:
        from timm.layers import register_notrace_function, register_notrace_module
        from timm.models import generate_default_cfgs, register_model
    except Exception as err:  # noqa: BLE001  (e.g. a torchvision that does not match torch: RuntimeError)
        logger.warning("timm is installed but could not be imported (%s: %s); the openus_* timm models are not "
                       "registered", type(err).__name__, err)
        return False
    # what torch.fx cannot trace through: the scan dispatch, the MLP's chunking, two helpers that branch on shapes
    register_notrace_module(OpenUSMixer)
    register_notrace_module(OpenUSMLP)  # chunks large inputs by their number of positions on a CPU
    register_notrace_function(check_pixel_values)
    register_notrace_function(conv_channels_last)
    default_cfgs = generate_default_cfgs({name: _cfg(name) for name in TIMM_NAMES})
    for fn in (openus_tiny, openus_small, openus_base):
        register_model(fn)
    _REGISTERED = True
    return True
