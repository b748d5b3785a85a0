"""The batched trainer (tasks.batched): every model of a batch trains as train_model (tasks.train)
would on its own rows, whether they are the shared rows repeated by integer weights (bootstrap
counts), a subset of them (0/1 weights), or rows of its own (a sensor's readings, padded with
weight 0 to the longest); stopping and divergence are each model's own."""

import numpy as np
import pytest
import torch

import tasks.batched_steps
import tasks.strategies
from tasks.batched import train_batched
from tasks.errors import InvalidInput, TrainingDiverged
from tasks.models import EXAMPLE_SPECS, Linear, make_model
from tasks.normalize import fit_normalizer
from tasks.strategies import optimizer_names
from tasks.train import Stopping, train_model

STRATEGIES = [("analytic", "sgd"), ("autograd", "sgd"), ("finite-difference", "sgd"), ("optimizer", "sgd"), ("optimizer", "adam"),
              ("optimizer", "adafactor")]  # Adafactor: one parameter per model (it factorizes a 2-D one)
# learning rate and epochs by family. Gradient descent on the network amplifies float32 rounding
# over long runs at larger rates (two single trainings on the same rows in another order part by
# 0.2 after 300 epochs at lr 0.05); at this rate and length rounding stays rounding.
RUNS = {"linear": (0.1, 300), "poly:2": (0.1, 300), "mlp:4": (0.02, 200)}
ADAFACTOR_LR = 0.01  # at 0.1 its relative steps make even one model's training depend on the order of its rows


def _atol(strategy: str, spec: str) -> float:
    """Parameters' absolute tolerance: finite differences of float32 losses carry rounding of about
    ulp(loss) / 2 delta into every gradient (1e-4 while the loss is near 100), and the parameters
    gather it over the epochs; two single runs of the same rows in another order differ as much.
    The network's descent amplifies it further: on an AVX-512 machine two single runs of one
    bootstrap sample's rows, reordered, parted by up to 4.4e-4 after its 200 epochs (linear and
    quadratic models: under 1e-6)."""
    if strategy != "finite-difference":
        return 1e-5
    return 1e-3 if spec.startswith("mlp") else 1e-4


def _rtol(strategy: str, spec: str) -> float:
    """Relative tolerance of parameters and losses: as _atol, wider for the network's finite differences."""
    return 1e-3 if strategy == "finite-difference" and spec.startswith("mlp") else 1e-4


@pytest.fixture
def standardized(seed_data):
    """The seed's 11 readings, standardized, and their °C."""
    t_u, t_c = seed_data
    return torch.from_numpy(fit_normalizer(t_u.numpy(), "standard").apply(t_u.numpy())).float(), t_c


def _batch(kind: str, model, x, y):
    """(f, y, weights) of a batch: bootstrap counts or 0/1 subsets of the shared rows, or three
    sensors with 11, 8 and 5 rows of their own (per-model readings and targets, padded to 11)."""
    n = len(x)
    if kind == "counts":
        draws = torch.randint(n, (4, n), generator=torch.Generator().manual_seed(7))
        weights = torch.zeros(4, n).scatter_add_(1, draws, torch.ones(4, n))  # how often each row was drawn
        assert (weights == 0).any() and (weights > 1).any()
        return model.features(x), y, weights
    if kind == "subsets":
        weights = torch.zeros(4, n)
        weights[0, :8], weights[1, 3:], weights[2, ::2], weights[3] = 1.0, 1.0, 1.0, 1.0
        return model.features(x), y, weights
    counts = torch.tensor([11, 8, 5])
    readings = torch.full((3, n), 0.3)  # the padding: finite values that weight 0 must leave out
    targets = torch.full((3, n), 99.0)
    for b, (count, scale, shift) in enumerate(zip(counts.tolist(), (1.0, 0.8, 1.2), (0.0, 0.3, -0.2))):
        readings[b, :count] = x[:count] * scale + shift
        targets[b, :count] = y[:count] + b
    weights = (torch.arange(n)[None, :] < counts[:, None]).float()
    return model.features(readings), targets, weights


