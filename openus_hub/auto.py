"""Alias-aware versions of the transformers Auto classes and ``pipeline``.

``openus_hub.AutoModel.from_pretrained("openus-small")`` resolves a registry name (:mod:`openus_hub.pretrained`) to
its Hub repo id and pinned revision, then calls ``transformers.AutoModel.from_pretrained`` on the resolved folder.
Anything that is not a registry name (a local folder, ``org/name``) is passed through unchanged.

Resolution order for a registry name:

1. a local folder with that name (relative to the working directory) wins;
2. the local HF cache (``HF_HUB_CACHE``/``HF_HOME``, read at call time, or ``cache_dir=``): works with
   ``HF_HUB_OFFLINE=1``;
3. the Hub, unless offline.

Unpublished names raise :class:`~openus_hub.pretrained.UnpublishedModelError` (how to convert or train), unknown
``openus-*``/``transkd-*`` names :class:`~openus_hub.pretrained.UnknownModelError`; neither ever loads other weights.
When the entry has a sha256, ``model.safetensors`` is checked against it (``verify_sha256=False`` skips that;
``OPENUS_HUB_VERIFY_SHA256=0`` turns it off globally); a mismatch raises :class:`ChecksumMismatchError`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import transformers

from .pretrained import OpenUSHubError, PretrainedEntry, get_pretrained, is_reserved_name

logger = logging.getLogger(__name__)

__all__ = [
    "AutoBackbone",
    "AutoImageProcessor",
    "AutoModel",
    "AutoModelForImageClassification",
    "AutoModelForSemanticSegmentation",
    "ChecksumMismatchError",
    "NotCachedError",
    "pipeline",
    "resolve",
    "sha256_file",
]

WEIGHTS_NAME = "model.safetensors"
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt"]


class ChecksumMismatchError(OpenUSHubError, OSError):
    """``model.safetensors`` does not have the sha256 the registry records: tampered, truncated or wrong revision."""


class NotCachedError(OpenUSHubError, OSError):
    """Offline, and the pinned revision is not in the local HF cache."""


_HASHES: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (symlinks followed); cached per (real path, size, mtime)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return env or bool(constants.HF_HUB_OFFLINE)


def _cache_dir(explicit: str | None) -> str | None:
    if explicit:
        return str(explicit)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None  # huggingface_hub's default


def _verify(entry: PretrainedEntry, folder: str, verify: bool | None) -> None:
    if verify is None:
        verify = os.environ.get("OPENUS_HUB_VERIFY_SHA256", "1").lower() not in {"0", "false", "no", "off"}
    if not verify or not entry.sha256:
        return
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ChecksumMismatchError(f"{entry.name}: {WEIGHTS_NAME} is missing from {folder}")
    got = sha256_file(path)
    if got != entry.sha256:
        raise ChecksumMismatchError(
            f"{entry.name}: {WEIGHTS_NAME} at {entry.resolved_repo_id}@{entry.revision} has sha256 {got}, the registry "
            f"records {entry.sha256}. The cached file ({os.path.realpath(path)}) is corrupt or was modified: delete "
            "it and download again (or pass verify_sha256=False to load it anyway)."
        )


def resolve(name: str | os.PathLike, *, revision: str | None = None, cache_dir: str | None = None,
            verify_sha256: bool | None = None, token: str | bool | None = None) -> tuple[str, PretrainedEntry | None]:
    """``name`` -> (path or id to hand to transformers, registry entry or None). See the module docstring."""
    name = os.fspath(name)
    if os.path.isdir(name) or "/" in name or os.sep in name:
        return name, None  # local folder or Hub id: unchanged
    try:
        entry = get_pretrained(name)
    except OpenUSHubError:
        if is_reserved_name(name):
            raise
        return name, None  # e.g. a legacy transformers id without an org
    if not entry.published:
        from .pretrained import UnpublishedModelError

        raise UnpublishedModelError(entry.unpublished_message())
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, pinned = entry.resolved_repo_id, entry.revision
    rev = revision or pinned
    cache = _cache_dir(cache_dir)
    try:
        folder = snapshot_download(repo_id, revision=rev, cache_dir=cache, local_files_only=True)
        logger.info("%s -> %s@%s from the local cache %s", name, repo_id, rev, folder)
    except LocalEntryNotFoundError:
        if _offline():
            raise NotCachedError(
                f"{name} -> {repo_id}@{rev} is not in the local HF cache ({cache or 'default location'}) and "
                "HF_HUB_OFFLINE is set. Download it once online, point HF_HUB_CACHE at a cache that has it, or load "
                "a local folder."
            ) from None
        folder = snapshot_download(repo_id, revision=rev, cache_dir=cache, allow_patterns=DOWNLOAD_PATTERNS,
                                   token=token)
        logger.info("%s -> %s@%s downloaded to %s", name, repo_id, rev, folder)
    if rev == pinned:
        _verify(entry, folder, verify_sha256)
    elif verify_sha256:
        raise ChecksumMismatchError(f"{name}: the registry's sha256 is for revision {pinned}, not {rev}")
    return folder, entry


def _pop_resolve_kwargs(kwargs: dict) -> dict:
    return {"revision": kwargs.pop("revision", None), "cache_dir": kwargs.get("cache_dir"),
            "verify_sha256": kwargs.pop("verify_sha256", None), "token": kwargs.get("token")}


def _resolved_call(method, name, args, kwargs):
    opts = _pop_resolve_kwargs(kwargs)
    path, entry = resolve(name, **opts)
    if entry is None and opts["revision"] is not None:
        kwargs["revision"] = opts["revision"]  # a pass-through name keeps its revision
    return method(path, *args, **kwargs)


class AutoModel(transformers.AutoModel):
    """``transformers.AutoModel`` that also accepts openus_hub registry names (e.g. ``"openus-small"``)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        return _resolved_call(super().from_pretrained, pretrained_model_name_or_path, model_args, kwargs)


