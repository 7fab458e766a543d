"""UltraBench-processed datasets (PyPI ``ultrabench`` 1.0.1, MIT; Tupper & Gagné, "Revisiting Data Augmentation for
Ultrasound Images", TMLR 2025, arXiv 2501.13193): the 14 tasks, the reader of a processed folder, and the dataset
that the benchmark (``training.benchmark``) trains and evaluates on.

What ``ultrabench <dataset> RAW_DATA_DIR OUTPUT_DIR`` writes (``ultrabench/datasets/<dataset>.py``): a folder
``OUTPUT_DIR/<dataset>_v<version>`` holding

* ``images/`` (8-bit PNGs, single-channel for every dataset except POCUS, whose frames are saved with 3 channels;
  AUL keeps its ``.jpg`` names), ``masks/scan/`` (the scan region, uint8 0/1) and ``masks/<kind>/`` (labels);
* ``train.json``, ``validation.json``, ``test.json``: JSON arrays of records whose paths are relative to the folder;
* ``version.txt``: ``UltraBench Version: <version>`` and the creation date (``ultrabench/datasets/utils.py``).

The tasks are those of the paper, as its experiments define them (``src/usaugment/config/task/*.yaml`` in
adamtupper/usaugment-experiments: the dataset version, the record key of the target and the number of classes).
The class names come from each processing script (cited per task below). Binary masks count every non-zero value as
foreground (UltraBench writes 0/1; the MMOTU and Open Kidney masks are copied from the source datasets as they are).
Multi-class masks hold the class index per pixel (CAMUS: ``_gt`` NIfTI labels; PSFHS: the ``label_mha`` labels).

Preprocessing follows the paper's pipeline (``src/usaugment/augmentation/transforms.py`` in usaugment-experiments:
``LongestMaxSize`` bilinear, then ``PadIfNeeded`` centred with zeros, pixel values scaled to [0, 1]); masks are
resized with nearest neighbours. The model's own mean/std normalisation follows. With ``apply_scan_mask`` the pixels
outside the scan region are set to 0 in the input and to ``IGNORE_INDEX`` in the segmentation labels, so that they
count neither in the loss nor in the metrics (UltraBench's experiments use the scan mask only for augmentation).

Every problem with a folder is a :class:`UltraBenchError` whose one-line message names the file, the record and
the field.
"""

from __future__ import annotations

import difflib
import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["DEBUG_TASKS", "IGNORE_INDEX", "TASKS", "SPLITS", "TaskData", "TaskSpec", "UltraBenchDataset",
           "UltraBenchError", "find_tasks", "get_task", "letterbox", "load_task", "subsample_records"]

IGNORE_INDEX = 255
SPLITS = ("train", "validation", "test")  # UltraBench's split files, <split>.json


class UltraBenchError(ValueError):
    """A processed folder that cannot be used; the message is one line naming the file, record and field."""


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the task, e.g. "aul_mass_classification"
    dataset: str  # the folder prefix ultrabench writes: <dataset>_v<version>
    kind: str  # "classification" | "segmentation"
    target_key: str  # the record field holding the label (classification) or the mask path (segmentation)
    classes: tuple[str, ...]  # class names, index = label / mask value (segmentation: index 0 = background)
    title: str  # the task as UltraBench's README names it
    source: str  # where the record format and class names are defined
    debug: bool = False  # openus_hub's CI mini-suite, not an UltraBench task

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def binary_mask(self) -> bool:
        return self.kind == "segmentation" and self.num_classes == 2


def _t(name, dataset, kind, key, classes, title, source, debug=False) -> TaskSpec:
    return TaskSpec(name, dataset, kind, key, tuple(classes), title, source, debug)


_MMOTU = ("chocolate cyst", "serous cystadenoma", "teratoma", "theca cell tumor", "simple cyst", "normal ovary",
          "mucinous cystadenoma", "high grade serous cystadenoma")
TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    _t("aul_liver_segmentation", "aul_liver", "segmentation", "liver_mask", ("background", "liver"),
       "Liver segmentation (Annotated Ultrasound Liver)", "ultrabench/datasets/aul.py (liver_mask, 0/1)"),
    _t("aul_mass_classification", "aul_mass", "classification", "label", ("normal", "benign", "malignant"),
       "Liver mass classification (Annotated Ultrasound Liver)", "ultrabench/datasets/aul.py CLASS_TO_LABEL"),
    _t("aul_mass_segmentation", "aul_mass", "segmentation", "mass_mask", ("background", "mass"),
       "Liver mass segmentation (Annotated Ultrasound Liver)",
       "ultrabench/datasets/aul.py (mass_mask, 0/1; empty for normal livers)"),
    _t("butterfly_classification", "butterfly", "classification", "label",
       ("carotid", "2ch", "lungs", "ivc", "4ch", "bladder", "thyroid", "plax", "morisons_pouch"),
       "Region classification (Butterfly)", "ultrabench/datasets/butterfly.py CLASS_TO_LABEL"),
    _t("camus_classification", "camus", "classification", "label", ("poor", "medium", "good"),
       "Image quality classification (CAMUS)", "ultrabench/datasets/camus.py CLASS_TO_LABEL"),
    _t("camus_segmentation", "camus", "segmentation", "mask",
       ("background", "left ventricle", "myocardium", "left atrium"), "Cardiac region segmentation (CAMUS)",
       "ultrabench/datasets/camus.py (mask = the CAMUS _gt labels 0-3)"),
    _t("fatty_liver_classification", "fatty_liver", "classification", "label", ("normal", "nfld"),
       "NFLD classification (B-mode fatty liver)", "ultrabench/datasets/fatty_liver.py LABEL_TO_CLASS"),
    _t("gbcu_classification", "gbcu", "classification", "label", ("normal", "benign", "malignant"),
       "Gallbladder tumor classification (GBCU)", "ultrabench/datasets/gbcu.py collate_info"),
    _t("mmotu_classification", "mmotu", "classification", "label", _MMOTU,
       "Ovarian tumor classification (MMOTU)",
       "ultrabench/datasets/mmotu.py (integer labels of OTU_2d; names in the order of its PIXEL_TO_CLASS 1-8)"),
    _t("mmotu_segmentation", "mmotu", "segmentation", "tumor_mask_binary", ("background", "tumor"),
       "Ovarian tumor segmentation (MMOTU)", "ultrabench/datasets/mmotu.py (tumor_mask_binary, copied)"),
    _t("open_kidney_capsule_segmentation", "open_kidney", "segmentation", "capsule_mask", ("background", "capsule"),
       "Kidney capsule segmentation (Open Kidney)", "ultrabench/datasets/open_kidney.py (capsule_mask, copied)"),
    _t("pocus_classification", "pocus", "classification", "label", ("regular", "pneumonia", "covid"),
       "COVID-19 classification (POCUS)", "ultrabench/datasets/pocus.py LABEL_TO_CLASS"),
    _t("psfhs_segmentation", "psfhs", "segmentation", "psfh_mask", ("background", "pubic symphysis", "fetal head"),
       "Fetal head and pubic symphysis segmentation (PSFHS)",
       "ultrabench/datasets/psfhs.py (psfh_mask = the PSFHS label_mha labels 0-2)"),
    _t("stanford_thyroid_segmentation", "stanford_thyroid", "segmentation", "tumor_mask", ("background", "nodule"),
       "Thyroid nodule segmentation (Stanford Thyroid)", "ultrabench/datasets/stanford_thyroid.py (tumor_mask, 0/1)"),
)}
# openus_hub's CI mini-suite in the same format (tests/ultrabench_debug_tree.py), selected with --tasks debug
DEBUG_TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    _t("debug_lesion_classification", "debug_lesion", "classification", "label",
       ("hyperechoic", "anechoic", "none"), "Planted lesion classification (debug)",
       "tests/ultrabench_debug_tree.py", debug=True),
    _t("debug_tissue_segmentation", "debug_tissue", "segmentation", "tissue_mask", ("background", "tissue"),
       "Bright tissue segmentation (debug)", "tests/ultrabench_debug_tree.py", debug=True),
)}


def get_task(name: str) -> TaskSpec:
    """The task called ``name``; an unknown name is a one-line error with the closest known name."""
    known = {**TASKS, **DEBUG_TASKS}
    if name in known:
        return known[name]
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"known tasks: {', '.join(TASKS)} (and the debug tasks)"
    raise UltraBenchError(f"unknown task {name!r}; {hint}")


_VERSION_DIR = re.compile(r"^(?P<dataset>.+)_v(?P<version>[0-9][0-9A-Za-z.\-]*)$")


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.\-]", version))


def dataset_folder(root: str | Path, spec: TaskSpec) -> Path:
    """``root/<dataset>_v<version>`` for ``spec`` (the newest version when several are there), or ``root`` itself
    when it is that folder."""
    root = Path(root)
    if not root.is_dir():
        raise UltraBenchError(f"--data-root {root} is not a folder (the OUTPUT_DIR given to the ultrabench CLI)")
    m = _VERSION_DIR.match(root.name)
    if m and m.group("dataset") == spec.dataset:
        return root
    found = sorted((p for p in root.iterdir() if p.is_dir() and (m := _VERSION_DIR.match(p.name))
                    and m.group("dataset") == spec.dataset),
                   key=lambda p: _version_key(_VERSION_DIR.match(p.name).group("version")))
    if not found:
        raise UltraBenchError(f"{root}: no {spec.dataset}_v<version> folder for task {spec.name}; process the data "
                              f"with `ultrabench {spec.dataset} RAW_DATA_DIR {root}` (pip install ultrabench)")
    return found[-1]