def _rows(model, f, y, weights, b: int):
    """Model b's training rows for train_model: each row repeated as often as its weight says."""
    f_b = f[b] if f.ndim > model.feature_ndim else f
    y_b = y[b] if y.ndim == 2 else y
    repeats = torch.repeat_interleave(torch.arange(weights.shape[1]), weights[b].long())
    return f_b[repeats], y_b[repeats]


def _single(model, f, y, weights, b, **options):
    return train_model(*_rows(model, f, y, weights, b), None, None, model=model, **options)


@pytest.mark.parametrize("kind", ["counts", "subsets", "sensors"])
@pytest.mark.parametrize("spec", list(RUNS))
@pytest.mark.parametrize("strategy, optimizer", STRATEGIES)
def test_each_model_trains_as_it_would_alone(strategy, optimizer, spec, kind, standardized):
    x, y = standardized
    model = make_model(spec).fit(x.double().numpy())
    lr, epochs = RUNS[spec]
    lr = ADAFACTOR_LR if optimizer == "adafactor" else lr
    f, targets, weights = _batch(kind, model, x, y)
    result = train_batched(model, f, targets, weights, strategy=strategy, optimizer=optimizer, lr=lr, epochs=epochs)
    B = len(weights)
    assert result.params.shape == (B, model.size) and result.params.dtype == np.float32
    assert result.train_loss.shape == (B, epochs) and result.val_loss is None
    assert result.stopped_by == ["epochs"] * B and result.epochs_run.tolist() == [epochs] * B and not result.diverged_at.any()
    for b in range(B):
        single = _single(model, f, targets, weights, b, strategy=strategy, optimizer=optimizer, lr=lr, epochs=epochs)
        np.testing.assert_allclose(result.params[b], single.params, rtol=_rtol(strategy, spec), atol=_atol(strategy, spec))
        np.testing.assert_allclose(result.train_loss[b], single.train_loss, rtol=_rtol(strategy, spec), atol=1e-6)
    assert not np.allclose(result.train_loss[0], result.train_loss[1], rtol=1e-3)  # the models did differ


@pytest.mark.parametrize("spec", ["linear", "poly:2"])
@pytest.mark.parametrize("strategy, optimizer", STRATEGIES[:4])
def test_each_model_stops_by_tol_when_it_would_alone(strategy, optimizer, spec, standardized):
    # tol 1e-3: the band then spans some 10^4 float32 roundings of the loss, so the rounding by
    # which a batch's loss differs from a single run's cannot move the epoch the band closes at
    # (at tol 1e-5 it spans about a hundred, and a stop can move by an epoch; so can Adam's,
    # whose loss oscillates on its way down)
    x, y = standardized
    model = make_model(spec).fit(x.double().numpy())
    draws = torch.randint(11, (6, 11), generator=torch.Generator().manual_seed(3))
    weights = torch.zeros(6, 11).scatter_add_(1, draws, torch.ones(6, 11))
    options = dict(strategy=strategy, optimizer=optimizer, lr=0.1, epochs=3000, stopping=Stopping(tol=1e-3, patience=10))
    f = model.features(x)
    result = train_batched(model, f, y, weights, **options)
    assert result.stopped_by == ["tol"] * 6
    assert len(set(result.epochs_run.tolist())) > 3  # the models stopped at different epochs
    assert result.train_loss.shape == (6, result.epochs_run.max())
    for b in range(6):
        single = _single(model, f, y, weights, b, **options)
        assert single.stopped_by == "tol" and result.epochs_run[b] == single.epochs_run
        run = single.epochs_run
        np.testing.assert_allclose(result.train_loss[b, :run], single.train_loss, rtol=1e-4, atol=1e-6)
        assert np.isnan(result.train_loss[b, run:]).all()
        # the parameters of the epoch it stopped at, unchanged while the others went on
        np.testing.assert_allclose(result.params[b], single.params, rtol=1e-4, atol=_atol(strategy, spec))


