"""Every registered strategy's gradient agrees with float64 autograd, for every model family (micrograd style)."""

import pytest
import torch

from tasks.model import calc_forward
from tasks.models import EXAMPLE_SPECS, MODELS, Linear, make_model
from tasks.settings import STRATEGIES
from tasks.strategies import STEPPERS, FiniteDifferenceStepper, make_stepper, optimizer_names


def _reference_forward(model, theta, f):
    """The model written independently of tasks.models: the seed's line, the basis times the
    coefficients, and torch.nn's own network with the parameters loaded by their state_dict names."""
    if model.kind == "linear":
        return theta[0] * f + theta[1]
    if model.kind == "poly":
        return f @ theta
    net = torch.nn.Sequential(torch.nn.Linear(1, model.hidden), torch.nn.Tanh(), torch.nn.Linear(model.hidden, 1)).double()
    shapes = {name: p.shape for name, p in net.named_parameters()}
    assert tuple(shapes) == model.names  # the packed parameters carry the state_dict's names, in its order
    chunks = theta.split([shape.numel() for shape in shapes.values()])
    state = {name: chunk.reshape(shape) for (name, shape), chunk in zip(shapes.items(), chunks)}
    return torch.func.functional_call(net, state, (f.reshape(-1, 1),)).reshape(-1)


def _reference(model, theta: torch.Tensor, f, y):
    """Loss and gradient by autograd in float64, through the independent forward."""
    p = theta.detach().to(torch.float64).requires_grad_(True)
    loss = ((_reference_forward(model, p, f) - y) ** 2).mean()
    loss.backward()
    return loss.detach(), p.grad


def _random_problem(spec: str, trial: int):
    g = torch.Generator().manual_seed(trial)
    x = torch.randn(25, generator=g, dtype=torch.float64)
    y = 3 * x - 7 + 0.5 * x**2 + torch.randn(25, generator=g, dtype=torch.float64)
    model = make_model(spec).fit(x.numpy())
    theta = torch.randn(model.size, generator=g, dtype=torch.float64)
    return model, model.features(x), y, theta


def test_every_strategy_and_model_family_is_registered():
    assert set(STEPPERS) == set(STRATEGIES)
    assert set(MODELS) == {"linear", "poly", "mlp"} and {make_model(s).kind for s in EXAMPLE_SPECS} == set(MODELS)


@pytest.mark.parametrize("strategy", sorted(STEPPERS))
@pytest.mark.parametrize("spec", EXAMPLE_SPECS)
@pytest.mark.parametrize("trial", range(3))
def test_gradients_agree_with_autograd_on_random_data(strategy, spec, trial):
    # float64 throughout. The line's and the polynomials' losses are quadratic, so central
    # differences are exact up to rounding (~1e-12) at any delta, and rtol 1e-7 separates a wrong
    # formula from float error. The network's loss is not quadratic: central differences err by
    # O(delta^2), about 1e-9 at delta 1e-4, so it is held to rtol 1e-6.
    model, f, y, theta = _random_problem(spec, trial)
    delta, rtol = (1e-4, 1e-6) if model.kind == "mlp" else (0.1, 1e-7)
    loss, grad = make_stepper(strategy, model, theta, lr=1e-3, delta=delta).loss_and_gradient(f, y)
    ref_loss, ref_grad = _reference(model, theta, f, y)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad.detach(), ref_grad, rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("spec", ["linear", "poly:3", "mlp:13"])
def test_finite_differences_are_one_batched_evaluation(spec, monkeypatch):
    model, f, y, theta = _random_problem(spec, 0)
    calls = []
    objective_of = model.objective

    def counted(features, targets):  # the objective, its batched losses() counted
        objective = objective_of(features, targets)
        losses = objective.losses
        objective.losses = lambda points: calls.append(points.shape) or losses(points)
        return objective

    monkeypatch.setattr(model, "objective", counted)
    FiniteDifferenceStepper(model, theta, lr=1e-3, delta=0.1).loss_and_gradient(f, y)
    assert calls == [(2 * model.size + 1, model.size)]  # every shifted point at once, not a loop over parameters


