"""The output folder of a training job: which files a run writes there, and what happens when it is not empty.

A job refuses a non-empty ``--output-dir`` unless it is given

* ``--resume auto|PATH``: continue the run whose files are there (nothing is deleted), or
* ``--overwrite``: start afresh. The files a previous run of the same job wrote (recognised by their names and
  places: :class:`RunFiles`) are deleted, one by one, and nothing else. A folder that also holds anything else (a
  file or folder the job does not write, a symlink, an export made from the run) is refused, naming what is there.

The check runs before anything is written, so a refused run leaves the folder as it was.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import TEMP_PATTERN, atomic_write_text
from .config import ConfigError

__all__ = ["DISTILL_FILES", "DOWNSTREAM_FILES", "PRETRAIN_FILES", "QUICKSTART_FILES", "RunFiles",
           "add_run_arguments", "keep_log_records", "log_prepared_run", "prepare_output_dir"]

logger = logging.getLogger(__name__)

_CKPT = ("checkpoints/checkpoint_*.pth", "checkpoints/checkpoint_*.pth.sha256")


def _model(folder: str) -> tuple[str, ...]:
    """save_pretrained of an OpenUS model into ``folder``: weights, configs, card and the modeling sources copied
    beside it for trust_remote_code."""
    return tuple(f"{folder}/{name}" for name in (
        "config.json", "preprocessor_config.json", "model.safetensors", "model-*-of-*.safetensors",
        "model.safetensors.index.json", "README.md", "*.py", "csrc/*"))


@dataclass(frozen=True)
class RunFiles:
    """What one job writes into its ``--output-dir``: file patterns (relative paths, ``*`` within one path part)
    and the sub-folders it creates. Temporary files of an interrupted atomic write (``.NAME.tmp-PID-XXXXXXXX``) in
    any of these places are the job's too."""

    job: str
    files: tuple[str, ...]
    folders: tuple[str, ...]
    resumable: bool = True  # the job takes --resume

    def owns(self, rel: str) -> bool:
        parts = rel.split("/")
        folder = "/".join(parts[:-1])
        if TEMP_PATTERN.match(parts[-1]) and (folder == "" or folder in self.folders):
            return True
        for pattern in self.files:
            pp = pattern.split("/")
            if len(pp) == len(parts) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pp)):
                return True
        return False


PRETRAIN_FILES = RunFiles("training.pretrain",
                          ("config.yaml", "log.jsonl", *_CKPT, "figures/step_*.png",
                           "tensorboard/events.out.tfevents.*"),
                          ("checkpoints", "figures", "tensorboard"))
DISTILL_FILES = RunFiles("training.distill",
                         ("config.yaml", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt",
                          "checkpoints/last.pt.sha256", "checkpoints/best.pt.sha256",
                          "figures/val_overlays_step_*.png"),
                         ("checkpoints", "figures"))
DOWNSTREAM_FILES = RunFiles("training.linear_probe / training.finetune_segmentation",
                            ("config.yaml", "log.jsonl", "eval_test.json", "export_card.json", *_CKPT,
                             "figures/test_overlays.png", *_model("model")),
                            ("checkpoints", "figures", "model", "model/csrc"))
# the quickstart: frames + manifest, a pretraining run in run/, its export, the similarity figure and the embeddings
# file its closing line suggests writing there
QUICKSTART_FILES = RunFiles("training.quickstart",
                            ("manifest.txt", "frame_similarity.png", "embeddings.npz", "frames/frame_*.png",
                             *(f"run/{p}" for p in PRETRAIN_FILES.files), *_model("exported")),
                            ("frames", "run", *(f"run/{d}" for d in PRETRAIN_FILES.folders), "exported",
                             "exported/csrc"),
                            resumable=False)


def _entries(folder: Path) -> tuple[list[str], list[str]]:
    """(files, folders) under ``folder``, relative POSIX paths; symlinks are listed as files and never followed."""
    files, dirs = [], []
    for root, subdirs, names in os.walk(folder, followlinks=False):
        rel_root = Path(root).relative_to(folder)
        for d in list(subdirs):
            p = Path(root) / d
            rel = (rel_root / d).as_posix()
            if p.is_symlink():
                files.append(rel)
                subdirs.remove(d)
            else:
                dirs.append(rel)
        files += [(rel_root / n).as_posix() for n in names]
    return sorted(files), sorted(dirs)


