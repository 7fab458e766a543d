"""Write the ``debug`` mini-suite: a small tree in UltraBench's processed format, made from real ultrasound frames.

    python tests/ultrabench_debug_tree.py OUTPUT_DIR   # -> OUTPUT_DIR/debug_lesion_v1.0.1/, debug_tissue_v1.0.1/

The frames are the 30-frame apical echo cine that pydicom ships (``ybr_color``, a phased-array sector scan) and, for
the classification task, pydicom's convex-probe obstetric frame (``palette_color``) and linear-probe lymph node frame
(``rgb_color``). Each frame is turned into one grey 8-bit PNG (the mean of the RGB channels, as UltraBench's
processing scripts do, e.g. ``ultrabench/datasets/aul.py:copy_images``) with a 0/1 ``scan_mask`` PNG of the region
the probe imaged (UltraBench writes its scan masks as uint8 0/1, e.g. ``ultrabench/datasets/camus.py:segment_fan``).

Two dataset folders (UltraBench names them ``<dataset>_v<version>``; one task each, as ``aul_liver_v*`` and
``aul_mass_v*`` are two folders made from one source):

* ``debug_lesion_v1.0.1``, task ``debug_lesion_classification`` (``label`` / ``pathology``): a disc planted inside
  the scan region of every image, at a random place and size: ``0 = hyperechoic`` (a bright, speckled disc) or
  ``1 = anechoic`` (a cyst: a dark disc in a bright wall), or no disc at all, ``2 = none``. Learnable from the
  pixels wherever the disc lands, so pooled features can carry it.
* ``debug_tissue_v1.0.1``, task ``debug_tissue_segmentation`` (``tissue_mask``), the echo frames only: the bright
  tissue of the echo frame (myocardium, septum, valves): the frame blurred (Gaussian, radius 2 px) and
  thresholded at the 80th percentile of its scan region, opened with a 3x3 minimum/maximum filter, inside the scan region only. About a fifth of the fan, so neither an empty mask nor
  the whole fan scores well.

Splits: ``train.json``, ``validation.json``, ``test.json`` (JSON arrays of records with paths relative to the dataset
folder, as UltraBench's), grouped by source frame as UltraBench groups by patient (frames 0-17 train, 18-22
validation, 23-29 test; each frame also appears mirrored left-right in the same split; the classification task
plants two discs, a and b, on each: 88 / 20 / 36 images, classes balanced within each split; segmentation 36 / 10 /
14), and ``version.txt``.
Everything is seeded: the same call writes the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

VERSION = "1.0.1"
CLS_FOLDER = f"debug_lesion_v{VERSION}"
SEG_FOLDER = f"debug_tissue_v{VERSION}"
CLASSES = ("hyperechoic", "anechoic", "none")
IMAGE_SIZE = (96, 128)  # (height, width) of the written PNGs: not square, so the benchmark's letterboxing is used
SPLIT_FRAMES = {"train": range(0, 18), "validation": range(18, 23), "test": range(23, 30)}


def _read(name: str) -> np.ndarray:
    import pydicom.examples

    from openus_hub.io import read_dicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # burned-in annotation warnings of the example files
        return read_dicom(pydicom.examples.get_path(name)).frames  # (T, H, W, 3) uint8


def _grey(frame: np.ndarray) -> np.ndarray:
    return frame.astype(np.float64).mean(-1)


def _resize(arr: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    img = Image.fromarray(arr.astype(np.uint8))
    return np.asarray(img.resize((size[1], size[0]), Image.NEAREST if nearest else Image.BILINEAR))


def echo_frames() -> tuple[np.ndarray, np.ndarray]:
    """The 30 echo frames (grey, ``IMAGE_SIZE``) and their sector scan mask (0/1).

    The sector's apex is the top centre of the crop; its half-angle is the 95th percentile of the angles (from the
    apex, against the vertical) of the pixels that are bright (> 12) in any frame, its radius the crop's height."""
    frames = _grey(_read("ybr_color"))  # (30, 240, 320)
    top, bottom, left, right = 22, 207, 46, 296  # the imaged area (openus_hub.io's heuristic crop box)
    frames = frames[:, top:bottom, left:right]
    h, w = frames.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w]
    angle = np.degrees(np.arctan2(np.abs(xx - (w - 1) / 2), yy + 1e-6))
    radius = np.hypot(xx - (w - 1) / 2, yy)
    bright = frames.max(0) > 12
    half_angle = np.percentile(angle[bright & (yy > 10)], 95)
    fan = (angle <= half_angle) & (radius <= h)
    out = np.stack([_resize(f, IMAGE_SIZE) for f in frames])
    return out, _resize(fan.astype(np.uint8), IMAGE_SIZE, nearest=True)


