"""Shared fixtures. Prefect writes into PREFECT_HOME, so it points at a temporary folder before Prefect loads."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

PREFECT_HOME = tempfile.mkdtemp(prefix="thermocal-test-prefect-")
os.environ["PREFECT_HOME"] = PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DATA = ROOT / "data" / "readings.csv"


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect server and database for the whole session (about 17 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
    shutil.rmtree(PREFECT_HOME, ignore_errors=True)


@pytest.fixture
def readings_csv(tmp_path) -> Path:
    """A private copy of the shipped readings, free to modify."""
    path = tmp_path / "readings.csv"
    shutil.copy(SHIPPED_DATA, path)
    return path


@pytest.fixture
def seed_data():
    """The seed's 11 readings as float32 tensors (t_u, t_c), read from the shipped file."""
    import pandas as pd
    import torch

    table = pd.read_csv(SHIPPED_DATA)
    return torch.tensor(table["reading"].to_numpy(), dtype=torch.float32), torch.tensor(table["celsius"].to_numpy(), dtype=torch.float32)
