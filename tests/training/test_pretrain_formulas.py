"""Masking, schedules, losses and optimiser helpers of training/ against upstream OpenUS's formulas (main_openus.py,
utils.py; hand-checked)."""

import math
import random

import numpy as np
import pytest
import torch

from openus_hub import OpenUSConfig
from training.data.augmentations import MultiCropAugmentation
from training.data.masking import adaptive_mask, block_mask, mask_schedules, mask_scores
from training.losses.ibot_loss import IBOTLoss
from training.losses.reconstruction import ReconstructionImportance, patch_pixel_loss, reconstruction_loss
from training.ssl_meta_arch import (
    OpenUSPretrainNetwork,
    build_teacher,
    cancel_last_layer_gradients,
    clip_gradients,
    ema_update,
    param_groups,
)
from training.common.schedulers import cosine_scheduler

TINY = dict(embed_dim=8, depths=[1, 1, 1, 2], drop_path_rate=0.0)
HEAD = dict(out_dim=16, patch_out_dim=16, hidden_dim=12, bottleneck_dim=6)


def test_alpha_and_m_t_per_epoch():
    assert mask_schedules(0, 151) == pytest.approx((0.1, 0.1))
    alpha75, m75 = mask_schedules(75, 151)
    assert alpha75 == pytest.approx(0.1 + 0.8 * (1 - math.cos(math.pi * 75 / 151)) / 2)
    assert alpha75 == pytest.approx(0.4958, abs=1e-4)  # 0.1 + 0.8 * (1 - cos(pi * 75 / 151)) / 2
    assert m75 == pytest.approx(0.1 + 0.8 * 75 / 151)
    alpha150, m150 = mask_schedules(150, 151)
    assert alpha150 == pytest.approx(0.89991, abs=1e-5) and m150 == pytest.approx(0.8947, abs=1e-4)
    assert mask_schedules(75, 151, adaptive_weighting=False)[0] == 0.1


def test_top_k_switches_to_deterministic_top30_at_epoch_97():
    assert int(49 * mask_schedules(96, 151)[1]) == 29 and int(49 * mask_schedules(97, 151)[1]) == 30
    scores = torch.rand(3, 49, generator=torch.Generator().manual_seed(1))
    top30 = torch.zeros(3, 49, dtype=torch.bool)
    top30[torch.arange(3)[:, None], scores.argsort(1, descending=True)[:, :30]] = True
    for epoch in (97, 120, 150):
        for seed in (0, 1):
            m = adaptive_mask(scores, (7, 7), 0.6, mask_schedules(epoch, 151)[1], torch.Generator().manual_seed(seed))
            assert torch.equal(m.view(3, 49), top30)
    # epoch 96: top 29 by score always, the 30th at random
    masks = [adaptive_mask(scores, (7, 7), 0.6, mask_schedules(96, 151)[1], torch.Generator().manual_seed(s)).view(3, 49)
             for s in range(6)]
    top29 = torch.zeros(3, 49, dtype=torch.bool)
    top29[torch.arange(3)[:, None], scores.argsort(1, descending=True)[:, :29]] = True
    assert all(bool((m & top29).eq(top29).all()) and m.sum(1).eq(30).all() for m in masks)
    assert any(not torch.equal(masks[0], m) for m in masks[1:])


def test_epoch0_mask_is_4_by_score_plus_26_random():
    scores = torch.arange(49.0).flip(0)[None]  # token 0 scores highest
    m = adaptive_mask(scores, (7, 7), 0.6, mask_schedules(0, 151)[1], torch.Generator().manual_seed(0)).view(-1)
    assert int(m.sum()) == 30 and bool(m[:4].all())


