"""Helpers shared by the converters in this folder (scripts: imported as a sibling module or as a package)."""

from __future__ import annotations

import os
import shutil
import tempfile

from openus_hub.auto import sha256_file  # one implementation for the library, converters and exports

__all__ = ["ConversionError", "save_atomic", "sha256_file"]


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the problem and the fix."""


def save_atomic(model, output_dir: str, overwrite: bool = False, finalize=None) -> None:
    """Write the folder under a temporary name beside ``output_dir``, then swap it in. ``finalize(tmp_dir)``, when
    given, runs after ``save_pretrained`` and before the swap (e.g. to check the saved files and write README.md)."""
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConversionError(f"--output-dir {output_dir} exists and is not a folder")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ConversionError(f"--output-dir {output_dir} is not empty; pass --overwrite to replace its contents")
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".openus-convert-", dir=parent)
    try:
        model.save_pretrained(tmp)
        if finalize is not None:
            finalize(tmp)
        if os.path.isdir(output_dir):
            old = tempfile.mkdtemp(prefix=".openus-old-", dir=parent)
            os.rmdir(old)
            os.replace(output_dir, old)
            os.replace(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
