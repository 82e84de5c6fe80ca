"""The Cox partial likelihood as a torch loss, with Breslow's handling of tied times.

For risks ``r`` (log hazard ratios; higher = shorter survival), times ``t`` and events ``d`` (1 = death,
0 = censored) of one batch, the negative log partial likelihood is

    -(1 / n_events) * sum_{i: d_i = 1} [ r_i - log sum_{j: t_j >= t_i} exp(r_j) ]

The risk set of an event at time ``t_i`` is every slide of the *batch* still at risk then (``t_j >= t_i``,
tied times included: Breslow), so the loss of a mini-batch is the partial likelihood of that batch alone,
an approximation that is better the larger the batch. :func:`check_events` enforces a minimum number of
events per batch (a batch without an event has no partial likelihood at all).
"""

from __future__ import annotations

import torch

from wsi_encoder.errors import InvalidParameterError


def cox_breslow_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Mean (over events) negative Cox log partial likelihood of ``(n,)`` risks, with Breslow ties.

    Raises
    ------
    InvalidParameterError
        When the batch holds no event.
    """
    observed = event.to(torch.bool)
    n_events = int(observed.sum())
    if n_events == 0:
        raise InvalidParameterError("a Cox loss batch holds no event (event=1); the partial likelihood is undefined")
    at_risk = time[None, :] >= time[:, None]  # at_risk[i, j]: slide j is at risk at slide i's time
    masked = risk[None, :].expand(len(risk), -1).masked_fill(~at_risk, float("-inf"))
    log_denominator = torch.logsumexp(masked, dim=1)
    return -(risk - log_denominator)[observed].sum() / n_events


def check_events(event: torch.Tensor, minimum: int) -> bool:
    """Whether a batch holds at least ``minimum`` (>= 1) events (batches with fewer are skipped by training)."""
    if minimum < 1:
        raise InvalidParameterError(f"the minimum number of events per batch must be >= 1, got {minimum!r}")
    return int(event.to(torch.bool).sum()) >= minimum
