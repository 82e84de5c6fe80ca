"""Slide-level Cox models: a risk per slide (log hazard ratio; higher = shorter survival).

* ``linear`` (:class:`CoxLinear`): the linear model's pooled features, standardised, into a ridge-penalised
  Cox model (scikit-survival ``CoxPHSurvivalAnalysis``, Breslow ties); ``alpha`` is chosen on the inner
  validation split by Harrell's C, then the model is refit on train + validation with it.
* ``abmil`` and ``gridcnn`` (:class:`TorchCox`): the classifier's network with one output trained with
  :func:`~wsi_encoder.models.slide_classifiers.survival_loss.cox_breslow_loss` over each mini-batch (its risk sets are the
  batch's slides); batches with fewer than ``min_events`` events are skipped. Early stopping on the
  partial likelihood of the whole validation split.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.models.slide_classifiers.base import (
    Bags,
    FitInfo,
    FloatArray,
    make_config,
    slide_classifier_class,
)
from wsi_encoder.models.slide_classifiers.fit_loop import fit_module
from wsi_encoder.models.slide_classifiers.linear import pool_features
from wsi_encoder.models.slide_classifiers.survival_loss import check_events, cox_breslow_loss
from wsi_encoder.models.slide_classifiers.torch_base import Inputs, TorchSlideClassifier, batches_of

#: Models that can fit a Cox model.
SURVIVAL_MODELS = ("linear", "abmil", "gridcnn")


@dataclass(frozen=True)
class CoxLinearConfig:
    """``linear`` Cox settings: ``pooling``, the ridge ``alpha`` used without a validation split, the grid ``alphas``."""

    pooling: str = "mean+max"
    alpha: float = 1.0
    alphas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0)

    def validate(self) -> None:
        """Raise :class:`InvalidParameterError` on impossible values."""
        if self.pooling not in ("mean", "max", "mean+max"):
            raise InvalidParameterError(f"linear pooling must be mean, max or mean+max, got {self.pooling!r}")
        if self.alpha <= 0 or not self.alphas or min(self.alphas) <= 0:
            raise InvalidParameterError(f"linear Cox needs alpha > 0 and positive alphas: {self}")


class CoxLinear:
    """``linear`` survival: pooled features → standardisation → ridge Cox (scikit-survival, Breslow ties)."""

    name = "linear"

    def __init__(self, in_dim: int, config: dict[str, Any] | None = None) -> None:
        self.in_dim = in_dim
        self.config: CoxLinearConfig = make_config(CoxLinearConfig, dict(config or {}))
        self.model: Any = None

    def _matrix(self, bags: Bags) -> FloatArray:
        return np.stack([pool_features(b, self.config.pooling) for b in bags])

    @staticmethod
    def _fit(x: FloatArray, time: FloatArray, event: npt.NDArray[np.bool_], alpha: float) -> Any:
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sksurv.linear_model import CoxPHSurvivalAnalysis
        from sksurv.util import Surv

        y = Surv.from_arrays(event=event, time=time)
        return make_pipeline(StandardScaler(), CoxPHSurvivalAnalysis(alpha=alpha, ties="breslow")).fit(x, y)

    def fit(
        self, train: Bags, time: npt.ArrayLike, event: npt.ArrayLike, val: Bags | None = None,
        time_val: npt.ArrayLike | None = None, event_val: npt.ArrayLike | None = None, *, seed: int = 0,
    ) -> FitInfo:
        """Fit; with a validation split holding an event, choose ``alpha`` on it by Harrell's C."""
        x, t, e = self._matrix(train), np.asarray(time, float), np.asarray(event).astype(bool)
        alpha = self.config.alpha
        if val is not None and len(val) and time_val is not None and event_val is not None and np.any(event_val):
            xv, tv, ev = self._matrix(val), np.asarray(time_val, float), np.asarray(event_val).astype(bool)
            scores = {a: _validation_c(self._fit(x, t, e, a), xv, tv, ev) for a in self.config.alphas}
            alpha = max(scores, key=lambda a: (np.nan_to_num(scores[a], nan=-1.0), a))  # ties: the stronger penalty
            x, t, e = np.concatenate([x, xv]), np.concatenate([t, tv]), np.concatenate([e, ev])
        self.model = self._fit(x, t, e, alpha)
        return FitInfo(selected={"alpha": alpha})

    def predict(self, bags: Bags) -> FloatArray:
        """``(n,)`` risks (linear predictors)."""
        if self.model is None:
            raise InvalidParameterError("the linear Cox model is not fitted")
        return np.asarray(self.model.predict(self._matrix(bags)), dtype=float)


