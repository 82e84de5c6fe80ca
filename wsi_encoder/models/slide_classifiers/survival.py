"""Slide-level survival models: a risk per slide (higher = shorter survival) and a survival function.

* ``linear`` (:class:`CoxLinear`): the linear model's pooled features, standardised, into a ridge-penalised
  Cox model (scikit-survival ``CoxPHSurvivalAnalysis``, Breslow ties); ``alpha`` is chosen by inner
  k-fold cross-validation of the partial likelihood on the training fold (see :meth:`CoxLinear.fit`), then
  the model is refit on the whole training fold with it. Survival function: its Breslow baseline
  (:class:`BreslowBaseline`).
* ``abmil`` and ``gridcnn`` (:class:`TorchCox`), ``loss="cox"``: the classifier's network with one output
  (the log hazard ratio) trained with :func:`~wsi_encoder.models.slide_classifiers.survival_loss.cox_breslow_loss`
  over each mini-batch (its risk sets are the batch's slides); batches with fewer than ``min_events``
  events are skipped. Survival function: the Breslow baseline (:class:`BreslowBaseline`) of the fitted
  risks of the training slides.
* The same networks, ``loss="nll"``: ``time_bins`` outputs, the logits of the discrete-time hazard per bin
  (bins at the quantiles of the training fold's event times; the output bias starts at the fold's
  maximum-likelihood hazards, :func:`~wsi_encoder.models.slide_classifiers.survival_loss.baseline_hazard_logits`), trained with
  :func:`~wsi_encoder.models.slide_classifiers.survival_loss.discrete_time_nll`; the risk is minus the
  expected number of bins survived (:func:`~wsi_encoder.models.slide_classifiers.survival_loss.discrete_time_risk`),
  the survival function the product of ``1 - h`` over the bins passed.

Early stopping of the torch models on the loss of the whole validation split.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
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
from wsi_encoder.models.slide_classifiers.regressors import heatmap_kind, outcome_heatmap
from wsi_encoder.models.slide_classifiers.survival_loss import (
    baseline_hazard_logits,
    check_events,
    cox_breslow_loss,
    discrete_survival,
    discrete_time_nll,
    discrete_time_risk,
    time_bin_edges,
    time_bin_index,
)
from wsi_encoder.models.slide_classifiers.torch_base import Inputs, TorchSlideClassifier, batches_of

#: Models that can fit a survival model.
SURVIVAL_MODELS = ("linear", "abmil", "gridcnn")
#: ``--loss`` of the torch survival models.
SURVIVAL_LOSSES = ("cox", "nll")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BreslowBaseline:
    """Breslow's cumulative baseline hazard of a fitted Cox model, as plain arrays (saved with the model).

    ``times``: the distinct observed times of the slides it was fit on, ascending; ``cum_hazard``: H0 at each
    (scikit-survival ``BreslowEstimator`` on the fitted risks, i.e. the log hazard ratios, of those slides).
    """

    times: FloatArray
    cum_hazard: FloatArray

    @classmethod
    def fit(cls, risk: npt.ArrayLike, time: npt.ArrayLike, event: npt.ArrayLike) -> BreslowBaseline:
        """The baseline of ``risk`` (log hazard ratios) on slides with ``time`` and ``event``."""
        from sksurv.linear_model.coxph import BreslowEstimator

        fitted = BreslowEstimator().fit(np.asarray(risk, float), np.asarray(event).astype(bool), np.asarray(time, float))
        steps = fitted.cum_baseline_hazard_
        return cls(np.asarray(steps.x, dtype=float), np.asarray(steps.y, dtype=float))

    def survival(self, risk: npt.ArrayLike, times: npt.ArrayLike) -> FloatArray:
        """``(n, len(times))`` S(t | risk) = exp(-H0(t) exp(risk)); H0 is 0 before the first time, constant after the last."""
        r, t = np.asarray(risk, dtype=float), np.asarray(times, dtype=float)
        step = np.searchsorted(self.times, t, side="right") - 1
        h0 = np.where(step >= 0, self.cum_hazard[np.clip(step, 0, None)], 0.0)
        return np.asarray(np.exp(-np.outer(np.exp(r), h0)), dtype=float)

    def to_arrays(self) -> dict[str, FloatArray]:
        """The arrays saved beside the model's own (``baseline_times``, ``baseline_cum_hazard``)."""
        return {"baseline_times": self.times, "baseline_cum_hazard": self.cum_hazard}

    @classmethod
    def from_arrays(cls, arrays: dict[str, npt.NDArray[Any]]) -> BreslowBaseline | None:
        """The baseline saved by :meth:`to_arrays`, or None when the arrays hold none (a model saved without it)."""
        if "baseline_times" not in arrays:
            return None
        return cls(np.asarray(arrays["baseline_times"], float), np.asarray(arrays["baseline_cum_hazard"], float))


