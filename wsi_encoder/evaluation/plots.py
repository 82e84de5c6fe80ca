"""Pictures of a slide classifier's cross-validation: reliability diagram and ROC curves.

They are drawn with matplotlib's Agg backend (no display needed) and written atomically as PNG. Heatmaps
over slide thumbnails are drawn with Pillow (:mod:`wsi_encoder.evaluation.heatmaps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure

from wsi_encoder.io.files import atomic_write_figure

if TYPE_CHECKING:
    pass


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` as PNG (atomically, :func:`wsi_encoder.io.files.atomic_write_figure`) and close it."""
    path = Path(path)
    try:
        atomic_write_figure(path, fig, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_reliability(
    y_true: npt.ArrayLike, prob: npt.ArrayLike, path: str | Path, *, title: str = "", n_bins: int = 10
) -> Path:
    """Reliability diagram: observed frequency vs predicted probability per bin, with bin counts below.

    Binary ``prob`` (1-D, P(positive)): frequency of the positive class. Multi-class ``(n, k)``:
    top-label confidence vs accuracy.
    """
    # Imported here (it pulls in scikit-learn): heatmaps alone should not pay for it.
    from wsi_encoder.evaluation.metrics import expected_calibration_error, reliability_curve

    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=float)
    conf, freq, count = reliability_curve(y, p, n_bins)
    ece = expected_calibration_error(y, p, n_bins)
    edges = np.linspace(0, 1, n_bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(4.8, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfect calibration")
    ok = count > 0
    ax.bar(centers[ok], freq[ok], width=1 / n_bins * 0.9, color="#9ecae1", edgecolor="#3182bd", label="observed")
    ax.plot(conf[ok], freq[ok], "o", color="#08519c", ms=5, label="(mean prediction, observed) per bin")
    binary = p.ndim == 1
    ax.set_ylabel("observed frequency of positive class" if binary else "accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}\nreliability (ECE {ece:.3f}, n={len(y)})".strip())
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    axc.bar(centers, count, width=1 / n_bins * 0.9, color="0.6")
    axc.set_xlabel("predicted probability of positive class" if binary else "confidence (top class)")
    axc.set_ylabel("slides")
    return save_figure(fig, path)


def plot_roc(
    y_true: npt.ArrayLike,
    prob: npt.ArrayLike,
    path: str | Path,
    *,
    classes: Sequence[str] = ("0", "1"),
    fold_of: npt.ArrayLike | None = None,
    title: str = "",
) -> Path:
    """ROC curve(s) of pooled out-of-fold predictions.

    Binary: the pooled curve, and each fold's curve faintly when ``fold_of`` is given. Multi-class:
    one-vs-rest curves per class with the macro AUC in the title.
    """
    # Imported here, not with the module: heatmaps (`wsienc predict`) are drawn without scikit-learn.
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=float)
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1)
    if p.ndim == 1:
        if fold_of is not None:
            folds = np.asarray(fold_of)
            for i, f in enumerate(np.unique(folds[folds >= 0])):
                sel = folds == f
                if len(np.unique(y[sel])) == 2:
                    fpr, tpr, _ = roc_curve(y[sel], p[sel])
                    ax.plot(fpr, tpr, color="0.7", lw=1, label="folds" if i == 0 else None)
        fpr, tpr, _ = roc_curve(y, p)
        auc = roc_auc_score(y, p)
        ax.plot(fpr, tpr, color="#cb181d", lw=2, label=f"pooled out-of-fold (AUC {auc:.3f})")
        heading = f"ROC, positive class {classes[1]!r}"
    else:
        aucs = []
        cmap = plt.get_cmap("tab10")
        for c, name in enumerate(classes):
            hit = (y == c).astype(int)
            if 0 < hit.sum() < len(hit):
                fpr, tpr, _ = roc_curve(hit, p[:, c])
                aucs.append(roc_auc_score(hit, p[:, c]))
                ax.plot(fpr, tpr, color=cmap(c % 10), lw=1.6, label=f"{name} vs rest (AUC {aucs[-1]:.3f})")
        heading = f"ROC one-vs-rest, macro AUC {np.mean(aucs):.3f}" if aucs else "ROC"
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(f"{title}\n{heading}".strip())
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    return save_figure(fig, path)
