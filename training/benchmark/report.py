"""What the benchmark writes from its finished runs: the summary over seeds (``results.json``), the markdown tables
(``results.md``), the per-task figures and the "Benchmark" section of a model card."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ..common.checkpoint import atomic_write_text
from ..metrics import mean_std

__all__ = ["CARD_END", "CARD_START", "METRICS", "markdown_tables", "render_card_section", "summarise_runs",
           "update_card"]

# the metrics each kind reports: (key in a run's "test" metrics, column label)
METRICS = {
    "classification": (("accuracy", "Acc"), ("macro_f1", "F1 (macro)"), ("auroc", "AUROC"),
                       ("average_precision", "AP")),
    "segmentation": (("dice", "Dice"), ("iou", "IoU"), ("dice_per_image", "Dice (per image)")),
}
PROTOCOL_NAMES = {"linear": "linear probe", "knn": "k-NN", "seg-frozen": "frozen backbone + head",
                  "seg-finetune": "full fine-tuning"}
CARD_START = "<!-- openus_hub benchmark: start (written by training.benchmark; edits inside are replaced) -->"
CARD_END = "<!-- openus_hub benchmark: end -->"


def summarise_runs(kind: str, runs: dict[int, dict]) -> dict:
    """seed -> run -> ``{"seeds", "metrics": {key: {"mean", "std", "values"}}}`` (population std over seeds)."""
    seeds = sorted(runs)
    out = {"seeds": seeds, "metrics": {}}
    for key, _ in METRICS[kind]:
        values = [runs[s]["test"].get(key) for s in seeds]
        values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        m, s = mean_std(values)
        out["metrics"][key] = {"mean": m, "std": s, "values": values}
    return out


def _cell(m: dict) -> str:
    if not m["values"]:
        return "–"
    return f"{100 * m['mean']:.1f} ± {100 * m['std']:.1f}"


def markdown_tables(results: dict) -> str:
    """One table per task kind: a row per (task, protocol), mean ± std over seeds in %, and the model-free
    baselines of the task."""
    parts = []
    for kind in ("classification", "segmentation"):
        rows = [(name, t) for name, t in results["tasks"].items() if t["kind"] == kind and t["protocols"]]
        if not rows:
            continue
        cols = [label for _, label in METRICS[kind]]
        base = "majority-class Acc" if kind == "classification" else "Dice: empty / full scan region"
        lines = [f"| {kind} task | protocol | " + " | ".join(cols) + f" | seeds | baseline ({base}) |",
                 "|---|---|" + "---|" * len(cols) + "---|---|"]
        for name, t in rows:
            b = t.get("baselines", {})
            baseline = (f"{100 * b['majority_accuracy']:.1f}" if kind == "classification" and b else
                        f"{100 * b['empty_dice']:.1f} / {100 * b['full_scan_dice']:.1f}" if b else "–")
            for protocol, summary in t["protocols"].items():
                cells = [_cell(summary["metrics"][key]) for key, _ in METRICS[kind]]
                lines.append(f"| {name} | {PROTOCOL_NAMES.get(protocol, protocol)} | " + " | ".join(cells) +
                             f" | {len(summary['seeds'])} | {baseline} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def render_card_section(results: dict) -> str:
    """The card's "Benchmark" section (between :data:`CARD_START` and :data:`CARD_END`)."""
    suite = "the openus_hub debug mini-suite (not UltraBench)" if results.get("debug") else \
        "[UltraBench](https://github.com/adamtupper/ultrabench) (Tupper & Gagné, TMLR 2025)"
    s = results["settings"]
    versions = sorted({t["data"].get("ultrabench_version") or "unknown" for t in results["tasks"].values()})
    text = [CARD_START, "## Benchmark", "",
            f"Frozen-feature transfer on {suite}, test splits as processed (UltraBench version "
            f"{', '.join(versions)}), mean ± std over seeds, in %. Images letterboxed to {s['image_size']} px"
            f"{', pixels outside the scan region masked' if s['apply_scan_mask'] else ''}; label fraction "
            f"{s['label_fraction']:g}; augmentation `{s['augment']}`. Protocols: linear probe and k-NN on frozen "
            "pooled features; segmentation with a frozen backbone and a trained head (OpenUS: its MambaDecoder) or "
            "full fine-tuning. Classification: accuracy, macro-F1, AUROC and average precision (macro one-vs-rest; "
            "UltraBench's key metric); segmentation: Dice and IoU over the foreground classes pooled over the test "
            "split (UltraBench's definition) and the mean per-image Dice.", "",
            markdown_tables(results), "",
            f"Produced by `python -m training.benchmark` (openus_hub, code revision `{results.get('git_sha')}`); "
            "the full numbers are in its `results.json`.", CARD_END]
    return "\n".join(text)


