"""Hand checks of the TransKD losses (train_TransKDBase.py:242-268, CSF.py:139-156): HCL normaliser and level
skipping, the void class, the sum."""

import pytest
import torch
import torch.nn.functional as F

from training.losses import (
    ERFNET_CITYSCAPES_WEIGHTS,
    PatchEmbeddingLoss,
    TransKDLoss,
    WeightedCrossEntropyLoss,
    hierarchical_context_loss,
    hierarchical_context_loss_per_stage,
)


def test_hcl_full_pyramid_normaliser_1_875():
    # constant maps: every pooled level has the same MSE, so the weighted mean over levels equals it exactly
    s, t = torch.full((1, 2, 16, 16), 3.0), torch.zeros(1, 2, 16, 16)
    assert hierarchical_context_loss([s], [t]).item() == pytest.approx(9.0)
    # a zero-mean difference vanishes in every pooled level: only the full-map term, divided by 1.875
    diff = torch.zeros(1, 1, 16, 16)
    diff[..., ::2, :] = 1.0
    diff[..., 1::2, :] = -1.0
    assert hierarchical_context_loss([diff], [torch.zeros_like(diff)]).item() == pytest.approx(1.0 / 1.875)


def test_hcl_skips_levels_by_height_only():
    # height 4: the 4x4 level is skipped -> weights 1, 1/2, 1/4, normaliser 1.75; width (32) is not looked at
    s, t = torch.randn(2, 3, 4, 32), torch.randn(2, 3, 4, 32)
    expected = (F.mse_loss(s, t) + 0.5 * F.mse_loss(F.adaptive_avg_pool2d(s, 2), F.adaptive_avg_pool2d(t, 2))
                + 0.25 * F.mse_loss(F.adaptive_avg_pool2d(s, 1), F.adaptive_avg_pool2d(t, 1))) / 1.75
    (got,) = hierarchical_context_loss_per_stage([s], [t])
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # height 2: only full + 1x1 -> normaliser 1.5; height 1: full only
    s2, t2 = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    e2 = (F.mse_loss(s2, t2) + 0.5 * F.mse_loss(s2.mean((2, 3)), t2.mean((2, 3)))) / 1.5
    assert hierarchical_context_loss([s2], [t2]).item() == pytest.approx(e2.item(), rel=1e-6)
    # equal stage weights: the total is the plain sum
    assert hierarchical_context_loss([s, s2], [t, t2]).item() == pytest.approx(got.item() + e2.item(), rel=1e-6)


def test_weighted_ce_void_class_changes_nothing():
    loss = WeightedCrossEntropyLoss.transkd_cityscapes()
    assert loss.class_weights.shape == (20,) and loss.class_weights[19] == 0
    assert loss.class_weights[:19].tolist() == pytest.approx(ERFNET_CITYSCAPES_WEIGHTS)
    logits = torch.randn(1, 20, 4, 4)
    labels = torch.randint(0, 19, (1, 4, 4))
    w = loss.class_weights
    nll = -F.log_softmax(logits, 1).gather(1, labels[:, None])[:, 0]
    expected = (w[labels] * nll).sum() / w[labels].sum()
    assert loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    # void pixels (19, or 255 remapped to 19) change neither numerator nor denominator
    voided = labels.clone()
    voided[0, 0, :] = 19
    voided[0, 1, :] = 255
    keep = voided < 19
    expected_void = (w[labels][keep] * nll[keep]).sum() / w[labels][keep].sum()
    assert loss(logits, voided).item() == pytest.approx(expected_void.item(), rel=1e-6)
    # ignore_index without a void class gives the same value for the 255 pixels
    plain = WeightedCrossEntropyLoss(list(w[:19]) + [0.0], void_class=None)
    assert plain(logits, torch.where(voided == 19, 255, voided)).item() == pytest.approx(expected_void.item(), rel=1e-6)


def test_total_is_hcl_plus_ce_plus_weighted_pe():
    torch.manual_seed(1)
    fused = [torch.randn(2, c, h, h) for c, h in ((4, 16), (8, 8), (8, 4), (16, 2))]
    teacher = [torch.randn_like(f) for f in fused]
    emb = [torch.randn(2, n, c) for n, c in ((256, 4), (64, 8), (16, 8), (4, 16))]
    temb = [torch.randn_like(e) for e in emb]
    logits, labels = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))
    ce = WeightedCrossEntropyLoss([1.0, 2.0, 3.0])
    total, parts = TransKDLoss(ce, hcl_weight=1.0)(logits, labels, fused, teacher, emb, temb)
    pe = sum(w * F.mse_loss(a, b) for w, a, b in zip((0.1, 0.1, 0.5, 1.0), emb, temb))
    expected = hierarchical_context_loss(fused, teacher) + ce(logits, labels) + pe
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["pe"].item() == pytest.approx(PatchEmbeddingLoss()(emb, temb).item(), rel=1e-6)
