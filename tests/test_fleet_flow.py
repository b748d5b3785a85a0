"""Fleets through the real flow (test harness, temporary PREFECT_HOME), driven through the entry point:
per-sensor calibrations equal single-sensor runs, failed sensors, partitions cached one by one,
predict --sensor, the sensors command, drift and its events read back through Prefect's API."""

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.test_flow import manifest, run, run_json

pytestmark = pytest.mark.usefixtures("prefect_server")

FLEET = ["--sensor-column", "sensor", "--partition-size", "2"]


def fleet_frame(seed: int = 3) -> pd.DataFrame:
    """Five good sensors with their own line, noise and row counts, one with too few rows, one stuck."""
    rng = np.random.default_rng(seed)
    parts = []
    for i, rows in enumerate((40, 25, 61, 33, 18)):
        reading = rng.uniform(20, 90, rows).round(2)
        celsius = (0.5 + 0.02 * i) * reading - 17 + i + rng.normal(0, 0.5 + 0.2 * i, rows)
        parts.append(pd.DataFrame({"sensor": f"s{i:02d}", "reading": reading, "celsius": celsius.round(3)}))
    parts.append(pd.DataFrame({"sensor": "short", "reading": [30.0, 40.0], "celsius": [1.0, 2.0]}))
    parts.append(pd.DataFrame({"sensor": "stuck", "reading": [55.5] * 12, "celsius": rng.normal(10, 1, 12).round(3)}))
    frame = pd.concat(parts, ignore_index=True)
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # sensors interleaved, as a logger writes them


@pytest.fixture
def fleet_csv(tmp_path) -> Path:
    path = tmp_path / "fleet.csv"
    fleet_frame().to_csv(path, index=False)
    return path


