r"""Segmentation fine-tuning of OpenUS with upstream's MambaDecoder head (``eval_segmentation.py``), one process or
torchrun + DDP.

    python -m training.finetune_segmentation --config training/configs/downstream/busbra_seg.yaml \
        --output-dir runs/busbra data.root=/data/BUS-BRA/organized_data model.init_from=hf/openus-small
    torchrun --nproc_per_node=4 -m training.finetune_segmentation --config ... --output-dir runs/busbra
    ... --resume auto   # continue from the newest checkpoint in OUTPUT_DIR/checkpoints that verifies

Upstream protocol (``train.mode=frozen``, the default): frozen backbone (eval, no autograd), a fresh MambaDecoder
trained with Adam lr 1e-3 (wd 0), cosine over 100 epochs (per epoch), cross-entropy ignoring 255 (no Dice term;
``model.overrides.use_dice_loss=true`` adds one), batch 16, seed 42, 224 px; masks -> labels with pixel == 255
(``data.label_rule=gt0`` for any non-zero pixel). Validation each epoch with batch-pooled Dice/IoU; the best model is
the last one where Dice or IoU improved (``train.select=either``, upstream). ``train.mode=full`` fine-tunes the
backbone too. See ``training/downstream_train.py`` for the output folder.
"""

from __future__ import annotations

import sys

from .downstream_train import main as _main


def main(argv: list[str] | None = None) -> int:
    return _main("segmentation", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
