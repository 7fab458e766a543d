"""Pretraining data: a manifest file listing images and DICOM frames (local paths, no downloads).

Manifest format (UTF-8 text): one sample per line, ``PATH`` for an image file or ``PATH<TAB>FRAME`` for one frame
of a DICOM file; relative paths are relative to the manifest's folder; ``#`` starts a comment line. Write one with
``python -m training.data.datasets FOLDER... --output manifest.txt`` (DICOM cine loops are listed frame by frame).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .augmentations import MultiCropAugmentation
from .masking import block_mask


def build_manifest(inputs: list[str | Path], output: str | Path, frame_stride: int = 1) -> int:
    """List every image and DICOM frame under ``inputs`` into ``output``; returns the number of samples."""
    import pydicom

    from openus_hub.io import find_inputs, is_dicom_file

    output = Path(output).resolve()
    lines = []
    for path in find_inputs(inputs):
        path = Path(path).resolve()
        try:
            rel = path.relative_to(output.parent)
        except ValueError:
            rel = path
        if is_dicom_file(path):  # DICOM marker or extension
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            n = int(ds.get("NumberOfFrames", 1) or 1)
            lines += [f"{rel}\t{i}" for i in range(0, n, frame_stride)]
        else:
            lines.append(str(rel))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("# openus_hub pretraining manifest\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def read_manifest(path: str | Path) -> list[tuple[Path, int | None]]:
    path = Path(path)
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, frame = line.partition("\t")
        file = Path(name)
        entries.append((file if file.is_absolute() else path.parent / file, int(frame) if frame else None))
    if not entries:
        raise ValueError(f"manifest {path} lists no samples")
    return entries


def manifest_summary(path: str | Path) -> dict:
    """What a model card says about the data: sample count, files, DICOM frames, sha256 of the manifest."""
    path = Path(path)
    entries = read_manifest(path)
    return {
        "manifest": path.name,  # the name only: this summary goes into model cards
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "samples": len(entries),
        "files": len({str(p) for p, _ in entries}),
        "dicom_frames": sum(1 for _, f in entries if f is not None),
    }


def _to_rgb(array: np.ndarray, bit_depth: int) -> Image.Image:
    if array.dtype != np.uint8:  # 16-bit: scale by the stored range, not by 1/255
        array = (array.astype(np.float32) * (255.0 / (2**bit_depth - 1))).clip(0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array).convert("RGB")  # grayscale replicated to 3 channels, as upstream


def load_sample(path: Path, frame: int | None) -> Image.Image:
    from openus_hub.io import load_image_file, read_dicom

    if frame is not None:
        dicom = read_dicom(path, frames=[frame], warn_burned_in=False)
        return _to_rgb(dicom.frames[0], dicom.bit_depth)
    img = load_image_file(path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return _to_rgb(np.asarray(img).astype(np.uint16), 16)
    return img.convert("RGB")


class PretrainDataset(torch.utils.data.Dataset):
    """Manifest samples -> ``(crops, masks)``: the multi-crop views and one block mask per view on the 32-px grid.

    The random stream of sample ``i`` in epoch ``e`` is seeded from ``(seed, e, i)`` (call ``set_epoch``), so the
    augmentations do not depend on workers, ranks or interruptions.
    """

    def __init__(self, manifest: str | Path, transform: MultiCropAugmentation, seed: int = 0, pred_ratio: float = 0.3,
                 patch_size: int = 32):
        self.entries = read_manifest(manifest)
        self.transform = transform
        self.seed, self.pred_ratio, self.patch_size = seed, pred_ratio, patch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        rng = random.Random(seed)
        crops = self.transform(load_sample(*self.entries[index]), rng)
        masks = [torch.from_numpy(block_mask(c.shape[1] // self.patch_size, c.shape[2] // self.patch_size,
                                             self.pred_ratio, rng)) for c in crops]
        return crops, masks


class ResumableDistributedSampler(torch.utils.data.Sampler):
    """``DistributedSampler(shuffle=True)`` semantics (permutation seeded by seed + epoch, padded to a multiple of the
    world size, strided by rank) that can start ``start_batch`` batches into an epoch when a run resumes."""

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int, batch_size: int):
        self.n, self.rank, self.world = num_samples, rank, world_size
        self.seed, self.batch_size = seed, batch_size
        self.epoch, self.start_batch = 0, 0
        self.per_rank = -(-num_samples // world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return self.per_rank // self.batch_size

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order += order[: self.per_rank * self.world - self.n]
        mine = order[self.rank :: self.world]
        return mine[: self.batches_per_epoch() * self.batch_size]

    def __iter__(self):
        return iter(self._indices()[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.batch_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a pretraining manifest of images and DICOM frames.")
    p.add_argument("inputs", nargs="+", help="folders or files (images, DICOM)")
    p.add_argument("--output", required=True)
    p.add_argument("--frame-stride", type=int, default=1, help="keep every n-th frame of a DICOM cine loop")
    args = p.parse_args(argv)
    n = build_manifest(args.inputs, args.output, args.frame_stride)
    sys.stderr.write(f"{n} samples -> {args.output}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
