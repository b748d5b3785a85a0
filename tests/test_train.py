"""The training loop reproduces the seed's reference numbers (FACTS.md) and catches divergence."""

import numpy as np
import pytest
import torch

from tasks.errors import TrainingDiverged
from tasks.model import least_squares
from tasks.models import Linear, make_model
from tasks.train import Stopping, train_model


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
    assert "(strategy " in message and "lr 0.01" in message


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


def _standardized(seed_data):
    from tasks.normalize import fit_normalizer

    t_u, t_c = seed_data
    normalizer = fit_normalizer(t_u.numpy(), "standard")
    return normalizer, torch.from_numpy(normalizer.apply(t_u.numpy())), t_c


def test_default_configuration_stops_at_the_optimum(seed_data):
    from tasks.settings import CalibrationSettings
    from tasks.train import Stopping

    settings = CalibrationSettings()
    normalizer, x, t_c = _standardized(seed_data)
    result = train_model(x, t_c, None, None, strategy=settings.strategy, lr=settings.learning_rate, epochs=settings.max_epochs,
                         stopping=Stopping(tol=settings.stopping_tol, patience=settings.patience))
    assert result.stopped_by == "tol" and result.epochs_run < 50 and len(result.train_loss) == result.epochs_run
    intercept, slope = Linear().raw_coefficients(result.params, normalizer)
    raw = seed_data[0].numpy().astype(np.float64)
    _, _, optimum = least_squares(raw, t_c.numpy())
    assert (np.mean((slope * raw + intercept - t_c.numpy()) ** 2) - optimum) / optimum < 1e-6


def test_given_epochs_train_them_all(seed_data):
    from tasks.settings import CalibrationSettings

    settings = CalibrationSettings(epochs=700)
    assert settings.stopping_tol == 0.0 and CalibrationSettings(epochs=700, tol=1e-6).stopping_tol == 1e-6
    _, x, t_c = _standardized(seed_data)
    result = train_model(x, t_c, None, None, strategy="analytic", lr=settings.learning_rate, epochs=settings.max_epochs)
    assert result.stopped_by == "epochs" and result.epochs_run == 700


@pytest.mark.parametrize("strategy", ["finite-difference", "autograd", "optimizer"])
def test_tol_stops_every_strategy_despite_float_jitter(strategy, seed_data):
    from tasks.train import Stopping

    _, x, t_c = _standardized(seed_data)
    result = train_model(x, t_c, None, None, strategy=strategy, lr=0.5, epochs=5000, stopping=Stopping(tol=1e-6))
    assert result.stopped_by == "tol" and result.epochs_run < 100


def test_an_oscillating_loss_is_not_mistaken_for_a_settled_one(seed_data):
    from tasks.train import Stopping

    t_u, t_c = seed_data  # Adam on raw readings swings widely for its first hundreds of epochs
    result = train_model(t_u, t_c, None, None, strategy="optimizer", optimizer="adam", lr=1e-1, epochs=5000,
                         stopping=Stopping(tol=1e-6))
    assert result.epochs_run > 500 and float(result.train_loss[-1]) == pytest.approx(2.92765, abs=1e-3)


def test_validation_early_stopping_keeps_the_best_parameters():
    from tasks.train import Stopping

    # from w = 1, training rows pull w toward 2 (y = 2x) while validation rows prefer 1.5 (y = 1.5x):
    # the validation loss falls, then rises
    x = torch.linspace(-1, 1, 20)
    x_val = torch.linspace(-1, 1, 5)
    result = train_model(x, 2 * x, x_val, 1.5 * x_val, strategy="analytic", lr=0.05, epochs=2000,
                         stopping=Stopping(val_patience=20))
    assert result.stopped_by == "validation" and result.epochs_run < 2000
    assert result.best_epoch == int(np.argmin(result.val_loss)) + 1
    assert result.epochs_run == result.best_epoch + 20
    # the kept parameters are those the best validation loss was measured with, not the last ones
    kept = float(((result.w * x_val + result.b - 1.5 * x_val) ** 2).mean())
    assert kept == pytest.approx(float(result.val_loss.min()), rel=1e-5)
    assert kept < float(result.val_loss[-1])


def test_mini_batches_follow_their_own_seed(seed_data):
    _, x, t_c = _standardized(seed_data)
    run = lambda seed: train_model(x, t_c, None, None, strategy="autograd", lr=0.05, epochs=200, batch_size=4, seed=seed)
    a, b, c = run(1), run(1), run(2)
    assert (a.w, a.b) == (b.w, b.b) and np.array_equal(a.train_loss, b.train_loss)
    assert (a.w, a.b) != (c.w, c.b)
    torch.manual_seed(123)  # the global generator plays no part
    assert (run(1).w, run(1).b) == (a.w, a.b)


def _trained(monkeypatch, look_every: float, **options):
    """train_model's result and its log lines, each line with the last epoch the loop had reached
    when it came, losses read back every `look_every` seconds."""
    import tasks.train

    monkeypatch.setattr(tasks.train, "LOOK_EVERY", look_every)
    reached, lines = [0], []
    try:
        result = train_model(progress=lambda epoch: reached.__setitem__(0, epoch), log=lambda line: lines.append((line, reached[0])), **options)
    except TrainingDiverged as error:
        return str(error), lines
    return (result.params.tobytes(), result.train_loss.tobytes(), None if result.val_loss is None else result.val_loss.tobytes(),
            result.epochs_run, result.stopped_by, result.log_lines), lines


