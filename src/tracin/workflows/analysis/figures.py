"""PNG figures: the analysis dashboard, per-class summaries and image grids (matplotlib, Agg)."""
from __future__ import annotations

import textwrap
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ...io import write_figure
from ..image.folders import to_rgb

PLAIN_TEXT = {"text.parse_math": False}  # names such as "$x^" are text, not mathtext (an unbalanced $ would crash)

THUMB = 96


@lru_cache(maxsize=4096)
def thumbnail(path: str, size: int = THUMB) -> np.ndarray:
    """[size, size, 3] uint8 thumbnail; a grey square for a file that cannot be read."""
    try:
        with Image.open(path) as img:
            img = to_rgb(img)
            resample = Image.NEAREST if max(img.size) < size else Image.BILINEAR
            return np.asarray(img.resize((size, size), resample))
    except (OSError, Image.DecompressionBombError):
        return np.full((size, size, 3), 128, dtype=np.uint8)


def _save(fig, path: Path) -> Path:
    """Write the figure with every text in it plain: class names and file names are never mathtext (a name such as
    ``$\\foo$`` would crash the drawing), whichever artist made the text."""
    for text in fig.findobj(matplotlib.text.Text):
        text.set_parse_math(False)
    return write_figure(path, fig, dpi=90)


def _image_row(fig, gs_row, items: Sequence[Tuple[str, str]], cols: int, title: str = "", color: str = "black") -> None:
    """Thumbnails with captions across one gridspec row, under an optional title."""
    if title:
        box = gs_row.get_position(fig)
        fig.text(0.5, box.y1 + 0.035, title, ha="center", fontsize=11, weight="bold", color=color)
    sub = gs_row.subgridspec(1, cols)
    for c in range(cols):
        ax = fig.add_subplot(sub[0, c])
        ax.axis("off")
        if c < len(items):
            path, caption = items[c]
            ax.imshow(thumbnail(path))
            ax.set_title(caption, fontsize=9)


@matplotlib.rc_context(PLAIN_TEXT)
def dashboard(path: Path, overview: Dict[str, Any], pro_values: np.ndarray, opp_values: np.ndarray,
              per_test: Tuple[np.ndarray, np.ndarray], top_helpful: List[Tuple[str, str]], findings: List[str]) -> Path:
    """analysis_dashboard.png: overview with the health score, influence distributions, mean influence
    per test example (green helps, red hurts), the 10 most helpful training images, key findings."""
    fig = plt.figure(figsize=(16, 13))
    gs = fig.add_gridspec(4, 3, height_ratios=[1.1, 1.0, 0.8, 0.9], hspace=0.5, top=0.96, bottom=0.03, left=0.05, right=0.98)
    ax = fig.add_subplot(gs[0, 0])
    ax.axis("off")
    lines = [f"{k}: {v}" for k, v in overview.items() if k not in ("Health score", "Band")]
    ax.text(0, 1, "Overview", fontsize=14, weight="bold", va="top")
    ax.text(0, 0.82, "\n".join(lines), fontsize=10, va="top", family="monospace")
    color = {"EXCELLENT": "#1a7f37", "GOOD": "#2da44e", "FAIR": "#bf8700", "NEEDS ATTENTION": "#cf222e"}[overview["Band"]]
    ax.text(0, 0.08, f"Health score {overview['Health score']:.1f}%  {overview['Band']}", fontsize=13, weight="bold", color=color)
    for col, (vals, title, colr) in enumerate(((pro_values, "Top-k proponent scores", "#2da44e"),
                                               (opp_values, "Top-k opponent scores", "#cf222e")), start=1):
        ax = fig.add_subplot(gs[0, col])
        ax.hist(vals.ravel(), bins=50, color=colr, alpha=0.85)
        mean = float(vals.mean())
        ax.axvline(mean, color="black", lw=1.2, ls="--", label=f"mean {mean:+.3g}")
        ax.set(title=title, xlabel="TracIn score", ylabel="count")
        ax.legend(fontsize=9)
        ax.grid(alpha=0.3)
    _net_influence(fig.add_subplot(gs[1, :]), *per_test)
    if top_helpful:  # images only: texts are listed on the page
        _image_row(fig, gs[2, :], top_helpful, 10, "The 10 most helpful training images (label, summed proponent score over all test examples)")
    ax = fig.add_subplot(gs[3, :])
    ax.axis("off")
    ax.text(0, 1, "Key findings and recommendations", fontsize=14, weight="bold", va="top")
    # wrapped here: matplotlib's own wrapping measures the text as mathtext whatever parse_math says
    ax.text(0, 0.85, "\n".join(textwrap.fill(f"- {f}", 110, subsequent_indent="  ") for f in findings), fontsize=10.5, va="top")
    return _save(fig, path)


