"""Shared engine of ``training.linear_probe`` and ``training.finetune_segmentation`` (upstream OpenUS
``eval_linear.py`` and ``eval_segmentation.py``, XZheng0427/OpenUS at commit 6b9f6d2e).

Single process or torchrun + DDP (gloo on CPU, nccl on GPU). ``--output-dir`` receives ``config.yaml`` (resolved),
``log.jsonl`` (train loss per logged step, validation metrics per epoch), ``checkpoints/checkpoint_{step:08d}.pth``
(atomic, plain data, each with its ``.sha256`` checksum file; resumable with ``--resume auto``, which takes the
newest one that verifies and loads and says which newer ones it skipped), ``eval_test.json`` (the best model on the
test split),
``figures/test_overlays.png`` (segmentation: ``log.overlay_images`` test images, image | ground truth | prediction
with its Dice), ``export_card.json`` (what the card was rendered from) and ``model/``: the best model as a
``save_pretrained`` folder with ``preprocessor_config.json`` and a generated ``README.md`` card (local paths appear
there as base names). A progress bar runs on rank 0; the run ends with what it wrote and the next commands.

A non-empty ``--output-dir`` is refused unless ``--resume`` (continue the run there) or ``--overwrite`` (delete the
files a previous run of this job wrote there, nothing else; refused, naming them, if the folder holds other files) is
given. Old checkpoints are pruned (``checkpoint.keep_last``) among this run's own only.

Exit status: 0 done, 2 bad configuration, output folder or checkpoint (one line on stderr), 3 non-finite loss.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from openus_hub import (OpenUSConfig, OpenUSForImageClassification, OpenUSForSemanticSegmentation,
                        OpenUSImageProcessorPil, OpenUSModel)

from .common import distributed as du
from .common import faults
from .common.checkpoint import (CheckpointError, atomic_write_text, checkpoint_path, finish_interrupted_saves,
                                list_checkpoints, load_checkpoint, load_optimizer_state_strict, load_state_dict_strict,
                                new_run_id, prune_checkpoints, save_checkpoint, select_checkpoint)
from .common.config import ConfigError, dump_config
from .common.errors import NonFiniteLossError, run_job
from .common.output_dir import (
    DOWNSTREAM_FILES,
    add_run_arguments,
    keep_log_records,
    log_prepared_run,
    prepare_output_dir,
)
from .common.progress import finish, progress_bar
from .common.rng import seed_everything, step_seed
from .common.run_info import git_sha, portable_path, run_metadata
from .data.downstream import DownstreamDataset, build_samples, subsample
from .downstream_config import load_downstream_config
from .data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from .evaluate import (eval_results, finish_classification, finish_segmentation, markdown_table,
                       run_classification, run_segmentation, summarize, write_segmentation_overlays)

logger = logging.getLogger("training.downstream")
FORMAT = "openus_hub.downstream/1"

def get_args_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_run_arguments(
        p, config_help="YAML file (training/configs/downstream/*.yaml); unset keys keep the defaults",
        output_help="run folder (config, log, checkpoints, results, model/)",
        job="run", override_example="train.max_steps=2")


# ---------------------------------------------------------------------------------------------------------------------
# model


def build_model(cfg: dict, num_labels: int, classes: list[str] | None) -> nn.Module:
    """The task model: backbone from ``model.init_from`` (or a random preset), a fresh head."""
    task, mcfg = cfg["task"], cfg["model"]
    state = None
    if mcfg["init_from"]:
        src = Path(mcfg["init_from"])
        if src.is_dir():
            backbone = OpenUSModel.from_pretrained(src)
        else:
            from conversion.convert_openus_to_hf import convert

            backbone, _ = convert(str(src), source=mcfg["source"])
        config = copy.deepcopy(backbone.config)
        for k, v in mcfg["overrides"].items():
            setattr(config, k, v)
        state = {k: v for k, v in backbone.state_dict().items() if k != "embeddings.mask_token"}
        config.use_mask_token = False
    elif mcfg["preset"]:
        config = OpenUSConfig.from_preset(mcfg["preset"], **mcfg["overrides"])
    else:
        config = OpenUSConfig(**mcfg["overrides"])
    config.num_labels = num_labels
    names = classes or (["background", "foreground"] if num_labels == 2 else [str(i) for i in range(num_labels)])
    config.id2label = dict(enumerate(names))
    config.label2id = {v: k for k, v in config.id2label.items()}
    model = (OpenUSForSemanticSegmentation if task == "segmentation" else OpenUSForImageClassification)(config)
    if state is not None:
        model.openus.load_state_dict(state, strict=True)
    if task == "classification":  # upstream linear head: N(0, 0.01), bias 0
        nn.init.normal_(model.classifier.weight, std=0.01)
        nn.init.zeros_(model.classifier.bias)
    return model


def build_optimizer(cfg: dict, model: nn.Module):
    """(optimiser, per-epoch cosine schedule) of a run: the head at ``train.lr`` (x batch/16 with
    ``train.scale_lr``), the backbone too at ``train.backbone_lr_mult`` x that when it is not frozen."""
    tcfg, task = cfg["train"], cfg["task"]
    head = model.decoder if task == "segmentation" else model.classifier
    head_params = list(head.parameters())
    backbone_params = [] if tcfg["mode"] == "frozen" else list(model.openus.parameters())
    lr = tcfg["lr"] * (cfg["data"]["batch_size_per_gpu"] / 16 if tcfg["scale_lr"] else 1.0)
    groups = [{"params": head_params, "lr": lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": lr * tcfg["backbone_lr_mult"]})
    if tcfg["optimizer"] == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=tcfg["momentum"], weight_decay=tcfg["weight_decay"])
    elif tcfg["optimizer"] == "adam":
        opt = torch.optim.Adam(groups, lr=lr, weight_decay=tcfg["weight_decay"])
    elif tcfg["optimizer"] == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=tcfg["weight_decay"])
    else:  # load_downstream_config accepts nothing else
        raise AssertionError(tcfg["optimizer"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tcfg["epochs"], eta_min=0.0)  # stepped per epoch
    return opt, sched


class DownstreamNet(nn.Module):
    """The task model run the upstream way: a frozen backbone stays in eval and runs without autograd; the linear
    probe sees ``feature_scale`` x the pooled feature (``avgpool=2``: upstream feeds ``x_out[:, 0] +
    mean(x_out[:, 1:])``, and both terms are the global average of the last stage, so 2 x GAP;
    ``eval_linear.py:240-250``)."""

    def __init__(self, model: nn.Module, task: str, frozen: bool, feature_scale: float = 1.0):
        super().__init__()
        self.model, self.task, self.frozen, self.feature_scale = model, task, frozen, feature_scale
        if frozen:
            self.model.openus.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.model.openus.eval()
        return self

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        m = self.model
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.task == "classification":
                feats = m.openus(pixel_values, return_dict=True).pooler_output  # [B, C]
            else:
                maps = m.openus(pixel_values).feature_maps  # 4 x [B, C_i, H_i, W_i], out-normed
                feats = [f.permute(0, 2, 3, 1) for f in maps]  # channel-last, as the decoder reads them
        if self.task == "classification":
            return m.classifier(feats * self.feature_scale)
        logits = m.decoder(feats)
        if logits.shape[-2:] != pixel_values.shape[-2:]:
            logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(pixel_values)
        if self.task == "classification":
            return F.cross_entropy(logits, labels), logits
        return self.model.compute_loss(logits, labels), logits


# ---------------------------------------------------------------------------------------------------------------------
# data


def build_data(cfg: dict) -> tuple[DownstreamDataset, dict[str, DownstreamDataset], list[str] | None]:
    d, task = cfg["data"], cfg["task"]
    if not d["root"]:
        raise ConfigError("data.root is not set: pass data.root=FOLDER (the dataset layouts are listed in "
                          "training/data/downstream.py)")
    train, classes = build_samples(d["dataset"], d["root"], "train", d["fold"], d["split_seed"])
    train = subsample(train, d["label_fraction"], d["label_seed"])
    evals = {}
    for split in ("val", "test"):
        samples, _ = build_samples(d["dataset"], d["root"], split, d["fold"], d["split_seed"])
        evals[split] = DownstreamDataset(samples, task, d["image_size"], train=False, label_rule=d["label_rule"])
    from .data.us_augment import build_augment

    train_ds = DownstreamDataset(train, task, d["image_size"], train=True, label_rule=d["label_rule"],
                                 seed=cfg["train"]["seed"], augment=build_augment(d["augment"]))
    return train_ds, evals, classes


def epoch_indices(n: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """This rank's shuffled share of one epoch (padded by repetition so every rank runs the same number of steps)."""
    g = torch.Generator().manual_seed(step_seed(seed, epoch))
    idx = torch.randperm(n, generator=g).tolist()
    total = math.ceil(n / world) * world
    idx += idx[: total - n]
    return idx[rank:total:world]


