"""Convert an upstream OpenUS checkpoint (XZheng0427/OpenUS) into an openus_hub folder (config.json + safetensors).

Accepted inputs (spec §2.7, §5):

* an upstream pretraining checkpoint ``checkpoint00X0.pth`` (``student``/``teacher``/``optimizer``/``args``/...),
  loaded with ``torch.load(weights_only=True)`` and an explicit allowlist (it pickles an ``argparse.Namespace`` and
  numpy scalars); ``--source teacher`` (default, the EMA model every upstream evaluation uses) or ``student``;
* a plain state dict (``.safetensors`` or ``.pth``) whose backbone keys carry a ``backbone.`` prefix (e.g. the
  segmentation model: the other top-level groups are reported and dropped), or no prefix at all.

The architecture (depths, widths, d_state, ssm_ratio, dt ranks, conv kernel, MLP ratio) is inferred from tensor
shapes; no preset name is needed. Every key is accounted for: renamed, or dropped as a reported pretraining-only
group; anything else is an error.

Usage:
    python conversion/convert_openus_to_hf.py --checkpoint PATH --output-dir DIR [--source teacher|student]
        [--keep-mask-token] [--overwrite]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import tempfile
from collections import defaultdict

import torch

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

SOURCE_PREFIXES = {"teacher": ("teacher", "backbone."), "student": ("student", "module.backbone.")}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the problem and the fix."""


def _torch_load_allowlisted(path: str) -> object:
    """``torch.load(weights_only=True)`` with exactly what upstream checkpoints pickle besides tensors."""
    import argparse as _argparse

    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    allow = [_argparse.Namespace, (scalar, "numpy.core.multiarray.scalar"), np.dtype, type(np.dtype(np.float64))]
    with torch.serialization.safe_globals(allow):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: str) -> dict:
    """Read a ``.pth``/``.pt``/``.safetensors`` file into a dict, with one-line errors for unreadable files."""
    if not os.path.isfile(path):
        raise ConversionError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise ConversionError(f"{path} is empty (0 bytes); re-download or re-copy it")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:
            raise ConversionError(f"{path} is not a readable safetensors file (corrupt or truncated?): {err}") from None
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


def extract_backbone(ckpt: dict, source: str = "teacher") -> tuple[dict, dict[str, list[str]]]:
    """Pick the backbone tensors (upstream names, no prefix) and the dropped top-level groups of a loaded file."""
    dropped: dict[str, list[str]] = defaultdict(list)
    if "teacher" in ckpt or "student" in ckpt:  # upstream pretraining checkpoint
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


def infer_config_kwargs(state: dict) -> dict:
    """Architecture from tensor shapes of an upstream backbone state dict (upstream names, no prefix)."""
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


def convert(checkpoint: str, source: str = "teacher", keep_mask_token: bool = False):
    """Load and convert; returns (model, report dict). Raises ConversionError on anything unexpected."""
    from openus_hub import OpenUSConfig, OpenUSModel

    ckpt = load_checkpoint(checkpoint)
    backbone, dropped = extract_backbone(ckpt, source)
    kwargs = infer_config_kwargs(backbone)
    renamed, dropped_backbone = rename_keys(backbone, keep_mask_token)
    dropped.update(dropped_backbone)
    config = OpenUSConfig(**kwargs, drop_path_rate=_drop_path_for(kwargs),
                          use_mask_token=keep_mask_token and "masked_embed" in backbone)
    model = OpenUSModel(config)
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
    report = {"config": kwargs, "kept": len(renamed), "dropped": {k: len(v) for k, v in dropped.items()},
              "parameters": sum(p.numel() for p in model.parameters())}
    return model.eval(), report


def save_atomic(model, output_dir: str, overwrite: bool = False) -> None:
    """Write the folder under a temporary name beside ``output_dir``, then swap it in."""
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConversionError(f"--output-dir {output_dir} exists and is not a folder")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ConversionError(f"--output-dir {output_dir} is not empty; pass --overwrite to replace its contents")
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".openus-convert-", dir=parent)
    try:
        model.save_pretrained(tmp)
        if os.path.isdir(output_dir):
            old = tempfile.mkdtemp(prefix=".openus-old-", dir=parent)
            os.rmdir(old)
            os.replace(output_dir, old)
            os.replace(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="upstream .pth checkpoint or a .safetensors/.pth state dict")
    p.add_argument("--output-dir", required=True, help="folder to write config.json + model.safetensors into")
    p.add_argument("--source", choices=("teacher", "student"), default="teacher",
                   help="which network of a pretraining checkpoint (default: teacher, as upstream evaluates)")
    p.add_argument("--keep-mask-token", action="store_true", help="keep masked_embed (for continued pretraining)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model, report = convert(args.checkpoint, args.source, args.keep_mask_token)
        save_atomic(model, args.output_dir, args.overwrite)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logger.info("architecture inferred from shapes: %s", report["config"])
    for group, count in sorted(report["dropped"].items()):
        logger.info("dropped %d tensor(s): %s", count, group)
    logger.info("kept %d tensors, %s parameters -> %s", report["kept"], f"{report['parameters']:,}", args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
