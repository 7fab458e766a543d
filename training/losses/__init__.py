"""Training losses, one per file. The TransKD losses (``train_TransKDBase.py:242-268`` of RuipingL/TransKD at commit
39ab795d) are re-exported here; `transkd.py` sums them exactly as upstream does. Pretraining losses (`ibot_loss.py`,
`reconstruction.py`) are imported by module path."""

from .hcl import hierarchical_context_loss, hierarchical_context_loss_per_stage
from .patch_embedding import PatchEmbeddingLoss
from .transkd import TransKDLoss
from .weighted_ce import ERFNET_CITYSCAPES_WEIGHTS, WeightedCrossEntropyLoss

__all__ = [
    "ERFNET_CITYSCAPES_WEIGHTS",
    "PatchEmbeddingLoss",
    "TransKDLoss",
    "WeightedCrossEntropyLoss",
    "hierarchical_context_loss",
    "hierarchical_context_loss_per_stage",
]
