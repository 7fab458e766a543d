"""Upstream TransKD KD-module keys (RuipingL/TransKD `SKF` wrappers) -> this package's names.

| upstream | here |
|---|---|
| `skfs.{k}.*` (k = 0 is the deepest stage) | `csf.fusions.{S-1-k}.*` (shallow to deep) |
| `embed{s}_linearproject.*` | `pea.proj.{s-1}.*` |
| `attn4.{qkv,proj}.*` | `gl_mixer.attn.{qkv,proj}.*` |
| `conv1.*` / `conv2.*` (GL-Mixer Conv1d) | `gl_mixer.value_conv.*` / `gl_mixer.gate_conv.*` |
| `atten_weight` / `conv_weight` | `gl_mixer.alpha` / `gl_mixer.beta` |
| `patch_embed{s}.*` (EA) | `ea.patch_embeds.{s-1}.*` |
| `fuse_weights.{i}` (EA) | `ea.fuse_weights.{i}` |

`student.*` keys (the SegFormer student) are not KD-module keys; they are dropped here (see
`conversion/convert_transkd_to_hf.py` for the student).
"""

from __future__ import annotations

import re

import torch

# fmt: off
_RULES: list[tuple[str, str]] = [
    (r"^embed(\d)_linearproject\.(.*)$", "pea.proj.{i1}.{1}"),
    (r"^attn4\.(.*)$",                   "gl_mixer.attn.{0}"),
    (r"^conv1\.(.*)$",                   "gl_mixer.value_conv.{0}"),
    (r"^conv2\.(.*)$",                   "gl_mixer.gate_conv.{0}"),
    (r"^atten_weight$",                  "gl_mixer.alpha"),
    (r"^conv_weight$",                   "gl_mixer.beta"),
    (r"^patch_embed(\d)\.(.*)$",         "ea.patch_embeds.{i1}.{1}"),
    (r"^fuse_weights\.(\d+)$",           "ea.fuse_weights.{0}"),
]
# fmt: on


def convert_upstream_kd_state_dict(state_dict: dict[str, torch.Tensor], num_stages: int = 4) -> dict[str, torch.Tensor]:
    """Rename an upstream KD-module state dict (a leading `module.` is stripped; `student.*` keys are dropped)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.startswith("student."):
            continue
        m = re.match(r"^skfs\.(\d+)\.(.*)$", key)
        if m:
            out[f"csf.fusions.{num_stages - 1 - int(m.group(1))}.{m.group(2)}"] = value
            continue
        for pattern, template in _RULES:
            m = re.match(pattern, key)
            if m:
                groups = m.groups()
                i1 = int(groups[0]) - 1 if groups and groups[0].isdigit() else None
                out[template.format(*groups, i1=i1)] = value
                break
        else:
            raise KeyError(f"unknown upstream TransKD key {key!r}")
    return out
