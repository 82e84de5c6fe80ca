"""A trained regression or survival slide model on disk: the same weights folder as a classifier's.

``model.safetensors`` holds plain arrays (no pickle): the torch network's state, or for ``linear`` the
scaler's mean and scale and the coefficients (and the ridge intercept). ``model.json`` (written last,
format ``wsi_encoder.slide_outcome/1``) holds the target, model name, config, ``in_dim``, ``loss`` and what
the arrays do not: the target's standardisation of a torch regressor, the time-bin edges of ``--loss nll``.
A Cox model (``linear``, or a torch model with ``loss=cox``) also saves its Breslow baseline
(:class:`~wsi_encoder.models.slide_classifiers.survival.BreslowBaseline`: ``baseline_times`` and
``baseline_cum_hazard`` in ``model.safetensors``), so a loaded survival model gives S(t | slide) as it did in
training (``--loss nll`` needs only its bin edges). A loaded model predicts (``prediction`` / ``risk``), survival
probabilities (survival models) and draws heatmaps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from wsi_encoder import __version__
from wsi_encoder.errors import CheckpointError, WsiEncoderError
from wsi_encoder.models.slide_classifiers.base import Bags
from wsi_encoder.models.slide_classifiers.regressors import (
    Regressor,
    RidgeRegressor,
    TorchRegressor,
    create_regressor,
)
from wsi_encoder.models.slide_classifiers.survival import (
    BreslowBaseline,
    CoxLinear,
    SurvivalModel,
    TorchCox,
    create_cox_model,
)
from wsi_encoder.models.weights_folder import load_folder_weights, read_folder_config, save_weights_folder

logger = logging.getLogger(__name__)

OUTCOME_FORMAT = "wsi_encoder.slide_outcome/1"
MODEL_JSON = "model.json"
OutcomeModel = Regressor | SurvivalModel


class LinearPredictor:
    """A fitted linear model as arrays: ``((x - mean) / scale) @ coef + intercept``."""

    def __init__(self, mean: npt.NDArray[Any], scale: npt.NDArray[Any], coef: npt.NDArray[Any], intercept: float) -> None:
        self.mean, self.scale, self.coef, self.intercept = mean, scale, coef, intercept

    def predict(self, x: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """Linear predictions of the ``(n, d)`` pooled features."""
        return np.asarray(((x - self.mean) / self.scale) @ self.coef + self.intercept, dtype=float)


def _arrays(model: OutcomeModel) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Any]]:
    if isinstance(model, RidgeRegressor | CoxLinear):
        if model.model is None:
            raise WsiEncoderError("internal: the linear model is not fitted")
        if isinstance(model.model, LinearPredictor):
            p = model.model
            mean, scale, coef, intercept = p.mean, p.scale, p.coef, p.intercept
        else:
            scaler, estimator = model.model[0], model.model[-1]
            mean, scale, coef = scaler.mean_, scaler.scale_, estimator.coef_
            intercept = float(getattr(estimator, "intercept_", 0.0))
        arrays = {"mean": mean, "scale": scale, "coef": coef, "intercept": np.array([intercept])}
        if isinstance(model, CoxLinear) and model.baseline is not None:
            arrays.update(model.baseline.to_arrays())
        return {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}, {}
    extra: dict[str, Any] = {"loss": model.loss}
    if isinstance(model, TorchRegressor):
        extra.update(y_mean=model.y_mean, y_std=model.y_std)
    else:
        extra.update(time_bins=model.time_bins, min_events=model.min_events, edges=[float(v) for v in model.edges])
        if model.baseline is not None:
            return {**model.net.state_arrays(), **model.baseline.to_arrays()}, extra
    return model.net.state_arrays(), extra


def survival_column(horizon: float) -> str:
    """The ``predictions.csv`` column of S(horizon | slide): ``survival_at_<horizon>`` (``%g``, the labels' time unit)."""
    return f"survival_at_{horizon:g}"


def model_horizons(meta: dict[str, Any]) -> list[float]:
    """The horizons a survival model was evaluated at in training (``horizons`` of ``model.json``; empty if none)."""
    return [float(h) for h in meta.get("horizons") or []]


def survival_at(model: OutcomeModel, bags: Bags, horizons: Sequence[float]) -> list[dict[str, float]]:
    """Per slide, ``{survival_at_<t>: S(t | slide)}`` at ``horizons``.

    An empty dict per slide for a regression model, without horizons, or for a Cox model saved before its
    baseline was (it predicts risks only).
    """
    if not horizons or isinstance(model, RidgeRegressor | TorchRegressor):
        return [{} for _ in bags]
    if (isinstance(model, CoxLinear) or model.loss == "cox") and model.baseline is None:
        logger.warning("%s: this survival model was saved without its baseline hazard; no survival_at_<t>", model.name)
        return [{} for _ in bags]
    values = model.survival(bags, list(horizons))
    return [{survival_column(h): float(v) for h, v in zip(horizons, row, strict=True)} for row in values]


def save_outcome_model(model: OutcomeModel, target: str, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` then ``model.json`` (target, name, config, in_dim, loss, ``meta``) into ``out_dir``."""
    from wsi_encoder.models.slide_classifiers.base import config_dict

    arrays, extra = _arrays(model)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    record = {"format": OUTCOME_FORMAT, "target": target, "name": model.name, "in_dim": int(model.in_dim),
              "config": config_dict(model.config), **extra, **meta, "wsi_encoder_version": __version__}
    save_weights_folder(out_dir, tensors, record, config_name=MODEL_JSON,
                        metadata={"format": OUTCOME_FORMAT, "model": model.name})
    return Path(out_dir) / MODEL_JSON


def is_outcome_model(model_dir: str | Path) -> bool:
    """Whether ``model_dir/model.json`` is a regression or survival model (not a classifier)."""
    path = Path(model_dir) / MODEL_JSON
    if not path.is_file():
        return False
    import json

    try:
        return bool(json.loads(path.read_text()).get("format") == OUTCOME_FORMAT)
    except (OSError, ValueError):
        return False


def load_outcome_model(model_dir: str | Path, device: str = "auto") -> tuple[OutcomeModel, dict[str, Any]]:
    """Load a model saved by :func:`save_outcome_model`.

    Raises
    ------
    CheckpointError
        When the folder, ``model.json`` or the weights are missing, corrupt or do not match.
    """
    folder = Path(model_dir)
    meta = read_folder_config(folder, MODEL_JSON, hint="pass the --out folder of `wsienc classify train --target ...`")
    if meta.get("format") != OUTCOME_FORMAT:
        raise CheckpointError(f"{folder / MODEL_JSON}: format {meta.get('format')!r} is not {OUTCOME_FORMAT!r}")
    arrays = {k: v.numpy() for k, v in load_folder_weights(folder, meta, config_name=MODEL_JSON).items()}
    try:
        name, in_dim, config, target = str(meta["name"]), int(meta["in_dim"]), dict(meta["config"]), meta["target"]
        model: OutcomeModel
        if target == "regression":
            model = create_regressor(name, in_dim, config, str(meta.get("loss") or "mse"), device)
        elif target == "survival":
            model = create_cox_model(name, in_dim, config, device, int(meta.get("min_events") or 2),
                                     str(meta.get("loss") or "cox"), int(meta.get("time_bins") or 10))
        else:
            raise CheckpointError(f"target {target!r} is not regression or survival")
        baseline = BreslowBaseline.from_arrays(arrays)
        arrays = {k: v for k, v in arrays.items() if k not in ("baseline_times", "baseline_cum_hazard")}
        if isinstance(model, CoxLinear | TorchCox):
            model.baseline = baseline
        if isinstance(model, RidgeRegressor | CoxLinear):
            model.model = LinearPredictor(arrays["mean"], arrays["scale"], arrays["coef"], float(arrays["intercept"][0]))
        else:
            model.net.load_state_arrays(arrays)
            if isinstance(model, TorchRegressor):
                model.y_mean, model.y_std = float(meta["y_mean"]), float(meta["y_std"])
            elif isinstance(model, TorchCox):
                model.edges = np.asarray(meta.get("edges") or [], dtype=float)
    except (KeyError, TypeError, ValueError, WsiEncoderError) as exc:
        raise CheckpointError(f"{folder / MODEL_JSON}: cannot rebuild the model ({exc})") from exc
    return model, meta
