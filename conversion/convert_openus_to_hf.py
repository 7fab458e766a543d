"""Convert an upstream OpenUS checkpoint (XZheng0427/OpenUS) into an openus_hub folder (config.json + safetensors).

Accepted inputs:

* an upstream pretraining checkpoint ``checkpoint00X0.pth`` (``student``/``teacher``/``optimizer``/``args``/...,
  written by ``main_openus.py:417-430`` in XZheng0427/OpenUS @ 6b9f6d2e), loaded with
  ``torch.load(weights_only=True)`` and an explicit allowlist (it pickles an ``argparse.Namespace`` and numpy
  scalars); ``--source teacher`` (default, the EMA model every upstream evaluation uses) or ``student``;
* a plain state dict (``.safetensors`` or ``.pth``) whose backbone keys carry a ``backbone.`` prefix (e.g. the
  segmentation model: the other top-level groups are reported and dropped), or no prefix at all.

The architecture (depths, widths, d_state, ssm_ratio, dt ranks, conv kernel, MLP ratio) is inferred from tensor
shapes; no preset name is needed. Every key is accounted for: renamed, or dropped as a reported pretraining-only
group; anything else is an error.

Without ``--seg-head`` the output is an ``OpenUSBackbone`` folder returning all four stages, with all four of
upstream's out-norms: ``AutoBackbone`` gives upstream's four stage maps, ``AutoModel`` its tokens and pooled feature.

With ``--seg-head HEAD`` the output is one ``OpenUSForSemanticSegmentation`` folder (backbone + upstream MambaDecoder
head, ``vmamba_models/MambaDecoder.py:151-280``), loadable with ``AutoModelForSemanticSegmentation``. ``HEAD`` is what
upstream's ``eval_segmentation.py`` saves (``{epoch, state_dict, optimizer, scheduler, best_miou, best_dice}``, the
head's keys ``decoder.*``), or a plain state dict (``.safetensors``/``.pth``) holding the head as top-level
``decoder.*`` keys, e.g. beside ``backbone.*``; ``--seg-head`` without a value takes the head from ``--checkpoint``.
The decoder's width, depths, d_state, SS2D ratio, attention reductions and number of labels are inferred from the
head's shapes.

Integrity: a zip checkpoint's member CRCs are verified before it is read (``torch.load`` does not check them), and
``--expect-sha256`` checks the whole file. Every kept tensor must be floating point and finite (``--allow-nonfinite``
lets NaN/Inf through), block numbering must have no gaps (a missing block is a corrupt file, not a smaller model),
and in a pretraining checkpoint the teacher, the student and the optimizer's parameter list must agree on the
architecture. Only a plain state dict that lacks the *last* block of a stage cannot be told from a shallower model:
the inferred depths are logged (and a warning names a preset whose other shapes match), and ``--expect-sha256`` is
the check for such files.

The output folder may not contain the input; ``--overwrite`` replaces only a folder holding a previous export, and the
swap is crash-safe (``conversion/_common.py``).

Usage:
    python conversion/convert_openus_to_hf.py --checkpoint PATH --output-dir DIR [--source teacher|student]
        [--keep-mask-token] [--overwrite] [--seg-head [HEAD]] [--card-name NAME] [--no-card]
        [--expect-sha256 HEX] [--allow-nonfinite]

Unless ``--no-card``, the saved folder is reloaded and compared with the converted tensors run through the reference
scan (fixed-seed random input), and README.md is written from model_cards/ with the source sha256, the upstream
commit and the measured max abs difference.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from collections import defaultdict

import torch

from openus_hub.pretrained import OPENUS_UPSTREAM_COMMIT as UPSTREAM_COMMIT  # the upstream pins live in the registry
from openus_hub.pretrained import OPENUS_UPSTREAM as UPSTREAM_REPO

if __package__:  # imported as the `conversion` package
    from .model_card import CardError, check_card_name
    from ._common import (ConversionError, blaming, check_floating_point, check_output_dir, check_sha256,
                          max_abs_diff, one_line, save_atomic, sha256_file, verify_zip_checkpoint)
else:  # run as a script: this folder is on sys.path
    from model_card import CardError, check_card_name
    from _common import (ConversionError, blaming, check_floating_point, check_output_dir, check_sha256,
                         max_abs_diff, one_line, save_atomic, sha256_file, verify_zip_checkpoint)

logger = logging.getLogger("convert_openus_to_hf")

# fmt: off
ORIGINAL_TO_CONVERTED_KEY_MAPPING = {
    r"^patch_embed\.0\.":                                   r"embeddings.conv1.",
    r"^patch_embed\.2\.":                                   r"embeddings.norm1.",
    r"^patch_embed\.5\.":                                   r"embeddings.conv2.",
    r"^patch_embed\.7\.":                                   r"embeddings.norm2.",
    r"^masked_embed$":                                      r"embeddings.mask_token",
    r"^layers\.(\d+)\.blocks\.(\d+)\.norm\.":               r"encoder.stages.\1.layers.\2.norm.",
    r"^layers\.(\d+)\.blocks\.(\d+)\.norm2\.":              r"encoder.stages.\1.layers.\2.norm2.",
    r"^layers\.(\d+)\.blocks\.(\d+)\.mlp\.(fc[12])\.":      r"encoder.stages.\1.layers.\2.mlp.\3.",
    r"^layers\.(\d+)\.blocks\.(\d+)\.op\.in_proj\.":        r"encoder.stages.\1.layers.\2.mixer.in_proj.",
    r"^layers\.(\d+)\.blocks\.(\d+)\.op\.conv2d\.":         r"encoder.stages.\1.layers.\2.mixer.conv2d.",
    r"^layers\.(\d+)\.blocks\.(\d+)\.op\.x_proj_weight$":   r"encoder.stages.\1.layers.\2.mixer.x_proj_weight",
    r"^layers\.(\d+)\.blocks\.(\d+)\.op\.dt_projs_weight$": r"encoder.stages.\1.layers.\2.mixer.dt_proj_weight",
    r"^layers\.(\d+)\.blocks\.(\d+)\.op\.dt_projs_bias$":   r"encoder.stages.\1.layers.\2.mixer.dt_proj_bias",
    r"^layers\.(\d+)\.blocks\.(\d+)\.op\.A_logs$":          r"encoder.stages.\1.layers.\2.mixer.A_log",
    r"^layers\.(\d+)\.blocks\.(\d+)\.op\.Ds$":              r"encoder.stages.\1.layers.\2.mixer.D",
    r"^layers\.(\d+)\.blocks\.(\d+)\.op\.out_norm\.":       r"encoder.stages.\1.layers.\2.mixer.out_norm.",
    r"^layers\.(\d+)\.blocks\.(\d+)\.op\.out_proj\.":       r"encoder.stages.\1.layers.\2.mixer.out_proj.",
    r"^layers\.(\d+)\.downsample\.1\.":                     r"encoder.downsamples.\1.conv.",
    r"^layers\.(\d+)\.downsample\.3\.":                     r"encoder.downsamples.\1.norm.",
    r"^outnorm(\d+)\.":                                     r"stage_norms.\1.",
}
# pretraining-only tensors of the upstream backbone module, dropped and reported by group
PRETRAINING_ONLY_KEYS = {
    r"^decoder\.":           "pixel-reconstruction decoder (decoder.*)",
    r"^decoder2\.":          "unused second reconstruction decoder (decoder2.*)",
    r"^ema_initialized$":    "reconstruction-loss EMA flag (ema_initialized)",
    r"^ema_loss_map$":       "reconstruction-loss EMA map (ema_loss_map)",
    r"^masked_embed$":       "masked-image-modelling token (masked_embed; keep with --keep-mask-token)",
    r"^classifier\.":        "ImageNet classifier (classifier.*)",
}
# fmt: on

# upstream MambaDecoder head (keys without their leading "decoder."). "<i>" marks an upstream layers_up index i >= 1,
# which becomes decoder stage i - 1 (layers_up.0 is the patch expansion). _BLOCK / _LAYER: a CVSS decoder block.
_BLOCK, _LAYER = r"^layers_up\.(\d+)\.blocks\.(\d+)\.", r"decoder.stages.<\1>.layers.\2."
# fmt: off
HEAD_ORIGINAL_TO_CONVERTED_KEY_MAPPING = {
    r"^layers_up\.0\.expand\.":            r"decoder.patch_expand.expand.",
    r"^layers_up\.0\.norm\.":              r"decoder.patch_expand.norm.",
    _BLOCK + r"scale([12])$":              _LAYER + r"scale\3",
    _BLOCK + r"norm([12])\.":              _LAYER + r"norm\3.",
    _BLOCK + r"op\.in_proj\.":             _LAYER + r"mixer.in_proj.",
    _BLOCK + r"op\.conv2d\.":              _LAYER + r"mixer.conv2d.",
    _BLOCK + r"op\.x_proj_weight$":        _LAYER + r"mixer.x_proj_weight",
    _BLOCK + r"op\.dt_projs_weight$":      _LAYER + r"mixer.dt_proj_weight",
    _BLOCK + r"op\.dt_projs_bias$":        _LAYER + r"mixer.dt_proj_bias",
    _BLOCK + r"op\.A_logs$":               _LAYER + r"mixer.A_log",
    _BLOCK + r"op\.Ds$":                   _LAYER + r"mixer.D",
    _BLOCK + r"op\.out_norm\.":            _LAYER + r"mixer.out_norm.",
    _BLOCK + r"op\.out_proj\.":            _LAYER + r"mixer.out_proj.",
    _BLOCK + r"conv_blk\.cab\.0\.":        _LAYER + r"conv_attention.conv1.",
    _BLOCK + r"conv_blk\.cab\.2\.":        _LAYER + r"conv_attention.conv2.",
    _BLOCK + r"conv_blk\.cab\.3\.fc\.0\.": _LAYER + r"conv_attention.attention.fc1.",
    _BLOCK + r"conv_blk\.cab\.3\.fc\.2\.": _LAYER + r"conv_attention.attention.fc2.",
    r"^layers_up\.(\d+)\.upsample\.":      r"decoder.stages.<\1>.upsample.",
    r"^norm_up\.":                         r"decoder.norm.",
    r"^up\.":                              r"decoder.final_upsample.",
    r"^output\.":                          r"decoder.classifier.",
}
# fmt: on

SOURCE_PREFIXES = {"teacher": ("teacher", "backbone."), "student": ("student", "module.backbone.")}


def _torch_load_allowlisted(path: str) -> object:
    """``torch.load(weights_only=True)`` with exactly what upstream checkpoints pickle besides tensors."""
    import argparse as _argparse

    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    # numpy 1 pickles the scalar reconstructor as numpy.core.multiarray.scalar (upstream's files), numpy 2 as
    # numpy._core.multiarray.scalar (a checkpoint loaded and saved again here): allow both names of the one function
    allow = [_argparse.Namespace, scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype,
             type(np.dtype(np.float64))]
    with torch.serialization.safe_globals(allow):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: str, expect_sha256: str | None = None) -> dict:
    """Read a ``.pth``/``.pt``/``.safetensors`` file into a dict, with one-line errors for unreadable files.

    ``expect_sha256`` (hex) is checked first; a zip checkpoint's member CRCs are verified before ``torch.load``."""
    if not os.path.isfile(path):
        raise ConversionError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise ConversionError(f"{path} is empty (0 bytes); re-download or re-copy it")
    check_sha256(path, expect_sha256)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:
            raise ConversionError(f"{path} is not a readable safetensors file (corrupt or truncated?): "
                                  f"{one_line(err)[:200]}") from None
    verify_zip_checkpoint(path)
    try:
        obj = _torch_load_allowlisted(path)
    except Exception as err:  # zip/pickle errors for corrupt or truncated files, UnpicklingError for disallowed globals
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(
            f"{path} could not be read as a PyTorch checkpoint with weights_only=True "
            f"({type(err).__name__}: {msg[:200]}); is it corrupt, truncated, or not an OpenUS checkpoint?"
        ) from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict or an OpenUS checkpoint dict")
    return obj


