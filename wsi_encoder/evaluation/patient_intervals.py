"""Intervals that cover with few patients: one patient-grouped resampling behind every LOMO number.

A LOMO estimate is a mean over held-out magnifications (one or several folds) of a metric of the
test images; the folds share their test patients, and images of one patient are correlated, so the
unit of resampling is the **patient**, drawn once for all folds (and, over ``--repeats``, once for
all repeats, which are themselves resampled). Each statistic is computed under a ``(B, n_patients)``
matrix of patient multiplicities, so every arm is scored on the same resampled patients (paired
differences).

Two interval methods, chosen by simulation (``tests/test_lomo_intervals.py``: 7 benign / 17
malignant patients, ~6 images per patient and magnification, a patient random effect, 4 folds, 400
simulated studies), because the percentile bootstrap undercovers at the AUCs BreaKHis gives (0.82 at
AUC 0.97). Measured coverage of the 95% intervals:

* ``auc``: a t interval on the logit scale, its standard error the grouped (leave-one-patient-out)
  jackknife of logit(AUC), on ``min(patients per class) - 1`` degrees of freedom (the AUC's variance
  is driven by the rarer class): 0.95 at AUC 0.97 (7/17 patients), 0.965 at 0.91, 0.98 at 0.76,
  0.94 at 0.97 with 12/12;
* every other metric and every difference (``delta_auc``, ``delta_brier`` ...): the BCa bootstrap,
  its acceleration from the same grouped jackknife: ΔAUC 0.94 at AUC 0.97, 0.955 at 0.91, 0.92 at
  0.76, 0.94 with 12/12. An AUC of exactly 0 or 1 (no logit) gets the BCa interval too.

Nothing here fits a model; it only rescores fixed predictions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import norm
from scipy.stats import t as t_dist

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.evaluation.metrics import weighted_auc

FloatArray = npt.NDArray[np.float64]

#: The metrics of an overall estimate (mean over folds). BreaKHis is ~69% malignant, so the benign class gets its own
#: (``specificity``, ``benign_f1``), and ``brier_skill`` is 1 - Brier / the Brier of predicting the fold's prevalence.
OVERALL_METRICS = (
    "auc", "brier", "f1", "balanced_accuracy", "specificity", "benign_f1", "brier_skill", "ece", "patient_auc",
)
#: The metrics whose difference to the baseline is reported.
DELTA_METRICS = ("auc", "brier")


@dataclass(frozen=True)
class FoldScores:
    """One fold's test images, scored by every arm: labels, patients and each arm's P(malignant)."""

    y: npt.NDArray[np.int64]
    patients: npt.NDArray[np.str_]
    prob: Mapping[str, FloatArray]
    repeat: int = 0
    held_out: int = 0


def _weighted(y: npt.NDArray[np.int64], p: FloatArray, w: FloatArray, metric: str) -> FloatArray:
    """``metric`` of predictions ``p`` under each row of image weights ``w`` (B, n); nan where undefined."""
    if metric == "auc":
        return np.asarray(weighted_auc(y, p, w), dtype=np.float64)
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "brier":
            return np.asarray((w @ (p - (y == 1)) ** 2) / total, dtype=np.float64)
        pred = p >= 0.5
        tp, fp = w @ (pred & (y == 1)), w @ (pred & (y == 0))
        fn, tn = w @ (~pred & (y == 1)), w @ (~pred & (y == 0))
        if metric == "f1":
            return np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        if metric == "balanced_accuracy":
            return 0.5 * (tp / (tp + fn) + tn / (tn + fp))
        if metric == "specificity":
            return tn / (tn + fp)
        if metric == "benign_f1":
            return np.where(2 * tn + fp + fn > 0, 2 * tn / (2 * tn + fp + fn), np.nan)
        if metric == "brier_skill":
            prevalence = (w @ (y == 1)) / total
            reference = prevalence * (1 - prevalence)
            brier = (w @ (p - (y == 1)) ** 2) / total
            return np.where(reference > 0, 1 - brier / np.where(reference > 0, reference, 1.0), np.nan)
        if metric == "ece":  # 10 equal-width bins of P(malignant), as evaluation.metrics.expected_calibration_error
            bins = np.minimum((p * 10).astype(int), 9)
            ece = np.zeros(w.shape[0])
            for b in range(10):
                sel = bins == b
                if sel.any():
                    wb = w[:, sel]
                    mass = wb.sum(axis=1)
                    gap = np.abs(wb @ (y[sel] == 1) - wb @ p[sel]) / np.where(mass > 0, mass, 1.0)
                    ece += mass / total * gap
            return ece
    raise InvalidParameterError(f"unknown metric {metric!r}")


def _patient_auc(y: npt.NDArray[np.int64], p: FloatArray, idx: npt.NDArray[np.int64], w: FloatArray) -> FloatArray:
    """AUC of each patient's mean P(malignant) against the patient's class, patients weighted by ``w`` (B, P)."""
    patients, inverse = np.unique(idx, return_inverse=True)
    mean_p = np.bincount(inverse, weights=p) / np.bincount(inverse)
    label = np.zeros(len(patients), dtype=np.int64)
    label[inverse] = y
    return np.asarray(weighted_auc(label, mean_p, w[:, patients]), dtype=np.float64)


class _Design:
    """The folds indexed by one patient axis (and one repeat axis) for joint resampling."""

    def __init__(self, folds: Sequence[FoldScores]) -> None:
        if not folds:
            raise InvalidParameterError("no folds to estimate from")
        self.folds = list(folds)
        self.patients = np.unique(np.concatenate([f.patients.astype(str) for f in folds]))
        self.index = [np.searchsorted(self.patients, f.patients.astype(str)) for f in folds]
        self.repeats = sorted({f.repeat for f in folds})
        self.repeat_of = [self.repeats.index(f.repeat) for f in folds]
        label: dict[str, int] = {}
        for f in folds:
            for pid, yy in zip(f.patients.astype(str), f.y, strict=True):
                label.setdefault(pid, int(yy))
        counts = np.bincount(np.array(list(label.values()), dtype=np.int64), minlength=2)
        self.min_class_patients = int(counts.min())

    @staticmethod
    def _fold(f: FoldScores, idx: npt.NDArray[np.int64], p: FloatArray, w: FloatArray, metric: str) -> FloatArray:
        if metric == "patient_auc":
            return _patient_auc(f.y, p, idx, w)
        return _weighted(f.y, p, w[:, idx], metric)

    def statistic(self, arm: str, metric: str, w: FloatArray, r: FloatArray, baseline: str | None) -> FloatArray:
        """Under patient weights ``w`` (B, P) and repeat weights ``r`` (B, R): the repeat-weighted mean over
        repeats of the mean over each repeat's folds (minus the baseline's when ``baseline``)."""
        per_repeat = np.zeros((w.shape[0], len(self.repeats)))
        n_folds = np.zeros(len(self.repeats))
        for f, idx, rep in zip(self.folds, self.index, self.repeat_of, strict=True):
            value = self._fold(f, idx, f.prob[arm], w, metric)
            if baseline is not None:
                value = value - self._fold(f, idx, f.prob[baseline], w, metric)
            per_repeat[:, rep] += value
            n_folds[rep] += 1
        per_repeat /= n_folds
        return (per_repeat * r).sum(axis=1) / r.sum(axis=1)


def _bca(estimate: float, boot: FloatArray, jack: FloatArray, alpha: float) -> tuple[float, float]:
    boot = boot[np.isfinite(boot)]
    jack = jack[np.isfinite(jack)]
    if boot.size < 10 or not np.isfinite(estimate):
        return (float("nan"), float("nan"))
    below = (boot < estimate).mean() + 0.5 * (boot == estimate).mean()
    z0 = norm.ppf(np.clip(below, 1e-6, 1 - 1e-6))
    acc = 0.0
    if jack.size >= 2:
        d = jack.mean() - jack
        den = 6.0 * float((d**2).sum()) ** 1.5
        acc = float((d**3).sum()) / den if den > 0 else 0.0
    z = norm.ppf([alpha / 2, 1 - alpha / 2])
    q = norm.cdf(z0 + (z0 + z) / (1 - acc * (z0 + z)))
    lo, hi = np.quantile(boot, q)
    return (float(lo), float(hi))


def _logit_t(estimate: float, jack: FloatArray, df: int, alpha: float) -> tuple[float, float]:
    """A t interval on the logit scale, its standard error the grouped jackknife of logit(AUC) itself."""
    jack = jack[np.isfinite(jack)]
    n = jack.size
    if n < 3 or df < 1 or not 0.0 < estimate < 1.0:
        return (float("nan"), float("nan"))
    eps = 1e-9
    logits = np.log(np.clip(jack, eps, 1 - eps) / (1 - np.clip(jack, eps, 1 - eps)))
    se = float(np.sqrt((n - 1) / n * ((logits - logits.mean()) ** 2).sum()))
    centre = np.log(estimate / (1 - estimate))
    half = t_dist.ppf(1 - alpha / 2, df) * se
    lo, hi = 1 / (1 + np.exp(-(centre - half))), 1 / (1 + np.exp(-(centre + half)))
    return (float(lo), float(hi))


def patient_intervals(
    folds: Sequence[FoldScores],
    *,
    baseline: str | None = "baseline",
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    metrics: Sequence[str] = OVERALL_METRICS,
) -> list[dict[str, Any]]:
    """Estimates with intervals of every arm: the mean over ``folds`` of each metric, and the differences to ``baseline``.

    Parameters
    ----------
    folds
        Every fold's (and repeat's) test images scored by the same arms.
    baseline
        The arm the others are compared with (``delta_<metric>`` rows: arm minus baseline), or None.
    n_boot, alpha, seed
        Bootstrap resamples (patients, jointly over folds; repeats too), 1 - coverage, and the seed.
    metrics
        Which of :data:`OVERALL_METRICS` to estimate.

    Returns
    -------
    list of dict
        ``{"arm", "metric", "estimate", "ci_low", "ci_high", "method", "n_patients", "n_folds"}`` rows.
        AUC intervals are nan when a class has fewer than 2 patients.
    """
    design = _Design(folds)
    arms = list(folds[0].prob)
    n_p, n_r = len(design.patients), len(design.repeats)
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n_p, np.full(n_p, 1.0 / n_p), size=n_boot).astype(float)
    r = (
        rng.multinomial(n_r, np.full(n_r, 1.0 / n_r), size=n_boot).astype(float)
        if n_r > 1
        else np.ones((n_boot, 1))
    )
    jack_w = np.ones((n_p, n_p)) - np.eye(n_p)
    ones_w, ones_r = np.ones((1, n_p)), np.ones((1, n_r))
    jack_r = np.ones((n_p, n_r))
    rows = []
    for arm in arms:
        wanted: list[tuple[str, str | None]] = [(m, None) for m in metrics]
        if baseline is not None and arm != baseline and baseline in arms:
            wanted += [(m, baseline) for m in DELTA_METRICS]
        for metric, base in wanted:
            estimate = float(design.statistic(arm, metric, ones_w, ones_r, base)[0])
            jack = design.statistic(arm, metric, jack_w, jack_r, base)
            auc_defined = design.min_class_patients >= 2
            if metric in ("auc", "patient_auc") and not auc_defined:
                interval, method = (float("nan"), float("nan")), "undefined (a class has one patient)"
            elif metric == "auc" and base is None and 0.0 < estimate < 1.0:
                interval = _logit_t(estimate, jack, design.min_class_patients - 1, alpha)
                method = "logit grouped-jackknife t"
            else:  # differences, the other metrics, and an AUC of exactly 0 or 1 (no logit)
                interval = _bca(estimate, design.statistic(arm, metric, w, r, base), jack, alpha)
                method = "BCa patient bootstrap"
            rows.append({
                "arm": arm,
                "metric": metric if base is None else f"delta_{metric}",
                "estimate": estimate,
                "ci_low": interval[0],
                "ci_high": interval[1],
                "method": method,
                "n_patients": n_p,
                "n_folds": len(folds),
            })
    return rows
