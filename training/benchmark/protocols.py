"""The benchmark's protocols, one run each (a task, a protocol, a seed):

* ``linear``: a logistic-regression probe (one linear layer, cross-entropy, AdamW, cosine schedule, seeded
  mini-batches) on the frozen pooled features, standardised with the training split's mean/std; the weight decay is
  chosen from ``linear.weight_decays`` by the validation average precision (UltraBench's key metric), then the
  chosen probe is scored on the test split;
* ``knn``: weighted k-nearest neighbours on the L2-normalised features (cosine similarity, weights
  ``exp(similarity / T)``, DINO's k-NN evaluation; ``knn.k``, ``knn.temperature``);
* ``seg-frozen``: the backbone frozen (eval mode, no gradients), the head trained (OpenUS: upstream's MambaDecoder;
  others: :class:`~training.benchmark.models.LightSegmentationHead`);
* ``seg-finetune``: the same with the backbone trained too, at ``seg.backbone_lr_mult`` x the learning rate.

Segmentation trains with cross-entropy + ``seg.dice_weight`` x soft Dice over the foreground classes (pixels outside
the scan region ignored when the scan mask is applied), AdamW with a per-step cosine schedule (UltraBench's
experiments: Adam, cosine over the training steps), and keeps the model of the epoch with the best validation Dice
(UltraBench keeps the best validation checkpoint) for the test split.

Features for ``linear`` and ``knn`` are extracted once per model and task (:func:`extract_features`) and cached by
the caller; the probes then cost seconds.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..common.progress import progress_bar
from ..common.rng import seed_everything, step_seed
from ..data.ultrabench import IGNORE_INDEX, TaskSpec
from ..metrics import SplitSegmentationMeter, classification_metrics, confusion_matrix, ranking_metrics

__all__ = ["CLASSIFICATION_PROTOCOLS", "PROTOCOLS", "SEGMENTATION_PROTOCOLS", "classification_scores",
           "extract_features", "knn_probe", "linear_probe", "segmentation_baselines", "train_segmentation"]

CLASSIFICATION_PROTOCOLS = ("linear", "knn")
SEGMENTATION_PROTOCOLS = ("seg-frozen", "seg-finetune")
PROTOCOLS = CLASSIFICATION_PROTOCOLS + SEGMENTATION_PROTOCOLS


def _loader(ds, batch_size: int, num_workers: int, order: list[int] | None = None):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=order, shuffle=False,
                                       num_workers=num_workers)


@torch.no_grad()
def extract_features(model: nn.Module, ds, batch_size: int, num_workers: int, device: torch.device,
                     desc: str, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, C) float32, labels (N,))`` of a dataset, in its order."""
    feats, labels = [], []
    bar = progress_bar(len(ds), desc, unit="image", enabled=progress)
    for batch in _loader(ds, batch_size, num_workers):
        feats.append(model(batch["pixel_values"].to(device)).float().cpu())
        labels.append(batch["labels"])
        bar.update(len(batch["labels"]))
    bar.close()
    return torch.cat(feats), torch.cat(labels)


