"""How sure is the calibration: the formulas against statsmodels' OLS, the uncertainty through the
real flow and `thermocal predict`, the bootstrap's cross-check, outliers, extrapolation and the
certificate."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from statsmodels.stats.outliers_influence import OLSInfluence

from tasks.calibration import Calibration
from tasks.models import make_model
from tasks.normalize import fit_normalizer
from tasks.uncertainty import analytic_uncertainty, coefficient_summary, prediction_columns, residual_checks
from tests.test_flow import manifest, run, run_json

ROOT = Path(__file__).resolve().parents[1]


def _least_squares_calibration(spec: str, raw: np.ndarray, y: np.ndarray, normalize: str = "standard") -> Calibration:
    """A calibration at the least-squares parameters, with the formulas' uncertainty."""
    normalizer = fit_normalizer(raw, normalize)
    x = normalizer.apply64(raw)
    model = make_model(spec).fit(x)
    theta, *_ = np.linalg.lstsq(model.design(model.features(x)), y, rcond=None)
    return Calibration(model, theta, normalizer, (float(raw.min()), float(raw.max())), analytic_uncertainty(model, theta, x, y))


def _degree(spec: str) -> int:
    return 1 if spec == "linear" else int(spec.split(":")[1])


@pytest.mark.parametrize("spec", ["linear", "poly:1", "poly:2", "poly:3", "poly:4"])
@pytest.mark.parametrize("data_seed", [0, 1, 2])
def test_the_formulas_agree_with_statsmodels_ols(spec, data_seed):
    rng = np.random.default_rng(data_seed)
    n = int(rng.integers(12, 60))
    raw = rng.uniform(-20.0, 120.0, n)
    y = 0.25 * raw - 3.0 + 4e-4 * raw**2 + rng.normal(0.0, rng.uniform(0.05, 2.0), n)
    calibration = _least_squares_calibration(spec, raw, y, normalize=["standard", "scale", "none"][data_seed])
    degree = _degree(spec)
    ols = sm.OLS(y, np.vander(raw, degree + 1, increasing=True)).fit()

    summary = coefficient_summary(calibration.model, calibration.uncertainty, calibration.normalizer)
    np.testing.assert_allclose(calibration.coefficients, ols.params, rtol=1e-6)
    np.testing.assert_allclose(summary["standard_uncertainties"], ols.bse, rtol=1e-6)
    np.testing.assert_allclose(summary["covariance"], ols.cov_params(), rtol=1e-6, atol=1e-12 * np.abs(ols.cov_params()).max())
    assert summary["dof"] == n - degree - 1 == ols.df_resid
    assert summary["residual_sd"] == pytest.approx(np.sqrt(ols.scale), rel=1e-9)

    readings = np.linspace(-40.0, 150.0, 13)  # inside and outside the range
    frame = ols.get_prediction(np.vander(readings, degree + 1, increasing=True)).summary_frame(alpha=0.05)
    columns = prediction_columns(calibration, readings, calibration.predict(readings, engine="numpy"))
    np.testing.assert_allclose(columns["u_fit"], frame["mean_se"], rtol=1e-6)
    np.testing.assert_allclose(columns["low"], frame["obs_ci_lower"], rtol=1e-6)
    np.testing.assert_allclose(columns["high"], frame["obs_ci_upper"], rtol=1e-6)
    assert list(columns["extrapolated"]) == [not raw.min() <= r <= raw.max() for r in readings]

    # thermocal's residual is fitted - true: the opposite sign of statsmodels' resid
    checks = residual_checks(calibration, raw, y)
    # (a residual near 0 is compared absolutely: statsmodels' monomials of degree 4 lose digits there)
    np.testing.assert_allclose(-checks["studentized"], OLSInfluence(ols).resid_studentized_external, rtol=1e-6, atol=1e-7)


