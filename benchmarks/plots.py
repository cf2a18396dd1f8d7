"""Plots of the quality benchmark: test top-1 vs training batches (the paper's Fig. 4) and batches to reach a
target accuracy per method (B2A, Fig. 5). Input: the ``summary`` of ``benchmarks/quality.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

COLORS = {
    "random": "#7f7f7f",
    "topk_loss": "#bcbd22",
    "coreset": "#17becf",
    "entropy": "#9467bd",
    "margin": "#8c564b",
    "activeft": "#1f77b4",
    "vecaf-ods": "#ff7f0e",
    "vecaf-ods-eq3": "#bcbd22",
    "vecaf": "#d62728",
    "full": "#2ca02c",
}
TARGET_COLORS = ["#1f77b4", "#ff7f0e", "#9467bd", "#8c564b"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(summary: dict[str, Any], methods: list[str], ratios: list[float], path: Path, *, title: str) -> Path:
    """One panel per selection ratio: mean test top-1 (over seeds) against training batches, one line per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(ratios), figsize=(5 * len(ratios), 4), sharey=True, squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        for m in methods:
            cell = summary.get(f"{m}@{ratio:g}")
            if cell is None:
                continue
            curve = np.asarray(cell["mean_curve"], dtype=float)
            style = "--" if m == "full" else "-"
            ax.plot(curve[:, 0], 100 * curve[:, 1], style, color=COLORS.get(m), label=f"{m} ({cell['seeds']} seeds)")
        ax.set_title(f"{ratio:.0%} of the pool per loop")
        ax.set_xlabel("training batches")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test top-1 (%)")
    for ax in axes[0]:
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_b2a(
    summary: dict[str, Any], methods: list[str], ratios: list[float], targets: list[float], path: Path, *, title: str
) -> Path:
    """One panel per ratio: bars of B2A (from the mean curve) per method and target; 'never' marked above."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(ratios), figsize=(5 * len(ratios), 4), sharey=True, squeeze=False)
    width = 0.8 / max(1, len(targets))
    budget = max((p[0] for cell in summary.values() for p in cell["mean_curve"]), default=1)
    for ax, ratio in zip(axes[0], ratios):
        for j, target in enumerate(targets):
            xs, heights, missing = [], [], []
            for i, m in enumerate(methods):
                cell = summary.get(f"{m}@{ratio:g}")
                if cell is None:
                    continue
                value = cell["b2a"][f"{target:.4f}"]["mean_curve"]
                x = i + (j - (len(targets) - 1) / 2) * width
                if value is None:
                    missing.append(x)
                else:
                    xs.append(x)
                    heights.append(max(value, 0.5))
            color = TARGET_COLORS[j % len(TARGET_COLORS)]
            ax.bar(xs, heights, width=width, label=f"B2A@{100 * target:.1f}%", alpha=0.85, color=color)
            if missing:
                ax.bar(missing, [budget] * len(missing), width=width, fill=False, hatch="//", edgecolor=color)
                for x in missing:
                    ax.text(x, budget * 1.08, "never", rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=35, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(0.4, budget * 2.5)
        ax.axhline(budget, color="k", lw=0.6, ls=":")
        ax.set_title(f"{ratio:.0%} of the pool per loop (dotted: budget; hatched: not reached)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("training batches (log)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
