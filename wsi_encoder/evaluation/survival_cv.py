"""Patient-grouped cross-validation of slide Cox models (``--target survival``).

Folds are :func:`~wsi_encoder.evaluation.crossval.patient_folds` stratified by event: a patient's
stratum is whether any of their slides has an event, so every fold holds about the same share of deaths.
The torch models' inner validation split (:func:`~wsi_encoder.evaluation.crossval.inner_split`, early
stopping) is stratified the same way; ``linear`` takes the whole training fold and chooses its penalty by
an inner patient-grouped k-fold (:meth:`~wsi_encoder.models.slide_classifiers.survival.CoxLinear.cross_validated_likelihood`).
Every model has a survival function, so the pooled out-of-fold S(t | slide) also gets the integrated
Brier score (:func:`~wsi_encoder.evaluation.metrics.integrated_brier`) with a patient-bootstrap interval
(survival probabilities are on one absolute scale whatever the fold model, so pooling them is sound).

Every slide gets one out-of-fold risk, but the risks of two fold models are not on one scale: a Cox risk
is identified only up to an additive constant, and each fold's penalty or training sets its spread. So
the headline ``c_index`` is the stratified Harrell's C (:func:`~wsi_encoder.evaluation.metrics.harrell_c`
with ``strata`` = fold): only pairs of slides of the same test fold are compared, the concordant pairs of
all folds over their comparable pairs. Its interval resamples patients within their fold. Uno's C and the
time-dependent AUC are computed per fold and averaged (:func:`~wsi_encoder.evaluation.metrics.survival_metrics`);
``c_index_pooled_naive`` (all out-of-fold risks as one ranking) is kept only to show what pooling costs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_encoder.evaluation.crossval import Take, inner_split, nan_to_none, patient_folds
from wsi_encoder.evaluation.metrics import (
    c_index_bootstrap,
    default_horizons,
    harrell_c,
    integrated_brier,
    integrated_brier_bootstrap,
    survival_metrics,
)
from wsi_encoder.io.slide_records import SlideBag
from wsi_encoder.models.slide_classifiers.base import FitInfo, config_dict, slide_classifier_class
from wsi_encoder.models.slide_classifiers.survival import SurvivalModel, create_cox_model

logger = logging.getLogger(__name__)


def event_strata(event: npt.ArrayLike, groups: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Per-slide stratum: 1 when the slide's patient has any event, else 0."""
    e, g = np.asarray(event).astype(bool), np.asarray(groups).astype(str)
    with_event = set(g[e])
    return np.array([1 if p in with_event else 0 for p in g], dtype=np.int64)


@dataclass(frozen=True)
class SurvivalCVResult:
    """Out-of-fold risks, per-fold C and the fold-stratified survival metrics (``pooled``: over all folds)."""

    model: str
    config: dict[str, Any]
    folds: int
    oof_risk: npt.NDArray[np.float64]
    fold_of: npt.NDArray[np.int64]
    per_fold: tuple[dict[str, Any], ...]
    pooled: dict[str, Any]
    c_index_ci95: tuple[float, float]
    n_boot: int
    oof_survival: npt.NDArray[np.float64]
    survival_times: npt.NDArray[np.float64]
    refit_params: dict[str, Any]

    def summary_json(self) -> dict[str, Any]:
        """The metrics part of ``metrics.json``: the fold-stratified metrics top-level, ``c_index_ci95`` with them."""
        c = [f["c_index"] for f in self.per_fold]
        return nan_to_none({
            **self.pooled,
            "c_index_ci95": list(self.c_index_ci95),
            "c_index_folds_mean": float(np.nanmean(c)) if np.isfinite(c).any() else float("nan"),
            "per_fold": list(self.per_fold),
            "bootstrap": {"n_boot": self.n_boot, "unit": "patient, resampled within its fold",
                          "interval": "percentile 95%",
                          "metrics": ["c_index", "ibs"] if "ibs" in self.pooled else ["c_index"]},
            "refit": {"params": self.refit_params},
        })


