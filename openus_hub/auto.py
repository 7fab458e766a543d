"""The transformers Auto classes and ``pipeline``, taking every model name openus_hub takes.

``openus_hub.AutoModel.from_pretrained(name)`` first resolves ``name`` with :func:`openus_hub.pretrained.resolve`,
the one resolver of the package (a local folder, then a registry name, then a Hub id), then calls
``transformers.AutoModel.from_pretrained`` on the local folder it returns. So an unpublished registry name raises
:class:`~openus_hub.pretrained.UnpublishedModelError` at once with the command that produces the weights, an unknown
``openus-*``/``transkd-*`` name :class:`~openus_hub.pretrained.UnknownModelError`, and offline (``HF_HUB_OFFLINE``
or the Hub unreachable) a model that is not cached :class:`~openus_hub.pretrained.NotCachedError`, in one line and
without retries. Published registry entries are checked against their sha256 (``verify_sha256=False`` skips that).
"""

from __future__ import annotations

import os
from typing import Any

import transformers

from .pretrained import (  # noqa: F401  (re-exported: the resolver and its errors live in openus_hub.pretrained)
    ChecksumMismatchError,
    ModelNotFoundError,
    NotCachedError,
    resolve,
    sha256_file,
)

__all__ = [
    "AutoBackbone",
    "AutoConfig",
    "AutoImageProcessor",
    "AutoModel",
    "AutoModelForImageClassification",
    "AutoModelForSemanticSegmentation",
    "ChecksumMismatchError",
    "ModelNotFoundError",
    "NotCachedError",
    "pipeline",
    "resolve",
    "sha256_file",
]


def _pop_resolve_kwargs(kwargs: dict) -> dict:
    return {"revision": kwargs.pop("revision", None), "cache_dir": kwargs.get("cache_dir"),
            "verify_sha256": kwargs.pop("verify_sha256", None), "token": kwargs.get("token")}


def _resolved_call(method, name, args, kwargs):
    opts = _pop_resolve_kwargs(kwargs)
    path, entry = resolve(name, **opts)
    if entry is None and opts["revision"] is not None:
        kwargs["revision"] = opts["revision"]  # a pass-through name keeps its revision
    return method(path, *args, **kwargs)


class AutoConfig(transformers.AutoConfig):
    """``transformers.AutoConfig`` that also accepts openus_hub registry names."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        return _resolved_call(super().from_pretrained, pretrained_model_name_or_path, (), kwargs)


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
