"""Files of a LOMO run: per-fold metrics, ``results.csv`` and the embeddings ``.npz`` files.

``DIR/results.csv``: :data:`RESULTS_COLUMNS`, one row per arm × held-out magnification (``held_out``
an int: 40, 100, 200, 400). ``*_ci_low``/``*_ci_high`` are 95 % patient-grouped bootstrap intervals;
the ``delta_*`` columns are the arm minus the baseline on the same resampled patients (paired), empty
for the baseline itself; ``grl_lambda`` (the reversal coefficient at the kept epoch) is empty for the
other arms.

``DIR/embeddings/<arm>/heldout_<m>.npz`` (plain ``np.savez``, loads with ``allow_pickle=False``):
``X_train (n, D) float32``, ``y_train (n,) int64`` (0 benign, 1 malignant), ``patient_train (n,)``
fixed-width unicode, ``magnification_train (n,) int64``, ``filename_train (n,)`` unicode, the same
five with ``_test``, and ``prob_test (n,) float32`` (the arm's P(malignant) on the test images).
The ``_train`` arrays hold every training-side patient's images used in the fold (fitting and
validation patients), at the three training magnifications. Optional ``X_probe``,
``patient_probe``, ``magnification_probe``, ``filename_probe``: the test patients' images at the
training magnifications (role ``probe_test``), for the magnification probe only.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.metrics import roc_auc_score

from wsi_encoder.errors import DatasetError
from wsi_encoder.evaluation.metrics import classification_metrics
from wsi_encoder.io.files import atomic_path, atomic_write_csv

RESULTS_COLUMNS = (
    "arm",
    "held_out",
    "auc",
    "f1",
    "balanced_accuracy",
    "brier",
    "ece",
    "n_test_images",
    "n_test_patients",
    "patient_auc",
    "auc_ci_low",
    "auc_ci_high",
    "brier_ci_low",
    "brier_ci_high",
    "f1_ci_low",
    "f1_ci_high",
    "ece_ci_low",
    "ece_ci_high",
    "patient_auc_ci_low",
    "patient_auc_ci_high",
    "delta_auc",
    "delta_auc_ci_low",
    "delta_auc_ci_high",
    "delta_brier",
    "delta_brier_ci_low",
    "delta_brier_ci_high",
    "selected_epoch",
    "grl_lambda",
)
#: Columns that are integers; the others are floats (empty = not applicable).
INT_COLUMNS = ("held_out", "n_test_images", "n_test_patients", "selected_epoch")
PROBE_KEYS = ("X_probe", "patient_probe", "magnification_probe", "filename_probe")
EMBEDDING_KEYS = (
    "X_train",
    "y_train",
    "patient_train",
    "magnification_train",
    "filename_train",
    "X_test",
    "y_test",
    "patient_test",
    "magnification_test",
    "filename_test",
    "prob_test",
)


def fold_metrics(
    y_true: npt.ArrayLike, prob: npt.ArrayLike, patients: npt.ArrayLike, threshold: float = 0.5
) -> dict[str, float]:
    """Image- and patient-level metrics of one fold's test predictions.

    Image level: AUC, F1 (malignant positive), balanced accuracy, accuracy, Brier, ECE (see
    :func:`~wsi_encoder.evaluation.metrics.classification_metrics`). Patient level: ``patient_auc``
    (AUC of each patient's mean probability against the patient's class) and
    ``patient_recognition_rate`` (Spanhol et al. 2016: mean over patients of the share of the patient's
    images classified correctly). Undefined values are nan.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(prob, dtype=np.float64)
    g = np.asarray(patients).astype(str)
    out = classification_metrics(y, p, threshold)
    out["n_test_images"] = len(y)
    uniq = np.unique(g)
    out["n_test_patients"] = len(uniq)
    if len(uniq):
        mean_p = np.array([p[g == u].mean() for u in uniq])
        label = np.array([np.bincount(y[g == u], minlength=2).argmax() for u in uniq])
        rr = np.array([np.mean((p[g == u] >= threshold) == y[g == u]) for u in uniq])
        out["patient_auc"] = float(roc_auc_score(label, mean_p)) if len(np.unique(label)) == 2 else math.nan
        out["patient_recognition_rate"] = float(rr.mean())
    else:
        out["patient_auc"] = math.nan
        out["patient_recognition_rate"] = math.nan
    return out