def cross_validate_survival(
    bags: Sequence[SlideBag],
    time: npt.ArrayLike,
    event: npt.ArrayLike,
    groups: npt.ArrayLike,
    model: str,
    *,
    config: dict[str, Any] | None = None,
    folds: int = 5,
    seed: int = 0,
    device: str = "auto",
    val_fraction: float = 0.2,
    n_boot: int = 1000,
    horizons: list[float] | None = None,
    min_events: int = 2,
    loss: str = "cox",
    time_bins: int = 10,
    on_fold: Callable[[int, dict[str, float]], None] | None = None,
) -> SurvivalCVResult:
    """Cross-validate a survival model; ``on_fold(fold, {"c_index": ...})`` is called after each fold.

    The integrated Brier score is taken over :func:`ibs_grid` (20 times from the first to the last usable
    horizon); it is left out when fewer than two horizons are usable.
    """
    t, e, g = np.asarray(time, float), np.asarray(event).astype(bool), np.asarray(groups).astype(str)
    strata = event_strata(e, g)
    in_dim = int(bags[0].features.shape[1])
    oof = np.full(len(t), np.nan)
    fold_of = np.full(len(t), -1, dtype=np.int64)
    per_fold: list[dict[str, Any]] = []
    used: dict[str, Any] = {}
    infos: list[FitInfo] = []
    grid = ibs_grid(t, e, horizons)
    surv = np.full((len(t), len(grid)), np.nan)
    for fold, (train_all, test) in enumerate(patient_folds(strata, g, folds, seed)):
        inner_train, inner_val = inner_split(strata[train_all], g[train_all], val_fraction, seed + 1000 + fold)
        train, val = train_all[inner_train], train_all[inner_val]
        if model == "linear":  # no early stopping: the whole training fold, alpha by inner k-fold
            train, val = train_all, train_all[:0]
        cox = create_cox_model(model, in_dim, config, device, min_events, loss, time_bins)
        has_val = len(val) > 0
        info = cox.fit(Take(bags, train), t[train], e[train], Take(bags, val) if has_val else None,
                       t[val] if has_val else None, e[val] if has_val else None, seed=seed + fold, groups=g[train])
        infos.append(info)
        oof[test] = cox.predict(Take(bags, test))
        if len(grid):
            surv[test] = cox.survival(Take(bags, test), grid)
        fold_of[test] = fold
        c = harrell_c(t[test], e[test], oof[test])
        used = config_dict(cox.config)
        per_fold.append({"fold": fold, "n_train": len(train), "n_val": len(val), "n_test": len(test),
                         "n_test_events": int(e[test].sum()), "fit": info.to_json(), "c_index": c})
        logger.info("fold %d: C-index %.3f", fold, c)
        if on_fold is not None:
            on_fold(fold, {"c_index": c})
    pooled = survival_metrics(t, e, oof, horizons, strata=fold_of)
    if len(grid):
        pooled["ibs"] = integrated_brier(t, e, surv, grid)
        pooled["ibs_ci95"] = list(integrated_brier_bootstrap(t, e, surv, grid, g, n_boot, seed, strata=fold_of))
        pooled["ibs_times"] = [float(grid[0]), float(grid[-1])]
    return SurvivalCVResult(
        model=model, config=used, folds=folds, oof_risk=oof, fold_of=fold_of, per_fold=tuple(per_fold),
        pooled=pooled, c_index_ci95=c_index_bootstrap(t, e, oof, g, n_boot, seed, strata=fold_of), n_boot=n_boot,
        oof_survival=surv, survival_times=grid, refit_params=survival_refit_params(model, infos),
    )


def ibs_grid(time: npt.ArrayLike, event: npt.ArrayLike, horizons: list[float] | None = None) -> npt.NDArray[np.float64]:
    """20 times from the first to the last usable horizon (inside the observed times); empty with fewer than two."""
    t, e = np.asarray(time, float), np.asarray(event).astype(bool)
    usable = [h for h in (default_horizons(t, e) if horizons is None else horizons) if t.min() <= h < t.max()]
    return np.linspace(min(usable), max(usable), 20) if len(set(usable)) >= 2 else np.zeros(0)


def survival_refit_params(model: str, infos: Sequence[FitInfo]) -> dict[str, Any]:
    """What the folds selected, for the final model: the most chosen alpha (linear), the median best epoch."""
    if model == "linear":
        chosen = [i.selected["alpha"] for i in infos if i.selected]
        return {"alpha": max(set(chosen), key=lambda a: (chosen.count(a), a))} if chosen else {}
    return slide_classifier_class(model).refit_params(infos)


def held_out_report(
    model: SurvivalModel, bags: Sequence[SlideBag], time: npt.ArrayLike, event: npt.ArrayLike, groups: npt.ArrayLike,
    horizons: list[float], n_boot: int = 1000, seed: int = 0,
) -> dict[str, Any]:
    """A held-out (``split=test``) cohort scored by one fitted model: ``metrics.json``'s ``test`` (plus ``risk``).

    One model scores every slide, so the risks are on one scale and nothing is stratified: Harrell's C with a
    patient-bootstrap interval, Uno's C and AUC(t) at the training run's ``horizons`` (those inside the held-out
    follow-up; censoring by Kaplan-Meier of these slides), and the integrated Brier score of the model's survival
    function over :func:`ibs_grid` of these slides with its interval. ``risk``: the ``(n,)`` risks.
    """
    t, e, g = np.asarray(time, float), np.asarray(event).astype(bool), np.asarray(groups).astype(str)
    risk = model.predict(bags)
    metrics = survival_metrics(t, e, risk, horizons)
    report: dict[str, Any] = {
        "n_slides": len(t), "n_patients": len(set(g)), "n_events": int(e.sum()), "metrics": metrics,
        "c_index_ci95": list(c_index_bootstrap(t, e, risk, g, n_boot, seed)),
    }
    grid = ibs_grid(t, e, horizons)
    if len(grid):
        surv = model.survival(bags, grid)
        metrics["ibs"] = integrated_brier(t, e, surv, grid)
        report["ibs_ci95"] = list(integrated_brier_bootstrap(t, e, surv, grid, g, n_boot, seed))
        report["ibs_times"] = [float(grid[0]), float(grid[-1])]
    report["risk"] = risk
    return report
