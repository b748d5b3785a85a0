"""A real Dask cluster as separate processes for tests: `dask scheduler` and two `dask worker`s,
started from the venv's `dask` command and stopped by their process ids, whatever the test did.

Kept apart from conftest.py on purpose: a task a test defines is unpickled on a worker by importing
its test module, and conftest's import-time settings (a new PREFECT_HOME, PREFECT_API_URL removed)
must not run there; this module sets nothing when imported.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the checkout being tested: workers import its `tasks` and `tests`
DASK = Path(sys.executable).parent / "dask"
WORKERS = 2
IDLE = 600  # seconds without a task before a scheduler left behind stops itself


@dataclass
class DaskCluster:
    address: str
    scheduler_pid: int
    worker_pids: list[int]
    started_seconds: float
    stopped_seconds: float | None = None  # set once every process has been stopped

    @property
    def pids(self) -> list[int]:
        return [self.scheduler_pid, *self.worker_pids]


def alive(pid: int) -> bool:
    """A process with this id exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.split(")", 1)[1].split()[0] != "Z"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(processes: list[subprocess.Popen], timeout: float = 20) -> None:
    """SIGTERM to each process's group and wait for it, then the next: workers first, the scheduler
    last. Signalled together, a worker whose scheduler closed the connection mid-close hung (its
    close cancelled) until killed 20 s later; one by one each exits in about 0.3 s. SIGKILL for a
    group that outlives `timeout`. Each process leads its own session, so its group is itself and
    whatever it started."""
    for process in reversed(processes):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def _tails(logs: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-1500:]}" for log in sorted(logs.glob("*.log")))


@contextmanager
def dask_processes(logs: Path, env: dict[str, str], timeout: float = 120) -> Iterator[DaskCluster]:
    """Start a scheduler on a free loopback port and WORKERS single-threaded workers, wait until the
    scheduler counts them, yield the cluster; stop every process on exit, also when the body or the
    start itself raised.

    Workers run without a nanny (`--no-nanny`), so a worker is the process started here and a
    task's os.getpid() is one of `worker_pids`. Should this process be killed before it can stop
    them, they end by themselves (as conftest's local servers do): the scheduler after IDLE seconds
    without a task (`--idle-timeout`), a worker when its scheduler closes, or after 60 s without
    reaching one (`--death-timeout`).
    """
    from distributed import Client

    logs.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    commands = {"scheduler": [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0",
                              "--idle-timeout", str(IDLE)]}
    for i in range(1, WORKERS + 1):
        commands[f"worker-{i}"] = [str(DASK), "worker", address, "--nthreads", "1", "--no-dashboard", "--no-nanny", "--host", "127.0.0.1",
                                   "--death-timeout", "60", "--local-directory", str(logs / f"worker-{i}")]
    processes: list[subprocess.Popen] = []
    cluster = None
    started = time.perf_counter()
    try:
        for name, command in commands.items():  # all at once: the workers retry until the scheduler listens
            with open(logs / f"{name}.log", "w") as log:
                processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True))
        deadline = time.monotonic() + timeout
        try:
            with Client(address, timeout=timeout) as client:
                while not _counted(client, processes, deadline):
                    pass
        except (OSError, TimeoutError) as error:
            pytest.fail(f"the Dask cluster did not start with {WORKERS} workers ({error}):\n{_tails(logs)}")
        cluster = DaskCluster(address, processes[0].pid, [p.pid for p in processes[1:]], time.perf_counter() - started)
        yield cluster
    finally:
        stopping = time.perf_counter()
        _stop(processes)
        if cluster is not None:
            cluster.stopped_seconds = time.perf_counter() - stopping


def _counted(client, processes: list[subprocess.Popen], deadline: float) -> bool:
    """Whether the scheduler counts WORKERS workers, after waiting up to a second; TimeoutError once
    a process has exited or the deadline passed."""
    try:
        client.wait_for_workers(WORKERS, timeout=1)
        return True
    except TimeoutError:
        if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
            raise
        return False


def worker_env(api_url: str) -> dict[str, str]:
    """This process's environment for the cluster: the checkout first on the import path (before
    the editable install, which may point at another checkout), and the test's Prefect server, so
    task runs on the workers report where the flow run does."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PREFECT_API_URL": api_url}


@pytest.fixture
def dask_cluster(prefect_server, tmp_path) -> Iterator[DaskCluster]:
    """A scheduler and two workers as separate processes, reporting to the session's Prefect server;
    stopped by process id at teardown (also when the test failed), which then checks none is left."""
    from prefect.settings import PREFECT_API_URL

    with dask_processes(tmp_path / "dask", worker_env(PREFECT_API_URL.value())) as cluster:
        yield cluster
    left = [pid for pid in cluster.pids if alive(pid)]
    assert not left, f"Dask processes still running after teardown: {left}"
