"""Classification metrics (scikit-learn based): AUC, F1, balanced accuracy, Brier, ECE, patient-bootstrap CIs.

Binary problems take the probability of the positive class ``prob`` of shape ``(n,)``; multi-class
problems take ``prob`` of shape ``(n, k)`` and report macro AUC (one-vs-rest) and macro F1. A metric
that is undefined on the data (AUC with one class present) is ``nan``, never an exception.

Intervals (:mod:`wsi_encoder.evaluation.patient_intervals`, and the classify bootstrap) always resample *patients* (every image of a drawn patient comes
along): images of one patient are correlated, and resampling images gives intervals that are too
narrow.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

FloatArray = npt.NDArray[np.floating]
METRIC_NAMES = ("auc", "f1", "balanced_accuracy", "accuracy", "brier", "ece")


def expected_calibration_error(y_true: npt.ArrayLike, prob: npt.ArrayLike, n_bins: int = 10) -> float:
    """ECE with ``n_bins`` equal-width confidence bins.

    Binary (``prob`` 1-D, P(class 1)): compares the predicted probability with the observed frequency
    of class 1 in each bin. Multi-class (``prob`` 2-D): top-label ECE (confidence vs accuracy).
    """
    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=float)
    if y.size == 0:
        return float("nan")
    if p.ndim == 1:
        conf, hit = p, (y == 1).astype(float)
    else:
        conf, hit = p.max(axis=1), (p.argmax(axis=1) == y).astype(float)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(hit[sel].mean() - conf[sel].mean())
    return float(ece)


def brier_score(y_true: npt.ArrayLike, prob: npt.ArrayLike) -> float:
    """Brier score: mean squared error of the probabilities (summed over classes when multi-class)."""
    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=float)
    if y.size == 0:
        return float("nan")
    if p.ndim == 1:
        return float(np.mean((p - (y == 1)) ** 2))
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def classification_metrics(y_true: npt.ArrayLike, prob: npt.ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """AUC, F1, balanced accuracy, accuracy, Brier and ECE of probabilistic predictions.

    ``y_true`` holds integer class indices. Binary: ``prob`` is P(class 1) and predictions are
    ``prob >= threshold``. Multi-class: ``prob`` is ``(n, k)``, predictions the arg-max, AUC and F1 macro.
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(prob, dtype=float)
    if p.ndim == 2 and p.shape[1] == 2:
        p = p[:, 1]
    if p.ndim == 1:
        pred = (p >= threshold).astype(int)
        auc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
        f1 = float(f1_score(y, pred, zero_division=0)) if y.size else float("nan")
    else:
        pred = p.argmax(axis=1)
        present = np.unique(y)
        if len(present) == p.shape[1]:
            auc = float(roc_auc_score(y, p, multi_class="ovr", average="macro"))
        elif len(present) >= 2:
            # Macro one-vs-rest over the classes present (sklearn refuses absent classes).
            auc = float(np.mean([roc_auc_score(y == c, p[:, c]) for c in present]))
        else:
            auc = float("nan")
        f1 = float(f1_score(y, pred, average="macro", zero_division=0)) if y.size else float("nan")
    if y.size == 0:
        return dict.fromkeys(METRIC_NAMES, float("nan"))
    return {
        "auc": auc,
        "f1": f1,
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(np.unique(y)) > 1 else float(np.mean(pred == y)),
        "accuracy": float(np.mean(pred == y)),
        "brier": brier_score(y, p),
        "ece": expected_calibration_error(y, p),
    }


def reliability_curve(y_true: npt.ArrayLike, prob: npt.ArrayLike, n_bins: int = 10) -> tuple[FloatArray, FloatArray, npt.NDArray[np.int_]]:
    """Per-bin mean confidence, observed frequency and count (empty bins are nan / 0), for reliability plots."""
    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=float)
    if p.ndim == 1:
        conf, hit = p, (y == 1).astype(float)
    else:
        conf, hit = p.max(axis=1), (p.argmax(axis=1) == y).astype(float)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    mean_conf = np.full(n_bins, np.nan)
    freq = np.full(n_bins, np.nan)
    count = np.zeros(n_bins, dtype=int)
    for b in range(n_bins):
        sel = bins == b
        count[b] = int(sel.sum())
        if count[b]:
            mean_conf[b] = conf[sel].mean()
            freq[b] = hit[sel].mean()
    return mean_conf, freq, count


