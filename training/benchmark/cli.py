r"""Evaluate a checkpoint on UltraBench-processed ultrasound tasks in one command.

    python -m training.benchmark --model MODEL --data-root ULTRABENCH_ROOT --output-dir DIR \
        [--tasks all|debug|TASK ...] [--protocol linear knn seg-frozen seg-finetune] [--seeds 3] \
        [--label-fraction 1.0] [--config training/configs/benchmark/ultrabench.yaml] [--card MODEL_DIR] \
        [--device auto|cpu|cuda] [--overwrite] [key=value ...]

MODEL: an openus_hub folder or registry name (openus-small), a transformers backbone folder or Hub id in the local
cache (ConvNeXt, DINOv2, ...), or timm:NAME with --weights FILE. ULTRABENCH_ROOT: the OUTPUT_DIR of the `ultrabench`
CLI (pip install ultrabench), holding <dataset>_v<version>/ folders. Protocols: linear and knn (classification tasks,
on frozen pooled features extracted once per task), seg-frozen and seg-finetune (segmentation tasks). Default:
linear knn seg-frozen.

DIR receives benchmark.json (what it measures), features/<task>.safetensors (the cached features), runs/<task>/
<protocol>/seed_<k>.json (one finished run each: the run is resumable per task, protocol and seed; a rerun skips
finished runs), results.json (mean ± std over seeds, baselines, settings), results.md, figures/<task>.png
(confusion matrices, or segmentation overlays) and card_section.md; --card FOLDER_OR_README writes the "Benchmark"
section into that model card (the rest of the card is kept). Settings: --config YAML <- key=value overrides
(image_size, apply_scan_mask, augment: none|usaugment, seg.epochs, ...; every key and default is in
training/benchmark/cli.py DEFAULTS). Exit status 2 = bad arguments, model or data (one line naming the file).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..common.checkpoint import atomic_write, atomic_write_text
from ..common.config import ConfigError, load_config
from ..common.progress import finish, redirect_logging
from ..common.rng import seed_everything
from ..common.run_info import git_sha, run_metadata
from ..data.ultrabench import SPLITS, TaskData, UltraBenchDataset, UltraBenchError, find_tasks, load_task, \
    subsample_records
from .models import (ModelError, ModelSource, PooledFeatures, build_segmenter, cpu_threads, describe_source, device_of,
                     normalisation, resolve_model)
from .protocols import (CLASSIFICATION_PROTOCOLS, PROTOCOLS, SEGMENTATION_PROTOCOLS, classification_baselines,
                        extract_features, knn_probe, linear_probe, segmentation_baselines, train_segmentation)
from .report import (PROTOCOL_NAMES, describe_name, markdown_tables, render_card_section, seg_image_dice,
                     summarise_runs, update_card, write_json)

logger = logging.getLogger("training.benchmark")
FORMAT = "openus_hub.benchmark/1"
DEFAULTS: dict = {
    "image_size": 224,  # letterbox side (multiple of 32 for OpenUS)
    "apply_scan_mask": False,  # zero the input outside the scan region and leave those pixels out of the metrics
    "augment": "none",  # none | usaugment (segmentation training; the probes use fixed features)
    "batch_size": 32,  # feature extraction and evaluation
    "num_workers": 2,
    "num_threads": None,  # torch CPU threads
    "progress_bar": True,
    "linear": {"epochs": 100, "batch_size": 256, "lr": 1.0e-3, "weight_decays": [0.0, 1.0e-4, 1.0e-3, 1.0e-2, 1.0e-1]},
    "knn": {"k": 20, "temperature": 0.07},
    "seg": {"epochs": 50, "max_steps": None, "batch_size": 16, "lr": 1.0e-3, "weight_decay": 1.0e-4,
            "backbone_lr_mult": 0.1, "dice_weight": 1.0, "head_width": 128},
    "figures": {"images": 4},  # segmentation overlays per task (test images)
}
OURS = ("benchmark.json", "features", "runs", "figures", "results.json", "results.md", "card_section.md")


class BenchmarkError(ValueError):
    """A usage problem with the output folder; one line."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="openus folder / registry name, transformers folder or Hub id, "
                   "or timm:NAME (with --weights)")
    p.add_argument("--weights", default=None, help="local weights of a timm:NAME model (.safetensors or .pth)")
    p.add_argument("--data-root", required=True, help="folder holding the ultrabench CLI's <dataset>_v<version>/")
    p.add_argument("--tasks", nargs="+", default=["all"], help="all (every UltraBench task found), debug (the CI "
                   "mini-suite) or task names, e.g. aul_mass_classification camus_segmentation")
    p.add_argument("--protocol", nargs="+", default=["linear", "knn", "seg-frozen"],
                   choices=list(PROTOCOLS) + ["all"], help="default: linear knn seg-frozen; all = the four")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per task and protocol (mean ± std; default 3)")
    p.add_argument("--label-fraction", type=float, default=1.0, help="seeded per-class share of the training "
                   "labels (default 1.0)")
    p.add_argument("--output-dir", required=True, help="results folder (resumes a previous run of the same model)")
    p.add_argument("--config", default=None, help="YAML settings (training/configs/benchmark/*.yaml)")
    p.add_argument("--card", default=None, help="a model card (README.md, or its folder) to write the Benchmark "
                   "section into")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace a previous benchmark's files in --output-dir")
    p.add_argument("overrides", nargs="*", help="key=value settings, e.g. seg.epochs=20 augment=usaugment")
    return p


