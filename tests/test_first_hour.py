"""What a new user tripped over in the first hour, each through the real command: predict's choice
of model, runs that tell runs apart, divergence hints that work the first time, one error said
once, numbers that agree, the run's answers in the UI's artifacts, a clean run graph, server
commands that keep their word, and labels in the user's words."""

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import joblib
import numpy as np
import pytest

from tests.test_flow import manifest, run, run_json

pytestmark = pytest.mark.usefixtures("prefect_server")
NOT_CONVERGED = ["--lr", "1e-4", "--epochs", "5"]


def predict_json(capsys, store: Path, *args: str) -> tuple[int, dict, str]:
    code, out, err = run(capsys, "predict", "45", *args, "--store", str(store), "--json")
    return code, json.loads(out), err


def test_predict_uses_the_latest_converged_run_and_warns_when_told_to_use_another(capsys, tmp_path, readings_csv):
    store = tmp_path / "store"
    good = run_json(capsys, store, readings_csv)
    bad = run_json(capsys, store, readings_csv, *NOT_CONVERGED)  # the latest run, far from converged
    assert bad["converged"] is False
    code, answer, err = predict_json(capsys, store)
    assert code == 0 and answer["run_id"] == good["run_id"]
    assert answer["warnings"] == [f"the latest run {bad['run_id']} is not used: not converged (relative gap {bad['gap_to_optimum']:.2e} "
                                  "to the least-squares optimum)"]  # said, so nobody wonders why their latest run was passed over
    assert answer["model"] == "linear" and answer["data"] == str(readings_csv.resolve())
    cal = good["calibration"]
    assert answer["predictions"][0]["celsius"] == pytest.approx(cal["slope"] * 45 + cal["intercept"], abs=1e-9)
    code, answer, err = predict_json(capsys, store, "--run", bad["run_id"])
    assert code == 0 and answer["run_id"] == bad["run_id"]
    assert "not converged" in answer["warning"] and f"thermocal: warning: run {bad['run_id']}" in err and "not converged" in err


def test_predict_says_which_data_file_and_when_it_extrapolates(capsys, tmp_path, readings_csv):
    store = tmp_path / "store"
    millivolts = tmp_path / "logger.csv"
    noise = np.random.default_rng(0).normal(0, 0.2, 16)
    millivolts.write_text("reading,celsius\n" + "\n".join(f"{0.04 * c + 1:.3f},{c + e:.2f}" for c, e in zip(range(-5, 41, 3), noise)) + "\n")
    run_json(capsys, store, readings_csv)
    logger = run_json(capsys, store, millivolts)
    code, answer, err = predict_json(capsys, store)  # 45 mV, far outside the logger's 0.8-2.6 mV
    assert code == 0 and answer["run_id"] == logger["run_id"]
    assert f"calibrates {millivolts.resolve()}; the store holds runs of 2 data files" in answer["warning"]
    assert "reading(s) 45 outside the calibrated range" in answer["warning"] and "extrapolated" in err
    code, answer, err = predict_json(capsys, store, "--data", str(readings_csv))
    assert code == 0 and "warning" not in answer and err == ""
    code, out, err = run(capsys, "predict", "45", "--store", str(store), "--data", str(tmp_path / "nothere.csv"))
    assert code == 2 and "(no such file)" in err


def test_predict_says_which_runs_exist_when_none_can_be_trusted(capsys, tmp_path, readings_csv):
    store = tmp_path / "store"
    bad = run_json(capsys, store, readings_csv, *NOT_CONVERGED)
    network = run_json(capsys, store, readings_csv, "--model", "mlp:4", "--epochs", "20")
    assert network["warnings"] and "worse than a straight line" in network["warnings"][0]
    code, out, err = run(capsys, "predict", "45", "--store", str(store))
    assert code == 2 and out == ""
    assert "has a model to trust" in err and f"{bad['run_id']} (linear): not converged" in err
    assert f"{network['run_id']} (mlp:4): mlp:4 fits the training rows worse than a straight line" in err
    assert "--run ID" in err and "Traceback" not in err