def other_frames() -> list[tuple[np.ndarray, np.ndarray]]:
    """pydicom's convex obstetric frame and linear lymph node frame (grey, ``IMAGE_SIZE``) with their scan masks.

    Convex frame (``palette_color``, 350x800): the annulus sector under the probe's curved face, apex at (452, -250)
    in its pixel coordinates, radii 315-600 px, +-24 degrees. Linear frame (``rgb_color``, 240x320): the B-mode
    rectangle, rows 20-205, columns 30-290. Both read off the images; the crops keep the region's aspect."""
    out = []
    obst = _grey(_read("palette_color")[0])
    h, w = obst.shape
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(xx - 452, yy + 250)
    ang = np.degrees(np.arctan2(xx - 452, yy + 250))
    scan = (r >= 315) & (r <= 600) & (np.abs(ang) <= 24)
    crop = (slice(60, 350), slice(240, 665))
    out.append((_resize(obst[crop], IMAGE_SIZE), _resize(scan[crop].astype(np.uint8), IMAGE_SIZE, nearest=True)))
    lymph = _grey(_read("rgb_color")[0])
    scan = np.zeros(lymph.shape, np.uint8)
    scan[20:205, 30:290] = 1
    crop = (slice(10, 215), slice(20, 300))
    out.append((_resize(lymph[crop], IMAGE_SIZE), _resize(scan[crop], IMAGE_SIZE, nearest=True)))
    return out


def plant_disc(image: np.ndarray, scan: np.ndarray, kind: int, rng: np.random.Generator) -> np.ndarray:
    """The image with a disc of class ``kind`` (see ``CLASSES``) planted wholly inside ``scan``; unchanged for none."""
    if CLASSES[kind] == "none":
        return image.copy()
    h, w = image.shape
    yy, xx = np.mgrid[0:h, 0:w]
    inside = np.asarray(Image.fromarray(scan * 255).filter(ImageFilter.MinFilter(3))) > 0
    for _ in range(200):
        radius = rng.uniform(0.09, 0.15) * h
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        disc = np.hypot(yy - cy, xx - cx) <= radius
        if disc.sum() and inside[disc].all():
            break
    else:  # pragma: no cover - every scan region used here has room for a disc
        raise RuntimeError("no room for a disc inside the scan region")
    edge = np.clip(radius - np.hypot(yy - cy, xx - cx), 0, 1.5) / 1.5  # 1.5 px soft edge
    speckle = rng.rayleigh(1.0, size=image.shape) / math.sqrt(math.pi / 2)  # mean 1, as fully developed speckle
    if CLASSES[kind] == "hyperechoic":
        level = 215.0 * speckle
    else:  # a cyst: anechoic inside a bright (echogenic) wall 2.5 px thick
        wall = np.hypot(yy - cy, xx - cx) >= radius - 2.5
        level = np.where(wall, 215.0, 6.0) * speckle
    return np.clip(image * (1 - edge) + level * edge, 0, 255)


def tissue_mask(image: np.ndarray, scan: np.ndarray) -> np.ndarray:
    """Bright tissue inside the scan region (0/1): blur, 80th-percentile threshold within the region, 3x3 opening."""
    blurred = np.asarray(Image.fromarray(image.astype(np.uint8)).filter(ImageFilter.GaussianBlur(2)), np.float64)
    inside = scan > 0
    mask = (blurred > np.percentile(blurred[inside], 80)) & inside
    img = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(3))
    return ((np.asarray(img) > 0) & inside).astype(np.uint8)


