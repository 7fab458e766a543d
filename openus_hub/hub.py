"""``openus-hub push DIR --repo-id ORG/NAME``: check a model folder, then publish it in one commit.

Checks, all before anything is sent (and also with ``--dry-run``, which sends nothing). Files are judged by their
content, not their names:

* **symlinks**: none may point outside the folder (its target's bytes would be uploaded); symlinked folders are not
  followed;
* **an explicit list of file kinds** (:data:`ALLOWED_KINDS`): safetensors (header checked), JSON (parsed), Markdown,
  plain text (``.txt``, ``LICENSE``, ``NOTICE``) whose name is not secret-like, the remote-code sources
  ``save_pretrained`` copies beside an OpenUS model, Matplotlib figures (PNG/SVG that Matplotlib wrote, no embedded
  images) and ONNX models with their external data. Anything else is refused;
* **magic bytes**, whatever the name: pickles and zip archives (``torch.save`` checkpoints), NumPy arrays, HDF5,
  DICOM with or without its 128-byte preamble, and image, video and volume formats (patient data) are refused;
* **text** (JSON, Markdown, text, sources, SVG) is scanned for access tokens (Hugging Face ``hf_...``, AWS
  ``AKIA...``, GitHub, private keys) and absolute local paths (``/home/``, ``/Users/``, ``C:\\``, the current
  user's home, any absolute path that exists on this machine); each finding names the file and line;
* the folder loads with the transformers Auto classes (no missing or unexpected weights);
* ``README.md`` exists, parses with ``huggingface_hub.ModelCard`` and sets a licence.

``--allow PATTERN`` (repeatable, matched against the relative path) is the explicit escape hatch: it waives the kind,
content and text findings of the files it matches, and every waived finding is printed. It never waives a symlink
out of the folder or a pickle.

Publishing uses ``huggingface_hub``: ``create_repo(exist_ok=True)``, ``create_branch`` for ``--revision`` (unless
``--create-pr``), then one ``create_commit`` holding exactly the checked files (the list ``--dry-run`` prints).
The token comes from ``HF_TOKEN`` (or a stored ``hf auth login``); the endpoint from ``HF_ENDPOINT``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import re
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .pretrained import hub_offline

logger = logging.getLogger(__name__)

__all__ = ["ALLOWED_KINDS", "PushError", "add_push_subcommand", "check_folder", "push", "push_main"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pth.tar", ".pkl", ".pickle", ".ckpt", ".tar", ".h5", ".msgpack",
                   ".joblib", ".npy", ".npz")
PATIENT_DATA_SUFFIXES = (".dcm", ".dicom", ".ima", ".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".png", ".jpg",
                         ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".avi", ".mp4", ".mov", ".mkv")
SKIPPED_DIRS = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}
ALLOWED_KINDS = ("safetensors weights", "JSON", "Markdown", "plain text (.txt, LICENSE, NOTICE)",
                 "OpenUS remote-code sources", "Matplotlib figures (PNG/SVG)", "ONNX models and their external data")
_TEXT_NAMES = ("LICENSE", "NOTICE", "LICENCE")
_SECRET_NAME = re.compile(r"(token|secret|passw|credential|api[_-]?key|private[_-]?key|\.env$|\.netrc$|id_rsa)",
                          re.IGNORECASE)
# (label, pattern): access tokens and keys; a match is reported with its first characters only
_SECRETS = (
    ("a Hugging Face token", re.compile(r"\bhf_[A-Za-z0-9]{30,}")),
    ("an AWS access key id", re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("a GitHub token", re.compile(r"\b(ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}\b|\bgithub_pat_[A-Za-z0-9_]{60,}")),
    ("a private key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")),
)
_ABS_PATH = re.compile(r"(?<![\w.:/~-])(/(?:home|Users|root)/[^\s\"'`)<>\]]*|[A-Za-z]:\\\\?[^\s\"'`<>]*|"
                       r"file://[^\s\"'`<>]+|/[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)+)")
# an absolute path that exists here is a local path, except under the operating system's own folders
_SYSTEM_ROOTS = {"proc", "dev", "sys", "usr", "etc", "bin", "sbin", "lib", "lib32", "lib64", "opt", "var", "run",
                 "boot", "snap", "System", "Library", "Applications"}
_DICOM_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD",
              b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI",
              b"UL", b"UN", b"UR", b"US", b"UT", b"UV"}


class PushError(RuntimeError):
    """A folder that must not be published, or a Hub error explained."""


@dataclass
class _Finding:
    rel: str
    message: str
    waivable: bool = True


@dataclass
class _Report:
    files: list[Path] = field(default_factory=list)
    findings: list[_Finding] = field(default_factory=list)

    def add(self, rel, message: str, waivable: bool = True) -> None:
        self.findings.append(_Finding(str(rel), message, waivable))


def _sniff(head: bytes, size: int) -> str | None:
    """What the first bytes of a file say it is, when it is a kind that is never published; None otherwise."""
    if head[128:132] == b"DICM":
        return "a DICOM file (DICM marker after the preamble): it can hold patient data"
    if _dicom_without_preamble(head):
        return "a DICOM data set without preamble: it can hold patient data"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (unpickling it runs code); publish weights as safetensors"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "a zip archive (e.g. a torch.save checkpoint, which unpickles code); publish weights as safetensors"
    if head[:6] == b"\x93NUMPY":
        return "a NumPy array file (may hold pickled objects)"
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        return "an HDF5 file (e.g. Keras weights); publish weights as safetensors"
    if head[:2] == b"\x1f\x8b" or head[:6] == b"7z\xbc\xaf\x27\x1c" or head[257:262] == b"ustar":
        return "a compressed or tar archive (its content cannot be checked)"
    image = _image_kind(head, size)
    if image:
        return f"{image}: images and video can hold patient data"
    return None


def _image_kind(head: bytes, size: int) -> str | None:
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "a PNG image"
    if head[:3] == b"\xff\xd8\xff":
        return "a JPEG image"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "a GIF image"
    if head[:2] == b"BM" and len(head) >= 6 and struct.unpack("<I", head[2:6])[0] in (size, 0) and size > 26:
        return "a BMP image"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "a TIFF image"
    if head[:4] == b"RIFF" and head[8:12] in (b"WEBP", b"AVI "):
        return "a WebP image" if head[8:12] == b"WEBP" else "an AVI video"
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or head[:4] == b"\xffO\xffQ":
        return "a JPEG 2000 image"
    if head[4:8] == b"ftyp":
        return "an MP4/QuickTime video"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "a Matroska/WebM video"
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c"):
        return "a NIfTI volume"
    return None


def _dicom_without_preamble(head: bytes) -> bool:
    """A data set written without preamble starts with a tag of group 0x0002/0x0008 (little or big endian), then an
    explicit VR, or an implicit-VR length that fits the file."""
    if len(head) < 12:
        return False
    for order in ("<", ">"):
        group, element = struct.unpack(order + "HH", head[:4])
        if group not in (0x0002, 0x0008) or element > 0x0100:
            continue
        if head[4:6] in _DICOM_VRS:
            return True
        (length,) = struct.unpack(order + "I", head[4:8])
        if length < 1024 and group == 0x0008:
            nxt_group = struct.unpack(order + "H", head[8 + length:10 + length])[0] if len(head) >= 10 + length else 0
            if nxt_group == 0x0008:
                return True
    return False


def _parses_as_dicom(path: Path) -> bool:
    """pydicom finds at least three standard attributes of the image, patient, study or file-meta groups: a DICOM data
    set whatever its first bytes (used for files no magic number identified)."""
    import warnings

    import pydicom
    from pydicom.datadict import keyword_for_tag

    pydicom_logger = logging.getLogger("pydicom")
    level = pydicom_logger.level
    try:
        pydicom_logger.setLevel(logging.ERROR)  # parsing non-DICOM bytes logs VR lookup failures
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True, defer_size=1024)
            tags = [elem.tag for elem in ds.iterall()]
    except Exception:  # not parseable at all: not DICOM
        return False
    finally:
        pydicom_logger.setLevel(level)
    known = [t for t in tags if t.group in (0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028) and keyword_for_tag(t)]
    return len(known) >= 3


def _matplotlib_png(path: Path) -> bool:
    """A PNG whose text chunks say Matplotlib wrote it (plots, not scans)."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            while True:
                header = f.read(8)
                if len(header) < 8:
                    return False
                length, kind = struct.unpack(">I4s", header)
                if kind == b"IDAT" or length > 1 << 20:
                    return False
                data = f.read(length)
                f.read(4)
                if kind in (b"tEXt", b"iTXt") and data.startswith(b"Software\x00"):
                    return b"Matplotlib" in data[:64]
    except OSError:
        return False