def test_a_planted_gross_error_is_the_one_outlier():
    rng = np.random.default_rng(7)
    raw = np.linspace(20.0, 80.0, 30)
    y = 0.5 * raw - 10.0 + rng.normal(0.0, 0.2, 30)
    y[17] += 3.0  # 15 standard deviations
    checks = residual_checks(_least_squares_calibration("linear", raw, y), raw, y)
    assert list(checks["outliers"]) == [17]
    assert checks["studentized"][17] < -checks["limit"] < 0  # fitted - true: the row lies above the line
    clean = np.delete(np.arange(30), 17)
    assert len(residual_checks(_least_squares_calibration("linear", raw[clean], y[clean]), raw[clean], y[clean])["outliers"]) == 0


@pytest.fixture
def planted_csv(tmp_path) -> Path:
    """40 readings of a line with noise 0.2 °C, one of them 4 °C off (file line 20), and a blank line."""
    rng = np.random.default_rng(3)
    raw = np.round(np.linspace(10.0, 90.0, 40), 2)
    celsius = np.round(0.4 * raw - 6.0 + rng.normal(0.0, 0.2, 40), 3)
    celsius[18] += 4.0  # table row 18: file line 20, but line 21 once the blank line below is in
    lines = ["reading,celsius"] + [f"{r},{c}" for r, c in zip(raw, celsius)]
    lines.insert(5, "")  # pandas skips it: the CSV line is not row + 2
    path = tmp_path / "planted.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.usefixtures("prefect_server")
def test_the_run_reports_uncertainty_and_agrees_with_statsmodels_at_its_learned_parameters(capsys, tmp_path, readings_csv):
    result = run_json(capsys, tmp_path / "store", readings_csv, "--model", "poly:2", "--predict", "30", "45", "95")
    cal = result["calibration"]
    for field in ("standard_uncertainties", "covariance", "correlation", "residual_sd", "dof", "range"):
        assert field in cal, field
    assert len(cal["standard_uncertainties"]) == len(cal["coefficients"]) == 3
    assert cal["dof"] == result["train_rows"] - 3 == 6
    np.testing.assert_allclose(np.diag(cal["correlation"]), 1.0)

    table = pd.read_csv(readings_csv)
    split = json.loads((Path(result["stages"]["split"]["path"]).parent / "split.json").read_text())
    train = table.iloc[split["train"]]
    assert cal["range"] == [train["reading"].min(), train["reading"].max()]
    ols = sm.OLS(train["celsius"].to_numpy(), np.vander(train["reading"].to_numpy(), 3, increasing=True)).fit()
    # gradient descent's parameters stand in for least squares': s^2 is larger by the relative gap
    gap = result["gap_to_optimum"]
    assert 0 <= gap <= 1e-3
    assert cal["residual_sd"] == pytest.approx(np.sqrt(ols.scale * (1 + gap)), rel=1e-6)
    np.testing.assert_allclose(cal["standard_uncertainties"], ols.bse * np.sqrt(1 + gap), rtol=1e-4)

    frame = ols.get_prediction(np.vander([30.0, 45.0, 95.0], 3, increasing=True)).summary_frame(alpha=0.05)
    rows = result["predictions"]
    assert [set(row) for row in rows] == [{"reading", "celsius", "u_fit", "interval", "extrapolated"}] * 3
    np.testing.assert_allclose([r["u_fit"] for r in rows], frame["mean_se"] * np.sqrt(1 + gap), rtol=1e-4)
    half = [(r["interval"][1] - r["interval"][0]) / 2 for r in rows]
    np.testing.assert_allclose(half, (frame["obs_ci_upper"] - frame["obs_ci_lower"]) / 2 * np.sqrt(1 + gap), rtol=1e-4)
    assert [r["extrapolated"] for r in rows] == [False, False, True]
    assert any("95 outside the calibrated range" in w for w in result["warnings"])

    # the infer stage's per-row table carries the same columns for every reading of the dataset
    predictions = pd.read_csv(Path(result["stages"]["infer"]["path"]).parent / "predictions.csv")
    assert {"u_fit", "interval_low", "interval_high", "extrapolated"} <= set(predictions.columns)
    assert predictions["u_fit"].notna().all() and (predictions["interval_low"] < predictions["fitted"]).all()
    assert predictions.loc[predictions["subset"] == "train", "extrapolated"].sum() == 0

    # the human output: reading -> °C ± U (95 %), and the extrapolation warned about
    code, out, err = run(capsys, "run", "--store", str(tmp_path / "store"), "--data", str(readings_csv), "--model", "poly:2",
                         "--predict", "30", "45", "95")
    assert code == 0, err
    line = next(line for line in out.splitlines() if "reading 95 ->" in line)
    assert f"{rows[2]['celsius']:.4f} °C ± {half[2]:.4f} °C (95 %)" in line and "extrapolated" in line
    assert "warning: reading(s) 95 outside the calibrated range" in out


