"""Pictures of a train-encoder run: what the encoder is shown, and how each task learns.

``augmentations.png``: for each task, the centred evaluation view and a few augmented training views
of the same images, exactly as the encoder receives them (field of view at the encoder's µm/px,
flips/rotations, HED colour jitter). A wrong µm/px shows at a glance as tissue at the wrong scale.

``training_curves.png``: per task, the training and validation loss and the validation AUC /
balanced accuracy per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_encoder.io.files import atomic_write_figure
from wsi_encoder.tasks.data import TaskData
from wsi_encoder.training.augment import AugmentConfig, colour_augment, sample_view


def plot_augmentations(
    path: str | Path,
    tasks: Sequence[TaskData],
    names: Sequence[str],
    *,
    input_size: int,
    input_mpp: float,
    augment: AugmentConfig,
    seed: int = 0,
    n_images: int = 3,
    n_views: int = 4,
) -> Path:
    """Write a grid: one row per (task, image), the evaluation view then ``n_views`` training views.

    Returns
    -------
    Path
        The PNG written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for name, data in zip(names, tasks, strict=True):
        picks = np.random.default_rng(seed).permutation(len(data))[:n_images]
        rows += [(name, data, int(i)) for i in picks]
    cols = 1 + n_views
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.7 * len(rows)), squeeze=False)
    for r, (name, data, i) in enumerate(rows):
        image = data.source.read(i)
        mpp = float(data.mpp[i])
        views = [sample_view(image, input_size=input_size, input_mpp=input_mpp, src_mpp=mpp, rng=None)]
        for v in range(n_views):
            rng = np.random.default_rng([seed, r, v])
            view = sample_view(image, input_size=input_size, input_mpp=input_mpp, src_mpp=mpp, rng=rng, config=augment)
            views.append(colour_augment(view, rng, augment))
        for c, view in enumerate(views):
            ax = axes[r, c]
            ax.imshow(view)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                scale = "native px" if not math.isfinite(mpp) else f"{mpp:.3g} µm/px"
                ax.set_ylabel(f"{name}\n{data.classes[int(data.labels[i])]}\n({scale})", fontsize=7)
            if r == 0:
                ax.set_title("evaluation view" if c == 0 else f"training view {c}", fontsize=8)
    fig.suptitle(f"encoder input: {input_size} px at {input_mpp:g} µm/px", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    atomic_write_figure(out, fig, dpi=100)
    plt.close(fig)
    return out


def plot_training_curves(path: str | Path, history: Sequence[dict[str, Any]], names: Sequence[str]) -> Path:
    """Write per-task loss (train, validation) and validation AUC / balanced accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 5.2), squeeze=False)
    epochs = [h["epoch"] for h in history]

    def series(name: str, part: str, key: str) -> list[float]:
        out = []
        for h in history:
            src = h.get(part, {}).get(name) if part == "validation" else h.get(part, {})
            value = (src or {}).get(key) if part == "validation" else (src or {}).get(name)
            out.append(np.nan if value is None else float(value))
        return out

    for k, name in enumerate(names):
        ax = axes[0, k]
        ax.plot(epochs, series(name, "train_loss", ""), "o-", label="train")
        ax.plot(epochs, series(name, "validation", "loss"), "s-", label="validation")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("cross-entropy")
        ax.legend(fontsize=7)
        ax = axes[1, k]
        ax.plot(epochs, series(name, "validation", "auc"), "o-", label="AUC")
        ax.plot(epochs, series(name, "validation", "balanced_accuracy"), "s-", label="balanced accuracy")
        ax.set_ylim(0, 1.02)
        for a in axes[:, k]:
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    atomic_write_figure(out, fig, dpi=100)
    plt.close(fig)
    return out
