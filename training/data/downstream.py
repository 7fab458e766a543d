"""Downstream datasets of OpenUS from folders, with upstream's splits and transforms (``dataset/dataset_busi.py``,
``dataset_fetal_planes_pytorch.py``, ``dataset_tn3k.py``, ``dataset_busbra.py``, ``dataset/transforms.py``,
``eval_linear.py:31-56`` of XZheng0427/OpenUS at commit 6b9f6d2e).

Layouts (``root`` is the dataset folder; ``split`` is ``train``, ``val`` or ``test``):

=========  ============================================================================================================
dataset    layout
=========  ============================================================================================================
busi       ``root/{benign,malignant,normal}/NAME.png`` + ``NAME_mask.png``; images with a ``NAME_mask_1`` are skipped,
           images without ``NAME_mask`` too. Per class a seeded 70/15/15 split (upstream ``split_dataset``:
           ``random.seed(42)``, one stream over the classes in order). Upstream's already-split output
           ``root/{training,validation,test}/<class>/`` is used as is when present. Labels benign 0, malignant 1,
           normal 2; the masks are there for segmentation use.
busbra     ``root/fold_{k}/{train,validation,test}/{images,masks}``, ``bus_X.png`` <-> ``mask_X.png``
tn3k       ``root/trainval-image/{id:04d}.jpg``, ``root/trainval-mask/{id:04d}.jpg``, ids from
           ``root/tn3k-trainval-fold{k}.json`` (``{"train": [...], "val": [...]}``); test: ``root/test-image`` and
           ``root/test-mask``, sorted file names
fetal      ``root/training_set/<class>/*``, ``root/test_set/<class>/*``, classes in sorted folder order; no
           validation split upstream: ``val`` = ``test``
folder     segmentation, generic: ``root/<split>/images/X.*`` + ``root/<split>/masks/X.*`` (or ``X_mask.*``); without
           split folders ``root/images`` + ``root/masks`` serve every split
imagefolder classification, generic: ``root/<split>/<class>/*`` (``train``/``training``, ``val``/``validation``,
           ``test``)
=========  ============================================================================================================

Mask rule: upstream turns a mask into labels with ``ToTensor().long()``, so only pixels **exactly 255** become 1
(``label_rule="eq255"``); JPEG-artifact values 1-254 become background. ``label_rule="gt0"`` makes every non-zero
pixel foreground (what the offline metric script ``calculate_dice_iou.py`` assumes), which is the better choice for
JPEG masks (TN3K).

Ultrasound augmentation (``data.augment: usaugment``, training only): ``training.data.us_augment`` after the
geometric transforms, on the image in [0, 1], with a full-frame scan mask.

Label efficiency: :func:`subsample` keeps a seeded fraction of the training samples (per class for classification).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .augmentations import IMAGENET_MEAN, IMAGENET_STD, random_resized_crop_box, to_normalized_tensor

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
BUSI_CLASSES = ("benign", "malignant", "normal")
SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "validation"), "test": ("test",)}


@dataclass(frozen=True)
class Sample:
    image: str
    mask: str | None = None
    label: int | None = None


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS) if folder.is_dir() \
        else []


def _split_dir(root: Path, split: str) -> Path | None:
    for name in SPLIT_ALIASES[split]:
        if (root / name).is_dir():
            return root / name
    return None


# ---------------------------------------------------------------------------------------------------------------------
# layouts


def busi_samples(root: str | Path, split: str, seed: int = 42) -> tuple[list[Sample], list[str]]:
    root = Path(root)
    pre = _split_dir(root, split) if (root / "training").is_dir() or (root / "train").is_dir() else None
    if pre is not None:  # upstream split_dataset output
        return _busi_class_folders(pre), list(BUSI_CLASSES)
    rng = random.Random(seed)
    out: list[Sample] = []
    for label, cls in enumerate(BUSI_CLASSES):
        folder = root / cls
        if not folder.is_dir():
            raise FileNotFoundError(f"BUSI: no class folder {folder}")
        pairs = _busi_pairs(folder)
        rng.shuffle(pairs)
        n = len(pairs)
        n_train, n_val = int(0.7 * n), int(0.15 * n)
        chosen = {"train": pairs[:n_train], "val": pairs[n_train : n_train + n_val], "test": pairs[n_train + n_val :]}
        out += [Sample(str(img), str(mask), label) for img, mask in chosen[split]]
    return out, list(BUSI_CLASSES)


def _busi_pairs(folder: Path) -> list[tuple[Path, Path]]:
    pairs = []
    for img in _images(folder):
        if "_mask" in img.stem:
            continue
        mask = img.with_name(f"{img.stem}_mask{img.suffix}")
        extra = img.with_name(f"{img.stem}_mask_1{img.suffix}")
        if mask.is_file() and not extra.is_file():
            pairs.append((img, mask))
    return pairs


def _busi_class_folders(split_root: Path) -> list[Sample]:
    out = []
    for label, cls in enumerate(BUSI_CLASSES):
        out += [Sample(str(img), str(mask), label) for img, mask in _busi_pairs(split_root / cls)]
    return out


def busbra_samples(root: str | Path, split: str, fold: int = 0) -> list[Sample]:
    name = {"train": "train", "val": "validation", "test": "test"}[split]
    base = Path(root) / f"fold_{fold}" / name
    out = []
    for img in _images(base / "images"):
        mask = base / "masks" / (img.name.replace("bus_", "mask_", 1))
        if not mask.is_file():
            raise FileNotFoundError(f"BUS-BRA: no mask {mask} for {img}")
        out.append(Sample(str(img), str(mask)))
    if not out:
        raise FileNotFoundError(f"BUS-BRA: no images under {base / 'images'}")
    return out


def tn3k_samples(root: str | Path, split: str, fold: int = 0) -> list[Sample]:
    root = Path(root)
    if split == "test":
        imgs, masks = _images(root / "test-image"), _images(root / "test-mask")
        if len(imgs) != len(masks) or not imgs:
            raise FileNotFoundError(f"TN3K: {len(imgs)} test images but {len(masks)} masks under {root}")
        return [Sample(str(i), str(m)) for i, m in zip(imgs, masks)]
    ids = json.loads((root / f"tn3k-trainval-fold{fold}.json").read_text())["train" if split == "train" else "val"]
    return [Sample(str(root / "trainval-image" / f"{int(i):04d}.jpg"),
                   str(root / "trainval-mask" / f"{int(i):04d}.jpg")) for i in ids]


def class_folder_samples(split_root: Path, classes: list[str] | None = None) -> tuple[list[Sample], list[str]]:
    classes = classes or sorted(p.name for p in split_root.iterdir() if p.is_dir())
    out = []
    for label, cls in enumerate(classes):
        out += [Sample(str(p), None, label) for p in _images(split_root / cls)]
    return out, classes


def fetal_samples(root: str | Path, split: str) -> tuple[list[Sample], list[str]]:
    root = Path(root)
    train_classes = sorted(p.name for p in (root / "training_set").iterdir() if p.is_dir())
    folder = root / ("training_set" if split == "train" else "test_set")  # upstream: val = test
    return class_folder_samples(folder, train_classes)


def folder_seg_samples(root: str | Path, split: str) -> list[Sample]:
    root = Path(root)
    base = _split_dir(root, split) or root
    masks = {p.stem: p for p in _images(base / "masks")}
    out = []
    for img in _images(base / "images"):
        mask = masks.get(img.stem) or masks.get(f"{img.stem}_mask")
        if mask is None:
            raise FileNotFoundError(f"no mask for {img} in {base / 'masks'} (same name, or NAME_mask)")
        out.append(Sample(str(img), str(mask)))
    if not out:
        raise FileNotFoundError(f"no images under {base / 'images'}")
    return out


def imagefolder_samples(root: str | Path, split: str) -> tuple[list[Sample], list[str]]:
    root = Path(root)
    base = _split_dir(root, split)
    if base is None:
        raise FileNotFoundError(f"no {SPLIT_ALIASES[split]} folder under {root}")
    train = _split_dir(root, "train") or base
    return class_folder_samples(base, sorted(p.name for p in train.iterdir() if p.is_dir()))


def build_samples(dataset: str, root: str | Path, split: str, fold: int = 0,
                  split_seed: int = 42) -> tuple[list[Sample], list[str] | None]:
    """(samples, class names or None) of one split of a named layout (see the module docstring)."""
    if split not in SPLIT_ALIASES:
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if dataset == "busi":
        return busi_samples(root, split, split_seed)
    if dataset == "fetal":
        return fetal_samples(root, split)
    if dataset == "imagefolder":
        return imagefolder_samples(root, split)
    if dataset == "busbra":
        return busbra_samples(root, split, fold), None
    if dataset == "tn3k":
        return tn3k_samples(root, split, fold), None
    if dataset == "folder":
        return folder_seg_samples(root, split), None
    raise ValueError(f"unknown dataset {dataset!r}: busi, fetal, imagefolder, busbra, tn3k or folder")


def subsample(samples: list[Sample], fraction: float, seed: int = 0) -> list[Sample]:
    """A seeded ``fraction`` of ``samples`` (label efficiency), at least one; per class when labels exist."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return list(samples)
    rng = random.Random(seed)
    groups: dict[int | None, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.label, []).append(i)
    keep = []
    for key in sorted(groups, key=lambda k: -1 if k is None else k):
        idx = groups[key]
        keep += rng.sample(idx, max(1, math.ceil(fraction * len(idx))))
    return [samples[i] for i in sorted(keep)]


