"""Datasets and the TransKD co-transform (``MyCoTransform``, ``train_TransKDBase.py:43-74`` of RuipingL/TransKD at
commit 39ab795d), PIL + torch only (no torchvision).

* `CityscapesDataset` / `ACDCDataset`: upstream layouts (trainId PNGs), upstream co-transform.
* `SegmentationFolderDataset`: the generic ultrasound layout (as in `training/data/downstream.py`),
  `root/{split}/images/*` and `root/{split}/masks/*` paired by file stem (or `root/images` + `root/masks` without a split), mask rule
  `pixel == 255 -> 1` (`mask_rule: eq255`) or `pixel > 0 -> 1` (`gt0`), or raw class indices (`index`).
* `DicomExampleFrames`: real ultrasound frames bundled with pydicom (`pydicom.examples`), with a synthetic mask (the
  thresholded, smoothed fan region) for smoke tests and the debug recipe.

Every sample's augmentation is drawn from a generator seeded by (seed, epoch, index): a resumed run sees the same
augmentations as an uninterrupted one.
"""

from __future__ import annotations

import glob
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import Dataset


@dataclass
class CoTransformConfig:
    height: int = 512  # shorter side after resizing (upstream Resize(512)); or the fixed height with `width`
    width: int | None = None  # fixed size (height x width) instead of shorter-side resizing
    label_scale: float = 0.25  # labels at the logits' resolution (1/4), nearest from the full-resolution label
    hflip: bool = True
    max_shift: int = 2  # +-2 px translation (upstream)
    # upstream's translation bugs (train_TransKDBase.py:43-74): the same shift in image and label pixels, and negative
    # shifts fill the label with 0 (= a real class). False: the label shift is scaled to the label grid and every
    # uncovered label pixel is `ignore_index`.
    reproduce_shift_quirks: bool = True
    ignore_index: int = 255
    mean: tuple[float, ...] | None = None  # None: [0, 1] RGB, no normalisation (upstream)
    std: tuple[float, ...] | None = None


def _shift(img: Image.Image, tx: int, ty: int, fill: int) -> Image.Image:
    """ERFNet-style translation: expand by (tx, ty) on the left/top, crop back to the old size from the origin.
    A negative shift drops the first |t| columns/rows and the crop reads past the edge, which PIL fills with 0."""
    w, h = img.size
    return ImageOps.expand(img, border=(tx, ty, 0, 0), fill=fill).crop((0, 0, w, h))


def _shift_fixed(img: Image.Image, tx: int, ty: int, fill: int) -> Image.Image:
    w, h = img.size
    out = Image.new(img.mode, (w, h), fill)
    out.paste(img, (tx, ty))
    return out


class CoTransform:
    def __init__(self, cfg: CoTransformConfig, train: bool):
        self.cfg, self.train = cfg, train

    def __call__(self, image: Image.Image, label: Image.Image, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        w, h = image.size
        if cfg.width is not None:
            new_w, new_h = cfg.width, cfg.height
        elif w <= h:  # shorter side -> height, the other side int(height * long / short) (torchvision's rule)
            new_w, new_h = cfg.height, int(cfg.height * h / w)
        else:
            new_w, new_h = int(cfg.height * w / h), cfg.height
        image = image.resize((new_w, new_h), Image.BILINEAR)
        lw, lh = int(new_w * cfg.label_scale + 0.5), int(new_h * cfg.label_scale + 0.5)
        label = label.resize((lw, lh), Image.NEAREST)
        if self.train:
            if cfg.hflip and rng.random() < 0.5:
                image, label = ImageOps.mirror(image), ImageOps.mirror(label)
            if cfg.max_shift:
                tx, ty = rng.randint(-cfg.max_shift, cfg.max_shift), rng.randint(-cfg.max_shift, cfg.max_shift)
                if cfg.reproduce_shift_quirks:
                    image, label = _shift(image, tx, ty, 0), _shift(label, tx, ty, cfg.ignore_index)
                else:
                    image = _shift_fixed(image, tx, ty, 0)
                    label = _shift_fixed(label, round(tx * lw / new_w), round(ty * lh / new_h), cfg.ignore_index)
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        if cfg.mean is not None:
            mean, std = torch.tensor(cfg.mean)[:, None, None], torch.tensor(cfg.std)[:, None, None]
            pixels = (pixels - mean) / std
        labels = torch.from_numpy(np.asarray(label, dtype=np.int64).copy())
        return pixels.contiguous(), labels


class _PairDataset(Dataset):
    def __init__(self, transform: CoTransform, seed: int = 0):
        self.transform, self.seed, self.epoch = transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, index: int) -> tuple[Image.Image, Image.Image]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, label = self.load(index)
        rng = random.Random(hash((self.seed, self.epoch, index)))
        pixels, labels = self.transform(image, label, rng)
        return {"pixel_values": pixels, "labels": labels}