def _save(folder: Path, relative: str, arr: np.ndarray) -> str:
    """Write an 8-bit PNG at ``folder/relative``; returns ``relative`` (records hold paths relative to the folder)."""
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).save(path)
    return relative


def _write_split_files(folder: Path, records: dict[str, list[dict]], seed: int) -> None:
    for split, recs in records.items():
        (folder / f"{split}.json").write_text(json.dumps(recs, indent=4), encoding="utf-8")
    (folder / "version.txt").write_text(f"UltraBench Version: {VERSION}\nCreated: openus_hub debug mini-suite "
                                        f"(tests/ultrabench_debug_tree.py, seed {seed})\n", encoding="utf-8")


def write_debug_tree(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write ``root/debug_lesion_v1.0.1`` and ``root/debug_tissue_v1.0.1`` (see the module docstring); returns the
    task name -> dataset folder."""
    root = Path(root)
    cls_dir, seg_dir = root / CLS_FOLDER, root / SEG_FOLDER
    for folder in (cls_dir, seg_dir):
        if folder.exists():
            raise FileExistsError(f"{folder} exists; write the debug tree into an empty folder")
    rng = np.random.default_rng(seed)
    frames, fan = echo_frames()
    others = other_frames()
    cls_records: dict[str, list[dict]] = {split: [] for split in SPLIT_FRAMES}
    seg_records: dict[str, list[dict]] = {split: [] for split in SPLIT_FRAMES}
    for split, frame_ids in SPLIT_FRAMES.items():
        sources = [(f"echo{i:02d}", frames[i], fan) for i in frame_ids]
        # the two other probes' frames, planted afresh each time: two copies each in train, one in test
        if split == "train":
            sources += [(f"convex{k}", *others[0]) for k in range(2)] + [(f"linear{k}", *others[1]) for k in range(2)]
        elif split == "test":
            sources += [("convex9", *others[0]), ("linear9", *others[1])]
        # balanced classes within each split: the labels in turn, in a seeded order
        kinds = iter(rng.permutation([i % len(CLASSES) for i in range(4 * len(sources))]).tolist())
        for name, image, scan in sources:
            for flip, variant in ((False, "a"), (False, "b"), (True, "a"), (True, "b")):
                img = np.ascontiguousarray(image[:, ::-1]) if flip else image
                sm = np.ascontiguousarray(scan[:, ::-1]) if flip else scan
                stem = f"{name}{'_flip' if flip else ''}"
                cls_stem = f"{stem}_{variant}"
                kind = next(kinds)
                cls_records[split].append({
                    "source": name,
                    "image": _save(cls_dir, f"images/{cls_stem}.png", plant_disc(img, sm, kind, rng)),
                    "scan_mask": _save(cls_dir, f"masks/scan/{cls_stem}.png", sm),
                    "pathology": CLASSES[kind],
                    "label": kind,
                })
                if name.startswith("echo") and variant == "a":  # segmentation: the echo frames as they are
                    seg_records[split].append({
                        "source": name,
                        "image": _save(seg_dir, f"images/{stem}.png", img),
                        "scan_mask": _save(seg_dir, f"masks/scan/{stem}.png", sm),
                        "tissue_mask": _save(seg_dir, f"masks/tissue/{stem}.png", tissue_mask(img, sm)),
                    })
    _write_split_files(cls_dir, cls_records, seed)
    _write_split_files(seg_dir, seg_records, seed)
    return {"debug_lesion_classification": cls_dir, "debug_tissue_segmentation": seg_dir}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir", help="where debug_lesion_v1.0.1/ and debug_tissue_v1.0.1/ are written (the "
                   "benchmark's --data-root)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    folders = write_debug_tree(args.output_dir, args.seed)
    print(f"wrote {', '.join(str(f) for f in folders.values())}\nnext: python -m training.benchmark --model MODEL "
          f"--data-root {args.output_dir} --tasks debug --output-dir OUT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
