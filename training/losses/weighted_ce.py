"""Class-weighted cross-entropy with a void class (``train_TransKDBase.py:72, 77-114`` of RuipingL/TransKD at
commit 39ab795d).

`NLLLoss(weight=w)(log_softmax(logits), labels)` with the mean reduction: sum_p w[y_p] * nll_p / sum_p w[y_p], over
the pixels of the (1/4-resolution) logits. Upstream's Cityscapes/ACDC setup has 20 classes: the 19 trainIds with
ERFNet's weights and a dummy class 19 with weight 0 that label 255 is remapped to, so void pixels change neither the
numerator nor the denominator. Datasets without a void class use `ignore_index` instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ERFNet's Cityscapes class weights for trainIds 0..18 (upstream train_TransKDBase.py, used for ACDC too)
ERFNET_CITYSCAPES_WEIGHTS = (
    2.5959737, 6.741505, 3.5353868, 9.866315, 9.690922, 9.369371, 10.289124, 9.953209, 4.3098087, 9.490392,
    7.674411, 9.396925, 10.347794, 6.3928986, 10.226673, 10.241072, 10.28059, 10.396977, 10.05567,
)


class WeightedCrossEntropyLoss(torch.nn.Module):
    """`class_weights`: one weight per class (None: all 1). `void_class`: labels equal to `ignore_index` are remapped
    to this class, whose weight is forced to 0 (upstream's class 19). Without `void_class`, `ignore_index` pixels are
    dropped."""

    def __init__(self, class_weights: list[float] | tuple[float, ...] | None = None, void_class: int | None = None,
                 ignore_index: int = 255):
        super().__init__()
        self.void_class = void_class
        self.ignore_index = ignore_index
        weights = None if class_weights is None else torch.tensor([float(w) for w in class_weights])
        if void_class is not None:
            if weights is None:
                raise ValueError("a void class needs explicit class_weights")
            if void_class == len(weights):  # weights given for the real classes only: append the void weight
                weights = torch.cat([weights, weights.new_zeros(1)])
            weights[void_class] = 0.0
        self.register_buffer("class_weights", weights, persistent=False)

    @classmethod
    def transkd_cityscapes(cls) -> "WeightedCrossEntropyLoss":
        """Upstream's loss: ERFNet weights for classes 0..18, void class 19 (weight 0), 255 -> 19."""
        return cls(ERFNET_CITYSCAPES_WEIGHTS, void_class=19)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits (B, K, h, w), labels (B, h, w) at the same size (upstream downsamples labels, not logits)."""
        if labels.ndim == 4 and labels.shape[1] == 1:  # (B, 1, h, w) as upstream's loader yields
            labels = labels[:, 0]
        if logits.shape[-2:] != labels.shape[-2:]:
            raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in size")
        labels = labels.long()
        if self.void_class is not None:
            labels = torch.where(labels == self.ignore_index, torch.full_like(labels, self.void_class), labels)
        weight = None if self.class_weights is None else self.class_weights.to(logits.device, torch.float32)
        return F.nll_loss(F.log_softmax(logits.float(), dim=1), labels, weight=weight, ignore_index=self.ignore_index)
