"""Pretraining configuration: defaults <- YAML file <- ``key=value`` overrides (values parsed as YAML)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

# Every key with its default = the paper run (spec §2.1), apart from the documented deviations (training/README.md).
DEFAULTS: dict = {
    "model": {
        "preset": "openus-small",  # openus_hub preset; the keys below override it
        "overrides": {},  # e.g. {embed_dim: 8, depths: [1, 1, 1, 2]}
        "init_from": None,  # upstream checkpoint.pth, or a saved openus_hub folder (backbone only)
    },
    "head": {"out_dim": 8192, "patch_out_dim": 8192, "hidden_dim": 2048, "bottleneck_dim": 256, "norm_last_layer": True},
    "data": {
        "manifest": None, "batch_size_per_gpu": 32, "num_workers": 8,
        "global_size": 224, "local_size": 96, "local_crops_number": 8,
        "global_scale": [0.14, 1.0], "local_scale": [0.05, 0.4], "pred_ratio": 0.3,
    },
    "train": {
        "epochs": 151, "max_steps": None, "seed": 42, "lr": 5e-4, "min_lr": 1e-6, "warmup_epochs": 10,
        "weight_decay": 0.04, "weight_decay_end": 0.4, "momentum_teacher": 0.996, "clip_grad": 3.0,
        "freeze_last_layer": 1, "teacher_train_mode": False, "num_threads": None, "deterministic": False,
    },
    "loss": {
        "student_temp": 0.1, "warmup_teacher_temp": 0.04, "teacher_temp": 0.04, "warmup_teacher_patch_temp": 0.04,
        "teacher_patch_temp": 0.07, "warmup_teacher_temp_epochs": 30, "lambda1": 1.0, "lambda2": 1.0,
        "center_momentum": 0.9, "center_momentum2": 0.9,
    },
    "masking": {
        "mask_model": "atten_guided", "student_feedback": True, "masking_ratio": 0.6, "adaptive_weighting": True,
        "alpha_init": 0.1, "alpha_final": 0.9, "alpha_schedule": "cosine", "global_rec_loss": True,
        "local_rec_loss": True,
    },
    "checkpoint": {"every_steps": 1000, "keep_last": 3, "keep_every_steps": None, "every_epoch": True},
    "log": {"every_steps": 10, "figure_every_steps": None, "tensorboard": False, "progress_bar": True},
}


def _merge(base: dict, update: dict, where: str = "") -> dict:
    for key, value in update.items():
        if key not in base:
            raise KeyError(f"unknown config key {where}{key!r}; known: {sorted(base)}")
        if isinstance(base[key], dict) and key != "overrides":
            if not isinstance(value, dict):
                raise TypeError(f"config key {where}{key} must be a mapping, got {value!r}")
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value
    return base


def load_config(path: str | Path | None, overrides: list[str] = (), defaults: dict | None = None) -> dict:
    """``defaults`` (pretraining's unless given) <- YAML file <- ``key=value`` overrides (values parsed as YAML)."""
    cfg = copy.deepcopy(DEFAULTS if defaults is None else defaults)
    if path is not None:
        with open(path, encoding="utf-8") as f:
            _merge(cfg, yaml.safe_load(f) or {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        nested: dict = {}
        node = nested
        parts = key.strip().split(".")
        if parts[0] == "model" and len(parts) > 2 and parts[1] == "overrides":  # model.overrides.embed_dim=8
            cfg["model"]["overrides"][".".join(parts[2:])] = yaml.safe_load(raw)
            continue
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
        _merge(cfg, nested)
    return cfg


def dump_config(cfg: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
