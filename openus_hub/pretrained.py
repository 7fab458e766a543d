"""Model names of openus_hub: the registry of named checkpoints and :func:`resolve`, the one resolver every entry
point uses (the Auto classes, ``pipeline``, ``extract_features``, ``openus-hub embed/push/export-onnx``, the
converters' ``--card-name`` and timm's ``pretrained=True``). It also holds the upstream commit pins and the offline
check (:func:`hub_offline`).

The registry is one plain table, in the spirit of timm's ``pretrained_cfg`` and open_clip's ``pretrained.py``.

Each entry names a Hub repo and a pinned revision, the sha256 of its ``model.safetensors``, where the weights come
from (upstream repo + commit, or our training config), the licence, task, input size and a status:

* ``"published"``: weights are on the Hub at ``repo_id@revision``; :func:`resolve` fetches them (the HF cache first,
  then the Hub) and checks the sha256.
* ``"convert from upstream"``: the architecture exists upstream with trained weights that are not (yet) on the Hub;
  loading the name raises :class:`UnpublishedModelError` with the conversion command.
* ``"train yourself"``: no trained weights exist; the error names the training recipe.

No OpenUS weights are published today (upstream OpenUS has not released them, XZheng0427/OpenUS issue #4), so every
built-in entry is unpublished. Published entries are added by :func:`register_pretrained` or by a JSON file named in
``OPENUS_HUB_REGISTRY`` (a list of entry objects, or ``{name: fields}``; it overrides built-ins of the same name):

    [{"name": "openus-small", "repo_id": "my-lab/openus-small", "revision": "<40-hex commit>",
      "sha256": "<sha256 of model.safetensors>", "status": "published"}]

Missing fields are taken from the built-in entry of the same name. ``{org}`` in a repo id is replaced by
``OPENUS_HUB_ORG`` (default ``openus-hub``) when it is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field

from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

logger = logging.getLogger(__name__)

__all__ = [
    "ChecksumMismatchError",
    "DEFAULT_ORG",
    "ModelNotFoundError",
    "NotCachedError",
    "OPENUS_UPSTREAM",
    "OPENUS_UPSTREAM_COMMIT",
    "OpenUSHubError",
    "PretrainedEntry",
    "STATUSES",
    "UnknownModelError",
    "UnpublishedModelError",
    "get_pretrained",
    "hub_org",
    "list_models",
    "list_pretrained",
    "hub_offline",
    "register_pretrained",
    "reset_registry",
    "resolve",
    "sha256_file",
    "TRANSKD_UPSTREAM",
    "TRANSKD_UPSTREAM_COMMIT",
    "unregister_pretrained",
]

DEFAULT_ORG = "openus-hub"
STATUSES = ("published", "convert from upstream", "train yourself")
OPENUS_UPSTREAM = "XZheng0427/OpenUS"
OPENUS_UPSTREAM_COMMIT = "6b9f6d2e71e7150b138001e1a24c36cab8e960ed"
TRANSKD_UPSTREAM = "RuipingL/TransKD"
TRANSKD_UPSTREAM_COMMIT = "39ab795d37d32bf2638acf9a384754cd25f7fd98"
# names in these namespaces never fall through to transformers: a typo is an error, not a random Hub model
RESERVED_PREFIXES = ("openus-", "openus_", "transkd-")


class OpenUSHubError(Exception):
    """Base class of the registry and resolution errors."""


class UnknownModelError(OpenUSHubError, ValueError):
    """A name in openus_hub's namespace (``openus-*``, ``transkd-*``) that the registry does not know."""


class UnpublishedModelError(OpenUSHubError, LookupError):
    """A registry name with no published weights; the message says how to produce them."""


def hub_org() -> str:
    """The Hub organisation of built-in entries: ``OPENUS_HUB_ORG``, default ``openus-hub``."""
    return os.environ.get("OPENUS_HUB_ORG") or DEFAULT_ORG