def test_mask_scores_mix_normalised_attention_and_importance():
    attn = torch.rand(2, 4, 4)
    prev = torch.tensor([[0.0, 2.0, 0.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    assert torch.equal(mask_scores(attn, None, 0.3), attn.mean(1))
    a = attn.mean(1)
    a = (a - a.min(1, keepdim=True).values) / (a.max(1, keepdim=True).values - a.min(1, keepdim=True).values + 1e-8)
    expected = 0.3 * a + 0.7 * torch.tensor([[0.0, 1.0, 0.0, 0.5], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(mask_scores(attn, prev, 0.3), expected, atol=1e-6, rtol=0)


def test_block_mask_shape_and_count():
    counts = [int(block_mask(7, 7, 0.3, random.Random(s)).sum()) for s in range(50)]
    assert all(0 < c <= 49 for c in counts)
    assert 10 <= np.mean(counts) <= 20  # target 0.3 * 49 = 14.7
    assert block_mask(3, 3, 0.3, random.Random(0)).shape == (3, 3)


def test_cosine_scheduler_warmup_and_ends():
    s = cosine_scheduler(5e-4, 1e-6, epochs=4, niter_per_ep=10, warmup_epochs=1)
    assert len(s) == 40 and s[0] == 0.0 and s[9] == pytest.approx(5e-4) and s[10] == pytest.approx(5e-4)
    assert s[-1] == pytest.approx(1e-6 + 0.5 * (5e-4 - 1e-6) * (1 + math.cos(math.pi * 29 / 30)))
    wd = cosine_scheduler(0.04, 0.4, 151, 3)
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4, abs=1e-4) and np.all(np.diff(wd) >= 0)


def _ibot(n_local=8, out=16):
    return IBOTLoss(out, out, 2, n_local, 0.04, 0.04, 0.04, 0.07, 30, 151)


def test_ibot_cls_loss_18_pairs_and_patch_loss_direct():
    g = torch.Generator().manual_seed(0)
    b, k, length, n_local = 3, 16, 4, 8
    s_cls, t_cls = torch.randn(10 * b, k, generator=g), torch.randn(2 * b, k, generator=g)
    s_patch, t_patch = torch.randn(2 * b, length, k, generator=g), torch.randn(2 * b, length, k, generator=g)
    masks = torch.rand(2 * b, 2, 2, generator=g) > 0.5
    masks[0] = False  # an image without masked tokens: clamp(min=1) keeps the loss finite
    loss = _ibot(n_local, k)
    c1, c2 = torch.randn(1, k, generator=g), torch.randn(1, 1, k, generator=g)
    loss.center.copy_(c1)
    loss.center2.copy_(c2)
    epoch = 10
    out = loss(s_cls, s_patch, t_cls, t_patch, masks, epoch)
    temp2 = float(np.linspace(0.04, 0.07, 30)[epoch])
    # direct: every (teacher global q, student view v != q) pair, one by one
    terms = []
    for q in range(2):
        p = torch.softmax((t_cls[q * b:(q + 1) * b] - c1) / 0.04, -1)
        for v in range(10):
            if v != q:
                logq = torch.log_softmax(s_cls[v * b:(v + 1) * b] / 0.1, -1)
                terms.append(-(p * logq).sum(-1).mean())
    assert len(terms) == 18
    torch.testing.assert_close(out["cls"], torch.stack(terms).mean())
    patch_terms = []
    for q in range(2):
        per_image = []
        for i in range(q * b, (q + 1) * b):
            p = torch.softmax((t_patch[i] - c2[0]) / temp2, -1)
            ce = -(p * torch.log_softmax(s_patch[i] / 0.1, -1)).sum(-1)  # [L]
            m = masks[i].flatten().float()
            per_image.append((ce * m).sum() / max(1.0, float(m.sum())))
        patch_terms.append(torch.stack(per_image).mean())
    torch.testing.assert_close(out["patch"], torch.stack(patch_terms).mean())
    torch.testing.assert_close(out["loss"], out["cls"] + out["patch"])
    # centers after the call: momentum 0.9 toward the batch mean (patch: over all tokens)
    torch.testing.assert_close(loss.center, 0.9 * c1 + 0.1 * t_cls.mean(0, keepdim=True))
    torch.testing.assert_close(loss.center2, 0.9 * c2 + 0.1 * t_patch.mean(1).mean(0)[None, None])


def test_teacher_patch_temperature_schedule():
    loss = _ibot()
    assert loss.teacher_temp2_schedule[0] == pytest.approx(0.04)
    assert loss.teacher_temp2_schedule[29] == pytest.approx(0.07)
    assert loss.teacher_temp2_schedule[150] == pytest.approx(0.07) and len(loss.teacher_temp2_schedule) == 151
    assert np.allclose(loss.teacher_temp_schedule, 0.04)


def test_reconstruction_loss_and_importance_hand_case():
    x = torch.zeros(1, 3, 4, 4)
    rec = torch.zeros(1, 3, 4, 4)
    rec[:, :, :2, :2] = 1.0  # cell (0, 0) wrong by 1 everywhere
    rec[:, 0, 2:, 2:] = 3.0  # cell (1, 1) wrong by 3 on one channel
    mask = torch.tensor([[[True, False], [False, True]]])
    # masked pixels: 4 + 4 = 8; squared errors: 4*3*1 + 4*9 = 48 -> 48 / 8 / 3 = 2
    assert reconstruction_loss(rec, x, mask, 2).item() == pytest.approx(2.0, rel=1e-5)
    per_cell = patch_pixel_loss(rec, x, mask, 2)
    torch.testing.assert_close(per_cell, torch.tensor([[1.0, 0.0, 0.0, 3.0]]))
    imp = ReconstructionImportance(channels=2, num_cells=4)
    first = imp(per_cell)  # first call: raw loss, ema = batch mean
    torch.testing.assert_close(first, per_cell[:, None].expand(1, 2, 4))
    torch.testing.assert_close(imp.ema_loss_map, per_cell.expand(2, 4))
    second = imp(torch.tensor([[0.0, 1.0, 0.0, 0.0]]))  # training: ema <- .7 ema + .3 loss; out .7 loss + .3 ema
    ema = 0.7 * per_cell + 0.3 * torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(imp.ema_loss_map, ema.expand(2, 4))
    torch.testing.assert_close(second, (0.7 * torch.tensor([[0.0, 1.0, 0.0, 0.0]]) + 0.3 * ema)[:, None].expand(1, 2, 4))


def _nets():
    config = OpenUSConfig(**TINY, use_mask_token=True)
    student = OpenUSPretrainNetwork(config, HEAD)
    return student, build_teacher(student, HEAD)


def test_param_groups_follow_upstream():
    student, _ = _nets()
    groups = param_groups(student)
    ids0, ids1 = {id(p) for p in groups[0]["params"]}, {id(p) for p in groups[1]["params"]}
    named = dict(student.named_parameters())
    mixer = "backbone.encoder.stages.0.layers.0.mixer."
    for name in ("A_log", "dt_proj_bias", "x_proj_weight", "dt_proj_weight"):
        assert id(named[mixer + name]) in ids0
    assert id(named["backbone.embeddings.mask_token"]) in ids0
    assert id(named[mixer + "D"]) in ids1 and id(named["decoder.0.bias"]) in ids1
    assert id(named["backbone.embeddings.norm1.weight"]) in ids1
    assert id(named["head.last_layer.weight_g"]) not in ids0 | ids1  # frozen
    assert groups[1]["weight_decay"] == 0.0


def test_per_tensor_clipping_and_last_layer_freeze():
    student, _ = _nets()
    for p in student.parameters():
        p.grad = torch.full_like(p, 10.0) if p.requires_grad else None
    clip_gradients(student, 3.0)
    for p in student.parameters():
        if p.grad is not None:
            assert p.grad.norm().item() == pytest.approx(3.0, rel=1e-4)  # each tensor on its own
    cancel_last_layer_gradients(student, epoch=1, freeze_last_layer=1)
    assert student.head.last_layer.weight_v.grad is not None
    cancel_last_layer_gradients(student, epoch=0, freeze_last_layer=1)
    assert student.head.last_layer.weight_v.grad is None and student.head.last_layer2.weight_v.grad is None
    assert student.head.mlp[0].weight.grad is not None


def test_ema_update_shared_teacher_layer_follows_student_cls_layer():
    student, teacher = _nets()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    ema_update(student, teacher, 0.9)
    s = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * s[name])
    assert "head.last_layer2.weight_v" not in dict(teacher.named_parameters())
    assert teacher.head.last_layer2 is teacher.head.last_layer


def test_multicrop_shapes_normalisation_and_seed():
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    aug = MultiCropAugmentation(64, 32, 3)
    a, b = aug(img, random.Random(5)), aug(img, random.Random(5))
    assert [tuple(c.shape) for c in a] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 3
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], aug(img, random.Random(6))[0])
    black = aug(Image.new("RGB", (64, 64)), random.Random(0))[0]  # solid black stays black except for solarize
    torch.testing.assert_close(black[:, 0, 0], -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225]))


