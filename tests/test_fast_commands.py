"""Commands that answer at once import neither torch nor Prefect, and a run whose every stage is
cached imports neither torch, pandera nor matplotlib: each checked in a fresh process running the
real command line, whose sys.modules is read back when it ends."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# runs `thermocal ARGS...` in this process, then writes the modules it loaded to the file MODULES
# names, also when it ends by SystemExit (argparse's --help and --version do)
WRAPPER = r"""
import json, os, sys
from flows.cli import main
try:
    code = main(sys.argv[1:])
finally:
    with open(os.environ["MODULES"], "w") as out:
        json.dump(sorted(name for name in sys.modules if "." not in name), out)
sys.exit(code)
"""
HEAVY = {"torch", "prefect", "pandera", "matplotlib"}
# and pydantic (0.1-0.2 s), which only the commands taking the run's settings need
AT_ONCE = HEAVY | {"pydantic"}


def _command(tmp_path: Path, *args: str, **env) -> tuple[subprocess.CompletedProcess, set[str]]:
    modules = tmp_path / f"modules-{len(list(tmp_path.glob('modules-*')))}.json"
    environ = {**os.environ, "MODULES": str(modules), **env}
    done = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, env=environ, cwd=ROOT, timeout=600)
    loaded = set(json.loads(modules.read_text()))
    assert {"flows", "tasks"} <= loaded, done.stderr  # the list is the command's own
    return done, loaded


@pytest.fixture(scope="module")
def api_url(prefect_server):
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def store(tmp_path_factory, api_url):
    """One store holding a run of each model family on the shipped readings."""
    path = tmp_path_factory.mktemp("fast") / "store"
    run_ids = {}
    for spec in ("linear", "poly:3", "mlp:4"):
        done = subprocess.run([sys.executable, "-m", "flows", "run", "--json", "--store", str(path), "--model", spec,
                               "--predict", "20", "45.5", "90"], capture_output=True, text=True, cwd=ROOT, timeout=600,
                              env={**os.environ, "PREFECT_API_URL": api_url})
        assert done.returncode == 0, done.stderr
        run_ids[spec] = json.loads(done.stdout)
    return path, run_ids


@pytest.mark.parametrize("args", [["--help"], ["synth", "--help"], ["run", "--help"], ["--version"]])
def test_help_and_version_import_neither_torch_nor_prefect(tmp_path, args):
    done, modules = _command(tmp_path, *args)
    assert done.returncode == 0 and done.stdout
    assert not modules & HEAVY, modules & HEAVY
    if args[0] == "run":
        assert "pydantic" in modules and "--lr" in done.stdout  # its options are the settings' fields
    else:
        assert "pydantic" not in modules


def test_runs_and_predict_import_neither_torch_nor_prefect_and_predict_equals_the_infer_stage(tmp_path, store):
    import joblib

    path, runs = store
    done, modules = _command(tmp_path, "runs", "--store", str(path), "--json")
    assert done.returncode == 0 and len(json.loads(done.stdout)) == 3
    assert not modules & AT_ONCE, modules & AT_ONCE
    for spec, result in runs.items():
        done, modules = _command(tmp_path, "predict", "20", "45.5", "90", "--run", result["run_id"], "--store", str(path), "--json")
        assert done.returncode == 0, done.stderr
        assert not modules & AT_ONCE, (spec, modules & AT_ONCE)
        predicted = json.loads(done.stdout)
        assert predicted["model"] == spec
        infer = joblib.load(result["stages"]["infer"]["path"])["new"]  # the infer stage, through torch
        # the same float64 forward pass in numpy and in torch: equal to rounding, far inside float32 precision
        np.testing.assert_allclose([row["celsius"] for row in predicted["predictions"]], infer["celsius"], rtol=1e-12, atol=1e-9)


def test_a_cached_run_imports_neither_torch_pandera_nor_matplotlib(tmp_path, store, api_url):
    path, runs = store
    done, modules = _command(tmp_path, "run", "--json", "--store", str(path), "--model", "poly:3", "--predict", "20", "45.5", "90",
                             PREFECT_API_URL=api_url)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert all(stage["cached"] for stage in result["stages"].values())
    assert result["calibration"] == runs["poly:3"]["calibration"]
    assert "prefect" in modules  # it did run a flow
    assert not modules & {"torch", "pandera", "matplotlib"}, modules & {"torch", "pandera", "matplotlib"}

    computed, modules = _command(tmp_path, "run", "--json", "--store", str(path), "--model", "poly:3", "--lr", "0.4",
                                 PREFECT_API_URL=api_url)
    assert computed.returncode == 0, computed.stderr
    assert not json.loads(computed.stdout)["stages"]["train"]["cached"]
    assert {"torch", "matplotlib"} <= modules  # the check above can fail: a computed run does load them