def weighted_auc(y_true: npt.ArrayLike, score: npt.ArrayLike, weights: npt.ArrayLike) -> FloatArray:
    """AUC (ties count one half) of ``score`` against binary ``y_true`` under each row of ``weights``.

    ``weights`` is ``(B, n)`` (or ``(n,)``): the multiplicity of every sample in each of B resamples.
    Returns ``(B,)``; nan where a resample holds no positive or no negative weight.
    """
    y = np.asarray(y_true).astype(int)
    s = np.asarray(score, dtype=float)
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    uniq, inv = np.unique(s, return_inverse=True)
    onehot = np.zeros((len(s), len(uniq)))
    onehot[np.arange(len(s)), inv] = 1.0
    pos = (w * (y == 1)) @ onehot
    neg = (w * (y == 0)) @ onehot
    below = np.cumsum(neg, axis=1) - neg
    num = np.sum(pos * (below + 0.5 * neg), axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def patient_resample_weights(
    groups: npt.ArrayLike, n_boot: int = 1000, seed: int = 0, strata: npt.ArrayLike | None = None
) -> FloatArray:
    """``(n_boot, n)`` multiplicities of a patient-grouped bootstrap: patients drawn with replacement.

    Every image of a drawn patient comes along (as often as the patient is drawn), so the resamples
    respect the clustering of images within patients. With ``strata`` (one value per image, the same for
    all images of a patient: the cross-validation fold), patients are drawn within each stratum, so every
    resample keeps each fold's number of patients.
    """
    g = np.asarray(groups).astype(str)
    uniq, first, inv = np.unique(g, return_index=True, return_inverse=True)
    rng = np.random.default_rng(seed)
    if strata is None:
        counts = rng.multinomial(len(uniq), np.full(len(uniq), 1.0 / len(uniq)), size=n_boot)
    else:
        of_patient = np.asarray(strata).astype(str)[first]
        counts = np.zeros((n_boot, len(uniq)), dtype=np.int64)
        for stratum in np.unique(of_patient):
            members = np.flatnonzero(of_patient == stratum)
            counts[:, members] = rng.multinomial(len(members), np.full(len(members), 1.0 / len(members)), size=n_boot)
    return counts[:, inv].astype(float)


#: Metrics of a regression report, in order.
REGRESSION_METRICS = ("spearman", "pearson", "mae", "r2")


def regression_metrics(y_true: npt.ArrayLike, pred: npt.ArrayLike) -> dict[str, float]:
    """Spearman and Pearson correlation, mean absolute error and R² of predictions (nan where undefined)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, r2_score

    y, p = np.asarray(y_true, dtype=float), np.asarray(pred, dtype=float)
    varied = len(y) >= 2 and np.ptp(y) > 0 and np.ptp(p) > 0
    return {
        "spearman": float(spearmanr(y, p).statistic) if varied else float("nan"),
        "pearson": float(pearsonr(y, p).statistic) if varied else float("nan"),
        "mae": float(mean_absolute_error(y, p)) if len(y) else float("nan"),
        "r2": float(r2_score(y, p)) if len(y) >= 2 and np.ptp(y) > 0 else float("nan"),
    }


def regression_bootstrap(
    y_true: npt.ArrayLike, pred: npt.ArrayLike, groups: npt.ArrayLike, n_boot: int = 1000, seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile ``1 - alpha`` intervals of :func:`regression_metrics` over :func:`patient_resample_weights`."""
    nan = (float("nan"), float("nan"))
    if n_boot < 1:
        return dict.fromkeys(REGRESSION_METRICS, nan)
    y, p = np.asarray(y_true, dtype=float), np.asarray(pred, dtype=float)
    values: dict[str, list[float]] = {m: [] for m in REGRESSION_METRICS}
    for weights in patient_resample_weights(groups, n_boot, seed):
        idx = np.repeat(np.arange(len(y)), weights.astype(int))
        for name, value in regression_metrics(y[idx], p[idx]).items():
            if np.isfinite(value):
                values[name].append(value)
    return {
        m: (float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))) if v else nan
        for m, v in values.items()
    }


def _surv(time: npt.ArrayLike, event: npt.ArrayLike) -> npt.NDArray[np.void]:
    from sksurv.util import Surv

    return np.asarray(Surv.from_arrays(event=np.asarray(event).astype(bool), time=np.asarray(time, dtype=float)))