def test_validation_stops_each_model_at_its_own_best():
    # from w = 1, each model's training rows pull w toward its slope while the validation rows
    # prefer 1.5: each validation loss falls, then rises, the steeper slopes' sooner
    x, x_val = torch.linspace(-1, 1, 20), torch.linspace(-1, 1, 5)
    slopes = torch.tensor([2.0, 2.5, 3.0, 4.0])
    y, y_val = slopes[:, None] * x, 1.5 * x_val
    options = dict(strategy="analytic", lr=0.05, epochs=2000, stopping=Stopping(val_patience=20))
    result = train_batched(Linear(), x, y, torch.ones(4, 20), f_val=x_val, y_val=y_val, **options)
    assert result.stopped_by == ["validation"] * 4 and len(set(result.epochs_run.tolist())) == 4
    assert result.val_loss.shape == result.train_loss.shape == (4, result.epochs_run.max())
    for b in range(4):
        single = train_model(x, y[b], x_val, y_val, **options)
        run = single.epochs_run
        assert single.stopped_by == "validation" and result.epochs_run[b] == run
        np.testing.assert_allclose(result.val_loss[b, :run], single.val_loss, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(result.train_loss[b, :run], single.train_loss, rtol=1e-5, atol=1e-7)
        assert np.isnan(result.val_loss[b, run:]).all()
        # the kept parameters are those of the best validation epoch, not the last ones
        np.testing.assert_allclose(result.params[b], single.params, rtol=1e-5, atol=1e-6)
        kept = float(((result.params[b, 0] * x_val + result.params[b, 1] - y_val) ** 2).mean())
        assert kept == pytest.approx(float(np.nanmin(result.val_loss[b])), rel=1e-5)


def test_validation_rows_per_model_are_recorded_every_epoch(standardized):
    x, y = standardized
    model = make_model("poly:2").fit(x.double().numpy())
    f, targets, weights = _batch("sensors", model, x, y)
    # each sensor's last two rows (of 11, 8 and 5; the padding after them has weight 0 in both) validate it
    held_out = torch.zeros_like(weights)
    for b, count in enumerate([11, 8, 5]):
        held_out[b, count - 2 : count] = 1.0
    weights = weights - held_out
    options = dict(strategy="autograd", lr=0.1, epochs=150)
    result = train_batched(model, f, targets, weights, f_val=f, y_val=targets, weights_val=held_out, **options)
    assert result.val_loss.shape == (3, 150) and np.isfinite(result.val_loss).all()
    for b in range(3):
        rows = held_out[b].bool()
        single = train_model(*_rows(model, f, targets, weights, b), f[b][rows], targets[b][rows], model=model, **options)
        np.testing.assert_allclose(result.val_loss[b], single.val_loss, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(result.params[b], single.params, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy, optimizer", STRATEGIES[:4])
def test_a_diverging_model_stops_alone(strategy, optimizer, standardized):
    x, y = standardized
    readings = torch.stack([x, 10.0 * x, 0.5 * x])  # lr 0.1 is far too large for the second sensor's readings
    options = dict(strategy=strategy, optimizer=optimizer, lr=0.1, epochs=200)
    result = train_batched(Linear(), readings, y, torch.ones(3, 11), **options)
    assert result.stopped_by == ["epochs", "diverged", "epochs"]
    with pytest.raises(TrainingDiverged) as error:
        train_model(readings[1], y, None, None, **options)
    epoch = int(str(error.value).split("epoch ")[1].split(":")[0])
    assert result.diverged_at.tolist() == [0, epoch, 0] and result.epochs_run.tolist() == [200, epoch, 200]
    assert not np.isnan(result.train_loss[1, :epoch]).any() and np.isnan(result.train_loss[1, epoch:]).all()
    assert np.isfinite(result.params).all()
    if strategy != "finite-difference":
        # frozen where it was before the step that diverged (finite differences of a loss of 1e8
        # in float32 are rounding in the intercept's direction: their last point is not comparable)
        before = train_model(readings[1], y, None, None, **{**options, "epochs": epoch - 1})
        np.testing.assert_allclose(result.params[1], before.params, rtol=1e-4)
    for b in (0, 2):
        single = train_model(readings[b], y, None, None, **options)
        np.testing.assert_allclose(result.params[b], single.params, rtol=1e-4, atol=_atol(strategy, "linear"))
        np.testing.assert_allclose(result.train_loss[b], single.train_loss, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("optimizer", [name for name in optimizer_names() if name != "lbfgs"])
def test_every_optimizer_treats_each_model_as_alone(optimizer, standardized):
    # the (B, P) parameter of the elementwise optimizers (ELEMENTWISE_OPTIMIZERS) and the
    # parameter per model of the others give each model what a training of its own gives it
    x, y = standardized
    model = make_model("poly:2").fit(x.double().numpy())
    f, targets, weights = _batch("counts", model, x, y)
    options = dict(strategy="optimizer", optimizer=optimizer, lr=0.01, epochs=60)
    result = train_batched(model, f, targets, weights, **options)
    for b in range(len(weights)):
        single = _single(model, f, targets, weights, b, **options)
        np.testing.assert_allclose(result.params[b], single.params, rtol=1e-4, atol=1e-5)


def test_one_parameter_per_model_gives_what_the_shared_one_does(standardized, monkeypatch):
    x, y = standardized
    model = make_model("mlp:4")
    f, targets, weights = _batch("counts", model, x, y)
    options = dict(strategy="optimizer", optimizer="adam", lr=0.02, epochs=100)
    shared = train_batched(model, f, targets, weights, **options)
    monkeypatch.setattr(tasks.batched_steps, "ELEMENTWISE_OPTIMIZERS", frozenset())
    per_model = train_batched(model, f, targets, weights, **options)
    np.testing.assert_allclose(per_model.params, shared.params, rtol=1e-5, atol=1e-6)


def test_lbfgs_is_refused_with_a_message(standardized):
    x, y = standardized
    with pytest.raises(InvalidInput, match="lbfgs cannot train a batch of models"):
        train_batched(Linear(), x, y, torch.ones(2, 11), strategy="optimizer", optimizer="LBFGS", lr=0.1, epochs=10)


def test_the_start_is_the_single_trainings_or_one_per_model(standardized):
    x, y = standardized
    model = make_model("mlp:4")
    weights = torch.ones(3, 11)
    starts = torch.stack([model.initial(torch.Generator().manual_seed(seed)) for seed in range(3)])
    options = dict(strategy="analytic", lr=0.02, epochs=50)
    result = train_batched(model, x, y, weights, initial=starts, **options)
    for seed in range(3):
        single = train_model(x, y, None, None, model=model, seed=seed, **options)
        np.testing.assert_allclose(result.params[seed], single.params, rtol=1e-4, atol=1e-5)
    default = train_batched(model, x, y, weights, seed=2, **options)
    np.testing.assert_allclose(default.params, np.repeat(result.params[2:], 3, axis=0), rtol=1e-6, atol=1e-7)


def test_finite_differences_evaluate_every_point_of_every_model_at_once(standardized, monkeypatch):
    x, y = standardized
    model = make_model("mlp:4")
    f, targets, weights = _batch("sensors", model, x, y)
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda theta, feats: calls.append(tuple(theta.shape)) or forward(theta, feats))
    train_batched(model, f, targets, weights, strategy="finite-difference", lr=0.02, epochs=3)
    assert calls == [(3, 2 * model.size + 1, model.size)] * 3  # one batched forward an epoch: no loop over models or points


@pytest.mark.parametrize("models, points", [(1, 2), (2, 27)])  # two points of one model at a time; two models' every point
def test_finite_differences_slice_the_points_only_past_the_budget(models, points, standardized, monkeypatch):
    x, y = standardized
    model = make_model("mlp:4")  # 13 parameters: 27 points per model
    f, targets, weights = _batch("counts", model, x, y)
    options = dict(strategy="finite-difference", lr=0.02, epochs=20)
    whole = train_batched(model, f, targets, weights, **options)
    monkeypatch.setattr(tasks.strategies, "FD_BUDGET", models * points * 11 * model.width)
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda theta, feats: calls.append(tuple(theta.shape)) or forward(theta, feats))
    sliced = train_batched(model, f, targets, weights, **options)
    slices = (4 // models) * -(-27 // points)
    assert len(calls) == 20 * slices and calls[0] == (models, points, model.size)
    np.testing.assert_allclose(sliced.params, whole.params, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sliced.train_loss, whole.train_loss, rtol=1e-6)


@pytest.mark.parametrize("spec", EXAMPLE_SPECS)
def test_forward_reads_per_model_features(spec):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, generator=g, dtype=torch.float64)
    model = make_model(spec).fit(x[0].numpy())
    f = model.design(x) if model.kind == "linear" else model.features(x)  # the line's per-model features: its design
    theta = torch.randn(3, model.size, generator=g, dtype=torch.float64)
    alone = torch.stack([model.forward(theta[b], f[b]) for b in range(3)])
    torch.testing.assert_close(model.forward(theta, f), alone, rtol=1e-12, atol=1e-12)
    points = theta[:, None, :] + torch.randn(3, 5, model.size, generator=g, dtype=torch.float64)  # 5 points per model
    each = torch.stack([torch.stack([model.forward(points[b, m], f[b]) for m in range(5)]) for b in range(3)])
    torch.testing.assert_close(model.forward(points, f[:, None]), each, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_model", [False, True])
@pytest.mark.parametrize("spec", EXAMPLE_SPECS)
def test_weighted_gradients_agree_with_autograd(spec, per_model):
    # float64: each family's hand-derived gradient of sum(w r^2) against autograd through the
    # single-model forward, model by model
    g = torch.Generator().manual_seed(1)
    B, n = 4, 9
    x = torch.randn(B, n, generator=g, dtype=torch.float64) if per_model else torch.randn(n, generator=g, dtype=torch.float64)
    y = torch.randn(B, n, generator=g, dtype=torch.float64)
    model = make_model(spec).fit(x.reshape(-1).numpy())
    f = model.features(x)
    weights = torch.randint(0, 3, (B, n), generator=g).double()
    weights[:, 0] = 1.0
    weights /= weights.sum(dim=1, keepdim=True)
    theta = torch.randn(B, model.size, generator=g, dtype=torch.float64)
    loss, grad = model.weighted_loss_and_gradient(theta, f, y, weights)
    for b in range(B):
        p = theta[b].clone().requires_grad_(True)
        residual = model.forward(p, f[b] if per_model else f) - y[b]
        reference = (weights[b] * residual * residual).sum()
        reference.backward()
        torch.testing.assert_close(loss[b], reference.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(grad[b], p.grad, rtol=1e-10, atol=1e-12)


def test_bad_inputs_name_the_mistake(standardized):
    x, y = standardized
    options = dict(strategy="analytic", lr=0.1, epochs=5)
    with pytest.raises(InvalidInput, match="non-negative"):
        train_batched(Linear(), x, y, -torch.ones(2, 11), **options)
    with pytest.raises(InvalidInput, match=r"model\(s\) \[1\] are all 0"):
        train_batched(Linear(), x, y, torch.stack([torch.ones(11), torch.zeros(11)]), **options)
    with pytest.raises(InvalidInput, match="do not fit 2 model"):
        train_batched(Linear(), x[:10], y, torch.ones(2, 11), **options)
    with pytest.raises(InvalidInput, match="targets"):
        train_batched(Linear(), x, torch.stack([y, y, y]), torch.ones(2, 11), **options)
    with pytest.raises(InvalidInput, match="initial parameters"):
        train_batched(Linear(), x, y, torch.ones(2, 11), initial=torch.zeros(3, 2), **options)
    with pytest.raises(InvalidInput, match="unknown strategy"):
        train_batched(Linear(), x, y, torch.ones(2, 11), **{**options, "strategy": "newton"})


@pytest.mark.parametrize("per_model", [False, True])
def test_the_analytic_step_reaches_the_float32_optimum_as_one_training_does(per_model):
    # many rows far from 0 (°C about 70) and little noise: near the optimum each row's share of the
    # step is below half an ulp of the parameters, which a step fused into the gradient's product
    # (addmm into theta) rounds away, stalling a dozen ulps short
    g = torch.Generator().manual_seed(5)
    x = torch.randn(800, generator=g)
    y = 35.0 * x + 69.0 + 0.05 * torch.randn(800, generator=g)
    options = dict(strategy="analytic", lr=0.5, epochs=60)
    single = train_model(x, y, None, None, **options)
    result = train_batched(Linear(), torch.stack([x, x]) if per_model else x, y, torch.ones(2, 800), **options)
    np.testing.assert_array_max_ulp(result.params, np.stack([single.params] * 2), maxulp=2)