@dataclass(frozen=True)
class PretrainedEntry:
    """One named checkpoint. ``repo_id`` may contain ``{org}`` (see :func:`hub_org`)."""

    name: str
    repo_id: str
    status: str
    task: str  # a transformers pipeline tag
    architecture: str  # the class a saved folder holds (config.json "architectures")
    license: str  # Hub licence id (e.g. "cc-by-nc-4.0", "other")
    source: str  # upstream repo + commit, or our training config
    input_size: tuple[int, int, int] = (3, 224, 224)
    revision: str | None = None  # a pinned commit (40 hex) for published entries
    sha256: str | None = None  # of model.safetensors at that revision
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    how_to_get: str = ""  # for unpublished entries: the command that produces the weights
    card: str | None = None  # metadata file under model_cards/ (repo only, not shipped in the wheel)
    description: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"{self.name}: status must be one of {STATUSES}, got {self.status!r}")
        if self.status == "published":
            if not self.revision:
                raise ValueError(f"{self.name}: a published entry needs a pinned revision")
            if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
                raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits")

    @property
    def resolved_repo_id(self) -> str:
        return self.repo_id.replace("{org}", hub_org())

    @property
    def published(self) -> bool:
        return self.status == "published"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["repo_id"] = self.resolved_repo_id
        return d

    def unpublished_message(self) -> str:
        """One line: what the entry is, the command that produces its weights, and how to load or publish them."""
        what = "convert the upstream checkpoint" if self.status == "convert from upstream" else "train it yourself"
        return (
            f"'{self.name}' has no published weights (status: {self.status}); {what}: {self.how_to_get}; then load "
            "the output folder by its path, or publish it and register it with status 'published', a pinned revision "
            "and its sha256 (openus_hub.register_pretrained or OPENUS_HUB_REGISTRY). openus_hub never substitutes "
            "other weights."
        )


_OPENUS_CONVERT = (
    "python conversion/convert_openus_to_hf.py --checkpoint checkpoint0100.pth --output-dir {name} "
    "(upstream has not released the weights yet, XZheng0427/OpenUS issue #4)"
)
_OPENUS_MEAN, _OPENUS_STD = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)  # upstream's normalisation


def _openus(name: str, status: str, description: str, how: str) -> PretrainedEntry:
    return PretrainedEntry(
        name=name, repo_id="{org}/" + name, status=status, task="image-feature-extraction",
        architecture="OpenUSBackbone", license="cc-by-nc-4.0",
        source=f"{OPENUS_UPSTREAM}@{OPENUS_UPSTREAM_COMMIT}" if status != "train yourself"
        else f"openus_hub OpenUSConfig.from_preset('{name}'), pretrained with the OpenUS recipe",
        input_size=(3, 224, 224), mean=_OPENUS_MEAN, std=_OPENUS_STD, how_to_get=how.format(name=name),
        card=f"{name}.json", description=description,
    )


def _transkd(name: str, variant: str, description: str, architecture: str = "SegformerForSemanticSegmentation"
             ) -> PretrainedEntry:
    upstream_file = {"b2": "segformerb2_teacher_cityscapes.pth",
                     "transkd-base": "segformerb0_TransKDBase_cityscapes.pth",
                     "transkd-gl": "segformerb0_TransKD_GL_cityscapes.pth",
                     "transkd-ea": "segformerb0_TransKD_EA_cityscapes.pth"}[variant]
    return PretrainedEntry(
        name=name, repo_id="{org}/" + name, status="convert from upstream", task="image-segmentation",
        architecture=architecture, license="other", source=f"{TRANSKD_UPSTREAM}@{TRANSKD_UPSTREAM_COMMIT}",
        input_size=(3, 512, 1024), mean=None, std=None,
        how_to_get=(f"python conversion/convert_transkd_to_hf.py --checkpoint {upstream_file} --variant {variant} "
                    f"--output-dir {name} (weights: the TransKD README's Google Drive folder)"),
        card=f"{name}.json", description=description,
    )


def _builtin_entries() -> list[PretrainedEntry]:
    return [
        _openus("openus-tiny", "train yourself",
                "OpenUS VMamba-T backbone (depths 2-2-8-2, width 96); no upstream weights exist",
                "OpenUSModel(OpenUSConfig.from_preset('openus-tiny')), pretrain with the OpenUS recipe (upstream "
                "main_openus.py), then convert: python conversion/convert_openus_to_hf.py --checkpoint "
                "checkpoint.pth --output-dir openus-tiny"),
        _openus("openus-small", "convert from upstream",
                "OpenUS VMamba-S backbone (depths 2-2-15-2, width 96), the paper's model", _OPENUS_CONVERT),
        _openus("openus-base", "convert from upstream",
                "OpenUS VMamba-B backbone (depths 2-2-15-2, width 128)", _OPENUS_CONVERT),
        _transkd("transkd-b2-teacher-cityscapes", "b2", "SegFormer-B2 teacher of TransKD, Cityscapes (20 classes)"),
        _transkd("transkd-base-b0-cityscapes", "transkd-base", "SegFormer-B0 student distilled with TransKD-Base"),
        _transkd("transkd-gl-b0-cityscapes", "transkd-gl", "SegFormer-B0 student distilled with TransKD-GL"),
        _transkd("transkd-ea-b0-cityscapes", "transkd-ea", "SegFormer-B0 student distilled with TransKD-EA"),
    ]


_REGISTRY: dict[str, PretrainedEntry] | None = None