def concordance_counts(time: npt.ArrayLike, event: npt.ArrayLike, risk: npt.ArrayLike) -> tuple[float, int]:
    """Harrell's C as counts (scikit-survival): concordant pairs + 0.5 x pairs tied on risk, and comparable pairs.

    Higher ``risk`` = shorter survival. ``(0.0, 0)`` without a comparable pair.
    """
    from sksurv.exceptions import NoComparablePairException
    from sksurv.metrics import concordance_index_censored

    t, e, r = np.asarray(time, float), np.asarray(event).astype(bool), np.asarray(risk, float)
    if not e.any():
        return 0.0, 0
    try:
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 when the only pairs are tied in time
            _, concordant, discordant, tied_risk, _ = concordance_index_censored(e, t, r)
    except (ZeroDivisionError, NoComparablePairException):  # no comparable pair
        return 0.0, 0
    return float(concordant + 0.5 * tied_risk), int(concordant + discordant + tied_risk)


def harrell_c(
    time: npt.ArrayLike, event: npt.ArrayLike, risk: npt.ArrayLike, strata: npt.ArrayLike | None = None
) -> float:
    """Harrell's concordance, higher ``risk`` = shorter survival; nan without a comparable pair.

    With ``strata`` (the cross-validation fold of every slide), only pairs within the same stratum are
    compared: the concordant (+0.5 tied) pairs of all strata over their comparable pairs (stratified
    Harrell's C). Out-of-fold risks of different fold models are on different scales (a Cox risk is known
    only up to an additive constant), so a pair across two folds compares two models, not two patients.
    """
    t, e, r = np.asarray(time, float), np.asarray(event).astype(bool), np.asarray(risk, float)
    s = np.zeros(len(t), dtype=np.int64) if strata is None else np.asarray(strata)
    good, pairs = 0.0, 0
    for stratum in np.unique(s):
        sel = s == stratum
        g, n = concordance_counts(t[sel], e[sel], r[sel])
        good, pairs = good + g, pairs + n
    return good / pairs if pairs else float("nan")


def default_horizons(time: npt.ArrayLike, event: npt.ArrayLike) -> list[float]:
    """The 25, 50 and 75% quantiles of the observed event times (all times when there is no event)."""
    t, e = np.asarray(time, float), np.asarray(event).astype(bool)
    return [float(q) for q in np.quantile(t[e] if e.any() else t, [0.25, 0.5, 0.75])]


def _uno_and_auc(
    y_all: npt.NDArray[np.void], t: FloatArray, e: npt.NDArray[np.bool_], r: FloatArray, usable: list[float], tau: float
) -> tuple[float, dict[float, float], float]:
    """Uno's C at ``tau`` and the cumulative/dynamic AUC of one stratum, censoring estimated on ``y_all``."""
    from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc

    y = _surv(t, e)
    uno, auc, mean_auc = float("nan"), {}, float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        try:
            uno = float(concordance_index_ipcw(y_all, y, r, tau=tau)[0])
        except (ValueError, ZeroDivisionError):  # no comparable pair before tau in this stratum
            pass
        inside = sorted({h for h in usable if t.min() <= h < t.max()})
        if inside and e.any():
            try:
                values, mean = cumulative_dynamic_auc(y_all, y, r, inside)
                auc = {h: float(a) for h, a in zip(inside, values, strict=True) if np.isfinite(a)}
                mean_auc = float(mean)
            except (ValueError, ZeroDivisionError):  # no case or no control at these horizons
                pass
    return uno, auc, mean_auc