def classification_scores(y_true: np.ndarray, scores: np.ndarray, num_classes: int) -> dict:
    """Accuracy, macro-F1, AP and AUROC (see ``training.metrics``), the confusion matrix, from class scores."""
    pred = scores.argmax(1)
    m = classification_metrics(y_true.tolist(), pred.tolist())
    out = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], **ranking_metrics(y_true, scores)}
    out["confusion_matrix"] = confusion_matrix(y_true, pred, num_classes).tolist()
    out["num_samples"] = int(y_true.size)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# linear probe and k-NN on cached features


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def _fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, cfg: dict,
                seed: int) -> nn.Linear:
    torch.manual_seed(step_seed(seed, 0))
    head = nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg["lr"], weight_decay=weight_decay)
    bs = min(cfg["batch_size"], x.shape[0])
    steps_per_epoch = math.ceil(x.shape[0] / bs)
    total = cfg["epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    for epoch in range(cfg["epochs"]):
        g = torch.Generator().manual_seed(step_seed(seed, 1, epoch))
        order = torch.randperm(x.shape[0], generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * bs : (i + 1) * bs]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


def linear_probe(features: dict[str, tuple[torch.Tensor, torch.Tensor]], spec: TaskSpec, cfg: dict,
                 seed: int) -> dict:
    """See the module docstring. ``features``: split -> (features, labels); train may be a label-fraction subset."""
    (xtr, ytr), (xva, yva), (xte, yte) = features["train"], features["validation"], features["test"]
    xtr, xva, xte = _standardise(xtr.float(), xva.float(), xte.float())
    sweep = []
    best = None
    for wd in cfg["weight_decays"]:
        head = _fit_linear(xtr, ytr, spec.num_classes, float(wd), cfg, seed)
        with torch.no_grad():
            val = classification_scores(yva.numpy(), head(xva).softmax(1).numpy(), spec.num_classes)
        key = val["average_precision"] if not math.isnan(val["average_precision"]) else val["accuracy"]
        sweep.append({"weight_decay": float(wd), "val_average_precision": val["average_precision"],
                      "val_accuracy": val["accuracy"]})
        if best is None or key > best[0]:
            best = (key, float(wd), head)
    _, wd, head = best
    with torch.no_grad():
        scores = head(xte).softmax(1).numpy()
    test = classification_scores(yte.numpy(), scores, spec.num_classes)
    return {"test": test, "selected": {"weight_decay": wd}, "sweep": sweep, "predictions": scores.argmax(1).tolist()}


def knn_probe(features: dict[str, tuple[torch.Tensor, torch.Tensor]], spec: TaskSpec, cfg: dict, seed: int) -> dict:
    """See the module docstring (deterministic: seeds matter only through a label-fraction subset)."""
    (xtr, ytr), (xte, yte) = features["train"], features["test"]
    xtr, xte = F.normalize(xtr.float(), dim=1), F.normalize(xte.float(), dim=1)
    k = min(int(cfg["k"]), xtr.shape[0])
    sim = xte @ xtr.T  # (N_test, N_train)
    top, idx = sim.topk(k, dim=1)
    weights = (top / cfg["temperature"]).exp()
    votes = torch.zeros(xte.shape[0], spec.num_classes)
    votes.scatter_add_(1, ytr[idx], weights)
    scores = (votes / votes.sum(1, keepdim=True)).numpy()
    test = classification_scores(yte.numpy(), scores, spec.num_classes)
    return {"test": test, "selected": {"k": k, "temperature": cfg["temperature"]},
            "predictions": scores.argmax(1).tolist()}


def classification_baselines(train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int) -> dict:
    """What needs no model: always the training split's majority class, and a uniform guess (1/K)."""
    majority = int(np.bincount(train_labels, minlength=num_classes).argmax())
    return {"majority_class": majority, "majority_accuracy": float(np.mean(test_labels == majority)),
            "uniform_accuracy": 1.0 / num_classes, "auroc": 0.5}


# ---------------------------------------------------------------------------------------------------------------------
# segmentation


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """1 - soft Dice over the foreground classes (softmax probabilities, pooled over the batch), valid pixels only."""
    probs = logits.float().softmax(1)[:, 1:]  # (B, K-1, H, W)
    valid = (labels != ignore_index)[:, None]
    target = F.one_hot(labels.clamp(0, logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2)[:, 1:]
    probs, target = probs * valid, target * valid
    inter = (probs * target).sum()
    return 1 - (2 * inter + 1.0) / (probs.sum() + target.sum() + 1.0)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, dice_weight: float) -> torch.Tensor:
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
    return loss + dice_weight * soft_dice_loss(logits, labels) if dice_weight else loss


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, ds, spec: TaskSpec, batch_size: int, num_workers: int,
                          device: torch.device, keep: int = 0) -> tuple[dict, list[np.ndarray]]:
    """Split metrics (``SplitSegmentationMeter``) and the predictions of the first ``keep`` images (uint8)."""
    model.eval()
    meter = SplitSegmentationMeter(spec.num_classes, IGNORE_INDEX)
    kept: list[np.ndarray] = []
    for batch in _loader(ds, batch_size, num_workers):
        pred = model(batch["pixel_values"].to(device)).argmax(1).cpu()
        meter.update(pred, batch["labels"])
        for p in pred:
            if len(kept) < keep:
                kept.append(p.numpy().astype(np.uint8))
    return meter.compute(), kept


