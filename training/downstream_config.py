"""Configuration of the downstream jobs (``training.linear_probe``, ``training.finetune_segmentation`` and
``training.evaluate``): common defaults <- the task's defaults <- YAML <- ``key=value`` overrides, strict.

The task defaults are upstream OpenUS's protocols (XZheng0427/OpenUS at commit 6b9f6d2e):

* classification, ``eval_linear.py``: SGD momentum 0.9, wd 0, lr x batch/16, cosine over 150 epochs stepped per
  epoch, cross-entropy, seed 42, the best validation accuracy (>=) kept (``eval_linear.py:181-209, 337-350``);
* segmentation, ``eval_segmentation.py``: Adam lr 1e-3, wd 0, cosine over 100 epochs, cross-entropy ignoring 255,
  batch 16, seed 42; the best model is the last one where Dice or IoU improved (``eval_segmentation.py:54-149,
  235-243``).
"""

from __future__ import annotations

import copy
from pathlib import Path

from .common.config import ConfigError, load_config, merge_config

__all__ = ["COMMON_DEFAULTS", "FREE_KEYS", "TASK_DEFAULTS", "load_downstream_config"]

COMMON_DEFAULTS: dict = {
    "task": None,
    "model": {
        "init_from": None,  # a saved openus_hub folder, or an upstream pretraining checkpoint (teacher backbone)
        "source": "teacher",  # which network of an upstream checkpoint
        "preset": "openus-small",  # used without init_from (random backbone: tests, debugging)
        "overrides": {},  # config fields, e.g. {embed_dim: 8, decoder_depths: [1, 1, 1, 1]}
    },
    "data": {
        "dataset": None, "root": None, "fold": 0, "split_seed": 42, "image_size": 224, "label_rule": "eq255",
        "label_fraction": 1.0, "label_seed": 0, "batch_size_per_gpu": 16, "eval_batch_size": 16, "num_workers": 4,
        "augment": "none",  # none | usaugment (training.data.us_augment: the paper's four transforms, p = 0.5 each)
    },
    "train": {
        "mode": "frozen",  # frozen = upstream protocol; full = fine-tune the backbone too
        "epochs": 100, "max_steps": None, "optimizer": "adam", "lr": 1e-3, "scale_lr": False, "momentum": 0.9,
        "weight_decay": 0.0, "backbone_lr_mult": 1.0, "seed": 42, "num_threads": None,
        "avgpool": 2, "select": "either",
    },
    "checkpoint": {"every_steps": None, "keep_last": 2},
    "export": {"enabled": True, "name": None},
    # overlay_images: test images drawn with ground truth and prediction (segmentation; figures/test_overlays.png)
    "log": {"every_steps": 10, "progress_bar": True, "overlay_images": 4},
}
TASK_DEFAULTS = {
    "classification": {"task": "classification", "data": {"dataset": "busi"},
                       "train": {"epochs": 150, "optimizer": "sgd", "lr": 1e-3, "scale_lr": True,
                                 "select": "accuracy"}},
    "segmentation": {"task": "segmentation", "data": {"dataset": "busbra"},
                     "train": {"epochs": 100, "optimizer": "adam", "lr": 1e-3, "scale_lr": False, "select": "either"}},
}
FREE_KEYS = ("model.overrides",)  # fields of OpenUSConfig: checked by the config class itself


def load_downstream_config(task: str, path: str | Path | None, overrides: list[str] = ()) -> dict:
    """COMMON_DEFAULTS <- TASK_DEFAULTS[task] <- YAML <- ``key=value`` overrides (values parsed as YAML)."""
    defaults = merge_config(copy.deepcopy(COMMON_DEFAULTS), copy.deepcopy(TASK_DEFAULTS[task]), source="task defaults")
    cfg = load_config(path, overrides, defaults=defaults, free=FREE_KEYS)
    where = path or "the configuration"
    if cfg["task"] != task:
        raise ConfigError(f"{where}: task is {cfg['task']!r}, this script trains {task!r}; use training."
                          f"{'linear_probe' if cfg['task'] == 'classification' else 'finetune_segmentation'}")
    if cfg["train"]["mode"] not in ("frozen", "full"):
        raise ConfigError(f"{where}: train.mode must be frozen or full, got {cfg['train']['mode']!r}")
    if cfg["train"]["avgpool"] not in (0, 1, 2):
        raise ConfigError(f"{where}: train.avgpool must be 0 (the pooled feature), 1 (the mean token, the same "
                          f"vector) or 2 (their sum = 2 x the pooled feature), got {cfg['train']['avgpool']!r}")
    if cfg["data"]["augment"] not in ("none", "usaugment"):
        raise ConfigError(f"{where}: data.augment must be none or usaugment, got {cfg['data']['augment']!r}")
    if cfg["train"]["optimizer"] not in ("sgd", "adam", "adamw"):
        raise ConfigError(f"{where}: train.optimizer must be sgd, adam or adamw, got {cfg['train']['optimizer']!r}")
    return cfg