@pytest.mark.usefixtures("prefect_server")
def test_predict_gives_the_runs_uncertainty_without_torch_or_scipy(capsys, tmp_path, readings_csv):
    result = run_json(capsys, tmp_path / "store", readings_csv, "--model", "poly:3", "--predict", "40", "100")
    script = ("import json, sys; from flows.cli import main; code = main(sys.argv[1:]); "
              "print(json.dumps(sorted(m for m in sys.modules if m in ('torch', 'scipy', 'prefect'))), file=sys.stderr); "
              "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, "predict", "40", "100", "--run", result["run_id"],
                           "--store", str(tmp_path / "store"), "--json"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []
    predicted = json.loads(done.stdout)["predictions"]
    for mine, theirs in zip(predicted, result["predictions"]):
        assert mine["u_fit"] == pytest.approx(theirs["u_fit"], rel=1e-9)
        assert mine["interval"] == pytest.approx(theirs["interval"], rel=1e-9)
        assert mine["extrapolated"] == theirs["extrapolated"]
    assert [p["extrapolated"] for p in predicted] == [False, True]


@pytest.mark.usefixtures("prefect_server")
def test_the_bootstrap_agrees_with_the_formula_for_a_polynomial(capsys, tmp_path, readings_csv):
    readings = [str(r) for r in np.linspace(21.8, 81.9, 6)]
    result = run_json(capsys, tmp_path / "store", readings_csv, "--model", "poly:2", "--bootstrap", "400", "--predict", *readings)
    bootstrap = result["calibration"]["bootstrap"]
    assert bootstrap["replicates"] == 400 and bootstrap["used"] == 400 and bootstrap["method"] == "residual"
    for row in result["predictions"]:
        assert row["u_fit_bootstrap"] == pytest.approx(row["u_fit"], rel=0.15), row
    # the bootstrap is keyed: the same run again is cached, another count recomputes the training
    again = run_json(capsys, tmp_path / "store", readings_csv, "--model", "poly:2", "--bootstrap", "400", "--predict", *readings)
    assert all(stage["cached"] for stage in again["stages"].values())
    other = run_json(capsys, tmp_path / "store", readings_csv, "--model", "poly:2", "--bootstrap", "50", "--predict", *readings)
    assert not other["stages"]["train"]["cached"] and other["calibration"]["bootstrap"]["replicates"] == 50


@pytest.mark.usefixtures("prefect_server")
def test_the_network_gets_its_uncertainty_from_a_bootstrap(capsys, tmp_path, readings_csv):
    result = run_json(capsys, tmp_path / "store", readings_csv, "--model", "mlp:13", "--predict", "30", "60")
    cal = result["calibration"]
    assert cal["uncertainty_method"] == "bootstrap" and cal["bootstrap"]["replicates"] == 100
    assert cal["bootstrap"]["method"] == "pairs" and cal["bootstrap"]["used"] >= 90
    assert cal["standard_uncertainties"] is None and cal["residual_sd"] > 0 and cal["dof"] == result["train_rows"] - 1
    for row in result["predictions"]:
        assert row["u_fit"] > 0 and row["interval"][0] < row["celsius"] < row["interval"][1]
    # the same seed gives the same replicates
    code, out, err = run(capsys, "run", "--json", "--store", str(tmp_path / "other"), "--data", str(readings_csv),
                         "--model", "mlp:13", "--predict", "30", "60")
    assert code == 0, err
    assert json.loads(out)["predictions"] == result["predictions"]


@pytest.mark.usefixtures("prefect_server")
def test_outliers_are_named_by_their_line_and_dropped_only_when_asked(capsys, tmp_path, planted_csv):
    store = tmp_path / "store"
    code, out, err = run(capsys, "run", "--json", "--store", str(store), "--data", str(planted_csv), "--val-fraction", "0")
    assert code == 0, err
    result = json.loads(out)
    assert [o["row"] for o in result["outliers"]] == [21]
    outlier = result["outliers"][0]
    assert set(outlier) == {"row", "reading", "celsius", "residual", "studentized"}
    assert outlier["reading"] == pytest.approx(pd.read_csv(planted_csv)["reading"][18])
    assert outlier["residual"] < -3 and abs(outlier["studentized"]) > 4
    assert any("line 21" in w and "--drop-outliers" in w for w in result["warnings"])
    assert result["train_rows"] == 40 and "dropped_outliers" not in result  # nothing dropped silently
    residuals = pd.read_csv(Path(result["stages"]["validate"]["path"]).parent / "residuals.csv")
    assert len(residuals) == 40 and residuals.loc[residuals["row"] == 21, "studentized"].abs().item() > 4

    dropped = run_json(capsys, store, planted_csv, "--val-fraction", "0", "--drop-outliers")
    assert [o["row"] for o in dropped["dropped_outliers"]] == [21]
    assert dropped["train_rows"] == 39 and dropped["outliers"] == []
    assert abs(dropped["calibration"]["slope"] - 0.4) < abs(result["calibration"]["slope"] - 0.4)
    assert dropped["calibration"]["residual_sd"] < result["calibration"]["residual_sd"] / 2
    infer = pd.read_csv(Path(dropped["stages"]["infer"]["path"]).parent / "predictions.csv")
    assert infer["subset"].tolist().count("excluded") == 1
    names = _task_run_names(manifest(dropped)["flow_run_id"])
    assert {"train", "validate", "train-without-outliers", "validate-without-outliers"} <= names, names


def _task_run_names(flow_run_id: str) -> set[str]:
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return {r.name for r in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)])))}


