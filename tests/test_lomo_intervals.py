"""LOMO intervals that cover at BreaKHis' size: simulated studies against the known truth, pairing, patients as the unit.

The simulator: 7 benign and 17 malignant patients (a BreaKHis test fold), 3-9 images per patient and held-out
magnification, 4 magnifications, a patient random effect shared by all of a patient's images, and two arms whose
scores share it. The truth is analytic: for Gaussian scores the AUC is P(s_pos > s_neg) = Φ(d / √(2 var)).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from wsi_encoder.evaluation.patient_intervals import OVERALL_METRICS, FoldScores, patient_intervals


def _study(rng: np.random.Generator, *, n_benign: int = 7, n_malignant: int = 17, d: float = 2.6, d2: float = 2.3,
           su: float = 0.8, se: float = 0.6, s2: float = 0.3, folds: int = 4) -> tuple[list[FoldScores], float, float]:
    n = n_benign + n_malignant
    cls = np.r_[np.zeros(n_benign, int), np.ones(n_malignant, int)]
    u = rng.normal(0, su, n)
    out = []
    for m in range(folds):
        pid = np.repeat(np.arange(n), rng.integers(3, 10, n))
        y = cls[pid]
        e = rng.normal(0, se, len(pid))
        a = d * y + u[pid] + e
        b = d2 * y + u[pid] + e + rng.normal(0, s2, len(pid))
        out.append(FoldScores(y=y, patients=np.array([f"p{i}" for i in pid]), held_out=m,
                              prob={"baseline": 1 / (1 + np.exp(-a)), "grl": 1 / (1 + np.exp(-b))}))
    var = su**2 + se**2
    return out, float(norm.cdf(d / np.sqrt(2 * var))), float(norm.cdf(d2 / np.sqrt(2 * (var + s2**2))))


def _coverage(n_sim: int, **kw: float) -> tuple[float, float, float]:
    rng = np.random.default_rng(7)
    hits_auc, hits_delta = [], []
    for k in range(n_sim):
        folds, true_a, true_b = _study(rng, **kw)
        rows = {(r["arm"], r["metric"]): r for r in patient_intervals(folds, n_boot=500, seed=k, metrics=("auc",))}
        auc, delta = rows[("baseline", "auc")], rows[("grl", "delta_auc")]
        hits_auc.append(auc["ci_low"] <= true_a <= auc["ci_high"])
        hits_delta.append(delta["ci_low"] <= true_b - true_a <= delta["ci_high"])
    return float(np.mean(hits_auc)), float(np.mean(hits_delta)), true_a


@pytest.mark.slow
def test_overall_auc_and_delta_auc_intervals_cover_at_auc_097_with_7_and_17_patients() -> None:
    """400 simulated studies at AUC 0.967: 95% intervals must cover 0.92-0.98 (the percentile bootstrap gives 0.82)."""
    auc, delta, truth = _coverage(400)
    assert 0.95 <= truth <= 0.97
    assert 0.92 <= auc <= 0.98, auc
    assert 0.92 <= delta <= 0.98, delta


def test_intervals_cover_at_a_moderate_auc() -> None:
    auc, delta, truth = _coverage(120, d=1.9, d2=1.7)
    assert 0.89 <= truth <= 0.93
    assert 0.9 <= auc <= 1.0 and 0.9 <= delta <= 1.0, (auc, delta)


def test_patients_are_resampled_jointly_across_folds_and_images_alone_undercover() -> None:
    """Scored per image (each image its own 'patient'), the same method ignores the clustering and undercovers."""
    rng = np.random.default_rng(1)
    hits = {"patient": [], "image": []}
    for k in range(80):
        folds, true_a, _ = _study(rng)
        for kind in hits:
            use = folds if kind == "patient" else [
                FoldScores(y=f.y, prob=f.prob, held_out=f.held_out,
                           patients=np.array([f"{f.held_out}-{i}" for i in range(len(f.y))])) for f in folds]
            row = next(r for r in patient_intervals(use, n_boot=200, seed=k, metrics=("auc",)) if r["arm"] == "baseline")
            hits[kind].append(row["ci_low"] <= true_a <= row["ci_high"])
            assert row["n_folds"] == 4
    assert np.mean(hits["patient"]) >= 0.9
    assert np.mean(hits["image"]) < 0.8, hits  # the image-level resampling is what a wrong bootstrap would do


def test_paired_differences_are_exact_for_identical_arms_and_detect_a_real_loss() -> None:
    rng = np.random.default_rng(3)
    folds, _, _ = _study(rng)
    noisy = [FoldScores(y=f.y, patients=f.patients, held_out=f.held_out,
                        prob={"baseline": f.prob["baseline"], "same": f.prob["baseline"].copy(),
                              "noisy": rng.uniform(size=len(f.y))}) for f in folds]
    rows = {(r["arm"], r["metric"]): r for r in patient_intervals(noisy, n_boot=300)}
    same = rows[("same", "delta_auc")]
    assert same["estimate"] == 0 and same["ci_low"] == same["ci_high"] == 0
    assert rows[("noisy", "delta_auc")]["ci_high"] < 0  # a useless model is detected as worse
    assert ("baseline", "delta_auc") not in rows
    assert {m for a, m in rows if a == "baseline"} == set(OVERALL_METRICS)
    one = FoldScores(y=np.array([0, 0, 1, 1]), patients=np.array(["a", "a", "b", "b"]),
                     prob={"baseline": np.array([0.1, 0.2, 0.8, 0.9])})
    row = next(r for r in patient_intervals([one], n_boot=50) if r["metric"] == "auc")
    assert np.isnan(row["ci_low"]) and "one patient" in row["method"]  # no honest AUC interval


def test_every_overall_metric_equals_its_reference_on_the_unresampled_data() -> None:
    """At weight 1 each metric is scikit-learn's (or the toolkit's per-fold definition), so the intervals are of them."""
    from sklearn.metrics import (
        balanced_accuracy_score,
        brier_score_loss,
        f1_score,
        recall_score,
        roc_auc_score,
    )

    from wsi_encoder.evaluation.lomo_outputs import fold_metrics
    from wsi_encoder.evaluation.metrics import expected_calibration_error

    folds, _, _ = _study(np.random.default_rng(5), d=1.2, d2=1.0, folds=1)
    f = folds[0]
    p = f.prob["baseline"]
    rows = {r["metric"]: r["estimate"] for r in patient_intervals(folds, n_boot=20) if r["arm"] == "baseline"}
    pred = (p >= 0.5).astype(int)
    prevalence = f.y.mean()
    expected = {
        "auc": roc_auc_score(f.y, p),
        "brier": brier_score_loss(f.y, p),
        "f1": f1_score(f.y, pred),
        "balanced_accuracy": balanced_accuracy_score(f.y, pred),
        "specificity": recall_score(f.y, pred, pos_label=0),
        "benign_f1": f1_score(f.y, pred, pos_label=0),
        "brier_skill": 1 - brier_score_loss(f.y, p) / (prevalence * (1 - prevalence)),
        "ece": expected_calibration_error(f.y, p),
        "patient_auc": fold_metrics(f.y, p, f.patients)["patient_auc"],
    }
    assert set(rows) == set(expected)
    for name, value in expected.items():
        assert rows[name] == pytest.approx(value, abs=1e-9), name
