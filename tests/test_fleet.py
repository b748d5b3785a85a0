"""Fleets (tasks.fleet): every sensor of a partition trains in one batched program, yet gets what a
single-sensor run on its own rows gets, built here from the plain functions train_calibration uses;
sensors that cannot be calibrated are reported with their reason; validation and inference
agree with numpy's float64 least squares; partitions are stable."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tasks.calibration import Calibration
from tasks.errors import InvalidInput, TrainingDiverged
from tasks.evaluate import fit_quality
from tasks.fleet import fleet_calibration, infer_sensors, partition_of, train_sensors, validate_sensors
from tasks.models import make_model
from tasks.normalize import fit_normalizer
from tasks.settings import CalibrationSettings
from tasks.split import split_indices
from tasks.train import Stopping, train_model
from tasks.uncertainty import analytic_uncertainty
from tests.conftest import ROOT

STRATEGIES = [("analytic", "sgd"), ("finite-difference", "sgd"), ("autograd", "sgd"), ("optimizer", "sgd"), ("optimizer", "adam")]
# learning rate and epochs by family. Gradient descent on the network amplifies float32 rounding at
# larger rates (tests/test_batched.py): here a sensor of 9 rows at lr 0.02 ends 0.4 away from its
# single run, where at 0.01 every sensor stays within 1e-5 of its own
RUNS = {"linear": (0.1, 150), "poly:2": (0.1, 150), "mlp:4": (0.01, 150)}


def _atol(strategy: str, spec: str) -> float:
    """Parameters' absolute tolerance. Finite differences of float32 losses carry rounding of
    ulp(loss) / 2 delta into every gradient (3e-4 while a loss is near 1500), which the network's
    training then amplifies: two single runs of the 37-row sensor below, its training rows in
    reversed order, end 4e-3 apart (as tests/test_batched.py's _atol, for larger losses)."""
    if strategy != "finite-difference":
        return 1e-5
    return 1e-2 if spec.startswith("mlp") else 1e-4


def make_fleet(counts, seed=0):
    """Readings of sensors with `counts` rows each, each its own line and noise, the sensors' rows
    interleaved as in a logger's file: (readings, celsius, codes, ids)."""
    rng = np.random.default_rng(seed)
    codes = rng.permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.int32)
    slope, intercept, noise = rng.uniform(0.3, 0.8, len(counts)), rng.uniform(-30, 10, len(counts)), rng.uniform(0.1, 2, len(counts))
    readings = rng.uniform(20.0, 80.0, len(codes))
    celsius = intercept[codes] + slope[codes] * readings + 0.002 * (readings - 50) ** 2 + noise[codes] * rng.normal(size=len(codes))
    return readings, celsius, codes, [f"sensor-{i}" for i in range(len(counts))]


def single_run(raw, celsius, settings):
    """What train_calibration does for one sensor's rows, from the same plain functions: its
    calibration, its TrainResult and its validation rows."""
    normalizer = fit_normalizer(raw, settings.normalize, settings.scale)
    train_idx, val_idx = split_indices(len(raw), settings.val_fraction, settings.seed)
    x_train, x_val = normalizer.apply64(raw[train_idx]), normalizer.apply64(raw[val_idx])
    model = make_model(settings.model).fit(x_train)

    def tensors(x, idx):
        return model.features(torch.from_numpy(x)).float(), torch.from_numpy(celsius[idx].astype(np.float32))

    result = train_model(*tensors(x_train, train_idx), *tensors(x_val, val_idx), model=model, strategy=settings.strategy,
                         optimizer=settings.optimizer, lr=settings.learning_rate, epochs=settings.max_epochs, delta=settings.delta,
                         stopping=Stopping(settings.stopping_tol, settings.patience, settings.val_patience), seed=settings.seed)
    uncertainty = analytic_uncertainty(model, result.params, x_train, celsius[train_idx]) if model.linear_in_params else None
    calibration = Calibration(model, result.params, normalizer, (raw[train_idx].min(), raw[train_idx].max()), uncertainty)
    return calibration, result, val_idx