@dataclass(frozen=True)
class CoxLinearConfig:
    """``linear`` Cox settings: ``pooling``, the ridge ``alpha`` used without patients to cross-validate on,
    the grid ``alphas`` and the number of ``inner_folds`` that choose among them."""

    pooling: str = "mean+max"
    alpha: float = 1.0
    alphas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0)
    inner_folds: int = 5

    def validate(self) -> None:
        """Raise :class:`InvalidParameterError` on impossible values."""
        if self.pooling not in ("mean", "max", "mean+max"):
            raise InvalidParameterError(f"linear pooling must be mean, max or mean+max, got {self.pooling!r}")
        if self.alpha <= 0 or not self.alphas or min(self.alphas) <= 0:
            raise InvalidParameterError(f"linear Cox needs alpha > 0 and positive alphas: {self}")
        if self.inner_folds < 2:
            raise InvalidParameterError(f"linear Cox needs inner_folds >= 2, got {self.inner_folds!r}")


def _log_partial_likelihood(risk: FloatArray, time: FloatArray, event: npt.NDArray[np.bool_]) -> float:
    """Cox log partial likelihood (Breslow ties) of fixed risks, by scikit-survival's optimizer (coefficient 1)."""
    from sksurv.linear_model.coxph import CoxPHOptimizer

    optimizer = CoxPHOptimizer(risk[:, None], event, time, alpha=np.zeros(1), ties="breslow")
    return -float(optimizer.nlog_likelihood(np.ones(1))) * len(risk)  # sksurv averages over the slides


class CoxLinear:
    """``linear`` survival: pooled features → standardisation → ridge Cox (scikit-survival, Breslow ties)."""

    name = "linear"

    def __init__(self, in_dim: int, config: dict[str, Any] | None = None) -> None:
        self.in_dim = in_dim
        self.config: CoxLinearConfig = make_config(CoxLinearConfig, dict(config or {}))
        self.model: Any = None
        self.baseline: BreslowBaseline | None = None

    def _matrix(self, bags: Bags) -> FloatArray:
        return np.stack([pool_features(b, self.config.pooling) for b in bags])

    @staticmethod
    def _fit(x: FloatArray, time: FloatArray, event: npt.NDArray[np.bool_], alpha: float) -> Any | None:
        """The standardised ridge Cox fit at ``alpha``, or None where it overflows (the penalty is too weak)."""
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sksurv.linear_model import CoxPHSurvivalAnalysis
        from sksurv.util import Surv

        y = Surv.from_arrays(event=event, time=time)
        try:  # a penalty too weak for (nearly) separable data overflows exp(risk): no usable fit at this alpha
            with np.errstate(over="raise", invalid="raise"):
                return make_pipeline(StandardScaler(), CoxPHSurvivalAnalysis(alpha=alpha, ties="breslow")).fit(x, y)
        except (FloatingPointError, np.linalg.LinAlgError):
            return None

    def cross_validated_likelihood(
        self, x: FloatArray, time: FloatArray, event: npt.NDArray[np.bool_], groups: npt.ArrayLike, seed: int = 0
    ) -> dict[float, float]:
        """Each alpha's cross-validated log partial likelihood (Verweij & van Houwelingen 1993), summed over folds.

        Patient-grouped ``inner_folds`` folds stratified by event (scikit-learn ``StratifiedGroupKFold``);
        fold k scores ``l(b_-k) - l_-k(b_-k)``: the log partial likelihood of all slides minus that of the
        training part, both at the coefficients fitted without fold k. The held-out slides are thus scored
        within the risk sets of the whole cohort, not of the small fold alone (glmnet's criterion). With fewer
        slides with (or without) an event than ``inner_folds``, that many folds are used; with fewer than 2, no
        alpha is scored (empty dict).
        """
        from sklearn.model_selection import StratifiedGroupKFold

        n_splits = min(self.config.inner_folds, int(np.bincount(event.astype(int), minlength=2).min()))
        if n_splits < 2:
            return {}
        if n_splits < self.config.inner_folds:
            logger.info("linear Cox: %d inner folds (the rarer event class has %d slides)", n_splits, n_splits)
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = [(tr, te) for tr, te in splitter.split(x, event.astype(int), np.asarray(groups).astype(str))
                  if event[tr].any()]
        scores: dict[float, float] = {}
        for alpha in self.config.alphas:
            total = 0.0
            for tr, _ in splits:
                fitted = self._fit(x[tr], time[tr], event[tr], alpha)
                if fitted is None:
                    total = -np.inf
                    break
                risk = np.asarray(fitted.predict(x), dtype=float)
                total += _log_partial_likelihood(risk, time, event) - _log_partial_likelihood(risk[tr], time[tr], event[tr])
            scores[float(alpha)] = float(total)
        return scores

    def fit(
        self, train: Bags, time: npt.ArrayLike, event: npt.ArrayLike, val: Bags | None = None,
        time_val: npt.ArrayLike | None = None, event_val: npt.ArrayLike | None = None, *, seed: int = 0,
        groups: npt.ArrayLike | None = None, refit: dict[str, Any] | None = None,
    ) -> FitInfo:
        """Fit on ``train`` (and ``val``, which is simply added: ``linear`` needs no early stopping).

        ``alpha``: ``refit["alpha"]`` when given; else, with ``groups`` (the patient of every slide of train then
        val) and at least ``inner_folds`` patients, the alpha of ``alphas`` with the best
        :meth:`cross_validated_likelihood` (ties: the stronger penalty); else ``config.alpha``.
        """
        x, t, e = self._matrix(train), np.asarray(time, float), np.asarray(event).astype(bool)
        if val is not None and len(val) and time_val is not None and event_val is not None:
            x = np.concatenate([x, self._matrix(val)])
            t = np.concatenate([t, np.asarray(time_val, float)])
            e = np.concatenate([e, np.asarray(event_val).astype(bool)])
        alpha = float((refit or {}).get("alpha", self.config.alpha))
        scores: dict[float, float] = {}
        if refit is None and groups is not None and len(set(np.asarray(groups).astype(str))) >= self.config.inner_folds:
            scores = self.cross_validated_likelihood(x, t, e, groups, seed)
            alpha = max(scores, key=lambda a: (scores[a], a)) if scores else alpha
        model = self._fit(x, t, e, alpha)
        for stronger in sorted(a for a in (*self.config.alphas, alpha * 10, alpha * 100) if a > alpha):
            if model is not None:
                break
            logger.warning("linear Cox: alpha %g overflows on these slides (separable data); using %g", alpha, stronger)
            alpha, model = stronger, self._fit(x, t, e, stronger)
        if model is None:
            raise InvalidParameterError(f"linear Cox: no ridge penalty up to alpha {alpha:g} gives a finite fit")
        self.model = model
        self.baseline = BreslowBaseline.fit(model.predict(x), t, e)
        return FitInfo(selected={"alpha": alpha, **({"cv_log_likelihood": scores} if scores else {})})

    def predict(self, bags: Bags) -> FloatArray:
        """``(n,)`` risks (linear predictors)."""
        if self.model is None:
            raise InvalidParameterError("the linear Cox model is not fitted")
        return np.asarray(self.model.predict(self._matrix(bags)), dtype=float)

    def survival(self, bags: Bags, times: npt.ArrayLike) -> FloatArray:
        """``(n, len(times))`` S(t | slide) from the Breslow baseline of the fit (constant past its follow-up)."""
        if self.baseline is None:
            raise InvalidParameterError("the linear Cox model has no baseline hazard (not fitted, or saved without one)")
        return self.baseline.survival(self.predict(bags), times)