_STRUCTURE = re.compile(r"^(patch_embed|layers|outnorm\d)\.")


def _check_pretraining_consistency(ckpt: dict) -> None:
    """Teacher, student and optimizer of an upstream pretraining checkpoint describe one architecture.

    The teacher is an EMA copy of the student's backbone (same keys and shapes); upstream's AdamW holds every
    trainable student tensor except the frozen ``last_layer*.weight_g`` (``utils.py:738-749``), so the optimizer's
    parameter count bounds the number of student tensors. A block missing from either network breaks one of these."""
    teacher, student = ckpt.get("teacher"), ckpt.get("student")
    if not (isinstance(teacher, dict) and isinstance(student, dict) and teacher and student):
        return

    def structure(state: dict, prefix: str) -> dict:
        return {k[len(prefix):]: tuple(getattr(v, "shape", ())) for k, v in state.items()
                if k.startswith(prefix) and _STRUCTURE.match(k[len(prefix):])}

    t, s = structure(teacher, "backbone."), structure(student, "module.backbone.")
    if t and s and t != s:
        only_t, only_s = sorted(set(t) - set(s)), sorted(set(s) - set(t))
        shapes = sorted(k for k in set(t) & set(s) if t[k] != s[k])
        detail = "; ".join(x for x in (
            f"only the teacher has {_blocks(only_t)}" if only_t else "",
            f"only the student has {_blocks(only_s)}" if only_s else "",
            f"shapes differ for {shapes[:3]}" if shapes else "") if x)
        raise ConversionError(f"the teacher and student backbones of this checkpoint differ ({detail}): upstream "
                              "saves two copies of one architecture, so the file is corrupt or was edited")
    groups = (ckpt.get("optimizer") or {}).get("param_groups") if isinstance(ckpt.get("optimizer"), dict) else None
    if isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        n_opt = sum(len(g["params"]) for g in groups)
        tensors = [k for k in student if not k.endswith(("ema_loss_map", "ema_initialized"))]
        frozen = sum(k.endswith("weight_g") for k in tensors)
        if not len(tensors) - frozen <= n_opt <= len(tensors):
            raise ConversionError(f"the optimizer state lists {n_opt} trainable tensors but the student holds "
                                  f"{len(tensors)} ({frozen} of them frozen): tensors are missing from the checkpoint "
                                  "(corrupt or edited file)")


