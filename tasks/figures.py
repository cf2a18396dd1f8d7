"""Figures of a finetuning run (pure matplotlib + numpy; no server is called here).

- :func:`accuracy_figure`: held-out top-1 against training batches, a dashed line at each loop boundary;
- :func:`class_histogram_figure`: how many images of each class every loop picked;
- :func:`selection_grid_figure`: the first images each loop picked, titled with class and caption;
- :func:`batches_to_accuracy_figure`: B2A, the batches each target accuracy took (when targets are set).

Every function returns a ``matplotlib.figure.Figure`` drawn with the non-interactive Agg backend; the caller
saves or logs it (``MlflowClient.log_figure``) and closes it (``matplotlib.pyplot.close``).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402


def accuracy_figure(curve: Sequence[tuple[int, float]], loop_ends: Sequence[int], *, title: str = "") -> Any:
    """Held-out top-1 against training batches with the loop boundaries.

    Args:
        curve: ``(global batch, top-1)`` points, batch 0 being the untrained model.
        loop_ends: the global batch at which each loop ended (loop l ends at ``loop_ends[l-1]``).
        title: the figure's title.

    Raises:
        ValueError: an empty curve.
    """
    if not curve:
        raise ValueError("accuracy_figure needs at least one (batch, top-1) point, got none")
    points = sorted((int(b), float(v)) for b, v in curve)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot([b for b, _ in points], [v for _, v in points], marker="o", markersize=3, color="#1f77b4")
    for i, end in enumerate(loop_ends):
        ax.axvline(int(end), color="grey", linestyle="--", linewidth=0.8)
        ax.text(int(end), 0.02, f" loop {i + 1}", rotation=90, va="bottom", ha="right", fontsize=8, color="grey",
                transform=ax.get_xaxis_transform())  # fmt: skip
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("training batches")
    ax.set_ylabel("held-out top-1")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Held-out accuracy during finetuning")
    fig.tight_layout()
    return fig


def class_histogram_figure(picks_per_loop: Mapping[int, Sequence[str]], class_names: Sequence[str]) -> Any:
    """Per-loop class histogram of the picked images (grouped bars, one group per class).

    Args:
        picks_per_loop: loop (1-based) -> class name of every image that loop picked.
        class_names: the classes, in label order (classes never picked get empty bars).
    """
    loops = sorted(picks_per_loop)
    names = list(class_names) or sorted({c for v in picks_per_loop.values() for c in v})
    x = np.arange(len(names))
    width = 0.8 / max(1, len(loops))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.5 * len(names) + 2), 3.6), dpi=100)
    for i, loop in enumerate(loops):
        counts = [sum(1 for c in picks_per_loop[loop] if c == name) for name in names]
        ax.bar(x + (i - (len(loops) - 1) / 2) * width, counts, width, label=f"loop {loop}")
    ax.set_xticks(x)
    ax.set_xticklabels([textwrap.shorten(str(n), 14, placeholder="…") for n in names], rotation=45, ha="right")
    ax.set_ylabel("images picked")
    ax.set_title("Classes of the images each loop selected")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def selection_grid_figure(
    images: Sequence[Any], titles: Sequence[str], *, columns: int = 8, title: str = "Selected images"
) -> Any:
    """A grid of images (PIL images or HxW[xC] arrays) with a short title under each.

    Raises:
        ValueError: no image, or a title count that differs from the image count.
    """
    if not images:
        raise ValueError("selection_grid_figure needs at least one image")
    if len(titles) != len(images):
        raise ValueError(f"selection_grid_figure got {len(images)} images but {len(titles)} titles")
    cols = max(1, min(columns, len(images)))
    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows + 0.4), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, text in zip(axes.ravel(), images, titles, strict=False):
        ax.imshow(np.asarray(image), cmap="gray" if np.asarray(image).ndim == 2 else None)
        ax.set_title("\n".join(textwrap.wrap(text, 18)[:3]), fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def batches_to_accuracy_figure(b2a: Mapping[float, int | None]) -> Any:
    """B2A: training batches needed to reach each target held-out accuracy (missing bars: never reached)."""
    if not b2a:
        raise ValueError("batches_to_accuracy_figure needs at least one target accuracy")
    targets = sorted(b2a)
    fig, ax = plt.subplots(figsize=(5.0, 3.2), dpi=100)
    values = [b2a[t] if b2a[t] is not None else 0 for t in targets]
    bars = ax.bar([f"{t:.0%}" for t in targets], values, color="#2ca02c")
    for bar, t in zip(bars, targets, strict=True):
        label = "not reached" if b2a[t] is None else str(b2a[t])
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("target held-out top-1")
    ax.set_ylabel("training batches")
    ax.set_title("Batches to accuracy (B2A)")
    fig.tight_layout()
    return fig


def batches_to_accuracy(curve: Sequence[tuple[int, float]], targets: Sequence[float]) -> dict[float, int | None]:
    """The first global batch at which the curve reaches each target (None: never)."""
    points = sorted((int(b), float(v)) for b, v in curve)
    return {float(t): next((b for b, v in points if v >= t), None) for t in targets}
