"""Checks on what the jobs write: figures (a real PNG of the expected size, not blank) and published folders
(no local paths)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def assert_figure(path: str | Path, size: tuple[int, int], min_ink: float = 0.05, min_colours: int = 50) -> None:
    """``path`` is a PNG of ``size`` (width, height) px whose content is not blank: at least ``min_ink`` of its pixels
    differ from the background (the most common colour) and it has at least ``min_colours`` distinct colours."""
    from PIL import Image

    path = Path(path)
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as im:
        assert im.size == tuple(size), f"{path.name}: {im.size} px, expected {tuple(size)}"
        rgb = np.asarray(im.convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(rgb, axis=0, return_counts=True)
    background = colours[counts.argmax()]
    ink = float((rgb != background).any(axis=1).mean())
    assert ink >= min_ink, f"{path.name}: only {ink:.1%} of the pixels differ from the background"
    assert len(colours) >= min_colours, f"{path.name}: only {len(colours)} distinct colours"


def assert_no_local_paths(folder: str | Path, *roots: str | Path) -> None:
    """No text file in ``folder`` (cards, configs, JSON) names a local path under any of ``roots``."""
    folder = Path(folder)
    needles = {str(Path(r).resolve()) for r in roots} | {str(r) for r in roots}
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".md", ".json", ".yaml", ".yml", ".txt"):
            text = path.read_text(encoding="utf-8", errors="replace")
            for needle in needles:
                assert needle not in text, f"{path.relative_to(folder)} names the local path {needle}"