@contextlib.contextmanager
def _shapes_of(path: str, what: str):
    """Turn an IndexError/ValueError from reading tensor shapes into a one-line ConversionError naming the file."""
    try:
        yield
    except ConversionError:
        raise
    except (IndexError, ValueError, TypeError, KeyError) as err:
        raise ConversionError(f"{path}: the tensor shapes are not those of an upstream {what} ({type(err).__name__}: "
                              f"{one_line(err)[:120]}); the file is corrupt or holds another model") from None


def _blocks(keys: list[str]) -> str:
    """Group keys like layers.2.blocks.1.op.Ds into 'layers.2.blocks.1.*' for messages."""
    groups = sorted({".".join(k.split(".")[:4]) + ".*" if k.startswith("layers.") and ".blocks." in k else k
                     for k in keys})
    return ", ".join(groups[:4]) + (f" and {len(groups) - 4} more" if len(groups) > 4 else "")


def extract_backbone(ckpt: dict, source: str = "teacher") -> tuple[dict, dict[str, list[str]]]:
    """Pick the backbone tensors (upstream names, no prefix) and the dropped top-level groups of a loaded file."""
    dropped: dict[str, list[str]] = defaultdict(list)
    if "teacher" in ckpt or "student" in ckpt:  # upstream pretraining checkpoint
        _check_pretraining_consistency(ckpt)
        entry, prefix = SOURCE_PREFIXES[source]
        if entry not in ckpt:
            raise ConversionError(f"checkpoint has no '{entry}' entry (has {sorted(ckpt)}); try --source "
                                  f"{'student' if source == 'teacher' else 'teacher'}")
        state = ckpt[entry]
        for key in sorted(set(ckpt) - {entry}):
            dropped["other checkpoint entries"].append(key)
    else:
        for nest in ("model", "state_dict"):
            if nest in ckpt and isinstance(ckpt[nest], dict):
                ckpt = ckpt[nest]
        state, prefix = ckpt, None
        for candidate in ("module.backbone.", "backbone."):
            if any(k.startswith(candidate) for k in state):
                prefix = candidate
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError("the selected entry is not a state dict of tensors")
    out = {}
    for key, value in state.items():
        if prefix is None:
            out[key] = value
        elif key.startswith(prefix):
            out[key[len(prefix):]] = value
        else:
            group = key.split(".")[0] if not key.startswith("module.") else ".".join(key.split(".")[:2])
            dropped[f"non-backbone group '{group}.*'"].append(key)
    if "patch_embed.0.weight" not in out or not any(k.startswith("layers.") for k in out):
        raise ConversionError(
            "no OpenUS/VMamba backbone found: expected keys like 'patch_embed.0.weight' and 'layers.0.blocks.0.*' "
            f"(optionally prefixed by 'backbone.'); first keys seen: {list(state)[:5]}"
        )
    return out, dict(dropped)


