"""Survival losses of the torch slide models: the Cox partial likelihood (Breslow ties) and the discrete-time NLL.

For risks ``r`` (log hazard ratios; higher = shorter survival), times ``t`` and events ``d`` (1 = death,
0 = censored) of one batch, the negative log partial likelihood is

    -(1 / n_events) * sum_{i: d_i = 1} [ r_i - log sum_{j: t_j >= t_i} exp(r_j) ]

The risk set of an event at time ``t_i`` is every slide of the *batch* still at risk then (``t_j >= t_i``,
tied times included: Breslow), so the loss of a mini-batch is the partial likelihood of that batch alone,
an approximation that is better the larger the batch. :func:`check_events` enforces a minimum number of
events per batch (a batch without an event has no partial likelihood at all).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

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


# ---------------------------------------------------------------------------------------------- discrete time
# ``--loss nll --time-bins K``: the follow-up is cut into K bins at the quantiles of the training fold's event
# times; the network's K outputs are the logits of the hazard h_k = P(death in bin k | alive at its start).
# A slide whose time falls in bin k (edges[k-1] <= t < edges[k]) and died there contributes
# -log h_k - sum_{l<k} log(1 - h_l); censored there, it is counted as having survived through bin k:
# -sum_{l<=k} log(1 - h_l) (the convention of pycox's logistic-hazard loss). Unlike the Cox loss it is a sum
# over slides, so a mini-batch needs no risk set and no minimum number of events.


def time_bin_edges(time: npt.ArrayLike, event: npt.ArrayLike, n_bins: int) -> npt.NDArray[np.float64]:
    """The ``n_bins - 1`` inner edges of the time bins: quantiles of the event times (``k / n_bins``, k = 1..K-1).

    Bin 0 is ``[0, edges[0])``, bin K-1 ``[edges[-1], inf)``. Tied quantiles (many deaths at one time) are
    kept, the bins between them are then empty.

    Raises
    ------
    InvalidParameterError
        When ``n_bins < 2`` or there is no event.
    """
    if n_bins < 2:
        raise InvalidParameterError(f"--time-bins must be at least 2, got {n_bins!r}")
    t, e = np.asarray(time, dtype=float), np.asarray(event).astype(bool)
    if not e.any():
        raise InvalidParameterError("the training slides hold no event; the time bins of --loss nll cannot be placed")
    return np.asarray(np.quantile(t[e], np.arange(1, n_bins) / n_bins), dtype=float)


def time_bin_index(time: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """``(n,)`` bin of each time: the number of inner edges at or below it (0 .. K-1)."""
    return torch.bucketize(time, edges.to(time.dtype), right=True)


def discrete_time_nll(logits: torch.Tensor, time: torch.Tensor, event: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Mean over slides of the discrete-time negative log-likelihood of ``(n, K)`` hazard logits."""
    k = time_bin_index(time.to(logits.device), edges.to(logits.device)).unsqueeze(1)
    dead = event.to(device=logits.device, dtype=torch.bool)
    log_survive = F.logsigmoid(-logits)  # log(1 - h)
    through = torch.cumsum(log_survive, dim=1)  # log P(alive at the end of bin l)
    before = torch.gather(F.pad(through, (1, 0))[:, :-1], 1, k).squeeze(1)
    died = before + torch.gather(F.logsigmoid(logits), 1, k).squeeze(1)
    censored = torch.gather(through, 1, k).squeeze(1)
    return -torch.where(dead, died, censored).mean()


def discrete_survival(logits: torch.Tensor) -> torch.Tensor:
    """``(n, K)`` probability of being alive at the end of each bin, ``prod_{l<=k} (1 - h_l)``."""
    return torch.exp(torch.cumsum(F.logsigmoid(-logits), dim=1))


def discrete_time_risk(logits: torch.Tensor) -> torch.Tensor:
    """The risk of a discrete-time model: minus the expected number of bins survived, ``-sum_k S_k``.

    ``sum_k S_k`` (S_k: alive at the end of bin k) is the mean survival time restricted to the K bins,
    in bins, so the risk ranks slides by their expected survival: higher = shorter, as for Cox.
    """
    return -discrete_survival(logits).sum(dim=1)


def baseline_hazard_logits(time: npt.ArrayLike, event: npt.ArrayLike, edges: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``(K,)`` logits of the per-bin hazards that maximise :func:`discrete_time_nll` for slides all alike.

    ``h_k = d_k / n_k``: deaths in bin k over the slides still in the risk set at its start (time in bin k or
    later; one censored in bin k counts as surviving it, the loss's convention), clipped to [1e-4, 1 - 1e-4].
    The torch models start their hazard head at these (output bias; the weights start near 0), so training
    starts from the Kaplan-Meier-like baseline and spends its epochs on how slides differ.
    """
    t, e = np.asarray(time, dtype=float), np.asarray(event).astype(bool)
    cuts = np.asarray(edges, dtype=float)
    k = np.searchsorted(cuts, t, side="right")  # as time_bin_index: edges at or below the time
    n_bins = len(cuts) + 1
    deaths = np.bincount(k[e], minlength=n_bins).astype(float)
    at_risk = np.cumsum(np.bincount(k, minlength=n_bins)[::-1])[::-1].astype(float)
    h = np.clip(np.divide(deaths, at_risk, out=np.zeros(n_bins), where=at_risk > 0), 1e-4, 1 - 1e-4)
    return np.asarray(np.log(h / (1 - h)), dtype=float)
