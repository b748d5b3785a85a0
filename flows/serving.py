"""Scheduled runs (`thermocal serve`) and a local Prefect server with its UI (`thermocal server`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tasks.errors import InvalidInput
from tasks.settings import CalibrationSettings

DEFAULT_PORT = 4200


def api_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def deployment_parameters(data: str, store: str, settings: CalibrationSettings, predict: list[float]) -> dict:
    """The flow's parameters as JSON; paths made absolute so every scheduled run reads the same file."""
    return {
        "data": str(Path(data).resolve()),
        "store": str(Path(store).resolve()),
        "settings": settings.model_dump(mode="json"),
        "predict": list(predict),
    }


def serve_calibration(name: str, parameters: dict, settings: CalibrationSettings, cron: str | None, interval: float | None) -> None:
    """Register the deployment `thermocal-calibrate/<name>` with its schedule and run what it schedules.

    Returns when stopped by SIGINT or SIGTERM; Prefect then pauses the deployment's schedule and
    deletes its scheduled runs, so nothing runs while nobody serves it.
    """
    if not os.environ.get("PREFECT_API_URL"):
        raise InvalidInput(
            "thermocal serve needs a running Prefect server to hold the schedule: start one with "
            f"`thermocal server start`, then `export PREFECT_API_URL={api_url(DEFAULT_PORT)}`"
        )
    from prefect.deployments.runner import EntrypointType

    from flows.calibrate import calibrate, run_tags

    calibrate.serve(
        name=name,
        cron=cron,
        interval=interval,
        parameters=parameters,
        tags=["thermocal", *run_tags(settings)],
        description="Calibrate the readings file as it is at each scheduled time; unchanged data comes back cached.",
        entrypoint_type=EntrypointType.MODULE_PATH,  # flows.calibrate.calibrate, wherever the command is run
        limit=1,  # one run at a time: a run that comes due while another trains waits for it
    )


def _prefect(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "prefect"), *args]


def server_env(port: int) -> dict:
    """A server on 127.0.0.1:port whose UI calls the API on that same port, without telemetry."""
    return {
        **os.environ,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": api_url(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }


def server_healthy(port: int, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url(port)}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _home() -> Path:
    """PREFECT_HOME, read without importing Prefect (about 2 s)."""
    return Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()


def _server_files(port: int) -> tuple[Path, Path]:
    """The process id and log of thermocal's background server on `port`."""
    return _home() / f"thermocal-server-{port}.pid", _home() / f"thermocal-server-{port}.log"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_process(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM to the process group `pid` leads (the server and its workers), SIGKILL after `timeout`."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _alive(pid):
            return


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


STARTUP_TIMEOUT = 120.0  # a cold server on a new machine migrates its database first (about 20-30 s here)


def server_start(port: int, background: bool, timeout: float = STARTUP_TIMEOUT) -> int:
    """Start `prefect server start` on 127.0.0.1:port, in the foreground unless `background`.

    In the background it runs in its own session with its log in PREFECT_HOME, and this returns
    only once its API answers; if it exits or stays silent for `timeout` seconds, it is stopped and
    the error shows the log's tail.
    """
    if server_healthy(port):
        print(f"a Prefect server already answers on {api_url(port)}")
        return 0
    command = _prefect("server", "start", "--host", "127.0.0.1", "--port", str(port))
    if not background:
        print(f"Prefect server and UI: http://127.0.0.1:{port}\nfor thermocal run/serve: export PREFECT_API_URL={api_url(port)}", flush=True)
        try:
            return subprocess.run(command, env=server_env(port)).returncode
        except KeyboardInterrupt:
            return 0
    pid_file, log_file = _server_files(port)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, env=server_env(port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    pid_file.write_text(str(process.pid))
    deadline = time.monotonic() + timeout
    while not server_healthy(port, timeout=1.0):
        if process.poll() is not None or time.monotonic() > deadline:
            what = f"exited with code {process.returncode}" if process.poll() is not None else f"did not answer within {timeout:g} s"
            _stop_process(process.pid)
            pid_file.unlink(missing_ok=True)
            raise InvalidInput(f"the Prefect server on port {port} {what}; the end of its log ({log_file}):\n{_tail(log_file)}")
        time.sleep(0.5)
    print(f"Prefect server and UI: http://127.0.0.1:{port} (process {process.pid}, log {log_file})\n"
          f"for thermocal run/serve: export PREFECT_API_URL={api_url(port)}\nstop it with: thermocal server stop"
          + (f" --port {port}" if port != DEFAULT_PORT else ""), flush=True)
    return 0


def _port_taken(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def server_status(port: int) -> int:
    if server_healthy(port):
        print(f"up: {api_url(port)} (UI http://127.0.0.1:{port})")
        return 0
    if _port_taken(port):
        print(f"down: port {port} is in use by a program that is not a Prefect server (no answer on {api_url(port)}/health)")
    else:
        print(f"down: nothing answers on {api_url(port)}")
    return 1


def server_stop(port: int = DEFAULT_PORT) -> int:
    """Stop the server `server start --background` started on `port`, by its process id."""
    pid_file, _ = _server_files(port)
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        print(f"no thermocal background server on port {port} (no {pid_file})")
        return 0
    if not _is_server(pid):  # gone, or the id now belongs to another program: never signal that
        pid_file.unlink(missing_ok=True)
        print(f"the Prefect server on port {port} (process {pid}) is no longer running")
        return 0
    _stop_process(pid)
    pid_file.unlink(missing_ok=True)
    print(f"stopped the Prefect server on port {port} (process {pid})")
    return 0


def _is_server(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"server" in command and any(part.endswith(b"prefect") for part in command)


def start_ephemeral_server() -> None:
    """Start Prefect's temporary server for this process, if no PREFECT_API_URL names a server.

    Prefect would start it at the first flow call anyway (the same instance is reused). Started
    here, concurrent first runs on a new PREFECT_HOME take turns: each new server migrates the
    SQLite database, and two migrating at once fail ("No such constraint"). Once the database
    exists, starts share the lock and run in parallel.
    """
    import fcntl

    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    if PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    fresh = not (home / "prefect.db").exists()
    with open(home / ".thermocal-server-start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if fresh else fcntl.LOCK_SH)
        server = SubprocessASGIServer()
        server.start()
    # processes this run starts (Dask workers) report to this server instead of starting their own
    os.environ["PREFECT_API_URL"] = server.api_url
