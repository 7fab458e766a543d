"""OpenUS pretraining (self-adaptive masked contrastive learning, spec §2) on top of openus_hub.

Not installed with the package: run from the repository root (``python -m training.pretrain ...``). This package
imports openus_hub; openus_hub never imports it.
"""
