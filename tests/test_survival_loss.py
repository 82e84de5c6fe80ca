"""The torch Cox loss against scikit-survival's Breslow partial likelihood, the C-index sign, and the discrete-time
NLL against pycox's logistic-hazard formula and a per-slide loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sksurv.linear_model.coxph import CoxPHOptimizer

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.models.slide_classifiers.survival_loss import (
    check_events,
    cox_breslow_loss,
    discrete_survival,
    discrete_time_nll,
    discrete_time_risk,
    time_bin_edges,
    time_bin_index,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cox_loss_equals_sksurv_breslow_partial_likelihood_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 40
    risk = rng.normal(0, 1, n)
    time = rng.integers(1, 8, n).astype(float)  # many tied times
    event = rng.random(n) < 0.6
    event[0] = True
    # sksurv's optimizer at fixed coefficient 1 on the single feature `risk`: X @ w = risk
    reference = CoxPHOptimizer(risk[:, None], event, time, alpha=np.zeros(1), ties="breslow").nlog_likelihood(np.ones(1))
    ours = cox_breslow_loss(torch.tensor(risk), torch.tensor(time), torch.tensor(event))
    # sksurv averages over all samples, ours over events
    assert float(ours) * event.sum() / n == pytest.approx(reference, rel=1e-10)


def test_cox_loss_gradient_flows_and_prefers_the_right_sign() -> None:
    time = torch.tensor([1.0, 2.0, 3.0, 4.0])
    event = torch.tensor([1, 1, 0, 1])
    right = cox_breslow_loss(-time, time, event)  # shorter survival = higher risk
    wrong = cox_breslow_loss(time, time, event)
    assert float(right) < float(wrong)
    risk = torch.zeros(4, requires_grad=True)
    cox_breslow_loss(risk, time, event).backward()
    assert risk.grad is not None and float(risk.grad[0]) < 0  # the first death wants a higher risk


def test_batches_without_events_are_refused() -> None:
    with pytest.raises(InvalidParameterError, match="no event"):
        cox_breslow_loss(torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3))
    assert check_events(torch.tensor([1, 0, 1]), 2)
    assert not check_events(torch.tensor([1, 0, 0]), 2)


def test_c_index_sign_risk_minus_time_is_one() -> None:
    from lifelines.utils import concordance_index

    from wsi_encoder.evaluation.metrics import harrell_c, survival_metrics

    rng = np.random.default_rng(0)
    time = rng.exponential(10, 60)
    event = rng.random(60) < 0.7
    assert harrell_c(time, event, -time) == pytest.approx(1.0)  # high risk = short survival
    assert harrell_c(time, event, time) == pytest.approx(0.0)  # the sign bug scores 0, and fails
    risk = rng.normal(size=60) - time / 10
    # lifelines takes a score where higher = longer survival
    assert harrell_c(time, event, risk) == pytest.approx(concordance_index(time, -risk, event), abs=1e-9)
    m = survival_metrics(time, event, -time)
    assert m["c_index"] == pytest.approx(1.0) and m["uno_c"] == pytest.approx(1.0)
    assert len(m["horizons"]) == 3 and all(v == pytest.approx(1.0) for v in m["td_auc"].values())


def test_stratified_c_compares_pairs_within_a_fold_only() -> None:
    from lifelines.utils import concordance_index
    from sksurv.metrics import concordance_index_ipcw
    from sksurv.util import Surv

    from wsi_encoder.evaluation.metrics import (
        c_index_bootstrap,
        harrell_c,
        patient_resample_weights,
        survival_metrics,
    )

    rng = np.random.default_rng(1)
    time = rng.exponential(10, 120)
    event = rng.random(120) < 0.7
    fold = np.repeat([0, 1, 2], 40)
    risk = -time / 10 + rng.normal(size=120)
    shifted = risk + 5.0 * fold  # each fold model has its own constant: pooled pairs across folds go wrong
    by_fold = harrell_c(time, event, risk, fold)
    assert harrell_c(time, event, shifted, fold) == pytest.approx(by_fold, abs=1e-12)
    assert harrell_c(time, event, shifted) < by_fold - 0.05
    # one fold alone: lifelines' Harrell's C (higher score = longer survival there)
    f0 = fold == 0
    assert harrell_c(time[f0], event[f0], risk[f0], fold[f0]) == pytest.approx(
        concordance_index(time[f0], -risk[f0], event[f0]), abs=1e-12)
    m = survival_metrics(time, event, shifted, strata=fold)
    assert m["c_index"] == pytest.approx(by_fold) and m["c_index_pooled_naive"] == pytest.approx(harrell_c(time, event, shifted))
    # Uno's C of each fold, censoring estimated on all slides, as scikit-survival computes it; their mean is uno_c
    y = Surv.from_arrays(event, time)
    tau = m["uno_c_tau"]
    unos = [concordance_index_ipcw(y, y[fold == k], shifted[fold == k], tau=tau)[0] for k in range(3)]
    assert m["uno_c_strata"] == pytest.approx(unos) and m["uno_c"] == pytest.approx(np.mean(unos))
    # the bootstrap draws patients within their fold: every resample keeps 40 slides per fold
    patients = np.array([f"p{i // 2}" for i in range(120)])
    weights = patient_resample_weights(patients, 50, 0, strata=fold)
    assert np.allclose([[w[fold == k].sum() for k in range(3)] for w in weights], 40)
    low, high = c_index_bootstrap(time, event, shifted, patients, 200, 0, strata=fold)
    assert low < by_fold < high and high - low < 0.2


# ---------------------------------------------------------------------------------------------- discrete time
def _pycox_logistic_hazard_nll(logits: torch.Tensor, bins: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """pycox's ``nll_logistic_hazard`` (pycox.models.loss), written out: BCE against a one-hot of the event bin,
    summed up to the slide's bin."""
    target = torch.zeros_like(logits).scatter(1, bins[:, None], event.to(logits.dtype)[:, None])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return bce.cumsum(1).gather(1, bins[:, None]).view(-1).mean()


def _loop_nll(logits: np.ndarray, time: np.ndarray, event: np.ndarray, edges: np.ndarray) -> float:
    """The per-slide likelihood by a plain loop over bins: h = sigmoid(logit), P(time, event) as a product."""
    total = 0.0
    for row, t, d in zip(logits, time, event, strict=True):
        k = int(sum(t >= edge for edge in edges))  # the bin of the time
        h = [1.0 / (1.0 + math.exp(-v)) for v in row]
        likelihood = math.prod(1.0 - h[j] for j in range(k)) * (h[k] if d else 1.0 - h[k])
        total -= math.log(likelihood)
    return total / len(time)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_discrete_time_nll_equals_pycox_formula_and_a_per_slide_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = 50, 6
    time = rng.exponential(5.0, n).round(1)  # ties, some on the edges
    event = rng.random(n) < 0.6
    edges = time_bin_edges(time, event, k)
    assert len(edges) == k - 1 and np.all(np.diff(edges) >= 0)
    logits = rng.normal(0, 1.5, (n, k))
    ours = float(discrete_time_nll(torch.tensor(logits), torch.tensor(time), torch.tensor(event), torch.tensor(edges)))
    bins = time_bin_index(torch.tensor(time), torch.tensor(edges))
    assert ours == pytest.approx(float(_pycox_logistic_hazard_nll(torch.tensor(logits), bins, torch.tensor(event))), rel=1e-10)
    assert ours == pytest.approx(_loop_nll(logits, time, event, edges), rel=1e-10)


def test_discrete_time_bins_survival_and_risk() -> None:
    edges = time_bin_edges(np.array([1.0, 2.0, 3.0, 4.0, 9.0]), np.array([1, 1, 1, 1, 0]), 2)
    assert edges.tolist() == [2.5]  # the median of the event times, the censored 9 does not count
    with pytest.raises(InvalidParameterError, match="no event"):
        time_bin_edges(np.array([1.0, 2.0]), np.array([0, 0]), 3)
    with pytest.raises(InvalidParameterError, match="at least 2"):
        time_bin_edges(np.array([1.0, 2.0]), np.array([1, 1]), 1)
    assert time_bin_index(torch.tensor([0.0, 2.4, 2.5, 100.0]), torch.tensor([2.5])).tolist() == [0, 0, 1, 1]
    logits = torch.tensor([[math.log(1 / 3), 0.0], [math.log(3.0), 0.0]])  # h_0 = 0.25 and 0.75, h_1 = 0.5
    s = discrete_survival(logits)
    assert s.flatten().tolist() == pytest.approx([0.75, 0.375, 0.25, 0.125])
    risk = discrete_time_risk(logits)
    assert risk.tolist() == pytest.approx([-1.125, -0.375]) and risk[1] > risk[0]  # higher hazard = higher risk


def test_discrete_time_nll_gradient_raises_the_hazard_of_the_death_bin() -> None:
    logits = torch.zeros(2, 3, requires_grad=True)
    edges = torch.tensor([1.0, 2.0])
    discrete_time_nll(logits, torch.tensor([1.5, 1.5]), torch.tensor([1, 0]), edges).backward()
    g = logits.grad
    assert g is not None
    assert g[0, 1] < 0 < g[0, 0]  # died in bin 1: raise h_1, lower h_0 (survived bin 0)
    assert g[1, 0] > 0 and g[1, 1] > 0 and g[1, 2] == 0  # censored in bin 1: lower both, bin 2 unseen


def _loglik(risk: torch.Tensor, time: np.ndarray, event: np.ndarray, idx: np.ndarray) -> float:
    """Log partial likelihood of the slides ``idx`` from the (tested) torch Breslow loss, a mean over events."""
    ev = torch.tensor(event[idx])
    return -float(cox_breslow_loss(risk[idx], torch.tensor(time[idx]), ev)) * int(ev.sum())


def test_linear_cox_alpha_by_cross_validated_partial_likelihood() -> None:
    """Verweij & van Houwelingen's CV likelihood, recomputed fold by fold with the torch Breslow loss; the alpha it
    picks is small with a strong signal and the strongest penalty without one."""
    from sklearn.model_selection import StratifiedGroupKFold

    from wsi_encoder.io.slide_records import SlideBag
    from wsi_encoder.models.slide_classifiers.survival import CoxLinear

    rng = np.random.default_rng(0)
    n = 120
    x = rng.normal(size=(n, 4))
    groups = np.array([f"P{i // 2}" for i in range(n)])

    def bags(features: np.ndarray) -> list[SlideBag]:
        return [SlideBag(f"s{i}", f[None, :].astype(np.float32), np.zeros((1, 2), np.int64), (1, 1))
                for i, f in enumerate(features)]

    for signal, expected in ((2.0, "small"), (0.0, "largest")):
        time = rng.exponential(np.exp(-signal * x[:, 0]))
        event = rng.random(n) < 0.8
        cox = CoxLinear(4, {"pooling": "mean", "alphas": (0.1, 10.0, 1000.0)})
        info = cox.fit(bags(x), time, event, groups=groups, seed=3)
        scores = info.selected["cv_log_likelihood"]
        if expected == "small":
            assert info.selected["alpha"] < 1000.0
        else:
            assert info.selected["alpha"] == 1000.0
    # the score of one alpha, recomputed independently: sum over folds of l(b_-k) - l_-k(b_-k)
    splitter = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=3)
    total = 0.0
    for tr, _ in splitter.split(x, event.astype(int), groups):
        fitted = cox._fit(x[tr], time[tr], event[tr], 10.0)
        risk = torch.tensor(fitted.predict(x))

        total += _loglik(risk, time, event, np.arange(n)) - _loglik(risk, time, event, tr)
    assert scores[10.0] == pytest.approx(total, rel=1e-8)


def test_c_index_without_a_comparable_pair_is_nan() -> None:
    from wsi_encoder.evaluation.metrics import c_index_bootstrap, harrell_c

    # the only death is the last time: no pair can be ordered (a small fold or bootstrap resample)
    assert np.isnan(harrell_c([1.0, 2.0, 3.0], [0, 0, 1], [0.1, 0.2, 0.3]))
    # a fold without a comparable pair adds nothing; the other fold's one concordant pair gives 1
    assert harrell_c([1.0, 2.0, 3.0, 1.0, 2.0], [0, 0, 1, 1, 0], [0.1, 0.2, 0.3, 0.5, 0.1], strata=[0, 0, 0, 1, 1]) == 1.0
    low, high = c_index_bootstrap([1.0, 2.0, 3.0, 4.0], [0, 0, 1, 1], [0.1, 0.2, 0.4, 0.3], ["a", "b", "c", "d"], 50)
    assert 0 <= low <= high <= 1


def test_nll_head_starts_at_the_baseline_hazards() -> None:
    from wsi_encoder.models.slide_classifiers.survival_loss import baseline_hazard_logits, discrete_time_nll

    rng = np.random.default_rng(4)
    time = rng.exponential(5, 200)
    event = rng.random(200) < 0.7
    edges = time_bin_edges(time, event, 6)
    start = torch.tensor(baseline_hazard_logits(time, event, edges), requires_grad=True)
    # the maximum-likelihood hazards of slides all alike: the NLL's gradient at them is zero ...
    loss = discrete_time_nll(start.expand(200, -1), torch.as_tensor(time), torch.as_tensor(event), torch.as_tensor(edges))
    (grad,) = torch.autograd.grad(loss, start)
    assert grad.abs().max() < 1e-6
    # ... and any other constant hazards score worse
    for shift in (-0.3, 0.3):
        worse = discrete_time_nll((start + shift).expand(200, -1), torch.as_tensor(time), torch.as_tensor(event),
                                  torch.as_tensor(edges))
        assert worse > loss
    # a network that has barely trained predicts that baseline: S at the bins' ends is the baseline's
    from wsi_encoder.io.slide_records import SlideBag
    from wsi_encoder.models.slide_classifiers.survival import TorchCox

    cells = np.argwhere(np.ones((4, 4), dtype=bool)).astype(np.int64)
    bags = [SlideBag(f"s{i}", rng.normal(size=(16, 8)).astype(np.float32), cells, (4, 4)) for i in range(200)]
    model = TorchCox("abmil", 8, {"epochs": 1, "lr": 1e-9, "batch_size": 32}, "cpu", loss="nll", time_bins=6)
    model.fit(bags, time, event, seed=0, refit={"epochs": 1})
    baseline = np.cumprod(1 - 1 / (1 + np.exp(-start.detach().numpy())))
    surv = model.survival(bags, edges)  # at each inner edge: alive through the bins before it
    # (within the spread the head's random weights add; a head starting at h = 0.5 gives S_k = 0.5^(k+1))
    assert np.allclose(surv.mean(0), baseline[:-1], atol=0.06), (surv.mean(0), baseline)
    assert np.abs(0.5 ** np.arange(1, 6) - baseline[:-1]).max() > 0.3
