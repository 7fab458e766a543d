r"""OpenUS pretraining: self-adaptive masked contrastive learning (upstream main_openus.py), one process or torchrun.

    python -m training.pretrain --config training/configs/debug_cpu.yaml --output-dir runs/debug data.manifest=M
    torchrun --nproc_per_node=4 -m training.pretrain --config training/configs/openus_small_paper.yaml \
        --output-dir runs/paper data.manifest=/data/us308k/manifest.txt
    ... --resume auto   # continue from the newest checkpoint in OUTPUT_DIR/checkpoints that verifies

Configuration: the defaults (training/pretrain.py DEFAULTS = the paper run) <- --config YAML <- key=value overrides;
an unknown key is an error that names it. A manifest of the data (data.manifest) is required: write one with
python -m training.data.datasets FOLDER --output FILE.

OUTPUT_DIR receives config.yaml (resolved), log.jsonl (lr, schedules and every loss term per logged step),
checkpoints/checkpoint_{step:08d}.pth (atomic, weights_only-loadable) each with its checksum file
checkpoint_{step:08d}.pth.sha256 (sha256sum format; run id, step, size), figures/step_*.png with
log.figure_every_steps=N (per global crop: crop | teacher attention on its token grid | mask | masked
reconstruction) and, with log.tensorboard=true, TensorBoard events. A progress bar runs on rank 0; the run ends with
what it wrote and the export command (python -m training.export_pretrained CHECKPOINT --output-dir DIR).

A non-empty OUTPUT_DIR is refused unless --resume or --overwrite is given. --resume auto takes the newest checkpoint
whose sha256 matches its checksum file and that loads, says which newer ones it skipped and why, continues with the
configuration stored in it and drops the log records of the steps it will redo; --resume PATH takes that checkpoint
or stops. --overwrite deletes the files a previous pretraining run wrote there (config.yaml, log.jsonl,
checkpoints/, figures/, tensorboard/) and nothing else: a folder holding other files is refused, naming them.
Old checkpoints are pruned (checkpoint.keep_last, checkpoint.keep_every_steps) among this run's own only.

Exit status: 0 done, 2 bad configuration, output folder or checkpoint (one line on stderr), 3 non-finite loss (the
message names the step, every loss term and the last good checkpoint).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

from openus_hub import OpenUSConfig, OpenUSModel

from .data.augmentations import MultiCropAugmentation
from .data.datasets import PretrainDataset, ResumableDistributedSampler, manifest_summary
from .data.masking import adaptive_mask, mask_scores, mask_schedules
from .losses.ibot_loss import IBOTLoss
from .ssl_meta_arch import (
    OpenUSPretrainNetwork,
    build_teacher,
    cancel_last_layer_gradients,
    clip_gradients,
    ema_update,
    networks_from_upstream,
    param_groups,
)
from .common import distributed as du
from .common import faults
from .common.checkpoint import (CheckpointError, checkpoint_path, finish_interrupted_saves, list_checkpoints,
                                load_checkpoint, load_optimizer_state_strict, load_state_dict_strict, new_run_id,
                                prune_checkpoints, require_parts, save_checkpoint, select_checkpoint, tensor_like)
from .common.config import ConfigError, dump_config, load_config
from .common.errors import EXIT_USAGE, NonFiniteLossError, run_job
from .common.output_dir import (
    PRETRAIN_FILES,
    add_run_arguments,
    keep_log_records,
    log_prepared_run,
    prepare_output_dir,
)
from .common.progress import finish, progress_bar
from .common.rng import seed_everything, step_seed
from .common.run_info import run_metadata
from .common.schedulers import cosine_scheduler

logger = logging.getLogger("training.pretrain")
FORMAT = "openus_hub.pretrain/1"

# Every key with its default = the paper run (upstream main_openus.py arguments as passed by
# submit/submit_slurm_4gpus.sh:29-56), apart from the documented deviations (training/README.md).
DEFAULTS: dict = {
    "model": {
        "preset": "openus-small",  # openus_hub preset; the keys below override it
        "overrides": {},  # e.g. {embed_dim: 8, depths: [1, 1, 1, 2]}
        "init_from": None,  # upstream checkpoint.pth, or a saved openus_hub folder (backbone only)
    },
    "head": {"out_dim": 8192, "patch_out_dim": 8192, "hidden_dim": 2048, "bottleneck_dim": 256, "norm_last_layer": True},
    "data": {
        "manifest": None, "batch_size_per_gpu": 32, "num_workers": 8,
        "global_size": 224, "local_size": 96, "local_crops_number": 8,
        "global_scale": [0.14, 1.0], "local_scale": [0.05, 0.4], "pred_ratio": 0.3,
    },
    "train": {
        "epochs": 151, "max_steps": None, "seed": 42, "lr": 5e-4, "min_lr": 1e-6, "warmup_epochs": 10,
        "weight_decay": 0.04, "weight_decay_end": 0.4, "momentum_teacher": 0.996, "clip_grad": 3.0,
        "freeze_last_layer": 1, "teacher_train_mode": False, "num_threads": None, "deterministic": False,
    },
    "loss": {
        "student_temp": 0.1, "warmup_teacher_temp": 0.04, "teacher_temp": 0.04, "warmup_teacher_patch_temp": 0.04,
        "teacher_patch_temp": 0.07, "warmup_teacher_temp_epochs": 30, "lambda1": 1.0, "lambda2": 1.0,
        "center_momentum": 0.9, "center_momentum2": 0.9,
    },
    "masking": {
        "mask_model": "atten_guided", "student_feedback": True, "masking_ratio": 0.6, "adaptive_weighting": True,
        "alpha_init": 0.1, "alpha_final": 0.9, "alpha_schedule": "cosine", "global_rec_loss": True,
        "local_rec_loss": True,
    },
    "checkpoint": {"every_steps": 1000, "keep_last": 3, "keep_every_steps": None, "every_epoch": True},
    "log": {"every_steps": 10, "figure_every_steps": None, "tensorboard": False, "progress_bar": True},
}

FREE_KEYS = ("model.overrides",)  # fields of OpenUSConfig: checked by the config class itself


def load_pretrain_config(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """``DEFAULTS`` <- YAML <- ``key=value`` overrides; unknown keys are errors (:class:`ConfigError`)."""
    return load_config(path, overrides, defaults=DEFAULTS, free=FREE_KEYS)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_run_arguments(
        p, config_help="YAML file (training/configs/*.yaml); unset keys keep the defaults",
        output_help="run folder (config, log, checkpoints, figures)",
        job="pretraining run", override_example="train.max_steps=2")


# ---------------------------------------------------------------------------------------------------------------------
# building


def build_networks(cfg: dict) -> tuple[OpenUSPretrainNetwork, OpenUSPretrainNetwork, dict, dict | None]:
    """(student, teacher, head_kwargs, upstream iBOT centers or None)."""
    init_from = cfg["model"]["init_from"]
    head_cfg = dict(cfg["head"])
    norm_last_layer = head_cfg.pop("norm_last_layer")
    if init_from and os.path.isfile(init_from):  # upstream pretraining checkpoint: continue it
        from conversion.convert_openus_to_hf import load_checkpoint

        ckpt = load_checkpoint(init_from)
        drop = OpenUSConfig.from_preset(cfg["model"]["preset"]).drop_path_rate if cfg["model"]["preset"] else 0.3
        student, teacher, head_kwargs = networks_from_upstream(
            ckpt, drop_path_rate=cfg["model"]["overrides"].get("drop_path_rate", drop))
        return student, teacher, head_kwargs, ckpt.get("ibot_loss")
    if init_from:  # a saved openus_hub folder: its backbone starts both networks, the heads start fresh
        backbone = OpenUSModel.from_pretrained(init_from)
        config = copy.deepcopy(backbone.config)
        for k, v in cfg["model"]["overrides"].items():
            setattr(config, k, v)
        config.use_mask_token = True
    else:
        preset = cfg["model"]["preset"]
        config = OpenUSConfig.from_preset(preset, **cfg["model"]["overrides"]) if preset else OpenUSConfig(**cfg["model"]["overrides"])
        config.use_mask_token = True
        backbone = None
    head_kwargs = {**head_cfg, "norm_last_layer": norm_last_layer}
    student = OpenUSPretrainNetwork(config, head_kwargs)
    if backbone is not None:
        missing, unexpected = student.backbone.load_state_dict(backbone.state_dict(), strict=False)
        if unexpected or [k for k in missing if k != "embeddings.mask_token"]:
            raise ValueError(f"{init_from}: backbone does not fit ({missing[:5]}, {unexpected[:5]})")
    teacher = build_teacher(student, head_kwargs)
    return student, teacher, head_kwargs, None


def build_training(cfg: dict, device: torch.device = torch.device("cpu")):
    """(student, teacher, head_kwargs, iBOT loss with its centers, AdamW optimiser) of a run, on ``device``."""
    student, teacher, head_kwargs, upstream_centers = build_networks(cfg)
    student.to(device)
    teacher.to(device)
    lcfg = cfg["loss"]
    ibot_loss = IBOTLoss(
        head_kwargs["out_dim"], head_kwargs["patch_out_dim"], 2, int(cfg["data"]["local_crops_number"]),
        lcfg["warmup_teacher_temp"], lcfg["teacher_temp"], lcfg["warmup_teacher_patch_temp"],
        lcfg["teacher_patch_temp"], lcfg["warmup_teacher_temp_epochs"], int(cfg["train"]["epochs"]), lcfg["student_temp"],
        lcfg["center_momentum"], lcfg["center_momentum2"], lcfg["lambda1"], lcfg["lambda2"],
    ).to(device)
    if upstream_centers is not None:
        ibot_loss.load_state_dict(upstream_centers)
    optimizer = torch.optim.AdamW(param_groups(student))
    return student, teacher, head_kwargs, ibot_loss, optimizer


def forward_step(net, teacher, ibot_loss, globals_, locals_, g_masks_ds, l_masks, prev_importance, epoch: int,
                 epochs: int, mcfg: dict, gen: torch.Generator | None):
    """One step of upstream ``train_one_epoch`` (``main_openus.py:505-582``): teacher targets and attention, the
    self-adaptive mask, the student on masked global and local crops, iBOT + reconstruction losses. Returns (total
    loss, loss terms, global masks, normalised teacher attention, the new feedback signal (B, L) for the next step's
    mask)."""
    n_local = 0 if locals_ is None else 1
    alpha, m_t = mask_schedules(epoch, epochs, mcfg["alpha_init"], mcfg["alpha_final"], mcfg["alpha_schedule"],
                                mcfg["adaptive_weighting"])
    t_cls, t_patch, attention = teacher.teacher_forward(globals_)
    grid = g_masks_ds.shape[-2:]
    if mcfg["student_feedback"]:
        scores = mask_scores(attention, prev_importance, alpha)
        g_masks = adaptive_mask(scores, grid, mcfg["masking_ratio"], m_t, gen)
    elif mcfg["mask_model"] == "atten_guided":  # teacher-only guidance (main_openus.py:550-558)
        g_masks = adaptive_mask(attention.mean(1), grid, mcfg["masking_ratio"], 0.001 + 0.899 * epoch / epochs, gen)
    else:
        g_masks = g_masks_ds
    out = net(globals_, g_masks, locals_, l_masks)
    new_prev = out["importance"].mean(1).detach() if mcfg["global_rec_loss"] else None
    s_cls = torch.cat([out["global_cls"], out["local_cls"]]) if n_local else out["global_cls"]
    patch_masks = g_masks if mcfg["mask_model"] == "atten_guided" else g_masks_ds
    terms = ibot_loss(s_cls, out["global_patch"], t_cls, t_patch, patch_masks, epoch)
    loss = terms["loss"]
    if mcfg["global_rec_loss"]:
        loss = loss + out["global_rec"]
        terms["global_rec"] = out["global_rec"]
    if n_local and mcfg["local_rec_loss"]:
        loss = loss + out["local_rec"]
        terms["local_rec"] = out["local_rec"]
    return loss, terms, g_masks, attention, new_prev


# ---------------------------------------------------------------------------------------------------------------------
# resuming

REQUIRED = ("step", "student", "teacher", "optimizer", "ibot_loss", "per_rank", "config")


def check_state(state: dict, path: Path) -> None:
    """A pretraining checkpoint of this code: the right format tag and every part a resume needs."""
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of training.pretrain (format "
                              f"{state.get('format')!r}, expected {FORMAT!r}); pass OUTPUT_DIR/checkpoints/"
                              "checkpoint_*.pth of a pretraining run (upstream checkpoints go in model.init_from)")
    require_parts(state, REQUIRED, path)


def restore(state: dict, path: Path, student, teacher, optimizer, ibot_loss, rank: int, world: int,
            device: torch.device) -> tuple[int, torch.Tensor | None]:
    """Load a checkpoint's networks, optimiser, iBOT centers and this rank's EMA map, feedback signal and RNG state,
    each checked against what it goes into; returns (step, prev_importance). One-line CheckpointError."""
    # the EMA map follows the crop size (ReconstructionImportance re-shapes it on load)
    load_state_dict_strict(student, state["student"], path, "student weights", resizable=("ema_loss_map",))
    load_state_dict_strict(teacher, state["teacher"], path, "teacher weights")
    load_state_dict_strict(ibot_loss, state["ibot_loss"], path, "iBOT centers")
    load_optimizer_state_strict(optimizer, state["optimizer"], path)
    try:
        step = int(state["step"])
        per_rank = list(state["per_rank"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: its step or per-rank state is malformed ({err})") from None
    prev_importance = None
    if len(per_rank) == world:  # the same world size: every rank gets its own EMA map, feedback and RNG back
        mine = per_rank[rank]
        rec = student.recon_importance
        rec.ema_loss_map.copy_(tensor_like(mine["ema_loss_map"], rec.ema_loss_map, path, "EMA loss map"))
        rec.ema_initialized.fill_(bool(mine["ema_initialized"]))
        if mine["prev_importance"] is not None:
            prev = mine["prev_importance"]
            if not isinstance(prev, torch.Tensor) or not prev.is_floating_point() or prev.ndim != 2:
                raise CheckpointError(f"checkpoint {path}: its feedback signal (prev_importance) is not a 2-D float "
                                      "tensor; resume from another checkpoint")
            prev_importance = prev.to(device)
        rng = mine["rng_torch"]
        if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
            raise CheckpointError(f"checkpoint {path}: its RNG state is not a uint8 tensor; resume from another "
                                  "checkpoint")
        torch.set_rng_state(rng)
    else:
        logger.warning("resuming with %d processes instead of %d: per-rank EMA maps restart", world, len(per_rank))
    return step, prev_importance


# ---------------------------------------------------------------------------------------------------------------------
# figures


@torch.no_grad()
def write_figure(path: Path, crops: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor, recon: torch.Tensor,
                 step: int, epoch: int, max_rows: int = 4):
    """Up to ``max_rows`` global crops: crop | teacher attention on the token grid | chosen mask | masked
    reconstruction (``training.common.figures.pretraining_figure``). ``attention``: the teacher's ``(B, L, L)``
    map, min-max normalised over the batch; each token's score is its column mean (upstream ``main_openus.py:523``)."""
    from .common.figures import pretraining_figure
    from .data.augmentations import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    n = min(max_rows, crops.shape[0])
    grid = mask.shape[-2:]

    def rgb(x):  # (n, 3, H, W) normalised -> (n, H, W, 3) in [0, 1]
        return (x[:n].float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    scores = attention[:n].float().mean(1).reshape(n, *grid).cpu().numpy()  # column mean over the queries
    return pretraining_figure(path, rgb(crops), scores, mask[:n].cpu().numpy().astype(bool), rgb(recon), step=step,
                              epoch=epoch)


# ---------------------------------------------------------------------------------------------------------------------
# the run


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        cfg = load_pretrain_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    rank, world, device = du.init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")
    return run_job(lambda: train(cfg, args, rank, world, device), logger)


def train(cfg: dict, args, rank: int, world: int, device: torch.device) -> int:
    out_dir = Path(args.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    tcfg, dcfg, mcfg = cfg["train"], cfg["data"], cfg["masking"]
    if tcfg["num_threads"]:
        torch.set_num_threads(int(tcfg["num_threads"]))
    if tcfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg["log"]["figure_every_steps"]:
        from .common.figures import require_matplotlib

        try:
            require_matplotlib("log.figure_every_steps=null")
        except ImportError as err:
            raise ConfigError(str(err)) from None
    if dcfg["manifest"] is None:
        raise ConfigError("data.manifest is not set: write one with python -m training.data.datasets FOLDER "
                          "--output FILE, then pass data.manifest=FILE")

    # the output folder, interrupted saves and the checkpoint to resume from: decided on rank 0, told to every rank
    found: dict = {}

    def prepare():
        removed = prepare_output_dir(out_dir, PRETRAIN_FILES, resume=bool(args.resume), overwrite=args.overwrite)
        notes = [n for folder in (ckpt_dir, out_dir, out_dir / "figures") for n in finish_interrupted_saves(folder)]
        newest_first = [path for _, path in reversed(list_checkpoints(ckpt_dir))]
        path, found["state"], skipped = select_checkpoint(args.resume, newest_first, check_state)
        return removed, notes, path, skipped

    removed, notes, resume_path, skipped = du.on_rank0(prepare)
    if rank == 0:
        log_prepared_run(out_dir, ckpt_dir, removed, notes, skipped, args.resume, resume_path)
    state = found.get("state") if rank == 0 else (load_checkpoint(resume_path, verify=False) if resume_path else None)
    if state is not None:  # the run continues with the configuration it was started with
        cfg = state["config"]
        tcfg, dcfg, mcfg = cfg["train"], cfg["data"], cfg["masking"]
    run_id = (state.get("run_id") if state is not None else None) or new_run_id()

    seed = int(tcfg["seed"])
    seed_everything(seed)  # identical initialisation on every rank (DDP also broadcasts it)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out_dir / "config.yaml")

    # data
    transform = MultiCropAugmentation(dcfg["global_size"], dcfg["local_size"], dcfg["local_crops_number"],
                                      dcfg["global_scale"], dcfg["local_scale"])
    dataset = PretrainDataset(dcfg["manifest"], transform, seed=seed, pred_ratio=dcfg["pred_ratio"])
    batch = int(dcfg["batch_size_per_gpu"])
    sampler = ResumableDistributedSampler(len(dataset), rank, world, seed, batch)
    niter = sampler.batches_per_epoch()
    if niter == 0:
        raise SystemExit(f"{len(dataset)} samples over {world} process(es) do not fill one batch of {batch}")
    epochs = int(tcfg["epochs"])
    total = epochs * niter
    max_steps = min(total, int(tcfg["max_steps"])) if tcfg["max_steps"] else total

    # networks, loss, optimiser, schedules
    student, teacher, head_kwargs, ibot_loss, optimizer = build_training(cfg, device)
    n_global, n_local = 2, int(dcfg["local_crops_number"])
    f = {k: float(tcfg[k]) for k in ("lr", "min_lr", "weight_decay", "weight_decay_end", "momentum_teacher")}
    lr_sched = cosine_scheduler(f["lr"], f["min_lr"], epochs, niter, warmup_epochs=int(tcfg["warmup_epochs"]))
    wd_sched = cosine_scheduler(f["weight_decay"], f["weight_decay_end"], epochs, niter)
    mom_sched = cosine_scheduler(f["momentum_teacher"], 1.0, epochs, niter)

    step, prev_importance = 0, None
    if state is not None:
        step, prev_importance = restore(state, resume_path, student, teacher, optimizer, ibot_loss, rank, world,
                                        device)
        logger.info("resumed from %s at step %d (run %s)", resume_path, step, run_id)
    if args.resume and rank == 0:  # the steps from here on are redone: their old records go
        dropped = keep_log_records(out_dir / "log.jsonl",
                                   lambda r: isinstance(r.get("step"), int) and r["step"] < step)
        if dropped:
            logger.info("log.jsonl: dropped %d record(s) from step %d on (redone after the resume)", dropped, step)

    net = student
    if du.is_dist():
        # find_unused_parameters as upstream: the out-norms of stages 0-2 never reach the loss
        net = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=True)
    student.train()
    teacher.train(bool(tcfg["teacher_train_mode"]))  # upstream: train mode (DropPath active); default here: eval

    man_summary = manifest_summary(dcfg["manifest"]) if rank == 0 else None
    meta = run_metadata(world) if rank == 0 else None

    def save_run(next_step: int) -> Path | None:
        gathered = du.all_gather_object({
            "ema_loss_map": student.recon_importance.ema_loss_map.detach().cpu(),
            "ema_initialized": bool(student.recon_importance.ema_initialized),
            "prev_importance": prev_importance.detach().cpu() if prev_importance is not None else None,
            "rng_torch": torch.get_rng_state(),
        })
        path = None
        if rank == 0:
            path = checkpoint_path(ckpt_dir, next_step)
            save_checkpoint({
                "format": FORMAT, "step": next_step, "epoch": next_step // niter, "iters_per_epoch": niter,
                "student": student.state_dict(), "teacher": teacher.state_dict(),
                "optimizer": optimizer.state_dict(), "ibot_loss": ibot_loss.state_dict(), "per_rank": gathered,
                "config": cfg, "model_config": student.config.to_dict(), "head_kwargs": head_kwargs,
                "data_manifest": man_summary, "run_id": run_id, **meta,
            }, path)
            prune_checkpoints(ckpt_dir, cfg["checkpoint"]["keep_last"], cfg["checkpoint"]["keep_every_steps"],
                              run_id=run_id, upto_step=next_step)
        du.barrier()
        return path

    tb = None
    if rank == 0 and cfg["log"]["tensorboard"]:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=step if args.resume else None)
        except ImportError:
            logger.warning("log.tensorboard=true but tensorboard is not installed; skipping")
    log_file = open(out_dir / "log.jsonl", "a", encoding="utf-8") if rank == 0 else None
    bar = progress_bar(max_steps, "pretrain", initial=step, enabled=rank == 0 and cfg["log"]["progress_bar"])
    last_good = resume_path

    t0, first_step = time.time(), step
    while step < max_steps:
        epoch, start = divmod(step, niter)
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, start)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True,
                                             num_workers=int(dcfg["num_workers"]), pin_memory=device.type == "cuda",
                                             persistent_workers=False)
        alpha, m_t = mask_schedules(epoch, epochs, mcfg["alpha_init"], mcfg["alpha_final"], mcfg["alpha_schedule"],
                                    mcfg["adaptive_weighting"])
        for crops, masks in loader:
            torch.manual_seed(step_seed(seed, step, rank))  # DropPath and the random mask part: resumable
            gen = torch.Generator().manual_seed(step_seed(seed + 1, step, rank))
            for group in optimizer.param_groups:
                group["lr"] = float(lr_sched[step])
            optimizer.param_groups[0]["weight_decay"] = float(wd_sched[step])

            globals_ = torch.cat(crops[:n_global]).to(device, non_blocking=True)
            locals_ = torch.cat(crops[n_global:]).to(device, non_blocking=True) if n_local else None
            g_masks_ds = torch.cat(masks[:n_global]).to(device)
            l_masks = torch.cat(masks[n_global:]).to(device) if n_local else None

            loss, terms, g_masks, attention, prev_importance = forward_step(
                net, teacher, ibot_loss, globals_, locals_, g_masks_ds, l_masks, prev_importance, epoch, epochs,
                mcfg, gen)
            values = {k: float(v.detach()) for k, v in terms.items() if k != "loss"}
            values["loss"] = float(loss.detach())
            if du.any_true(not math.isfinite(values["loss"]), device):
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} (epoch {epoch}) on rank {rank}: terms {values}; "
                    f"last good checkpoint: {last_good or 'none saved yet'}")

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg["clip_grad"]:
                clip_gradients(student, float(tcfg["clip_grad"]))
            cancel_last_layer_gradients(student, epoch, int(tcfg["freeze_last_layer"]))
            optimizer.step()
            ema_update(student, teacher, float(mom_sched[step]))

            if rank == 0:
                record = {"step": step, "epoch": epoch, "lr": float(lr_sched[step]), "wd": float(wd_sched[step]),
                          "momentum": float(mom_sched[step]), "alpha": alpha, "m_t": m_t, **values}
                if step % int(cfg["log"]["every_steps"]) == 0 or step + 1 == max_steps:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    if tb is not None:
                        for k, v in record.items():
                            tb.add_scalar(f"train/{k}", v, step)
                bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()})
                bar.update(1)
                every_fig = cfg["log"]["figure_every_steps"]
                if every_fig and (step % int(every_fig) == 0 or step + 1 == max_steps):
                    with torch.random.fork_rng(devices=[]), torch.no_grad():
                        student.eval()
                        _, last_map, _ = student.encode(globals_, g_masks)
                        recon = student.decoder(last_map)
                        student.train()
                    write_figure(out_dir / "figures" / f"step_{step:08d}.png", globals_, attention, g_masks, recon,
                                 step, epoch)
            step += 1
            ck = cfg["checkpoint"]
            epoch_end = step % niter == 0 and ck["every_epoch"]
            if (ck["every_steps"] and step % int(ck["every_steps"]) == 0) or epoch_end or step == max_steps:
                path = save_run(step)
                if rank == 0:
                    last_good = path
                    logger.info("step %d: checkpoint %s", step, path)
            faults.point("step", step=step, rank=rank)  # test hook (training/common/faults.py)
            if step >= max_steps:
                break
    bar.close()
    if log_file is not None:
        log_file.close()
    if tb is not None:
        tb.close()
    if rank == 0:
        figures = out_dir / "figures"
        finish(logger, f"{step - first_step} pretraining steps (to step {step}) in {time.time() - t0:.1f} s: "
                       f"checkpoint {last_good}, "
                       f"{out_dir / 'log.jsonl'}, {out_dir / 'config.yaml'}"
                       + (f", figures in {figures}" if figures.is_dir() else ""),
               f"python -m training.export_pretrained {last_good} --output-dir {out_dir / 'exported'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
