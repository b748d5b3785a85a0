"""The real flow through Prefect (test harness, temporary PREFECT_HOME), driven through the entry point."""

import json
import logging
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.cli import main
from tasks.durable import sha256_file
from tests.conftest import SHIPPED_DATA

pytestmark = pytest.mark.usefixtures("prefect_server")

STAGES = ["ingest", "normalize", "split", "train", "validate", "infer", "report"]
SEED_CONFIG = ["--normalize", "scale", "--scale", "0.1", "--lr", "1e-2", "--epochs", "5000", "--val-fraction", "0"]


def _prefect_console_to(stream) -> None:
    """Prefect's console handler keeps the stderr it first saw; point it at this test's captured one."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in list(logging.root.manager.loggerDict):
        for handler in getattr(logging.getLogger(name), "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.stream = handler.console.file = stream


def run(capsys, *args: str) -> tuple[int, str, str]:
    """main(args) in this process, with its exit code, stdout and stderr (Prefect's logs included)."""
    _prefect_console_to(sys.stderr)
    try:
        code = main(list(args))
    finally:
        _prefect_console_to(sys.__stderr__)  # capsys closes its stream after the test
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, store: Path, data: Path, *args: str) -> dict:
    code, out, err = run(capsys, "run", "--json", "--store", str(store), "--data", str(data), *args)
    assert code == 0, err
    return json.loads(out)