def test_runs_tell_runs_apart_and_filter_by_data_file(capsys, tmp_path, readings_csv):
    store = tmp_path / "store"
    other = tmp_path / "logger.csv"
    other.write_text(readings_csv.read_text().replace("68.4,21.0", "68.4,21.5"))
    first = run_json(capsys, store, readings_csv)
    second = run_json(capsys, store, other, "--model", "poly:2")
    code, out, _ = run(capsys, "runs", "--store", str(store), "--json")
    rows = {row["run_id"]: row for row in json.loads(out)}
    import hashlib

    assert rows[first["run_id"]]["data"] == str(readings_csv.resolve())
    assert rows[second["run_id"]]["data_sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()
    assert rows[second["run_id"]]["model"] == "poly:2" and rows[first["run_id"]]["model"] == "linear"
    assert rows[first["run_id"]]["train_rows"] == 9 and rows[first["run_id"]]["converged"] is True
    assert rows[first["run_id"]]["gap_to_optimum"] == pytest.approx(first["gap_to_optimum"])
    code, out, _ = run(capsys, "runs", "--store", str(store), "--data", str(other), "--json")
    assert [row["run_id"] for row in json.loads(out)] == [second["run_id"]]
    code, out, _ = run(capsys, "runs", "--store", str(store))
    line = next(line for line in out.splitlines() if line.startswith(first["run_id"]))
    assert f"readings.csv ({rows[first['run_id']]['data_sha256'][:8]})" in line and "linear" in line and "yes (" in line
    code, answer, _ = predict_json(capsys, store, "--data", str(readings_csv))
    assert answer["run_id"] == first["run_id"]  # the latest run is the other file's; --data picks this one's


def _suggested_lr(message: str) -> float:
    return float(re.search(r"--lr ([0-9.e+-]+) (?:reaches the optimum|stays stable)", message).group(1))


def test_a_divergence_hint_that_works_the_first_time(capsys, tmp_path, readings_csv):
    store = tmp_path / "store"
    code, out, err = run(capsys, "run", "--store", str(store), "--data", str(readings_csv), "--normalize", "scale", "--lr", "1")
    assert code == 3 and out == ""
    warned = err.index("--lr 1 exceeds 0.033, the largest stable learning rate of plain gradient descent")
    failed = err.index("thermocal: error: training diverged at epoch")
    assert warned < failed  # warned before training, failed after
    assert "stable only below lr 0.033" in err and "No model was saved." in err
    assert "With --normalize standard it is stable up to lr" in err
    lr = _suggested_lr(err)
    result = run_json(capsys, store, readings_csv, "--normalize", "scale", "--lr", str(lr))
    assert result["converged"] and result["gap_to_optimum"] < 1e-3 and not result["warnings"]


def test_raw_readings_say_that_no_rate_converges_in_the_budget(capsys, tmp_path, readings_csv):
    code, _, err = run(capsys, "run", "--store", str(tmp_path / "s"), "--data", str(readings_csv), "--normalize", "none", "--lr", "5")
    assert code == 3
    assert "no learning rate converges within 5000 epochs here" in err
    needed = int(re.search(r"the best, --lr 0\.00033, needs about (\d+) epochs \(--epochs (\d+)\)", err).group(2))
    assert 50_000 < needed < 500_000  # the condition number of raw readings, about 3e4, times ln(1e6)
    assert re.search(r"With --normalize standard it is stable up to lr 0\.\d+, and --lr 0\.5 reaches the optimum in about \d epochs", err)


def test_the_network_gets_a_stable_suggestion_too(capsys, tmp_path, readings_csv):
    store = tmp_path / "store"
    code, _, err = run(capsys, "run", "--store", str(store), "--data", str(readings_csv), "--model", "mlp:13", "--lr", "3")
    assert code == 3 and "Gauss-Newton" in err
    lr = _suggested_lr(err)
    result = run_json(capsys, store, readings_csv, "--model", "mlp:13", "--lr", str(lr), "--epochs", "2000")
    assert result["epochs_run"] == 2000 and np.isfinite(result["train_loss"])


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows", *args], capture_output=True, text=True, env=env, timeout=300)


def test_one_error_said_once_and_last(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    bad = tmp_path / "bad.csv"
    bad.write_text("reading,celsius\n35.7,0.5\n55.9,hot\n58.2,-400\n81.9,28.0\n56.3,11.0\n48.9,8.0\n")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    failed = _cli(env, "run", "--store", str(tmp_path / "s"), "--data", str(bad))
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr.count("'hot' is not a number") == 1 and "\\n" not in failed.stderr
    tail = failed.stderr[failed.stderr.index("thermocal: error:"):]
    assert tail.rstrip().endswith("-400 °C is below absolute zero (-273.15)")  # the message is the last thing said
    assert "Traceback" not in failed.stderr
    as_json = _cli(env, "run", "--json", "--store", str(tmp_path / "s"), "--data", str(bad))
    answer = json.loads(as_json.stdout)
    assert as_json.returncode == answer["exit_code"] == 2 and answer["error"] == tail.removeprefix("thermocal: error: ").rstrip("\n")
    # Prefect's own record of the failed run keeps the message for the UI
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=5, sort="START_TIME_DESC")
    assert any(r.state.is_failed() and "'hot' is not a number" in (r.state.message or "") for r in runs)


def test_summary_numbers_agree_with_each_other(capsys, tmp_path, readings_csv):
    code, out, _ = run(capsys, "run", "--store", str(tmp_path / "s"), "--data", str(readings_csv))
    assert code == 0
    assert re.search(r"calibration: °C = \d+\.\d{6} × reading − \d+\.\d{6}$", out, re.M)  # a spaced, true minus sign
    loss, optimum = (float(v) for v in re.search(r"training loss ([\d.]+) \(least-squares optimum ([\d.]+)", out).groups())
    assert loss >= optimum


def test_the_runs_answers_and_settings_are_in_the_artifacts_of_the_flow_run(capsys, tmp_path, readings_csv):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    result = run_json(capsys, tmp_path / "s", readings_csv, "--predict", "45", "60.2")
    flow_run_id = uuid.UUID(manifest(result)["flow_run_id"])
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key = {a.key: a for a in artifacts}
    assert {"thermocal-metrics", "thermocal-report"} <= set(by_key)
    assert all(by_key[k].task_run_id is None for k in ("thermocal-metrics", "thermocal-report"))  # on the flow run itself
    metrics = json.loads(by_key["thermocal-metrics"].data)
    predicted = {row["reading"]: row["celsius"] for row in result["predictions"]}
    assert {"metric": "°C at reading 45", "value": predicted[45.0]} in metrics
    report = by_key["thermocal-report"].data
    order = [report.index(part) for part in ("**°C =", "![calibration plot]", "## New readings", "| 60.2 |", "## Metrics", "## Settings (as used)")]
    assert order == sorted(order)  # calibration, plot and predictions lead
    assert "| lr | 0.5 |" in report and "| epochs | 5000 |" in report and "| tol | 1e-06 |" in report
    on_disk = (Path(result["report"]).parent / "report.md").read_text()
    assert "None" not in on_disk.split("## Settings (as used)")[1] or "| batch_size | None |" in on_disk
    assert "| lr | 0.5 |" in on_disk and f"`{result['stages']['train']['path']}`" in report  # full paths, not cut off


def test_each_stage_waits_only_for_what_it_reads(capsys, tmp_path, readings_csv):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    result = run_json(capsys, tmp_path / "s", readings_csv)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(manifest(result)["flow_run_id"])])))
    names = {r.id: r.name for r in runs}
    parents = {r.name: sorted(names[i.id] for inputs in r.task_inputs.values() for i in inputs) for r in runs}
    assert parents == {
        "ingest": [], "normalize": ["ingest"], "split": ["ingest"], "train": ["normalize", "split"],
        "validate": ["train"], "infer": ["train"], "report": ["infer", "validate"], "record-run": ["report"],
    }


