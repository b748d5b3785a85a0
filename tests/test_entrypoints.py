"""The installed entry points in fresh processes: a cold ephemeral Prefect, a given server, no tracebacks."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _env(prefect_home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(prefect_home), **extra}


def test_console_script_is_installed():
    out = subprocess.run([str(BIN / "thermocal"), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for command in ("run", "predict", "runs"):
        assert command in out.stdout


def test_cold_ephemeral_run_then_bad_data_then_predict(tmp_path, readings_csv):
    # A fresh PREFECT_HOME migrates a new database (22-29 s here); the CLI raises the startup
    # timeout itself, so nothing about it is set in this environment.
    env = _env(tmp_path / "prefect-home")
    store = tmp_path / "store"
    cold = subprocess.run(
        [sys.executable, "-m", "flows", "run", "--json", "--store", str(store), "--data", str(readings_csv), "--epochs", "200"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert cold.returncode == 0, cold.stderr
    result = json.loads(cold.stdout)
    assert {"run_id", "run_dir", "model", "calibration", "train_loss", "val_loss", "epochs_run", "stages"} <= set(result)
    assert set(result["stages"]) >= {"ingest", "normalize", "split", "train", "validate", "infer"}
    assert all(set(stage) == {"path", "cached", "seconds"} and Path(stage["path"]).is_file() for stage in result["stages"].values())
    assert {"train_seconds", "gap_to_optimum", "converged", "stopped_by"} <= set(result)

    bad = tmp_path / "bad.csv"
    bad.write_text("reading,celsius\n1,2\n")
    failed = subprocess.run(
        [str(BIN / "thermocal"), "run", "--store", str(store), "--data", str(bad)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert failed.returncode == 2 and failed.stdout == ""
    assert "1 row(s) of readings; at least 5 needed" in failed.stderr
    assert "Traceback" not in failed.stderr

    predicted = subprocess.run(
        [str(BIN / "thermocal"), "predict", "45.0", "60.2", "--json", "--store", str(store)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert predicted.returncode == 0, predicted.stderr
    cal = result["calibration"]
    for row in json.loads(predicted.stdout)["predictions"]:
        assert row["celsius"] == pytest.approx(cal["slope"] * row["reading"] + cal["intercept"], abs=1e-4)


@pytest.mark.usefixtures("prefect_server")
def test_a_run_goes_to_the_server_named_by_prefect_api_url(tmp_path, readings_csv):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    # THERMOCAL_SERVER=local (the default outside tests): PREFECT_API_URL still wins over the local server
    env = _env(tmp_path / "prefect-home", PREFECT_API_URL=PREFECT_API_URL.value(), THERMOCAL_SERVER="local")
    out = subprocess.run(
        [str(BIN / "thermocal"), "run", "--json", "--store", str(tmp_path / "store"), "--data", str(readings_csv), "--epochs", "100"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Starting temporary server" not in out.stderr and "local Prefect server" not in out.stderr
    assert not list((tmp_path / "prefect-home").glob("thermocal-server-*"))
    manifest = json.loads((Path(json.loads(out.stdout)["run_dir"]) / "manifest.json").read_text())
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(uuid.UUID(manifest["flow_run_id"]))
    assert flow_run.state.is_completed()