def _coerce(fields: dict, base: PretrainedEntry | None) -> PretrainedEntry:
    names = {f.name for f in dataclasses.fields(PretrainedEntry)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"registry entry {fields.get('name')!r}: unknown field(s) {unknown}; known: {sorted(names)}")
    merged = dataclasses.asdict(base) if base is not None else {}
    merged.update(fields)
    for key in ("input_size", "mean", "std"):
        if merged.get(key) is not None:
            merged[key] = tuple(merged[key])
    return PretrainedEntry(**merged)


def _load_registry_file(path: str, registry: dict[str, PretrainedEntry]) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise OpenUSHubError(f"OPENUS_HUB_REGISTRY={path}: cannot read it as JSON ({err})") from None
    items = [{"name": k, **v} for k, v in data.items()] if isinstance(data, dict) else data
    if not isinstance(items, list) or not all(isinstance(i, dict) and "name" in i for i in items):
        raise OpenUSHubError(f"OPENUS_HUB_REGISTRY={path}: expected a list of entries with a 'name', "
                             "or {name: {...}}")
    for item in items:
        registry[item["name"]] = _coerce(item, registry.get(item["name"]))


def _registry() -> dict[str, PretrainedEntry]:
    global _REGISTRY
    if _REGISTRY is None:
        registry = {e.name: e for e in _builtin_entries()}
        path = os.environ.get("OPENUS_HUB_REGISTRY")
        if path:
            _load_registry_file(path, registry)
        _REGISTRY = registry
    return _REGISTRY


def reset_registry() -> None:
    """Forget added entries; the next access rebuilds the built-ins plus ``OPENUS_HUB_REGISTRY`` (re-read)."""
    global _REGISTRY
    _REGISTRY = None


def register_pretrained(entry: PretrainedEntry | dict, overwrite: bool = False) -> PretrainedEntry | None:
    """Add an entry (or fields dict; missing fields come from the entry of the same name). Returns the replaced
    entry, if any. Replacing needs ``overwrite=True``."""
    registry = _registry()
    if isinstance(entry, dict):
        entry = _coerce(entry, registry.get(entry.get("name")))
    old = registry.get(entry.name)
    if old is not None and not overwrite:
        raise ValueError(f"'{entry.name}' is already registered; pass overwrite=True to replace it")
    registry[entry.name] = entry
    return old


def unregister_pretrained(name: str) -> PretrainedEntry | None:
    return _registry().pop(name, None)


def is_reserved_name(name: str) -> bool:
    return "/" not in name and name.lower().startswith(RESERVED_PREFIXES)


def get_pretrained(name: str) -> PretrainedEntry:
    """The entry for ``name``; :class:`UnknownModelError` (with close matches) when there is none."""
    registry = _registry()
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, list(registry), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownModelError(
        f"unknown openus_hub model {name!r}.{hint} openus_hub.list_models() lists the {len(registry)} known names; "
        "a local folder or a Hub id 'org/name' loads as such."
    )


def list_models(pattern: str = "*", status: str | None = None, published_only: bool = False) -> list[str]:
    """Sorted registry names matching a wildcard ``pattern`` (fnmatch, case-insensitive), e.g. ``"openus-*"``."""
    names = []
    for name, entry in _registry().items():
        if not fnmatch.fnmatch(name.lower(), pattern.lower()):
            continue
        if (status is not None and entry.status != status) or (published_only and not entry.published):
            continue
        names.append(name)
    return sorted(names)


def list_pretrained(pattern: str = "*") -> list[PretrainedEntry]:
    """The entries behind :func:`list_models`, for tables and cards."""
    return [_registry()[n] for n in list_models(pattern)]


# ------------------------------------------------------------------------------------------------ resolving names
class ModelNotFoundError(OpenUSHubError, FileNotFoundError):
    """A model path that is no folder (missing, or a file), or a Hub id the Hub does not have."""


class NotCachedError(OpenUSHubError, OSError):
    """Offline (``HF_HUB_OFFLINE``) or the Hub unreachable, and the model is not in the local HF cache."""


class ChecksumMismatchError(OpenUSHubError, OSError):
    """``model.safetensors`` does not have the sha256 the registry records: tampered, truncated or wrong revision."""


WEIGHTS_NAME = "model.safetensors"
# what a model folder consists of; never pickles (``*.bin``, ``*.pth``), which openus_hub does not load
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt"]
_HASHES: dict[tuple[str, int, int], str] = {}


def hub_offline() -> bool:
    """Whether huggingface_hub is offline: ``HF_HUB_OFFLINE`` read now (set after import, too) or at its import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return env or bool(constants.HF_HUB_OFFLINE)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20, *, cached: bool = True) -> str:
    """sha256 of a file's bytes (symlinks followed); cached per (real path, size, mtime). ``cached=False`` reads the
    file afresh, as an integrity check must: a file damaged in place (a flipped bit, bytes written without changing
    its size or time) would otherwise be vouched for from the cache."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if not cached or key not in _HASHES:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
        if not cached:
            return h.hexdigest()
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _cache_dir(explicit: str | os.PathLike | None) -> str | None:
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


