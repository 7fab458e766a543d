"""Training on top of openus_hub: OpenUS pretraining (self-adaptive masked contrastive learning, upstream
``main_openus.py`` of XZheng0427/OpenUS), TransKD distillation and downstream fine-tuning/evaluation.

Not installed with the package: run from the repository root (``python -m training.pretrain ...``). This package
imports openus_hub; openus_hub never imports it.
"""
