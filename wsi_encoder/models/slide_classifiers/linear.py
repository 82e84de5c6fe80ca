"""``linear``: mean- and max-pooled tile features, standardised, into a scikit-learn logistic regression.

``C`` is chosen on the validation set by log-loss. Heatmap: each tile's exact additive share of the
slide's logit.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from wsi_encoder.errors import CheckpointError, InvalidParameterError
from wsi_encoder.io.slide_records import SlideBag
from wsi_encoder.models.slide_classifiers.base import (
    Bags,
    FitInfo,
    FloatArray,
    IntArray,
    SlideClassifier,
    check_class_weight,
    register_slide_classifier,
)

if TYPE_CHECKING:  # scikit-learn is imported when a linear model is fitted, not to predict (start-up time)
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

logger = logging.getLogger(__name__)


def pool_features(bag: SlideBag, pooling: str) -> FloatArray:
    """A slide's feature vector: the mean and/or max of its tiles' features (``mean``, ``max``, ``mean+max``)."""
    f = bag.features.astype(np.float64)
    parts = {"mean": [f.mean(0)], "max": [f.max(0)], "mean+max": [f.mean(0), f.max(0)]}[pooling]
    return np.concatenate(parts)


@dataclass(frozen=True)
class LinearConfig:
    """``linear`` settings: ``pooling`` (``mean``, ``max`` or ``mean+max``), the inverse regularisation
    ``C`` used without a validation set, the grid ``Cs`` searched on it, class weighting, solver iterations."""

    pooling: str = "mean+max"
    C: float = 1.0
    Cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)
    class_weight: str = "balanced"
    max_iter: int = 5000

    def validate(self) -> None:
        """Raise :class:`InvalidParameterError` on impossible values."""
        if self.pooling not in ("mean", "max", "mean+max"):
            raise InvalidParameterError(f"linear pooling must be mean, max or mean+max, got {self.pooling!r}")
        if self.C <= 0 or not self.Cs or min(self.Cs) <= 0 or self.max_iter < 1:
            raise InvalidParameterError(f"linear needs C > 0, positive Cs and max_iter >= 1: {self}")
        check_class_weight(self.class_weight)


@register_slide_classifier
class LinearPooledClassifier(SlideClassifier[LinearConfig]):
    """``linear``: pooled features → standardisation → logistic regression (scikit-learn)."""

    name = "linear"
    Config = LinearConfig
    heatmap_kind = "per-tile logit contribution"
    heatmap_signed = True

    def __init__(
        self, in_dim: int, num_classes: int, config: LinearConfig | dict[str, Any] | None = None, device: str = "auto"
    ) -> None:
        super().__init__(in_dim, num_classes, config, device)
        self.mean_: FloatArray | None = None
        self.scale_: FloatArray | None = None
        self.coef_: FloatArray | None = None
        self.intercept_: FloatArray | None = None

    def pool(self, bag: SlideBag) -> FloatArray:
        """The slide's feature vector: mean and/or max over its tiles."""
        return pool_features(bag, self.config.pooling)

    def _matrix(self, bags: Bags) -> FloatArray:
        return np.stack([self.pool(b) for b in bags]) if len(bags) else np.zeros((0, self._n_pooled()))

    def _n_pooled(self) -> int:
        return self.in_dim * (2 if self.config.pooling == "mean+max" else 1)

    def _fit_lr(self, x: FloatArray, y: IntArray, c: float, seed: int) -> tuple[StandardScaler, LogisticRegression]:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(x)
        weight = "balanced" if self.config.class_weight == "balanced" else None
        lr = LogisticRegression(C=c, class_weight=weight, max_iter=self.config.max_iter, random_state=seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            lr.fit(scaler.transform(x), y)
        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                logger.warning("logistic regression (C=%g) did not converge in %d iterations", c, self.config.max_iter)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return scaler, lr

    def fit(
        self,
        train: Bags,
        y: npt.ArrayLike,
        val: Bags | None = None,
        y_val: npt.ArrayLike | None = None,
        *,
        seed: int = 0,
        refit: dict[str, Any] | None = None,
    ) -> FitInfo:
        x, y = self._matrix(train), np.asarray(y, dtype=np.int64)
        if len(np.unique(y)) < 2:
            raise InvalidParameterError("the training slides hold a single class")
        c = float((refit or {}).get("C", self.config.C))
        if refit is None and val is not None and len(val) and y_val is not None:
            from sklearn.metrics import log_loss

            xv, yv = self._matrix(val), np.asarray(y_val, dtype=np.int64)
            losses = {}
            for cand in self.config.Cs:
                scaler, lr = self._fit_lr(x, y, cand, seed)
                prob = _expand_proba(lr, scaler.transform(xv), self.num_classes)
                losses[cand] = log_loss(yv, prob, labels=list(range(self.num_classes)))
            c = min(losses, key=lambda k: (losses[k], k))
            x, y = np.concatenate([x, xv]), np.concatenate([y, yv])
        scaler, lr = self._fit_lr(x, y, c, seed)
        self.mean_, self.scale_ = scaler.mean_.astype(float), scaler.scale_.astype(float)
        coef = np.zeros((self.num_classes if self.num_classes > 2 else 1, x.shape[1]))
        intercept = np.zeros(coef.shape[0])
        if self.num_classes == 2:
            coef[:], intercept[:] = lr.coef_, lr.intercept_
        else:  # classes absent from this training set keep zero weights and a very low intercept
            intercept[:] = -30.0
            if len(lr.classes_) == 2:  # sklearn's binary form: logits (0, w.x + b) for (classes_[0], classes_[1])
                coef[lr.classes_[1]], intercept[lr.classes_[1]] = lr.coef_[0], lr.intercept_[0]
                intercept[lr.classes_[0]] = 0.0
            else:
                coef[lr.classes_], intercept[lr.classes_] = lr.coef_, lr.intercept_
        self.coef_, self.intercept_ = coef, intercept
        return FitInfo(selected={"C": c})

    def _require_fitted(self) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        if self.mean_ is None or self.scale_ is None or self.coef_ is None or self.intercept_ is None:
            raise InvalidParameterError("the linear model is not fitted")
        return self.mean_, self.scale_, self.coef_, self.intercept_

    def decision_function(self, bags: Bags) -> FloatArray:
        """Logits: ``(n,)`` log-odds of class 1 when binary, else ``(n, k)``."""
        mean, scale, coef, intercept = self._require_fitted()
        z = (self._matrix(bags) - mean) / scale
        logits = z @ coef.T + intercept
        return logits[:, 0] if self.num_classes == 2 else logits

    def predict_proba(self, bags: Bags) -> FloatArray:
        logits = self.decision_function(bags)
        if self.num_classes == 2:
            p1 = 1.0 / (1.0 + np.exp(-logits))
            return np.stack([1.0 - p1, p1], axis=1)
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def heatmap(self, bag: SlideBag) -> FloatArray:
        """Each tile's additive share of the slide's logit (they sum to logit − intercept).

        The mean-pooled part splits evenly over tiles; each max-pooled feature's term goes to the tile
        holding the maximum. Binary: the log-odds of class 1; multi-class: the predicted class's logit
        minus the mean logit. Not rescaled (units: logit).
        """
        mean, scale, coef, _ = self._require_fitted()
        f = bag.features.astype(np.float64)
        n, c = f.shape
        if self.num_classes == 2:
            w = coef[0]
        else:
            target = int(self.decision_function([bag])[0].argmax())
            w = coef[target] - coef.mean(axis=0)
        contrib = np.zeros(n)
        offset = 0
        if self.config.pooling in ("mean", "mean+max"):
            wm = w[:c] / scale[:c]
            contrib += ((f - mean[:c]) @ wm) / n
            offset = c
        if self.config.pooling in ("max", "mean+max"):
            wx = w[offset : offset + c] / scale[offset : offset + c]
            top = f.argmax(axis=0)
            np.add.at(contrib, top, wx * (f[top, np.arange(c)] - mean[offset : offset + c]))
        return bag.to_grid(contrib)

    def state_arrays(self) -> dict[str, npt.NDArray[Any]]:
        mean, scale, coef, intercept = self._require_fitted()
        return {"scaler_mean": mean, "scaler_scale": scale, "coef": coef, "intercept": intercept}

    def load_state_arrays(self, arrays: dict[str, npt.NDArray[Any]]) -> None:
        try:
            mean, scale = np.asarray(arrays["scaler_mean"], float), np.asarray(arrays["scaler_scale"], float)
            coef, intercept = np.asarray(arrays["coef"], float), np.asarray(arrays["intercept"], float)
        except KeyError as exc:
            raise CheckpointError(f"saved linear model lacks array {exc.args[0]!r}") from exc
        n_out = self.num_classes if self.num_classes > 2 else 1
        if mean.shape != (self._n_pooled(),) or coef.shape != (n_out, self._n_pooled()) or intercept.shape != (n_out,):
            raise CheckpointError(f"saved linear model arrays have shapes {coef.shape} that do not fit the config")
        self.mean_, self.scale_, self.coef_, self.intercept_ = mean, scale, coef, intercept

    @classmethod
    def refit_params(cls, infos: Sequence[FitInfo]) -> dict[str, Any]:
        chosen = [i.selected["C"] for i in infos if i.selected and "C" in i.selected]
        if not chosen:
            return {}
        counts = Counter(chosen)
        top = max(counts.values())
        # The most often chosen C; ties go to the stronger regularisation (smaller C).
        return {"C": min(c for c, n in counts.items() if n == top)}


def _expand_proba(lr: LogisticRegression, x: FloatArray, num_classes: int) -> FloatArray:
    """sklearn probabilities placed into ``num_classes`` columns (absent classes get ~0)."""
    prob = np.full((x.shape[0], num_classes), 1e-12)
    prob[:, lr.classes_] = lr.predict_proba(x)
    return prob / prob.sum(axis=1, keepdims=True)