def _shown(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def prepare_output_dir(out_dir: str | Path, layout: RunFiles, *, resume: bool, overwrite: bool) -> list[str]:
    """Apply the module's rule to ``out_dir`` before a job writes anything; returns the files deleted (relative
    paths). Raises a one-line :class:`ConfigError` naming the folder and the fix."""
    out_dir = Path(out_dir)
    if resume and overwrite:  # (only resumable jobs pass resume=True)
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run in "
                          f"{out_dir}, --overwrite replaces it; pass one of them")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--output-dir {out_dir} exists and is not a folder; choose another path")
    if resume or not out_dir.is_dir() or not any(out_dir.iterdir()):
        return []
    files, dirs = _entries(out_dir)
    foreign = [f for f in files if not layout.owns(f) or (out_dir / f).is_symlink()]
    foreign += [d + "/" for d in dirs if d not in layout.folders]
    foreign = sorted(set(foreign))
    if not overwrite:
        ours = [f for f in files if f not in foreign]
        holds = _shown(ours + foreign)
        if not ours:
            raise ConfigError(f"--output-dir {out_dir} is not empty (it holds {holds}) and holds no files of "
                              f"{layout.job}: choose a new or empty folder")
        resume_hint = "--resume auto to continue the run there, " if layout.resumable else ""
        raise ConfigError(f"--output-dir {out_dir} is not empty (it holds {holds}): pass {resume_hint}--overwrite to "
                          "replace a previous run's files, or choose a new folder")
    if foreign:
        raise ConfigError(f"--output-dir {out_dir} holds files that {layout.job} does not write ({_shown(foreign)}); "
                          "--overwrite replaces only a previous run's files: move those away or choose a new folder")
    for rel in files:
        (out_dir / rel).unlink(missing_ok=True)
    for rel in sorted(dirs, key=lambda d: -d.count("/")):  # deepest first; only the job's own, only when empty
        try:
            (out_dir / rel).rmdir()
        except OSError:
            pass
    return files


RESUME_NEWEST_HELP = ("'auto': the newest checkpoint in OUTPUT_DIR/checkpoints that verifies against its sha256 and "
                      "loads (none there: start afresh); or a checkpoint path")


def add_run_arguments(parser: argparse.ArgumentParser, *, config_help: str, output_help: str, job: str,
                      override_example: str, resume_help: str = RESUME_NEWEST_HELP,
                      config_required: bool = False) -> argparse.ArgumentParser:
    """The arguments every resumable training job takes: ``--config``, ``--output-dir``, ``--resume`` (by default
    the newest checkpoint that verifies), ``--overwrite`` and ``key=value`` overrides."""
    parser.add_argument("--config", required=config_required, help=config_help)
    parser.add_argument("--output-dir", required=True, help=output_help)
    parser.add_argument("--resume", default=None, help=resume_help)
    parser.add_argument("--overwrite", action="store_true",
                        help=f"start afresh in a non-empty OUTPUT_DIR: delete a previous {job}'s files there "
                             "(nothing else; refused if the folder holds other files)")
    parser.add_argument("overrides", nargs="*", help=f"key=value config overrides, e.g. {override_example}")
    return parser


def log_prepared_run(out_dir: Path, ckpt_dir: Path, removed: list[str], notes: list[str], skipped: list[str],
                     resume_arg: str | None, resume_from) -> None:
    """Rank 0 reports what preparing the run folder did: files ``--overwrite`` deleted, interrupted saves finished or
    rolled back, checkpoints ``--resume auto`` skipped, and a fresh start when it found none."""
    if removed:
        logger.info("--overwrite: deleted %d file(s) of the previous run in %s", len(removed), out_dir)
    for line in notes:
        logger.info("%s: %s", ckpt_dir, line)
    for line in skipped:
        logger.warning("--resume auto: skipped %s", line)
    if resume_arg == "auto" and resume_from is None:
        logger.info("--resume auto: no checkpoint in %s, starting from scratch", ckpt_dir)


def keep_log_records(path: str | Path, keep: Callable[[dict], bool]) -> int:
    """Rewrite the JSON-lines log ``path`` (atomically) with only the records ``keep`` accepts, and without a line
    cut short by a killed process; returns the number dropped. A resumed run calls it with "before the step I resume
    from", so the log holds each step once, as an uninterrupted run's would."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += bool(line.strip())
            continue
        if isinstance(record, dict) and keep(record):
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped
