"""Slide-level regressors: a continuous target per slide, from the same bags as the classifiers.

* ``linear`` (:class:`RidgeRegressor`): mean- and max-pooled tile features, standardised, into a ridge
  regression (scikit-learn); ``alpha`` is chosen on the inner validation split by mean squared error
  (RidgeCV's criterion, on held-out patients instead of leave-one-out), then the model is refit on
  train + validation with it.
* ``abmil`` and ``gridcnn`` (:class:`TorchRegressor`): the classifier's network with one output, trained
  with ``mse`` or ``huber`` loss on the standardised target (training-fold mean and sd), early stopping
  on the same loss over the validation split; predictions are mapped back to the target's units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.io.slide_records import SlideBag
from wsi_encoder.models.slide_classifiers.base import (
    Bags,
    FitInfo,
    FloatArray,
    make_config,
    slide_classifier_class,
)
from wsi_encoder.models.slide_classifiers.fit_loop import fit_module
from wsi_encoder.models.slide_classifiers.linear import pool_features
from wsi_encoder.models.slide_classifiers.torch_base import Inputs, TorchSlideClassifier, batches_of

#: ``--loss`` of the torch regressors.
REGRESSION_LOSSES = ("mse", "huber")
#: Models that can regress.
REGRESSION_MODELS = ("linear", "abmil", "gridcnn")


@dataclass(frozen=True)
class RidgeConfig:
    """``linear`` regression settings: ``pooling``, the ``alpha`` used without a validation split, the grid
    ``alphas`` searched on it."""

    pooling: str = "mean+max"
    alpha: float = 1.0
    alphas: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)

    def validate(self) -> None:
        """Raise :class:`InvalidParameterError` on impossible values."""
        if self.pooling not in ("mean", "max", "mean+max"):
            raise InvalidParameterError(f"linear pooling must be mean, max or mean+max, got {self.pooling!r}")
        if self.alpha <= 0 or not self.alphas or min(self.alphas) <= 0:
            raise InvalidParameterError(f"linear regression needs alpha > 0 and positive alphas: {self}")


class RidgeRegressor:
    """``linear`` regression: pooled features → standardisation → ridge (scikit-learn)."""

    name = "linear"

    def __init__(self, in_dim: int, config: dict[str, Any] | None = None) -> None:
        self.in_dim = in_dim
        self.config: RidgeConfig = make_config(RidgeConfig, dict(config or {}))
        self.model: Any = None

    def _matrix(self, bags: Bags) -> FloatArray:
        return np.stack([pool_features(b, self.config.pooling) for b in bags])

    def _fit(self, x: FloatArray, y: FloatArray, alpha: float) -> Any:
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x, y)

    def fit(
        self, train: Bags, y: npt.ArrayLike, val: Bags | None = None, y_val: npt.ArrayLike | None = None, *,
        seed: int = 0, refit: dict[str, Any] | None = None,
    ) -> FitInfo:
        """Fit; with a validation split, choose ``alpha`` on it by MSE and refit on train + validation."""
        x, target = self._matrix(train), np.asarray(y, dtype=float)
        alpha = float((refit or {}).get("alpha", self.config.alpha))
        if refit is None and val is not None and len(val) and y_val is not None:
            xv, tv = self._matrix(val), np.asarray(y_val, dtype=float)
            errors = {a: float(np.mean((self._fit(x, target, a).predict(xv) - tv) ** 2)) for a in self.config.alphas}
            alpha = min(errors, key=lambda a: (errors[a], -a))  # ties: the stronger penalty
            x, target = np.concatenate([x, xv]), np.concatenate([target, tv])
        self.model = self._fit(x, target, alpha)
        return FitInfo(selected={"alpha": alpha})

    def predict(self, bags: Bags) -> FloatArray:
        """``(n,)`` predicted targets."""
        if self.model is None:
            raise InvalidParameterError("the linear regressor is not fitted")
        return np.asarray(self.model.predict(self._matrix(bags)), dtype=float)


class TorchRegressor:
    """A torch slide model (``abmil``, ``gridcnn``) with one output, trained on a continuous target."""

    def __init__(self, model: str, in_dim: int, config: dict[str, Any] | None = None, loss: str = "mse",
                 device: str = "auto") -> None:
        if loss not in REGRESSION_LOSSES:
            raise InvalidParameterError(f"unknown --loss {loss!r} for regression; choose from {', '.join(REGRESSION_LOSSES)}")
        cls = slide_classifier_class(model)
        if not issubclass(cls, TorchSlideClassifier):
            raise InvalidParameterError(f"{model} is not a torch model")
        self.name = model
        self.in_dim = in_dim
        self.loss = loss
        self.net: TorchSlideClassifier[Any] = cls(in_dim, 2, config, device)
        self.net.num_classes = 1  # one output: the standardised target (build_module reads it)
        self.net.module = self.net.build_module().to(self.net.device)  # the head of that width
        self.config = self.net.config
        self.y_mean, self.y_std = 0.0, 1.0

    def _loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, target) if self.loss == "mse" else F.huber_loss(out, target, delta=1.0)

    def fit(
        self, train: Bags, y: npt.ArrayLike, val: Bags | None = None, y_val: npt.ArrayLike | None = None, *,
        seed: int = 0, refit: dict[str, Any] | None = None,
    ) -> FitInfo:
        """Train with early stopping on the validation loss (``refit``: a fixed number of epochs, no validation)."""
        net = self.net
        torch.manual_seed(seed)
        net.module = net.build_module().to(net.device)
        net._set_input_stats(train)
        target = np.asarray(y, dtype=float)
        self.y_mean, self.y_std = float(target.mean()), float(target.std()) or 1.0
        z = torch.as_tensor((target - self.y_mean) / self.y_std, dtype=torch.float32, device=net.device)

        def batches(rng: np.random.Generator) -> Iterator[tuple[Inputs, torch.Tensor]]:
            for idx in batches_of(len(train), net.config.batch_size, rng):
                if len(idx) < net.min_batch <= len(train):
                    continue
                yield net.collate([train[int(i)] for i in idx], rng), z[torch.as_tensor(idx, device=net.device)]

        def batch_loss(module: nn.Module, batch: tuple[Inputs, torch.Tensor]) -> torch.Tensor:
            inputs, t = batch
            return self._loss(net.logits(inputs)[:, 0], t)

        val_bags = list(val) if val is not None and y_val is not None else []
        zv = torch.as_tensor((np.asarray(y_val if val_bags else [], dtype=float) - self.y_mean) / self.y_std,
                             dtype=torch.float32, device=net.device)

        def val_loss(module: nn.Module) -> float:
            return float(self._loss(torch.stack([net.bag_logits(bag)[0] for bag in val_bags]), zv))

        history = fit_module(
            net.module, batches, batch_loss, val_loss if (val_bags and refit is None) else None,
            epochs=int((refit or {}).get("epochs", net.config.epochs)), lr=net.config.lr,
            weight_decay=net.config.weight_decay, patience=net.config.patience, seed=seed,
            optimizer=getattr(net.config, "optimizer", "adamw"), lr_plateau=getattr(net.config, "lr_plateau", 0.0),
            plateau_patience=getattr(net.config, "plateau_patience", 5), min_lr=getattr(net.config, "min_lr", 0.0),
        )
        return FitInfo(best_epoch=history.best_epoch, epochs_run=history.epochs_run, stopped_early=history.stopped_early)

    @property
    def heatmap_kind(self) -> str:
        """What :meth:`heatmap` draws."""
        return heatmap_kind(self.net, "prediction")

    def heatmap(self, bag: SlideBag) -> FloatArray:
        """``(R, Q)`` map in [0, 1], NaN outside tissue: attention (abmil), Grad-CAM of the prediction (gridcnn)."""
        return outcome_heatmap(self.net, bag, lambda out: out[0])

    def predict(self, bags: Bags) -> FloatArray:
        """``(n,)`` predicted targets, in the target's units, from the whole bag (the validation view).

        The classifiers' prediction-time views (gridcnn's test-time augmentation) average probabilities,
        which a single unbounded output does not have, so they are not used here.
        """
        self.net.module.eval()
        with torch.no_grad():
            out = [float(self.net.bag_logits(bag)[0]) for bag in bags]
        return np.asarray(out, dtype=float) * self.y_std + self.y_mean


Regressor = RidgeRegressor | TorchRegressor


def outcome_heatmap(
    net: TorchSlideClassifier[Any], bag: SlideBag, score_of: Callable[[torch.Tensor], torch.Tensor]
) -> FloatArray:
    """The heatmap of a regression or survival network: abmil's attention (unsigned: where the model looks),
    gridcnn's Grad-CAM of ``score_of(outputs)`` (the prediction or the risk: where the features push it up)."""
    from wsi_encoder.models.slide_classifiers.gridcnn import GridCNNClassifier

    if isinstance(net, GridCNNClassifier):
        return net.heatmap(bag, score_of=score_of)
    return net.heatmap(bag)


def heatmap_kind(net: TorchSlideClassifier[Any], score: str) -> str:
    """What :func:`outcome_heatmap` draws, for the picture's label."""
    return f"Grad-CAM of the {score} (first block; bright = pushes it up)" if net.name == "gridcnn" else net.heatmap_kind


def create_regressor(model: str, in_dim: int, config: dict[str, Any] | None = None, loss: str = "mse",
                     device: str = "auto") -> Regressor:
    """A fresh regressor by model name (``loss`` applies to the torch models; ``linear`` is least squares)."""
    if model not in REGRESSION_MODELS:
        raise InvalidParameterError(f"model {model!r} cannot regress; choose from {', '.join(REGRESSION_MODELS)}")
    if model == "linear":
        return RidgeRegressor(in_dim, config)
    return TorchRegressor(model, in_dim, config, loss, device)


def refit_params(model: str, infos: Sequence[FitInfo]) -> dict[str, Any]:
    """What the folds selected, for a model refit on all slides: the median best epoch, the most chosen alpha."""
    if model == "linear":
        chosen = [i.selected["alpha"] for i in infos if i.selected]
        return {"alpha": max(set(chosen), key=lambda a: (chosen.count(a), a))} if chosen else {}
    return slide_classifier_class(model).refit_params(infos)
