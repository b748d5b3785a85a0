"""Scheduled runs (`thermocal serve`) and a local Prefect server with its UI (`thermocal server`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flows import daemon
from flows.daemon import PORT_DEFAULT as DEFAULT_PORT
from flows.daemon import api_url, server_env
from tasks.errors import InvalidInput
from tasks.settings import CalibrationSettings


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
    if not os.environ.get("PREFECT_API_URL"):  # only with THERMOCAL_SERVER=ephemeral: a temporary server ends with its process
        raise InvalidInput(
            "thermocal serve needs a running Prefect server to hold the schedule, and THERMOCAL_SERVER=ephemeral asks for none: "
            f"unset it to use thermocal's local server, or start one with `thermocal server start` and `export PREFECT_API_URL={api_url(DEFAULT_PORT)}`"
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


def server_start(port: int, background: bool, idle: float = 0.0) -> int:
    """Start a server on 127.0.0.1:port, in the foreground unless `background`.

    In the background it is thermocal's local server (flows.daemon), the one `thermocal run`
    starts on first need, here with `idle` seconds unused before it stops (0: never); this returns
    only once its API answers, or fails with the end of its log.
    """
    if daemon.healthy(port):
        print(f"a Prefect server already answers on {api_url(port)}")
        return 0
    if not background:
        print(f"Prefect server and UI: http://127.0.0.1:{port}\nfor thermocal run/serve: export PREFECT_API_URL={api_url(port)}", flush=True)
        try:
            return subprocess.run(_prefect("server", "start", "--host", "127.0.0.1", "--port", str(port)), env=server_env(port)).returncode
        except KeyboardInterrupt:
            return 0
    pid = daemon.start(port, idle)
    print(f"Prefect server and UI: http://127.0.0.1:{port} (process {pid}, log {daemon.ServerFiles(port).log}); {daemon.describe_idle(idle)}\n"
          f"thermocal run uses it; for other Prefect clients: export PREFECT_API_URL={api_url(port)}\nstop it with: thermocal server stop"
          + (f" --port {port}" if port != DEFAULT_PORT else ""), flush=True)
    return 0


def server_status(port: int | None) -> int:
    """Up (exit 0) or down (exit 1): thermocal's local servers, or whatever answers on `port`."""
    if port is None:
        running = [(p, pid) for p, pid in daemon.running_servers() if daemon.healthy(p)]
        for p, pid in running:
            print(f"up: {api_url(p)} (UI http://127.0.0.1:{p}, process {pid})")
        if not running:
            print(f"down: no thermocal server runs for PREFECT_HOME {daemon.home()}")
        return 0 if running else 1
    if daemon.healthy(port):
        print(f"up: {api_url(port)} (UI http://127.0.0.1:{port})")
        return 0
    if daemon.port_taken(port):
        print(f"down: port {port} is in use by a program that is not a Prefect server (no answer on {api_url(port)}/health)")
    else:
        print(f"down: nothing answers on {api_url(port)}")
    return 1


def server_stop(port: int | None = None) -> int:
    """Stop thermocal's server on `port` (every one of this PREFECT_HOME without it), by process id."""
    if port is None:
        running = daemon.running_servers()
        if not running:
            print(f"no thermocal server runs for PREFECT_HOME {daemon.home()}")
        for p, _ in running:
            server_stop(p)
        return 0
    files = daemon.ServerFiles(port)
    pid = files.read_pid()
    if pid is None:
        print(f"no thermocal background server on port {port} (no {files.pid})")
        return 0
    if not (daemon.alive(pid) and daemon.is_supervisor(pid)):  # gone, or the id now belongs to another program: never signal that
        files.pid.unlink(missing_ok=True)
        print(f"the Prefect server on port {port} (process {pid}) is no longer running")
        return 0
    daemon.stop_group(pid)
    files.pid.unlink(missing_ok=True)
    print(f"stopped the Prefect server on port {port} (process {pid})")
    return 0


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
