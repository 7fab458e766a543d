r"""Evaluate OpenUS downstream models (upstream ``test_linear.py``, ``test_segmentation.py``, ``calculate_dice_iou.py``)
and summarise runs over seeds.

    # a saved folder (AutoModelForSemanticSegmentation / AutoModelForImageClassification) on a dataset split
    python -m training.evaluate segmentation --model DIR --config training/configs/downstream/busbra_seg.yaml \
        --output results.json [--split test] [--save-masks PRED_DIR] [--figure overlays.png] [key=value ...]
    python -m training.evaluate classification --model DIR --config training/configs/downstream/busi_linear.yaml \
        --output results.json
    # upstream's offline script (calculate_dice_iou.py): saved PNG predictions vs ground truth, both binarised > 0
    python -m training.evaluate offline --pred PRED_DIR --gt GT_DIR --output offline.json
    # mean ± std over seeds: run folders (their eval_test.json) or result JSON files -> summary.json + summary.md;
    # --card re-renders an exported folder's README.md with the table and the model-index eval results
    python -m training.evaluate summarize runs/seed0 runs/seed1 runs/seed2 --output-dir runs/summary \
        [--card runs/seed0/model]

Segmentation numbers: ``dice``/``iou`` are upstream's validation metric (batch-pooled, averaged over batches: they
depend on the batch size), ``dice_per_sample``/``iou_per_sample`` upstream's test metric (averaged over images); the
paper's table (upstream README "Results") comes from the test script, so summaries report the per-sample pair.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .common.checkpoint import atomic_write_text
from .common.config import ConfigError
from .common.progress import finish, track
from .downstream_config import load_downstream_config
from .metrics import (PooledSegmentationMeter, classification_metrics, match_offline_pairs, mean_std,
                      offline_dice_iou, offline_summary)

logger = logging.getLogger("training.evaluate")

# metrics a summary reports, in order: (key in the result JSON, label in the table)
SUMMARY_METRICS = {
    "segmentation": (("dice_per_sample", "DSC"), ("iou_per_sample", "IoU"), ("dice", "DSC (batch-pooled)"),
                     ("iou", "IoU (batch-pooled)")),
    "classification": (("accuracy", "ACC"), ("macro_f1", "F1 (macro)"), ("weighted_f1", "F1 (weighted)")),
}


@torch.no_grad()
def run_segmentation(logits_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[dict],
                     save_masks: str | Path | None = None, names: list[str] | None = None) -> dict:
    """Meter state over ``batches`` (``pixel_values``, ``labels``, ``index``); optionally saves 0/255 PNG masks."""
    meter = PooledSegmentationMeter()
    loss_sum, n = 0.0, 0
    for batch in batches:
        logits = logits_fn(batch["pixel_values"])
        labels = batch["labels"]
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss_sum += F.cross_entropy(logits.float(), labels, ignore_index=255, reduction="sum").item()
        n += int((labels != 255).sum())
        pred = logits.argmax(1) if logits.shape[1] > 1 else (logits[:, 0] > 0).long()
        meter.update(pred, labels)
        if save_masks is not None:
            from PIL import Image

            Path(save_masks).mkdir(parents=True, exist_ok=True)
            for i, idx in enumerate(batch["index"].tolist()):
                stem = Path(names[idx]).stem if names else f"{idx:05d}"
                Image.fromarray((pred[i].numpy() * 255).astype(np.uint8)).save(Path(save_masks) / f"pred_{stem}.png")
    state = meter.state()
    state["loss_sum"], state["loss_pixels"] = loss_sum, n
    return state


def finish_segmentation(states: list[dict]) -> dict:
    meter = PooledSegmentationMeter.from_states(
        {k: v for k, v in s.items() if k not in ("loss_sum", "loss_pixels")} for s in states)
    out = meter.compute()
    pixels = sum(s["loss_pixels"] for s in states)
    out["loss"] = sum(s["loss_sum"] for s in states) / pixels if pixels else math.nan
    return out


@torch.no_grad()
def run_classification(logits_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[dict]) -> dict:
    preds, labels, loss_sum = [], [], 0.0
    for batch in batches:
        logits = logits_fn(batch["pixel_values"])
        loss_sum += F.cross_entropy(logits.float(), batch["labels"], reduction="sum").item()
        preds += logits.argmax(1).tolist()
        labels += batch["labels"].tolist()
    return {"preds": preds, "labels": labels, "loss_sum": loss_sum}


def finish_classification(states: list[dict]) -> dict:
    preds = [p for s in states for p in s["preds"]]
    labels = [y for s in states for y in s["labels"]]
    out = classification_metrics(labels, preds)
    out["loss"] = sum(s["loss_sum"] for s in states) / len(labels)
    return out


@torch.no_grad()
def write_segmentation_overlays(path: str | Path, logits_fn: Callable[[torch.Tensor], torch.Tensor],
                                samples: list[dict], *, title: str, class_names: list[str], mean: tuple[float, ...] | None,
                                std: tuple[float, ...] | None, ignore_index: int | None = 255,
                                exclude: tuple[int, ...] = ()):
    """Image | ground truth | prediction for each sample (``{"pixel_values": (3, H, W), "labels": (h, w)}``), the
    image's Dice (:func:`training.metrics.image_dice`) in each row and the mean in the title. Labels and predictions
    at another resolution than the image (TransKD's 1/4) are shown nearest-upsampled to it. ``mean``/``std``: the
    normalisation to undo for display (None: the input is RGB in [0, 1])."""
    from .common.figures import segmentation_figure
    from .metrics import image_dice

    pixels = torch.stack([s["pixel_values"] for s in samples]).float()
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long()
    logits = logits_fn(pixels)
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    preds = logits.argmax(1).cpu()
    num_classes = logits.shape[1]
    dice = [image_dice(p, t, num_classes, ignore_index, exclude) for p, t in zip(preds, labels)]
    images = pixels.cpu()
    if mean is not None:
        images = images * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    size = images.shape[-2:]

    def up(x):
        return F.interpolate(x[:, None].float(), size=size, mode="nearest")[:, 0].long().numpy()

    return segmentation_figure(path, images.clamp(0, 1).permute(0, 2, 3, 1).numpy(), up(labels), up(preds), dice,
                               title=title, class_names=class_names, ignore_index=ignore_index,
                               background=0 if 0 not in exclude else None)


# ---------------------------------------------------------------------------------------------------------------------
# summaries


def summarize(results: list[dict], task: str) -> dict:
    """Mean and std (population) of each reported metric over runs (seeds)."""
    out = {"task": task, "num_runs": len(results), "metrics": {}}
    for key, label in SUMMARY_METRICS[task]:
        vals = [r[key] for r in results if r.get(key) is not None]
        m, s = mean_std(vals)
        out["metrics"][key] = {"label": label, "mean": m, "std": s, "values": vals}
    return out


def markdown_table(summary: dict, dataset: str = "") -> str:
    """``| dataset | metric | mean ± std (%) | runs |``; numbers ×100 as in the paper's table."""
    lines = ["| dataset | metric | mean ± std (%) | runs |", "|---|---|---|---|"]
    for key, m in summary["metrics"].items():
        if not m["values"]:
            continue
        lines.append(f"| {dataset} | {m['label']} | {100 * m['mean']:.1f} ± {100 * m['std']:.1f} | "
                     f"{summary['num_runs']} |")
    return "\n".join(lines)


def eval_results(summary: dict, dataset: str, split: str = "test") -> list[dict]:
    """huggingface_hub ``EvalResult`` fields for the card's model-index (values in %)."""
    task_type = "image-segmentation" if summary["task"] == "segmentation" else "image-classification"
    return [{"task_type": task_type, "dataset_type": dataset, "dataset_name": dataset, "dataset_split": split,
             "metric_type": key, "metric_name": m["label"], "metric_value": round(100 * m["mean"], 2)}
            for key, m in summary["metrics"].items() if m["values"] and not math.isnan(m["mean"])]


def _load_result(path: Path) -> dict:
    if path.is_dir():
        path = path / "eval_test.json"
    return json.loads(path.read_text(encoding="utf-8"))


def render_summary_card(card_json: str | Path, folder: str | Path, summary: dict, dataset: str) -> Path:
    """Re-render ``folder/README.md`` from the metadata that a training run saved (``export_card.json``), with the
    summary table as its evaluation and the means as its model-index eval results."""
    from conversion.model_card import write_card

    saved = json.loads(Path(card_json).read_text(encoding="utf-8"))
    meta = dict(saved["meta"])
    meta["evaluation"] = (f"Test split, mean ± std over {summary['num_runs']} run(s) (openus_hub "
                          f"`training.evaluate summarize`):\n\n{markdown_table(summary, dataset)}")
    meta["eval_results"] = eval_results(summary, dataset)
    return write_card(folder, meta, saved.get("verification"))


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def _dataset_batches(cfg: dict, task: str, split: str):
    from .data.downstream import DownstreamDataset, build_samples

    d = cfg["data"]
    samples, classes = build_samples(d["dataset"], d["root"], split, d["fold"], d["split_seed"])
    ds = DownstreamDataset(samples, task, d["image_size"], train=False, label_rule=d["label_rule"])
    loader = torch.utils.data.DataLoader(ds, batch_size=d["eval_batch_size"], shuffle=False,
                                         num_workers=d["num_workers"])
    return loader, samples


def _model_eval(args, task: str) -> dict:
    import openus_hub  # noqa: F401  (registers the classes)
    from transformers import AutoModelForImageClassification, AutoModelForSemanticSegmentation

    cfg = load_downstream_config(task, args.config, args.overrides)
    auto = AutoModelForSemanticSegmentation if task == "segmentation" else AutoModelForImageClassification
    model = auto.from_pretrained(args.model).eval()
    loader, samples = _dataset_batches(cfg, task, args.split)

    def logits_fn(x):
        return model(pixel_values=x).logits

    batches = track(loader, f"{task} ({args.split} split)")
    if task == "segmentation":
        result = finish_segmentation([run_segmentation(logits_fn, batches, args.save_masks,
                                                       [s.image for s in samples])])
        if args.figure:
            from .data.augmentations import IMAGENET_MEAN, IMAGENET_STD

            ds = loader.dataset
            n = min(args.figure_images, len(ds))
            fig = write_segmentation_overlays(
                args.figure, logits_fn, [ds[i] for i in range(n)],
                class_names=[model.config.id2label[i] for i in range(model.config.num_labels)],
                title=f"{Path(args.model).name} on {cfg['data']['dataset']} ({args.split} split); per-image Dice",
                mean=IMAGENET_MEAN, std=IMAGENET_STD)
            result["figure"] = str(fig.path)
    else:
        result = finish_classification([run_classification(logits_fn, batches)])
    result.update(task=task, split=args.split, model=str(args.model), dataset=cfg["data"]["dataset"])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for task in ("segmentation", "classification"):
        s = sub.add_parser(task, help=f"a saved {task} folder on a dataset split",
                           description=f"Evaluate a saved {task} folder (save_pretrained) on a split of the dataset "
                                       "that --config describes; metrics as JSON (--output or stdout).")
        s.add_argument("--model", required=True, help="a folder saved with save_pretrained")
        s.add_argument("--config", required=True, help="the downstream YAML (its data section is used)")
        s.add_argument("--split", default="test", choices=("train", "val", "test"), help="default: test")
        s.add_argument("--output", default=None, help="JSON file (default: stdout)")
        if task == "segmentation":
            s.add_argument("--save-masks", default=None, help="write the predicted masks as 0/255 PNGs here")
            s.add_argument("--figure", default=None, help="write a PNG of image | ground truth | prediction "
                           "(with Dice) for the first --figure-images images of the split")
            s.add_argument("--figure-images", type=int, default=4, help="images in --figure (default 4)")
        s.add_argument("overrides", nargs="*", help="key=value overrides of the config, e.g. data.root=/data/BUSI")
    s = sub.add_parser("offline", help="saved prediction PNGs vs ground truth (upstream calculate_dice_iou.py)",
                       description="Dice and IoU of saved prediction masks against ground-truth masks, both "
                                   "binarised > 0, paired by the number in the file name (upstream "
                                   "calculate_dice_iou.py): mean, std, median, min, max.")
    s.add_argument("--pred", required=True, help="folder of predicted masks (PNG/JPG)")
    s.add_argument("--gt", required=True, help="folder of ground-truth masks")
    s.add_argument("--output", default=None, help="JSON file (default: stdout)")
    s = sub.add_parser("summarize", help="mean ± std over runs -> summary.json, summary.md (and a card)",
                       description="Mean and population std of each reported metric over runs (seeds): writes "
                                   "summary.json and summary.md; --card re-renders an exported folder's README.md "
                                   "with the table and the model-index results.")
    s.add_argument("runs", nargs="+", help="run folders (eval_test.json inside) or result JSON files")
    s.add_argument("--output-dir", required=True)
    s.add_argument("--card", default=None, help="an exported model folder whose README.md gets the table")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _run(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command in ("segmentation", "classification"):
        if args.command == "classification":
            args.save_masks = args.figure = None
        result = _model_eval(args, args.command)
    elif args.command == "offline":
        pairs = match_offline_pairs(args.pred, args.gt)
        if not pairs:
            raise SystemExit(f"no prediction in {args.pred} matched a ground truth in {args.gt}")
        from PIL import Image

        dice, iou = [], []
        for pred, gt in pairs:
            d, j = offline_dice_iou(np.asarray(Image.open(pred)), np.asarray(Image.open(gt)))
            dice.append(d)
            iou.append(j)
        result = {"dice": offline_summary(dice), "iou": offline_summary(iou), "num_pairs": len(pairs)}
    else:
        results = [_load_result(Path(r)) for r in args.runs]
        tasks = {r["task"] for r in results}
        if len(tasks) != 1:
            raise SystemExit(f"runs mix tasks {sorted(tasks)}")
        dataset = results[0].get("dataset", "")
        result = summarize(results, tasks.pop())
        result["dataset"] = dataset
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "summary.json", json.dumps(result, indent=2))
        atomic_write_text(out / "summary.md", markdown_table(result, dataset) + "\n")
        wrote = [str(out / "summary.json"), str(out / "summary.md")]
        next_steps = []
        if args.card:
            run = Path(args.runs[0])
            card_json = (run if run.is_dir() else run.parent) / "export_card.json"
            wrote.append(str(render_summary_card(card_json, args.card, result, dataset)))
            next_steps.append(f"openus-hub push {args.card} --repo-id ORG/NAME --dry-run   # check, then upload")
        logger.info("%s", markdown_table(result, dataset))
        finish(logger, ", ".join(wrote), next_steps)
        return 0
    text = json.dumps(result, indent=2)
    if args.output:
        atomic_write_text(args.output, text)
        finish(logger, args.output + (f", {result['figure']}" if result.get("figure") else ""))
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
