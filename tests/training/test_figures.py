"""The training figures: size, content, and colour scales in the plotted quantity's own units."""

import numpy as np
import pytest
import torch

from tests.conftest import skip_or_fail
from tests.output_checks import assert_figure
from training.common.figures import frame_similarity_figure, pretraining_figure, segmentation_figure
from training.metrics import image_dice, pooled_dice_iou



@pytest.fixture(autouse=True)
def _matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the test extra installs it: CI must have it
        skip_or_fail('matplotlib is not installed (pip install "openus_hub[plot]")')


def test_frame_similarity_scale_spans_the_values(tmp_path):
    # cosine similarities packed into 0.9993-0.9999, as the quickstart's tiny model gives
    rng = np.random.default_rng(0)
    emb = 1.0 + 0.012 * rng.normal(size=(12, 32))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sim = emb @ emb.T
    info = frame_similarity_figure(sim, tmp_path / "sim.png", title="test")
    assert (info.vmin, info.vmax) == (sim.min(), sim.max())
    assert sim.max() - sim.min() < 1e-2  # the case that min-max scaling to black/white used to exaggerate unlabelled
    assert info.size == (1100, 480)
    assert_figure(info.path, info.size)
    with pytest.raises(ValueError, match="square"):
        frame_similarity_figure(sim[:3, :4], tmp_path / "bad.png", title="test")


def test_pretraining_figure_shows_attention_on_its_grid(tmp_path):
    rng = np.random.default_rng(1)
    crops = rng.random((3, 64, 64, 3))
    attention = rng.random((3, 2, 2))
    masks = rng.random((3, 2, 2)) > 0.5
    info = pretraining_figure(tmp_path / "p.png", crops, attention, masks, rng.random((3, 64, 64, 3)), step=7, epoch=2)
    assert (info.vmin, info.vmax) == (attention.min(), attention.max())  # one shared scale for all rows
    assert info.size == (1400, int(round((3.3 * 3 + 0.6) * 100)))
    assert_figure(info.path, info.size)


def test_segmentation_figure_and_image_dice(tmp_path):
    target = torch.zeros(16, 16, dtype=torch.long)
    target[4:12, 4:12] = 1  # 64 px
    pred = torch.zeros(16, 16, dtype=torch.long)
    pred[4:12, 8:16] = 1  # 64 px, 32 shared
    assert image_dice(pred, target, 2) == pytest.approx((2 * 32 + 1e-6) / (128 + 1e-6))
    assert image_dice(pred, target, 2) == pooled_dice_iou(pred[None], target[None])[0]
    # three classes: the mean over the classes present (class 2 absent from both -> left out), void excluded
    t3, p3 = target.clone(), pred.clone()
    t3[0, 0], p3[0, 0] = 3, 3
    assert image_dice(p3, t3, 4, exclude=(3,)) == pytest.approx(np.mean([2 * (256 - 64 - 64 + 32 - 1) / (2 * (256 - 64) - 2), 0.5]))
    images = np.random.default_rng(2).random((2, 16, 16, 3))
    info = segmentation_figure(tmp_path / "s.png", images, np.stack([target.numpy()] * 2), np.stack([pred.numpy()] * 2),
                               [0.5, 0.5], title="test", class_names=["background", "lesion"])
    assert info.size == (1100, int(round((3.2 * 2 + 1.0) * 100)))
    assert_figure(info.path, info.size)
