"""The pictures a run shows people: learning curves, a confusion matrix, inspect's map (PNG).
matplotlib is imported inside the functions, Agg backend. Tables and files: ``runs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(history: dict[str, list[float]], path: str | Path, title: str) -> None:
    """Accuracy and loss per epoch, training vs held-out, side by side (as the seeds draw them)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
        if metric in history:
            ax.plot(epochs, history[metric], "bo-", ms=3, label=f"training {metric}")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], "r-", label=f"held-out {metric}")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str | Path, title: str) -> None:
    plt = pyplot()
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(2 + 0.6 * n, 1.6 + 0.6 * n))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(
                j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black"
            )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


MARKS = {  # finding -> (marker, colour, label) on inspect's map
    "leakage": ("o", "red", "leakage (near-copy in another split)"),
    "duplicates": ("s", "darkgreen", "near-duplicate within a split"),
    "label_issues": ("x", "black", "likely label error"),
    "outliers": ("^", "magenta", "outlier"),
}


def plot_embedding_map(
    xy: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    marks: dict[str, np.ndarray],
    path: str | Path,
    title: str,
) -> None:
    """inspect's 2-D map: one colour per class, each finding's rows (indices in ``marks``)
    drawn over them with its own marker."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 7))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    size = 6 if len(xy) > 5000 else 12
    for c, name in enumerate(class_names):
        pts = xy[labels == c]
        if len(pts):
            ax.scatter(pts[:, 0], pts[:, 1], s=size, color=cmap(c % cmap.N), alpha=0.5, linewidths=0, label=name)
    for finding, rows in marks.items():
        if len(rows) and finding in MARKS:
            marker, colour, label = MARKS[finding]
            style = {"color": colour} if marker == "x" else {"facecolors": "none", "edgecolors": colour}
            ax.scatter(
                xy[rows, 0], xy[rows, 1], s=60, marker=marker, linewidths=1.2, label=f"{label} ({len(rows)})", **style
            )
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8, markerscale=1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
