"""Sweeps: the grid as one flow, bit-for-bit equal whether trainings run one at a time, in threads or on Dask."""

import json
from pathlib import Path

import joblib
import pandas as pd
import pytest

from tasks.durable import sha256_file
from tests.conftest import SHIPPED_DATA
from tests.test_flow import run

pytestmark = pytest.mark.usefixtures("prefect_server")
GRID = ["--strategies", "analytic,autograd,optimizer", "--lrs", "0.02,0.01", "--normalizations", "standard,scale",
        "--epochs", "400", "--batch-size", "4"]  # mini-batches: each training's own generator decides their order


def sweep(capsys, store: Path, *runner: str) -> list[dict]:
    code, out, err = run(capsys, "sweep", "--json", "--data", str(SHIPPED_DATA), "--store", str(store), *GRID, *runner)
    assert code == 0, err
    return json.loads(out)


def test_sequential_threaded_and_dask_sweeps_agree_bit_for_bit(capsys, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # Dask worker processes report here too
    results = {
        "sequential": sweep(capsys, tmp_path / "sequential", "--sequential"),
        "threads": sweep(capsys, tmp_path / "threads", "--workers", "4"),
        "dask": sweep(capsys, tmp_path / "dask", "--dask", "--workers", "2"),
    }
    assert len(results["sequential"]) == 12 and all(row["status"] == "ok" for row in results["sequential"])
    assert not any(row["cached"] for rows in results.values() for row in rows)  # three separate stores: all computed
    compared = ("model", "strategy", "lr", "normalization", "train_loss", "val_loss", "gap_to_optimum", "epochs", "calibration")
    for name in ("threads", "dask"):
        assert [{k: r[k] for k in compared} for r in results[name]] == [{k: r[k] for k in compared} for r in results["sequential"]]
        for mine, reference in zip(results[name], results["sequential"]):
            assert sha256_file(tmp_path / name / mine["train_path"]) == sha256_file(tmp_path / "sequential" / reference["train_path"])


def test_sweep_persists_a_comparison_and_survives_a_diverging_combination(capsys, tmp_path):
    store = tmp_path / "store"
    code, out, err = run(capsys, "sweep", "--json", "--data", str(SHIPPED_DATA), "--store", str(store),
                         "--strategies", "analytic", "--lrs", "0.5,1e-2", "--normalizations", "standard,none")
    assert code == 0, err
    rows = json.loads(out)
    status = {(r["normalization"], r["lr"]): r["status"] for r in rows}
    assert status == {("standard", 0.5): "ok", ("standard", 0.01): "ok", ("none", 0.5): "failed", ("none", 0.01): "failed"}
    assert all("diverged" in r["error"] for r in rows if r["status"] == "failed")
    folder = next((store / "sweeps").iterdir())
    table = pd.read_csv(folder / "comparison.csv")
    assert len(table) == 4 and set(table["status"]) == {"ok", "failed"}
    pd.testing.assert_frame_equal(joblib.load(folder / "comparison.joblib"), pd.read_csv(folder / "comparison.csv"), check_dtype=False)
    assert (folder / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    # the same sweep again: every training comes back from the cache
    code, out, _ = run(capsys, "sweep", "--json", "--data", str(SHIPPED_DATA), "--store", str(store),
                       "--strategies", "analytic", "--lrs", "0.5,1e-2", "--normalizations", "standard")
    assert all(r["cached"] for r in json.loads(out))


def test_bad_sweep_options(capsys, tmp_path):
    code, _, err = run(capsys, "sweep", "--store", str(tmp_path), "--strategies", "analytic,magic")
    assert code == 2 and "strategy" in err and "'autograd'" in err
    code, _, err = run(capsys, "sweep", "--store", str(tmp_path), "--lrs", "0.1,fast")
    assert code == 2 and "--lrs" in err
    code, _, err = run(capsys, "sweep", "--store", str(tmp_path), "--lrs", "0.1,-1")
    assert code == 2 and "lr" in err