def evaluate_split(net: DownstreamNet, ds: DownstreamDataset, cfg: dict, rank: int, world: int) -> dict:
    """Metrics of ``net`` on a dataset, sharded over ranks (index % world) and gathered; every rank gets them."""
    net.eval()
    idx = list(range(rank, len(ds), world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=cfg["data"]["eval_batch_size"],
                                         shuffle=False, num_workers=cfg["data"]["num_workers"])
    run = run_segmentation if cfg["task"] == "segmentation" else run_classification
    states = du.all_gather_object(run(net.logits, loader))
    finish = finish_segmentation if cfg["task"] == "segmentation" else finish_classification
    return finish(states)


def _improved(cfg: dict, metrics: dict, best: dict) -> bool:
    select = cfg["train"]["select"]
    if select == "accuracy":
        return best.get("accuracy") is None or metrics["accuracy"] >= best["accuracy"]  # upstream: >=
    d_up = best.get("dice") is None or metrics["dice"] > best["dice"]
    j_up = best.get("iou") is None or metrics["iou"] > best["iou"]
    return {"either": d_up or j_up, "dice": d_up, "iou": j_up}[select]


# ---------------------------------------------------------------------------------------------------------------------
# export


def card_metadata(cfg: dict, task: str, test: dict, name: str, num_params: int) -> dict:
    from conversion.model_card import load_metadata

    base = load_metadata("openus-converted")
    d, t = cfg["data"], cfg["train"]
    dataset = d["dataset"]
    seg = task == "segmentation"
    summary = summarize([test], task)
    head = ("upstream MambaDecoder head (PatchExpand, CVSS decoder blocks, FinalUpsample x4, 1x1 conv)" if seg
            else f"linear classifier on the pooled last-stage feature (avgpool {t['avgpool']}, folded into the "
                  "weights)")
    recipe = (f"{'frozen backbone (upstream protocol)' if t['mode'] == 'frozen' else 'full fine-tuning'}, "
              f"{t['optimizer']} lr {t['lr']}{' x batch/16' if t['scale_lr'] else ''}, cosine over {t['epochs']} "
              f"epochs, batch {d['batch_size_per_gpu']} per process, {d['image_size']} px, label rule "
              f"`{d['label_rule']}`, {100 * d['label_fraction']:g}% of the training labels, seed {t['seed']}")
    init_from = cfg["model"]["init_from"]
    backbone = (f"`{portable_path(init_from)}`" if init_from else
                f"random initialisation (preset `{cfg['model']['preset']}`; smoke tests only)")
    meta = dict(base)
    meta.update(
        name=name, title=f"OpenUS {'segmentation' if seg else 'classifier'} fine-tuned on {dataset} ({name})",
        summary=(f"An OpenUS VMamba backbone with a {head}, trained with openus_hub's "
                 f"`training.{'finetune_segmentation' if seg else 'linear_probe'}` on {dataset}."),
        pipeline_tag="image-segmentation" if seg else "image-classification",
        tags=list(base["tags"]) + [dataset, "segmentation" if seg else "image-classification"],
        model_details=(f"- **Architecture:** OpenUS VMamba backbone + {head}; {num_params:,} parameters; "
                       f"architecture in `config.json`.\n- **Backbone weights:** {backbone}.\n"
                       f"- **Training:** {recipe}.\n- **Code revision:** `{git_sha()}`."),
        uses=(f"- **Direct use:** research on {'lesion/organ segmentation' if seg else 'image classification'} of "
              f"2-D ultrasound frames like those of {dataset}.\n- **Downstream use:** a starting point for "
              "fine-tuning on similar data."),
        get_started=(f"import openus_hub  # registers the OpenUS classes with transformers\n"
                     f"from transformers import pipeline\npipe = pipeline("
                     f"\"{'image-segmentation' if seg else 'image-classification'}\", model=\"{{org}}/{name}\")\n"
                     "result = pipe(pil_image)  # decode DICOM frames with openus_hub.io.read_dicom first"),
        training_data=[{"name": f"{dataset} (folder `{portable_path(d['root'])}`, fold {d['fold']})",
                        "licence": "see the dataset's own terms", "note": "downstream training set"}]
        + list(base["training_data"][:1]),
        evaluation=(f"{dataset} test split, this run (`training/evaluate.py`; Dice/IoU per sample as upstream's "
                    f"test script):\n\n{markdown_table(summary, dataset)}"),
        eval_results=[],
    )
    meta["eval_results"] = eval_results(summary, dataset)
    meta.pop("source", None)
    return meta


def export(net: DownstreamNet, cfg: dict, out_dir: Path, test: dict, sample_batch: torch.Tensor) -> Path:
    """``save_pretrained`` of the best model + processor + card; the card records the reload round-trip check."""
    from transformers import AutoModelForImageClassification, AutoModelForSemanticSegmentation

    from conversion._common import save_atomic
    from conversion.model_card import write_card

    task = cfg["task"]
    model = copy.deepcopy(net.model).eval()
    if task == "classification" and net.feature_scale != 1.0:  # classifier(s * pooled) == (s W) pooled + b
        with torch.no_grad():
            model.classifier.weight.mul_(net.feature_scale)
    model.openus.requires_grad_(True)
    folder = out_dir / "model"

    def finalize(tmp: str) -> None:  # processor, reload check and card, before the folder is swapped in
        size = cfg["data"]["image_size"]
        OpenUSImageProcessorPil(size={"height": size, "width": size}).save_pretrained(tmp)
        auto = AutoModelForSemanticSegmentation if task == "segmentation" else AutoModelForImageClassification
        reloaded = auto.from_pretrained(tmp).eval()
        with torch.no_grad():
            diff = (reloaded(pixel_values=sample_batch).logits - net.eval().logits(sample_batch)).abs().max().item()
        if diff > 1e-4:
            raise RuntimeError(f"exported model differs from the trained one by {diff:.3e}")
        kind = "seg" if task == "segmentation" else "linear"
        name = cfg["export"]["name"] or f"openus-{cfg['data']['dataset']}-{kind}"
        meta = card_metadata(cfg, task, test, name, sum(p.numel() for p in model.parameters()))
        script = "finetune_segmentation" if task == "segmentation" else "linear_probe"
        verification = {"converter": f"training.{script}",
                        "checks": [{"check": "export round trip: reloaded folder vs the trained model, logits",
                                    "input": f"{sample_batch.shape[0]} validation images", "max_abs_diff": diff,
                                    "tolerance": 1e-4}],
                        "notes": ["Not a conversion: trained with openus_hub; see Model details for the recipe."]}
        write_card(tmp, meta, verification)
        (out_dir / "export_card.json").write_text(json.dumps({"meta": meta, "verification": verification}, indent=2),
                                                 encoding="utf-8")

    # the run's own export folder: replaced on every export (old folder moved aside, then removed)
    save_atomic(model, str(folder), overwrite=True, finalize=finalize)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# training


def check_state(state: dict, path: Path, task: str) -> None:
    """A checkpoint of this job and task."""
    if state.get("format") != FORMAT or state.get("task") != task:
        raise CheckpointError(f"checkpoint {path} is not a {task} checkpoint of training.downstream_train "
                              f"(format {state.get('format')!r}, task {state.get('task')!r}); pass a "
                              f"checkpoint_*.pth of a {task} run")


def restore(state: dict, path: Path, model: nn.Module, opt, sched) -> tuple:
    """Load a checkpoint's model, optimiser and schedule, each checked against what it goes into; returns (step,
    epoch, batch in epoch, best metrics, best model's weights, history). One-line CheckpointError."""
    load_state_dict_strict(model, state["model"], path, "model weights")
    load_optimizer_state_strict(opt, state["optimizer"], path)
    try:
        sched.load_state_dict(state["scheduler"])
        step, epoch, batch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        best, best_state, history = dict(state["best"]), state["best_model"], list(state["history"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {path}: its schedule or run state is malformed "
                              f"({' '.join(str(err).split())[:200]}); resume from another checkpoint") from None
    if best_state is not None:
        load_state_dict_strict(model, best_state, path, "best-model weights", check_only=True)
    return step, epoch, batch, best, best_state, history


def train(task: str, args: argparse.Namespace) -> dict:
    cfg = load_downstream_config(task, args.config, args.overrides)
    if cfg["task"] == "segmentation" and cfg["log"]["overlay_images"]:
        from .common.figures import require_matplotlib

        try:
            require_matplotlib("log.overlay_images=0")
        except ImportError as err:
            raise ConfigError(str(err)) from None
    if cfg["data"]["augment"] == "usaugment":
        from .data.us_augment import require_usaugment

        try:
            require_usaugment("data.augment=none")
        except ImportError as err:
            raise ConfigError(str(err)) from None
    rank, world, device = du.init_distributed()
    tcfg, dcfg = cfg["train"], cfg["data"]
    if tcfg["num_threads"]:
        torch.set_num_threads(int(tcfg["num_threads"]))
    out_dir = Path(args.output_dir)
    ckpt_dir = out_dir / "checkpoints"

    found: dict = {}

    def prepare():  # the output folder, interrupted saves and the checkpoint to resume from (rank 0 decides)
        removed = prepare_output_dir(out_dir, DOWNSTREAM_FILES, resume=bool(args.resume), overwrite=args.overwrite)
        notes = [n for folder in (ckpt_dir, out_dir, out_dir / "figures") for n in finish_interrupted_saves(folder)]
        newest_first = [path for _, path in reversed(list_checkpoints(ckpt_dir))]
        path, found["state"], skipped = select_checkpoint(args.resume, newest_first,
                                                          lambda state, path: check_state(state, path, task))
        return removed, notes, path, skipped

    removed, notes, resume, skipped = du.on_rank0(prepare)
    if rank == 0:
        log_prepared_run(out_dir, ckpt_dir, removed, notes, skipped, args.resume, resume)
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out_dir / "config.yaml")
    du.barrier()

    seed_everything(tcfg["seed"])
    train_ds, eval_ds, classes = build_data(cfg)
    num_labels = len(classes) if task == "classification" else 2
    model = build_model(cfg, num_labels, classes)
    frozen = tcfg["mode"] == "frozen"
    scale = 2.0 if task == "classification" and tcfg["avgpool"] == 2 else 1.0  # avgpool 2 = CLS + mean = 2 x GAP
    net = DownstreamNet(model, task, frozen, scale).to(device)
    opt, sched = build_optimizer(cfg, model)
    ddp = net
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=(task == "classification" and not frozen))  # stage 0-2 out-norms are unused

    step, start_epoch, skip_batches = 0, 0, 0
    best: dict = {}
    best_state = None
    history: list[dict] = []
    run_id = None
    if resume:
        state = found["state"] if rank == 0 else load_checkpoint(resume, verify=False)
        step, start_epoch, skip_batches, best, best_state, history = restore(state, resume, model, opt, sched)
        run_id = state.get("run_id")
        logger.info("resumed from %s (step %d, epoch %d, batch %d)", resume, step, start_epoch, skip_batches)
        del state
    run_id = run_id or new_run_id()
    if args.resume and rank == 0:  # the steps after the resumed one are redone: their old records go
        dropped = keep_log_records(out_dir / "log.jsonl",
                                   lambda r: isinstance(r.get("step"), int) and r["step"] <= step)
        if dropped:
            logger.info("log.jsonl: dropped %d record(s) after step %d (redone after the resume)", dropped, step)
    last_saved = resume

    def save(epoch: int, batch_in_epoch: int) -> None:
        nonlocal last_saved
        if rank == 0:
            last_saved = save_checkpoint({
                "format": FORMAT, "task": task, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "best": best, "best_model": best_state, "history": history, "config": cfg,
                "model_config": model.config.to_dict(), "run_id": run_id, **run_metadata(world),
            }, checkpoint_path(ckpt_dir, step))
            prune_checkpoints(ckpt_dir, cfg["checkpoint"]["keep_last"], None, run_id=run_id, upto_step=step)
        du.barrier()

    def log(record: dict) -> None:
        if rank == 0:
            with open(out_dir / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    bs = dcfg["batch_size_per_gpu"]
    per_epoch = math.ceil(math.ceil(len(train_ds) / world) / bs)
    max_steps = tcfg["max_steps"]
    t0, first_step = time.time(), step
    stopped = max_steps is not None and step >= max_steps
    epoch = start_epoch
    planned = tcfg["epochs"] * per_epoch if max_steps is None else min(max_steps, tcfg["epochs"] * per_epoch)
    bar = progress_bar(planned, "linear probe" if task == "classification" else "segmentation fine-tuning",
                       initial=step, enabled=rank == 0 and cfg["log"]["progress_bar"])
    while epoch < tcfg["epochs"] and not stopped:
        train_ds.set_epoch(epoch)
        idx = epoch_indices(len(train_ds), tcfg["seed"], epoch, rank, world)[skip_batches * bs:]
        loader = torch.utils.data.DataLoader(train_ds, batch_size=bs, sampler=idx, num_workers=dcfg["num_workers"])
        ddp.train()
        batch_in_epoch = skip_batches
        skip_batches = 0
        for batch in loader:
            # per-step RNG from (seed, step, rank): DropPath draws are the same after a resume
            torch.manual_seed(step_seed(tcfg["seed"], step, rank))
            x, y = batch["pixel_values"].to(device), batch["labels"].to(device)
            loss, _ = ddp(x, y)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"non-finite loss {loss.item()} at step {step} (epoch {epoch})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            batch_in_epoch += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
            if step % cfg["log"]["every_steps"] == 0 or step == 1:
                log({"step": step, "epoch": epoch, "loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                     "time": round(time.time() - t0, 2)})
                logger.info("step %d epoch %d loss %.4f", step, epoch, loss.item())
            every = cfg["checkpoint"]["every_steps"]
            if every and step % every == 0 and batch_in_epoch < per_epoch:
                save(epoch, batch_in_epoch)
            faults.point("step", step=step, rank=rank)  # test hook (training/common/faults.py)
            if max_steps is not None and step >= max_steps:
                stopped = True
                break
        finished_epoch = batch_in_epoch >= per_epoch
        if finished_epoch:
            sched.step()
        metrics = evaluate_split(net, eval_ds["val"], cfg, rank, world)
        if _improved(cfg, metrics, best):
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best["epoch"], best["step"] = epoch, step
        for key in ("accuracy", "dice", "iou"):
            if key in metrics and (best.get(key) is None or metrics[key] > best[key]):
                best[key] = metrics[key]
        history.append({"epoch": epoch, "step": step, **{k: v for k, v in metrics.items() if k != "per_class"}})
        log({"step": step, "epoch": epoch, "val": history[-1]})
        logger.info("epoch %d val %s", epoch, {k: round(v, 4) for k, v in history[-1].items()
                                               if isinstance(v, float)})
        epoch += 1 if finished_epoch else 0
        save(epoch, 0 if finished_epoch else batch_in_epoch)
        if not finished_epoch:
            break
    bar.close()

    # the best model on the test split, then export (rank 0)
    model.load_state_dict(best_state)
    test = evaluate_split(net, eval_ds["test"], cfg, rank, world)
    test.update(task=task, split="test", dataset=dcfg["dataset"], seed=tcfg["seed"], best=best, steps=step,
                train_seconds=round(time.time() - t0, 2), world_size=world)
    result = {"test": test, "best": best, "steps": step, "output_dir": str(out_dir)}
    if rank == 0:
        atomic_write_text(out_dir / "eval_test.json", json.dumps(test, indent=2))
        wrote = [str(out_dir / "eval_test.json"), str(last_saved)]
        n_fig = min(int(cfg["log"]["overlay_images"]), len(eval_ds["test"]))
        if task == "segmentation" and n_fig:
            net.eval()
            fig = write_segmentation_overlays(
                out_dir / "figures" / "test_overlays.png", lambda x: net.logits(x.to(device)),
                [eval_ds["test"][i] for i in range(n_fig)], class_names=[model.config.id2label[i] for i in range(2)],
                title=f"{dcfg['dataset']} test split, best model (epoch {best.get('epoch')}, step {best.get('step')}); "
                      f"per-image Dice (upstream test_segmentation.py)", mean=IMAGENET_MEAN, std=IMAGENET_STD)
            wrote.append(str(fig.path))
        if cfg["export"]["enabled"]:
            sample = torch.stack([eval_ds["val"][i]["pixel_values"] for i in range(min(2, len(eval_ds["val"])))])
            result["export_dir"] = str(export(net, cfg, out_dir, test, sample.to(device)))
        next_steps = []
        if "export_dir" in result:
            wrote.insert(0, f"{result['export_dir']} (model, processor, card)")
            next_steps.append(f"openus-hub push {result['export_dir']} --repo-id ORG/NAME --dry-run")
        next_steps.append(f"python -m training.evaluate summarize {out_dir} [more runs] --output-dir SUMMARY_DIR"
                          + (f" --card {result['export_dir']}" if "export_dir" in result else ""))
        finish(logger, f"{step - first_step} steps (to step {step}) in {time.time() - t0:.1f} s: " + ", ".join(wrote),
               next_steps)
    du.barrier()
    return result


def main(task: str, argv: list[str] | None, description: str) -> int:
    args = get_args_parser(description).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def job() -> int:
        train(task, args)  # returns the results, for callers in Python
        return 0

    return run_job(job, logger)
