"""Gradient reversal layer, DANN schedules and the domain head."""

from __future__ import annotations

import pytest
import torch

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.models.grl import DomainHead, GradientReversal, dann_lambda, dann_learning_rate, grad_reverse

# papers.md §1.6: λ_p and μ_p (μ0 = 0.01, α = 10, β = 0.75) at these progress values.
PROGRESS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
LAMBDAS = (0.0, 0.462117, 0.848284, 0.986614, 0.998894, 0.999909)
LEARNING_RATES = (0.01, 0.005946, 0.003908, 0.002609, 0.002009, 0.001656)


@pytest.mark.parametrize("lambd", [0.0, 0.3, 1.0, 2.5])
def test_forward_is_identity_and_backward_is_minus_lambda_times_grad(lambd: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=gen, requires_grad=True)
    upstream = torch.randn(5, 7, generator=gen)
    y = grad_reverse(x, lambd)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.allclose(x.grad, -lambd * upstream)


def test_module_form_uses_its_current_lambda() -> None:
    layer = GradientReversal(0.5)
    x = torch.ones(3, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), -0.5))
    layer.lambd = 2.0
    x.grad = None
    layer(x).sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), -2.0))
    assert "lambd=2" in repr(layer)


def test_reversal_composes_with_the_rest_of_the_graph() -> None:
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    (grad_reverse(x * 2.0, 0.25) ** 2).sum().backward()
    # d/dx (2x)^2 = 8x, reversed and scaled by 0.25 -> -2x
    assert torch.allclose(x.grad, -2.0 * x.detach())


@pytest.mark.parametrize(("p", "expected"), list(zip(PROGRESS, LAMBDAS, strict=True)))
def test_dann_lambda_schedule(p: float, expected: float) -> None:
    assert dann_lambda(p) == pytest.approx(expected, abs=1e-6)


def test_dann_lambda_named_values_weight_and_clipping() -> None:
    assert dann_lambda(0) == 0
    assert dann_lambda(0.5) == pytest.approx(0.9866, abs=1e-4)
    assert dann_lambda(1) == pytest.approx(0.9999, abs=1e-4)
    assert dann_lambda(0.5, weight=0.1) == pytest.approx(0.0986614, abs=1e-6)
    assert dann_lambda(-1.0) == 0
    assert dann_lambda(3.0) == dann_lambda(1.0)


@pytest.mark.parametrize(("p", "expected"), list(zip(PROGRESS, LEARNING_RATES, strict=True)))
def test_dann_learning_rate_schedule(p: float, expected: float) -> None:
    assert dann_learning_rate(p) == pytest.approx(expected, abs=1e-6)


def test_domain_head_reverses_the_gradient_reaching_the_features() -> None:
    torch.manual_seed(0)
    head = DomainHead(6, 3, hidden=8, dropout=0.0)
    feats = torch.randn(4, 6, requires_grad=True)
    target = torch.tensor([0, 1, 2, 1])
    head.lambd = 0.7
    torch.nn.functional.cross_entropy(head(feats), target).backward()
    reversed_grad = feats.grad.clone()
    head_grad = head.classifier[0].weight.grad.clone()
    feats.grad = None
    head.zero_grad()
    torch.nn.functional.cross_entropy(head.classifier(feats), target).backward()
    assert torch.allclose(reversed_grad, -0.7 * feats.grad, atol=1e-7)
    # the domain classifier itself is trained normally (its gradient is not reversed)
    assert torch.allclose(head_grad, head.classifier[0].weight.grad)


def test_domain_head_shapes_and_validation() -> None:
    head = DomainHead(16, 3, hidden=32)
    assert head(torch.randn(2, 16)).shape == (2, 3)
    linear = DomainHead(16, 2, n_hidden=0)
    assert isinstance(linear.classifier[0], torch.nn.Linear)
    with pytest.raises(InvalidParameterError, match="at least 2 domains"):
        DomainHead(16, 1)
