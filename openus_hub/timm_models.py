"""OpenUS backbones as timm models: ``timm.create_model("openus_small", features_only=True)``.

:func:`register` adds three timm entry points, ``openus_tiny``, ``openus_small`` and ``openus_base`` (the presets of
:meth:`OpenUSConfig.from_preset`), each with a ``pretrained_cfg`` built from the openus_hub registry
(:func:`openus_hub.pretrained.get_pretrained`): the Hub repo (``hf_hub_id``, ``repo@revision`` once pinned), input
size, mean/std and licence. timm reads ``model.safetensors`` from that repo, the very file the transformers folder
holds, and :func:`checkpoint_filter_fn` maps its keys onto :class:`OpenUS`. ``import openus_hub`` calls
:func:`register` when timm is installed, so timm users need nothing new:

    import openus_hub, timm
    timm.list_models("openus*")                    # ['openus_base', 'openus_small', 'openus_tiny']
    backbone = timm.create_model("openus_small", features_only=True, out_indices=(1, 3),
                                 pretrained=True, pretrained_cfg_overlay=dict(file="openus-small/model.safetensors"))

:class:`OpenUS` wraps an :class:`OpenUSModel` under ``openus.`` (the transformers layers, not a copy) and adds
timm's interface: ``forward_features`` (last out-normed stage map, NCHW), ``forward_head`` (mean pool, dropout,
linear), ``reset_classifier``, ``forward_intermediates`` / ``prune_intermediate_layers`` (``features_only`` goes
through timm's ``FeatureGetterNet``) and ``feature_info``. Feature maps are the out-normed stage maps, the same
tensors as ``OpenUSBackbone(...).feature_maps`` for the same weights. Architecture keywords
(``embed_dim``, ``depths``, ``d_state``, ``ssm_ratio``, ... any :class:`OpenUSConfig` field) pass through
``timm.create_model`` and override the preset; ``drop_path_rate`` defaults to 0 (timm's convention), not the preset's
pretraining rate.

While an entry has no published weights (see its registry status), ``pretrained=True`` without a ``file``, ``url``
or ``state_dict`` in ``pretrained_cfg_overlay`` raises :class:`~openus_hub.pretrained.UnpublishedModelError`: never
random weights. Weights are read as timm reads them, without the registry's sha256 check.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .models.openus.configuration_openus import OPENUS_PRESETS, OpenUSConfig
from .models.openus.modeling_openus import OpenUSModel
from .pretrained import UnpublishedModelError, get_pretrained

__all__ = ["TIMM_NAMES", "OpenUS", "checkpoint_filter_fn", "register"]

logger = logging.getLogger(__name__)

# timm entry point -> openus_hub registry name (also the OpenUSConfig preset)
TIMM_NAMES = {"openus_tiny": "openus-tiny", "openus_small": "openus-small", "openus_base": "openus-base"}
_FEATURE_MODULE = "openus.encoder.stages.{}"


class OpenUS(nn.Module):
    """OpenUS (VMamba) for timm: the transformers :class:`OpenUSModel` under ``openus.``, plus a classifier head.

    Args:
        num_classes: classes of the linear head on the mean-pooled last stage; 0 gives pooled features.
        in_chans: input channels (``OpenUSConfig.num_channels``).
        global_pool: ``"avg"`` (mean over positions, as ``OpenUSModel.pooler_output``) or ``""`` (no pooling).
        drop_rate: dropout before the head.
        **config_kwargs: :class:`OpenUSConfig` fields (``embed_dim``, ``depths``, ``d_state``, ``ssm_ratio``,
            ``drop_path_rate``, ``scan_implementation``, ...).
    """

    def __init__(
        self,
        num_classes: int = 0,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        **config_kwargs: Any,
    ):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        config = OpenUSConfig(num_channels=in_chans, **config_kwargs)
        self.openus = OpenUSModel(config)
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
        if isinstance(self.head, nn.Linear):  # upstream init: trunc_normal(0.02), zero bias
            self.openus._init_weights(self.head)

    def _make_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

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
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (old names warn)
        on = getattr(self.openus, "activation_checkpointing_enable", self.openus.gradient_checkpointing_enable)
        off = getattr(self.openus, "activation_checkpointing_disable", self.openus.gradient_checkpointing_disable)
        if enable:
            on()
        else:
            off()

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
        if isinstance(self.head, nn.Linear):
            self.openus._init_weights(self.head)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Out-normed stage maps (``OpenUSModel.stage_features``), NCHW or NHWC.

        ``indices``: last n stages if an int, those listed if a sequence, all if None. Every stage map goes through
        its own ``stage_norms`` LayerNorm (the OpenUS feature contract), so ``norm`` changes nothing.
        Returns the maps, or ``(last stage map NCHW, maps)`` unless ``intermediates_only``.
        """
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        encoder = self.openus.encoder
        take_indices, max_index = feature_take_indices(len(encoder.stages), indices)
        self.openus._check_input(x)
        # the same calls as OpenUSModel._encode / OpenUSEncoder.forward, so the maps are bit-identical
        h = self.openus.embeddings(x.to(self.openus.embeddings.conv1.weight.dtype))  # [B, H/4, W/4, C]
        last = max_index if stop_early else len(encoder.stages) - 1
        intermediates, final = [], None
        for i in range(last + 1):
            h = encoder.stages[i](h)  # [B, H_i, W_i, C_i]
            if i in take_indices or (i == last and not intermediates_only):
                normed = self.openus.stage_norms[i](h)
                if i in take_indices:
                    intermediates.append(normed)
                final = normed
            if i < len(encoder.downsamples) and i < last:
                h = encoder.downsamples[i](h)
        if output_fmt == "NCHW":
            intermediates = [m.permute(0, 3, 1, 2) for m in intermediates]
        if intermediates_only:
            return intermediates
        return final.permute(0, 3, 1, 2), intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] | tuple[int, ...] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages after the last one ``indices`` needs (and the head). Stage norms are kept: they are part
        of every stage map."""
        from timm.models._features import feature_take_indices

        encoder = self.openus.encoder
        take_indices, max_index = feature_take_indices(len(encoder.stages), indices)
        if max_index < len(encoder.stages) - 1:
            encoder.stages = encoder.stages[: max_index + 1]
            encoder.downsamples = encoder.downsamples[:max_index]
            self.openus.stage_norms = self.openus.stage_norms[: max_index + 1]
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_head = True
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last out-normed stage map, ``(B, C, H/32, W/32)``."""
        return self.forward_intermediates(x, indices=1, intermediates_only=True)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))  # [B, C], = OpenUSModel pooler_output
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: OpenUS) -> dict[str, torch.Tensor]:
    """Map a transformers OpenUS state dict onto :class:`OpenUS`.

    Accepts the bare ``OpenUSModel`` layout (``embeddings.``, ``encoder.``, ``stage_norms.``), the head models'
    ``openus.`` layout (``OpenUSBackbone``, ``OpenUSForImageClassification``: ``classifier.`` becomes ``head.``;
    ``OpenUSForSemanticSegmentation``: its decoder is dropped) and timm's own. A pretraining ``mask_token`` is
    dropped when the model has none. Backbone keys are kept as they are, so an architecture mismatch still fails
    timm's strict load."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    model_keys = set(model.state_dict())
    out, dropped = {}, []
    for key, value in state_dict.items():
        if key.startswith(("embeddings.", "encoder.", "stage_norms.")):
            key = "openus." + key
        elif key.startswith("classifier."):
            key = "head." + key[len("classifier."):]
        backbone = key.startswith("openus.") and (key != "openus.embeddings.mask_token" or key in model_keys)
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
    hub_id = entry.resolved_repo_id + (f"@{entry.revision}" if entry.revision else "")
    return {
        "hf_hub_id": hub_id,  # the transformers folder: timm reads its model.safetensors
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
                + f"\nWith timm: timm.create_model('{variant}', pretrained=True, "
                "pretrained_cfg_overlay=dict(file='<folder>/model.safetensors'))"
            )
        # the registry may have gained a pinned revision since register() (register_pretrained, OPENUS_HUB_REGISTRY)
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
        overlay.setdefault("hf_hub_id", f"{entry.resolved_repo_id}@{entry.revision}")
        kwargs["pretrained_cfg_overlay"] = overlay
    # the preset's architecture; stochastic depth off unless asked for (timm's convention; the preset's rate is
    # the pretraining one)
    model_args = {**OPENUS_PRESETS[entry.name], "drop_path_rate": 0.0, **kwargs}
    return build_model_with_cfg(
        OpenUS, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"feature_cls": "getter", "out_indices": (0, 1, 2, 3)},
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
        from timm.models import generate_default_cfgs, register_model
    except Exception as err:  # noqa: BLE001  (e.g. a torchvision that does not match torch: RuntimeError)
        logger.warning("timm is installed but could not be imported (%s: %s); the openus_* timm models are not "
                       "registered", type(err).__name__, err)
        return False
    default_cfgs = generate_default_cfgs({name: _cfg(name) for name in TIMM_NAMES})
    for fn in (openus_tiny, openus_small, openus_base):
        register_model(fn)
    _REGISTERED = True
    return True