def test_plot_labels_use_the_datas_column_names(capsys, tmp_path):
    logger = tmp_path / "logger.csv"
    rows = [f"2026-11-{day:02d}T12:00,{1.2 * day + 3:.2f},{0.5 * day - 1:.2f}" for day in range(1, 13)]
    logger.write_text("Time,Raw_mV,Ref_C\n" + "\n".join(rows) + "\n")
    result = run_json(capsys, tmp_path / "s", logger, "--reading-column", "Raw_mV", "--celsius-column", "Ref_C")
    report = joblib.load(Path(result["report"]).parent / "report.joblib")
    assert report["axes"] == ["Raw_mV (mV)", "Ref_C (°C)"]


def test_help_and_version():
    version = _cli(dict(os.environ), "--version")
    assert version.returncode == 0 and re.fullmatch(r"thermocal \S+ \(prefect 3\.\S+, torch 2\.\S+\)\n", version.stdout)
    run_help = _cli(dict(os.environ), "run", "--help").stdout
    assert "persist every stage" in run_help and run_help.count("  thermocal run ") == 2
    assert "start: a server on 127.0.0.1" in _cli(dict(os.environ), "server", "--help").stdout
    predict_help = " ".join(_cli(dict(os.environ), "predict", "--help").stdout.split())
    assert "instrument readings, in the units of the data's reading column" in predict_help and "--data" in predict_help
