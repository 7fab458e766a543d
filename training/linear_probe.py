r"""Linear probe / classification fine-tuning of OpenUS (upstream ``eval_linear.py``), one process or torchrun + DDP.

    python -m training.linear_probe --config training/configs/downstream/busi_linear.yaml --output-dir runs/busi \
        data.root=/data/BUSI model.init_from=hf/openus-small [key=value ...]
    torchrun --nproc_per_node=4 -m training.linear_probe --config ... --output-dir runs/busi
    ... --resume auto   # continue from the newest checkpoint in OUTPUT_DIR/checkpoints that verifies

Upstream protocol (``train.mode=frozen``, the default): the backbone is frozen (eval, no autograd); a
``Linear(C, num_labels)`` (N(0, 0.01), bias 0) is trained on ``avgpool`` features (0/1 = the pooled last-stage
feature, 2 = twice it, upstream's README setting) with SGD momentum 0.9, wd 0, lr = ``train.lr`` x batch/16, cosine
over 150 epochs (per epoch), cross-entropy, seed 42; the best validation accuracy (>=) is kept. ``train.mode=full``
fine-tunes the backbone too (``train.backbone_lr_mult`` scales its lr). The exported
``OpenUSForImageClassification`` folds the avgpool factor into its classifier, so it needs no extra setting.
See ``training/downstream_train.py`` for the output folder.
"""

from __future__ import annotations

import sys

from .downstream_train import main as _main


def main(argv: list[str] | None = None) -> int:
    return _main("classification", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