# ---------------------------------------------------------------------------------------------------------------------
# transforms (upstream recipes, PIL)


def mask_to_labels(mask: Image.Image, rule: str = "eq255") -> torch.Tensor:
    """``(H, W)`` long labels from a mask image (first band): ``eq255`` = upstream (255 -> 1, else 0), ``gt0`` = any
    non-zero pixel -> 1."""
    arr = np.asarray(mask.convert("L") if mask.mode not in ("L", "1", "I", "I;16") else mask)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if rule == "eq255":
        out = arr == 255
    elif rule == "gt0":
        out = arr > 0
    else:
        raise ValueError(f"label_rule must be 'eq255' or 'gt0', got {rule!r}")
    return torch.from_numpy(out.astype(np.int64))


def _augmented_tensor(img: Image.Image, augment, seed: int) -> torch.Tensor:
    """``augment`` (``augment: usaugment``) on the RGB image in [0, 1] with a full-frame scan mask (these layouts have
    none), then ImageNet normalisation."""
    arr = augment(np.asarray(img, dtype=np.float32) / 255.0, np.ones((img.height, img.width), np.uint8), seed)
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def classification_transform(img: Image.Image, size: int, train: bool, rng: random.Random | None,
                             augment=None) -> torch.Tensor:
    """``eval_linear.py:31-56``: train ``Resize((s, s))`` -> ``RandomResizedCrop(s)`` (scale 0.08-1, bilinear) -> HFlip;
    eval Resize."""
    img = img.convert("RGB").resize((size, size), Image.BILINEAR)
    if train:
        img = img.resize((size, size), Image.BILINEAR, box=random_resized_crop_box(size, size, rng))
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
    if train and augment is not None:
        return _augmented_tensor(img, augment, rng.getrandbits(32))
    return to_normalized_tensor(img)


