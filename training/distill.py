"""TransKD distillation: a transformers teacher (SegFormer or OpenUS) -> a stock SegFormer student.

    python -m training.distill --config training/configs/distill/debug_cpu.yaml --output-dir runs/debug
    torchrun --nproc_per_node=2 -m training.distill --config ... --output-dir ... train.max_steps=4
    python -m training.distill --config ... --output-dir runs/debug --resume auto train.max_steps=8   # continue

Configuration: the defaults (training/distill.py DEFAULTS) <- --config YAML (training/configs/distill/*.yaml) <-
key.sub=value overrides (values parsed as YAML); an unknown key is an error that names it.

OUTPUT_DIR receives config.yaml (resolved), checkpoints/last.pt and best.pt (best val mIoU; atomic, weights_only-
loadable: student + KD modules, optimizer, schedule position, per-rank RNG states, config; each with its checksum
file last.pt.sha256 / best.pt.sha256), summary.json and figures/val_overlays_step_*.png (train.overlay_images val
images: image | ground truth | prediction with its Dice). A progress bar runs on rank 0; the run ends with what it
wrote and the export command (python -m training.export_student CHECKPOINT --output-dir DIR).

A non-empty OUTPUT_DIR is refused unless --resume or --overwrite is given. --resume auto continues from last.pt, or
from best.pt when last.pt does not verify against its sha256 or does not load (saying why); --resume PATH from that
checkpoint. --overwrite deletes the files a previous distillation run wrote there and nothing else (a folder holding
other files, such as an exported student, is refused, naming them).

Exit status: 0 done, 2 bad configuration, output folder or checkpoint (one line on stderr), 3 non-finite loss.
Upstream: train_TransKDBase.py, train_TransKD_GLMixer.py, train_TransKD_EA.py of RuipingL/TransKD at commit 39ab795d;
training/README_distill.md documents the recipe flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from training.common import faults
from training.common.checkpoint import (CheckpointError, atomic_write_text, finish_interrupted_saves, load_checkpoint,
                                        load_optimizer_state_strict, load_state_dict_strict, new_run_id,
                                        require_parts, save_checkpoint, select_checkpoint)
from training.common.config import ConfigError, dump_config, load_config
from training.common.distributed import (all_gather_object, all_reduce_sum, barrier, init_distributed,
                                         on_rank0)
from training.common.errors import NonFiniteLossError, run_job
from training.common.output_dir import DISTILL_FILES, add_run_arguments, log_prepared_run, prepare_output_dir
from training.common.progress import finish, progress_bar
from training.common.rng import rng_state, seed_everything, set_rng_state
from training.common.run_info import run_metadata
from training.kd.data import (
    ACDCDataset,
    CityscapesDataset,
    CoTransform,
    CoTransformConfig,
    DicomExampleFrames,
    SegmentationFolderDataset,
)
from training.kd.distiller import TransKDDistiller
from training.kd.features import TeacherFeatures
from training.kd.student import apply_upstream_numerics, build_student, segformer_config
from training.losses import ERFNET_CITYSCAPES_WEIGHTS, TransKDLoss, WeightedCrossEntropyLoss
from training.metrics import IoUAccumulator

logger = logging.getLogger("training.distill")
FORMAT = "openus_hub.distill/1"
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

DEFAULTS: dict = {
    "name": "distill",
    "teacher": {
        "type": "segformer",  # segformer | openus
        "pretrained": None,  # a save_pretrained folder (upstream .pth: convert with conversion/convert_transkd_to_hf.py)
        "config": None,  # random-init teacher from this config (debug only)
        "preset": None,  # MiT preset for a segformer `config`
        "upstream_layer_norm_eps": False,  # eps 1e-6 on block/stage norms (a teacher converted from upstream)
    },
    "student": {
        "preset": "b0",
        "config": {},  # SegformerConfig overrides
        "num_labels": 20,
        "init": "upstream",  # upstream: SegFormer's own init (Segformer.py:273); transformers: HF's N(0, 0.02)
        "upstream_layer_norm_eps": True,  # eps 1e-6 on block and stage-end norms (Segformer.py:449, 467)
        "dropout2d": True,  # decode head Dropout2d(0.1) (Segformer.py:292-295), not transformers' Dropout
        "id2label": None,  # class names {index: name}; None: "0", "1", ...
    },
    "kd": {
        "variant": "base",  # base (CSF+PEA) | gl | ea
        "mid_channels": 64,
        "gl_alpha_init": 1.0,  # upstream leaves alpha/beta uninitialised (CSF_GLMixer.py:101-102)
        "gl_beta_init": 1.0,
        "gl_add": False,
        "hcl_weight": 1.0,
        "embed_weights": [0.1, 0.1, 0.5, 1.0],
    },
    "loss": {
        "class_weights": "erfnet",  # erfnet | null (all 1) | list
        # labels == ignore_index -> this class, weight 0 (train_TransKDBase.py:72); null: plain ignore_index
        "void_class": 19,
        "ignore_index": 255,
    },
    "data": {
        "dataset": "cityscapes",  # cityscapes | acdc | folder | dicom_examples
        "root": None,
        "train_split": "train",
        "val_split": "val",
        "height": 512,
        "width": None,
        "label_scale": 0.25,
        "hflip": True,
        "max_shift": 2,
        "reproduce_shift_quirks": True,  # upstream's translation bugs (training/kd/data.py, CoTransformConfig)
        "mean": None,
        "std": None,
        "mask_rule": "eq255",
        "dicom_name": "ybr_color",
        "train_frames": None,
        "val_frames": None,
        "num_workers": 2,
    },
    "optim": {
        "lr": 6.0e-5,
        "weight_decay": 0.01,
        "betas": [0.9, 0.999],
        "eps": 1.0e-8,
        "decay_norm_and_bias": True,  # upstream: one AdamW group, everything decayed (train_TransKDBase.py:169)
    },
    "schedule": {
        # upstream: linear poly over 1500 epochs while training 1000 (train_TransKDBase.py:170, 538)
        "max_decay_epochs": 1500,
        "power": 1.0,
        "prestep": True,  # upstream's scheduler steps once in its constructor: epoch e trains at lr*(1-e/1500)
    },
    "train": {
        "epochs": 1000,
        "batch_size": 2,
        "max_steps": None,
        "drop_last": False,  # upstream keeps the odd last batch (SK's batch-of-1 fc1 path, CSF.py:27-30)
        "eval_every_epochs": 1,
        "val_batch_size": 1,
        "checkpoint_every_steps": None,
        "log_every_steps": 50,
        "seed": 0,
        "find_unused_parameters": True,  # SK's fc/fc1 alternate with the batch size
        "progress_bar": True,
        "overlay_images": 4,  # val images drawn with ground truth and prediction at the end (figures/*.png); 0: none
    },
}


FREE_KEYS = ("teacher.config", "student.config", "student.id2label")  # model-config fields and class names


def load_distill_config(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """``DEFAULTS`` <- YAML <- ``key.sub=value`` overrides; unknown keys are errors (:class:`ConfigError`)."""
    return load_config(path, overrides, defaults=DEFAULTS, free=FREE_KEYS)


def build_teacher(cfg: dict) -> torch.nn.Module:
    t = cfg["teacher"]
    if t["type"] == "segformer":
        from transformers import SegformerForSemanticSegmentation

        if t["pretrained"]:
            model = SegformerForSemanticSegmentation.from_pretrained(t["pretrained"])
        else:
            model = SegformerForSemanticSegmentation(segformer_config(t.get("preset"), **(t["config"] or {})))
        if t["upstream_layer_norm_eps"]:
            apply_upstream_numerics(model, layer_norm_eps=True, dropout2d=False)
    elif t["type"] == "openus":
        from openus_hub import OpenUSConfig, OpenUSForSemanticSegmentation

        if t["pretrained"]:
            model = OpenUSForSemanticSegmentation.from_pretrained(t["pretrained"])
        else:
            model = OpenUSForSemanticSegmentation(OpenUSConfig(**(t["config"] or {})))
    else:
        raise ValueError(f"teacher.type must be segformer or openus, got {t['type']!r}")
    if not t["pretrained"]:
        logger.warning("teacher has random weights (teacher.pretrained is not set): only for smoke tests")
    return model


def build_student_from_cfg(cfg: dict):
    s = cfg["student"]
    config = segformer_config(s.get("preset"), num_labels=s["num_labels"], **(s.get("config") or {}))
    return build_student(config, s["init"], s["upstream_layer_norm_eps"], s["dropout2d"])


def build_loss(cfg: dict) -> TransKDLoss:
    lc = cfg["loss"]
    weights = lc["class_weights"]
    if weights == "erfnet":
        weights = list(ERFNET_CITYSCAPES_WEIGHTS)
    ce = WeightedCrossEntropyLoss(weights, lc["void_class"], lc["ignore_index"])
    return TransKDLoss(ce, cfg["kd"]["hcl_weight"], tuple(cfg["kd"]["embed_weights"]))


def build_datasets(cfg: dict):
    d = cfg["data"]
    tc = CoTransformConfig(
        height=d["height"], width=d["width"], label_scale=d["label_scale"], hflip=d["hflip"],
        max_shift=d["max_shift"], reproduce_shift_quirks=d["reproduce_shift_quirks"],
        ignore_index=cfg["loss"]["ignore_index"],
        mean=tuple(d["mean"]) if d["mean"] else None, std=tuple(d["std"]) if d["std"] else None,
    )
    train_t, val_t, seed = CoTransform(tc, True), CoTransform(tc, False), cfg["train"]["seed"]
    kind = d["dataset"]
    if kind in ("cityscapes", "acdc"):
        cls = CityscapesDataset if kind == "cityscapes" else ACDCDataset
        return cls(d["root"], d["train_split"], train_t, seed), cls(d["root"], d["val_split"], val_t, seed)
    if kind == "folder":
        return (SegmentationFolderDataset(d["root"], d["train_split"], train_t, d["mask_rule"], seed),
                SegmentationFolderDataset(d["root"], d["val_split"], val_t, d["mask_rule"], seed))
    if kind == "dicom_examples":
        tf, vf = d["train_frames"], d["val_frames"]
        return (DicomExampleFrames(train_t, d["dicom_name"], tuple(tf) if tf else None, seed),
                DicomExampleFrames(val_t, d["dicom_name"], tuple(vf) if vf else None, seed))
    raise ValueError(f"unknown data.dataset {kind!r}")


def epoch_lr(cfg: dict, epoch: int) -> float:
    """Learning rate of 0-based `epoch`: upstream's PolynomialLRDecay stepped once per epoch and once in its
    constructor, so epoch e (1-based) trains at lr * (1 - e / max_decay_epochs) ** power (train_TransKDBase.py:170,
    293)."""
    sc = cfg["schedule"]
    e = min(epoch + (1 if sc["prestep"] else 0), sc["max_decay_epochs"])
    return cfg["optim"]["lr"] * (1.0 - e / sc["max_decay_epochs"]) ** sc["power"]


def build_optimizer(cfg: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg["optim"]
    params = [p for p in model.parameters() if p.requires_grad]
    if o["decay_norm_and_bias"]:
        groups = [{"params": params, "weight_decay": o["weight_decay"]}]
    else:
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": o["weight_decay"]},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"])


def build_training(cfg: dict, device: torch.device = torch.device("cpu")):
    """(teacher features, student + KD modules, optimiser) of a run, on ``device``."""
    teacher = TeacherFeatures(build_teacher(cfg)).to(device)
    k = cfg["kd"]
    distiller = TransKDDistiller(
        build_student_from_cfg(cfg), teacher.channels, k["variant"], mid_channels=k["mid_channels"],
        gl_add=k["gl_add"], gl_alpha_init=k["gl_alpha_init"], gl_beta_init=k["gl_beta_init"],
    ).to(device)
    return teacher, distiller, build_optimizer(cfg, distiller)


@torch.no_grad()
def evaluate(student, loader, num_labels: int, void_class: int | None, ignore_index: int, device) -> dict:
    was = student.training
    student.eval()
    acc = IoUAccumulator(num_labels, void_class if void_class is not None else ignore_index, ignore_index)
    for batch in loader:
        logits = student(batch["pixel_values"].to(device)).logits
        acc.update(logits.argmax(1), batch["labels"])
    acc.load(all_reduce_sum(acc.state().to(device)).cpu())
    student.train(was)
    return {"miou": acc.miou(), "iou": [round(float(v), 6) for v in acc.iou()]}


REQUIRED = ("model", "optimizer", "state", "rng", "config")


def check_state(ckpt: dict, path: Path) -> None:
    """A distillation checkpoint of this code: the format tag (when present) and every part a resume needs."""
    if ckpt.get("format", FORMAT) != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of training.distill (format "
                              f"{ckpt.get('format')!r}); pass OUTPUT_DIR/checkpoints/last.pt or best.pt of a "
                              "distillation run")
    require_parts(ckpt, REQUIRED, path)


def restore(ckpt: dict, path: Path, distiller: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> dict:
    """Load the student + KD modules, the optimiser and this rank's RNG state, each checked against what it goes
    into; returns the run state (step, epoch, batch, history, best mIoU). One-line CheckpointError."""
    load_state_dict_strict(distiller, ckpt["model"], path, "student and KD-module weights")
    load_optimizer_state_strict(optimizer, ckpt["optimizer"], path)
    try:
        state = dict(ckpt["state"])
        for key in ("step", "epoch", "batch_in_epoch"):
            state[key] = int(state[key])
        state["best_miou"] = float(state["best_miou"])
        state["history"] = list(state["history"])
        rngs = list(ckpt["rng"])
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {path}: its run state or RNG state is malformed "
                              f"({' '.join(str(err).split())[:200]}); resume from another checkpoint") from None
    return state


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_run_arguments(
        parser, config_help="YAML file (training/configs/distill/*.yaml)", config_required=True,
        output_help="run folder (config, checkpoints, summary, figures)",
        resume_help="'auto': OUTPUT_DIR/checkpoints/last.pt, or best.pt when last.pt does not verify against its "
                    "sha256 or load (none there: start afresh); or a checkpoint path",
        job="distillation run", override_example="train.max_steps=4")


def main(argv: list[str] | None = None) -> int:
    """The command line: exit status 0, 2 (bad configuration or checkpoint) or 3 (non-finite loss)."""
    args = get_args_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", 0))  # torchrun's; the process group starts in run()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=LOG_FORMAT)

    def job() -> int:
        run(args)  # returns the run state, for callers in Python
        return 0

    return run_job(job, logger)


def run(args: argparse.Namespace | list[str]) -> dict:
    """Train; returns the run state (step, epoch, history, evals, best_miou). Raises ConfigError, CheckpointError,
    NonFiniteLossError."""
    if not isinstance(args, argparse.Namespace):
        args = get_args_parser().parse_args(args)
    cfg = load_distill_config(args.config, args.overrides)
    if cfg["train"]["overlay_images"]:
        from training.common.figures import require_matplotlib

        try:
            require_matplotlib("train.overlay_images=0")
        except ImportError as err:
            raise ConfigError(str(err)) from None

    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=LOG_FORMAT)
    out_dir = Path(args.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    tc = cfg["train"]

    found: dict = {}

    def prepare():  # the output folder, interrupted saves and the checkpoint to resume from (rank 0 decides)
        removed = prepare_output_dir(out_dir, DISTILL_FILES, resume=bool(args.resume), overwrite=args.overwrite)
        notes = [n for folder in (ckpt_dir, out_dir, out_dir / "figures") for n in finish_interrupted_saves(folder)]
        newest_first = [p for p in (ckpt_dir / "last.pt", ckpt_dir / "best.pt") if p.exists()]
        path, found["ckpt"], skipped = select_checkpoint(args.resume, newest_first, check_state)
        return removed, notes, path, skipped

    removed, notes, resume, skipped = on_rank0(prepare)
    if rank == 0:
        log_prepared_run(out_dir, ckpt_dir, removed, notes, skipped, args.resume, resume)
    seed_everything(tc["seed"])

    teacher, distiller, optimizer = build_training(cfg, device)
    student = distiller.student
    loss_fn = build_loss(cfg).to(device)
    train_set, val_set = build_datasets(cfg)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_miou": -1.0, "history": []}
    run_id = None
    if resume:
        ckpt = found["ckpt"] if rank == 0 else load_checkpoint(resume, verify=False)
        state = restore(ckpt, resume, distiller, optimizer, rank)
        run_id = ckpt.get("run_id")
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume, state["step"], state["epoch"],
                    state["batch_in_epoch"])
        del ckpt
    run_id = run_id or new_run_id()

    model = distiller
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            distiller, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=tc["find_unused_parameters"],
        )
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=tc["seed"],
                                 drop_last=tc["drop_last"])
    # own generator: creating a loader iterator must not draw from the global RNG, or a resumed run (which creates
    # its first iterator at another point of the RNG stream) would see different dropout/drop-path masks
    loader = DataLoader(train_set, batch_size=tc["batch_size"], sampler=sampler, drop_last=tc["drop_last"],
                        num_workers=cfg["data"]["num_workers"], generator=torch.Generator().manual_seed(tc["seed"]))
    val_sampler = DistributedSampler(val_set, num_replicas=world, rank=rank, shuffle=False)
    val_loader = DataLoader(val_set, batch_size=tc["val_batch_size"], sampler=val_sampler,
                            num_workers=cfg["data"]["num_workers"], generator=torch.Generator().manual_seed(tc["seed"]))

    meta = run_metadata(world)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out_dir / "config.yaml")

    def save(name: str) -> None:
        gathered = all_gather_object(rng_state())
        if rank == 0:
            save_checkpoint({
                "format": FORMAT, "run_id": run_id, "step": state["step"],
                "model": distiller.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                "rng": gathered, "config": cfg, "student_config": student.config.to_dict(),
                "teacher_config": teacher.teacher.config.to_dict(), "teacher_type": cfg["teacher"]["type"],
                "teacher_channels": teacher.channels, **meta,
            }, ckpt_dir / name)
        barrier()

    max_steps = tc["max_steps"]
    void = cfg["loss"]["void_class"]
    num_labels = student.config.num_labels
    model.train()
    t0, start_step = time.time(), state["step"]
    planned = tc["epochs"] * len(loader) if max_steps is None else min(max_steps, tc["epochs"] * len(loader))
    bar = progress_bar(planned, f"distill ({cfg['kd']['variant']})", initial=state["step"],
                       enabled=rank == 0 and tc["progress_bar"])
    while state["epoch"] < tc["epochs"] and (max_steps is None or state["step"] < max_steps):
        epoch = state["epoch"]
        lr = epoch_lr(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        finished_epoch = True
        for i, batch in enumerate(loader):
            if i < state["batch_in_epoch"]:  # resumed mid-epoch: these batches were already trained on
                continue
            pixels, labels = batch["pixel_values"].to(device), batch["labels"].to(device)
            t_feats, t_embeds = teacher(pixels)
            out = model(pixels)
            loss, parts = loss_fn(out.logits, labels, out.fused_features, t_feats, out.aligned_embeddings, t_embeds)
            if not torch.isfinite(loss):
                last = ckpt_dir / "last.pt"
                raise NonFiniteLossError(
                    f"non-finite loss {loss.item()} at step {state['step']} (epoch {epoch}); terms "
                    f"{ {k2: float(v) for k2, v in parts.items()} }; last good checkpoint: "
                    f"{last if last.exists() else 'none saved yet'}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state["step"] += 1
            state["batch_in_epoch"] = i + 1
            record = {"step": state["step"], "epoch": epoch, "lr": lr, "loss": float(loss.detach()),
                      **{k2: float(v) for k2, v in parts.items()}}
            state["history"].append(record)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{record['loss']:.4f}")
            if rank == 0 and (state["step"] % tc["log_every_steps"] == 0 or state["step"] == 1):
                logger.info("step %d epoch %d lr %.3g loss %.4f ce %.4f hcl %.4f pe %.4f (%.2f s/step)",
                            state["step"], epoch, lr, record["loss"], record["ce"], record["hcl"], record["pe"],
                            (time.time() - t0) / (state["step"] - start_step))
            if tc["checkpoint_every_steps"] and state["step"] % tc["checkpoint_every_steps"] == 0:
                save("last.pt")
            faults.point("step", step=state["step"], rank=rank)  # test hook (training/common/faults.py)
            if max_steps is not None and state["step"] >= max_steps:
                finished_epoch = i + 1 == len(loader)
                break
        if finished_epoch:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            if tc["eval_every_epochs"] and state["epoch"] % tc["eval_every_epochs"] == 0:
                metrics = evaluate(student, val_loader, num_labels, void, cfg["loss"]["ignore_index"], device)
                state.setdefault("evals", []).append({"epoch": state["epoch"], "step": state["step"], **metrics})
                logger.info("epoch %d val mIoU %.4f", state["epoch"], metrics["miou"])
                if metrics["miou"] > state["best_miou"]:  # best epoch selected on val (train_TransKDBase.py:362-393)
                    state["best_miou"] = metrics["miou"]
                    save("best.pt")
        save("last.pt")
    bar.close()
    if rank == 0:
        summary = {"step": state["step"], "epoch": state["epoch"], "best_miou": state["best_miou"],
                   "last_loss": state["history"][-1]["loss"] if state["history"] else None}
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
        best = ckpt_dir / "best.pt"
        export_from = best if best.exists() else ckpt_dir / "last.pt"
        figure = None
        n_fig = min(int(tc["overlay_images"]), len(val_set))
        if n_fig:
            from training.evaluate import write_segmentation_overlays

            student.eval()
            id2label = {int(k): v for k, v in (cfg["student"]["id2label"] or student.config.id2label).items()}
            names = [str(id2label.get(i, i)) for i in range(num_labels)]
            d = cfg["data"]
            figure = write_segmentation_overlays(
                out_dir / "figures" / f"val_overlays_step_{state['step']:08d}.png",
                lambda x: student(x.to(device)).logits, [val_set[i] for i in range(n_fig)],
                title=f"{cfg['name']}: student at step {state['step']} (epoch {state['epoch']}) on the val split "
                      f"({d['dataset']}); labels at {d['label_scale']}x resolution, shown upsampled",
                class_names=names, mean=tuple(d["mean"]) if d["mean"] else None,
                std=tuple(d["std"]) if d["std"] else None, ignore_index=cfg["loss"]["ignore_index"],
                exclude=(void,) if void is not None else ())
            student.train()
        finish(logger, f"{state['step'] - start_step} distillation steps in {time.time() - t0:.1f} s (step "
                       f"{state['step']}, epoch {state['epoch']}, best val mIoU "
                       f"{'n/a' if state['best_miou'] < 0 else format(state['best_miou'], '.4f')}): "
                       f"{ckpt_dir / 'last.pt'}" + (f", {best}" if best.exists() else "")
                       + f", {out_dir / 'summary.json'}, {out_dir / 'config.yaml'}"
                       + (f", {figure.path}" if figure is not None else ""),
               f"python -m training.export_student {export_from} --output-dir {out_dir / 'student'}")
    barrier()
    return state


if __name__ == "__main__":
    sys.exit(main())