def _task_runs(flow_run_id: str, expected: int, timeout: float = 30.0) -> dict[str, str]:
    """Every task run of the flow run by name, with its final state, read back from the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)])))
            final = {r.name: r.state.name for r in runs if r.state is not None and r.state.is_final()}
            if len(final) >= expected or time.monotonic() > deadline:
                return final
            time.sleep(0.2)


def test_fleet_run_calibrates_each_sensor_as_its_own_run_would(capsys, tmp_path, fleet_csv):
    result = run_json(capsys, tmp_path / "store", fleet_csv, *FLEET)
    assert result["fleet"]["sensors"] == 7 and result["fleet"]["calibrated"] == 5 and result["fleet"]["failed"] == 2
    assert result["fleet"]["partitions"] == {"total": 4, "computed": 4, "cached": 0}
    reasons = {f["sensor"]: f["reason"] for f in result["sensors_failed"]}
    assert set(reasons) == {"short", "stuck"}
    assert "2 row(s)" in reasons["short"] and "55.5" in reasons["stuck"]
    table = pd.read_csv(result["sensors_table"])
    assert list(table["sensor"]) == ["s00", "s01", "s02", "s03", "s04", "short", "stuck"]
    assert Path(result["report"]).is_file() and result["drift"] == [] and result["drift_baseline"] is None

    # the same sensor alone, as a single-sensor run of its rows in file order
    code, out, err = run(capsys, "sensors", "--store", str(tmp_path / "store"), "--json")
    assert code == 0, err
    by_sensor = {row["sensor"]: row for row in json.loads(out)}
    assert set(by_sensor["s02"]) >= {"sensor", "model", "coefficients", "standard_uncertainties", "train_loss", "val_loss",
                                     "gap_to_optimum", "epochs_run", "status"}
    frame = pd.read_csv(fleet_csv, dtype={"sensor": str})
    for sensor in ("s02", "s04"):
        alone = tmp_path / f"{sensor}.csv"
        frame[frame["sensor"] == sensor][["reading", "celsius"]].to_csv(alone, index=False)
        single = run_json(capsys, tmp_path / "single", alone)
        mine = by_sensor[sensor]
        assert mine["status"] == "calibrated" and mine["epochs_run"] == single["epochs_run"]
        np.testing.assert_allclose(mine["coefficients"], single["calibration"]["coefficients"], rtol=2e-5, atol=1e-5)
        np.testing.assert_allclose(mine["standard_uncertainties"], single["calibration"]["standard_uncertainties"], rtol=1e-4)
        np.testing.assert_allclose([mine["train_loss"], mine["val_loss"]], [single["train_loss"], single["val_loss"]], rtol=1e-4)
        assert mine["gap_to_optimum"] <= 1e-3

    # predict --sensor: that sensor's calibration, as its coefficients give it
    code, out, err = run(capsys, "predict", "--store", str(tmp_path / "store"), "--sensor", "s02", "50", "--json")
    assert code == 0, err
    answer = json.loads(out)
    c0, c1 = by_sensor["s02"]["coefficients"]
    assert answer["sensor"] == "s02" and answer["predictions"][0]["celsius"] == pytest.approx(c0 + 50 * c1, rel=1e-5)
    assert answer["predictions"][0]["interval"] is not None
    code, out, err = run(capsys, "predict", "--store", str(tmp_path / "store"), "--sensor", "stuck", "50")
    assert code == 2 and "could not be calibrated" in err and "55.5" in err
    code, out, err = run(capsys, "predict", "--store", str(tmp_path / "store"), "50")
    assert code == 2 and "--sensor" in err

    code, out, err = run(capsys, "sensors", "--store", str(tmp_path / "store"))
    assert code == 0 and "7 sensors, 5 calibrated, 2 failed" in out and "failed stuck" in out


def test_new_readings_for_one_sensor_recompute_its_partition_only(capsys, tmp_path, fleet_csv):
    store = tmp_path / "store"
    first = run_json(capsys, store, fleet_csv, *FLEET)
    with open(fleet_csv, "a") as handle:
        handle.write("s03,61.5,18.2\ns03,44.0,9.1\n")
    second = run_json(capsys, store, fleet_csv, *FLEET)
    assert second["fleet"]["partitions"] == {"total": 4, "computed": 1, "cached": 3}
    states = _task_runs(manifest(second)["flow_run_id"], expected=4 * 3 + 3)
    partition_of = {}
    for name, state in states.items():
        if "[" in name:
            partition_of.setdefault(name.split("[")[1].rstrip("]"), set()).add(state)
    assert len(partition_of) == 4
    recomputed = [p for p, found in partition_of.items() if found == {"Completed"}]
    assert len(recomputed) == 1 and all(found == {"Cached"} for p, found in partition_of.items() if p not in recomputed)
    # and s03 moved little: no drift at the default threshold
    assert second["drift_baseline"] == first["run_id"] and second["drift"] == []
    # the UI's fleet table (worst first), its progress (4 of 4 partitions) and the report with the plot
    artifacts = _artifacts(manifest(second)["flow_run_id"])
    table = json.loads(artifacts["thermocal-fleet"].data)
    assert [row["sensor"] for row in table] == [w["sensor"] for w in second["worst_sensors"]][: len(table)]
    assert [row["residual_sd"] for row in table] == sorted((row["residual_sd"] for row in table), reverse=True)
    assert artifacts["thermocal-fleet-progress"].data == 100.0
    assert "data:image/png;base64," in artifacts["thermocal-fleet-report"].data


def _artifacts(flow_run_id: str) -> dict:
    """The flow run's artifacts by key, read back from the API (the latest of each key)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])))
    return {a.key: a for a in sorted(found, key=lambda a: a.created)}


def _drift_events(sensor: str, deadline: float) -> list[dict]:
    from prefect.client.orchestration import get_client

    body = {"filter": {"event": {"name": ["thermocal.calibration.drifted"]}, "resource": {"id": [f"thermocal.sensor.{sensor}"]},
                       "any_resource": None}, "limit": 50}
    body["filter"].pop("any_resource")
    with get_client(sync_client=True) as client:
        while True:
            response = client.request("POST", "/events/filter", json=body)
            response.raise_for_status()
            events = response.json()["events"]
            if events or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


