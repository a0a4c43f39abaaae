"""Plots for benchmarks and reports (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_method_bars(labels: list[str], series: dict[str, list[float]], path: str | Path, title: str = "") -> None:
    """One panel per series, one bar per method, values written on the bars."""
    fig, axes = plt.subplots(1, len(series), figsize=(5 + 1.1 * len(labels), 4), squeeze=False)
    for ax, (name, values) in zip(axes[0], series.items()):
        bars = ax.bar(range(len(values)), values, color=["#888888"] + ["#3b75af"] * (len(values) - 1))
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.6, linestyle="--")
        ax.set_title(name)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
