"""Ultrasound-specific augmentation (``augment: usaugment``): the four transforms of PyPI ``usaugment`` 1.0.1 (MIT;
Tupper & Gagné, "Revisiting Data Augmentation for Ultrasound Images", TMLR 2025, arXiv 2501.13193), as albumentations
transforms, composed in the order of usaugment's README, each applied with probability 0.5:

=====================  =====================================================================  ========================
transform              what it does inside the scan region (pixels outside it are unchanged)   parameters
=====================  =====================================================================  ========================
``DepthAttenuation``   multiplies by ``exp(-rate * d)``, ``d`` = distance from the top centre  rate ~ U(0, 3)
                       (the probe), so the image darkens with depth (Ostvik et al. 2021)
``GaussianShadow``     multiplies by ``1 - s * gaussian`` around a random point: a shadow      s ~ U(0.25, 0.8),
                       (Smistad et al. 2018)                                                   sigma ~ U(0.01, 0.2) x size
``HazeArtifact``       adds ``0.5 x`` uniform noise on a band at a random radius from the      radius ~ U(0.05, 0.95),
                       top centre, then clips to [0, 1] (Ostvik et al. 2021)                   sigma ~ U(0, 0.1)
``SpeckleReduction``   scikit-image's bilateral filter (5x5 window): smooths speckle           sigma_spatial, sigma_color
                       (Smistad et al. 2018)                                                    ~ U(0.05, 1.0)
=====================  =====================================================================  ========================

The probability 0.5 and the parameter ranges are those of the paper's experiments
(``src/usaugment/config/augmentation/{depth_attenuation,gaussian_shadow,haze_artifact,bilateral_filter}.yaml`` in
adamtupper/usaugment-experiments; the package's defaults are the same except SpeckleReduction's, (0.1, 2.0) and
(0.0, 1.0)). The transforms work on float images in [0, 1] with a ``scan_mask`` (the paper scales pixels to [0, 1]
before augmenting); they touch only the image, so segmentation masks stay aligned by construction.

usaugment draws from numpy's and Python's global generators: :class:`USAugment` seeds both for each call and
restores them afterwards, so a call is reproducible from its seed and leaves no trace on other code. Each transform
gets its own seed for its apply-or-not draw (so the four draws are independent).

Needs the ``augment`` extra: ``pip install "openus_hub[augment]"`` (usaugment, albumentations, scikit-image).
"""

from __future__ import annotations

import random

import numpy as np

__all__ = ["AUGMENTATIONS", "PAPER_P", "USAugment", "build_augment", "require_usaugment"]

AUGMENTATIONS = ("none", "usaugment")
PAPER_P = 0.5  # the paper's probability for each transform


def require_usaugment(setting: str = "augment: none") -> None:
    """Raise ImportError with the fix when usaugment (or albumentations / scikit-image) is missing."""
    try:
        import albumentations  # noqa: F401
        import usaugment.albumentations  # noqa: F401
    except ImportError as err:
        raise ImportError(f"augment: usaugment needs the augment extra ({err.name} is missing): "
                          f'pip install "openus_hub[augment]", or set {setting}') from None


class USAugment:
    """``usaugment``'s four transforms at the paper's probability; ``__call__(image, scan_mask, seed) -> image``
    with ``image`` float32 ``(H, W, 3)`` in [0, 1] and ``scan_mask`` uint8 ``(H, W)`` 0/1."""

    def __init__(self, p: float = PAPER_P):
        require_usaugment()
        import albumentations as A
        from usaugment.albumentations import DepthAttenuation, GaussianShadow, HazeArtifact, SpeckleReduction

        self.p = p
        self.transforms = [
            DepthAttenuation(attenuation_rate=(0.0, 3.0), max_attenuation=0.0, p=p),
            GaussianShadow(strength=(0.25, 0.8), sigma_x=(0.01, 0.2), sigma_y=(0.01, 0.2), p=p),
            HazeArtifact(radius=(0.05, 0.95), sigma=(0.0, 0.1), p=p),
            SpeckleReduction(sigma_spatial=(0.05, 1.0), sigma_color=(0.05, 1.0), window_size=5, p=p),
        ]
        self.compose = A.Compose(self.transforms, additional_targets={"scan_mask": "mask"}, save_applied_params=True)

    def __call__(self, image: np.ndarray, scan_mask: np.ndarray, seed: int, mask: np.ndarray | None = None):
        """The augmented image (and, when ``mask`` is given, ``(image, mask)`` with the mask as albumentations
        returns it: unchanged, since every transform is image-only)."""
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            np.random.seed(seed % 2**32)
            random.seed(seed)
            # one seed per transform: albumentations' Compose.set_random_seed gives every child the same seed, which
            # would make the four apply-or-not draws identical (all four or none)
            for i, t in enumerate(self.transforms):
                t.set_random_seed(int(np.random.SeedSequence([seed % 2**32, i]).generate_state(1)[0]))
            kwargs = {"image": np.ascontiguousarray(image, dtype=np.float32),
                      "scan_mask": np.ascontiguousarray(scan_mask, dtype=np.uint8)}
            if mask is not None:
                kwargs["mask"] = np.ascontiguousarray(mask)
            out = self.compose(**kwargs)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        self.last_applied = [name for name, _ in out.get("applied_transforms", [])]
        image = np.asarray(out["image"], dtype=np.float32)
        return (image, out["mask"]) if mask is not None else image


def build_augment(name: str | None) -> USAugment | None:
    """``augment`` setting -> the callable (None for ``none``)."""
    if name in (None, "none"):
        return None
    if name == "usaugment":
        return USAugment()
    raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {name!r}")
