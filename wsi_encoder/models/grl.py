"""Gradient reversal (DANN) for domain-general features: the layer, its schedule, the domain head.

Ganin & Lempitsky (ICML 2015) and Ganin et al. (JMLR 17, 2016): a domain classifier ``G_d`` sits on
the shared features behind a gradient reversal layer (GRL). The GRL is the identity in the forward
pass and multiplies the gradient by ``-λ`` in the backward pass, so minimising the domain loss trains
``G_d`` to recognise the domain while pushing the feature extractor to make domains indistinguishable.
``λ`` grows over training progress ``p ∈ [0, 1]`` as ``λ(p) = 2 / (1 + exp(-γ p)) - 1`` (γ = 10).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from wsi_encoder.errors import InvalidParameterError


class GradientReversalFunction(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``-lambd``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambd: float) -> torch.Tensor:
        ctx.lambd = float(lambd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output.neg() * ctx.lambd, None


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    """Apply gradient reversal with coefficient ``lambd`` (≥ 0) to ``x``."""
    return GradientReversalFunction.apply(x, lambd)


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse`; set ``lambd`` during training (e.g. from :func:`dann_lambda`)."""

    def __init__(self, lambd: float = 1.0) -> None:
        super().__init__()
        self.lambd = float(lambd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.lambd)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd:g}"


def dann_lambda(progress: float, gamma: float = 10.0, weight: float = 1.0) -> float:
    """DANN reversal coefficient ``weight · (2 / (1 + exp(-gamma · p)) - 1)``.

    Parameters
    ----------
    progress
        Training progress ``p`` in [0, 1] (optimizer steps done / total steps); clipped to [0, 1].
    gamma
        Steepness γ (10 in DANN).
    weight
        Scale of the schedule (``--grl-weight``); 1 reproduces DANN.

    Returns
    -------
    float
        0 at p = 0, 0.986614 at p = 0.5, 0.999909 at p = 1 (times ``weight``).
    """
    p = min(max(float(progress), 0.0), 1.0)
    return float(weight) * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)


def dann_ramp_end(gamma: float = 10.0, reached: float = 0.99) -> float:
    """Training progress at which :func:`dann_lambda` reaches ``reached`` of its final value.

    ``ln((1 + r) / (1 - r)) / gamma``: 0.529 for γ = 10 and r = 0.99. Epochs that end before this
    progress are still in the λ ramp (the grl arm is not yet the model it is meant to be).
    """
    if not 0.0 < reached < 1.0 or gamma <= 0:
        raise InvalidParameterError(f"ramp end: reached {reached!r} must be in (0, 1), gamma {gamma!r} > 0")
    return min(1.0, math.log((1.0 + reached) / (1.0 - reached)) / gamma)


def dann_learning_rate(progress: float, lr0: float = 0.01, alpha: float = 10.0, beta: float = 0.75) -> float:
    """DANN learning-rate annealing ``lr0 / (1 + alpha · p) ** beta`` over progress ``p`` in [0, 1]."""
    p = min(max(float(progress), 0.0), 1.0)
    return float(lr0) / (1.0 + alpha * p) ** beta


class DomainHead(nn.Module):
    """Domain classifier behind a gradient reversal layer.

    ``features → GRL(λ) → [Linear(hidden) → ReLU → Dropout] × n_hidden → Linear(n_domains)``.
    DANN's JMLR Office setup uses two hidden layers of 1024 units with dropout 0.5.

    Parameters
    ----------
    in_features
        Width of the shared features.
    n_domains
        Number of domains (the three training magnifications in a LOMO fold).
    hidden
        Width of each hidden layer.
    n_hidden
        Number of hidden layers (0 gives a linear domain classifier).
    dropout
        Dropout after each hidden layer.
    """

    def __init__(
        self, in_features: int, n_domains: int, *, hidden: int = 1024, n_hidden: int = 2, dropout: float = 0.5
    ) -> None:
        super().__init__()
        if n_domains < 2:
            raise InvalidParameterError(f"a domain head needs at least 2 domains, got {n_domains!r}")
        self.grl = GradientReversal(0.0)
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(n_hidden):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, n_domains))
        self.classifier = nn.Sequential(*layers)

    @property
    def lambd(self) -> float:
        """Current reversal coefficient."""
        return self.grl.lambd

    @lambd.setter
    def lambd(self, value: float) -> None:
        self.grl.lambd = float(value)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Domain logits ``(B, n_domains)``; the gradient reaching ``features`` is reversed and scaled."""
        return self.classifier(self.grl(features))