def find_tasks(root: str | Path, names: list[str] | tuple[str, ...] = ("all",)) -> list[TaskSpec]:
    """The tasks to run: ``all`` = every UltraBench task whose folder is under ``root``, ``debug`` = the debug
    mini-suite, or task names (each of which must be there)."""
    out: list[TaskSpec] = []
    for name in names:
        if name in ("all", "debug"):
            pool = TASKS if name == "all" else DEBUG_TASKS
            present = []
            for spec in pool.values():
                try:
                    dataset_folder(root, spec)
                except UltraBenchError:
                    continue
                present.append(spec)
            if not present:
                raise UltraBenchError(f"{root}: no {'UltraBench' if name == 'all' else 'debug'} dataset folder "
                                      f"(<dataset>_v<version>) found; see the README section on UltraBench")
            out += present
        else:
            spec = get_task(name)
            dataset_folder(root, spec)  # raises naming the missing folder
            out.append(spec)
    seen: set[str] = set()
    return [s for s in out if not (s.name in seen or seen.add(s.name))]


# ---------------------------------------------------------------------------------------------------------------------
# reading a folder


@dataclass
class Record:
    image: Path
    scan_mask: Path | None
    target: int | Path  # label (classification) or mask path (segmentation)
    index: int  # position in its split file


@dataclass
class TaskData:
    spec: TaskSpec
    folder: Path
    version: str | None  # version.txt's "UltraBench Version"
    splits: dict[str, list[Record]] = field(default_factory=dict)

    def describe(self) -> dict:
        """What results.json records about the data (no local path: the folder by its name)."""
        return {"task": self.spec.name, "title": self.spec.title, "kind": self.spec.kind,
                "classes": list(self.spec.classes), "folder": self.folder.name, "ultrabench_version": self.version,
                "num_records": {s: len(r) for s, r in self.splits.items()}}


def _read_version(folder: Path) -> str | None:
    path = folder / "version.txt"
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("UltraBench Version:"):
            return line.split(":", 1)[1].strip()
    return None


def _image_size(path: Path, where: str) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as err:
        raise UltraBenchError(f"{where}: {path} is not a readable image ({type(err).__name__})") from None


def _read_split(folder: Path, spec: TaskSpec, split: str, check_sizes: bool) -> list[Record]:
    path = folder / f"{split}.json"
    if not path.is_file():
        raise UltraBenchError(f"{path}: missing split file (UltraBench writes train.json, validation.json and "
                              f"test.json; process the data again with `ultrabench {spec.dataset} ...`)")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UltraBenchError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(items, list):
        raise UltraBenchError(f"{path}: expected a JSON array of records, got {type(items).__name__}")
    records = []
    for i, item in enumerate(items):
        where = f"{path} record {i}"
        if not isinstance(item, dict):
            raise UltraBenchError(f"{where}: expected an object, got {type(item).__name__}")
        for key in ("image", spec.target_key):
            if item.get(key) is None:
                raise UltraBenchError(f"{where}: no '{key}' field (task {spec.name} reads 'image', "
                                      f"'{spec.target_key}' and optionally 'scan_mask')")
        image = folder / str(item["image"])
        if not image.is_file():
            raise UltraBenchError(f"{where} field 'image': {image} does not exist")
        scan = None
        if item.get("scan_mask") is not None:
            scan = folder / str(item["scan_mask"])
            if not scan.is_file():
                raise UltraBenchError(f"{where} field 'scan_mask': {scan} does not exist")
        if spec.kind == "classification":
            label = item[spec.target_key]
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < spec.num_classes:
                raise UltraBenchError(f"{where} field '{spec.target_key}': {label!r} is not a class index of "
                                      f"{spec.name} (0..{spec.num_classes - 1}: {', '.join(spec.classes)})")
            target: int | Path = label
        else:
            target = folder / str(item[spec.target_key])
            if not target.is_file():
                raise UltraBenchError(f"{where} field '{spec.target_key}': {target} does not exist")
        if check_sizes:
            size = _image_size(image, f"{where} field 'image'")
            others = [("scan_mask", scan)] + ([(spec.target_key, target)] if spec.kind == "segmentation" else [])
            for key, other in others:
                if other is not None and (got := _image_size(other, f"{where} field '{key}'")) != size:
                    raise UltraBenchError(f"{where} field '{key}': {other} is {got[0]}x{got[1]} (width x height), "
                                          f"its image is {size[0]}x{size[1]}")
        records.append(Record(image, scan, target, i))
    if not records:
        raise UltraBenchError(f"{path}: no records")
    return records