class AutoBackbone(transformers.AutoBackbone):
    """``transformers.AutoBackbone`` that also accepts openus_hub registry names and local folders.

    transformers 5.24's ``AutoBackbone.from_pretrained`` first asks the Hub whether the name is a repo (to fall back
    to a timm backbone), which raises for a local folder path; a folder loads here as it does with ``AutoModel``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        from transformers.models.auto.auto_factory import _BaseAutoBackboneClass

        def load(path, *args, **kw):
            if os.path.isdir(path):
                return super(_BaseAutoBackboneClass, cls).from_pretrained(path, *args, **kw)
            return super(AutoBackbone, cls).from_pretrained(path, *args, **kw)

        return _resolved_call(load, pretrained_model_name_or_path, model_args, kwargs)


class AutoModelForImageClassification(transformers.AutoModelForImageClassification):
    """``transformers.AutoModelForImageClassification`` that also accepts openus_hub registry names."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        return _resolved_call(super().from_pretrained, pretrained_model_name_or_path, model_args, kwargs)


class AutoModelForSemanticSegmentation(transformers.AutoModelForSemanticSegmentation):
    """``transformers.AutoModelForSemanticSegmentation`` that also accepts openus_hub registry names."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        return _resolved_call(super().from_pretrained, pretrained_model_name_or_path, model_args, kwargs)


class AutoImageProcessor(transformers.AutoImageProcessor):
    """``transformers.AutoImageProcessor`` that also accepts openus_hub registry names."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *inputs, **kwargs):
        return _resolved_call(super().from_pretrained, pretrained_model_name_or_path, inputs, kwargs)


def pipeline(task: str | None = None, model: Any = None, *args: Any, **kwargs: Any):
    """``transformers.pipeline`` with registry names allowed for ``model`` (and ``image_processor``/``config``).

    Without ``task``, a registry name supplies its own (e.g. ``image-feature-extraction`` for OpenUS)."""
    from transformers import pipeline as hf_pipeline

    opts = _pop_resolve_kwargs(kwargs)
    if isinstance(model, (str, os.PathLike)):
        model, entry = resolve(model, **opts)
        if task is None and entry is not None:
            task = entry.task
        if entry is None and opts["revision"] is not None:
            kwargs["revision"] = opts["revision"]
    for key in ("image_processor", "config"):
        if isinstance(kwargs.get(key), (str, os.PathLike)):
            kwargs[key], _ = resolve(kwargs[key], **{**opts, "revision": None})
    return hf_pipeline(task, model, *args, **kwargs)
