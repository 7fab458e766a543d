"""Multi-crop augmentation of OpenUS/iBOT (``DataAugmentationiBOT``, upstream ``main_openus.py:738-788``), in PIL +
numpy, no torchvision.

Every random draw comes from the ``random.Random`` passed in, so one sample's crops are a pure function of its seed
(the dataset seeds it from (seed, epoch, index)): a resumed run sees the same crops as an uninterrupted one.

Differences from torchvision's sampling (the distributions are the same; the random streams are not):

* draws come from a ``random.Random`` instead of torch's global generator, so the crops of a given seed differ from
  torchvision's;
* ``ColorJitter`` applies its four adjustments in a random order drawn with ``Random.shuffle`` (torchvision:
  ``torch.randperm``); the PIL adjustments themselves are torchvision's PIL-backend ones (ImageEnhance brightness,
  contrast, colour; hue as a uint8 shift of the HSV hue channel);
* ``RandomResizedCrop`` crops then resizes with PIL bicubic in one call (``resize(box=...)``), as torchvision's PIL
  backend does (antialiased); the fallback after 10 failed tries is torchvision's centre crop;
* ``ToTensor``/``Normalize`` are done in numpy/torch with the same ImageNet mean and std.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

IMAGENET_MEAN, IMAGENET_STD = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)  # upstream's normalisation


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop's box sampling (10 tries, then a centre crop): (left, top, right, bottom)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height  # centre crop at the nearest allowed ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float], rng: random.Random,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    box = random_resized_crop_box(*img.size, rng, scale, ratio)
    return img.resize((size, size), Image.BICUBIC, box=box)


def _adjust_hue(img: Image.Image, factor: float) -> Image.Image:
    h, s, v = img.convert("HSV").split()
    h_np = np.array(h, dtype=np.uint8)
    with np.errstate(over="ignore"):
        h_np += np.uint8(int(factor * 255) % 256)  # wraps around, as torchvision's PIL backend
    return Image.merge("HSV", (Image.fromarray(h_np, "L"), s, v)).convert("RGB")


def color_jitter(img: Image.Image, rng: random.Random, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1) -> Image.Image:
    ops = [
        lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(max(0.0, 1 - brightness), 1 + brightness)),
        lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(max(0.0, 1 - contrast), 1 + contrast)),
        lambda im: ImageEnhance.Color(im).enhance(rng.uniform(max(0.0, 1 - saturation), 1 + saturation)),
        lambda im: _adjust_hue(im, rng.uniform(-hue, hue)),
    ]
    rng.shuffle(ops)
    for op in ops:
        img = op(img)
    return img


def flip_and_color_jitter(img: Image.Image, rng: random.Random) -> Image.Image:
    """HFlip(0.5) -> RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8) -> RandomGrayscale(0.2)."""
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    if rng.random() < 0.8:
        img = color_jitter(img, rng)
    if rng.random() < 0.2:
        img = img.convert("L").convert("RGB")
    return img


def gaussian_blur(img: Image.Image, rng: random.Random, p: float, radius: tuple[float, float] = (0.1, 2.0)) -> Image.Image:
    if rng.random() >= p:
        return img
    return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*radius)))


def solarize(img: Image.Image, rng: random.Random, p: float) -> Image.Image:
    return ImageOps.solarize(img) if rng.random() < p else img  # threshold 128


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """ToTensor + Normalize(ImageNet): (3, H, W) float32."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


class MultiCropAugmentation:
    """2 global crops + ``local_crops_number`` local crops of one RGB PIL image (``main_openus.py:738-788``)."""

    def __init__(self, global_size: int = 224, local_size: int = 96, local_crops_number: int = 8,
                 global_scale: tuple[float, float] = (0.14, 1.0), local_scale: tuple[float, float] = (0.05, 0.4)):
        self.global_size, self.local_size = global_size, local_size
        self.local_crops_number = local_crops_number
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)

    def __call__(self, img: Image.Image, rng: random.Random) -> list[torch.Tensor]:
        crops = []
        x = flip_and_color_jitter(random_resized_crop(img, self.global_size, self.global_scale, rng), rng)
        crops.append(to_normalized_tensor(gaussian_blur(x, rng, 1.0)))
        x = flip_and_color_jitter(random_resized_crop(img, self.global_size, self.global_scale, rng), rng)
        crops.append(to_normalized_tensor(solarize(gaussian_blur(x, rng, 0.1), rng, 0.2)))
        for _ in range(self.local_crops_number):
            x = flip_and_color_jitter(random_resized_crop(img, self.local_size, self.local_scale, rng), rng)
            crops.append(to_normalized_tensor(gaussian_blur(x, rng, 0.5)))
        return crops
