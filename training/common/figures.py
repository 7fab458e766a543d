"""The figures the training jobs write, drawn with matplotlib (the ``plot`` extra: ``pip install "openus_hub[plot]"``).

Every figure has a title, labelled axes and, where colour encodes a number, a colour bar in the quantity's own units
spanning the values shown. Each function takes plain numpy arrays, writes one PNG atomically and returns a
:class:`FigureInfo` (path, pixel size, the colour range used), which the tests check.

* :func:`frame_similarity_figure`: cosine-similarity matrix of frame embeddings + similarity of neighbouring frames.
* :func:`pretraining_figure`: per global crop: the crop, the teacher's attention on its token grid, the chosen mask,
  the masked reconstruction; the step in the title.
* :func:`segmentation_figure`: per image: the image, the ground truth, the prediction with its Dice.
* :func:`confusion_matrices_figure`, :func:`segmentation_comparison_figure`: the benchmark's per-task figures
  (one confusion matrix per protocol; image | ground truth | one prediction per protocol).

Figures are drawn on a bare ``matplotlib.figure.Figure`` (Agg), without pyplot: no display, no global state.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write

__all__ = ["DPI", "FigureInfo", "confusion_matrices_figure", "frame_similarity_figure", "pretraining_figure",
           "require_matplotlib", "segmentation_comparison_figure", "segmentation_figure"]

DPI = 100


@dataclass(frozen=True)
class FigureInfo:
    path: Path
    size: tuple[int, int]  # (width, height) in pixels
    vmin: float | None = None  # the colour scale of the main quantity
    vmax: float | None = None


def require_matplotlib(setting: str | None = None) -> None:
    """Raise ImportError with the fix when matplotlib is missing (``setting``: the option that turns figures off)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        off = f", or set {setting} to skip the figures" if setting else ""
        raise ImportError(f'figures need matplotlib: pip install "openus_hub[plot]"{off}') from None


def _figure(width: float, height: float):
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _suptitle(fig, text: str) -> None:
    """The figure title, wrapped to the figure's width."""
    import textwrap

    width = int(fig.get_size_inches()[0] * 10)
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in text.split("\n")))


def _save(fig, path: str | Path) -> FigureInfo:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    path = atomic_write(path, lambda f: f.write(buf.getvalue()))
    w, h = fig.get_size_inches()
    return FigureInfo(path, (int(round(w * DPI)), int(round(h * DPI))))


def _decimals(lo: float, hi: float) -> int:
    """Decimals that tell apart values spread over [lo, hi] (at least 2)."""
    span = hi - lo
    return 2 if span <= 0 or not math.isfinite(span) else max(2, int(math.ceil(-math.log10(span))) + 1)


def _frame_ticks(n: int) -> list[int]:
    step = max(1, int(math.ceil(n / 15)))
    return list(range(0, n, step))


# ---------------------------------------------------------------------------------------------------------------------
# frame similarity