class _FileListDataset(_PairDataset):
    def __init__(self, images: list[str], labels: list[str], transform: CoTransform, seed: int = 0):
        super().__init__(transform, seed)
        if len(images) != len(labels) or not images:
            raise ValueError(f"found {len(images)} images and {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index):
        return Image.open(self.images[index]).convert("RGB"), Image.open(self.labels[index])


def CityscapesDataset(root: str, split: str, transform: CoTransform, seed: int = 0) -> _FileListDataset:
    """`leftImg8bit/{split}/*/*.png` and `gtFine/{split}/*/*_labelTrainIds.png`, both sorted, paired by index."""
    images = sorted(glob.glob(os.path.join(root, "leftImg8bit", split, "*", "*.png")))
    labels = sorted(glob.glob(os.path.join(root, "gtFine", split, "*", "*_labelTrainIds.png")))
    return _FileListDataset(images, labels, transform, seed)


def ACDCDataset(root: str, split: str, transform: CoTransform, seed: int = 0) -> _FileListDataset:
    """`rgb_anon/{fog,night,rain,snow}/{split}/**` and `gt/...` `*_labelTrainIds.png`, the four conditions merged."""
    images = sorted(glob.glob(os.path.join(root, "rgb_anon", "*", split, "**", "*.png"), recursive=True))
    labels = sorted(glob.glob(os.path.join(root, "gt", "*", split, "**", "*_labelTrainIds.png"), recursive=True))
    return _FileListDataset(images, labels, transform, seed)


_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class SegmentationFolderDataset(_PairDataset):
    def __init__(self, root: str, split: str | None, transform: CoTransform, mask_rule: str = "eq255", seed: int = 0):
        super().__init__(transform, seed)
        base = os.path.join(root, split) if split and os.path.isdir(os.path.join(root, split)) else root
        def listing(sub):
            files = [f for f in os.listdir(os.path.join(base, sub)) if f.lower().endswith(_IMAGE_EXTS)]
            return {os.path.splitext(f)[0]: os.path.join(base, sub, f) for f in files}
        images, masks = listing("images"), listing("masks")
        stems = sorted(set(images) & set(masks))
        if not stems:
            raise ValueError(f"no image/mask pairs under {base}/images and {base}/masks")
        self.images, self.masks = [images[s] for s in stems], [masks[s] for s in stems]
        if mask_rule not in ("eq255", "gt0", "index"):
            raise ValueError(f"mask_rule must be eq255, gt0 or index, got {mask_rule!r}")
        self.mask_rule = mask_rule

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index):
        mask = np.asarray(Image.open(self.masks[index]).convert("L"))
        if self.mask_rule == "eq255":
            mask = (mask == 255).astype(np.uint8)
        elif self.mask_rule == "gt0":
            mask = (mask > 0).astype(np.uint8)
        return Image.open(self.images[index]).convert("RGB"), Image.fromarray(mask)


def fan_mask(frame: np.ndarray, threshold: float = 20.0) -> np.ndarray:
    """Synthetic 2-class mask of an ultrasound frame: 1 inside the (smoothed) bright fan, 0 outside."""
    gray = Image.fromarray(frame.mean(axis=-1).astype(np.uint8)).filter(ImageFilter.BoxBlur(4))
    return (np.asarray(gray) > threshold).astype(np.uint8)


class DicomExampleFrames(_PairDataset):
    """Frames of a pydicom example file (default: `ybr_color`, a SonoSite echo cine, 30 frames 240x320) with
    `fan_mask` labels. `frames` selects a slice of the cine (e.g. train 0..23, val 24..29)."""

    def __init__(self, transform: CoTransform, name: str = "ybr_color", frames: tuple[int, int] | None = None,
                 seed: int = 0):
        super().__init__(transform, seed)
        from pydicom import examples

        arr = getattr(examples, name).pixel_array  # [T, H, W, 3] uint8, RGB
        arr = arr if arr.ndim == 4 else arr[None]
        if frames is not None:
            arr = arr[frames[0] : frames[1]]
        self.frames = np.ascontiguousarray(arr)

    def __len__(self) -> int:
        return len(self.frames)

    def load(self, index):
        frame = self.frames[index]
        return Image.fromarray(frame), Image.fromarray(fan_mask(frame))
