"""thermocal's local Prefect server: started by the first command that needs one, reused by the
next, stopped by `thermocal server stop` or by itself after a time unused (as Gradle's daemon).

Without it, every `thermocal run` starts Prefect's temporary server and loses 12-25 s to it. The
server is a supervisor process (`python -m flows.daemon`, no Prefect import) leading a process
group with Prefect's API and UI server (uvicorn serving `prefect.server.api.server:create_app`,
the command Prefect's own temporary server runs, with the UI on). The supervisor stops the group
once the server has gone unused for the idle time; stopping the supervisor's process group stops
both. Its files, in PREFECT_HOME:

    thermocal-server-<port>.pid       the supervisor's process id
    thermocal-server-<port>.log       the server's output
    thermocal-server-<port>.used      touched by every command that uses it: its mtime is the last use
    thermocal-server-<port>.leases/   one file per process using it right now, named by its pid
    .thermocal-server.lock            held while a command looks for the server or starts one (two first runs start one)

Environment: THERMOCAL_SERVER=ephemeral runs without it (Prefect's temporary server per process,
as before); THERMOCAL_SERVER_IDLE sets the idle time in seconds (default three hours, 0: never);
THERMOCAL_SERVER_PORT the first port to try (default 4200; the next free one if it is taken).
A PREFECT_API_URL, from the environment or the Prefect profile, always wins.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

IDLE_DEFAULT = 3 * 3600.0
PORT_DEFAULT = 4200
PORTS_TRIED = 20  # 4200..4219: past a port another program holds, the next free one
STARTUP_TIMEOUT = 120.0  # a cold server on a new machine migrates its database first (20-30 s here)


def api_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def home() -> Path:
    """PREFECT_HOME, read without importing Prefect (about 2 s)."""
    return Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()


@dataclass(frozen=True)
class ServerFiles:
    port: int

    def _path(self, suffix: str) -> Path:
        return home() / f"thermocal-server-{self.port}{suffix}"

    @property
    def pid(self) -> Path:
        return self._path(".pid")

    @property
    def log(self) -> Path:
        return self._path(".log")

    @property
    def used(self) -> Path:
        return self._path(".used")

    @property
    def leases(self) -> Path:
        return self._path(".leases")

    def read_pid(self) -> int | None:
        try:
            return int(self.pid.read_text())
        except (OSError, ValueError):
            return None


def server_env(port: int) -> dict:
    """A server on 127.0.0.1:port whose UI calls the API on that same port, without telemetry."""
    return {
        **os.environ,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": api_url(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT__SERVER_FINAL": "1",  # one app in the process, as `prefect server start` creates it
    }


def server_command(port: int) -> list[str]:
    """Prefect's API and UI server on 127.0.0.1:port: the uvicorn command Prefect's own temporary
    server runs (prefect.server.api.server.SubprocessASGIServer), with the UI left on."""
    prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent
    return [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent), "--factory", "prefect.server.api.server:create_app",
            "--host", "127.0.0.1", "--port", str(port), "--lifespan", "on", "--log-level", "warning"]


def healthy(port: int, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url(port)}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def port_taken(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except OSError:
        return True


def is_supervisor(pid: int) -> bool:
    """True when `pid` runs thermocal's server supervisor (so a reused process id is never signalled)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"flows.daemon" in command