def _net_influence(ax, mean_per_test: np.ndarray, wrong: np.ndarray) -> None:
    """Each test example's mean top-k score, sorted; wrongly predicted ones in red, with how many have net harm."""
    order = np.argsort(mean_per_test)
    ax.bar(np.arange(len(order)), mean_per_test[order], color=np.where(wrong[order], "#cf222e", "#8c959f"), width=1.0)
    ax.axhline(0, color="black", lw=0.8)
    harmed = int((mean_per_test < 0).sum())
    ax.set(title="Net influence per test example: the mean of its top-k proponent and opponent scores (red: predicted wrongly)",
           xlabel="test examples, sorted by net influence", ylabel="mean score")
    ax.text(0.01, 0.95, f"{harmed} of {len(order)} test examples have net harm; influence_summary.csv lists each one, "
                        "report.html shows their opponents", transform=ax.transAxes, va="top", fontsize=10)


READABLE = {"n_test": "test images", "test_accuracy": "test accuracy", "mean_influence": "mean net influence",
            "proponent_label_agreement": "proponents with this label"}


@matplotlib.rc_context(PLAIN_TEXT)
def class_summary_figure(path: Path, name: str, stats: Dict[str, Any], helpful: List[Tuple[str, str]],
                         harmful: List[Tuple[str, str]], label_mix: Dict[str, int]) -> Path:
    """{class}_summary.png: accuracy and influence figures, the labels of its proponents, and its
    most helpful and harmful training images."""
    fig = plt.figure(figsize=(14, 8))
    gs = fig.add_gridspec(3, 2, height_ratios=[1.2, 1, 1], hspace=0.6, top=0.95, bottom=0.03)
    ax = fig.add_subplot(gs[0, 0])
    ax.axis("off")
    ax.text(0, 1, f"Class {name}", fontsize=15, weight="bold", va="top")
    ax.text(0, 0.7, "\n".join(f"{READABLE.get(k, k)}: {v:.3f}" if isinstance(v, float) else f"{READABLE.get(k, k)}: {v}"
                               for k, v in stats.items()),
            fontsize=10, va="top", family="monospace")
    ax = fig.add_subplot(gs[0, 1])
    names = list(label_mix)
    ax.bar(range(len(names)), [label_mix[n] for n in names], color=["#2da44e" if n == name else "#8c959f" for n in names])
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set(title="Labels of this class's top-k proponents")
    _image_row(fig, gs[1, :], helpful, 10, "Most helpful training images (label, summed score)", "#1a7f37")
    _image_row(fig, gs[2, :], harmful, 10, "Most harmful training images (label, summed score)", "#cf222e")
    return _save(fig, path)


@matplotlib.rc_context(PLAIN_TEXT)
def image_grid(path: Path, items: List[Tuple[str, str]], title: str, cols: int = 10, max_items: int = 100) -> Path:
    """A grid of captioned thumbnails (at most ``max_items``)."""
    items = items[:max_items]
    rows = max(1, -(-len(items) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 1.6 + 0.6), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k < len(items):
            ax.imshow(thumbnail(items[k][0]))
            ax.set_title(items[k][1], fontsize=9)
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)