# ---------------------------------------------------------------------------------------------------------------------
# output folder


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_output(out: Path, manifest: dict, overwrite: bool) -> None:
    """Refuse a folder that holds anything but a benchmark of this model with these settings (``--overwrite``
    replaces a previous benchmark's own files, nothing else)."""
    out.mkdir(parents=True, exist_ok=True)
    mine = out / "benchmark.json"
    entries = [p.name for p in out.iterdir()]
    foreign = [n for n in entries if n not in OURS]
    if foreign:
        raise BenchmarkError(f"--output-dir {out} holds files this benchmark did not write ({', '.join(foreign[:3])})"
                             "; use an empty or new folder")
    if mine.is_file():
        old = json.loads(mine.read_text(encoding="utf-8"))
        if old.get("key") != manifest["key"]:
            if not overwrite:
                raise BenchmarkError(f"{mine}: a benchmark of {old.get('model', {}).get('name')} with other "
                                     "settings is there; pass --overwrite to replace it, or use another --output-dir")
            for name in OURS:
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    elif entries and not overwrite:
        raise BenchmarkError(f"--output-dir {out} is not empty and has no benchmark.json; use an empty folder")
    write_json(mine, manifest)


# ---------------------------------------------------------------------------------------------------------------------
# one task


class TaskRunner:
    def __init__(self, args, cfg: dict, source: ModelSource, out: Path, device: torch.device, key: str):
        self.args, self.cfg, self.source, self.out, self.device, self.key = args, cfg, source, out, device, key
        self.mean, self.std = normalisation(source)
        self.seeds = list(range(args.seeds))
        self.progress = bool(cfg["progress_bar"])
        self._pooled = None

    def dataset(self, data: TaskData, split: str, records=None, train: bool = False, seed: int = 0):
        from ..data.us_augment import build_augment

        augment = build_augment(self.cfg["augment"]) if train else None
        return UltraBenchDataset(records if records is not None else data.splits[split], data.spec,
                                 self.cfg["image_size"], self.mean, self.std, self.cfg["apply_scan_mask"], augment,
                                 seed)

    def run_path(self, task: str, protocol: str, seed: int) -> Path:
        return self.out / "runs" / task / protocol / f"seed_{seed}.json"

    def load_done(self, path: Path, fingerprint: str) -> dict | None:
        if not path.is_file():
            return None
        done = json.loads(path.read_text(encoding="utf-8"))
        if done.get("fingerprint") != fingerprint:
            raise BenchmarkError(f"{path}: computed with other settings or data; pass --overwrite or use another "
                                 "--output-dir")
        return done

    # -- classification ------------------------------------------------------------------------------------------

    def features(self, data: TaskData, fingerprint: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        from safetensors.torch import load, save

        path = self.out / "features" / f"{data.spec.name}.safetensors"
        if path.is_file():
            blob = path.read_bytes()
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("fingerprint") == fingerprint:
                t = load(blob)
                logger.info("  features: cached (%s)", path.name)
                return {s: (t[f"{s}.features"], t[f"{s}.labels"]) for s in SPLITS}
        if self._pooled is None:
            self._pooled = PooledFeatures(self.source).to(self.device)
        tensors = {}
        for split in SPLITS:
            x, y = extract_features(self._pooled, self.dataset(data, split), self.cfg["batch_size"],
                                      self.cfg["num_workers"], self.device, f"  features {split}", self.progress)
            tensors[f"{split}.features"], tensors[f"{split}.labels"] = x.contiguous(), y.contiguous()
        atomic_write(path, lambda f: f.write(save(tensors, metadata={"fingerprint": fingerprint})))
        return {s: (tensors[f"{s}.features"], tensors[f"{s}.labels"]) for s in SPLITS}

    def classification(self, data: TaskData, protocols: list[str], data_key: str) -> dict:
        spec = data.spec
        feat_fp = _digest([self.key, data_key, "features"])
        feats = self.features(data, feat_fp)
        train_labels = feats["train"][1].numpy()
        out = {"baselines": classification_baselines(train_labels, feats["test"][1].numpy(), spec.num_classes),
               "runs": {}}
        for protocol in protocols:
            pcfg = self.cfg["linear" if protocol == "linear" else "knn"]
            runs = {}
            for seed in self.seeds:
                path = self.run_path(spec.name, protocol, seed)
                fp = _digest([self.key, data_key, protocol, pcfg, self.args.label_fraction, seed])
                done = self.load_done(path, fp)
                if done is not None:
                    logger.info("  %s seed %d: done before (skipped)", protocol, seed)
                    runs[seed] = done
                    continue
                t0 = time.time()
                subset = feats
                if self.args.label_fraction < 1:  # a seeded per-class share of the training labels
                    recs = data.splits["train"]
                    chosen = {id(r) for r in subsample_records(recs, self.args.label_fraction, seed, True)}
                    idx = [j for j, r in enumerate(recs) if id(r) in chosen]
                    subset = {**feats, "train": (feats["train"][0][idx], feats["train"][1][idx])}
                fn = linear_probe if protocol == "linear" else knn_probe
                result = fn(subset, spec, pcfg, seed)
                result.update(fingerprint=fp, task=spec.name, protocol=protocol, seed=seed,
                              seconds=round(time.time() - t0, 2))
                write_json(path, result)
                t = result["test"]
                logger.info("  %s seed %d: Acc %.3f, F1 %.3f, AUROC %.3f, AP %.3f", protocol, seed, t["accuracy"],
                            t["macro_f1"], t["auroc"], t["average_precision"])
                runs[seed] = result
            out["runs"][protocol] = runs
        self.confusion_figure(data, out["runs"])
        return out

    def confusion_figure(self, data: TaskData, runs: dict) -> None:
        from ..common.figures import confusion_matrices_figure

        first = {p: r[min(r)]["test"]["confusion_matrix"] for p, r in runs.items() if r}
        if not first:
            return
        confusion_matrices_figure(
            self.out / "figures" / f"{data.spec.name}.png", {PROTOCOL_NAMES[p]: np.asarray(m) for p, m in
                                                             first.items()},
            list(data.spec.classes),
            title=f"{data.spec.title}: test split confusion matrices (seed {min(self.seeds)}), "
                  f"model {describe_name(self.source)}")

    # -- segmentation --------------------------------------------------------------------------------------------

    def segmentation(self, data: TaskData, protocols: list[str], data_key: str) -> dict:
        spec, cfg = data.spec, {**self.cfg["seg"], "num_workers": self.cfg["num_workers"]}
        test_ds = self.dataset(data, "test")
        out = {"baselines": segmentation_baselines(test_ds, spec, self.dataset(data, "train")), "runs": {}}
        n_fig = min(int(self.cfg["figures"]["images"]), len(test_ds))
        for protocol in protocols:
            runs = {}
            for seed in self.seeds:
                path = self.run_path(spec.name, protocol, seed)
                fp = _digest([self.key, data_key, protocol, self.cfg["seg"], self.cfg["augment"],
                              self.args.label_fraction, seed])
                done = self.load_done(path, fp)
                if done is not None:
                    logger.info("  %s seed %d: done before (skipped)", protocol, seed)
                    runs[seed] = done
                    continue
                train = subsample_records(data.splits["train"], self.args.label_fraction, seed, False)
                seed_everything(seed)  # the new head's initial weights: the same for a seed in every run
                segmenter = build_segmenter(self.source, list(spec.classes), protocol == "seg-frozen",
                                              cfg["head_width"])
                result = train_segmentation(
                    segmenter, self.dataset(data, "train", train, train=True, seed=seed),
                    self.dataset(data, "validation"), test_ds, spec, cfg, seed, self.device,
                    f"  {protocol} seed {seed}", n_fig if seed == self.seeds[0] else 0, self.progress)
                preds = result.pop("figure_predictions")
                if preds:
                    buf = io.BytesIO()
                    np.savez_compressed(buf, predictions=np.stack(preds))
                    atomic_write(path.with_suffix(".npz"), lambda f: f.write(buf.getvalue()))
                result.update(fingerprint=fp, task=spec.name, protocol=protocol, seed=seed)
                write_json(path, result)
                t = result["test"]
                logger.info("  %s seed %d: Dice %.3f, IoU %.3f (best validation epoch %d, %d steps, %.0f s)",
                            protocol, seed, t["dice"], t["iou"], result["selected"]["epoch"], result["steps"],
                            result["train_seconds"])
                runs[seed] = result
                del segmenter
            out["runs"][protocol] = runs
        self.overlay_figure(data, test_ds, out["runs"], n_fig)
        return out

    def overlay_figure(self, data: TaskData, test_ds, runs: dict, n: int) -> None:
        from ..common.figures import segmentation_comparison_figure

        preds = {}
        for protocol, r in runs.items():
            npz = self.run_path(data.spec.name, protocol, self.seeds[0]).with_suffix(".npz")
            if npz.is_file():
                preds[protocol] = np.load(npz)["predictions"][:n]
        if not preds or n == 0:
            return
        images, targets = [], []
        for i in range(n):
            image, scan, _ = test_ds.load(i)
            images.append(image * scan[..., None] if self.cfg["apply_scan_mask"] else image)
            targets.append(test_ds[i]["labels"].numpy())
        targets = np.stack(targets)
        shown = {PROTOCOL_NAMES[p]: (v, seg_image_dice(list(v), targets, data.spec.num_classes))
                 for p, v in preds.items()}
        segmentation_comparison_figure(
            self.out / "figures" / f"{data.spec.name}.png", np.stack(images).clip(0, 1), targets, shown,
            class_names=list(data.spec.classes),
            title=f"{data.spec.title}: first {n} test images, seed {self.seeds[0]}, model "
                  f"{describe_name(self.source)}; Dice over the foreground classes of each image")


# ---------------------------------------------------------------------------------------------------------------------
# main


def _split_digest(data: TaskData) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        h.update((data.folder / f"{split}.json").read_bytes())
    return h.hexdigest()[:16]


def _check_types(cfg: dict, defaults: dict, where: str = "") -> None:
    """Numbers where the defaults hold numbers (YAML reads ``1e-3`` as a string: write ``1.0e-3``)."""
    for key, default in defaults.items():
        value, dotted = cfg[key], f"{where}{key}"
        if isinstance(default, dict):
            _check_types(value, default, dotted + ".")
        elif isinstance(default, bool) or (default is None and dotted == "apply_scan_mask"):
            if not isinstance(value, bool):
                raise ConfigError(f"setting {dotted} must be true or false, got {value!r}")
        elif isinstance(default, (int, float)) or dotted in ("seg.max_steps", "num_threads"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok and not (default is None and value is None):
                raise ConfigError(f"setting {dotted} must be a number, got {value!r} (YAML reads 1e-3 as text: "
                                  "write 1.0e-3)")
        elif isinstance(default, list) and not all(isinstance(v, (int, float)) for v in value or [None]):
            raise ConfigError(f"setting {dotted} must be a list of numbers, got {value!r}")


def run(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, args.overrides, defaults=DEFAULTS)
    _check_types(cfg, DEFAULTS)
    if cfg["augment"] not in ("none", "usaugment"):
        raise ConfigError(f"augment must be none or usaugment, got {cfg['augment']!r}")
    if cfg["augment"] == "usaugment":
        from ..data.us_augment import require_usaugment

        try:
            require_usaugment("augment=none")
        except ImportError as err:
            raise ConfigError(str(err)) from None
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
    protocols = list(PROTOCOLS) if "all" in args.protocol else list(dict.fromkeys(args.protocol))
    cpu_threads(cfg["num_threads"])
    tasks = find_tasks(args.data_root, args.tasks)
    source = resolve_model(args.model, args.weights)
    device = device_of(args.device)
    out = Path(args.output_dir)
    model_info = describe_source(source)
    settings = {**cfg, "label_fraction": args.label_fraction, "seeds": args.seeds}
    key = _digest([model_info, {k: v for k, v in settings.items() if k not in ("num_workers", "num_threads",
                                                                                 "progress_bar", "seeds")}])
    prepare_output(out, {"format": FORMAT, "key": key, "model": model_info, "settings": settings}, args.overwrite)
    runner = TaskRunner(args, cfg, source, out, device, key)
    t0 = time.time()
    results = {"format": FORMAT, "model": model_info, "settings": settings, "protocols": protocols, "tasks": {},
               "debug": all(t.debug for t in tasks), "git_sha": git_sha(), **run_metadata(1)}
    for i, spec in enumerate(tasks, 1):
        data = load_task(args.data_root, spec)
        wanted = [p for p in protocols if p in (CLASSIFICATION_PROTOCOLS if spec.kind == "classification"
                                                 else SEGMENTATION_PROTOCOLS)]
        n = data.describe()["num_records"]
        logger.info("task %d/%d %s (%s, %s train / %s validation / %s test): %s", i, len(tasks), spec.name,
                    spec.kind, n["train"], n["validation"], n["test"], ", ".join(wanted) or "no protocol for it")
        entry = {"title": spec.title, "kind": spec.kind, "data": data.describe(), "protocols": {}}
        if wanted:
            data_key = [data.folder.name, _split_digest(data)]
            done = (runner.classification if spec.kind == "classification" else runner.segmentation)(
                data, wanted, data_key)
            entry["baselines"] = done["baselines"]
            entry["protocols"] = {p: summarise_runs(spec.kind, r) for p, r in done["runs"].items()}
            fig = out / "figures" / f"{spec.name}.png"
            entry["figure"] = fig.relative_to(out).as_posix() if fig.is_file() else None
        results["tasks"][spec.name] = entry
    results["seconds"] = round(time.time() - t0, 1)
    write_json(out / "results.json", results)
    table = markdown_tables(results)
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(out / "card_section.md", render_card_section(results) + "\n")
    wrote = [str(out / "results.json"), str(out / "results.md"), str(out / "figures"), str(out / "card_section.md")]
    next_steps = []
    if args.card:
        wrote.append(str(update_card(args.card, results, model_info["name"])))
        next_steps.append(f"openus-hub push {Path(args.card).parent if args.card.endswith('.md') else args.card} "
                          "--repo-id ORG/NAME --dry-run")
    elif Path(args.model).is_dir():
        next_steps.append(f"the same command with --card {args.model} (writes the Benchmark section into its card)")
    logger.info("\n%s", table)
    finish(logger, f"{len(tasks)} task(s) in {results['seconds']:.0f} s: " + ", ".join(wrote), next_steps)
    return results


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with redirect_logging():
            run(args)
    except (ConfigError, UltraBenchError, ModelError, BenchmarkError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
