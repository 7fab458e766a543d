"""training/data/downstream.py: the dataset layouts and splits of upstream OpenUS (dataset/dataset_*.py), the mask rule
and the transforms."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from training.data.downstream import (DownstreamDataset, build_samples, mask_to_labels, segmentation_transform,
                                      subsample)


def _png(path, value=0, size=(40, 30), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_busi_split_pairs_and_is_seeded(tmp_path):
    for cls, n in (("benign", 20), ("malignant", 10), ("normal", 7)):
        for i in range(n):
            _png(tmp_path / cls / f"{cls} ({i}).png", 50, mode="RGB")
            _png(tmp_path / cls / f"{cls} ({i})_mask.png", 255)
    _png(tmp_path / "benign" / "benign (0)_mask_1.png", 255)  # second lesion mask: image skipped
    _png(tmp_path / "malignant" / "malignant (99).png", mode="RGB")  # no mask: skipped
    splits = {s: build_samples("busi", tmp_path, s)[0] for s in ("train", "val", "test")}
    per_class = {s: [sum(x.label == c for x in v) for c in range(3)] for s, v in splits.items()}
    assert per_class == {"train": [13, 7, 4], "val": [2, 1, 1], "test": [4, 2, 2]}  # int(.7n), int(.15n), rest
    names = [x.image for v in splits.values() for x in v]
    assert len(names) == len(set(names)) == 36 and not any("benign (0).png" in n for n in names)
    assert all(x.mask.endswith("_mask.png") for v in splits.values() for x in v)
    again, classes = build_samples("busi", tmp_path, "test")
    assert again == splits["test"] and classes == ["benign", "malignant", "normal"]
    assert build_samples("busi", tmp_path, "test", split_seed=1)[0] != splits["test"]


def test_busbra_fold_layout(tmp_path):
    base = tmp_path / "fold_1" / "validation"
    for i in (3, 10):
        _png(base / "images" / f"bus_{i:04d}-l.png", mode="RGB")
        _png(base / "masks" / f"mask_{i:04d}-l.png", 255)
    samples, classes = build_samples("busbra", tmp_path, "val", fold=1)
    assert classes is None and [s.mask.rsplit("/", 1)[1] for s in samples] == ["mask_0003-l.png", "mask_0010-l.png"]


def test_tn3k_fold_json_and_sorted_test(tmp_path):
    (tmp_path / "tn3k-trainval-fold2.json").write_text(json.dumps({"train": [5, 1], "val": [7]}))
    for i in (1, 5, 7):
        _png(tmp_path / "trainval-image" / f"{i:04d}.jpg", mode="RGB")
        _png(tmp_path / "trainval-mask" / f"{i:04d}.jpg")
    for i in (2, 0):
        _png(tmp_path / "test-image" / f"{i:04d}.jpg", mode="RGB")
        _png(tmp_path / "test-mask" / f"{i:04d}.jpg")
    train = build_samples("tn3k", tmp_path, "train", fold=2)[0]
    assert [s.image[-8:] for s in train] == ["0005.jpg", "0001.jpg"]
    assert build_samples("tn3k", tmp_path, "val", fold=2)[0][0].mask.endswith("trainval-mask/0007.jpg")
    assert [s.image[-8:] for s in build_samples("tn3k", tmp_path, "test")[0]] == ["0000.jpg", "0002.jpg"]


def test_fetal_val_is_test_and_classes_sorted(tmp_path):
    for split in ("training_set", "test_set"):
        for cls in ("Fetal brain", "Other", "Fetal abdomen"):
            _png(tmp_path / split / cls / f"{split}.png", mode="RGB")
    train, classes = build_samples("fetal", tmp_path, "train")
    assert classes == ["Fetal abdomen", "Fetal brain", "Other"] and [s.label for s in train] == [0, 1, 2]
    assert build_samples("fetal", tmp_path, "val")[0] == build_samples("fetal", tmp_path, "test")[0]


def test_generic_folder_pairs_by_name(tmp_path):
    _png(tmp_path / "images" / "a.png", mode="RGB")
    _png(tmp_path / "masks" / "a_mask.png")
    _png(tmp_path / "images" / "b.jpg", mode="RGB")
    _png(tmp_path / "masks" / "b.png")
    samples = build_samples("folder", tmp_path, "test")[0]  # no split folders: root serves every split
    assert [s.mask.rsplit("/", 1)[1] for s in samples] == ["a_mask.png", "b.png"]
    _png(tmp_path / "images" / "c.png", mode="RGB")
    with pytest.raises(FileNotFoundError, match="no mask"):
        build_samples("folder", tmp_path, "train")


def test_mask_rule_eq255_vs_gt0():
    mask = Image.fromarray(np.array([[0, 1, 128, 254, 255]], np.uint8))
    assert mask_to_labels(mask).tolist() == [[0, 0, 0, 0, 1]]  # upstream: only exactly 255
    assert mask_to_labels(mask, "gt0").tolist() == [[0, 1, 1, 1, 1]]
    with pytest.raises(ValueError):
        mask_to_labels(mask, "gt128")


def test_label_fraction_is_seeded_and_stratified():
    from training.data.downstream import Sample

    samples = [Sample(f"{i}.png", None, i % 3) for i in range(30)]
    a, b = subsample(samples, 0.2, seed=3), subsample(samples, 0.2, seed=3)
    assert a == b and len(a) == 6 and [sum(s.label == c for s in a) for c in range(3)] == [2, 2, 2]
    assert subsample(samples, 0.2, seed=4) != a and subsample(samples, 0.01, 0) and subsample(samples, 1.0) == samples


def test_segmentation_transform_keeps_image_and_mask_aligned():
    arr = np.zeros((48, 48), np.uint8)
    arr[2:10, 30:44] = 255  # an off-centre box
    img, mask = Image.fromarray(arr).convert("RGB"), Image.fromarray(arr)
    seen = set()
    for seed in range(12):
        x, y = segmentation_transform(img, mask, 32, True, random.Random(seed))
        assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.long
        assert torch.equal(x[0] > 0, y.bool())  # the bright pixels moved with the mask (nearest vs bilinear: same box)
        seen.add(tuple(y.nonzero().float().mean(0).round().tolist()))
    assert len(seen) >= 4  # rotations and flips happen
    x, y = segmentation_transform(img, mask, 32, False, None)
    assert int(y.sum()) > 0 and torch.equal(x[0] > 0, y.bool())


def test_dataset_is_deterministic_per_epoch(tmp_path):
    _png(tmp_path / "images" / "a.png", 100, size=(64, 48), mode="RGB")
    arr = np.zeros((48, 64), np.uint8)
    arr[:10, :20] = 255
    (tmp_path / "masks").mkdir()
    Image.fromarray(arr).save(tmp_path / "masks" / "a.png")
    samples = build_samples("folder", tmp_path, "train")[0]
    ds = DownstreamDataset(samples, "segmentation", 32, train=True, seed=5)
    runs = []
    for epoch in (0, 0, 1, 2, 3):
        ds.set_epoch(epoch)
        runs.append(ds[0]["labels"])
    assert torch.equal(runs[0], runs[1])
    assert any(not torch.equal(runs[0], r) for r in runs[2:])