def eval_results(results: dict) -> list:
    """huggingface_hub ``EvalResult``s for the card's model-index (means, in %)."""
    from huggingface_hub import EvalResult

    out = []
    dataset_type = "ultrabench-debug" if results.get("debug") else "ultrabench"
    metric_types = {"accuracy": "accuracy", "macro_f1": "f1", "auroc": "roc_auc",
                    "average_precision": "average_precision", "dice": "dice", "iou": "iou",
                    "dice_per_image": "dice"}
    for name, t in results["tasks"].items():
        task_type = "image-classification" if t["kind"] == "classification" else "image-segmentation"
        for protocol, summary in t["protocols"].items():
            for key, label in METRICS[t["kind"]]:
                m = summary["metrics"][key]
                if not m["values"] or math.isnan(m["mean"]):
                    continue
                out.append(EvalResult(
                    task_type=task_type, dataset_type=dataset_type, dataset_name=f"UltraBench: {t['title']}",
                    dataset_config=name, dataset_split="test", metric_type=metric_types[key],
                    metric_name=f"{label} ({PROTOCOL_NAMES.get(protocol, protocol)})",
                    metric_value=round(100 * m["mean"], 2)))
    return out


def update_card(path: str | Path, results: dict, model_name: str) -> Path:
    """Write the Benchmark section into the card at ``path`` (a README.md, or a folder holding one): the text
    between the markers is replaced (or the section appended), the model-index keeps every result that is not from
    this suite and gets this run's; the rest of the card is kept. Atomic."""
    from huggingface_hub import ModelCard

    path = Path(path)
    if path.is_dir():
        path = path / "README.md"
    if path.exists():
        card = ModelCard.load(path)
    else:
        card = ModelCard("---\n{}\n---\n")
    section = render_card_section(results)
    body = card.text
    pattern = re.compile(re.escape(CARD_START) + r".*?" + re.escape(CARD_END), re.S)
    if pattern.search(body):
        body = pattern.sub(lambda _: section, body)
    else:
        body = body.rstrip("\n") + ("\n\n" if body.strip() else "") + section + "\n"
    card.text = body
    ours = {"ultrabench", "ultrabench-debug"}
    kept = [r for r in (card.data.eval_results or []) if r.dataset_type not in ours]
    new = eval_results(results)
    card.data.eval_results = kept + new or None
    if card.data.eval_results and not card.data.model_name:
        card.data.model_name = model_name
    text = str(card)
    ModelCard(text)  # parses (raises on a broken card before anything is written)
    atomic_write_text(path, text)
    return path


def describe_name(source) -> str:
    """The model's name as the figures and cards show it (a local folder by its base name)."""
    return Path(source.spec).resolve().name if Path(source.spec).exists() else source.spec


def seg_image_dice(preds: list[np.ndarray], targets: np.ndarray, num_classes: int) -> list[float]:
    import torch

    from ..metrics import SplitSegmentationMeter

    meter = SplitSegmentationMeter(num_classes)
    for p, t in zip(preds, targets):
        meter.update(torch.from_numpy(p.astype(np.int64))[None], torch.from_numpy(t.astype(np.int64))[None])
    return meter.image_dice


def write_json(path: Path, obj) -> Path:
    import json

    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)
