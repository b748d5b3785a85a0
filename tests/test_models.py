"""The model families: specs, the orthonormal basis, parameters as data, raw-unit coefficients,
and training every family to its reference (plain functions, no Prefect)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from tasks.calibration import Calibration
from tasks.errors import InvalidInput
from tasks.evaluate import evaluate_model
from tasks.models import EXAMPLE_SPECS, make_model
from tasks.normalize import fit_normalizer
from tasks.settings import CalibrationSettings
from tasks.specs import parse_spec
from tasks.split import split_indices
from tasks.train import Stopping, train_model
from tests.conftest import ROOT

X = np.array([35.7, 55.9, 58.2, 81.9, 56.3, 48.9, 33.9, 21.8, 48.4, 60.4, 68.4])
Y = np.array([0.5, 14.0, 15.0, 28.0, 11.0, 8.0, 3.0, -4.0, 6.0, 13.0, 21.0])


def prt_readings(n: int = 60, noise: float = 0.05, seed: int = 0):
    """A platinum resistance thermometer (Pt100, Callendar-Van Dusen above 0 °C): 100-250 ohm over
    0-400 °C, the reference thermometer's noise in °C. Raw readings in the hundreds make the
    monomials of a cubic ill-conditioned (cond(X^T X) about 1e20)."""
    rng = np.random.default_rng(seed)
    celsius = np.sort(rng.uniform(0.0, 400.0, n))
    ohm = 100.0 * (1 + 3.9083e-3 * celsius - 5.775e-7 * celsius**2)
    return ohm, celsius + rng.normal(0.0, noise, n)


@pytest.mark.parametrize("spec, parsed", [("linear", ("linear", 1)), ("poly:1", ("poly", 1)), ("POLY:5", ("poly", 5)),
                                          ("mlp:13", ("mlp", 13)), ("mlp:256", ("mlp", 256)), (" mlp:1 ", ("mlp", 1))])
def test_valid_specs(spec, parsed):
    assert parse_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["poly:0", "poly:9", "mlp:x", "cubic", "mlp:0", "mlp:257", "poly", "linear:2", "", "poly:-1"])
def test_bad_specs_list_the_valid_forms(spec):
    with pytest.raises(ValueError, match="valid forms: linear; poly:K with K = 1..5.*mlp:H with H = 1..256"):
        parse_spec(spec)


def test_the_settings_keep_the_canonical_spec_and_the_schema_a_pattern():
    assert CalibrationSettings(model="Poly:3").model == "poly:3"
    pattern = CalibrationSettings.model_json_schema()["properties"]["model"]["pattern"]
    import re

    assert all(re.fullmatch(pattern, s) for s in EXAMPLE_SPECS + ("mlp:256", "mlp:100"))
    assert not any(re.fullmatch(pattern, s) for s in ("poly:0", "poly:9", "mlp:x", "cubic", "mlp:257", "mlp:0"))


@pytest.mark.parametrize("degree", range(1, 6))
@pytest.mark.parametrize("method", ["none", "scale", "standard"])
def test_the_polynomial_basis_is_orthonormal_on_the_training_rows(degree, method):
    raw, _ = prt_readings()
    x = fit_normalizer(raw, method, 0.1).apply64(raw)
    model = make_model(f"poly:{degree}").fit(x)
    f = model.features(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(f.T @ f / len(x), np.eye(degree + 1), atol=1e-9)


def test_a_degree_needs_as_many_different_readings():
    with pytest.raises(InvalidInput, match=r"poly:3 has 4 coefficients, but the training rows hold only 3 different reading"):
        make_model("poly:3").fit(np.array([1.0, 2.0, 2.0, 3.0, 3.0]))


def _calibration(spec: str, method: str, seed: int = 0) -> Calibration:
    normalizer = fit_normalizer(X, method, 0.1)
    model = make_model(spec).fit(normalizer.apply64(X))
    theta = model.initial(torch.Generator().manual_seed(seed)).numpy() + np.random.default_rng(seed).normal(0, 0.3, model.size).astype(np.float32)
    return Calibration(model, theta, normalizer, (X.min(), X.max()))


@pytest.mark.parametrize("spec", EXAMPLE_SPECS)
@pytest.mark.parametrize("method", ["none", "scale", "standard"])
def test_raw_coefficients_give_the_same_values_as_the_model(spec, method):
    cal = _calibration(spec, method)
    readings = np.linspace(15, 90, 31)
    if cal.coefficients is None:
        assert cal.model.kind == "mlp"
        return
    assert len(cal.coefficients) == cal.model.size if cal.model.kind == "poly" else len(cal.coefficients) == 2
    np.testing.assert_allclose(np.polynomial.polynomial.polyval(readings, cal.coefficients), cal.predict(readings), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("spec", EXAMPLE_SPECS)
def test_a_calibration_persists_as_named_arrays_and_predicts_the_same(spec, tmp_path):
    import joblib

    cal = _calibration(spec, "standard")
    record = cal.to_record()
    assert set(record) == {"spec", "parameters", "buffers", "normalizer", "range", "uncertainty"}
    assert all(isinstance(a, np.ndarray) for a in [*record["parameters"].values(), *record["buffers"].values()])
    joblib.dump(record, tmp_path / "model.joblib")
    again = Calibration.from_record(joblib.load(tmp_path / "model.joblib"))
    np.testing.assert_array_equal(again.predict(X), cal.predict(X))


def test_the_network_parameters_load_into_torch_nn():
    cal = _calibration("mlp:13", "scale")
    net = torch.nn.Sequential(torch.nn.Linear(1, 13), torch.nn.Tanh(), torch.nn.Linear(13, 1)).double()
    net.load_state_dict({name: torch.from_numpy(a).double() for name, a in cal.to_record()["parameters"].items()})
    x = torch.from_numpy(cal.normalizer.apply64(X)).reshape(-1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(net(x).reshape(-1).numpy(), cal.predict(X), rtol=1e-12)


INIT = "import sys, torch; sys.path.insert(0, sys.argv[1]); from tasks.models import make_model; " \
       "print(make_model('mlp:13').initial(torch.Generator().manual_seed(42)).numpy().tobytes().hex())"


def test_the_network_starts_from_the_runs_own_seed_in_any_process():
    model = make_model("mlp:13")
    mine = model.initial(torch.Generator().manual_seed(42))
    torch.manual_seed(999)  # the global generator plays no part
    assert torch.equal(mine, model.initial(torch.Generator().manual_seed(42)))
    assert not torch.equal(mine, model.initial(torch.Generator().manual_seed(43)))
    other = subprocess.run([sys.executable, "-c", INIT, str(ROOT)], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == mine.numpy().tobytes().hex()
    # nn.Linear's ranges: |first layer| <= 1 (fan_in 1), |second| <= 1/sqrt(13)
    assert mine[:26].abs().max() <= 1 and mine[26:].abs().max() <= 13**-0.5


def _default_training(raw, y, spec, strategy, val_fraction=0.0):
    """What the train and validate stages do with the default settings, as plain functions."""
    settings = CalibrationSettings(model=spec, strategy=strategy, val_fraction=val_fraction)
    train_idx, val_idx = split_indices(len(raw), val_fraction, settings.seed)
    normalizer = fit_normalizer(raw, settings.normalize)
    x = normalizer.apply64(raw)
    model = make_model(spec).fit(x[train_idx])
    f = model.features(torch.from_numpy(x)).float()
    y32 = torch.from_numpy(y.astype(np.float32))
    result = train_model(f[train_idx], y32[train_idx], f[val_idx], y32[val_idx], model=model, strategy=strategy,
                         lr=settings.learning_rate, epochs=settings.max_epochs, delta=settings.delta,
                         stopping=Stopping(tol=settings.stopping_tol, patience=settings.patience), seed=settings.seed)
    cal = Calibration(model, result.params, normalizer, (raw.min(), raw.max()))
    return result, evaluate_model(cal, raw, y, train_idx, val_idx), cal


@pytest.mark.parametrize("strategy", ["finite-difference", "analytic", "autograd", "optimizer"])
@pytest.mark.parametrize("degree", [1, 2, 3])
@pytest.mark.parametrize("data", ["shipped", "resistance thermometer"])
def test_the_default_run_reaches_the_optimum_for_cubics_and_below(strategy, degree, data):
    raw, y = (X, Y) if data == "shipped" else prt_readings()
    result, metrics, _ = _default_training(raw, y, f"poly:{degree}", strategy, val_fraction=0.2)
    assert metrics["gap_to_optimum"] <= 1e-6 and metrics["converged"]
    assert result.stopped_by == "tol" and result.epochs_run < 100


def test_the_quadratic_exercise_matches_numpy_least_squares():
    _, metrics, cal = _default_training(X, Y, "poly:2", "analytic")
    reference = np.polynomial.polynomial.Polynomial.fit(X, Y, 2).convert()
    np.testing.assert_allclose(cal.predict(X), reference(X), rtol=1e-4)
    # FACTS.md, on inputs x0.1: w2 0.28304, w1 2.47604, b -10.64962, MSE 2.09072
    np.testing.assert_allclose(cal.coefficients, [-10.64962, 0.247604, 0.0028304], rtol=1e-4)
    assert metrics["train_loss"] == pytest.approx(2.09072, abs=1e-5)


def test_the_network_reports_the_best_polynomials_instead_of_an_optimum():
    _, metrics, _ = _default_training(X, Y, "mlp:13", "analytic")
    assert metrics["optimum"] is None and metrics["gap_to_optimum"] is None and metrics["converged"] is None
    assert list(metrics["baselines"]) == ["poly:1", "poly:2", "poly:3"]
    assert metrics["baselines"]["poly:1"] == pytest.approx(2.927646, abs=1e-6)
    assert metrics["baselines"]["poly:2"] == pytest.approx(2.09072, abs=1e-5)


def test_the_books_network_beats_the_line(seed_data):
    t_u, t_c = seed_data
    model = make_model("mlp:13")
    result = train_model(0.1 * t_u, t_c, None, None, model=model, strategy="optimizer", optimizer="sgd", lr=1e-3, epochs=5000, seed=42)
    assert float(result.train_loss[-1]) < 2.927646
    again = train_model(0.1 * t_u, t_c, None, None, model=model, strategy="optimizer", optimizer="sgd", lr=1e-3, epochs=5000, seed=42)
    assert np.array_equal(result.params, again.params)  # the same seed reproduces the run bit for bit


@pytest.mark.parametrize("spec", ["linear", "poly:2"])
def test_readings_fitted_exactly_count_as_converged(spec):
    raw = np.linspace(0.8, 2.6, 16)
    y = 25.0 * (raw - 1.0) + (0.5 * raw**2 if spec == "poly:2" else 0.0)  # no noise: the optimum's loss is about 0
    _, metrics, _ = _default_training(raw, y, spec, "analytic", val_fraction=0.2)
    assert metrics["optimum"]["train_loss"] < 1e-20 and metrics["converged"]