def load_task(root: str | Path, spec: TaskSpec | str, check_sizes: bool = True) -> TaskData:
    """Read and check the three splits of ``spec`` under ``root`` (see the module docstring)."""
    spec = get_task(spec) if isinstance(spec, str) else spec
    folder = dataset_folder(root, spec)
    data = TaskData(spec, folder, _read_version(folder))
    for split in SPLITS:
        data.splits[split] = _read_split(folder, spec, split, check_sizes)
    return data


def subsample_records(records: list[Record], fraction: float, seed: int, classification: bool) -> list[Record]:
    """A seeded ``fraction`` of the training records (per class for classification), at least one per group."""
    if not 0 < fraction <= 1:
        raise UltraBenchError(f"--label-fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return list(records)
    rng = random.Random(seed)
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(int(r.target) if classification else 0, []).append(i)
    keep = []
    for key in sorted(groups):
        keep += rng.sample(groups[key], max(1, math.ceil(fraction * len(groups[key]))))
    return [records[i] for i in sorted(keep)]


# ---------------------------------------------------------------------------------------------------------------------
# transforms and dataset


def letterbox(img: Image.Image, size: int, resample: int) -> Image.Image:
    """``LongestMaxSize(size)`` + ``PadIfNeeded(size, size)`` centred with zeros (the paper's preprocessing)."""
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = img.resize((nw, nh), resample) if (nw, nh) != (w, h) else img
    out = Image.new(img.mode, (size, size), 0)
    out.paste(resized, ((size - nw) // 2, (size - nh) // 2))  # albumentations' centre padding: the extra pixel last
    return out


def read_mask(path: Path, spec: TaskSpec) -> np.ndarray:
    """``(H, W)`` class indices of a mask file: non-zero = 1 for binary tasks, the value itself otherwise."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:  # a colour-saved mask: its first channel
        arr = arr[..., 0]
    if spec.binary_mask:
        return (arr > 0).astype(np.uint8)
    if arr.max(initial=0) >= spec.num_classes:
        raise UltraBenchError(f"{path}: mask value {int(arr.max())} is not a class of {spec.name} "
                              f"(0..{spec.num_classes - 1}: {', '.join(spec.classes)})")
    return arr.astype(np.uint8)


Augment = Callable[..., np.ndarray]  # (image float32 HxWx3 in [0, 1], scan_mask uint8 HxW, seed) -> image


class UltraBenchDataset(torch.utils.data.Dataset):
    """Records -> ``{"pixel_values" (3, S, S), "labels" (int, or (S, S) long), "scan_mask" (S, S) uint8,
    "index"}``. ``augment`` (training) is applied to the letterboxed image in [0, 1] with a seed per (seed, epoch,
    index), so a resumed run sees the same data as an uninterrupted one."""

    def __init__(self, records: list[Record], spec: TaskSpec, size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], apply_scan_mask: bool = False, augment: Augment | None = None,
                 seed: int = 0):
        self.records, self.spec, self.size = records, spec, size
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.apply_scan_mask, self.augment, self.seed, self.epoch = apply_scan_mask, augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The letterboxed image (float32 HxWx3 in [0, 1]), scan mask (uint8 0/1; all ones without a file) and
        mask (uint8 class indices, segmentation) of record ``index``, before augmentation and normalisation."""
        r = self.records[index]
        with Image.open(r.image) as im:
            img = im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy()
        size = self.size
        image = np.asarray(letterbox(img.convert("RGB"), size, Image.BILINEAR), dtype=np.float32) / 255.0
        if r.scan_mask is not None:
            with Image.open(r.scan_mask) as sm:
                scan = (np.asarray(sm.convert("L")) > 0).astype(np.uint8)
        else:
            scan = np.ones((img.height, img.width), np.uint8)
        scan = np.asarray(letterbox(Image.fromarray(scan), size, Image.NEAREST))
        mask = None
        if self.spec.kind == "segmentation":
            mask = np.asarray(letterbox(Image.fromarray(read_mask(r.target, self.spec)), size, Image.NEAREST))
        return image, scan, mask

    def __getitem__(self, index: int) -> dict:
        image, scan, mask = self.load(index)
        if self.augment is not None:
            seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
            image = self.augment(image, scan, seed)
        if self.apply_scan_mask:
            image = image * scan[..., None]
        x = (torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1) - self.mean) / self.std
        out = {"pixel_values": x, "scan_mask": torch.from_numpy(scan.copy()), "index": index}
        if mask is None:
            out["labels"] = torch.tensor(int(self.records[index].target))
        else:
            labels = torch.from_numpy(mask.astype(np.int64))
            if self.apply_scan_mask:
                labels[torch.from_numpy(scan == 0)] = IGNORE_INDEX
            out["labels"] = labels
        return out