def test_finite_differences_slice_the_points_only_past_the_budget(monkeypatch):
    import tasks.strategies

    model, f, y, theta = _random_problem("mlp:13", 1)
    whole = FiniteDifferenceStepper(model, theta, lr=1e-3, delta=1e-3).loss_and_gradient(f, y)
    monkeypatch.setattr(tasks.strategies, "FD_BUDGET", 25 * 13 * 7)  # seven points per slice
    sliced = FiniteDifferenceStepper(model, theta, lr=1e-3, delta=1e-3).loss_and_gradient(f, y)
    torch.testing.assert_close(sliced, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", sorted(STEPPERS))
def test_seed_gradient_at_the_start(strategy, seed_data):
    # FACTS.md: w = 1, b = 0 on the raw readings -> loss 1763.8846, gradient [4517.2969, 82.6000]
    t_u, t_c = seed_data
    loss, grad = make_stepper(strategy, Linear(), torch.tensor([1.0, 0.0]), lr=1e-2).loss_and_gradient(t_u, t_c)
    assert float(loss.detach()) == pytest.approx(1763.8846, abs=1e-3)
    torch.testing.assert_close(grad.detach(), torch.tensor([4517.2969, 82.6000]), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("strategy", sorted(STEPPERS))
@pytest.mark.parametrize("spec", ["linear", "poly:3", "mlp:13"])
def test_one_step_is_params_minus_lr_times_gradient(strategy, spec):
    model, f, y, theta = _random_problem(spec, 2)
    f32, y32, theta32 = f.float(), y.float(), theta.float()
    stepper = make_stepper(strategy, model, theta32, lr=1e-2, delta=1e-2, optimizer="sgd")
    _, grad = _reference(model, theta32, f, y)
    loss = stepper.step(f32, y32)
    assert not loss.requires_grad
    torch.testing.assert_close(stepper.params.detach().double(), theta32.double() - 1e-2 * grad, rtol=1e-4, atol=1e-4)


def test_autograd_gradients_do_not_accumulate(seed_data):
    t_u, t_c = seed_data
    stepper = make_stepper("autograd", Linear(), torch.tensor([1.0, 0.0]), lr=1e-2)
    first = stepper.loss_and_gradient(0.1 * t_u, t_c)[1].clone()
    second = stepper.loss_and_gradient(0.1 * t_u, t_c)[1]
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("spec", ["linear", "poly:3", "mlp:13"])
def test_autograd_steps_are_the_seeds_loop_bit_for_bit(spec):
    # the seed's loop, written as it teaches it: one leaf updated in place, its gradient zeroed,
    # F.mse_loss, loss.backward(). The stepper reaches the autograd engine without backward()'s
    # Python and makes a new leaf each step: the same numbers to the last bit, every epoch.
    model, f, y, theta = _random_problem(spec, 1)
    f32, y32, theta32 = f.float(), y.float(), theta.float()
    x = model.design(f32).contiguous() if model.linear_in_params else f32
    params = theta32.clone().requires_grad_(True)
    stepper = make_stepper("autograd", model, theta32, lr=1e-3)
    for epoch in range(200):
        if params.grad is not None:
            params.grad.zero_()
        loss = torch.nn.functional.mse_loss(model.forward(params, x), y32)
        loss.backward()
        with torch.no_grad():
            params.sub_(params.grad, alpha=1e-3)
        ours = stepper.step(f32, y32)
        assert torch.equal(ours, loss.detach()), f"epoch {epoch + 1}: loss {ours} != {loss}"
        assert torch.equal(stepper.params.detach(), params.detach()), f"epoch {epoch + 1}"
    snapshot = stepper.snapshot()
    stepper.step(f32, y32)
    assert torch.equal(snapshot, params.detach())  # a snapshot is not changed by later steps


@pytest.mark.parametrize("spec", ["linear", "poly:2", "mlp:13"])
def test_calc_forward_builds_a_graph_only_when_training(spec, seed_data):
    t_u, t_c = seed_data
    model = make_model(spec).fit((0.1 * t_u).double().numpy())
    f = model.features(0.1 * t_u)
    theta = model.initial(torch.Generator().manual_seed(0)).requires_grad_(True)
    _, train_loss = calc_forward(model, theta, f, t_c, is_train=True)
    _, val_loss = calc_forward(model, theta, f, t_c, is_train=False)
    assert train_loss.requires_grad and train_loss.grad_fn is not None
    assert not val_loss.requires_grad and val_loss.grad_fn is None


def test_the_settings_offer_exactly_torch_optims_usable_optimizers():
    from tasks.settings import OPTIMIZERS

    assert list(OPTIMIZERS) == optimizer_names()


def test_optimizer_names_cover_the_common_ones():
    assert {"sgd", "adam", "adamw", "rmsprop", "lbfgs"} <= set(optimizer_names())
    assert "sparseadam" not in optimizer_names()  # needs sparse gradients
