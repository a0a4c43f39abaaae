"""Plots for benchmarks and reports (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


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


def plot_tpf_distribution(per_method: dict[str, list[float]], path: str | Path) -> None:
    """Histogram of per-prompt tokens per forward pass, one outline per method."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    values = [v for vs in per_method.values() for v in vs]
    bins = [1.0 + 0.1 * i for i in range(int((max(values + [1.5]) - 1.0) / 0.1) + 2)]
    for name, vs in per_method.items():
        ax.hist(vs, bins=bins, histtype="step", linewidth=1.5, label=name)
    ax.set_xlabel("tokens per forward pass (per prompt)")
    ax.set_ylabel("prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_trajectories(panels: dict[str, list[list[int]]], path: str | Path) -> None:
    """Jacobi trajectories of one block, as in the CLLM paper's figure: one row per iteration,
    one column per block position; green where the token already equals the fixed point, red not."""
    from matplotlib.colors import ListedColormap

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (name, states) in zip(axes[0], panels.items()):
        fixed = states[-1]
        grid = [[1 if token == fixed[i] else 0 for i, token in enumerate(state)] for state in states]
        ax.imshow(grid, cmap=ListedColormap(["#d9534f", "#5cb85c"]), vmin=0, vmax=1, aspect="auto")
        ax.set_xlabel("block position")
        ax.set_ylabel("Jacobi iteration")
        ax.set_title(f"{name}: {len(states)} states", fontsize=9)
        ax.set_xticks(range(len(fixed)))
        ax.set_yticks(range(len(states)))
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_acceptance(per_method: dict[str, dict], path: str | Path) -> None:
    """Share of passes accepting each draft position: one line per method and candidate."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = {"committed": "-", "drafter": "--", "lookup": ":"}
    for name, summary in per_method.items():
        for candidate, figures in summary.items():
            shares = figures["by_position"]
            if candidate != "committed" and all(v == 0 for v in shares):
                continue  # a candidate the row did not verify
            ax.plot(range(1, len(shares) + 1), shares, styles.get(candidate, "-"), marker="o",
                    label=f"{name}: {candidate}")
    ax.set_xlabel("draft position")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # positions are whole drafts
    ax.set_ylabel("share of passes accepting it")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