def test_a_recalibrated_sensor_that_moved_is_reported_and_announced(capsys, tmp_path, fleet_csv):
    store = tmp_path / "store"
    first = run_json(capsys, store, fleet_csv, *FLEET)
    frame = pd.read_csv(fleet_csv, dtype={"sensor": str})
    frame.loc[frame["sensor"] == "s01", "celsius"] += 2.0  # s01 now reads 2 °C differently
    frame.to_csv(fleet_csv, index=False)
    second = run_json(capsys, store, fleet_csv, *FLEET)
    assert second["drift_baseline"] == first["run_id"]
    assert [d["sensor"] for d in second["drift"]] == ["s01"]
    assert second["drift"][0]["max_delta_celsius"] == pytest.approx(2.0, rel=1e-3)
    events = _drift_events("s01", time.monotonic() + 30)
    assert events, "no thermocal.calibration.drifted event for s01"
    assert events[0]["resource"]["prefect.resource.id"] == "thermocal.sensor.s01"
    assert float(events[0]["payload"]["max_delta_celsius"]) == pytest.approx(2.0, rel=1e-3)
    # --baseline names the run to compare with; a threshold above the change reports nothing
    third = run_json(capsys, store, fleet_csv, *FLEET, "--baseline", first["run_id"], "--drift-threshold", "2.5")
    assert third["drift_baseline"] == first["run_id"] and third["drift"] == []


def test_a_single_sensor_run_is_checked_for_drift_too(capsys, tmp_path, readings_csv):
    store = tmp_path / "store"
    first = run_json(capsys, store, readings_csv)
    frame = pd.read_csv(readings_csv)
    frame.iloc[:, 1] += 1.0
    frame.to_csv(readings_csv, index=False)
    second = run_json(capsys, store, readings_csv)
    assert second["drift_baseline"] == first["run_id"]
    assert len(second["drift"]) == 1 and second["drift"][0]["sensor"] == "readings"
    assert second["drift"][0]["max_delta_celsius"] == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("cell, what", [("", "empty"), ("x" * 65, "65 characters")])
def test_bad_sensor_ids_fail_the_run_naming_the_lines(capsys, tmp_path, fleet_csv, cell, what):
    frame = pd.read_csv(fleet_csv, dtype={"sensor": str}, keep_default_na=False)
    frame.loc[[4, 9], "sensor"] = cell
    frame.to_csv(fleet_csv, index=False)
    code, out, err = run(capsys, "run", "--store", str(tmp_path / "store"), "--data", str(fleet_csv), *FLEET)
    assert code == 2, err
    assert "sensor" in err and "6" in err and "11" in err and "Traceback" not in err
    assert not (tmp_path / "store").exists()


def _partition_outputs(result: dict) -> dict[str, str]:
    """The content hash of each partition's train, validate and infer output, and of the fleet's tables."""
    found = manifest(result)
    report = Path(result["sensors_table"]).parent
    from tasks.durable import sha256_file

    hashes = {name: sha256_file(report / name) for name in ("sensors.csv", "sensors.joblib", "calibrations.joblib")}
    for partition in found["partitions"]:
        for stage in ("train", "validate", "infer"):
            hashes[f"{partition['name']}/{stage}"] = sha256_file(Path(result["run_dir"]).parent / partition[stage])
    return hashes


def test_a_real_dask_cluster_gives_byte_identical_sensors(capsys, tmp_path, fleet_csv, dask_cluster, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # the workers report to the same server
    threaded = run_json(capsys, tmp_path / "threads", fleet_csv, *FLEET)
    on_dask = run_json(capsys, tmp_path / "dask", fleet_csv, *FLEET, "--dask-address", dask_cluster.address)
    assert on_dask["fleet"] == threaded["fleet"]
    assert _partition_outputs(on_dask) == _partition_outputs(threaded)
    states = _task_runs(manifest(on_dask)["flow_run_id"], expected=4 * 3 + 3)
    assert sum(1 for name, state in states.items() if name.startswith("train[") and state == "Completed") == 4


def test_a_fleet_sweep_compares_combinations_over_every_sensor(capsys, tmp_path, fleet_csv):
    code, out, err = run(capsys, "sweep", "--json", "--store", str(tmp_path / "store"), "--data", str(fleet_csv), *FLEET,
                         "--models", "linear,poly:2")
    assert code == 0, err
    rows = json.loads(out)
    assert [row["model"] for row in rows] == ["linear", "poly:2"] and all(row["status"] == "ok" for row in rows)
    for row in rows:
        table = pd.read_csv(row["train_path"])
        calibrated = table[table["status"] == "calibrated"]
        assert len(calibrated) == 5 and row["val_loss"] == pytest.approx(calibrated["val_loss"].median())
        assert row["gap_to_optimum"] == pytest.approx(calibrated["gap_to_optimum"].max()) and row["gap_to_optimum"] <= 1e-3
