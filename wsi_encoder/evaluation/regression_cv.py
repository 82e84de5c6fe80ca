"""Patient-grouped cross-validation of slide regressors (``--target regression``).

The folds are those of classification (:func:`~wsi_encoder.evaluation.crossval.patient_folds` and
:func:`~wsi_encoder.evaluation.crossval.inner_split`), stratified by target quantile: patients are
ranked by their mean target and cut into ``n_patients // folds`` (at most 5) equal bins, so every fold
spans the target's range. Every slide gets one out-of-fold prediction; metrics are reported per fold
and on the pooled out-of-fold predictions with patient-bootstrap 95% intervals
(:func:`~wsi_encoder.evaluation.metrics.regression_bootstrap`).

Pooling is sound here, unlike for survival risks: every fold model predicts on the target's own scale (the
torch models undo their training fold's standardisation, ridge fits an intercept), so two slides of two folds
are compared on one scale. A fold model's offset only adds its own error, which the pooled MAE and R² should
count. ``spearman_folds_mean`` (the mean of the per-fold Spearman) is reported beside the pooled value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.evaluation.crossval import Take, inner_split, nan_to_none, patient_folds
from wsi_encoder.evaluation.metrics import regression_bootstrap, regression_metrics
from wsi_encoder.io.slide_records import SlideBag
from wsi_encoder.models.slide_classifiers.base import FitInfo, config_dict
from wsi_encoder.models.slide_classifiers.regressors import create_regressor, refit_params

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def target_strata(y: npt.ArrayLike, groups: npt.ArrayLike, folds: int) -> IntArray:
    """Per-slide stratum: the quantile bin of its patient's mean target (``n_patients // folds`` bins, at most 5)."""
    y, g = np.asarray(y, dtype=float), np.asarray(groups).astype(str)
    patients, inv = np.unique(g, return_inverse=True)
    if len(patients) < folds:
        raise InvalidParameterError(f"only {len(patients)} patients for --folds {folds}; use fewer folds")
    means = np.bincount(inv, weights=y) / np.bincount(inv)
    n_bins = max(1, min(5, len(patients) // folds))
    rank = np.empty(len(patients), dtype=np.int64)
    rank[np.argsort(means, kind="stable")] = np.arange(len(patients))
    return np.asarray((rank * n_bins // len(patients))[inv], dtype=np.int64)


@dataclass(frozen=True)
class RegressionCVResult:
    """Out-of-fold predictions, per-fold and pooled metrics, what each fold selected."""

    model: str
    config: dict[str, Any]
    folds: int
    oof_pred: FloatArray
    fold_of: IntArray
    per_fold: tuple[dict[str, Any], ...]
    pooled: dict[str, float]
    pooled_ci95: dict[str, tuple[float, float]]
    n_boot: int
    refit_params: dict[str, Any]

    def summary_json(self) -> dict[str, Any]:
        """The metrics part of ``metrics.json``: pooled metrics top-level, each with ``<name>_ci95``."""
        top: dict[str, Any] = {}
        for name, value in self.pooled.items():
            top[name] = value
            top[f"{name}_ci95"] = list(self.pooled_ci95[name])
        per_fold = [f["metrics"]["spearman"] for f in self.per_fold]
        top["spearman_folds_mean"] = float(np.nanmean(per_fold)) if np.isfinite(per_fold).any() else float("nan")
        return nan_to_none({
            **top,
            "per_fold": list(self.per_fold),
            "pooled": self.pooled,
            "pooled_ci95": {k: list(v) for k, v in self.pooled_ci95.items()},
            "bootstrap": {"n_boot": self.n_boot, "unit": "patient", "interval": "percentile 95%"},
            "refit": {"params": self.refit_params},
        })


def cross_validate_regression(
    bags: Sequence[SlideBag],
    y: npt.ArrayLike,
    groups: npt.ArrayLike,
    model: str,
    *,
    config: dict[str, Any] | None = None,
    loss: str = "mse",
    folds: int = 5,
    seed: int = 0,
    device: str = "auto",
    val_fraction: float = 0.2,
    n_boot: int = 1000,
    on_fold: Callable[[int, dict[str, float]], None] | None = None,
) -> RegressionCVResult:
    """Cross-validate a regressor; ``on_fold(fold, metrics)`` is called after each fold."""
    target, g = np.asarray(y, dtype=float), np.asarray(groups).astype(str)
    strata = target_strata(target, g, folds)
    in_dim = int(bags[0].features.shape[1])
    oof = np.full(len(target), np.nan)
    fold_of = np.full(len(target), -1, dtype=np.int64)
    per_fold: list[dict[str, Any]] = []
    infos: list[FitInfo] = []
    used_config: dict[str, Any] = {}
    for fold, (train_all, test) in enumerate(patient_folds(strata, g, folds, seed)):
        inner_train, inner_val = inner_split(strata[train_all], g[train_all], val_fraction, seed + 1000 + fold)
        train, val = train_all[inner_train], train_all[inner_val]
        reg = create_regressor(model, in_dim, config, loss, device)
        info = reg.fit(Take(bags, train), target[train], Take(bags, val) if len(val) else None,
                       target[val] if len(val) else None, seed=seed + fold)
        oof[test] = reg.predict(Take(bags, test))
        fold_of[test] = fold
        metrics = regression_metrics(target[test], oof[test])
        infos.append(info)
        used_config = config_dict(reg.config)
        per_fold.append({"fold": fold, "n_train": len(train), "n_val": len(val), "n_test": len(test),
                         "fit": info.to_json(), "metrics": metrics})
        logger.info("fold %d: %s", fold, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if on_fold is not None:
            on_fold(fold, metrics)
    return RegressionCVResult(
        model=model, config=used_config, folds=folds, oof_pred=oof, fold_of=fold_of, per_fold=tuple(per_fold),
        pooled=regression_metrics(target, oof), pooled_ci95=regression_bootstrap(target, oof, g, n_boot, seed),
        n_boot=n_boot, refit_params=refit_params(model, infos),
    )
