"""Shared fixtures. Prefect writes into PREFECT_HOME, so it points at a temporary folder before Prefect loads."""

import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from tests.dask_cluster import dask_cluster  # noqa: F401  (a fixture: a real Dask cluster as separate processes)

PREFECT_HOME = tempfile.mkdtemp(prefix="thermocal-test-prefect-")
os.environ["PREFECT_HOME"] = PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Commands in tests use Prefect's temporary server, as before the local server existed; the local
# server's own tests (tests/test_local_server.py) ask for it and stop what they start. Should one be
# left behind anyway, it stops itself after this long unused.
os.environ["THERMOCAL_SERVER"] = "ephemeral"
os.environ["THERMOCAL_SERVER_IDLE"] = "600"

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DATA = ROOT / "data" / "readings.csv"


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect server and database for the whole session (about 17 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
    shutil.rmtree(PREFECT_HOME, ignore_errors=True)


def _local_servers_started_here(folders: tuple[str, ...]) -> list[int]:
    """Process ids of thermocal local-server supervisors and warm processes (and runs forked from
    them) whose PREFECT_HOME lies in one of this session's temporary folders."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            command = (proc / "cmdline").read_bytes()
            if b"flows.daemon" not in command and b"flows.warm" not in command:
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        home = next((e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"PREFECT_HOME=")), "")
        if home.startswith(folders):
            found.append(int(proc.name))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_local_server_left_behind(tmp_path_factory):
    """Every test stops the servers it starts; a session that leaves one fails (and stops it)."""
    folders = (PREFECT_HOME, str(tmp_path_factory.getbasetemp()))
    yield
    left = _local_servers_started_here(folders)
    for pid in left:
        try:
            os.killpg(pid, signal.SIGKILL)  # a supervisor leads its group
        except ProcessLookupError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not left, f"tests left thermocal local servers running: processes {left}"


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