class TorchCox:
    """A torch slide model (``abmil``, ``gridcnn``) with one output trained with the Cox partial likelihood."""

    def __init__(self, model: str, in_dim: int, config: dict[str, Any] | None = None, device: str = "auto",
                 min_events: int = 2) -> None:
        cls = slide_classifier_class(model)
        if not issubclass(cls, TorchSlideClassifier):
            raise InvalidParameterError(f"{model} is not a torch model")
        if min_events < 1:
            raise InvalidParameterError(f"min_events must be >= 1, got {min_events!r}")
        self.name = model
        self.min_events = min_events
        self.net: TorchSlideClassifier[Any] = cls(in_dim, 2, config, device)
        self.net.num_classes = 1  # one output: the risk (build_module reads it)
        self.config = self.net.config

    def fit(
        self, train: Bags, time: npt.ArrayLike, event: npt.ArrayLike, val: Bags | None = None,
        time_val: npt.ArrayLike | None = None, event_val: npt.ArrayLike | None = None, *, seed: int = 0,
    ) -> FitInfo:
        """Train on mini-batches with at least ``min_events`` events; early stopping on the validation split."""
        net = self.net
        torch.manual_seed(seed)
        net.module = net.build_module().to(net.device)
        net._set_input_stats(train)
        t = torch.as_tensor(np.asarray(time, float), dtype=torch.float32, device=net.device)
        e = torch.as_tensor(np.asarray(event).astype(bool), device=net.device)
        if int(e.sum()) < self.min_events:
            raise InvalidParameterError(f"the training slides hold {int(e.sum())} events; the Cox loss needs {self.min_events}")
        size = max(net.config.batch_size, 2)

        def batches(rng: np.random.Generator) -> Iterator[tuple[Inputs, torch.Tensor, torch.Tensor]]:
            for idx in batches_of(len(train), size, rng):
                sel = torch.as_tensor(idx, device=net.device)
                if len(idx) < max(net.min_batch, 2) or not check_events(e[sel], self.min_events):
                    continue
                yield net.collate([train[int(i)] for i in idx], rng), t[sel], e[sel]

        def batch_loss(module: nn.Module, batch: tuple[Inputs, torch.Tensor, torch.Tensor]) -> torch.Tensor:
            inputs, bt, be = batch
            return cox_breslow_loss(net.logits(inputs)[:, 0], bt, be)

        val_bags = list(val) if val is not None and event_val is not None and np.any(event_val) else []
        tv = torch.as_tensor(np.asarray(time_val if val_bags else [], float), dtype=torch.float32, device=net.device)
        ev = torch.as_tensor(np.asarray(event_val if val_bags else [], bool), device=net.device)

        def val_loss(module: nn.Module) -> float:
            return float(cox_breslow_loss(torch.stack([net.bag_logits(bag)[0] for bag in val_bags]), tv, ev))

        history = fit_module(
            net.module, batches, batch_loss, val_loss if val_bags else None, epochs=net.config.epochs,
            lr=net.config.lr, weight_decay=net.config.weight_decay, patience=net.config.patience, seed=seed,
            optimizer=getattr(net.config, "optimizer", "adamw"), lr_plateau=getattr(net.config, "lr_plateau", 0.0),
            plateau_patience=getattr(net.config, "plateau_patience", 5), min_lr=getattr(net.config, "min_lr", 0.0),
        )
        return FitInfo(best_epoch=history.best_epoch, epochs_run=history.epochs_run, stopped_early=history.stopped_early)

    def predict(self, bags: Bags) -> FloatArray:
        """``(n,)`` risks from the whole bag (the validation view)."""
        self.net.module.eval()
        with torch.no_grad():
            return np.asarray([float(self.net.bag_logits(bag)[0]) for bag in bags], dtype=float)


def create_cox_model(model: str, in_dim: int, config: dict[str, Any] | None = None, device: str = "auto",
                     min_events: int = 2) -> CoxLinear | TorchCox:
    """A fresh Cox model by name."""
    if model not in SURVIVAL_MODELS:
        raise InvalidParameterError(f"model {model!r} cannot fit survival; choose from {', '.join(SURVIVAL_MODELS)}")
    if model == "linear":
        return CoxLinear(in_dim, config)
    return TorchCox(model, in_dim, config, device, min_events)


def _validation_c(model: Any, x: FloatArray, time: FloatArray, event: npt.NDArray[np.bool_]) -> float:
    """Harrell's C of a fitted scikit-survival pipeline on a validation split (its own ``score``); nan without a pair."""
    from sksurv.util import Surv

    try:
        return float(model.score(x, Surv.from_arrays(event=event, time=time)))
    except ZeroDivisionError:
        return float("nan")
