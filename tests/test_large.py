"""Synthetic readings, and a moderately large file through the real flow."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.cli import main
from tasks.durable import sha256_file
from tasks.model import least_squares
from tasks.synth import HIDDEN_INTERCEPT, HIDDEN_SLOPE, write_synthetic
from tests.test_flow import run_json


def test_synth_writes_a_hidden_calibration_plus_noise(tmp_path):
    written = write_synthetic(tmp_path / "a.csv", 50_000, seed=3)
    table = pd.read_csv(tmp_path / "a.csv")
    assert list(table.columns) == ["reading", "celsius"] and len(table) == 50_000
    assert written["rows"] == 50_000 and written["dropouts_kept_out"] >= 0
    assert np.isfinite(table.to_numpy()).all()
    slope, intercept, mse = least_squares(table["reading"].to_numpy(), table["celsius"].to_numpy())
    assert slope == pytest.approx(HIDDEN_SLOPE, rel=2e-3)
    assert intercept == pytest.approx(HIDDEN_INTERCEPT, abs=0.1)
    assert mse == pytest.approx(1.7**2, rel=0.05)


def test_synth_is_seeded(tmp_path):
    write_synthetic(tmp_path / "a.csv", 3000, seed=1)
    write_synthetic(tmp_path / "b.csv", 3000, seed=1)
    write_synthetic(tmp_path / "c.csv", 3000, seed=2)
    assert sha256_file(tmp_path / "a.csv") == sha256_file(tmp_path / "b.csv") != sha256_file(tmp_path / "c.csv")


def test_synth_command(capsys, tmp_path):
    assert main(["synth", "--rows", "1200", "--out", str(tmp_path / "s.csv"), "--seed", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 1200
    assert len(pd.read_csv(tmp_path / "s.csv")) == 1200
    assert main(["synth", "--rows", "0", "--out", str(tmp_path / "z.csv")]) == 2


@pytest.mark.usefixtures("prefect_server")
def test_a_moderately_large_file_through_the_flow(capsys, tmp_path):
    data = tmp_path / "large.csv"
    write_synthetic(data, 300_000, seed=7)
    result = run_json(capsys, tmp_path / "store", data, "--predict", "60")
    assert result["converged"] and result["gap_to_optimum"] < 1e-6 and result["stopped_by"] == "tol"
    assert result["calibration"]["slope"] == pytest.approx(HIDDEN_SLOPE, rel=5e-3)
    ingest_dir = Path(result["stages"]["ingest"]["path"]).parent
    # past READABLE_ROWS, no CSV copies of big tables: only the joblib data
    assert not (ingest_dir / "readings.csv").exists()
    assert not (Path(result["stages"]["infer"]["path"]).parent / "predictions.csv").exists()
    sizes = {name: Path(stage["path"]).stat().st_size for name, stage in result["stages"].items()}
    table_bytes = 300_000 * 2 * 8
    assert sizes["ingest"] < 1.2 * table_bytes  # the table once, not copies of copies
    assert sizes["normalize"] < 0.7 * table_bytes and sizes["split"] < 0.7 * table_bytes
    # per reading, float32 fitted, residual, u_fit and interval bounds, a subset code and a flag: 22 bytes to the table's 16
    assert sizes["infer"] < 1.5 * table_bytes
    # per training row its index, residual and studentized residual: 12 bytes
    assert sizes["train"] < 1_000_000 and sizes["validate"] < 0.7 * table_bytes