def _safetensors_ok(path: Path, size: int) -> str | None:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, 100 << 20):
                return "is not a safetensors file (header length does not fit the file)"
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as err:
        return f"is not a safetensors file ({type(err).__name__})"
    if not isinstance(header, dict):
        return "is not a safetensors file (header is not a JSON object)"
    return None


def _remote_code_names() -> set[str]:
    """Source files ``save_pretrained`` copies beside an OpenUS model for ``trust_remote_code``."""
    root = Path(__file__).resolve().parent
    names = set()
    for sub in ("ops", "models/openus", "csrc"):
        folder = root / sub
        if folder.is_dir():
            names |= {p.name for p in folder.iterdir() if p.is_file() and p.name != "__init__.py"
                      and p.suffix != ".pyc"}
    return names | {f"csrc/{n}" for n in names}


def _local_path_markers() -> list[str]:
    home = os.path.expanduser("~")
    return [home.rstrip("/\\") + sep for sep in ("/", "\\")] if home not in ("", "/", "~") else []


def _scan_text(rel: str, text: str, report: _Report) -> None:
    markers = _local_path_markers()
    for lineno, line in enumerate(text.splitlines(), 1):
        for label, pattern in _SECRETS:
            m = pattern.search(line)
            if m:
                report.add(rel, f"line {lineno}: looks like {label} ({m.group(0)[:6]}...); never publish secrets")
        seen = set()
        for m in _ABS_PATH.finditer(line):
            path = m.group(0).rstrip(".,;:")
            generic = path.startswith(("/home/", "/Users/", "/root/", "file://")) or re.match(r"[A-Za-z]:\\", path)
            existing = (path.startswith("/") and path.split("/")[1] not in _SYSTEM_ROOTS and len(path) > 4
                        and os.path.exists(path))
            if generic or any(path.startswith(k) for k in markers) or existing:
                seen.add(path)
        for path in sorted(seen):
            report.add(rel, f"line {lineno}: absolute local path {path[:80]!r}; write paths relative to the folder, "
                            "or a file name plus sha256")
        if any(k in line for k in markers) and not seen:
            report.add(rel, f"line {lineno}: names the current user's home folder; remove local paths")