def stop_group(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM to the process group `pid` leads (the supervisor and the server), SIGKILL after `timeout`."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not alive(pid):
            return


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _first_port() -> int:
    value = os.environ.get("THERMOCAL_SERVER_PORT", "").strip()
    if not value:
        return PORT_DEFAULT
    if not value.isdigit() or not 1024 <= int(value) <= 65535 - PORTS_TRIED:
        from tasks.errors import InvalidInput

        raise InvalidInput(f"THERMOCAL_SERVER_PORT must be a port number from 1024 to {65535 - PORTS_TRIED} (got {value!r})")
    return int(value)


def idle_seconds() -> float:
    value = os.environ.get("THERMOCAL_SERVER_IDLE", "")
    try:
        return float(value) if value.strip() else IDLE_DEFAULT
    except ValueError:
        from tasks.errors import InvalidInput

        raise InvalidInput(f"THERMOCAL_SERVER_IDLE must be a number of seconds (got {value!r})") from None


def describe_idle(seconds: float) -> str:
    if seconds <= 0:
        return "it keeps running until stopped"
    amount = f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
    return f"it stops by itself after {amount} unused"


# -- the supervisor ---------------------------------------------------------------------------


def leased(files: ServerFiles) -> bool:
    """A command holds a lease on the server (its process lives); leases of dead processes are removed."""
    held = False
    for lease in (p for p in files.leases.glob("*") if p.name.isdigit()) if files.leases.is_dir() else []:
        if alive(int(lease.name)):
            held = True
        else:
            lease.unlink(missing_ok=True)
    return held


def _in_use(files: ServerFiles, port: int) -> bool:
    """A command holds a lease (its process lives), or a flow run is running or about to."""
    if leased(files):
        return True
    body = json.dumps({"flow_runs": {"state": {"type": {"any_": ["RUNNING", "PENDING", "CANCELLING"]}}}}).encode()
    request = urllib.request.Request(f"{api_url(port)}/flow_runs/count", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.read()) > 0
    except (OSError, ValueError):
        return True  # a server too busy to answer is not idle


def _idle_for(files: ServerFiles, port: int) -> float:
    """Seconds since the server was last used (0 while it is in use)."""
    if _in_use(files, port):
        files.used.touch()
        return 0.0
    return time.time() - files.used.stat().st_mtime


def supervise(port: int, idle: float) -> int:
    """Run the server until it exits, SIGTERM arrives, or it has been unused for `idle` seconds."""
    files = ServerFiles(port)
    files.used.touch()
    server = subprocess.Popen(server_command(port), env=server_env(port), stdin=subprocess.DEVNULL)
    warm = _start_warm(port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    check = min(60.0, max(0.5, idle / 10)) if idle > 0 else 60.0
    reason, answered = None, False
    while not stop.wait(check):
        if server.poll() is not None:
            reason = f"the server exited with code {server.returncode}"
            break
        if warm is not None and warm.poll() == 0:  # it left because its libraries changed: a fresh one
            warm = _start_warm(port)
        if idle <= 0 or not healthy(port):
            continue
        if not answered:  # idle time counts from the moment it could first be used
            answered = True
            files.used.touch()
        if _idle_for(files, port) >= idle:
            # decided under the commands' lock: a command that found the server healthy has
            # touched `used` before releasing it, and one that comes after finds no server
            with _locked():
                if _idle_for(files, port) >= idle:
                    reason = f"unused for {describe_idle(idle).split('after ')[-1].removesuffix(' unused')}"
                    _end(server, files, warm)
                    break
    _end(server, files, warm)
    print(f"thermocal: local Prefect server on port {port} stopped ({reason or 'asked to stop'})", flush=True)
    return 0


def _start_warm(port: int) -> subprocess.Popen | None:
    """The warm interpreter runs fork from (flows.warm), in this process group; THERMOCAL_WARM=0: none."""
    from flows import warm

    if not warm.enabled():
        return None
    return subprocess.Popen([sys.executable, "-m", "flows.warm", "--port", str(port)], stdin=subprocess.DEVNULL)


def _end(server: subprocess.Popen, files: ServerFiles, warm: subprocess.Popen | None = None) -> None:
    for process in (warm, server):
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    if files.read_pid() == os.getpid():
        files.pid.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.daemon", description="thermocal's local Prefect server (started by thermocal)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle", type=float, default=IDLE_DEFAULT, help="seconds unused before it stops; 0: never")
    args = parser.parse_args(argv)
    return supervise(args.port, args.idle)


# -- the commands' side -----------------------------------------------------------------------


def start(port: int, idle: float, timeout: float = STARTUP_TIMEOUT, warm=None) -> int:
    """Start the supervisor on `port` in its own session; return its pid once the API answers.

    `warm()` is called while the server starts (the command's own imports, in parallel). If the
    server exits or stays silent for `timeout` seconds, it is stopped and the error shows the end
    of its log.
    """
    from tasks.durable import atomic_write
    from tasks.errors import InvalidInput

    files = ServerFiles(port)
    files.pid.parent.mkdir(parents=True, exist_ok=True)
    with open(files.log, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "flows.daemon", "--port", str(port), "--idle", str(idle)],
                                   env=server_env(port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    atomic_write(files.pid, lambda path: path.write_text(str(process.pid)))  # never seen half-written
    deadline = time.monotonic() + timeout
    if warm is not None:
        warm()
    while not healthy(port, timeout=1.0):
        if process.poll() is not None or time.monotonic() > deadline:
            what = f"exited with code {process.returncode}" if process.poll() is not None else f"did not answer within {timeout:g} s"
            stop_group(process.pid)
            process.wait()
            files.pid.unlink(missing_ok=True)
            raise InvalidInput(f"the Prefect server on port {port} {what}; the end of its log ({files.log}):\n{tail(files.log)}")
        time.sleep(0.2)
    return process.pid


def running_servers(prune: bool = False) -> list[tuple[int, int]]:
    """(port, supervisor pid) of thermocal's servers in this PREFECT_HOME whose process runs; with `prune` (under the
    commands' lock only: a command without it could take a pid file being written for dead), those of dead ones go."""
    found = []
    for pid_file in sorted(home().glob("thermocal-server-*.pid")):
        try:
            port = int(pid_file.name.removeprefix("thermocal-server-").removesuffix(".pid"))
        except ValueError:
            continue
        pid = ServerFiles(port).read_pid()
        if pid is not None and alive(pid) and is_supervisor(pid):
            found.append((port, pid))
        elif prune:
            pid_file.unlink(missing_ok=True)
    return found


@contextlib.contextmanager
def _locked():
    home().mkdir(parents=True, exist_ok=True)
    with open(home() / ".thermocal-server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure(say=lambda line: print(line, file=sys.stderr, flush=True), warm=None) -> int:
    """The port of thermocal's local server: the running one, or one started now (announced
    through `say`; `warm()` runs while it starts). A server whose process lives but whose API no longer answers is stopped and
    replaced; a port another program holds is skipped."""
    with _locked():
        for port, pid in running_servers(prune=True):
            if healthy(port, timeout=5.0):
                ServerFiles(port).used.touch()  # before the lock is released: see supervise
                return port
            stop_group(pid)
            ServerFiles(port).pid.unlink(missing_ok=True)
            say(f"thermocal: the local Prefect server on port {port} (process {pid}) did not answer; stopped it, starting another")
        first = _first_port()
        port = next((p for p in range(first, first + PORTS_TRIED) if not port_taken(p)), None)
        if port is None:
            from tasks.errors import InvalidInput

            raise InvalidInput(f"ports {first}-{first + PORTS_TRIED - 1} are all in use; set THERMOCAL_SERVER_PORT to a free one, "
                               "or THERMOCAL_SERVER=ephemeral")
        skipped = f" (port {first} is in use by another program)" if port != first else ""
        idle = idle_seconds()
        say(f"thermocal: starting a local Prefect server for this and later runs{skipped}; the first start takes 10-30 s")
        ServerFiles(port).leases.mkdir(parents=True, exist_ok=True)
        (ServerFiles(port).leases / str(os.getpid())).touch()  # this command's lease (see lease()), before the warm process looks
        pid = start(port, idle, warm=warm)
        ServerFiles(port).used.touch()
    say(f"thermocal: Prefect UI at http://127.0.0.1:{port} (process {pid}, log {ServerFiles(port).log}); {describe_idle(idle)}; "
        f"`thermocal server stop` stops it now; THERMOCAL_SERVER=ephemeral runs without it")
    return port


@contextlib.contextmanager
def lease(port: int):
    """Mark the server in use for as long as this process works with it."""
    files = ServerFiles(port)
    files.leases.mkdir(parents=True, exist_ok=True)
    mine = files.leases / str(os.getpid())
    mine.touch()
    files.used.touch()
    try:
        yield
    finally:
        mine.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            files.used.touch()


if __name__ == "__main__":
    sys.exit(main())
