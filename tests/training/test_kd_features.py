"""Feature extraction, student construction, FLOP counting, schedule, data pipeline and mIoU rule of TransKD
(RuipingL/TransKD at commit 39ab795d: train/models/Segformer.py, train_TransKDBase.py, eval/iouEval.py)."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SegformerForSemanticSegmentation

from openus_hub import OpenUSConfig, OpenUSForSemanticSegmentation
from training.distill import DEFAULTS, epoch_lr
from training.kd import TransKDDistiller, TransKDModules
from training.kd.data import CoTransform, CoTransformConfig, fan_mask
from training.kd.features import FeatureTap, TeacherFeatures, hierarchical_channels
from training.kd.flops import count_flops, count_parameters
from training.metrics import IoUAccumulator
from training.kd.student import build_student, segformer_config

TINY = dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], decoder_hidden_size=16, num_labels=2)


def test_segformer_tap_matches_manual_patch_embeddings():
    model = SegformerForSemanticSegmentation(segformer_config(None, **TINY)).eval()
    tap = FeatureTap(model)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        embeds = tap.pop()
        # by hand: each stage's patch embedding sees the previous stage's output map
        inputs = [x] + list(out.hidden_states[:3])
        manual = [stage.patch_embeddings(i)[0] for stage, i in zip(model.segformer.stages, inputs)]
    assert [tuple(e.shape) for e in embeds] == [(2, 16 * 24, 8), (2, 8 * 12, 16), (2, 4 * 6, 32), (2, 2 * 3, 64)]
    for a, b in zip(embeds, manual):
        assert torch.equal(a, b)
    assert hierarchical_channels(model.config) == [8, 16, 32, 64]
    tap.remove()
    tap.clear()  # the manual calls above ran the hooked modules again
    with torch.no_grad():
        model(x)
    with pytest.raises(RuntimeError):
        tap.pop()


def test_openus_teacher_features_stem_and_downsamples():
    config = OpenUSConfig(embed_dim=8, depths=[1, 1, 1, 2], decoder_depths=[1, 1, 1, 1], drop_path_rate=0.0,
                          decoder_drop_path_rate=0.0, num_labels=2)
    teacher = TeacherFeatures(OpenUSForSemanticSegmentation(config))
    teacher.train()
    assert not teacher.teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.channels == [8, 16, 32, 64]
    x = torch.rand(1, 3, 64, 96)
    feats, embeds = teacher(x)
    assert [tuple(f.shape) for f in feats] == [(1, 8, 16, 24), (1, 16, 8, 12), (1, 32, 4, 6), (1, 64, 2, 3)]
    assert [tuple(e.shape) for e in embeds] == [(1, 384, 8), (1, 96, 16), (1, 24, 32), (1, 6, 64)]
    base = teacher.teacher.openus
    with torch.no_grad():
        stem = base.embeddings(x)  # (B, C, H, W) channel-first
        down = base.encoder.downsamples[0](base.encoder.stages[0](stem)[0])
    assert torch.equal(embeds[0], stem.flatten(2).transpose(1, 2))
    assert torch.equal(embeds[1], down.flatten(2).transpose(1, 2))
    with torch.no_grad():  # the stage features are the out-normed maps the segmentation decoder reads
        maps = base(x).feature_maps
    assert all(torch.equal(a, b) for a, b in zip(feats, maps))


def test_distiller_shapes_and_gradients_with_openus_widths():
    student = build_student(segformer_config(None, **TINY))
    distiller = TransKDDistiller(student, [8, 16, 32, 64], "gl", mid_channels=16)
    out = distiller(torch.rand(2, 3, 64, 64))
    assert out.logits.shape == (2, 2, 16, 16)
    assert [tuple(f.shape) for f in out.fused_features] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    assert [tuple(e.shape) for e in out.aligned_embeddings] == [(2, 256, 8), (2, 64, 16), (2, 16, 32), (2, 4, 64)]
    loss = sum(f.square().mean() for f in out.fused_features) + sum(e.square().mean() for e in out.aligned_embeddings)
    loss.backward()
    assert distiller.kd.gl_mixer.alpha.grad is not None
    assert student.segformer.stages[3].patch_embeddings.proj.weight.grad is not None


def test_student_init_and_upstream_numerics():
    student = build_student(segformer_config("b0", num_labels=20))
    dw = student.segformer.stages[0].blocks[0].mlp.dwconv.dwconv.weight
    assert dw.std().item() == pytest.approx((2 / 9) ** 0.5, rel=0.05)  # HF's init would give 0.02
    fc1 = student.segformer.stages[2].blocks[0].mlp.fc1.weight
    assert fc1.std().item() == pytest.approx(0.02, rel=0.05) and fc1.abs().max().item() <= 2.0
    assert student.segformer.stages[0].blocks[0].layernorm_before.eps == 1e-6
    assert student.segformer.stages[0].layer_norm.eps == 1e-6
    assert student.segformer.stages[0].patch_embeddings.layer_norm.eps == 1e-5
    assert isinstance(student.decode_head.dropout, torch.nn.Dropout2d)


def test_parameter_counts_and_flops_b0_b2():
    with torch.device("meta"):
        b0 = SegformerForSemanticSegmentation(segformer_config("b0", num_labels=20))
        b2 = SegformerForSemanticSegmentation(segformer_config("b2", num_labels=20))
    assert count_parameters(b0) == 3_719_284 and count_parameters(b2) == 27_362_004
    g0, g2 = count_flops(b0, device="meta") / 1e9, count_flops(b2, device="meta") / 1e9
    assert g0 == pytest.approx(13.67, rel=0.01) and g2 == pytest.approx(113.84, rel=0.01)
    totals = [3_719_284 + count_parameters(TransKDModules([32, 64, 160, 256], [64, 128, 320, 512], v))
              for v in ("base", "gl", "ea")]
    assert totals == [4_563_124, 5_219_254, 5_534_076]


def test_lr_schedule_matches_upstream_poly_per_epoch():
    cfg = {"optim": dict(DEFAULTS["optim"]), "schedule": dict(DEFAULTS["schedule"])}
    assert epoch_lr(cfg, 0) == pytest.approx(5.996e-5)  # epoch 1
    assert epoch_lr(cfg, 499) == pytest.approx(4.0e-5)  # epoch 500
    assert epoch_lr(cfg, 999) == pytest.approx(2.0e-5)  # epoch 1000
    cfg["schedule"]["prestep"] = False
    assert epoch_lr(cfg, 0) == pytest.approx(6e-5)


def test_cotransform_sizes_and_shift_quirk():
    image = Image.fromarray(np.full((1024, 2048, 3), 128, np.uint8))
    label = Image.fromarray(np.full((1024, 2048), 7, np.uint8))
    pixels, labels = CoTransform(CoTransformConfig(), train=False)(image, label, random.Random(0))
    assert pixels.shape == (3, 512, 1024) and labels.shape == (128, 256)
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0  # no mean/std normalisation
    acdc = Image.fromarray(np.zeros((1080, 1920, 3), np.uint8))
    _, acdc_labels = CoTransform(CoTransformConfig(), False)(acdc, Image.fromarray(np.zeros((1080, 1920), np.uint8)),
                                                            random.Random(0))
    assert acdc_labels.shape == (128, 228)

    class Fixed(random.Random):  # no flip, shift (-2, -2)
        def random(self):
            return 0.9

        def randint(self, a, b):
            return -2

    quirk = CoTransform(CoTransformConfig(), train=True)(image, label, Fixed())[1]
    # upstream: the 2-px image shift is applied as 2 *label* px, and the uncovered strip is 0 (= road), not void
    assert (quirk[:, -2:] == 0).all() and (quirk[-2:, :] == 0).all() and (quirk[:-2, :-2] == 7).all()
    # fixed: the shift is scaled to the label grid (-2 image px rounds to 0 label px here), nothing becomes road
    fixed = CoTransform(CoTransformConfig(reproduce_shift_quirks=False), train=True)(image, label, Fixed())[1]
    assert (fixed == 7).all()


def test_iou_void_prediction_is_fn_only():
    acc = IoUAccumulator(20, ignore_index=19)
    label = torch.tensor([0, 0, 1, 19, 255])
    pred = torch.tensor([0, 19, 1, 1, 0])
    acc.update(pred, label)
    iou = acc.iou()
    assert iou[0].item() == pytest.approx(0.5)  # TP 1, FN 1 (predicted void), the 255 pixel is no FP
    assert iou[1].item() == pytest.approx(1.0)  # the void-labelled pixel predicted 1 is no FP
    assert acc.miou() == pytest.approx(1.5 / 19)  # mean over the 19 real classes, absent ones count 0


def test_fan_mask_on_real_frame():
    from pydicom import examples

    frame = examples.ybr_color.pixel_array[0]
    mask = fan_mask(frame)
    assert mask.shape == frame.shape[:2] and set(np.unique(mask)) == {0, 1}
    assert 0.05 < mask.mean() < 0.6