def segmentation_baselines(ds, spec: TaskSpec, train_ds) -> dict:
    """Dice of predicting nothing (all background) and of predicting the training split's most frequent
    foreground class on every pixel of the scan region ("full fan"), on the test split."""
    counts = np.zeros(spec.num_classes, np.int64)
    for i in range(len(train_ds)):
        _, _, mask = train_ds.load(i)
        counts += np.bincount(mask.ravel(), minlength=spec.num_classes)
    fg = int(np.argmax(counts[1:]) + 1)
    empty, full = SplitSegmentationMeter(spec.num_classes), SplitSegmentationMeter(spec.num_classes)
    for i in range(len(ds)):
        item = ds[i]
        labels = item["labels"][None]
        empty.update(torch.zeros_like(labels), labels)
        full.update((item["scan_mask"][None].long() > 0).long() * fg, labels)
    e, f = empty.compute(), full.compute()
    return {"empty_dice": e["dice"], "full_scan_dice": f["dice"], "full_scan_class": fg,
            "empty_dice_per_image": e["dice_per_image"], "full_scan_dice_per_image": f["dice_per_image"]}


def train_segmentation(segmenter: nn.Module, train_ds, val_ds, test_ds, spec: TaskSpec, cfg: dict, seed: int,
                       device: torch.device, desc: str, figure_images: int = 0, progress: bool = True) -> dict:
    """Train ``segmenter`` (see the module docstring); returns the test metrics of the best validation epoch, the
    training record and the test predictions of the first ``figure_images`` images."""
    seed_everything(seed)
    model = segmenter.to(device)
    head, backbone = model.parameter_groups()
    groups = [{"params": head, "lr": cfg["lr"]}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg["lr"] * cfg["backbone_lr_mult"]})
    opt = torch.optim.AdamW(groups, weight_decay=cfg["weight_decay"])
    bs = min(cfg["batch_size"], len(train_ds))
    per_epoch = math.ceil(len(train_ds) / bs)
    total = cfg["epochs"] * per_epoch if cfg["max_steps"] is None else min(cfg["max_steps"], cfg["epochs"] * per_epoch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
    best, best_state, history, step = None, None, [], 0
    t0 = time.time()
    bar = progress_bar(total, desc, enabled=progress)
    for epoch in range(cfg["epochs"]):
        if step >= total:
            break
        train_ds.set_epoch(epoch)
        g = torch.Generator().manual_seed(step_seed(seed, 2, epoch))
        order = torch.randperm(len(train_ds), generator=g).tolist()
        model.train()
        for batch in _loader(train_ds, bs, cfg["num_workers"], order):
            torch.manual_seed(step_seed(seed, 3, step))
            loss = segmentation_loss(model(batch["pixel_values"].to(device)), batch["labels"].to(device),
                                     cfg["dice_weight"])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {step} ({desc})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
            if step >= total:
                break
        val, _ = evaluate_segmentation(model, val_ds, spec, cfg["batch_size"], cfg["num_workers"], device)
        history.append({"epoch": epoch, "step": step, "loss": float(loss.item()), "val_dice": val["dice"]})
        if best is None or val["dice"] > best["val_dice"]:
            best = {"epoch": epoch, "step": step, "val_dice": val["dice"]}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()
                          if not model.frozen or k.startswith("head.")}
    bar.close()
    model.load_state_dict({**model.state_dict(), **best_state})
    test, kept = evaluate_segmentation(model, test_ds, spec, cfg["batch_size"], cfg["num_workers"], device,
                                       figure_images)
    return {"test": test, "selected": best, "history": history, "steps": step,
            "train_seconds": round(time.time() - t0, 2), "figure_predictions": kept}
