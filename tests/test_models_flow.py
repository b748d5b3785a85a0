"""Model families through the real flow and the entry point: JSON fields, caching with --model,
predict from the persisted model, the book's network, the sweep's model column, bad specs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

from tasks.durable import sha256_file
from tests.test_flow import STAGES, manifest, run, run_json, task_states

pytestmark = pytest.mark.usefixtures("prefect_server")
BOOK_NETWORK = ["--val-fraction", "0", "--model", "mlp:13", "--normalize", "scale", "--scale", "0.1",
                "--strategy", "optimizer", "--optimizer", "sgd", "--lr", "1e-3", "--epochs", "5000"]


def test_the_line_keeps_its_fields_and_gains_the_new_ones(capsys, tmp_path, readings_csv):
    result = run_json(capsys, tmp_path / "store", readings_csv)
    model, cal = result["model"], result["calibration"]
    assert model["spec"] == "linear" and model["parameters"] == {"w": model["w"], "b": model["b"]}
    assert cal["kind"] == "linear" and cal["coefficients"] == [cal["intercept"], cal["slope"]]
    assert {"optimum", "gap_to_optimum", "converged", "train_loss", "val_loss", "epochs_run", "stopped_by"} <= set(result)
    assert result["optimum"]["slope"] == pytest.approx(cal["slope"], rel=1e-6)


@pytest.mark.parametrize("spec", ["poly:1", "poly:2", "poly:3", "poly:5"])
def test_polynomials_report_raw_coefficients_and_reach_the_optimum(capsys, tmp_path, readings_csv, spec):
    result = run_json(capsys, tmp_path / "store", readings_csv, "--model", spec, "--predict", "30", "70.5")
    degree = int(spec.split(":")[1])
    assert result["model"]["spec"] == spec and len(result["model"]["parameters"]["c"]) == degree + 1
    cal = result["calibration"]
    assert cal["kind"] == "poly" and len(cal["coefficients"]) == degree + 1 and "slope" not in cal
    assert result["converged"] and result["gap_to_optimum"] <= 1e-6
    for row in result["predictions"]:  # °C = sum(c_i × reading^i)
        assert row["celsius"] == pytest.approx(np.polynomial.polynomial.polyval(row["reading"], cal["coefficients"]), abs=1e-9)


def test_the_quadratic_exercise_through_the_entry_point(capsys, tmp_path, readings_csv):
    result = run_json(capsys, tmp_path / "store", readings_csv, "--model", "poly:2", "--val-fraction", "0")
    table = pd.read_csv(readings_csv)
    reference = np.polyval(np.polyfit(table["reading"], table["celsius"], 2), table["reading"])
    fitted = np.polynomial.polynomial.polyval(table["reading"], result["calibration"]["coefficients"])
    np.testing.assert_allclose(fitted, reference, rtol=1e-4)
    predictions = pd.read_csv(Path(result["stages"]["infer"]["path"]).parent / "predictions.csv")
    np.testing.assert_allclose(predictions["fitted"], reference, rtol=1e-4)


def test_the_books_network(capsys, tmp_path, readings_csv):
    result = run_json(capsys, tmp_path / "store", readings_csv, *BOOK_NETWORK, "--predict", "45")
    assert result["model"]["spec"] == "mlp:13"
    assert set(result["model"]["parameters"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert np.array(result["model"]["parameters"]["0.weight"]).shape == (13, 1)
    assert result["train_loss"] < 2.927646  # below the line's least-squares optimum
    assert result["gap_to_optimum"] is None and result["optimum"] is None and result["converged"] is None
    assert result["baselines"]["poly:1"] == pytest.approx(2.927646, abs=1e-6)
    cal = result["calibration"]
    assert cal["kind"] == "mlp" and cal["coefficients"] is None and len(cal["table"]) == 10
    assert cal["table"][0]["reading"] == pytest.approx(21.8) and cal["table"][-1]["reading"] == pytest.approx(81.9)
    report = Path(result["report"])
    assert report.read_bytes()[:4] == b"\x89PNG"
    markdown = (report.parent / "report.md").read_text()
    assert "mlp:13" in markdown and "best poly:1" in markdown and "| reading | °C |" in markdown
    code, out, _ = run(capsys, "run", "--store", str(tmp_path / "store"), "--data", str(readings_csv), *BOOK_NETWORK)
    assert code == 0 and "°C at readings across the calibrated range 21.8 to 81.9" in out and "best polynomials" in out


def test_changing_the_model_recomputes_training_and_what_follows_only(capsys, tmp_path, readings_csv):
    store = tmp_path / "store"
    run_json(capsys, store, readings_csv)
    poly = run_json(capsys, store, readings_csv, "--model", "poly:3")
    states = task_states(manifest(poly)["flow_run_id"])
    assert {n: states[n] for n in ("ingest", "normalize", "split")} == dict.fromkeys(("ingest", "normalize", "split"), "Cached")
    assert {n: states[n] for n in ("train", "validate", "infer", "report")} == dict.fromkeys(("train", "validate", "infer", "report"), "Completed")
    again = run_json(capsys, store, readings_csv, "--model", "poly:3")
    assert task_states(manifest(again)["flow_run_id"]) == dict.fromkeys(STAGES, "Cached")
    assert manifest(again)["stages"]["train"]["key"] == manifest(poly)["stages"]["train"]["key"]
    linear = run_json(capsys, store, readings_csv)
    assert manifest(linear)["stages"]["train"]["key"] != manifest(poly)["stages"]["train"]["key"]


@pytest.mark.parametrize("spec", ["linear", "poly:3", "mlp:4"])
def test_predict_uses_the_persisted_model_and_agrees_with_the_infer_stage(capsys, tmp_path, readings_csv, spec):
    store = tmp_path / "store"
    readings = ["20", "45.5", "90"]
    result = run_json(capsys, store, readings_csv, "--model", spec, "--epochs", "300", "--predict", *readings)
    infer = joblib.load(result["stages"]["infer"]["path"])["new"]
    code, out, err = run(capsys, "predict", *readings, "--store", str(store), "--json")
    assert code == 0, err
    predicted = json.loads(out)["predictions"]
    assert [r["reading"] for r in predicted] == [float(r) for r in readings]
    np.testing.assert_allclose([r["celsius"] for r in predicted], infer["celsius"], rtol=0, atol=1e-9)
    np.testing.assert_allclose([r["celsius"] for r in result["predictions"]], infer["celsius"], rtol=0, atol=1e-9)
    code, out, _ = run(capsys, "predict", "45.5", "--store", str(store))
    assert code == 0 and f"({spec})" in out and f"45.5 -> {infer['celsius'][1]:.4f} °C" in out


@pytest.mark.parametrize("spec, what", [("poly:0", "the degree K of poly:K must be 1..5 (got 'poly:0')"),
                                        ("poly:9", "the degree K of poly:K must be 1..5 (got 'poly:9')"),
                                        ("mlp:x", "unknown model 'mlp:x'"), ("cubic", "unknown model 'cubic' (did you mean poly:3?)")])
def test_a_bad_model_spec_exits_2_listing_the_valid_forms(capsys, tmp_path, readings_csv, spec, what):
    code, out, err = run(capsys, "run", "--store", str(tmp_path / "s"), "--data", str(readings_csv), "--model", spec)
    assert code == 2 and out == ""
    assert f"--model: {what}" in err and "linear; poly:K with K = 1..5" in err and "mlp:H with H = 1..256" in err
    assert err.count(repr(spec)) == 1  # the value is quoted once
    assert "Traceback" not in err and not (tmp_path / "s").exists()


def test_a_degree_the_training_rows_cannot_determine_exits_2(capsys, tmp_path):
    few = tmp_path / "few.csv"
    few.write_text("reading,celsius\n1,2\n2,4\n2,4.1\n3,6\n3,6.2\n")
    code, out, err = run(capsys, "run", "--store", str(tmp_path / "s"), "--data", str(few), "--model", "poly:4", "--val-fraction", "0")
    assert code == 2 and out == "" and "poly:4 has 5 coefficients" in err and "Traceback" not in err


def test_the_network_gives_byte_identical_stage_files_in_another_process(capsys, tmp_path, readings_csv):
    from prefect.settings import PREFECT_API_URL

    options = ["--model", "mlp:13", "--epochs", "400"]
    mine = run_json(capsys, tmp_path / "here", readings_csv, *options)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    other = subprocess.run([sys.executable, "-m", "flows", "run", "--json", "--store", str(tmp_path / "there"), "--data", str(readings_csv),
                            *options], capture_output=True, text=True, env=env, timeout=300)
    assert other.returncode == 0, other.stderr
    theirs = json.loads(other.stdout)
    for stage in ("train", "validate", "infer"):
        assert sha256_file(Path(theirs["stages"][stage]["path"])) == sha256_file(Path(mine["stages"][stage]["path"]))


def test_a_sweep_over_models_shows_the_model_per_row(capsys, tmp_path, readings_csv):
    store = tmp_path / "store"
    code, out, err = run(capsys, "sweep", "--json", "--data", str(readings_csv), "--store", str(store),
                         "--models", "linear,poly:2,Poly:3,mlp:13", "--strategies", "analytic,autograd", "--lrs", "0.01")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["model"], r["strategy"]) for r in rows] == [(m, s) for m in ("linear", "poly:2", "poly:3", "mlp:13") for s in ("analytic", "autograd")]
    assert all(r["status"] == "ok" and r["val_loss"] is not None for r in rows)
    assert all(r["gap_to_optimum"] is None for r in rows if r["model"] == "mlp:13")
    folder = next((store / "sweeps").iterdir())
    table = pd.read_csv(folder / "comparison.csv")
    assert list(table["model"]) == [r["model"] for r in rows] and "val_loss" in table
    assert (folder / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    code, out, _ = run(capsys, "sweep", "--data", str(readings_csv), "--store", str(store), "--models", "linear,cubic")
    assert code == 2 and "valid forms" in out + _