def rename_keys(state: dict, keep_mask_token: bool = False) -> tuple[dict, dict[str, list[str]]]:
    """Map upstream backbone keys to ours; returns (renamed, dropped-by-group). Unknown keys raise."""
    renamed, dropped, unknown = {}, defaultdict(list), []
    for key, value in state.items():
        if key == "masked_embed" and keep_mask_token:
            renamed["embeddings.mask_token"] = value
            continue
        group = next((desc for pat, desc in PRETRAINING_ONLY_KEYS.items() if re.search(pat, key)), None)
        if group is not None:
            dropped[group].append(key)
            continue
        for pattern, replacement in ORIGINAL_TO_CONVERTED_KEY_MAPPING.items():
            if re.search(pattern, key):
                renamed[re.sub(pattern, replacement, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"{len(unknown)} backbone key(s) not understood (not OpenUS 'v05_noz' layout?): "
                              f"{unknown[:8]}")
    return renamed, dict(dropped)


# number of dimensions of each upstream backbone tensor (first matching pattern wins); 2-D (out, in) Linear2d weights
_NDIM = ((r"^patch_embed\.[05]\.weight$", 4), (r"\.downsample\.1\.weight$", 4), (r"\.op\.conv2d\.weight$", 4),
         (r"\.op\.(x_proj_weight|dt_projs_weight)$", 3), (r"\.op\.(dt_projs_bias|A_logs)$", 2),
         (r"\.(in_proj|out_proj|fc1|fc2)\.weight$", 2), (r"(\.Ds|\.weight|\.bias)$", 1))


def check_structure(state: dict) -> None:
    """Tensor ranks, and stage/block numbering without gaps, of an upstream backbone state dict (no prefix).

    A block missing from the middle of a stage, or one that lacks some of the tensors its neighbours have, is a
    corrupt file, never a smaller model."""
    for key, value in state.items():
        if not _STRUCTURE.match(key):
            continue
        ndim = next((n for pattern, n in _NDIM if re.search(pattern, key)), None)
        if ndim is not None and value.dim() != ndim:
            raise ConversionError(f"{key} has shape {tuple(value.shape)} ({value.dim()}-D); an OpenUS backbone stores "
                                  f"it as a {ndim}-D tensor: the file is corrupt or not an OpenUS checkpoint")
    stage_of = {k: int(m.group(1)) for k in state if (m := re.match(r"^layers\.(\d+)\.", k))}
    stages = sorted(set(stage_of.values()))
    if stages != list(range(len(stages))):
        gap = min(set(range(stages[-1] + 1)) - set(stages))
        raise ConversionError(f"layers.{gap}.* is missing (stages present: {stages}): a missing stage means a corrupt "
                              "or truncated file")
    for i in stages:
        blocks: dict[int, set[str]] = defaultdict(set)
        for key in state:
            if m := re.match(rf"^layers\.{i}\.blocks\.(\d+)\.(.+)$", key):
                blocks[int(m.group(1))].add(m.group(2))
        if not blocks:
            raise ConversionError(f"stage {i} (layers.{i}.*) has no blocks: the file is corrupt or not an OpenUS "
                                  "checkpoint")
        present = sorted(blocks)
        if present != list(range(len(present))):
            gap = min(set(range(present[-1] + 1)) - set(present))
            raise ConversionError(f"layers.{i}.blocks.{gap}.* is missing (blocks present: {present}): a missing block "
                                  "means a corrupt or truncated file, not a smaller model")
        for j in present[1:]:
            if blocks[j] != blocks[0]:
                lacks, extra = sorted(blocks[0] - blocks[j]), sorted(blocks[j] - blocks[0])
                raise ConversionError(
                    f"layers.{i}.blocks.{j} " + (f"lacks {lacks[:4]}" if lacks else f"has extra {extra[:4]}")
                    + f" compared with layers.{i}.blocks.0: the file is corrupt or truncated")


def _preset_depth_warning(kwargs: dict) -> str | None:
    """A message when every inferred shape matches a preset except the depths (possibly a truncated checkpoint)."""
    from openus_hub.models.openus.configuration_openus import OPENUS_PRESETS

    for name, preset in OPENUS_PRESETS.items():
        same = all(kwargs.get(k) == v for k, v in preset.items() if k not in ("drop_path_rate", "depths"))
        if same and kwargs["depths"] != preset["depths"]:
            return (f"the architecture matches {name} except the depths ({kwargs['depths']} instead of "
                    f"{preset['depths']}): if this is an {name} checkpoint, blocks are missing; check the file with "
                    "--expect-sha256")
    return None


def infer_config_kwargs(state: dict) -> dict:
    """Architecture from tensor shapes of an upstream backbone state dict (upstream names, no prefix)."""
    check_structure(state)
    embed_dim = state["patch_embed.5.weight"].shape[0]
    depths = []
    while any(k.startswith(f"layers.{len(depths)}.blocks.") for k in state):
        i = len(depths)
        depths.append(len({k.split(".")[3] for k in state if k.startswith(f"layers.{i}.blocks.")}))
    if not depths:
        raise ConversionError("no 'layers.{i}.blocks.{j}' keys: not a VMamba backbone")
    ratios, ranks, states, kernels, mlp_ratios, conv_bias = set(), [], set(), set(), set(), set()
    for i in range(len(depths)):
        width = embed_dim * 2**i
        b = f"layers.{i}.blocks.0."
        try:
            inner = state[b + "op.in_proj.weight"].shape[0]
            k, r2n, _ = state[b + "op.x_proj_weight"].shape
            rank = state[b + "op.dt_projs_weight"].shape[2]
            n = state[b + "op.A_logs"].shape[1]
            kernels.add(state[b + "op.conv2d.weight"].shape[-1])
        except KeyError as err:
            raise ConversionError(f"stage {i} lacks {err.args[0]!r}: not an OpenUS 'v05_noz' SS2D block") from None
        if k != 4 or r2n != rank + 2 * n or state[b + "op.in_proj.weight"].shape[1] != width:
            raise ConversionError(f"stage {i} SS2D shapes are inconsistent (x_proj {tuple(state[b + 'op.x_proj_weight'].shape)},"
                                  f" dt rank {rank}, d_state {n}, width {width}); is this an 'v05_noz' model?")
        ratios.add(inner / width)
        ranks.append(rank)
        states.add(n)
        conv_bias.add(b + "op.conv2d.bias" in state)
        mlp_ratios.add(state[b + "mlp.fc1.weight"].shape[0] / width if b + "mlp.fc1.weight" in state else 0.0)
    for name, values in (("ssm_ratio", ratios), ("d_state", states), ("conv kernel", kernels),
                         ("mlp_ratio", mlp_ratios), ("conv bias", conv_bias)):
        if len(values) != 1:
            raise ConversionError(f"{name} differs between stages ({sorted(values)}); not supported")
    return {
        "num_channels": state["patch_embed.0.weight"].shape[1],
        "embed_dim": embed_dim,
        "depths": depths,
        "ssm_ratio": ratios.pop(),
        "d_state": states.pop(),
        "dt_ranks": ranks,
        "d_conv": kernels.pop(),
        "conv_bias": conv_bias.pop(),
        "mlp_ratio": mlp_ratios.pop(),
    }


def _drop_path_for(kwargs: dict) -> float:
    """Stochastic depth is not in the weights: use the matching preset's, else upstream's class default 0.3."""
    from openus_hub.models.openus.configuration_openus import OPENUS_PRESETS

    for preset in OPENUS_PRESETS.values():
        if all(kwargs.get(k) == v for k, v in preset.items() if k != "drop_path_rate"):
            return preset["drop_path_rate"]
    return 0.3


def convert(checkpoint: str, source: str = "teacher", keep_mask_token: bool = False, *,
            expect_sha256: str | None = None, allow_nonfinite: bool = False):
    """Load and convert; returns (model, report dict). Raises ConversionError (naming the file) on anything
    unexpected."""
    ckpt = load_checkpoint(checkpoint, expect_sha256)
    with blaming(checkpoint):
        return _convert(ckpt, checkpoint, source, keep_mask_token, allow_nonfinite)


def _convert(ckpt: dict, checkpoint: str, source: str, keep_mask_token: bool, allow_nonfinite: bool):
    """The model is an ``OpenUSBackbone`` returning all four stages, the one class that holds all four of upstream's
    out-norms (``outnorm{i}``): the folder reproduces upstream's four stage maps with ``AutoBackbone``, and loads
    into ``AutoModel`` (which keeps only the last stage's norm) as well."""
    from openus_hub import OpenUSBackbone, OpenUSConfig

    backbone, dropped = extract_backbone(ckpt, source)
    with _shapes_of(checkpoint, "OpenUS backbone"):
        kwargs = infer_config_kwargs(backbone)
    renamed, dropped_backbone = rename_keys(backbone, keep_mask_token)
    check_floating_point(renamed, checkpoint, allow_nonfinite)
    dropped.update(dropped_backbone)
    config = OpenUSConfig(**kwargs, drop_path_rate=_drop_path_for(kwargs),
                          use_mask_token=keep_mask_token and "masked_embed" in backbone,
                          out_indices=list(range(1, len(kwargs["depths"]) + 1)))
    model = OpenUSBackbone(config)
    _check_and_load(model, renamed)
    report = {"config": kwargs, "kept": len(renamed), "dropped": {k: len(v) for k, v in dropped.items()},
              "parameters": sum(p.numel() for p in model.parameters()), "warning": _preset_depth_warning(kwargs)}
    return model.eval(), report


def extract_seg_head(ckpt: dict) -> tuple[dict, dict[str, list[str]]]:
    """The MambaDecoder head of a loaded file (upstream names without ``decoder.``), and what else it held.

    Accepts upstream's ``eval_segmentation.py`` checkpoint (head under ``state_dict``) or a plain state dict whose head
    keys are top-level ``decoder.*`` (optionally ``module.decoder.*``), e.g. beside ``backbone.*``. The backbone's own
    pixel-reconstruction decoders (``backbone.decoder.*``) are never taken for the head."""
    dropped: dict[str, list[str]] = defaultdict(list)
    state = ckpt
    if isinstance(ckpt.get("state_dict"), dict):  # eval_segmentation.py: {epoch, state_dict, optimizer, ...}
        state = ckpt["state_dict"]
        dropped["other checkpoint entries"] = sorted(set(ckpt) - {"state_dict"})
    elif isinstance(ckpt.get("model"), dict):
        state = ckpt["model"]
        dropped["other checkpoint entries"] = sorted(set(ckpt) - {"model"})
    prefix = next((p for p in ("decoder.", "module.decoder.") if any(k.startswith(p) for k in state)), None)
    if prefix is None:
        raise ConversionError(
            "no segmentation head found: expected upstream MambaDecoder keys like 'decoder.layers_up.0.expand.weight' "
            f"(under 'state_dict' in an eval_segmentation.py checkpoint); first keys seen: {list(state)[:5]}"
        )
    head = {}
    for key, value in state.items():
        if key.startswith(prefix):
            if not isinstance(value, torch.Tensor):
                raise ConversionError(f"head entry {key!r} is a {type(value).__name__}, not a tensor")
            head[key[len(prefix):]] = value
        else:
            dropped[f"non-head group '{key.split('.')[0]}.*'"].append(key)
    if "output.weight" not in head or "layers_up.0.expand.weight" not in head:
        raise ConversionError("the head lacks 'decoder.output.weight' or 'decoder.layers_up.0.expand.weight': not an "
                              "upstream MambaDecoder (deep supervision and other decoders are not supported)")
    return head, {k: v for k, v in dropped.items() if v}


def rename_head_keys(head: dict) -> dict:
    """Map upstream MambaDecoder keys (without ``decoder.``) to ours; unknown keys raise."""
    renamed, unknown = {}, []
    for key, value in head.items():
        for pattern, replacement in HEAD_ORIGINAL_TO_CONVERTED_KEY_MAPPING.items():
            if re.search(pattern, key):
                new = re.sub(pattern, replacement, key)
                renamed[re.sub(r"<(\d+)>", lambda m: str(int(m.group(1)) - 1), new)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"{len(unknown)} head key(s) not understood (not an upstream MambaDecoder, or deep "
                              f"supervision heads?): {unknown[:8]}")
    return renamed


def _solve_reduction(widths: list[int], observed: list[int], default: int, what: str) -> int:
    """The integer r with ``max(1, width // r) == observed`` at every level, preferring upstream's default."""
    for r in [default] + list(range(1, max(widths) + 1)):
        if all(max(1, w // r) == o for w, o in zip(widths, observed)):
            return r
    raise ConversionError(f"no single {what} reduction r gives widths {observed} from {widths} (width // r)")


def infer_head_config_kwargs(head: dict, backbone_kwargs: dict) -> dict:
    """Decoder settings from the head's tensor shapes (upstream names without ``decoder.``); checks them against the
    backbone (the decoder adds the backbone's stage maps, so the widths must agree)."""
    num_stages = len(backbone_kwargs["depths"])
    embed_dim = backbone_kwargs["embed_dim"]
    levels = 1 + max(int(k.split(".")[1]) for k in head if k.startswith("layers_up."))
    if levels != num_stages:
        raise ConversionError(f"the head has {levels} decoder levels (layers_up.*), the backbone {num_stages} stages")
    num_labels, width0 = head["output.weight"].shape[:2]
    expand_in = head["layers_up.0.expand.weight"].shape[1]
    if width0 != embed_dim or expand_in != embed_dim * 2 ** (num_stages - 1):
        raise ConversionError(
            f"head width {width0} (patch expand input {expand_in}) does not match the backbone (embed_dim "
            f"{embed_dim}, last stage {embed_dim * 2 ** (num_stages - 1)}): was the head trained on another backbone?"
        )
    depths = [0] * num_stages
    ratios, states, compress, squeeze, widths = set(), set(), [], [], []
    for i in range(1, num_stages):
        level = num_stages - 1 - i
        width = embed_dim * 2**level
        blocks = {int(k.split(".")[3]) for k in head if k.startswith(f"layers_up.{i}.blocks.")}
        if blocks != set(range(len(blocks))):
            raise ConversionError(f"layers_up.{i} has non-contiguous block indices {sorted(blocks)}")
        depths[level] = len(blocks)
        if not blocks:
            continue
        b = f"layers_up.{i}.blocks.0."
        try:
            inner = head[b + "op.in_proj.weight"].shape[0]
            rank = head[b + "op.dt_projs_weight"].shape[2]
            states.add(head[b + "op.A_logs"].shape[1])
            compress.append(head[b + "conv_blk.cab.0.weight"].shape[0])
            squeeze.append(head[b + "conv_blk.cab.3.fc.0.weight"].shape[0])
        except KeyError as err:
            raise ConversionError(f"layers_up.{i} lacks {err.args[0]!r}: not an upstream CVSSDecoderBlock") from None
        if rank != -(-width // 16):
            raise ConversionError(f"layers_up.{i}: dt rank {rank}, but the decoder uses ceil({width}/16)")
        ratios.add(inner / width)
        widths.append(width)
    # upstream's last entry has no blocks (layers_up.0 only expands) and only stretches the drop-path schedule; take
    # the next level's depth, which restores upstream's uniform default ([4, 4, 4, 4])
    depths[-1] = depths[-2]
    for name, values in (("decoder ssm_ratio", ratios), ("decoder d_state", states)):
        if len(values) > 1:
            raise ConversionError(f"{name} differs between decoder levels ({sorted(values)}); not supported")
    kwargs = {"num_labels": int(num_labels), "decoder_depths": depths}
    if states:
        kwargs["decoder_d_state"] = states.pop()
        kwargs["decoder_ssm_ratio"] = ratios.pop()
        kwargs["decoder_ca_compress"] = _solve_reduction(widths, compress, 3, "CAB")
        kwargs["decoder_ca_squeeze"] = _solve_reduction(widths, squeeze, 30, "channel-attention")
    return kwargs


def convert_segmentation(checkpoint: str, seg_head: str | None = None, source: str = "teacher",
                         keep_mask_token: bool = False, *, expect_sha256: str | None = None,
                         allow_nonfinite: bool = False):
    """Backbone from ``checkpoint`` + MambaDecoder head from ``seg_head`` (default: the same file) -> an
    ``OpenUSForSemanticSegmentation``; returns (model, report dict). Raises ConversionError on anything unexpected.
    ``expect_sha256`` is checked against ``checkpoint``."""
    ckpt = load_checkpoint(checkpoint, expect_sha256)
    same_file = seg_head is None or os.path.abspath(seg_head) == os.path.abspath(checkpoint)
    head_ckpt = ckpt if same_file else load_checkpoint(seg_head)
    with blaming(checkpoint, None if same_file else seg_head):
        return _convert_segmentation(ckpt, head_ckpt, checkpoint, checkpoint if same_file else seg_head, same_file,
                                     source, keep_mask_token, allow_nonfinite)


def _convert_segmentation(ckpt: dict, head_ckpt: dict, checkpoint: str, head_file: str, same_file: bool, source: str,
                          keep_mask_token: bool, allow_nonfinite: bool):
    from openus_hub import OpenUSConfig, OpenUSForSemanticSegmentation

    backbone, dropped = extract_backbone(ckpt, source)
    head, dropped_head = extract_seg_head(head_ckpt)
    check_floating_point(head, head_file, allow_nonfinite)
    for group in ("non-backbone group 'decoder.*'", "non-backbone group 'module.decoder.*'"):
        if group in dropped:  # a head inside the backbone file: kept when it is the head converted, else reported
            keys = dropped.pop(group)
            if not same_file:
                dropped[f"{group} (a head in --checkpoint; the head converted is --seg-head's)"] = keys
    for group, keys in dropped_head.items():
        if "backbone" not in group:  # the backbone half of a combined file is not "dropped"
            dropped[f"head file: {group}"] = keys
    with _shapes_of(checkpoint, "OpenUS backbone"):
        kwargs = infer_config_kwargs(backbone)
    with _shapes_of(head_file, "MambaDecoder head"):
        head_kwargs = infer_head_config_kwargs(head, kwargs)
    renamed, dropped_backbone = rename_keys(backbone, keep_mask_token)
    check_floating_point(renamed, checkpoint, allow_nonfinite)
    dropped.update(dropped_backbone)
    renamed = {f"openus.{k}": v for k, v in renamed.items()}
    renamed.update(rename_head_keys(head))
    labels = ["background", "foreground"] if head_kwargs["num_labels"] == 2 else [
        f"LABEL_{i}" for i in range(head_kwargs["num_labels"])]
    config = OpenUSConfig(**kwargs, **head_kwargs, drop_path_rate=_drop_path_for(kwargs),
                          use_mask_token=keep_mask_token and "masked_embed" in backbone,
                          id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    model = OpenUSForSemanticSegmentation(config)
    _check_and_load(model, renamed)
    report = {"config": {**kwargs, **head_kwargs}, "kept": len(renamed),
              "dropped": {k: len(v) for k, v in dropped.items()},
              "parameters": sum(p.numel() for p in model.parameters()), "warning": _preset_depth_warning(kwargs)}
    return model.eval(), report


def _check_and_load(model, renamed: dict) -> None:
    """Strict key and shape check against ``model``, then load as float32."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"key mismatch after renaming: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for key, value in renamed.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ConversionError(f"{key}: shape {tuple(value.shape)} in the checkpoint, {tuple(expected[key].shape)} "
                                  "expected from the inferred architecture")
    model.load_state_dict({k: v.float() for k, v in renamed.items()}, strict=True)


SEG_HEAD_FROM_CHECKPOINT = "<checkpoint>"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="upstream .pth checkpoint or a .safetensors/.pth state dict")
    p.add_argument("--output-dir", required=True, help="folder to write config.json + model.safetensors into")
    p.add_argument("--source", choices=("teacher", "student"), default="teacher",
                   help="which network of a pretraining checkpoint (default: teacher, as upstream evaluates)")
    p.add_argument("--keep-mask-token", action="store_true", help="keep masked_embed (for continued pretraining)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output-dir when it holds a previous export (any other content is refused)")
    p.add_argument("--seg-head", nargs="?", const=SEG_HEAD_FROM_CHECKPOINT, default=None, metavar="HEAD",
                   help="also convert an upstream segmentation head (eval_segmentation.py checkpoint, or a state dict "
                        "with decoder.* keys) into one OpenUSForSemanticSegmentation folder; without HEAD, the head "
                        "is read from --checkpoint")
    p.add_argument("--card-name", default=None,
                   help="model_cards/<NAME>.json to render README.md from (default: the preset the architecture "
                        "matches, else openus-converted)")
    p.add_argument("--no-card", action="store_true", help="do not run the self-check or write README.md")
    p.add_argument("--expect-sha256", default=None, metavar="HEX",
                   help="refuse the checkpoint unless its sha256 is HEX (as published beside the download)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert weights that contain NaN/Inf (refused by default: a sign of corruption or divergence)")
    return p


# Saved folder (default scan) vs the converted tensors through the reference scan, on a random 64x64 input: measured
# up to 3.7e-6 on the parity fixtures (AVX-512 and AVX2 dispatch); 1e-4 is the parity tests' bound (tests/
# test_convert_openus.py), far below the 5e-3 that ignoring any single tensor costs.
SELF_CHECK_TOL = 1e-4


def _output_tensors(out) -> dict:
    flat = {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            flat[key] = value
        elif isinstance(value, (tuple, list)):
            flat.update({f"{key}[{i}]": v for i, v in enumerate(value) if isinstance(v, torch.Tensor)})
    return flat


def self_check(model, folder: str, size: int = 64, seed: int = 0) -> list[dict]:
    """Reload ``folder`` with the Auto classes (default scan implementation) and compare them with the converted
    in-memory model: first the weights (bitwise, NaN-aware), then the outputs against the converted tensors run
    through the pure-PyTorch reference scan, on a fixed-seed random input. A backbone folder is checked through
    ``AutoBackbone`` (the four out-normed stage maps, hidden states) and ``AutoModel`` (tokens and pooled feature); a
    segmentation folder through ``AutoModelForSemanticSegmentation``. Returns one check row per comparison; raises
    ConversionError above SELF_CHECK_TOL."""
    import transformers

    from openus_hub import OpenUSForSemanticSegmentation, OpenUSModel
    from openus_hub.auto import AutoBackbone

    state = model.state_dict()
    nonfinite = not all(torch.isfinite(v).all() for v in state.values())
    x = torch.randn(1, model.config.num_channels, size, size, generator=torch.Generator().manual_seed(seed))
    saved = model.config.scan_implementation
    try:
        model.config.scan_implementation = "reference"
        with torch.no_grad():
            ref = _output_tensors(model(x, output_hidden_states=True))
            if not isinstance(model, OpenUSForSemanticSegmentation):  # tokens: these tensors run as AutoModel runs them
                tokens = OpenUSModel(model.config)
                tokens.load_state_dict(state, strict=False)
                ref.update(_output_tensors(tokens.eval()(x)))
    finally:
        model.config.scan_implementation = saved
    autos = ([transformers.AutoModelForSemanticSegmentation] if isinstance(model, OpenUSForSemanticSegmentation)
             else [AutoBackbone, transformers.AutoModel])
    rows = []
    for auto in autos:
        reloaded = auto.from_pretrained(folder).eval()
        saved_state = reloaded.state_dict()
        if auto is not transformers.AutoModel and set(saved_state) != set(state):  # AutoModel keeps the last norm
            missing, extra = sorted(set(state) - set(saved_state)), sorted(set(saved_state) - set(state))
            raise ConversionError(f"self-check failed: the saved folder reloads with other tensors (missing "
                                  f"{missing[:3]}, extra {extra[:3]})")
        weight_diff = max(max_abs_diff(v.float(), state[k].float()) for k, v in saved_state.items())
        rows.append({"check": f"saved folder ({auto.__name__}) vs converted tensors: every weight", "input": "-",
                     "max_abs_diff": weight_diff, "tolerance": 0.0})
        if weight_diff != 0:
            raise ConversionError(f"self-check failed: the weights reloaded from the saved folder differ from the "
                                  f"converted ones by {weight_diff:.2e}")
        with torch.no_grad():
            got = _output_tensors(reloaded(x, output_hidden_states=True))
        for key, value in got.items():
            diff = max_abs_diff(value, ref[key], nonfinite_ok=nonfinite)
            rows.append({"check": f"saved folder ({auto.__name__}, scan '{reloaded.config.scan_implementation}') vs "
                                  f"checkpoint tensors with the reference scan: `{key}`"
                                  + (" (entries finite in both)" if nonfinite else ""),
                         "input": f"randn 1x{model.config.num_channels}x{size}x{size}, seed {seed}",
                         "max_abs_diff": diff, "tolerance": SELF_CHECK_TOL})
            if not diff <= SELF_CHECK_TOL:
                raise ConversionError(f"self-check failed: {key} differs by {diff:.2e} (> {SELF_CHECK_TOL:.0e}) "
                                      "between the saved folder and the converted weights")
    return rows


def _card_name(config_kwargs: dict) -> str:
    from openus_hub.models.openus.configuration_openus import OPENUS_PRESETS

    for name, preset in OPENUS_PRESETS.items():
        if all(config_kwargs.get(k) == v for k, v in preset.items() if k != "drop_path_rate"):
            return name
    return "openus-converted"


def _card_writer(model, args, report):
    """``finalize`` for save_atomic: self-check the saved folder, then write README.md with the measured numbers."""
    def finalize(folder: str) -> None:
        if __package__:  # imported as the `conversion` package
            from .model_card import CardError, write_card
        else:  # run as a script: this folder is on sys.path
            from model_card import CardError, write_card
        checks = self_check(model, folder)
        report["self_check_max_abs_diff"] = max(c["max_abs_diff"] for c in checks)
        sources = [args.checkpoint] + ([args.seg_head] if args.seg_head not in (None, SEG_HEAD_FROM_CHECKPOINT) else [])
        verification = {
            "source_file": ", ".join(os.path.basename(p) for p in sources),
            "source_sha256": ", ".join(sha256_file(p) for p in sources),
            "upstream": UPSTREAM_REPO, "upstream_commit": UPSTREAM_COMMIT,
            "converter": "conversion/convert_openus_to_hf.py " + (f"--source {args.source}" if args.source else ""),
            "weights_sha256": sha256_file(os.path.join(folder, "model.safetensors")),
            "checks": checks,
            "notes": ["The self-check compares the saved folder with the converted tensors through an independent "
                      "scan path; agreement with the upstream OpenUS code itself is tested against its recorded "
                      "outputs in openus_hub's tests/test_convert_openus.py (within 1e-4)."]
            + ([f"Warning: {report['warning']}."] if report.get("warning") else [])
            + (["Converted with --allow-nonfinite: the weights contain NaN or Inf."]
               if not all(torch.isfinite(t).all() for t in model.state_dict().values()) else []),
        }
        try:
            write_card(folder, args.card_name or _card_name(report["config"]), verification)
        except CardError as err:
            raise ConversionError(f"model card: {err}") from None
    return finalize


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.card_name is not None and not args.no_card:
            check_card_name(args.card_name)  # a typo fails now, not after the conversion
        head = None if args.seg_head in (None, SEG_HEAD_FROM_CHECKPOINT) else args.seg_head
        inputs = [args.checkpoint] + ([head] if head else [])
        check_output_dir(args.output_dir, args.overwrite, inputs)
        integrity = {"expect_sha256": args.expect_sha256, "allow_nonfinite": args.allow_nonfinite}
        if args.seg_head is not None:
            model, report = convert_segmentation(args.checkpoint, head, args.source, args.keep_mask_token, **integrity)
        else:
            model, report = convert(args.checkpoint, args.source, args.keep_mask_token, **integrity)
        if report.get("warning"):
            logger.warning("warning: %s", report["warning"])
        finalize = None if args.no_card else _card_writer(model, args, report)
        save_atomic(model, args.output_dir, args.overwrite, finalize=finalize, inputs=inputs)
    except (ConversionError, CardError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    logger.info("architecture inferred from shapes: %s", report["config"])
    for group, count in sorted(report["dropped"].items()):
        logger.info("dropped %d tensor(s): %s", count, group)
    logger.info("kept %d tensors, %s parameters -> %s", report["kept"], f"{report['parameters']:,}", args.output_dir)
    if "self_check_max_abs_diff" in report:
        logger.info("self-check max abs difference %.2e; README.md written", report["self_check_max_abs_diff"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
