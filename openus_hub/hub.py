"""``openus-hub push DIR --repo-id ORG/NAME``: check a model folder, then publish it in one commit.

Checks, all before anything is sent (and also with ``--dry-run``, which sends nothing):

* the folder loads with the transformers Auto classes (no missing or unexpected weights);
* weights are safetensors only: ``.bin/.pt/.pth/.pkl/.ckpt/...`` pickles are refused;
* no DICOM or image/video file that could hold patient data (by extension, and any file with the DICOM ``DICM``
  preamble whatever its name);
* ``README.md`` exists, parses with ``huggingface_hub.ModelCard`` and sets a licence.

Publishing uses ``huggingface_hub``: ``create_repo(exist_ok=True)``, ``create_branch`` for ``--revision`` (unless
``--create-pr``), then one ``create_commit`` holding exactly the checked files (the list ``--dry-run`` prints).
The token comes from ``HF_TOKEN`` (or a stored ``hf auth login``); the endpoint from ``HF_ENDPOINT``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["PushError", "add_push_subcommand", "check_folder", "push", "push_main"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pth.tar", ".pkl", ".pickle", ".ckpt", ".tar", ".h5", ".msgpack",
                   ".joblib", ".npy", ".npz", ".onnx")
PATIENT_DATA_SUFFIXES = (".dcm", ".dicom", ".ima", ".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".png", ".jpg",
                         ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".avi", ".mp4", ".mov", ".mkv")
SKIPPED_DIRS = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}


class PushError(RuntimeError):
    """A folder that must not be published, or a Hub error explained."""


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _files(folder: Path) -> list[Path]:
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                out.append(Path(root, name).relative_to(folder))
    return out


def _check_loads(folder: Path) -> str | None:
    import transformers

    from . import models

    assert models  # importing it registers the OpenUS classes with the Auto classes

    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except Exception as err:
        return f"config.json does not load with AutoConfig ({type(err).__name__}: {str(err)[:200]})"
    from .auto import AutoBackbone  # transformers 5.24's AutoBackbone refuses local folders

    arch = (getattr(config, "architectures", None) or [""])[0]
    auto = transformers.AutoModel
    for suffix, cls in (("ForSemanticSegmentation", transformers.AutoModelForSemanticSegmentation),
                        ("ForImageClassification", transformers.AutoModelForImageClassification),
                        ("Backbone", AutoBackbone)):
        if arch.endswith(suffix):
            auto = cls
    try:
        _, info = auto.from_pretrained(folder, output_loading_info=True)
    except Exception as err:
        return f"the folder does not load with {auto.__name__} ({type(err).__name__}: {str(err)[:200]})"
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        return f"{auto.__name__} loads it with problems: {({k: sorted(v)[:5] for k, v in bad.items()})}"
    return None


def check_folder(folder: str | os.PathLike, load: bool = True) -> list[Path]:
    """The files to upload (relative paths); :class:`PushError` listing every problem otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder} is not a folder")
    files = _files(folder)
    problems = []
    for rel in files:
        name = rel.name.lower()
        if name.endswith(PICKLE_SUFFIXES):
            problems.append(f"{rel}: pickle-based weights are not published; convert to safetensors "
                            "(save_pretrained writes model.safetensors) and remove it")
        elif name.endswith(PATIENT_DATA_SUFFIXES):
            problems.append(f"{rel}: DICOM/image/video files can hold patient data and are never uploaded; remove it")
        elif _is_dicom(folder / rel):
            problems.append(f"{rel}: is a DICOM file (DICM preamble) and can hold patient data; remove it")
    names = {str(r) for r in files}
    if "config.json" not in names:
        problems.append("config.json is missing: save the model with save_pretrained")
    if not any(n.endswith(".safetensors") for n in names):
        problems.append("no .safetensors weights")
    readme = folder / "README.md"
    if not readme.is_file():
        problems.append("README.md (the model card) is missing: write it with conversion/model_card.py")
    else:
        from huggingface_hub import ModelCard

        try:
            card = ModelCard.load(readme)
        except Exception as err:
            problems.append(f"README.md does not parse as a model card ({type(err).__name__}: {str(err)[:200]})")
        else:
            if not card.data.get("license"):
                problems.append("README.md sets no licence (front matter `license:`)")
    if load and not problems:
        failure = _check_loads(folder)
        if failure:
            problems.append(failure)
    if problems:
        raise PushError(f"refusing to push {folder}:\n  - " + "\n  - ".join(problems))
    return files


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return env or bool(constants.HF_HUB_OFFLINE)


