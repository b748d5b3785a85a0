"""`thermocal server start --background` returns only once the API answers, fails with the log's
tail when it cannot, and `server stop` stops the process it started, by its id."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _thermocal(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "thermocal"), "server", *args], capture_output=True, text=True, env=env, timeout=300)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(home)}


def test_background_start_waits_for_the_api_and_stop_ends_the_process(tmp_path):
    env, port = _env(tmp_path / "home"), _free_port()
    pid_file = tmp_path / "home" / f"thermocal-server-{port}.pid"
    try:
        started = _thermocal(env, "start", "--background", "--port", str(port))
        assert started.returncode == 0, started.stderr
        assert f"http://127.0.0.1:{port}" in started.stdout and f"thermocal server stop --port {port}" in started.stdout
        status = _thermocal(env, "status", "--port", str(port))  # right after: up, not "down"
        assert status.returncode == 0 and status.stdout.startswith("up:")
        pid = int(pid_file.read_text())
        assert _alive(pid)
        stopped = _thermocal(env, "stop", "--port", str(port))
        assert stopped.returncode == 0 and f"(process {pid})" in stopped.stdout
        assert not _alive(pid) and not pid_file.exists()
        assert _thermocal(env, "status", "--port", str(port)).returncode == 1
    finally:
        if pid_file.exists() and _alive(int(pid_file.read_text())):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def test_a_port_taken_by_something_else_fails_with_the_servers_log(tmp_path):
    env = _env(tmp_path / "home")
    with socket.socket() as squatter:  # listens, but speaks no HTTP
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        started = _thermocal(env, "start", "--background", "--port", str(port))
    assert started.returncode == 2
    assert f"the Prefect server on port {port} exited with code" in started.stderr and "the end of its log" in started.stderr
    assert not (tmp_path / "home" / f"thermocal-server-{port}.pid").exists()
    assert "Traceback (most recent call last)" not in started.stderr.split("the end of its log")[0]


def test_status_tells_a_port_held_by_another_program_from_a_free_one(tmp_path):
    env = _env(tmp_path / "home")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        held = _thermocal(env, "status", "--port", str(port))
    assert held.returncode == 1 and f"port {port} is in use by a program that is not a Prefect server" in held.stdout
    free = _thermocal(env, "status", "--port", str(port))
    assert free.returncode == 1 and "nothing answers" in free.stdout