def test_student_forward_end_to_end_backward():
    student, teacher = _nets()
    g = torch.Generator().manual_seed(0)
    globals_, locals_ = torch.randn(4, 3, 64, 64, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    t_cls, t_patch, attn = teacher.teacher_forward(globals_)
    assert attn.shape == (4, 4, 4) and attn.min() == 0 and attn.max() == 1
    gm = adaptive_mask(mask_scores(attn, None, 0.1), (2, 2), 0.6, 0.1, g)
    assert gm.view(4, -1).sum(1).eq(3).all()  # ceil(4 * 0.6)
    out = student(globals_, gm, locals_, torch.ones(4, 1, 1, dtype=torch.bool))
    assert out["importance"].shape == (4, 64, 4) and out["local_cls"].shape == (4, 16)
    loss = _ibot(2)(torch.cat([out["global_cls"], out["local_cls"]]), out["global_patch"], t_cls, t_patch, gm, 0)
    total = loss["loss"] + out["global_rec"] + out["local_rec"]
    total.backward()
    no_grad = {n for n, p in student.named_parameters() if p.requires_grad and p.grad is None}
    # every parameter is in the loss: OpenUSModel holds only the last stage's out-norm (upstream's outnorm0-2 never
    # enter pretraining, so they are not built)
    assert not no_grad, no_grad