class TorchCox:
    """A torch slide model (``abmil``, ``gridcnn``) trained for survival: Cox (one output) or discrete-time NLL."""

    def __init__(self, model: str, in_dim: int, config: dict[str, Any] | None = None, device: str = "auto",
                 min_events: int = 2, loss: str = "cox", time_bins: int = 10) -> None:
        cls = slide_classifier_class(model)
        if not issubclass(cls, TorchSlideClassifier):
            raise InvalidParameterError(f"{model} is not a torch model")
        if min_events < 1:
            raise InvalidParameterError(f"min_events must be >= 1, got {min_events!r}")
        if loss not in SURVIVAL_LOSSES:
            raise InvalidParameterError(f"survival --loss must be one of {', '.join(SURVIVAL_LOSSES)}, got {loss!r}")
        if loss == "nll" and time_bins < 2:
            raise InvalidParameterError(f"--time-bins must be at least 2, got {time_bins!r}")
        self.name = model
        self.in_dim = in_dim
        self.loss = loss
        self.min_events = min_events
        self.time_bins = time_bins
        self.net: TorchSlideClassifier[Any] = cls(in_dim, 2, config, device)
        # outputs: the risk (cox) or one hazard logit per time bin (nll); build_module reads num_classes
        self.net.num_classes = 1 if loss == "cox" else time_bins
        self.net.module = self.net.build_module().to(self.net.device)  # the head of that width
        self.config = self.net.config
        self.edges = np.zeros(0)  # nll: inner time-bin edges of the training fold
        self.baseline: BreslowBaseline | None = None  # cox: the Breslow baseline of the training slides

    def _loss(self, out: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
        if self.loss == "cox":
            return cox_breslow_loss(out[:, 0], time, event)
        return discrete_time_nll(out, time, event, torch.as_tensor(self.edges, dtype=time.dtype, device=out.device))

    def fit(
        self, train: Bags, time: npt.ArrayLike, event: npt.ArrayLike, val: Bags | None = None,
        time_val: npt.ArrayLike | None = None, event_val: npt.ArrayLike | None = None, *, seed: int = 0,
        groups: npt.ArrayLike | None = None, refit: dict[str, Any] | None = None,
    ) -> FitInfo:
        """Train with early stopping on the validation split (``refit``: a fixed number of epochs, no validation).

        Cox: mini-batches with at least ``min_events`` events. NLL: every mini-batch (the likelihood is a sum
        over slides); the time bins are placed on ``train``'s event times. ``groups`` is not used.
        """
        net = self.net
        torch.manual_seed(seed)
        net.module = net.build_module().to(net.device)
        net._set_input_stats(train)
        time_np, event_np = np.asarray(time, float), np.asarray(event).astype(bool)
        if self.loss == "nll":
            self.edges = time_bin_edges(time_np, event_np, self.time_bins)
            _start_at(net.module, baseline_hazard_logits(time_np, event_np, self.edges))
        t = torch.as_tensor(time_np, dtype=torch.float32, device=net.device)
        e = torch.as_tensor(event_np, device=net.device)
        if self.loss == "cox" and int(e.sum()) < self.min_events:
            raise InvalidParameterError(f"the training slides hold {int(e.sum())} events; the Cox loss needs {self.min_events}")
        size = max(net.config.batch_size, 2)

        def batches(rng: np.random.Generator) -> Iterator[tuple[Inputs, torch.Tensor, torch.Tensor]]:
            for idx in batches_of(len(train), size, rng):
                sel = torch.as_tensor(idx, device=net.device)
                if len(idx) < max(net.min_batch, 2) or (self.loss == "cox" and not check_events(e[sel], self.min_events)):
                    continue
                yield net.collate([train[int(i)] for i in idx], rng), t[sel], e[sel]

        def batch_loss(module: nn.Module, batch: tuple[Inputs, torch.Tensor, torch.Tensor]) -> torch.Tensor:
            inputs, bt, be = batch
            return self._loss(net.logits(inputs), bt, be)

        usable_val = val is not None and event_val is not None and (self.loss == "nll" or np.any(event_val))
        val_bags = list(val) if usable_val and val is not None and refit is None else []
        tv = torch.as_tensor(np.asarray(time_val if val_bags else [], float), dtype=torch.float32, device=net.device)
        ev = torch.as_tensor(np.asarray(event_val if val_bags else [], bool), device=net.device)

        def val_loss(module: nn.Module) -> float:
            return float(self._loss(torch.stack([net.bag_logits(bag) for bag in val_bags]), tv, ev))

        history = fit_module(
            net.module, batches, batch_loss, val_loss if val_bags else None,
            epochs=int((refit or {}).get("epochs", net.config.epochs)),
            lr=net.config.lr, weight_decay=net.config.weight_decay, patience=net.config.patience, seed=seed,
            optimizer=getattr(net.config, "optimizer", "adamw"), lr_plateau=getattr(net.config, "lr_plateau", 0.0),
            plateau_patience=getattr(net.config, "plateau_patience", 5), min_lr=getattr(net.config, "min_lr", 0.0),
        )
        if self.loss == "cox":
            self.baseline = BreslowBaseline.fit(self.predict(train), time_np, event_np)
        return FitInfo(best_epoch=history.best_epoch, epochs_run=history.epochs_run, stopped_early=history.stopped_early)

    def _outputs(self, bags: Bags) -> torch.Tensor:
        self.net.module.eval()
        with torch.no_grad():
            return torch.stack([self.net.bag_logits(bag) for bag in bags]).float().cpu()

    def predict(self, bags: Bags) -> FloatArray:
        """``(n,)`` risks from the whole bag (the validation view): the log hazard ratio, or ``-sum_k S_k`` (nll)."""
        out = self._outputs(bags)
        risk = out[:, 0] if self.loss == "cox" else discrete_time_risk(out)
        return np.asarray(risk.numpy(), dtype=float)

    @property
    def heatmap_kind(self) -> str:
        """What :meth:`heatmap` draws."""
        return heatmap_kind(self.net, "risk")

    def heatmap(self, bag: SlideBag) -> FloatArray:
        """``(R, Q)`` map in [0, 1], NaN outside tissue: attention (abmil), Grad-CAM of the risk (gridcnn)."""
        if self.loss == "cox":
            return outcome_heatmap(self.net, bag, lambda out: out[0])
        return outcome_heatmap(self.net, bag, lambda out: discrete_time_risk(out[None])[0])

    def survival(self, bags: Bags, times: npt.ArrayLike) -> FloatArray:
        """``(n, len(times))`` S(t | slide): Breslow baseline (cox) or the product of ``1 - h`` over bins passed (nll).

        A time in bin k has survived the bins before it (``S(t) = S_{k-1}``; 1 in bin 0), the convention of
        the NLL, which counts a death in bin k as falling at its end.
        """
        t = np.asarray(times, dtype=float)
        if self.loss == "cox":
            if self.baseline is None:
                raise InvalidParameterError("the Cox model has no baseline hazard (not fitted, or saved without one)")
            return self.baseline.survival(self.predict(bags), t)
        surv = discrete_survival(self._outputs(bags)).double()
        passed = F.pad(surv, (1, 0), value=1.0)
        k = time_bin_index(torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(self.edges, dtype=torch.float64))
        return np.asarray(passed[:, k].numpy(), dtype=float)


def _start_at(module: nn.Module, bias: FloatArray) -> None:
    """Set the bias of ``module``'s output layer (its last ``nn.Linear``, of ``len(bias)`` outputs) to ``bias``."""
    heads = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not heads or heads[-1].out_features != len(bias) or heads[-1].bias is None:
        raise InvalidParameterError(f"internal: no output layer of {len(bias)} units to start at the baseline hazards")
    with torch.no_grad():
        heads[-1].bias.copy_(torch.as_tensor(bias, dtype=heads[-1].bias.dtype))


SurvivalModel = CoxLinear | TorchCox


def create_cox_model(model: str, in_dim: int, config: dict[str, Any] | None = None, device: str = "auto",
                     min_events: int = 2, loss: str = "cox", time_bins: int = 10) -> SurvivalModel:
    """A fresh survival model by name (``loss``, ``time_bins`` and ``min_events`` apply to the torch models)."""
    if model not in SURVIVAL_MODELS:
        raise InvalidParameterError(f"model {model!r} cannot fit survival; choose from {', '.join(SURVIVAL_MODELS)}")
    if model == "linear":
        return CoxLinear(in_dim, config)
    return TorchCox(model, in_dim, config, device, min_events, loss, time_bins)
