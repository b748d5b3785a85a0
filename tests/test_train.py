"""The training loop reproduces the seed's reference numbers (FACTS.md) and catches divergence."""

import numpy as np
import pytest
import torch

from tasks.errors import TrainingDiverged
from tasks.model import least_squares
from tasks.train import train_model


@pytest.mark.parametrize("strategy", ["analytic", "autograd", "finite-difference", "optimizer"])
def test_seed_configuration_reaches_the_reference(strategy, seed_data):
    t_u, t_c = seed_data
    result = train_model(0.1 * t_u, t_c, None, None, strategy=strategy, lr=1e-2, epochs=5000, delta=0.1, optimizer="sgd")
    assert result.w == pytest.approx(5.3671, abs=1e-4)
    assert result.b == pytest.approx(-17.3012, abs=1e-4)
    assert float(result.train_loss[-1]) == pytest.approx(2.927648, abs=1e-5)
    assert result.epochs_run == 5000 and result.train_loss.shape == (5000,) and result.val_loss is None


def test_adam_on_raw_readings(seed_data):
    t_u, t_c = seed_data
    result = train_model(t_u, t_c, None, None, strategy="optimizer", optimizer="adam", lr=1e-1, epochs=5000)
    assert float(result.train_loss[-1]) == pytest.approx(2.92765, abs=1e-4)
    assert result.w == pytest.approx(0.5368, abs=1e-3)


def test_result_matches_least_squares(seed_data):
    t_u, t_c = seed_data
    result = train_model(0.1 * t_u, t_c, None, None, strategy="analytic", lr=1e-2, epochs=5000)
    slope, intercept, mse = least_squares(t_u.numpy(), t_c.numpy())
    assert result.w * 0.1 == pytest.approx(slope, rel=1e-3)
    assert result.b == pytest.approx(intercept, rel=1e-3)
    assert float(result.train_loss[-1]) == pytest.approx(mse, rel=1e-5)


@pytest.mark.parametrize("strategy", ["analytic", "autograd", "finite-difference", "optimizer"])
def test_raw_inputs_at_lr_1e2_diverge_with_a_clear_error(strategy, seed_data):
    t_u, t_c = seed_data
    with pytest.raises(TrainingDiverged) as error:
        train_model(t_u, t_c, None, None, strategy=strategy, lr=1e-2, epochs=5000)
    message = str(error.value)
    assert "diverged at epoch" in message
    epoch = int(message.split("epoch ")[1].split(":")[0])
    assert 1 < epoch <= 20  # inf by epoch 11 in the seed
    assert "--lr" in message and "--normalize" in message


def test_validation_loss_is_recorded_every_epoch(seed_data):
    t_u, t_c = seed_data
    x = 0.1 * t_u
    result = train_model(x[:9], t_c[:9], x[9:], t_c[9:], strategy="autograd", lr=1e-2, epochs=300, log_every=100)
    assert result.val_loss.shape == (300,)
    assert np.isfinite(result.val_loss).all()
    # the first validation loss is that of the seed's start, w = 1, b = 0
    assert result.val_loss[0] == pytest.approx(float(((x[9:] - t_c[9:]) ** 2).mean()), rel=1e-6)
    assert [line.split(",")[0] for line in result.log_lines] == ["Epoch 1", "Epoch 2", "Epoch 3", "Epoch 100", "Epoch 200", "Epoch 300"]


def test_same_inputs_reproduce_bit_for_bit(seed_data):
    t_u, t_c = seed_data
    runs = [train_model(0.1 * t_u, t_c, None, None, strategy="optimizer", optimizer="adam", lr=1e-2, epochs=200) for _ in range(2)]
    assert (runs[0].w, runs[0].b) == (runs[1].w, runs[1].b)
    assert np.array_equal(runs[0].train_loss, runs[1].train_loss)


def test_log_callback_receives_the_seed_cadence(seed_data):
    t_u, t_c = seed_data
    seen = []
    train_model(0.1 * t_u, t_c, None, None, strategy="analytic", lr=1e-2, epochs=1000, log_every=500, log=seen.append)
    assert [s.split(",")[0] for s in seen] == ["Epoch 1", "Epoch 2", "Epoch 3", "Epoch 500", "Epoch 1000"]
    assert "Validation" not in seen[0]
