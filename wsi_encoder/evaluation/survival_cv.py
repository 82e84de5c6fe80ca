"""Patient-grouped cross-validation of slide Cox models (``--target survival``).

Folds are :func:`~wsi_encoder.evaluation.crossval.patient_folds` stratified by event: a patient's
stratum is whether any of their slides has an event, so every fold holds about the same share of deaths.
The inner validation split (:func:`~wsi_encoder.evaluation.crossval.inner_split`) is stratified the
same way. Every slide gets one out-of-fold risk; Harrell's C is reported per fold, and the pooled
out-of-fold risks get :func:`~wsi_encoder.evaluation.metrics.survival_metrics` plus a patient-bootstrap
interval of Harrell's C. Risks of different fold models are on different scales, so the per-fold C is
the cleaner figure; the pooled one is the usual report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_encoder.evaluation.crossval import Take, inner_split, nan_to_none, patient_folds
from wsi_encoder.evaluation.metrics import c_index_bootstrap, harrell_c, survival_metrics
from wsi_encoder.io.embedding_store import SlideBag
from wsi_encoder.models.slide_classifiers.base import config_dict
from wsi_encoder.models.slide_classifiers.survival import create_cox_model

logger = logging.getLogger(__name__)


def event_strata(event: npt.ArrayLike, groups: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Per-slide stratum: 1 when the slide's patient has any event, else 0."""
    e, g = np.asarray(event).astype(bool), np.asarray(groups).astype(str)
    with_event = set(g[e])
    return np.array([1 if p in with_event else 0 for p in g], dtype=np.int64)


@dataclass(frozen=True)
class SurvivalCVResult:
    """Out-of-fold risks, per-fold C and the pooled survival metrics."""

    model: str
    config: dict[str, Any]
    folds: int
    oof_risk: npt.NDArray[np.float64]
    fold_of: npt.NDArray[np.int64]
    per_fold: tuple[dict[str, Any], ...]
    pooled: dict[str, Any]
    c_index_ci95: tuple[float, float]
    n_boot: int

    def summary_json(self) -> dict[str, Any]:
        """The metrics part of ``metrics.json``: pooled metrics top-level, ``c_index_ci95`` with them."""
        c = [f["c_index"] for f in self.per_fold]
        return nan_to_none({
            **self.pooled,
            "c_index_ci95": list(self.c_index_ci95),
            "c_index_folds_mean": float(np.nanmean(c)) if np.isfinite(c).any() else float("nan"),
            "per_fold": list(self.per_fold),
            "bootstrap": {"n_boot": self.n_boot, "unit": "patient", "interval": "percentile 95%", "metric": "c_index"},
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
    on_fold: Callable[[int, dict[str, float]], None] | None = None,
) -> SurvivalCVResult:
    """Cross-validate a Cox model; ``on_fold(fold, {"c_index": ...})`` is called after each fold."""
    t, e, g = np.asarray(time, float), np.asarray(event).astype(bool), np.asarray(groups).astype(str)
    strata = event_strata(e, g)
    in_dim = int(bags[0].features.shape[1])
    oof = np.full(len(t), np.nan)
    fold_of = np.full(len(t), -1, dtype=np.int64)
    per_fold: list[dict[str, Any]] = []
    used: dict[str, Any] = {}
    for fold, (train_all, test) in enumerate(patient_folds(strata, g, folds, seed)):
        inner_train, inner_val = inner_split(strata[train_all], g[train_all], val_fraction, seed + 1000 + fold)
        train, val = train_all[inner_train], train_all[inner_val]
        cox = create_cox_model(model, in_dim, config, device, min_events)
        has_val = len(val) > 0
        info = cox.fit(Take(bags, train), t[train], e[train], Take(bags, val) if has_val else None,
                       t[val] if has_val else None, e[val] if has_val else None, seed=seed + fold)
        oof[test] = cox.predict(Take(bags, test))
        fold_of[test] = fold
        c = harrell_c(t[test], e[test], oof[test])
        used = config_dict(cox.config)
        per_fold.append({"fold": fold, "n_train": len(train), "n_val": len(val), "n_test": len(test),
                         "n_test_events": int(e[test].sum()), "fit": info.to_json(), "c_index": c})
        logger.info("fold %d: C-index %.3f", fold, c)
        if on_fold is not None:
            on_fold(fold, {"c_index": c})
    return SurvivalCVResult(
        model=model, config=used, folds=folds, oof_risk=oof, fold_of=fold_of, per_fold=tuple(per_fold),
        pooled=survival_metrics(t, e, oof, horizons), c_index_ci95=c_index_bootstrap(t, e, oof, g, n_boot, seed),
        n_boot=n_boot,
    )
