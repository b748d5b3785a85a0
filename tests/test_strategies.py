"""Every registered strategy's gradient agrees with the others and with autograd (micrograd style)."""

import pytest
import torch

from tasks.model import calc_forward, loss_fn, model
from tasks.settings import STRATEGIES
from tasks.strategies import STEPPERS, make_stepper, optimizer_names


def _reference(params: torch.Tensor, x, y):
    """Loss and gradient by autograd in float64, independent of the steppers."""
    p = params.detach().to(torch.float64).requires_grad_(True)
    loss = loss_fn(model(x.to(torch.float64), *p), y.to(torch.float64))
    loss.backward()
    return loss.detach(), p.grad


def test_every_strategy_is_registered():
    assert set(STEPPERS) == set(STRATEGIES)


@pytest.mark.parametrize("strategy", sorted(STEPPERS))
@pytest.mark.parametrize("trial", range(5))
def test_gradients_agree_with_autograd_on_random_data(strategy, trial):
    # float64 throughout: central differences of a quadratic are exact up to rounding (~1e-12),
    # so a relative tolerance of 1e-7 separates a wrong formula from float error.
    g = torch.Generator().manual_seed(trial)
    x = torch.randn(20, generator=g, dtype=torch.float64) * 10 + 5
    y = 3 * x - 7 + torch.randn(20, generator=g, dtype=torch.float64)
    params = torch.randn(2, generator=g, dtype=torch.float64)
    loss, grad = make_stepper(strategy, params, lr=1e-3, delta=0.1).loss_and_gradient(x, y)
    ref_loss, ref_grad = _reference(params, x, y)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-7, atol=0)
    torch.testing.assert_close(grad.detach(), ref_grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("strategy", sorted(STEPPERS))
def test_seed_gradient_at_the_start(strategy, seed_data):
    # FACTS.md: w = 1, b = 0 on the raw readings -> loss 1763.8846, gradient [4517.2969, 82.6000]
    t_u, t_c = seed_data
    loss, grad = make_stepper(strategy, torch.tensor([1.0, 0.0]), lr=1e-2).loss_and_gradient(t_u, t_c)
    assert float(loss.detach()) == pytest.approx(1763.8846, abs=1e-3)
    torch.testing.assert_close(grad.detach(), torch.tensor([4517.2969, 82.6000]), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("strategy", ["finite-difference", "analytic", "autograd", "optimizer"])
def test_one_step_is_params_minus_lr_times_gradient(strategy, seed_data):
    t_u, t_c = seed_data
    x = 0.1 * t_u
    stepper = make_stepper(strategy, torch.tensor([1.0, 0.0]), lr=1e-2, optimizer="sgd")
    _, grad = _reference(torch.tensor([1.0, 0.0]), x, t_c)
    loss = stepper.step(x, t_c)
    assert not loss.requires_grad
    expected = torch.tensor([1.0, 0.0], dtype=torch.float64) - 1e-2 * grad
    torch.testing.assert_close(stepper.params.detach().to(torch.float64), expected, rtol=1e-4, atol=1e-5)


def test_autograd_gradients_do_not_accumulate(seed_data):
    t_u, t_c = seed_data
    stepper = make_stepper("autograd", torch.tensor([1.0, 0.0]), lr=1e-2)
    first = stepper.loss_and_gradient(0.1 * t_u, t_c)[1].clone()
    second = stepper.loss_and_gradient(0.1 * t_u, t_c)[1]
    torch.testing.assert_close(first, second)


def test_calc_forward_builds_a_graph_only_when_training(seed_data):
    t_u, t_c = seed_data
    params = torch.tensor([1.0, 0.0], requires_grad=True)
    _, train_loss = calc_forward(params, t_u, t_c, is_train=True)
    _, val_loss = calc_forward(params, t_u, t_c, is_train=False)
    assert train_loss.requires_grad and train_loss.grad_fn is not None
    assert not val_loss.requires_grad and val_loss.grad_fn is None


def test_optimizer_names_cover_the_common_ones():
    assert {"sgd", "adam", "adamw", "rmsprop", "lbfgs"} <= set(optimizer_names())
    assert "sparseadam" not in optimizer_names()  # needs sparse gradients