def task_states(flow_run_id: str, timeout: float = 30.0) -> dict[str, str]:
    """Each stage's final state name, read back from the Prefect API.

    Task-run states reach the server as events, a moment after the flow returns: read until every
    stage has a final one."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = [r for r in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)])))
                    if r.name in STAGES]
            complete = {r.name for r in runs} >= set(STAGES) and all(r.state is not None and r.state.is_final() for r in runs)
            if complete or time.monotonic() > deadline:
                return {r.name: r.state.name if r.state else None for r in runs}
            time.sleep(0.2)


def snapshot(store: Path) -> dict | None:
    """Every file and folder below the store, files with their content hash; None when there is no store."""
    if not store.exists():
        return None
    return {str(p.relative_to(store)): sha256_file(p) if p.is_file() else "dir" for p in store.rglob("*")}


def manifest(result: dict) -> dict:
    return json.loads((Path(result["run_dir"]) / "manifest.json").read_text())


@pytest.mark.parametrize("strategy", ["analytic", "autograd", "finite-difference", "optimizer"])
def test_seed_configuration_through_the_entry_point(capsys, tmp_path, readings_csv, strategy):
    result = run_json(capsys, tmp_path / "store", readings_csv, *SEED_CONFIG, "--strategy", strategy, "--optimizer", "sgd", "--delta", "0.1")
    assert result["model"]["w"] == pytest.approx(5.3671, abs=1e-4)
    assert result["model"]["b"] == pytest.approx(-17.3012, abs=1e-4)
    assert result["train_loss"] == pytest.approx(2.927648, abs=1e-5)
    assert result["val_loss"] is None and result["epochs_run"] == 5000
    # the calibration is reported in raw units: °C = (0.1 w) × reading + b
    assert result["calibration"]["slope"] == pytest.approx(0.1 * result["model"]["w"], rel=1e-6)
    assert result["calibration"]["intercept"] == pytest.approx(result["model"]["b"], rel=1e-6)


def test_adam_on_raw_readings_through_the_entry_point(capsys, tmp_path, readings_csv):
    result = run_json(capsys, tmp_path / "store", readings_csv, "--strategy", "optimizer", "--optimizer", "Adam",
                      "--lr", "1e-1", "--normalize", "none", "--epochs", "5000", "--val-fraction", "0")
    assert result["train_loss"] == pytest.approx(2.92765, abs=1e-4)
    assert result["calibration"]["slope"] == pytest.approx(0.5368, abs=1e-3)


def test_divergence_stops_the_run_without_a_model(capsys, tmp_path, readings_csv):
    store = tmp_path / "store"
    code, out, err = run(capsys, "run", "--store", str(store), "--data", str(readings_csv), "--normalize", "none", "--lr", "1e-2")
    assert code == 3 and out == ""
    assert "diverged at epoch" in err and "stable only below lr" in err and "--normalize standard" in err and "Traceback" not in err
    assert not (store / "stages" / "04_train").exists()
    assert not [p for p in store.iterdir() if p.name[0].isdigit()]  # no run manifest


def test_default_run_reaches_the_least_squares_optimum(capsys, tmp_path, readings_csv):
    result = run_json(capsys, tmp_path / "store", readings_csv, "--predict", "45.0", "60.2")
    split = json.loads((Path(result["stages"]["split"]["path"]).parent / "split.json").read_text())
    table = pd.read_csv(readings_csv)
    train = table.iloc[split["train"]]
    slope, intercept = np.polyfit(train["reading"], train["celsius"], 1)
    optimum = float(np.mean((slope * train["reading"] + intercept - train["celsius"]) ** 2))
    assert result["train_loss"] == pytest.approx(optimum, rel=1e-3)
    assert result["optimum"]["train_loss"] == pytest.approx(optimum, rel=1e-9)
    assert result["val_loss"] is not None and len(split["validation"]) == 2
    assert [p["reading"] for p in result["predictions"]] == [45.0, 60.2]
    for p in result["predictions"]:
        assert p["celsius"] == pytest.approx(result["calibration"]["slope"] * p["reading"] + result["calibration"]["intercept"], abs=1e-4)


def test_all_readings_default_run_reaches_the_reference_optimum(capsys, tmp_path, readings_csv):
    result = run_json(capsys, tmp_path / "store", readings_csv, "--val-fraction", "0")
    assert result["train_loss"] == pytest.approx(2.927646, rel=1e-3)


def test_every_stage_persists_and_the_manifest_records_it(capsys, tmp_path, readings_csv):
    import joblib

    result = run_json(capsys, tmp_path / "store", readings_csv)
    assert set(result["stages"]) == set(STAGES)
    m = manifest(result)
    assert m["data"]["sha256"] == sha256_file(readings_csv)
    assert m["parameters"]["strategy"] == "analytic" and m["parameters"]["lr"] is None
    assert m["effective"] == {"lr": 0.5, "epochs": 5000, "tol": 1e-6}  # what the defaults resolved to
    assert {"python", "torch", "prefect", "pandera", "joblib"} <= set(m["libraries"])
    assert m["code"]["sha256"]
    for name in STAGES:
        path = Path(result["stages"][name]["path"])
        assert path.name == f"{name}.{'npy' if name == 'ingest' else 'joblib'}" and path.parent.parent.name.endswith(name)
        assert sha256_file(path) == m["stages"][name]["sha256"]
        if name != "ingest":
            joblib.load(path)  # every other stage file is data joblib can open
    # the ingested table is a plain array, no pickle: the file's readings and °C, one column each
    table = np.load(result["stages"]["ingest"]["path"], allow_pickle=False)
    assert table.dtype == np.float64 and table.flags.f_contiguous
    np.testing.assert_array_equal(table, pd.read_csv(readings_csv)[["reading", "celsius"]].to_numpy())
    trained = joblib.load(result["stages"]["train"]["path"])
    assert {k: float(v) for k, v in trained["model"]["parameters"].items()} == result["model"]["parameters"]
    assert len(trained["history"]["train_loss"]) == len(trained["history"]["val_loss"]) == result["epochs_run"]
    assert trained["stopped_by"] == result["stopped_by"] == "tol" and result["epochs_run"] < 100
    png = Path(result["report"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    predictions = pd.read_csv(Path(result["stages"]["infer"]["path"]).parent / "predictions.csv")
    assert len(predictions) == 11 and set(predictions["subset"]) == {"train", "validation"}
    np.testing.assert_allclose(predictions["residual"], predictions["fitted"] - predictions["celsius"], atol=1e-5)  # float32


def test_caching_across_runs(capsys, tmp_path, readings_csv):
    store = tmp_path / "store"
    first = run_json(capsys, store, readings_csv)
    assert not any(s["cached"] for s in first["stages"].values())
    assert set(task_states(manifest(first)["flow_run_id"]).values()) == {"Completed"}

    # the same data, parameters and code: every stage comes back Cached, loaded from the store
    again = run_json(capsys, store, readings_csv)
    states = task_states(manifest(again)["flow_run_id"])
    assert states == {name: "Cached" for name in STAGES}
    assert {k: v["path"] for k, v in again["stages"].items()} == {k: v["path"] for k, v in first["stages"].items()}
    assert again["calibration"] == first["calibration"]

    # only --lr changed: train and what follows recompute, ingest/normalize/split do not
    lr = run_json(capsys, store, readings_csv, "--lr", "0.02")
    states = task_states(manifest(lr)["flow_run_id"])
    assert {n: states[n] for n in ("ingest", "normalize", "split")} == {n: "Cached" for n in ("ingest", "normalize", "split")}
    assert {n: states[n] for n in ("train", "validate", "infer", "report")} == {n: "Completed" for n in ("train", "validate", "infer", "report")}

    # the data file's content changed: everything recomputes
    readings_csv.write_text(readings_csv.read_text().replace("68.4,21.0", "68.4,21.5"))
    changed = run_json(capsys, store, readings_csv)
    assert task_states(manifest(changed)["flow_run_id"]) == {name: "Completed" for name in STAGES}

    # a stage file that went missing is recomputed, not trusted
    train_file = Path(changed["stages"]["train"]["path"])
    train_file.unlink()
    healed = run_json(capsys, store, readings_csv)
    states = task_states(manifest(healed)["flow_run_id"])
    assert states["train"] == "Completed" and states["ingest"] == "Cached"
    assert sha256_file(train_file) == manifest(healed)["stages"]["train"]["sha256"]


def test_bad_data_exits_2_and_persists_nothing(capsys, tmp_path, readings_csv):
    bad = tmp_path / "bad.csv"
    bad.write_text("reading,celsius\n35.7,0.5\n55.9,hot\n58.2,-400\n81.9,28.0\n56.3,11.0\n48.9,8.0\n")
    for store in (tmp_path / "fresh-store", tmp_path / "used-store"):
        if store.name == "used-store":
            run_json(capsys, store, readings_csv)
        before = snapshot(store)
        code, out, err = run(capsys, "run", "--store", str(store), "--data", str(bad))
        assert code == 2 and out == ""
        assert "line 3 (row 2), column 'celsius': 'hot' is not a number" in err
        assert "line 4 (row 3), column 'celsius': -400" in err and "below absolute zero" in err
        assert "Traceback" not in err
        assert snapshot(store) == before


def test_bad_options_exit_2_before_anything_runs(capsys, tmp_path, readings_csv):
    code, out, err = run(capsys, "run", "--store", str(tmp_path / "s"), "--data", str(readings_csv), "--lr", "-1", "--optimizer", "bogus")
    assert code == 2 and "lr:" in err and "optimizer:" in err and "adam" in err
    assert not (tmp_path / "s").exists()


def test_predict_and_runs_use_the_persisted_model(capsys, tmp_path, readings_csv):
    store = tmp_path / "store"
    first = run_json(capsys, store, readings_csv, "--val-fraction", "0")
    second = run_json(capsys, store, readings_csv, "--strategy", "autograd", "--lr", "0.05")
    code, out, _ = run(capsys, "predict", "45.0", "60.2", "--store", str(store), "--json")
    rows = json.loads(out)["predictions"]
    cal = second["calibration"]
    assert code == 0 and [r["reading"] for r in rows] == [45.0, 60.2]
    for r in rows:
        assert r["celsius"] == pytest.approx(cal["slope"] * r["reading"] + cal["intercept"], abs=1e-4)
    code, out, _ = run(capsys, "predict", "45.0", "--run", first["run_id"], "--store", str(store), "--json")
    assert json.loads(out)["predictions"][0]["celsius"] == pytest.approx(first["calibration"]["slope"] * 45 + first["calibration"]["intercept"], abs=1e-4)
    code, out, err = run(capsys, "predict", "45.0", "--run", "20990101-000000-deadbeef", "--store", str(store))
    assert code == 2 and "no run" in err
    code, out, _ = run(capsys, "runs", "--store", str(store), "--json")
    listed = json.loads(out)
    assert [r["run_id"] for r in listed] == [first["run_id"], second["run_id"]]
    assert listed[1]["strategy"] == "autograd" and listed[1]["train_loss"] == pytest.approx(second["train_loss"])
    code, out, _ = run(capsys, "runs", "--store", str(store))
    assert first["run_id"] in out and "autograd" in out


def test_whole_numbers_are_ingested_as_float64(capsys, tmp_path):
    """A file of whole numbers parses as int64: its table is written from the validated, float64
    columns (a file of floats is written while the schemas are checked), with the same numbers."""
    table = pd.read_csv(SHIPPED_DATA).round().astype(int)
    path = tmp_path / "whole.csv"
    table.to_csv(path, index=False)
    result = run_json(capsys, tmp_path / "store", path)
    ingested = np.load(result["stages"]["ingest"]["path"], allow_pickle=False)
    assert ingested.dtype == np.float64
    np.testing.assert_array_equal(ingested, table[["reading", "celsius"]].to_numpy(np.float64))
    assert sha256_file(Path(result["stages"]["ingest"]["path"])) == manifest(result)["stages"]["ingest"]["sha256"]


def test_human_output_says_where_everything_went(capsys, tmp_path, readings_csv):
    code, out, _ = run(capsys, "run", "--store", str(tmp_path / "store"), "--data", str(readings_csv), "--epochs", "100")
    assert code == 0
    assert "calibration: °C =" in out and "manifest in" in out and "plot:" in out
    for name in STAGES:
        assert f"{name}.{'npy' if name == 'ingest' else 'joblib'}" in out