def frame_similarity_figure(similarity: np.ndarray, path: str | Path, *, title: str,
                            frames: list[int] | None = None) -> FigureInfo:
    """Left: the ``(N, N)`` cosine similarities, colours spanning their actual minimum to maximum, frame indices on
    both axes. Right: the similarity of each frame with the previous one, over time."""
    from matplotlib.ticker import FormatStrFormatter

    sim = np.asarray(similarity, dtype=np.float64)
    n = sim.shape[0]
    if sim.shape != (n, n) or n < 2:
        raise ValueError(f"similarity must be a square matrix of at least 2 frames, got {sim.shape}")
    frames = list(range(n)) if frames is None else list(frames)
    lo, hi = float(sim.min()), float(sim.max())
    fmt = FormatStrFormatter(f"%.{_decimals(lo, hi)}f")

    fig = _figure(11.0, 4.8)
    _suptitle(fig, title)
    ax, ax2 = fig.subplots(1, 2, width_ratios=[1.0, 1.15])
    im = ax.imshow(sim, cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
    ticks = _frame_ticks(n)
    ax.set_xticks(ticks, [str(frames[i]) for i in ticks])
    ax.set_yticks(ticks, [str(frames[i]) for i in ticks])
    ax.set(xlabel="frame", ylabel="frame", title=f"cosine similarity, {n} frames\n(colours span {lo:.{_decimals(lo, hi)}f}"
           f" to {hi:.{_decimals(lo, hi)}f})")
    bar = fig.colorbar(im, ax=ax, format=fmt)
    bar.set_label("cosine similarity")

    neighbour = np.array([sim[i, i - 1] for i in range(1, n)])
    ax2.plot(frames[1:], neighbour, marker="o", markersize=4, linewidth=1.5)
    ax2.yaxis.set_major_formatter(FormatStrFormatter(f"%.{_decimals(float(neighbour.min()), float(neighbour.max()))}f"))
    ax2.set(xlabel="frame t", ylabel="cosine similarity of frames t-1 and t",
            title="similarity of neighbouring frames over time")
    ax2.grid(True, alpha=0.3)
    info = _save(fig, path)
    return FigureInfo(info.path, info.size, *map(float, im.get_clim()))  # the colour range actually drawn


# ---------------------------------------------------------------------------------------------------------------------
# pretraining


def _cell_lines(ax, grid: tuple[int, int], size: tuple[int, int], color: str = "white") -> None:
    (gh, gw), (h, w) = grid, size
    for i in range(1, gh):
        ax.axhline(i * h / gh - 0.5, color=color, linewidth=0.6, alpha=0.8)
    for j in range(1, gw):
        ax.axvline(j * w / gw - 0.5, color=color, linewidth=0.6, alpha=0.8)


def _upsample(cells: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    gh, gw = cells.shape
    return np.repeat(np.repeat(cells, h // gh, 0), w // gw, 1)


def pretraining_figure(path: str | Path, crops: np.ndarray, attention: np.ndarray, masks: np.ndarray,
                       reconstruction: np.ndarray, *, step: int, epoch: int) -> FigureInfo:
    """One row per global crop, four titled columns.

    ``crops``, ``reconstruction``: ``(n, H, W, 3)`` RGB in [0, 1]. ``attention``: ``(n, h, w)``, each token's mean
    attention received from all tokens (the column mean of the last block's implicit attention map, min-max
    normalised over the batch as upstream), shown on the ``h x w`` token grid it is computed on. ``masks``:
    ``(n, h, w)`` bool, True = masked cell. The attention colour bar spans the values shown.
    """
    n, H, W, _ = crops.shape
    gh, gw = masks.shape[1:]
    lo, hi = float(attention.min()), float(attention.max())
    if hi <= lo:
        hi = lo + 1e-6
    fig = _figure(14.0, 3.3 * n + 0.6)
    _suptitle(fig, f"OpenUS pretraining, step {step} (epoch {epoch}): {n} global crop(s) of {H}x{W} px, "
                   f"mask grid {gh}x{gw} cells of {H // gh} px")
    axes = np.atleast_2d(fig.subplots(n, 4, squeeze=False))
    cell_px = H // gh
    for i in range(n):
        m = masks[i].astype(bool)
        m_px = _upsample(m.astype(np.float32), (H, W))[..., None]
        a0, a1, a2, a3 = axes[i]
        a0.imshow(crops[i])
        a0.set_title(f"global crop {i}\n(input, de-normalised)")
        im = a1.imshow(attention[i], cmap="magma", vmin=lo, vmax=hi, interpolation="nearest",
                       extent=(-0.5, W - 0.5, H - 0.5, -0.5))
        a1.set_title(f"teacher attention\n(per token, {gh}x{gw} grid)")
        if gh * gw <= 64:  # small grids: print the values too
            for r in range(gh):
                for c in range(gw):
                    v = float(attention[i, r, c])
                    a1.text((c + 0.5) * cell_px - 0.5, (r + 0.5) * cell_px - 0.5, f"{v:.2f}", ha="center",
                            va="center", fontsize=8, color="white" if v < (lo + hi) / 2 else "black")
        bar = fig.colorbar(im, ax=a1, fraction=0.046, pad=0.02)
        bar.set_label("mean attention received (batch-normalised)")
        shade = crops[i] * (1 - 0.55 * m_px) + np.array([0.1, 0.4, 1.0]) * 0.55 * m_px
        a2.imshow(shade.clip(0, 1))
        a2.set_title(f"mask\n({int(m.sum())} of {m.size} cells, blue)")
        a3.imshow((reconstruction[i] * m_px + crops[i] * (1 - m_px)).clip(0, 1))
        a3.set_title("masked reconstruction\n(decoder output in masked cells)")
        for ax in (a0, a1, a2, a3):
            _cell_lines(ax, (gh, gw), (H, W))
            ax.set_xlabel("x (px)")
        a0.set_ylabel("y (px)")
    info = _save(fig, path)
    return FigureInfo(info.path, info.size, *map(float, im.get_clim()))  # the colour range actually drawn


# ---------------------------------------------------------------------------------------------------------------------
# segmentation


def _class_colours(num_classes: int) -> np.ndarray:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
    return np.array([cmap(i % cmap.N)[:3] for i in range(num_classes)])


def _overlay(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, ignore_index: int | None,
             background: int | None) -> np.ndarray:
    """Classes painted over the image (alpha 0.5), the background class left clear, ignored pixels grey."""
    out = image.astype(np.float64).copy()
    for c, colour in enumerate(colours):
        if c == background:
            continue
        sel = labels == c
        out[sel] = 0.5 * out[sel] + 0.5 * colour
    if ignore_index is not None:
        out[labels == ignore_index] = 0.5
    return out.clip(0, 1)


def _outline(ax, labels: np.ndarray, colours: np.ndarray, background: int | None) -> None:
    for c, colour in enumerate(colours):
        if c != background and (labels == c).any():
            ax.contour((labels == c).astype(float), levels=[0.5], colors=[colour], linewidths=1.2)


def segmentation_figure(path: str | Path, images: np.ndarray, targets: np.ndarray, predictions: np.ndarray,
                        dice: list[float], *, title: str, class_names: list[str], ignore_index: int | None = 255,
                        background: int | None = 0, dice_label: str = "Dice") -> FigureInfo:
    """One row per image: the image, the ground truth and the prediction painted over it (``background`` left
    clear, ``ignore_index`` grey), the image's Dice in the prediction's title and the mean in the figure's title.

    ``images``: ``(n, H, W, 3)`` RGB in [0, 1]; ``targets``, ``predictions``: ``(n, H, W)`` class indices at the
    image's size."""
    from matplotlib.patches import Patch

    n, H, W, _ = images.shape
    colours = _class_colours(len(class_names))
    fig = _figure(11.0, 3.2 * n + 1.0)
    mean = float(np.mean(dice)) if len(dice) else float("nan")
    _suptitle(fig, f"{title}\nmean {dice_label} over these {n} image(s): {mean:.3f}")
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        a0, a1, a2 = axes[i]
        a0.imshow(images[i])
        a0.set_title(f"image {i} ({W}x{H} px)")
        a1.imshow(_overlay(images[i], targets[i], colours, ignore_index, background))
        _outline(a1, targets[i], colours, background)
        a1.set_title("ground truth")
        a2.imshow(_overlay(images[i], predictions[i], colours, ignore_index, background))
        _outline(a2, predictions[i], colours, background)
        a2.set_title(f"prediction, {dice_label} {dice[i]:.3f}")
        for ax in (a0, a1, a2):
            ax.set_xlabel("x (px)")
        a0.set_ylabel("y (px)")
    handles = [Patch(color=colours[c], label=name) for c, name in enumerate(class_names) if c != background]
    if ignore_index is not None:
        handles.append(Patch(color=(0.5, 0.5, 0.5), label=f"ignored ({ignore_index})"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), frameon=False)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------------
# benchmark


def confusion_matrices_figure(path: str | Path, matrices: dict[str, np.ndarray], class_names: list[str], *,
                              title: str) -> FigureInfo:
    """One panel per protocol: the confusion matrix (rows = true class, columns = predicted), colour = the share of
    the true class (row-normalised, 0 to 1, one colour bar), each cell printed as its count."""
    n = len(matrices)
    k = len(class_names)
    side = max(3.6, 0.55 * k + 2.2)
    fig = _figure(side * n + 1.2, side + 0.9)
    _suptitle(fig, title)
    axes = fig.subplots(1, n, squeeze=False)[0]
    im = None
    for ax, (name, cm) in zip(axes, matrices.items()):
        cm = np.asarray(cm, dtype=np.int64)
        rows = cm.sum(1, keepdims=True)
        share = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)
        im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8 if k > 6 else 10,
                        color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(k), class_names, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
        ax.set_yticks(range(k), class_names)
        acc = np.trace(cm) / max(1, cm.sum())
        ax.set(xlabel="predicted class", ylabel="true class", title=f"{name}: accuracy {acc:.3f} ({cm.sum()} images)")
    bar = fig.colorbar(im, ax=list(axes), fraction=0.046, pad=0.02)
    bar.set_label("share of the true class (row-normalised)")
    info = _save(fig, path)
    return FigureInfo(info.path, info.size, 0.0, 1.0)


def segmentation_comparison_figure(path: str | Path, images: np.ndarray, targets: np.ndarray,
                                   predictions: dict[str, tuple[np.ndarray, list[float]]], *, title: str,
                                   class_names: list[str], ignore_index: int | None = 255) -> FigureInfo:
    """One row per image: the image, the ground truth, then one prediction per protocol with its Dice; classes
    painted over the image (background clear), outlines in the class colour.

    ``images``: ``(n, H, W, 3)`` RGB in [0, 1]; ``targets``: ``(n, H, W)``; ``predictions``: protocol ->
    (``(n, H, W)`` class indices, per-image Dice)."""
    from matplotlib.patches import Patch

    n = images.shape[0]
    cols = 2 + len(predictions)
    colours = _class_colours(len(class_names))
    fig = _figure(3.2 * cols + 0.4, 3.0 * n + 1.2)
    _suptitle(fig, title)
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i])
        axes[i, 0].set_title(f"test image {i}")
        axes[i, 1].imshow(_overlay(images[i], targets[i], colours, ignore_index, 0))
        _outline(axes[i, 1], targets[i], colours, 0)
        axes[i, 1].set_title("ground truth")
        for j, (name, (preds, dice)) in enumerate(predictions.items()):
            ax = axes[i, 2 + j]
            ax.imshow(_overlay(images[i], preds[i], colours, ignore_index, 0))
            _outline(ax, preds[i], colours, 0)
            ax.set_title(f"{name}, Dice {dice[i]:.3f}")
        for ax in axes[i]:
            ax.set_xlabel("x (px)")
        axes[i, 0].set_ylabel("y (px)")
    handles = [Patch(color=colours[c], label=name) for c, name in enumerate(class_names) if c != 0]
    if ignore_index is not None:
        handles.append(Patch(color=(0.5, 0.5, 0.5), label=f"outside the scan region ({ignore_index})"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), frameon=False)
    return _save(fig, path)