def _walk(folder: Path, report: _Report) -> None:
    real_root = folder.resolve()
    for root, dirs, names in os.walk(folder):
        keep = []
        for d in sorted(dirs):
            if d in SKIPPED_DIRS or d.startswith("."):
                continue
            path = Path(root, d)
            if path.is_symlink():
                target = path.resolve()
                if real_root not in target.parents and target != real_root:
                    report.add(path.relative_to(folder), f"is a symlink to a folder outside {folder} ({target}); "
                               "copy what you mean to publish into the folder and remove the link", waivable=False)
                continue  # symlinked folders are not followed
            keep.append(d)
        dirs[:] = keep
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(root, name)
            rel = path.relative_to(folder)
            if path.is_symlink():
                target = path.resolve()
                if real_root not in target.parents:
                    report.add(rel, f"is a symlink to {target}, outside the folder: its content would be uploaded; "
                               "copy the file in or remove the link", waivable=False)
                    continue
                if not target.is_file():
                    report.add(rel, "is a dangling symlink; remove it", waivable=False)
                    continue
            report.files.append(rel)


def _check_file(folder: Path, rel: Path, report: _Report, code_names: set[str], onnx_stems: set[str]) -> None:
    path = folder / rel
    name, posix = rel.name.lower(), rel.as_posix()
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    if name.endswith(PICKLE_SUFFIXES):
        report.add(rel, "pickle-based weights are not published; convert to safetensors (save_pretrained writes "
                        "model.safetensors) and remove it", waivable=False)
        return
    sniffed = _sniff(head, size)
    if sniffed and "pickle" in sniffed or sniffed and "zip archive" in sniffed:
        report.add(rel, f"is {sniffed}", waivable=False)
        return
    if name.endswith(".png") and _matplotlib_png(path):
        return  # a figure we produce
    if sniffed:
        report.add(rel, f"is {sniffed}; remove it")
        return
    if name.endswith(PATIENT_DATA_SUFFIXES):
        report.add(rel, "DICOM/image/video files can hold patient data and are never uploaded; remove it")
        return
    if name.endswith(".safetensors"):
        problem = _safetensors_ok(path, size)
        if problem:
            report.add(rel, problem)
        return
    if name.endswith((".onnx.data", ".onnx_data")):
        if name.rsplit(".onnx", 1)[0] not in onnx_stems:
            report.add(rel, "is ONNX external data without its .onnx model")
        return
    if name.endswith(".onnx"):
        if head[:1] != b"\x08":  # ModelProto starts with field 1 (ir_version, varint)
            report.add(rel, "is not an ONNX model (no ModelProto ir_version field first)")
        return
    if _parses_as_dicom(path):
        report.add(rel, "is a DICOM data set (it parses as one, whatever its name): it can hold patient data; "
                        "remove it")
        return
    text_kind = (name.endswith((".json", ".md", ".txt", ".svg")) or rel.name in _TEXT_NAMES
                 or posix in code_names)
    if not text_kind:
        report.add(rel, f"is not a kind openus-hub publishes ({', '.join(ALLOWED_KINDS)}); remove it")
        return
    if _SECRET_NAME.search(rel.name):
        report.add(rel, "has a secret-like name (token, secret, password, key, credentials); remove it")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        report.add(rel, "is not UTF-8 text although its name says it is")
        return
    if name.endswith(".json"):
        try:
            json.loads(text)
        except ValueError as err:
            report.add(rel, f"is not valid JSON ({err})")
    if name.endswith(".svg") and ("Matplotlib" not in text[:2000] or "<image" in text):
        report.add(rel, "is an SVG that Matplotlib did not write, or that embeds an image; remove it")
    _scan_text(posix, text, report)


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