def _explain(err: Exception, repo_id: str) -> PushError:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return PushError("offline mode is enabled (HF_HUB_OFFLINE): unset it to push")
    status = getattr(getattr(err, "response", None), "status_code", None) if isinstance(err, HfHubHTTPError) else None
    if status == 401:
        return PushError(f"the Hub rejected the token (401 Unauthorized) for {repo_id}: check HF_TOKEN")
    if status == 403:
        return PushError(f"the token may not write to {repo_id} (403 Forbidden): use a write token that belongs to "
                         f"'{repo_id.split('/')[0]}' or a member of it")
    if status == 404:
        return PushError(f"not found (404) while pushing to {repo_id}: the repo or the --revision branch does not "
                         "exist, or the token cannot see it")
    return PushError(f"push to {repo_id} failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}")


def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         create_pr: bool = False, dry_run: bool = False, commit_message: str | None = None,
         token: str | None = None) -> dict:
    """Check ``folder`` and publish it as one commit. Returns ``{"files": [...], "commit_url": ..., ...}``."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PushError(f"--repo-id must be ORG/NAME, got {repo_id!r}")
    folder = Path(folder)
    files = check_folder(folder)
    result = {"repo_id": repo_id, "files": [str(f) for f in files],
              "sizes": {str(f): (folder / f).stat().st_size for f in files}, "dry_run": dry_run}
    if dry_run:
        return result
    if _offline():
        raise PushError("offline mode is enabled (HF_HUB_OFFLINE=1): unset it to push, or use --dry-run")
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise PushError("no Hub token: set HF_TOKEN to a write token (or run `hf auth login`)")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or constants.ENDPOINT, token=token)
    ops = [CommitOperationAdd(path_in_repo=f.as_posix(), path_or_fileobj=str(folder / f)) for f in files]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations=ops, commit_message=commit_message or f"Upload {folder.name} "
                                 "with openus-hub push", revision=revision, create_pr=create_pr)
    except Exception as err:
        raise _explain(err, repo_id) from err
    result.update(commit_url=info.commit_url, oid=info.oid, pr_url=info.pr_url)
    return result


def _run(args: argparse.Namespace) -> int:
    try:
        result = push(args.folder, args.repo_id, private=args.private, revision=args.revision,
                      create_pr=args.create_pr, dry_run=args.dry_run, commit_message=args.message)
    except PushError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    total = sum(result["sizes"].values())
    verb = "would upload" if result["dry_run"] else "uploaded"
    print(f"openus-hub push: {verb} {len(result['files'])} file(s), {total:,} bytes, to {result['repo_id']}"
          + ("" if result["dry_run"] else f" in one commit: {result['commit_url']}"))
    for f in result["files"]:
        print(f"  {f}\t{result['sizes'][f]:,}")
    if result.get("pr_url"):
        print(f"pull request: {result['pr_url']}")
    return 0


def add_push_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register ``push`` on an ``add_subparsers()`` object (used by ``openus_hub.cli``)."""
    p = subparsers.add_parser(
        "push", help="check a model folder and publish it to the Hugging Face Hub in one commit",
        description="Check a model folder (loads with the Auto classes; safetensors only; no DICOM, image or video "
        "files; README.md model card with a licence) and publish exactly its files in one commit. HF_TOKEN and "
        "HF_ENDPOINT come from the environment. Exit codes: 0 pushed (or dry run passed), 2 refused or failed.",
    )
    p.add_argument("folder", help="model folder (save_pretrained output with README.md)")
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing directly")
    p.add_argument("--dry-run", action="store_true", help="run every check and list the files; upload nothing")
    p.add_argument("--message", default=None, help="commit message")
    p.set_defaults(func=_run)
    return p


def push_main(argv: Sequence[str] | None = None) -> int:
    """``push`` on its own: ``python -m openus_hub.hub DIR --repo-id ORG/NAME ...``."""
    parser = argparse.ArgumentParser(prog="openus-hub")
    add_push_subcommand(parser.add_subparsers(dest="command", required=True))
    return _run(parser.parse_args(["push", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(push_main())
