"""The model under test: name resolution, pooled features (linear probe, k-NN) and segmentation models
(frozen backbone + head, or full fine-tuning) for three kinds of MODEL:

* ``openus``: an openus_hub folder or registry name (``openus-small``): pooled = ``OpenUSModel``'s
  ``pooler_output``; segmentation = ``OpenUSForSemanticSegmentation`` (upstream's MambaDecoder head) built with
  ``from_pretrained``, its ``openus`` backbone frozen or not;
* ``transformers``: any other transformers folder or Hub id (e.g. ConvNeXt, DINOv2): pooled = ``pooler_output``
  when the model returns a ``(batch, C)`` one, else the mean of ``last_hidden_state`` over its tokens / positions;
  segmentation = :class:`LightSegmentationHead` on ``AutoBackbone``'s ``feature_maps`` (up to four stages);
* ``timm``: ``timm:NAME`` with ``--weights FILE`` (local weights: safetensors or a weights-only PyTorch file):
  pooled = the model with ``num_classes=0``; segmentation = the head on ``features_only=True`` maps.

Inputs are normalised with the model's own mean/std (its ``preprocessor_config.json`` or timm's data config;
ImageNet's when it has none).

:func:`resolve_model` is the one place that turns MODEL into a loadable source (it uses
``openus_hub.pretrained.resolve``, which keeps a local folder, maps a registry name to its pinned, sha256-checked
Hub snapshot and a Hub id to its snapshot, the HF cache first, failing in one line offline when it is not cached).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger("training.benchmark")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelError(ValueError):
    """MODEL cannot be loaded; one line saying what to pass instead."""


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user passed
    kind: str  # "openus" | "transformers" | "timm"
    path: str  # folder / Hub id (openus, transformers) or timm model name
    weights: str | None = None  # timm: the local weights file


def resolve_model(spec: str, weights: str | None = None) -> ModelSource:
    """MODEL -> :class:`ModelSource` (see the module docstring)."""
    if spec.startswith("timm:"):
        name = spec[len("timm:"):]
        if not name:
            raise ModelError("timm:NAME needs a model name, e.g. timm:convnext_tiny")
        if weights is None:
            raise ModelError(f"{spec}: pass --weights FILE (local timm weights, .safetensors or .pth); nothing is "
                             "downloaded")
        if not Path(weights).is_file():
            raise ModelError(f"--weights {weights} does not exist")
        return ModelSource(spec, "timm", name, str(weights))
    if weights is not None:
        raise ModelError("--weights is for timm:NAME models only; a folder or Hub id carries its own weights")
    import openus_hub  # noqa: F401  (registers the OpenUS classes with transformers)
    from openus_hub.pretrained import OpenUSHubError, resolve
    from transformers import AutoConfig

    try:
        path, _ = resolve(spec)
    except (OpenUSHubError, OSError) as err:
        raise ModelError(f"--model {spec}: {str(err).splitlines()[0]}") from None
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"--model {spec}: no transformers config.json there ({str(err).splitlines()[0][:200]}); "
                         "pass an openus_hub/transformers folder, a Hub id in the local cache, a registry name, or "
                         "timm:NAME --weights FILE") from None
    return ModelSource(spec, "openus" if config.model_type == "openus" else "transformers", path)


def describe_source(source: ModelSource) -> dict:
    """What identifies the weights: kind, name (no local path) and the sha256 of the weight file(s)."""
    from openus_hub.pretrained import sha256_file

    files: list[Path] = []
    if source.kind == "timm":
        files = [Path(source.weights)]
    elif Path(source.path).is_dir():
        folder = Path(source.path)
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        files += [folder / "config.json"] if (folder / "config.json").is_file() else []
    name = source.spec if source.kind == "timm" or not Path(source.spec).exists() else Path(source.spec).resolve().name
    return {"name": name, "kind": source.kind,
            "files": {p.name: sha256_file(p) for p in files}}


# ---------------------------------------------------------------------------------------------------------------------
# loading


def _load_timm(source: ModelSource, **kwargs) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ModelError('timm models need timm: pip install "openus_hub[timm]"') from None
    try:
        return timm.create_model(source.path, pretrained=True, pretrained_cfg_overlay={"file": source.weights},
                                 **kwargs)
    except RuntimeError as err:  # unknown model, mismatched weights
        raise ModelError(f"timm model {source.path} with {Path(source.weights).name}: "
                         f"{str(err).splitlines()[0][:300]}") from None


def normalisation(source: ModelSource) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the model expects on [0, 1] pixels."""
    if source.kind == "timm":
        import timm.data

        cfg = timm.data.resolve_model_data_config(_load_timm(source, num_classes=0))
        return tuple(cfg["mean"]), tuple(cfg["std"])
    folder = Path(source.path)
    pre = folder / "preprocessor_config.json"
    if folder.is_dir() and pre.is_file():
        cfg = json.loads(pre.read_text(encoding="utf-8"))
        if cfg.get("image_mean") is not None and cfg.get("image_std") is not None:
            mean, std = cfg["image_mean"], cfg["image_std"]
            mean = (mean,) * 3 if isinstance(mean, (int, float)) else tuple(mean)
            std = (std,) * 3 if isinstance(std, (int, float)) else tuple(std)
            return mean, std
    return IMAGENET_MEAN, IMAGENET_STD


class PooledFeatures(nn.Module):
    """``pixel_values -> (B, C)`` frozen features of the model (see the module docstring)."""

    def __init__(self, source: ModelSource):
        super().__init__()
        self.kind = source.kind
        if source.kind == "timm":
            self.model = _load_timm(source, num_classes=0)
        else:
            from openus_hub import AutoModel

            self.model = AutoModel.from_pretrained(source.path)
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.kind == "timm":
            return self.model(pixel_values).flatten(1)
        out = self.model(pixel_values=pixel_values)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None and pooled.ndim == 2:
            return pooled
        hidden = out.last_hidden_state
        if hidden.ndim == 4:  # (B, C, H, W)
            return hidden.mean(dim=(2, 3))
        return hidden.mean(dim=1)  # (B, N, C)


# ---------------------------------------------------------------------------------------------------------------------
# segmentation


class LightSegmentationHead(nn.Module):
    """A light head for backbones without one of their own (SegFormer's all-MLP decoder in convolutions): each
    feature map -> 1x1 conv to ``width`` channels -> resized (bilinear) to the finest map -> concatenated -> 1x1 conv
    + BatchNorm + ReLU -> 1x1 conv to the classes; logits are resized to the input by the caller."""

    def __init__(self, in_channels: list[int], num_labels: int, width: int = 128):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(width * len(in_channels), width, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(width, num_labels, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        x = [F.interpolate(p(m), size=size, mode="bilinear", align_corners=False) if m.shape[-2:] != size else p(m)
             for p, m in zip(self.proj, maps)]
        return self.classifier(self.fuse(torch.cat(x, dim=1)))


def _stage_subset(n: int, most: int = 4) -> list[int]:
    """Up to ``most`` of ``n`` stages (1-based), evenly spaced and ending at the last."""
    if n <= most:
        return list(range(1, n + 1))
    return [round(n * (i + 1) / most) for i in range(most)]


class Segmenter(nn.Module):
    """A backbone and a head; ``forward(pixel_values) -> logits (B, K, H, W)`` at the input size. ``frozen``: the
    backbone stays in eval mode without gradients (its forward then builds no graph)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, run, frozen: bool):
        super().__init__()
        self.backbone, self.head, self._run, self.frozen = backbone, head, run, frozen
        if frozen:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        logits = self._run(self, pixel_values)
        if logits.shape[-2:] != pixel_values.shape[-2:]:
            logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(head parameters, trainable backbone parameters)."""
        return list(self.head.parameters()), [p for p in self.backbone.parameters() if p.requires_grad]


def _run_openus(seg: Segmenter, x: torch.Tensor) -> torch.Tensor:
    return seg.model(pixel_values=x).logits


def _run_maps(seg: Segmenter, x: torch.Tensor) -> torch.Tensor:
    if seg.kind == "timm":
        maps = seg.backbone(x)
    else:
        maps = list(seg.backbone(pixel_values=x).feature_maps)
    return seg.head(maps)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def build_segmenter(source: ModelSource, classes: list[str], frozen: bool, head_width: int = 128) -> Segmenter:
    """A fresh segmentation model for ``classes`` on ``source``'s weights (see the module docstring)."""
    num_labels = len(classes)
    id2label = dict(enumerate(classes))
    if source.kind == "openus":
        from openus_hub import OpenUSForSemanticSegmentation

        with _quiet_transformers():  # the new head's "newly initialized" report: checked below instead
            model, info = OpenUSForSemanticSegmentation.from_pretrained(
                source.path, num_labels=num_labels, id2label=id2label, label2id={v: k for k, v in id2label.items()},
                output_loading_info=True)
        # only the head may be new: a backbone tensor missing from the folder means its weights were not used
        # (stage norms are per head in openus_hub: a folder may hold only the last stage's)
        missing = [k for k in info["missing_keys"] if not k.startswith("decoder.") and ".stage_norms." not in
                   f".{k}"]
        if missing:
            raise ModelError(f"--model {source.spec}: backbone weights missing from the folder "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); is it an OpenUS "
                             "backbone folder?")
        head = nn.ModuleList(m for name, m in model.named_children() if name != "openus")
        seg = Segmenter(model.openus, head, _run_openus, frozen)
        object.__setattr__(seg, "model", model)  # not a second registration: its modules are backbone + head
        seg.kind = "openus"
        return seg
    if source.kind == "timm":
        probe = _load_timm(source, features_only=True)
        n = len(probe.feature_info.channels())
        keep = [i - 1 for i in _stage_subset(n)]
        backbone = _load_timm(source, features_only=True, out_indices=keep)
        channels = backbone.feature_info.channels()
    else:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING

        config = AutoConfig.from_pretrained(source.path)
        stages = [n for n in getattr(config, "stage_names", []) if n != "stem"]
        # AutoBackbone's class for this config, called directly (AutoBackbone itself asks the Hub about local paths)
        backbone_cls = MODEL_FOR_BACKBONE_MAPPING.get(type(config), None)
        if not stages or backbone_cls is None:
            raise ModelError(f"--model {source.spec}: {config.model_type} has no transformers backbone "
                             "(AutoBackbone); the segmentation protocols need stage feature maps")
        try:
            with _quiet_transformers():  # stage norms a backbone adds to a base-model folder are newly initialised
                backbone = backbone_cls.from_pretrained(source.path, out_indices=_stage_subset(len(stages)))
        except ValueError as err:
            raise ModelError(f"--model {source.spec}: AutoBackbone cannot load it ({str(err).splitlines()[0]})") \
                from None
        channels = list(backbone.channels)
    seg = Segmenter(backbone, LightSegmentationHead(channels, num_labels, head_width), _run_maps, frozen)
    seg.kind = source.kind
    return seg


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_threads(value: int | None) -> None:
    if value:
        torch.set_num_threads(int(value))
        os.environ.setdefault("OMP_NUM_THREADS", str(value))
