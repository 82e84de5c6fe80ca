"""The torch Cox loss against scikit-survival's Breslow partial likelihood, and the C-index sign."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sksurv.linear_model.coxph import CoxPHOptimizer

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.models.slide_classifiers.survival_loss import check_events, cox_breslow_loss


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