def segmentation_transform(img: Image.Image, mask: Image.Image, size: int, train: bool, rng: random.Random | None,
                           label_rule: str = "eq255", augment=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``dataset/transforms.py``: resize (image bilinear, mask nearest); train: p 0.5 rotate by 90·k (k in 1..3, expand)
    + centre crop, HFlip 0.5, VFlip 0.5."""
    img = img.convert("RGB").resize((size, size), Image.BILINEAR)
    mask = mask.convert("L").resize((size, size), Image.NEAREST)
    if train:
        if rng.random() < 0.5:
            k = rng.choice((1, 2, 3))
            img, mask = img.rotate(90 * k, expand=True), mask.rotate(90 * k, expand=True)
            left, top = (img.width - size) // 2, (img.height - size) // 2  # a no-op for square inputs
            img = img.crop((left, top, left + size, top + size))
            mask = mask.crop((left, top, left + size, top + size))
        if rng.random() < 0.5:
            img, mask = ImageOps.mirror(img), ImageOps.mirror(mask)
        if rng.random() < 0.5:
            img, mask = ImageOps.flip(img), ImageOps.flip(mask)
    if train and augment is not None:  # image-only transforms: the mask is unchanged
        return _augmented_tensor(img, augment, rng.getrandbits(32)), mask_to_labels(mask, label_rule)
    return to_normalized_tensor(img), mask_to_labels(mask, label_rule)


class DownstreamDataset(torch.utils.data.Dataset):
    """Samples -> ``{"pixel_values", "labels", "index"}``; augmentations seeded by (seed, epoch, index), so a
    resumed run sees the same data as an uninterrupted one."""

    def __init__(self, samples: list[Sample], task: str, image_size: int = 224, train: bool = False,
                 label_rule: str = "eq255", seed: int = 0, augment=None):
        if task not in ("segmentation", "classification"):
            raise ValueError(f"task must be segmentation or classification, got {task!r}")
        if not samples:
            raise ValueError("no samples")
        if task == "segmentation" and any(s.mask is None for s in samples):
            raise ValueError("segmentation needs a mask for every sample")
        if task == "classification" and any(s.label is None for s in samples):
            raise ValueError("classification needs a label for every sample")
        self.samples, self.task, self.image_size, self.train = samples, task, image_size, train
        self.label_rule, self.seed, self.epoch = label_rule, seed, 0
        self.augment = augment  # training only: training.data.us_augment.USAugment (augment: usaugment) or None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        rng = random.Random(int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])) \
            if self.train else None
        with Image.open(s.image) as im:
            img = im.convert("RGB")
        if self.task == "classification":
            return {"pixel_values": classification_transform(img, self.image_size, self.train, rng, self.augment),
                    "labels": torch.tensor(s.label), "index": index}
        with Image.open(s.mask) as m:
            mask = m.convert("L")
        x, y = segmentation_transform(img, mask, self.image_size, self.train, rng, self.label_rule, self.augment)
        return {"pixel_values": x, "labels": y, "index": index}
