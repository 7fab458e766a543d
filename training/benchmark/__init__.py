"""``python -m training.benchmark``: any checkpoint on the UltraBench ultrasound tasks in one command (linear probe
and k-NN on frozen features, segmentation with a frozen backbone or full fine-tuning), with results, figures and a
model-card section. See :mod:`training.benchmark.cli`."""

from .cli import DEFAULTS, main

__all__ = ["DEFAULTS", "main"]
