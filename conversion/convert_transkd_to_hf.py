"""Convert an upstream TransKD checkpoint (RuipingL/TransKD @ 39ab795d) into a stock transformers SegFormer folder.

The output is a plain ``SegformerForSemanticSegmentation`` folder (``model_type`` ``segformer``): it loads with
transformers alone, no openus_hub needed. The key map follows the module names of upstream's
``train/models/Segformer.py`` (``OverlapPatchEmbed`` :174-214, ``Block`` :134-171, attention :72-131, Mix-FFN
:22-57) and transformers 5's SegFormer names. What the converter does, in order:

1. verify the file (``--expect-sha256``; the CRC-32 of every member of a zip checkpoint, which ``torch.load`` does
   not check), load on CPU (``torch.load(weights_only=True)``, or safetensors); unwrap ``state_dict``/``model`` of
   ``.pth.tar`` training checkpoints; strip a DataParallel ``module.`` prefix;
2. KD checkpoints (``--variant transkd-base|transkd-gl|transkd-ea``): keep only ``student.*`` (filtered *before*
   stripping, since EA has its own top-level ``patch_embed{1..4}``), drop the KD modules (CSF ``skfs.*``, PEA
   ``embed*_linearproject.*``, GL-Mixer ``attn4.*``/``conv1.*``/``conv2.*``/``atten_weight``/``conv_weight``, EA
   ``patch_embed*``/``fuse_weights.*``) and report every dropped key;
3. rename to the transformers >= 5 names and split ``attn.kv`` by rows (key first, then value);
   then refuse non-floating-point weights (BatchNorm's ``num_batches_tracked`` counter aside) and, unless
   ``--allow-nonfinite``, NaN/Inf;
4. build ``SegformerConfig`` (B0 or B2, 20 labels = 19 Cityscapes trainIds + ``void``; ``drop_path_rate`` 0.1,
   ``classifier_dropout_prob`` 0.1, no other dropout) and ``load_state_dict(strict=True)``;
5. self-check against an independent functional forward of the *original* state dict with upstream semantics
   (block/stage LayerNorm eps 1e-6), on a fixed-seed random input: the stock model (eps 1e-5, as saved) and the
   eps-corrected model are both measured and written to the card;
6. save the model, a ``SegformerImageProcessor`` config reproducing TransKD's input pipeline (resize to 512x1024,
   bilinear, rescale to [0, 1], **no** mean/std normalisation) and README.md from model_cards/.

Deliberate differences from upstream, documented in the card: the stock class builds every LayerNorm with eps 1e-5
(upstream: 1e-6 in the blocks and stage ends; ``config.layer_norm_eps`` is stored as 1e-6 but ignored by the stock
class; :func:`set_upstream_layernorm_eps` restores it in memory), and the decode head uses ``nn.Dropout`` where
upstream used ``nn.Dropout2d`` (irrelevant at inference).

The output folder may not contain the input; ``--overwrite`` replaces only a folder holding a previous export, and the
swap is crash-safe (``conversion/_common.py``).

Usage:
    python conversion/convert_transkd_to_hf.py --checkpoint PATH --variant {b0,b2,transkd-base,transkd-gl,transkd-ea}
        --output-dir DIR [--overwrite] [--card-name NAME] [--no-card] [--expect-sha256 HEX] [--allow-nonfinite]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F

from openus_hub.pretrained import TRANSKD_UPSTREAM_COMMIT as UPSTREAM_COMMIT  # the upstream pins live in the registry
from openus_hub.pretrained import TRANSKD_UPSTREAM as UPSTREAM_REPO

if __package__:  # imported as the `conversion` package
    from .model_card import CardError, check_card_name
    from ._common import (ConversionError, blaming, check_floating_point, check_output_dir, check_sha256,
                          max_abs_diff, one_line, save_atomic, sha256_file, verify_zip_checkpoint)
else:  # run as a script: this folder is on sys.path
    from model_card import CardError, check_card_name
    from _common import (ConversionError, blaming, check_floating_point, check_output_dir, check_sha256,
                         max_abs_diff, one_line, save_atomic, sha256_file, verify_zip_checkpoint)

logger = logging.getLogger("convert_transkd_to_hf")

UPSTREAM_BLOCK_EPS, UPSTREAM_EMBED_EPS = 1e-6, 1e-5
# Self-check bound, relative to the largest |value| of the reference output it is compared with. Float32 rounding
# alone moves the outputs by up to 2.5e-6 of that scale with the eps fixed and 5.1e-6 with the stock eps 1e-5
# (measured on the parity fixtures, b0 and b2, random and real input, with AVX-512, AVX2 and scalar kernel dispatch:
# ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS); 2e-5 leaves a margin of 4x over the worst of
# them, while a wrongly mapped tensor moves outputs by more than 1e-3 of their scale.
REL_TOL = 2e-5

CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle"]
# TransKD remaps label 255 to 19 and trains 20 outputs; class 19 has zero loss weight and is ignored in mIoU
ID2LABEL = dict(enumerate(CITYSCAPES_CLASSES + ["void"]))

ARCHS = {
    "b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768},
}
COMMON = {"num_attention_heads": [1, 2, 5, 8], "sr_ratios": [8, 4, 2, 1], "patch_sizes": [7, 3, 3, 3],
          "strides": [4, 2, 2, 2], "mlp_ratios": [4, 4, 4, 4], "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
          "attention_probs_dropout_prob": 0.0, "classifier_dropout_prob": 0.1, "drop_path_rate": 0.1,
          "layer_norm_eps": UPSTREAM_BLOCK_EPS, "reshape_last_stage": True}

# KD-module key groups (keys after 'module.' is stripped, never under 'student.'): CSF and PEA (`CSF.py:6-130`),
# GL-Mixer (`CSF_GLMixer.py:72-133`), EA (`CSF_EA.py:80-143`)
KD_GROUPS = {
    "CSF (skfs.*)": r"^skfs\.",
    "PEA (embed*_linearproject.*)": r"^embed\d_linearproject\.",
    "GL-Mixer (attn4.*, conv1.*, conv2.*, atten_weight, conv_weight)":
        r"^(attn4\.|conv[12]\.|atten_weight$|conv_weight$)",
    "EA (patch_embed*, fuse_weights.*)": r"^(patch_embed\d\.|fuse_weights\.)",
}
VARIANTS = {
    "b0": {"arch": "b0", "kd": None},
    "b2": {"arch": "b2", "kd": None},
    "transkd-base": {"arch": "b0", "kd": {"CSF (skfs.*)", "PEA (embed*_linearproject.*)"}},
    "transkd-gl": {"arch": "b0", "kd": {"CSF (skfs.*)", "PEA (embed*_linearproject.*)",
                                        "GL-Mixer (attn4.*, conv1.*, conv2.*, atten_weight, conv_weight)"}},
    "transkd-ea": {"arch": "b0", "kd": {"CSF (skfs.*)", "PEA (embed*_linearproject.*)",
                                        "EA (patch_embed*, fuse_weights.*)"}},
}
CARD_NAMES = {"b2": "transkd-b2-teacher-cityscapes", "transkd-base": "transkd-base-b0-cityscapes",
              "transkd-gl": "transkd-gl-b0-cityscapes", "transkd-ea": "transkd-ea-b0-cityscapes", "b0": None}

_B = r"^block(\d)\.(\d+)\."
_S = r"segformer.stages.<\1>.blocks.\2."
# fmt: off
ORIGINAL_TO_CONVERTED_KEY_MAPPING = {
    r"^patch_embed(\d)\.proj\.":  r"segformer.stages.<\1>.patch_embeddings.proj.",
    r"^patch_embed(\d)\.norm\.":  r"segformer.stages.<\1>.patch_embeddings.layer_norm.",
    _B + r"norm1\.":              _S + r"layernorm_before.",
    _B + r"attn\.q\.":            _S + r"attention.q_proj.",
    _B + r"attn\.sr\.":           _S + r"attention.sequence_reduction.sequence_reduction.",
    _B + r"attn\.norm\.":         _S + r"attention.sequence_reduction.layer_norm.",
    _B + r"attn\.proj\.":         _S + r"attention.o_proj.",
    _B + r"norm2\.":              _S + r"layernorm_after.",
    _B + r"mlp\.fc1\.":           _S + r"mlp.fc1.",
    _B + r"mlp\.dwconv\.dwconv\.": _S + r"mlp.dwconv.dwconv.",
    _B + r"mlp\.fc2\.":           _S + r"mlp.fc2.",
    r"^norm(\d)\.":               r"segformer.stages.<\1>.layer_norm.",
    r"^linear_c(\d)\.proj\.":     r"decode_head.linear_projections.<\1>.proj.",
    r"^linear_fuse\.conv\.weight$": r"decode_head.linear_fuse.weight",
    r"^linear_fuse\.bn\.":        r"decode_head.batch_norm.",
    r"^linear_pred\.":            r"decode_head.classifier.",
}
KV_PATTERN = _B + r"attn\.kv\.(weight|bias)$"  # split by rows: [0:C] -> k_proj, [C:2C] -> v_proj
# fmt: on


def load_checkpoint(path: str, expect_sha256: str | None = None) -> tuple[dict, list[str]]:
    """A flat state dict from a ``.pth``/``.pth.tar``/``.safetensors`` file, and the non-weight entries skipped.
    ``expect_sha256`` (hex) is checked first; a zip checkpoint's member CRCs are verified before ``torch.load``."""
    if not os.path.isfile(path):
        raise ConversionError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise ConversionError(f"{path} is empty (0 bytes); re-download or re-copy it")
    check_sha256(path, expect_sha256)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return dict(load_file(path)), []
        except Exception as err:
            raise ConversionError(f"{path} is not a readable safetensors file (corrupt or truncated?): "
                                  f"{one_line(err)[:200]}") from None
    verify_zip_checkpoint(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        msg = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConversionError(f"{path} could not be read with torch.load(weights_only=True): {msg}") from None
    skipped = []
    if isinstance(obj, dict):
        for nest in ("state_dict", "model"):
            if isinstance(obj.get(nest), dict):
                skipped = sorted(k for k in obj if k != nest)
                obj = obj[nest]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors")
    return dict(obj), skipped


def select_student(state: dict, variant: str) -> tuple[dict, dict[str, list[str]]]:
    """Strip ``module.``; for KD checkpoints keep ``student.*`` and report the KD-module keys by group."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    is_kd = any(k.startswith("student.") for k in state)
    expected = VARIANTS[variant]["kd"]
    if expected is None and is_kd:
        raise ConversionError("this is a TransKD (KD wrapper) checkpoint with 'student.*' keys; use --variant "
                              "transkd-base, transkd-gl or transkd-ea, not " + variant)
    if expected is not None and not is_kd:
        raise ConversionError(f"--variant {variant} expects a KD checkpoint with 'student.*' keys; this one has none "
                              "(a plain SegFormer state dict: use --variant b0 or b2)")
    if not is_kd:
        return state, {}
    student, dropped = {}, defaultdict(list)
    for key, value in state.items():
        if key.startswith("student."):
            student[key[len("student."):]] = value
            continue
        group = next((g for g, pat in KD_GROUPS.items() if re.search(pat, key)), "unrecognised (not a TransKD module)")
        dropped[group].append(key)
    found = set(dropped) - {"unrecognised (not a TransKD module)"}
    if found != expected:
        guess = next((v for v, spec in VARIANTS.items() if spec["kd"] == found), None)
        hint = f"; it looks like --variant {guess}" if guess else ""
        raise ConversionError(f"--variant {variant} expects KD modules {sorted(expected)}, the checkpoint has "
                              f"{sorted(found)}{hint}")
    return student, dict(dropped)


def rename_keys(state: dict) -> dict:
    """Upstream SegFormer keys -> transformers >= 5 SegformerForSemanticSegmentation keys (``kv`` split)."""
    out, unknown = {}, []
    for key, value in state.items():
        m = re.search(KV_PATTERN, key)
        if m:
            s, j, kind = m.groups()
            half = value.shape[0] // 2
            base = f"segformer.stages.{int(s) - 1}.blocks.{j}.attention."
            out[base + f"k_proj.{kind}"] = value[:half].clone()
            out[base + f"v_proj.{kind}"] = value[half:].clone()
            continue
        for pattern, replacement in ORIGINAL_TO_CONVERTED_KEY_MAPPING.items():
            if re.search(pattern, key):
                new = re.sub(pattern, replacement, key)
                out[re.sub(r"<(\d)>", lambda g: str(int(g.group(1)) - 1), new)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"{len(unknown)} key(s) are not SegFormer (MiT + all-MLP head) keys: {unknown[:8]}")
    return out


def build_config(arch: str):
    from transformers import SegformerConfig

    return SegformerConfig(**ARCHS[arch], **COMMON, num_labels=len(ID2LABEL), id2label=ID2LABEL,
                           label2id={v: k for k, v in ID2LABEL.items()})


def build_image_processor():
    """TransKD's input pipeline: resize to 512x1024 (bilinear), ToTensor-style rescale to [0, 1], no mean/std."""
    from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

    return SegformerImageProcessorPil(do_resize=True, size={"height": 512, "width": 1024}, do_rescale=True,
                                      rescale_factor=1 / 255, do_normalize=False, do_reduce_labels=False)


def set_upstream_layernorm_eps(model) -> int:
    """Set eps 1e-6 on the block (before/after) and stage-end LayerNorms, as upstream; returns how many changed.
    Patch-embedding and sequence-reduction LayerNorms stay at 1e-5."""
    n = 0
    for name, module in model.named_modules():
        block_or_stage_end = re.search(r"(layernorm_before|layernorm_after|stages\.\d+\.layer_norm)$", name)
        if isinstance(module, torch.nn.LayerNorm) and block_or_stage_end:
            module.eps = UPSTREAM_BLOCK_EPS
            n += 1
    return n


def reference_forward(state: dict, pixel_values: torch.Tensor, arch: str) -> dict:
    """Upstream TransKD/SegFormer eval forward (``train/models/Segformer.py``, the MiT encoder and MLP decoder) written functionally on the
    *original* state dict keys. Independent of the key map: used to check a conversion. Returns logits (1/4 res),
    feats (4 stage maps after ``norm{s}``) and embeds (4 patch-embedding token tensors)."""
    sd, a = state, {**ARCHS[arch], **COMMON}
    x, feats, embeds = pixel_values, [], []
    for s in range(1, 5):
        k, stride = a["patch_sizes"][s - 1], a["strides"][s - 1]
        x = F.conv2d(x, sd[f"patch_embed{s}.proj.weight"], sd[f"patch_embed{s}.proj.bias"], stride, k // 2)
        b, c, h, w = x.shape
        t = F.layer_norm(x.flatten(2).transpose(1, 2), (c,), sd[f"patch_embed{s}.norm.weight"],
                         sd[f"patch_embed{s}.norm.bias"], UPSTREAM_EMBED_EPS)
        embeds.append(t)
        heads, sr = a["num_attention_heads"][s - 1], a["sr_ratios"][s - 1]
        for j in range(a["depths"][s - 1]):
            p = f"block{s}.{j}."
            y = F.layer_norm(t, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], UPSTREAM_BLOCK_EPS)
            q = F.linear(y, sd[p + "attn.q.weight"], sd[p + "attn.q.bias"]).reshape(b, -1, heads, c // heads)
            if sr > 1:
                r = F.conv2d(y.transpose(1, 2).reshape(b, c, h, w), sd[p + "attn.sr.weight"],
                             sd[p + "attn.sr.bias"], sr)
                r = F.layer_norm(r.flatten(2).transpose(1, 2), (c,), sd[p + "attn.norm.weight"],
                                 sd[p + "attn.norm.bias"], UPSTREAM_EMBED_EPS)
            else:
                r = y
            kv = F.linear(r, sd[p + "attn.kv.weight"], sd[p + "attn.kv.bias"]).reshape(b, -1, 2, heads, c // heads)
            kk, vv = kv.permute(2, 0, 3, 1, 4)  # [B, heads, M, hd] each; k first, as upstream
            att = (q.transpose(1, 2) @ kk.transpose(-2, -1)) * (c // heads) ** -0.5
            o = (att.softmax(-1) @ vv).transpose(1, 2).reshape(b, -1, c)
            t = t + F.linear(o, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
            y = F.layer_norm(t, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], UPSTREAM_BLOCK_EPS)
            y = F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])
            y = F.conv2d(y.transpose(1, 2).reshape(b, -1, h, w), sd[p + "mlp.dwconv.dwconv.weight"],
                         sd[p + "mlp.dwconv.dwconv.bias"], 1, 1, groups=y.shape[-1])
            y = F.gelu(y.flatten(2).transpose(1, 2))
            t = t + F.linear(y, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        t = F.layer_norm(t, (c,), sd[f"norm{s}.weight"], sd[f"norm{s}.bias"], UPSTREAM_BLOCK_EPS)
        x = t.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        feats.append(x)
    size = feats[0].shape[2:]
    maps = []
    for s in (4, 3, 2, 1):
        f = feats[s - 1]
        m = F.linear(f.flatten(2).transpose(1, 2), sd[f"linear_c{s}.proj.weight"], sd[f"linear_c{s}.proj.bias"])
        m = m.transpose(1, 2).reshape(f.shape[0], -1, *f.shape[2:])
        maps.append(m if s == 1 else F.interpolate(m, size=size, mode="bilinear", align_corners=False))
    y = F.conv2d(torch.cat(maps, dim=1), sd["linear_fuse.conv.weight"])
    y = F.batch_norm(y, sd["linear_fuse.bn.running_mean"], sd["linear_fuse.bn.running_var"],
                     sd["linear_fuse.bn.weight"], sd["linear_fuse.bn.bias"], False, 0.0, 1e-5)
    logits = F.conv2d(F.relu(y), sd["linear_pred.weight"], sd["linear_pred.bias"])
    return {"logits": logits, "feats": feats, "embeds": embeds}


def max_diffs(model, pixel_values: torch.Tensor, expected: dict, nonfinite_ok: bool = False) -> dict[str, float]:
    """Max |diff| of logits and of the four hidden states (max over stages) against ``expected``; NaN/Inf must match
    (``nonfinite_ok``: compare only entries finite in both, for weights converted with --allow-nonfinite)."""
    with torch.no_grad():
        out = model(pixel_values=pixel_values, output_hidden_states=True)
    hidden = max(max_abs_diff(out.hidden_states[i], expected["feats"][i], nonfinite_ok) for i in range(4))
    return {"logits": max_abs_diff(out.logits, expected["logits"], nonfinite_ok), "hidden_states": hidden}


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")  # BatchNorm's int64 step counter: not a weight


def convert(checkpoint: str, variant: str, *, expect_sha256: str | None = None, allow_nonfinite: bool = False):
    """Load and convert; returns (model, report). ``report['dropped']`` maps each KD group to its keys. Raises
    ConversionError (naming the file) on anything unexpected."""
    if variant not in VARIANTS:
        raise ConversionError(f"--variant must be one of {sorted(VARIANTS)}")
    state, skipped = load_checkpoint(checkpoint, expect_sha256)
    with blaming(checkpoint):
        return _convert(state, skipped, checkpoint, variant, allow_nonfinite)


def _convert(state: dict, skipped: list[str], checkpoint: str, variant: str, allow_nonfinite: bool):
    from transformers import SegformerForSemanticSegmentation

    student, dropped = select_student(state, variant)
    check_floating_point(student, checkpoint, allow_nonfinite, exempt=_is_counter)
    scalars = [k for k, v in student.items() if v.dim() == 0 and not _is_counter(k)]
    if scalars:
        raise ConversionError(f"{checkpoint}: {scalars[:3]} are 0-D; SegFormer weights are at least 1-D: the file is "
                              "corrupt or holds another model")
    if skipped:
        dropped["non-weight checkpoint entries"] = skipped
    arch = VARIANTS[variant]["arch"]
    width = student.get("patch_embed1.proj.weight")
    if width is None or width.shape[0] != ARCHS[arch]["hidden_sizes"][0]:
        got = None if width is None else width.shape[0]
        other = next((a for a, spec in ARCHS.items() if spec["hidden_sizes"][0] == got), None)
        raise ConversionError(f"the checkpoint is not a MiT-{arch.upper()} SegFormer (patch_embed1 width {got})"
                              + (f"; is it --variant {other}?" if other else ""))
    renamed = rename_keys(student)
    model = SegformerForSemanticSegmentation(build_config(arch))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(renamed)), sorted(set(renamed) - set(expected))
    if missing or unexpected:
        def grouped(keys: list[str]) -> str:  # whole blocks as 'segformer.stages.1.blocks.1.*'
            groups = sorted({re.sub(r"^(.*\.blocks\.\d+)\..*$", r"\1.*", k) for k in keys})
            return ", ".join(groups[:4]) + (f" and {len(groups) - 4} more" if len(groups) > 4 else "")

        raise ConversionError(f"{checkpoint} does not hold exactly the MiT-{arch.upper()} SegFormer tensors ("
                              + "; ".join(f"{what} {grouped(keys)}" for what, keys in (("missing", missing),
                                                                                       ("unexpected", unexpected))
                                          if keys)
                              + "): a missing block is a corrupt or truncated file, not a smaller model")
    for key, value in renamed.items():
        if value.shape != expected[key].shape:
            raise ConversionError(f"{checkpoint}: {key} has shape {tuple(value.shape)}, the MiT-{arch.upper()} "
                                  f"architecture {tuple(expected[key].shape)}: corrupt file or wrong --variant")
    model.load_state_dict({k: v.float() for k, v in renamed.items()}, strict=True)
    report = {"variant": variant, "arch": arch, "original_keys": len(student), "converted_keys": len(renamed),
              "parameters": sum(p.numel() for p in model.parameters()), "dropped": dropped, "state": student}
    return model.eval(), report


def self_check(model, report: dict, folder: str | None = None, seed: int = 0) -> list[dict]:
    """Stock model (reloaded from ``folder`` when given) and eps-corrected copy vs :func:`reference_forward`."""
    import copy

    from transformers import SegformerForSemanticSegmentation

    x = torch.rand(1, 3, 128, 256, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = reference_forward(report["state"], x, report["arch"])
    stock = SegformerForSemanticSegmentation.from_pretrained(folder).eval() if folder else model
    fixed = copy.deepcopy(stock)
    set_upstream_layernorm_eps(fixed)
    rows = []
    nonfinite = not all(torch.isfinite(v).all() for v in report["state"].values() if v.is_floating_point())
    def absmax(t: torch.Tensor) -> float:  # over the finite entries (weights converted with --allow-nonfinite)
        t = t[torch.isfinite(t)]
        return t.abs().max().item() if t.numel() else 0.0

    scale = {"logits": absmax(ref["logits"]), "hidden_states": max(absmax(f) for f in ref["feats"])}
    for label, m in (("stock transformers (LayerNorm eps 1e-5)", stock), ("eps set to upstream 1e-6 in memory", fixed)):
        for what, diff in max_diffs(m, x, ref, nonfinite).items():
            tol = REL_TOL * scale[what]
            rows.append({"check": f"{label}: {what} vs upstream-semantics reference forward (tolerance {REL_TOL:.0e} "
                                  "x max |reference|)",
                         "input": f"uniform [0,1) 1x3x128x256, seed {seed}", "max_abs_diff": diff, "tolerance": tol})
            if not diff <= tol:
                raise ConversionError(f"self-check failed: {label} {what} differs by {diff:.2e} (> {tol:.1e})")
    return rows


def save(model, report: dict, args) -> None:
    """Write model + processor (+ self-check and README.md) to a temporary folder, then swap it in."""

    def finalize(tmp: str) -> None:
        build_image_processor().save_pretrained(tmp)
        if args.no_card:
            return
        checks = self_check(model, report, tmp)
        report["checks"] = checks
        card = args.card_name or CARD_NAMES[args.variant]
        if card is None:
            raise ConversionError("--variant b0 is a plain student with no named card; pass --card-name NAME "
                                  "(a file in model_cards/) or --no-card")
        if __package__:  # imported as the `conversion` package
            from .model_card import CardError, write_card
        else:  # run as a script: this folder is on sys.path
            from model_card import CardError, write_card
        n_dropped = sum(len(v) for v in report["dropped"].values())
        verification = {
            "source_file": os.path.basename(args.checkpoint), "source_sha256": sha256_file(args.checkpoint),
            "upstream": UPSTREAM_REPO, "upstream_commit": UPSTREAM_COMMIT,
            "converter": f"conversion/convert_transkd_to_hf.py --variant {args.variant}",
            "weights_sha256": sha256_file(os.path.join(tmp, "model.safetensors")), "checks": checks,
            "notes": [f"Kept {report['original_keys']} student tensors ({report['converted_keys']} after splitting "
                      f"`kv`), dropped {n_dropped} training-only tensors: "
                      + (", ".join(f"{g}: {len(k)}" for g, k in report["dropped"].items()) or "none") + ".",
                      "The stock class ignores `layer_norm_eps`; the first rows measure what that costs. Call "
                      "`set_upstream_layernorm_eps(model)` from this converter to restore upstream numerics."],
        }
        try:
            write_card(tmp, card, verification)
        except CardError as err:
            raise ConversionError(f"model card: {err}") from None

    save_atomic(model, args.output_dir, args.overwrite, finalize=finalize, inputs=[args.checkpoint])


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="upstream .pth / .pth.tar state dict (or .safetensors)")
    p.add_argument("--variant", required=True, choices=sorted(VARIANTS),
                   help="b0/b2: plain SegFormer state dicts; transkd-*: KD wrapper checkpoints (student extracted)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output-dir when it holds a previous export (any other content is refused)")
    p.add_argument("--card-name", default=None, help="model_cards/<NAME>.json for README.md (default by variant)")
    p.add_argument("--no-card", action="store_true", help="skip the self-check and README.md")
    p.add_argument("--expect-sha256", default=None, metavar="HEX",
                   help="refuse the checkpoint unless its sha256 is HEX (as published beside the download)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert weights that contain NaN/Inf (refused by default: a sign of corruption or divergence)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.card_name is not None and not args.no_card:
            check_card_name(args.card_name)  # a typo fails now, not after the conversion
        check_output_dir(args.output_dir, args.overwrite, [args.checkpoint])
        model, report = convert(args.checkpoint, args.variant, expect_sha256=args.expect_sha256,
                                allow_nonfinite=args.allow_nonfinite)
        save(model, report, args)
    except (ConversionError, CardError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    logger.info("%s (MiT-%s): %d upstream keys -> %d transformers keys, %s parameters -> %s", args.variant,
                report["arch"].upper(), report["original_keys"], report["converted_keys"], f"{report['parameters']:,}",
                args.output_dir)
    for group, keys in report["dropped"].items():
        logger.info("dropped %d key(s): %s", len(keys), group)
        for key in keys:
            logger.info("    %s", key)
    for row in report.get("checks", []):
        logger.info("self-check %s: max abs diff %.2e", row["check"], row["max_abs_diff"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