def survival_metrics(
    time: npt.ArrayLike, event: npt.ArrayLike, risk: npt.ArrayLike, horizons: list[float] | None = None,
    strata: npt.ArrayLike | None = None,
) -> dict[str, object]:
    """Harrell's C, Uno's C truncated at the last horizon, and cumulative/dynamic AUC at each horizon.

    All by scikit-survival; the censoring distribution of Uno's C and the AUC is the Kaplan-Meier estimate
    of all the given slides. Horizons at or beyond the last observed time are dropped (the AUC is undefined
    there). With ``strata`` (the fold of every out-of-fold risk) no metric compares slides of two strata:
    ``c_index`` is the stratified :func:`harrell_c` (and ``c_index_pooled_naive`` the one that ignores the
    folds, for comparison); ``uno_c`` and ``td_auc`` are computed within each stratum and averaged over the
    strata where they are defined (``uno_c_strata``, ``td_auc_strata``), ``td_auc_mean`` is the mean of the
    strata's scikit-survival mean AUC over the horizons inside each stratum's follow-up.
    """
    t, e, r = np.asarray(time, float), np.asarray(event).astype(bool), np.asarray(risk, float)
    s = np.zeros(len(t), dtype=np.int64) if strata is None else np.asarray(strata)
    wanted = default_horizons(t, e) if horizons is None else [float(h) for h in horizons]
    usable = [h for h in wanted if t.min() <= h < t.max()]
    out: dict[str, object] = {"c_index": harrell_c(t, e, r, s), "horizons": usable}
    levels = np.unique(s)
    if len(levels) > 1:
        out["c_index_pooled_naive"] = harrell_c(t, e, r)
    if usable and e.any():
        tau = max(usable)
        y_all = _surv(t, e)
        parts = [_uno_and_auc(y_all, t[s == k], e[s == k], r[s == k], usable, tau) for k in levels]
        unos = [u for u, _, _ in parts if np.isfinite(u)]
        out["uno_c"] = float(np.mean(unos)) if unos else float("nan")
        out["uno_c_tau"] = tau
        out["td_auc"] = {f"{h:g}": _mean([a[h] for _, a, _ in parts if h in a]) for h in sorted(set(usable))}
        out["td_auc_mean"] = _mean([m for _, _, m in parts if np.isfinite(m)])
        if len(levels) > 1:
            out["uno_c_strata"] = [u for u, _, _ in parts]
            out["td_auc_strata"] = [{f"{h:g}": v for h, v in a.items()} for _, a, _ in parts]
    return out


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def c_index_bootstrap(
    time: npt.ArrayLike, event: npt.ArrayLike, risk: npt.ArrayLike, groups: npt.ArrayLike, n_boot: int = 1000,
    seed: int = 0, alpha: float = 0.05, strata: npt.ArrayLike | None = None,
) -> tuple[float, float]:
    """Percentile ``1 - alpha`` interval of Harrell's C over :func:`patient_resample_weights`.

    With ``strata`` (the folds), patients are resampled within their fold and each resample scores the
    stratified C (pairs within a fold only), the estimate it brackets.
    """
    t, e, r = np.asarray(time, float), np.asarray(event).astype(bool), np.asarray(risk, float)
    s = np.zeros(len(t), dtype=np.int64) if strata is None else np.asarray(strata)
    values = []
    for weights in patient_resample_weights(groups, n_boot, seed, strata) if n_boot > 0 else []:
        idx = np.repeat(np.arange(len(t)), weights.astype(int))
        value = harrell_c(t[idx], e[idx], r[idx], s[idx])
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    return float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2))


def integrated_brier(time: npt.ArrayLike, event: npt.ArrayLike, survival: npt.ArrayLike, times: npt.ArrayLike) -> float:
    """Integrated Brier score (scikit-survival) of ``(n, len(times))`` survival probabilities over ``times``.

    The censoring distribution of its inverse-probability weights is the Kaplan-Meier estimate of these same
    slides; lower is better (a constant S = 0.5 scores 0.25). nan when ``times`` leave the follow-up of the slides.
    """
    from sksurv.metrics import integrated_brier_score

    y = _surv(time, event)
    try:
        return float(integrated_brier_score(y, y, np.asarray(survival, dtype=float), np.asarray(times, dtype=float)))
    except ValueError:  # times outside the observed range (a bootstrap resample)
        return float("nan")


def integrated_brier_bootstrap(
    time: npt.ArrayLike, event: npt.ArrayLike, survival: npt.ArrayLike, times: npt.ArrayLike, groups: npt.ArrayLike,
    n_boot: int = 1000, seed: int = 0, alpha: float = 0.05, strata: npt.ArrayLike | None = None,
) -> tuple[float, float]:
    """Percentile ``1 - alpha`` interval of :func:`integrated_brier` over :func:`patient_resample_weights`
    (patients drawn within their stratum, the fold, with ``strata``)."""
    t, e, s = np.asarray(time, float), np.asarray(event).astype(bool), np.asarray(survival, float)
    values = []
    for weights in patient_resample_weights(groups, n_boot, seed, strata) if n_boot > 0 else []:
        idx = np.repeat(np.arange(len(t)), weights.astype(int))
        value = integrated_brier(t[idx], e[idx], s[idx], times)
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    return float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2))