def write_results_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``results.csv`` (contract columns, in order; nan as ``nan``, not applicable as empty) atomically."""
    path = Path(path)
    lines = []
    for row in rows:
        values = []
        for col in RESULTS_COLUMNS:
            v = row.get(col)
            if v is None:
                values.append("")
            elif col in INT_COLUMNS:
                values.append(str(int(v)))
            elif isinstance(v, float):
                values.append("nan" if math.isnan(v) else f"{v:.6f}")
            else:
                values.append(str(v))
        lines.append(values)
    atomic_write_csv(path, lines, header=RESULTS_COLUMNS)
    return path


def read_results_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``results.csv`` with numbers parsed (``held_out`` and counts as int, empty as None)."""
    path = Path(path)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != RESULTS_COLUMNS:
            raise DatasetError(f"{path}: columns {reader.fieldnames!r}, expected {list(RESULTS_COLUMNS)}")
        rows = []
        for raw in reader:
            row: dict[str, Any] = {"arm": raw["arm"]}
            for col in RESULTS_COLUMNS[1:]:
                text = raw[col]
                row[col] = None if text == "" else int(text) if col in INT_COLUMNS else float(text)
            rows.append(row)
    return rows


def save_fold_embeddings(path: str | Path, arrays: Mapping[str, npt.ArrayLike]) -> Path:
    """Write a fold's embeddings ``.npz`` (the :data:`EMBEDDING_KEYS`, typed as documented) atomically."""
    path = Path(path)
    missing = [k for k in EMBEDDING_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"embedding arrays {missing} are missing")
    typed: dict[str, np.ndarray] = {}
    for side in ("train", "test"):
        x = np.asarray(arrays[f"X_{side}"], dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"X_{side} must be (n, D), got shape {x.shape}")
        n = len(x)
        typed[f"X_{side}"] = x
        typed[f"y_{side}"] = np.asarray(arrays[f"y_{side}"], dtype=np.int64).reshape(n)
        typed[f"magnification_{side}"] = np.asarray(arrays[f"magnification_{side}"], dtype=np.int64).reshape(
            n
        )
        for key in (f"patient_{side}", f"filename_{side}"):
            values = [str(v) for v in np.asarray(arrays[key]).reshape(-1)]
            width = max([len(v) for v in values] + [1])
            typed[key] = np.array(values, dtype=f"<U{width}").reshape(n)
    typed["prob_test"] = np.asarray(arrays["prob_test"], dtype=np.float32).reshape(len(typed["X_test"]))
    if "X_probe" in arrays:
        x = np.asarray(arrays["X_probe"], dtype=np.float32).reshape(-1, typed["X_train"].shape[1])
        typed["X_probe"] = x
        typed["magnification_probe"] = np.asarray(arrays["magnification_probe"], dtype=np.int64).reshape(len(x))
        for key in ("patient_probe", "filename_probe"):
            values = [str(v) for v in np.asarray(arrays[key]).reshape(-1)]
            typed[key] = np.array(values, dtype=f"<U{max([len(v) for v in values] + [1])}").reshape(len(x))
    with atomic_path(path) as tmp:
        np.savez(tmp, **typed)  # type: ignore[arg-type]
    return path


def load_fold_embeddings(path: str | Path, required: Sequence[str] = EMBEDDING_KEYS) -> dict[str, np.ndarray]:
    """Read a fold's embeddings ``.npz`` (no pickles); raises :class:`DatasetError` when a ``required`` key is missing."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read the embeddings file ({exc})") from exc
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DatasetError(
            f"{path}: lacks array(s) {', '.join(missing)} (expected the `wsienc lomo` embeddings layout)"
        )
    return arrays