def _looks_like_path(name: str) -> bool:
    """A name that can only mean a local path: absolute, ``./``, ``../``, ``~``, a path separator other than the
    one ``org/name`` has, or more than one ``/``."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def _snapshot(lead: str, repo_id: str, revision: str | None, cache_dir: str | None, token: str | bool | None) -> str:
    """The local folder of ``repo_id@revision``: from the HF cache, else downloaded (model files only). Offline, or
    with the Hub unreachable, a miss fails at once with one line (no retries)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    at = f"{repo_id}@{revision}" if revision else repo_id
    cache = cache_dir or "the default location"
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
        logger.info("%s%s from the local HF cache %s", lead, at, folder)
        return folder
    except LocalEntryNotFoundError:
        pass
    if hub_offline():
        raise NotCachedError(
            f"{lead}{at} is not in the local HF cache ({cache}) and HF_HUB_OFFLINE is set: download it once "
            "online, point HF_HUB_CACHE at a cache that has it, or pass a local folder") from None
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=DOWNLOAD_PATTERNS,
                                   token=token)
    except GatedRepoError:
        raise NotCachedError(f"{lead}{at} is gated on the Hub: accept its terms on the model page and set "
                             "HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{lead}{at}: the Hub has no such model (or it is private: set HF_TOKEN)"
                                 ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{lead}{at}: the Hub has no revision {revision!r}") from None
    except LocalEntryNotFoundError as err:  # huggingface_hub could not connect and found nothing in the cache
        from huggingface_hub import constants

        endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
        reason = str(err).splitlines()[0].removeprefix("Got: ")[:200] if str(err) else type(err).__name__
        raise NotCachedError(
            f"{lead}{at} is not in the local HF cache ({cache}) and openus_hub cannot reach {endpoint} "
            f"({reason}): connect, set HF_HUB_CACHE to a cache that has it, or pass a local folder") from None
    except HfHubHTTPError as err:
        raise NotCachedError(f"{lead}{at}: the Hub answered {str(err).splitlines()[0][:200]}") from None
    logger.info("%s%s downloaded to %s", lead, at, folder)
    return folder


def resolve(name: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
            verify_sha256: bool | None = None, token: str | bool | None = None) -> tuple[str, PretrainedEntry | None]:
    """The one way a model name becomes a local folder, used by every entry point of openus_hub.

    In order:

    1. a local folder (``config.json`` inside) is returned as it is;
    2. a registry name (:func:`list_models`): an unpublished entry raises :class:`UnpublishedModelError` with the
       command that produces its weights; a published one resolves to its pinned Hub revision (local HF cache first)
       and ``model.safetensors`` is checked against the registry's sha256 (``verify_sha256=False`` or
       ``OPENUS_HUB_VERIFY_SHA256=0`` skip that; a mismatch raises :class:`ChecksumMismatchError`);
    3. a Hub id (``org/name``): the local HF cache, else the Hub (model files only: json, safetensors, md, txt).

    A name in openus_hub's namespace (``openus-*``, ``transkd-*``) that the registry does not know raises
    :class:`UnknownModelError`; a path that is no folder :class:`ModelNotFoundError`. Offline (``HF_HUB_OFFLINE``)
    or with the Hub unreachable, a model that is not cached raises :class:`NotCachedError` at once, without retries.
    Every message is one line. Returns ``(folder, registry entry or None)``.
    """
    name = os.fspath(name)
    if os.path.isdir(name):
        return name, None
    if os.path.isfile(name):
        raise ModelNotFoundError(f"{name} is a file; pass the model folder that holds config.json and "
                                 "model.safetensors (an .onnx export loads with openus_hub.onnx.ORTModel)")
    try:
        entry = get_pretrained(name)
    except UnknownModelError:
        if is_reserved_name(name):
            raise
        entry = None
    if entry is not None:
        if not entry.published:
            raise UnpublishedModelError(entry.unpublished_message())
        rev = revision or entry.revision
        folder = _snapshot(f"'{name}' -> ", entry.resolved_repo_id, rev, _cache_dir(cache_dir), token)
        if rev == entry.revision:
            _verify(entry, folder, verify_sha256)
        elif verify_sha256:
            raise ChecksumMismatchError(f"{name}: the registry's sha256 is for revision {entry.revision}, not {rev}")
        return folder, entry
    if _looks_like_path(name) or not name.strip("/"):
        raise ModelNotFoundError(f"no model folder at {name} (and it is not a registry name or a Hub id 'org/name'); "
                                 "openus_hub.list_models() lists the registry names")
    lead = f"'{name}' is not a local folder or a registry name, and Hub model "
    return _snapshot(lead, name, revision, _cache_dir(cache_dir), token), None