READ_BACK_CASES = {
    "seed's configuration, validation rows": dict(strategy="analytic", lr=1e-2, epochs=1200, log_every=100),
    "default stopping": dict(strategy="analytic", lr=1e-2, epochs=5000, stopping=Stopping(tol=1e-6)),
    "network, mini-batches": dict(strategy="autograd", lr=1e-2, epochs=600, log_every=100, batch_size=4, model=make_model("mlp:4")),
    "diverging, fixed epochs": dict(strategy="finite-difference", lr=1e-2, epochs=2000, raw=True),
    "diverging, default stopping": dict(strategy="analytic", lr=1e-2, epochs=2000, stopping=Stopping(tol=1e-6), raw=True),
}


@pytest.mark.parametrize("case", READ_BACK_CASES)
def test_losses_read_back_once_or_every_epoch_give_the_same_training(case, seed_data, monkeypatch):
    """Losses are read back (validated in batches, checked, logged) at the end and every LOOK_EVERY
    seconds: the outputs, the lines and the divergence named are the same whenever that happens."""
    t_u, t_c = seed_data
    options = dict(READ_BACK_CASES[case])
    x = t_u if options.pop("raw", False) else 0.1 * t_u
    model = options.pop("model", Linear())
    if model.kind == "mlp":
        model = model.fit((0.1 * t_u).double().numpy())
    data = dict(x_train=x[:9], y_train=t_c[:9], x_val=x[9:], y_val=t_c[9:], model=model)
    every_epoch, lines_every_epoch = _trained(monkeypatch, 0.0, **data, **options)
    at_the_end, lines_at_the_end = _trained(monkeypatch, 1e9, **data, **options)
    assert every_epoch == at_the_end
    assert [line for line, _ in lines_every_epoch] == [line for line, _ in lines_at_the_end]
    assert lines_every_epoch and all(line.startswith(f"Epoch {epoch},") for line, epoch in lines_every_epoch)  # each as its epoch ended
    if case.startswith("diverging"):
        assert "diverged at epoch" in at_the_end
        epoch = int(at_the_end.split("epoch ")[1].split(":")[0])
        assert [line.split(",")[0] for line, _ in lines_at_the_end] == [f"Epoch {e}" for e in range(1, min(epoch, 4))]
    else:
        # read back once, at the end: every line came after the last epoch
        assert {reached for _, reached in lines_at_the_end} == {at_the_end[3]}


def test_a_bad_loss_stops_training_at_once_when_stopping_reads_each_loss(seed_data):
    """With --tol (the default) each loss is read back anyway: the epoch that diverges is the last one run."""
    t_u, t_c = seed_data
    reached = []
    with pytest.raises(TrainingDiverged) as error:
        train_model(t_u, t_c, None, None, strategy="analytic", lr=1e-2, epochs=5000, stopping=Stopping(tol=1e-6), progress=reached.append)
    assert f"diverged at epoch {reached[-1]}:" in str(error.value) and reached[-1] < 20


def test_divergence_checks_catch_inf_nan_and_blow_up_even_when_the_first_loss_is_inf():
    from tasks.train import _all_finite, _first_bad_epoch

    losses = torch.tensor([4.0, 3.0, 2.0])
    assert _first_bad_epoch(losses, 10, 1e6) is None
    assert _first_bad_epoch(torch.tensor([4.0, float("nan"), 2.0]), 10, 1e6) == 12
    assert _first_bad_epoch(torch.tensor([4.0, 3.0, float("inf")]), 0, 1e6) == 3
    assert _first_bad_epoch(torch.tensor([4.0, 2e6, 1.0]), 0, 1e6) == 2
    assert _first_bad_epoch(torch.tensor([float("inf"), 1.0]), 0, float("inf")) == 1  # limit from an inf first loss
    assert _first_bad_epoch(torch.tensor([1.0]), 0, float("nan")) == 1  # limit from a NaN first loss
    assert _all_finite(torch.tensor([1.0, -3e38])) and not _all_finite(torch.tensor([1.0, float("-inf")]))
    assert not _all_finite(torch.tensor([float("nan"), 1.0]))


def test_the_reporter_renders_after_its_delay_or_at_close_in_order():
    import time

    from tasks.train import Reporter

    seen = []
    waiting = Reporter(delay=600.0)
    for line in ("one", "two", "three"):
        waiting.call(seen.append, line)
    time.sleep(0.2)
    assert seen == []  # a short training finishes before any line is rendered beside it
    started = time.monotonic()
    waiting.close()
    assert seen == ["one", "two", "three"] and time.monotonic() - started < 60  # close does not wait out the delay

    prompt = Reporter(delay=0.05)
    prompt.call(seen.append, "four")
    deadline = time.monotonic() + 30
    while seen[-1] != "four" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen[-1] == "four"  # a long training's lines arrive while it runs, not only at its end
    prompt.close()


def test_the_collector_is_spared_only_for_the_block():
    import gc

    from tasks.store import spare_the_collector

    before = gc.get_freeze_count()
    with spare_the_collector():
        assert gc.get_freeze_count() > before
    assert gc.get_freeze_count() == before


def test_a_run_forked_from_the_warm_process_keeps_what_it_shares_frozen(monkeypatch):
    import gc

    from tasks.store import spare_the_collector

    monkeypatch.setenv("THERMOCAL_FORKED_FROM", "1")  # as flows.warm sets it in a fork
    try:
        with spare_the_collector():
            pass
        assert gc.get_freeze_count() > 0  # unfreezing would have the collector write to every shared object
    finally:
        gc.unfreeze()
