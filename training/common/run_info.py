"""What a run records about itself (code revision, versions, world size), and paths made portable for what an export
publishes.

Exports (model cards, ``distillation.json``, the configuration shown in a card) never carry an absolute local path:
:func:`portable_path` turns a path into one relative to the export's own folder when it lies inside it, or else into
its base name plus the sha256 of the file (or of the ``model.safetensors`` of a model folder).
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path

__all__ = ["git_sha", "portable_config", "portable_path", "run_metadata"]


@functools.lru_cache(maxsize=None)
def git_sha() -> str | None:
    """The commit of the checkout that holds ``training/`` (``+dirty`` when tracked files differ from it), or None
    outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=here).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=here).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata(world_size: int) -> dict:
    """Code revision, library versions and world size: what every checkpoint and resolved config records."""
    import torch
    import transformers

    import openus_hub

    return {
        "git_sha": git_sha(),
        "world_size": int(world_size),
        "versions": {"python": platform.python_version(), "torch": str(torch.__version__),
                     "transformers": str(transformers.__version__),
                     "openus_hub": str(openus_hub.__version__)},
    }


def portable_path(path: str | os.PathLike | None, root: str | os.PathLike | None = None) -> str | None:
    """A description of ``path`` that reveals no local folder: relative to ``root`` if it lies inside it, else the
    base name, with the sha256 of the file (or of a model folder's ``model.safetensors``) when there is one.
    Non-path values (None, a Hub id that is not on disk) come back as they are."""
    if path is None:
        return None
    text = str(path)
    p = Path(text).expanduser()
    if root is not None:
        try:
            return p.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            pass
    if not p.exists():
        # not on this machine: a Hub id ("org/name") or a relative name stays; an absolute path keeps its base name
        return p.name if p.is_absolute() else text
    from conversion._common import sha256_file

    digest = None
    if p.is_file():
        digest = sha256_file(p)
    elif (p / "model.safetensors").is_file():
        digest = sha256_file(p / "model.safetensors")
    name = p.resolve().name
    return f"{name} (sha256 {digest})" if digest else name


def portable_config(cfg: dict, path_keys: Iterable[str], root: str | os.PathLike | None = None) -> dict:
    """A deep copy of ``cfg`` with each dotted key in ``path_keys`` passed through :func:`portable_path`."""
    out = copy.deepcopy(cfg)
    for dotted in path_keys:
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(leaf) is not None:
            node[leaf] = portable_path(node[leaf], root)
    return out
