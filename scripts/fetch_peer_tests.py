#!/usr/bin/env python
"""Fetch the test suites of transformers and timm that OpenUS is tested against (its "peer suites").

A model added to transformers is tested with transformers' common mixins (``tests/test_modeling_common.py``,
``test_configuration_common.py``, ``test_backbone_common.py``, ``test_image_processing_common.py``), and a timm
model with timm's ``tests/test_models.py``. Neither file ships in the wheels; both ship in the source
distributions on PyPI. This script downloads the sdists of the *installed* versions with pip (the package index
only, no other network access), checks them against the index's sha256, and unpacks only those test files, with the
packages' LICENSE, into ``.peer_tests/<package>-<version>/`` (or ``$OPENUS_PEER_TESTS_DIR``). The tests under
``tests/models/`` import them from there; when they are absent those tests skip on a user's machine and fail under
``OPENUS_HUB_STRICT_TESTS=1`` (CI). ``scripts/install.sh`` runs this script.

Usage: python scripts/fetch_peer_tests.py [--dest DIR] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEST = Path(os.environ.get("OPENUS_PEER_TESTS_DIR", REPO_ROOT / ".peer_tests"))

# package -> files of its sdist's tests/ folder that the peer tests import (transformers: every top-level test
# module, they import one another; timm: the model tests)
WANTED = {
    "transformers": lambda name: name.startswith("tests/") and name.count("/") == 1 and name.endswith(".py"),
    "timm": lambda name: name in ("tests/test_models.py",),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_sdist(package: str, version: str, into: Path) -> Path:
    """``pip download`` of the sdist; pip checks it against the sha256 the package index lists."""
    cmd = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps", "--no-binary", ":all:",
           "--quiet", "--dest", str(into)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    sdists = sorted(into.glob(f"{package}-{version}.tar.gz"))
    if result.returncode != 0 or not sdists:
        raise SystemExit(f"error: could not download the {package}=={version} sdist with pip "
                         f"({result.stderr.strip().splitlines()[-1:] or 'no output'}); check access to the package "
                         "index, or set OPENUS_PEER_TESTS_DIR to a folder that already holds the peer tests")
    return sdists[0]


def _unpack(sdist: Path, package: str, target: Path) -> list[str]:
    """Copy the wanted tests/ files and the LICENSE of ``sdist`` into ``target``; regular files only."""
    wanted, copied = WANTED[package], []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/", 1)
            if len(parts) != 2 or not member.isfile():
                continue
            inner = parts[1]
            if ".." in inner.split("/") or inner.startswith("/"):
                continue
            if not (wanted(inner) or inner == "LICENSE"):
                continue
            dest = target / inner
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            copied.append(inner)
    if not any(name.startswith("tests/") for name in copied):
        raise SystemExit(f"error: {sdist.name} has no tests/ files; this version cannot be used for the peer tests")
    return sorted(copied)


def fetch(package: str, dest: Path, force: bool = False) -> Path:
    version = importlib.metadata.version(package)
    folder = dest / f"{package}-{version}"
    if (folder / "MANIFEST.json").is_file() and not force:
        print(f"{package} {version}: peer tests already in {folder}")
        return folder
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{package}-", dir=dest) as tmp:
        tmp = Path(tmp)
        sdist = _download_sdist(package, version, tmp / "download")
        staged = tmp / "staged"
        files = _unpack(sdist, package, staged)
        if package == "transformers":  # the tests import each other relatively: make the folder a package
            (staged / "tests" / "__init__.py").touch()
        manifest = {"package": package, "version": version, "sdist": sdist.name, "sha256": _sha256(sdist),
                    "files": files}
        (staged / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
        old = None
        if folder.exists():  # --force: move the previous copy aside, delete it only after the swap
            old = tmp / "old"
            folder.rename(old)
        staged.rename(folder)
    print(f"{package} {version}: {len(files)} files from {sdist.name} (sha256 {manifest['sha256'][:12]}...)")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"target folder (default: {DEFAULT_DEST})")
    parser.add_argument("--force", action="store_true", help="download again even if the files are there")
    args = parser.parse_args(argv)
    for package in WANTED:
        try:
            importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            print(f"{package} is not installed: its peer tests are not fetched")
            continue
        fetch(package, args.dest, args.force)
    print(f"wrote {args.dest}; next: python -m pytest tests/models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