def assert_as_alone(trained, readings, celsius, codes, settings, sensors, atol=1e-5):
    """Each of `sensors` (indices) got what its single run gets, to float32 rounding."""
    for s in sensors:
        rows = np.flatnonzero(codes == s)
        single, result, val_idx = single_run(readings[rows], celsius[rows], settings)
        calibration = fleet_calibration(trained, trained["sensors"][s])
        assert calibration.normalizer.method == single.normalizer.method
        np.testing.assert_allclose([calibration.normalizer.shift, calibration.normalizer.factor],
                                   [single.normalizer.shift, single.normalizer.factor], rtol=1e-12)
        assert calibration.range == single.range
        assert np.flatnonzero(trained["is_validation"][rows]).tolist() == sorted(val_idx.tolist())
        for name, value in single.model.buffers().items():  # the polynomial's basis, fitted on the sensor's training rows
            np.testing.assert_allclose(calibration.model.buffers()[name], value, rtol=1e-10)
        assert trained["stopped_by"][s] == result.stopped_by and trained["epochs_run"][s] == result.epochs_run
        np.testing.assert_allclose(calibration.theta, single.theta, rtol=1e-4, atol=atol)
        np.testing.assert_allclose(trained["train_loss"][s], result.train_loss[-1], rtol=max(1e-4, atol), atol=1e-6)
        if single.uncertainty is None:
            assert calibration.uncertainty is None
            continue
        assert calibration.uncertainty["dof"] == single.uncertainty["dof"]
        for name in ("residual_sd", "t95", "gram_inverse", "covariance_theta"):  # None without a degree of freedom
            mine, theirs = calibration.uncertainty[name], single.uncertainty[name]
            assert (mine is None) == (theirs is None)
            if theirs is not None:
                np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(calibration.coefficients, single.coefficients, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec", list(RUNS))
@pytest.mark.parametrize("strategy, optimizer", STRATEGIES)
def test_each_sensor_trains_as_it_would_alone(strategy, optimizer, spec):
    readings, celsius, codes, ids = make_fleet([12, 20, 20, 37, 9])  # ragged; two sensors share a count (and a permutation)
    lr, epochs = RUNS[spec]
    settings = CalibrationSettings(model=spec, strategy=strategy, optimizer=optimizer, lr=lr, epochs=epochs)
    trained = train_sensors(readings, celsius, codes, ids, settings)
    assert trained["failed"] == [] and trained["calibrated"].all()
    assert trained["stopped_by"] == ["epochs"] * 5 and trained["params"].dtype == np.float32
    assert_as_alone(trained, readings, celsius, codes, settings, range(5), atol=_atol(strategy, spec))
    assert not np.allclose(trained["params"][0], trained["params"][1], rtol=1e-2)  # the sensors did differ


@pytest.mark.parametrize("spec", ["linear", "poly:2"])
def test_the_default_settings_stop_each_sensor_as_alone_at_the_optimum(spec):
    readings, celsius, codes, ids = make_fleet([40, 25, 60, 33], seed=1)
    settings = CalibrationSettings(model=spec)
    trained = train_sensors(readings, celsius, codes, ids, settings)
    assert set(trained["stopped_by"]) == {"tol"}
    assert_as_alone(trained, readings, celsius, codes, settings, range(4))
    table = validate_sensors(readings, celsius, codes, trained)
    assert (table["gap_to_optimum"] <= 1e-6).all()


def test_without_a_split_each_sensor_trains_on_all_its_rows_as_alone():
    readings, celsius, codes, ids = make_fleet([2, 15, 40])  # two rows are enough without validation rows
    settings = CalibrationSettings(val_fraction=0)
    trained = train_sensors(readings, celsius, codes, ids, settings)
    assert trained["failed"] == [] and not trained["is_validation"].any()
    assert_as_alone(trained, readings, celsius, codes, settings, range(3))
    table = validate_sensors(readings, celsius, codes, trained)
    assert table["val_rows"].tolist() == [0, 0, 0] and table["val_loss"].isna().all()


def test_sensors_that_cannot_be_calibrated_are_reported_and_the_rest_calibrate():
    # x0.1 readings and the seed's lr 0.01: the line's loss is well conditioned for readings of 20-80,
    # and lr 0.01 is far too large for a sensor reading 200-800 (its curvature is a hundredfold)
    readings, celsius, codes, ids = make_fleet([30, 3, 12, 30, 25])
    readings[codes == 2] = 25.0
    readings[codes == 3] *= 10.0
    settings = CalibrationSettings(normalize="scale", epochs=300)
    trained = train_sensors(readings, celsius, codes, ids, settings)
    reasons = {f["sensor"]: f["reason"] for f in trained["failed"]}
    assert list(reasons) == ["sensor-1", "sensor-2", "sensor-3"]
    assert reasons["sensor-1"] == "3 row(s); the split needs at least 5"
    assert reasons["sensor-2"].startswith("every reading is 25;")
    with pytest.raises(TrainingDiverged, match=r"epoch (\d+)") as error:
        single_run(readings[codes == 3], celsius[codes == 3], settings)
    epoch = error.value.args[0].split("epoch ")[1].split(":")[0]
    assert reasons["sensor-3"].startswith(f"training diverged at epoch {epoch} (strategy analytic, lr 0.01)")
    assert trained["calibrated"].tolist() == [True, False, False, False, True]
    assert np.isnan(trained["params"][1:4]).all() and trained["stopped_by"][1:4] == [None, None, "diverged"]
    assert_as_alone(trained, readings, celsius, codes, settings, [0, 4])

    table = validate_sensors(readings, celsius, codes, trained)
    assert table["status"].tolist() == ["calibrated", "failed", "failed", "failed", "calibrated"]
    assert table["reason"][1:4].tolist() == list(reasons.values())
    assert table["coefficients"][1:4].isna().all() and table["train_loss"][1:4].isna().all()
    fitted = infer_sensors(readings, codes, trained)
    assert np.isnan(fitted[np.isin(codes, [1, 2, 3])]).all() and np.isfinite(fitted[np.isin(codes, [0, 4])]).all()
    with pytest.raises(InvalidInput, match="sensor 'sensor-2' has no calibration: every reading is 25"):
        fleet_calibration(trained, "sensor-2")
    with pytest.raises(InvalidInput, match="no sensor 'sensor-9'"):
        fleet_calibration(trained, "sensor-9")
    nothing = train_sensors(readings[codes == 1], celsius[codes == 1], np.zeros(3, dtype=int), ["sensor-1"], settings)
    assert nothing["failed"] == trained["failed"][:1] and nothing["epochs_run"].tolist() == [0] and nothing["seconds"] == 0.0


def test_too_few_different_training_readings_for_the_polynomial_fail_that_sensor():
    readings, celsius, codes, ids = make_fleet([20, 20])
    readings[codes == 1] = np.where(np.arange(20) % 2, 30.0, 40.0)
    settings = CalibrationSettings(model="poly:2")
    with pytest.raises(InvalidInput, match="only 2 different reading"):  # what a single run says
        single_run(readings[codes == 1], celsius[codes == 1], settings)
    trained = train_sensors(readings, celsius, codes, ids, settings)
    assert trained["failed"] == [{"sensor": "sensor-1", "reason": "its training rows hold only 2 different reading(s); poly:2 needs 3"}]
    assert_as_alone(trained, readings, celsius, codes, settings, [0])


@pytest.mark.parametrize("spec", ["linear", "poly:2"])
def test_validation_and_inference_agree_with_float64_least_squares(spec):
    readings, celsius, codes, ids = make_fleet([50, 80, 35, 120, 3], seed=2)
    trained = train_sensors(readings, celsius, codes, ids, CalibrationSettings(model=spec))
    table = validate_sensors(readings, celsius, codes, trained)
    fitted = infer_sensors(readings, codes, trained)
    assert fitted.dtype == np.float32 and np.isnan(fitted[codes == 4]).all()
    degree = make_model(spec).size - 1
    for s in range(4):
        rows = np.flatnonzero(codes == s)
        train = rows[~trained["is_validation"][rows]]
        val = rows[trained["is_validation"][rows]]
        row = table.iloc[s]
        assert (row["status"], row["model"], row["train_rows"], row["val_rows"]) == ("calibrated", spec, len(train), len(val))
        assert (row["range_low"], row["range_high"]) == (readings[train].min(), readings[train].max())
        optimum = np.polyfit(readings[train], celsius[train], degree)[::-1]  # ascending powers, as coefficients are
        np.testing.assert_allclose(row["coefficients"], optimum, rtol=1e-4, atol=1e-9)
        mine = np.polynomial.polynomial.polyval(readings[rows], row["coefficients"])
        np.testing.assert_allclose(fitted[rows], mine, rtol=1e-6, atol=1e-4)
        assert row["train_loss"] == pytest.approx(np.mean((mine[np.isin(rows, train)] - celsius[train]) ** 2), rel=1e-9)
        assert row["val_loss"] == pytest.approx(np.mean((mine[np.isin(rows, val)] - celsius[val]) ** 2), rel=1e-9)
        best = np.mean((np.polynomial.polynomial.polyval(readings[train], optimum) - celsius[train]) ** 2)
        assert row["gap_to_optimum"] == pytest.approx(row["train_loss"] / best - 1, abs=1e-9) and row["gap_to_optimum"] <= 1e-6
        calibration = fleet_calibration(trained, ids[s])
        quality = fit_quality(calibration, readings[train], celsius[train], row["train_loss"])
        assert row["gap_to_optimum"] == pytest.approx(quality["gap_to_optimum"], abs=1e-9)
        # ordinary least squares' standard uncertainties of the raw-unit coefficients
        design = np.vander(readings[train], degree + 1, increasing=True)
        residual = design @ np.asarray(row["coefficients"]) - celsius[train]
        s2 = residual @ residual / (len(train) - degree - 1)
        assert row["residual_sd"] == pytest.approx(np.sqrt(s2), rel=1e-9)
        np.testing.assert_allclose(row["standard_uncertainties"], np.sqrt(np.diag(s2 * np.linalg.inv(design.T @ design))), rtol=1e-6)
        # one sensor's calibration, persisted and reloaded, predicts as the fleet does
        reloaded = Calibration.from_record(calibration.to_record())
        np.testing.assert_allclose(reloaded.predict(readings[rows], engine="numpy"), fitted[rows], rtol=1e-6, atol=1e-4)
    assert table.iloc[4]["status"] == "failed" and np.isnan(table.iloc[4][["train_loss", "gap_to_optimum"]].astype(float)).all()


def test_the_network_has_no_formula_and_no_gap():
    readings, celsius, codes, ids = make_fleet([30, 40])
    trained = train_sensors(readings, celsius, codes, ids, CalibrationSettings(model="mlp:4", epochs=50))
    table = validate_sensors(readings, celsius, codes, trained)
    assert table["coefficients"].isna().all() and table["standard_uncertainties"].isna().all()
    assert table["gap_to_optimum"].isna().all() and table["train_loss"].notna().all()
    for s in range(2):
        rows = codes == s
        np.testing.assert_allclose(infer_sensors(readings[rows], codes[rows], trained),
                                   fleet_calibration(trained, ids[s]).predict(readings[rows]), rtol=1e-6, atol=1e-5)


def test_what_a_fleet_cannot_do_as_a_single_run_is_refused():
    readings, celsius, codes, ids = make_fleet([20, 20])
    with pytest.raises(InvalidInput, match="batch-size"):
        train_sensors(readings, celsius, codes, ids, CalibrationSettings(batch_size=4))
    with pytest.raises(InvalidInput, match="codes must be integers in 0..1"):
        train_sensors(readings, celsius, codes + 1, ids, CalibrationSettings())
    with pytest.raises(InvalidInput, match="distinct ids"):
        train_sensors(readings, celsius, codes, ["a", "a"], CalibrationSettings())
    trained = train_sensors(readings, celsius, codes, ids, CalibrationSettings())
    with pytest.raises(InvalidInput, match="trained on 40"):
        validate_sensors(readings[:-1], celsius[:-1], codes[:-1], trained)


def test_partitions_hold_at_most_partition_size_sensors_of_nearly_equal_counts():
    ids = np.array([f"logger-{i:04d}" for i in range(1000)])
    partitions = partition_of(ids, 64)
    sizes = np.bincount(partitions)
    assert partitions.dtype == np.int32 and len(sizes) == 16  # ceil(1000 / 64)
    assert sizes.max() <= 64 and sizes.max() - sizes.min() <= 1
    assert partition_of(ids, 1000).tolist() == [0] * 1000 and len(set(partition_of(ids, 1).tolist())) == 1000
    with pytest.raises(InvalidInput, match="at least 1"):
        partition_of(ids, 0)


def test_partitions_do_not_depend_on_order_repetition_or_process():
    rng = np.random.default_rng(3)
    ids = np.array([f"logger-{i:04d}" for i in range(300)])
    partitions = dict(zip(ids, partition_of(ids, 50).tolist()))
    rows = rng.permutation(np.concatenate([ids, rng.choice(ids, 1700)]))  # one id per row: each of them, repeated, in any order
    assert [partitions[i] for i in rows] == partition_of(rows, 50).tolist()
    shuffled = rng.permutation(ids)
    assert [partitions[i] for i in shuffled] == partition_of(shuffled, 50).tolist()
    code = "import sys; from tasks.fleet import partition_of; print(partition_of([f'logger-{i:04d}' for i in range(300)], 50).tolist())"
    for seed in ("1", "2"):  # Python's str hash differs by PYTHONHASHSEED; the partitions must not
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        assert json.loads(out) == [partitions[i] for i in ids]