def check_folder(folder: str | os.PathLike, load: bool = True, allow: Sequence[str] = (),
                 waived: list[str] | None = None) -> list[Path]:
    """The files to upload (relative paths); :class:`PushError` listing every problem otherwise.

    ``allow``: fnmatch patterns of relative paths whose waivable findings are accepted; each accepted finding is
    logged and appended to ``waived`` (when given)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder} is not a folder")
    report = _Report()
    _walk(folder, report)
    code_names = _remote_code_names()
    onnx_stems = {rel.name.lower()[: -len(".onnx")] for rel in report.files if rel.name.lower().endswith(".onnx")}
    for rel in report.files:
        try:
            _check_file(folder, rel, report, code_names, onnx_stems)
        except OSError as err:
            report.add(rel, f"could not be read ({type(err).__name__}: {err})", waivable=False)
    problems = []
    for finding in report.findings:
        pattern = next((p for p in allow if fnmatch.fnmatchcase(finding.rel, p)), None)
        text = f"{finding.rel}: {finding.message}"
        if pattern is not None and finding.waivable:
            logger.warning("allowed by --allow %r: %s", pattern, text)
            if waived is not None:
                waived.append(f"{text} [--allow {pattern}]")
        else:
            problems.append(text)
    bad = {f.rel for f in report.findings if not f.waivable}
    files = [rel for rel in report.files if str(rel) not in bad]
    names = {rel.as_posix() for rel in files}
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


def _model_folder(name: str | os.PathLike) -> str:
    """A folder as it is; any other name through openus_hub's resolver (registry name, then Hub id)."""
    from .pretrained import OpenUSHubError, resolve

    if os.path.isdir(name):
        return os.fspath(name)
    try:
        return resolve(name)[0]
    except OpenUSHubError as err:
        raise PushError(str(err)) from None


def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         create_pr: bool = False, dry_run: bool = False, commit_message: str | None = None,
         token: str | None = None, allow: Sequence[str] = ()) -> dict:
    """Check ``folder`` and publish it as one commit. Returns ``{"files": [...], "commit_url": ..., ...}``;
    ``"waived"`` lists the findings accepted through ``allow`` patterns (``--allow``)."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PushError(f"--repo-id must be ORG/NAME, got {repo_id!r}")
    folder = Path(_model_folder(folder))
    waived: list[str] = []
    files = check_folder(folder, allow=allow, waived=waived)
    result = {"repo_id": repo_id, "files": [str(f) for f in files],
              "sizes": {str(f): (folder / f).stat().st_size for f in files}, "dry_run": dry_run, "waived": waived}
    if dry_run:
        return result
    if hub_offline():
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
                      create_pr=args.create_pr, dry_run=args.dry_run, commit_message=args.message,
                      allow=args.allow)
    except PushError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in result["waived"]:
        print(f"warning: allowed: {line}", file=sys.stderr)
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
        description="Check a model folder and publish exactly its files in one commit. Files are judged by content: "
        "only safetensors, JSON, Markdown, text, the model's remote-code sources, Matplotlib figures and ONNX are "
        "published; pickles, archives, DICOM, images and video are refused whatever their names; no symlink may "
        "point outside the folder; text is scanned for access tokens and absolute local paths. The folder must "
        "load with the Auto classes and have a README.md model card with a licence. HF_TOKEN and HF_ENDPOINT come "
        "from the environment. Exit codes: 0 pushed (or dry run passed), 2 refused or failed.",
    )
    p.add_argument("folder", help="model folder (save_pretrained output with README.md); a published registry name "
                   "or Hub id resolves as in from_pretrained")
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing directly")
    p.add_argument("--dry-run", action="store_true", help="run every check and list the files; upload nothing")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--allow", action="append", default=[], metavar="PATTERN",
                   help="accept the content findings of files matching PATTERN (fnmatch on the relative path, "
                        "repeatable); each accepted finding is printed. Never waives pickles or symlinks out of "
                        "the folder")
    p.set_defaults(func=_run)
    return p


def push_main(argv: Sequence[str] | None = None) -> int:
    """``push`` on its own: ``python -m openus_hub.hub DIR --repo-id ORG/NAME ...``."""
    parser = argparse.ArgumentParser(prog="openus-hub")
    add_push_subcommand(parser.add_subparsers(dest="command", required=True))
    return _run(parser.parse_args(["push", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(push_main())
