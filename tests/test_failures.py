"""Crashes, corruption, tampering and concurrency: the store keeps working and loses nothing."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import joblib
import pytest

from tasks.durable import sha256_file
from tasks.store import Store
from tests.conftest import SHIPPED_DATA
from tests.test_flow import manifest, run, run_json, task_states

pytestmark = pytest.mark.usefixtures("prefect_server")
BIN = Path(sys.executable).parent
STAGES = ["ingest", "normalize", "split", "train", "validate", "infer", "report"]


@pytest.fixture
def server_env(tmp_path):
    """Environment for thermocal processes that use the test session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect-home")}


def thermocal(env, *args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "thermocal"), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


class Evil:
    """Unpickling this creates `marker`: proof that a file was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_learning_rate_too_small_finishes_but_says_not_converged(capsys, tmp_path):
    result = run_json(capsys, tmp_path / "store", SHIPPED_DATA, "--lr", "1e-6", "--epochs", "50")
    assert result["converged"] is False and result["gap_to_optimum"] > 1
    assert manifest(result)["results"]["converged"] is False
    code, out, _ = run(capsys, "run", "--store", str(tmp_path / "store"), "--lr", "1e-6", "--epochs", "50")
    assert code == 0 and "warning: not converged" in out and "above the least-squares optimum" in out
    assert run_json(capsys, tmp_path / "store", SHIPPED_DATA)["converged"] is True


def test_kill_9_during_training_then_the_same_command_again(tmp_path, server_env):
    store = tmp_path / "store"
    # finite differences for 100000 epochs: several seconds of training to interrupt
    command = ["run", "--json", "--data", str(SHIPPED_DATA), "--store", str(store),
               "--strategy", "finite-difference", "--epochs", "100000", "--log-every", "2000"]
    victim = thermocal(server_env, *command)
    for line in victim.stderr:  # Prefect's log lines; training has begun once an epoch is logged
        if "Epoch 2000," in line:
            break
    else:
        pytest.fail(f"training never started: {victim.wait()}")
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(30) == -signal.SIGKILL
    train_dir = store / "stages" / "04_train"
    assert not train_dir.exists() or not [p for p in train_dir.iterdir() if not p.name.startswith(".")]
    assert not list(store.glob("*/manifest.json"))

    again = thermocal(server_env, *command)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    resumed = json.loads(out)
    assert {name: resumed["stages"][name]["cached"] for name in ("ingest", "normalize", "split", "train")} == {
        "ingest": True, "normalize": True, "split": True, "train": False}

    clean_store = tmp_path / "uninterrupted"
    clean = thermocal(server_env, *[clean_store.as_posix() if a == str(store) else a for a in command])
    out, err = clean.communicate(timeout=600)
    assert clean.returncode == 0, err
    reference = json.loads(out)
    assert resumed["model"] == reference["model"] and resumed["train_loss"] == reference["train_loss"]
    for name in STAGES:
        assert sha256_file(resumed["stages"][name]["path"]) == sha256_file(reference["stages"][name]["path"])
    assert not list(store.rglob(".tmp-*"))  # no half-written stage folder survived


def test_truncated_files_are_detected_and_recomputed(capsys, tmp_path):
    store = tmp_path / "store"
    first = run_json(capsys, store, SHIPPED_DATA)
    train_file = Path(first["stages"]["train"]["path"])
    recorded = manifest(first)["stages"]["train"]["sha256"]
    train_file.write_bytes(train_file.read_bytes()[: train_file.stat().st_size // 2])
    # and a Prefect cache record cut short, as a crash mid-write would leave it
    record = store / ".records" / manifest(first)["stages"]["validate"]["key"]
    record.write_text(record.read_text()[:40])

    healed = run_json(capsys, store, SHIPPED_DATA)
    states = task_states(manifest(healed)["flow_run_id"])
    assert states["train"] == "Completed" and states["validate"] == "Completed" and states["ingest"] == "Cached"
    assert sha256_file(train_file) == recorded
    assert healed["calibration"] == first["calibration"]


def test_a_tampered_stage_file_is_never_unpickled(capsys, tmp_path):
    store = tmp_path / "store"
    first = run_json(capsys, store, SHIPPED_DATA)
    marker = tmp_path / "code-ran"
    train_file = Path(first["stages"]["train"]["path"])
    joblib.dump(Evil(marker), train_file)

    # predict refuses to load it
    code, out, err = run(capsys, "predict", "45", "--store", str(store))
    assert code == 2 and "differs from the recorded" in err and "was not loaded" in err
    assert not marker.exists()

    # a run recomputes it instead of loading it
    healed = run_json(capsys, store, SHIPPED_DATA)
    assert task_states(manifest(healed)["flow_run_id"])["train"] == "Completed"
    assert not marker.exists()
    assert sha256_file(train_file) == manifest(first)["stages"]["train"]["sha256"]
    code, out, _ = run(capsys, "predict", "45", "--store", str(store), "--json")
    assert code == 0 and not marker.exists()


def test_four_runs_at_once_on_one_store(tmp_path, server_env):
    store = tmp_path / "store"
    variants = [[], [], ["--lr", "0.02"], ["--strategy", "autograd", "--val-fraction", "0.3"]]
    processes = [thermocal(server_env, "run", "--json", "--data", str(SHIPPED_DATA), "--store", str(store), *extra)
                 for extra in variants]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
        results.append(json.loads(out))
    assert len({r["run_id"] for r in results}) == 4
    assert results[0]["calibration"] == results[1]["calibration"]
    assert results[0]["stages"]["train"]["path"] == results[1]["stages"]["train"]["path"]
    for result in results:
        m = manifest(result)
        for name, stage in m["stages"].items():
            for relative in stage["files"].values():
                assert (store / relative).is_file()
            assert sha256_file(store / stage["path"]) == stage["sha256"]
            Store(store).load({"stage": name, **stage})  # whole: it unpickles, or np.load reads it
    assert not list(store.rglob(".tmp-*")) and not list(store.rglob(".trash-*"))