@pytest.mark.usefixtures("prefect_server")
def test_the_certificate_is_one_page_holding_the_coefficients(capsys, tmp_path, readings_csv):
    from pypdf import PdfReader

    result = run_json(capsys, tmp_path / "store", readings_csv, "--model", "poly:2")
    path = Path(result["certificate"])
    assert path.name == "certificate.pdf" and path.parent == Path(result["stages"]["report"]["path"]).parent
    reader = PdfReader(path)
    assert len(reader.pages) == 1
    text = reader.pages[0].extract_text()
    cal = result["calibration"]
    for value, u in zip(cal["coefficients"], cal["standard_uncertainties"]):
        assert f"{value:.9g}" in text and f"{2 * u:.4g}" in text
    assert result["run_id"] in text and "sha256" in text
    assert json.loads((Path(result["run_dir"]) / "manifest.json").read_text())["data"]["sha256"] in text
    assert f"{cal['range'][0]:g} to {cal['range'][1]:g}" in text
    for row in result["correction_table"]:
        assert f"{row['celsius']:.4f}" in text
    assert len(result["correction_table"]) == 10
    assert result["correction_table"][0]["reading"] == cal["range"][0] and result["correction_table"][-1]["reading"] == cal["range"][1]
    markdown = (path.parent / "report.md").read_text()
    assert "expanded U (k = 2)" in markdown and "Correction table" in markdown


@pytest.mark.parametrize("args, message", [
    (["--bootstrap", "1"], "--bootstrap: must be 0 (no bootstrap) or at least 2"),
    (["--bootstrap", "-3"], "--bootstrap"),
    (["--model", "mlp:4", "--strategy", "optimizer", "--optimizer", "lbfgs"], "give --bootstrap 0"),
    (["--model", "poly:2", "--bootstrap", "20", "--batch-size", "4"], "--batch-size"),
])
def test_bad_uncertainty_options_are_a_users_mistake(capsys, tmp_path, readings_csv, args, message):
    code, out, err = run(capsys, "run", "--store", str(tmp_path / "store"), "--data", str(readings_csv), *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "store").exists()
