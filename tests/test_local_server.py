"""thermocal's local Prefect server (flows/daemon.py) through its whole life: started by the first
`thermocal run` that needs it, shared by two first runs at once, reused, noticed when it died or
when its port is taken, stopped by `thermocal server stop` and by itself when unused. Every test
stops what it starts, by process id."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _free_port() -> int:
    """A port with the next one free too (a taken port makes the server move one up)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with socket.socket() as other:
            try:
                other.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two free ports in a row")


def _env(home: Path, port: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "THERMOCAL_"))}
    return {**env, "PREFECT_HOME": str(home), "THERMOCAL_SERVER_PORT": str(port), **extra}


def _run(env: dict, store: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "thermocal"), "run", "--json", "--store", str(store), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(process: subprocess.Popen) -> tuple[dict, str]:
    out, err = process.communicate(timeout=400)
    assert process.returncode == 0, err
    return json.loads(out), err


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.split(")", 1)[1].split()[0] != "Z"


def _servers(home: Path, what: bytes = b"flows.daemon") -> list[int]:
    """Running processes whose PREFECT_HOME is `home` and whose command line holds `what`
    (the supervisors; with b"uvicorn", Prefect's servers)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and what in (proc / "cmdline").read_bytes() \
                    and f"PREFECT_HOME={home}".encode() in (proc / "environ").read_bytes().split(b"\0") and _alive(int(proc.name)):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _supervisors(home: Path) -> list[int]:
    return _servers(home)


def _group(pid: int) -> list[int]:
    """The processes of the group `pid` leads (the supervisor and the server)."""
    members = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().split(")", 1)[1].split()[2]) == pid and _alive(int(proc.name)):
                members.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return members


@pytest.fixture
def home(tmp_path):
    """A fresh PREFECT_HOME; whatever server runs for it at the end is killed, and the test fails."""
    path = tmp_path / "prefect-home"
    yield path
    left = _supervisors(path) + _servers(path, b"uvicorn") + _servers(path, b"flows.warm")
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"the test left local servers running: {left}"


def _flow_runs(port: int) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/flow_runs/count", data=b"{}", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.read())


def test_first_runs_start_one_server_later_runs_reuse_it_and_stop_ends_it(tmp_path, home, readings_csv):
    port = _free_port()
    env = _env(home, port)
    store = tmp_path / "store"
    # two first runs at once: one server between them
    first, second = _run(env, store, "--data", str(readings_csv)), _run(env, store, "--data", str(readings_csv))
    (a, err_a), (b, err_b) = _finish(first), _finish(second)
    said = err_a + err_b
    assert a["train_loss"] == b["train_loss"] and a["run_id"] != b["run_id"]
    assert said.count("starting a local Prefect server") == 1, said
    assert f"Prefect UI at http://127.0.0.1:{port}" in said and "`thermocal server stop` stops it now" in said
    assert "THERMOCAL_SERVER=ephemeral runs without it" in said and "it stops by itself after 3 h unused" in said
    assert "Starting temporary server" not in said
    supervisors = _supervisors(home)
    assert len(supervisors) == 1
    pid = supervisors[0]
    assert int((home / f"thermocal-server-{port}.pid").read_text()) == pid
    assert len(_group(pid)) == 3  # the supervisor, Prefect's server and the warm process (flows.warm), one process group
    assert _flow_runs(port) == 2  # both runs are on it, so in its UI
    assert not list((home / f"thermocal-server-{port}.leases").iterdir())  # the runs released it

    # a later run reuses it, silently, and comes back cached
    again, err = _finish(_run(env, store, "--data", str(readings_csv)))
    assert "local Prefect server" not in err and _supervisors(home) == [pid]
    assert all(stage["cached"] for stage in again["stages"].values())
    assert _flow_runs(port) == 3

    status = subprocess.run([str(BIN / "thermocal"), "server", "status"], capture_output=True, text=True, env=env, timeout=60)
    assert status.returncode == 0 and f"up: http://127.0.0.1:{port}/api" in status.stdout and f"process {pid}" in status.stdout

    members = _group(pid)
    stopped = subprocess.run([str(BIN / "thermocal"), "server", "stop"], capture_output=True, text=True, env=env, timeout=120)
    assert stopped.returncode == 0 and f"stopped the Prefect server on port {port} (process {pid})" in stopped.stdout
    assert not any(_alive(member) for member in members)
    assert not (home / f"thermocal-server-{port}.pid").exists()
    down = subprocess.run([str(BIN / "thermocal"), "server", "status"], capture_output=True, text=True, env=env, timeout=60)
    assert down.returncode == 1 and "down: no thermocal server runs" in down.stdout


def test_only_a_command_holding_the_lock_removes_the_pid_file_of_a_server_it_finds_dead(tmp_path, monkeypatch):
    """A run looks for the warm process without the servers' lock: a pid file it finds half-written
    (empty), or naming a process that is not (yet) a supervisor, stays for the command that starts
    or checks servers under the lock. (A run that removed it made the next one start a second server.)"""
    from flows import daemon
    from flows.connect import warm_port

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("THERMOCAL_WARM", "1")
    monkeypatch.setenv("THERMOCAL_SERVER", "local")
    monkeypatch.setattr("flows.connect._configured_api_url", lambda: None)
    being_written, not_a_supervisor = daemon.ServerFiles(40001).pid, daemon.ServerFiles(40002).pid
    being_written.write_text("")
    not_a_supervisor.write_text(str(os.getpid()))
    assert warm_port() is None and daemon.running_servers() == []
    assert being_written.exists() and not_a_supervisor.exists()
    assert daemon.running_servers(prune=True) == []
    assert not being_written.exists() and not not_a_supervisor.exists()


def test_a_dead_server_and_a_taken_port_are_noticed_and_an_unused_server_stops_itself(tmp_path, home, readings_csv):
    port = _free_port()
    home.mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    (home / f"thermocal-server-{port}.pid").write_text(str(gone.pid))  # a server that died without tidying up
    env = _env(home, port, THERMOCAL_SERVER_IDLE="3")
    with socket.socket() as squatter:  # another program holds the first port: it speaks no HTTP
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        result, err = _finish(_run(env, tmp_path / "store", "--data", str(readings_csv)))
    assert result["train_loss"] > 0
    assert f"(port {port} is in use by another program)" in err and f"Prefect UI at http://127.0.0.1:{port + 1}" in err
    assert "it stops by itself after 3 s unused" in err
    assert not (home / f"thermocal-server-{port}.pid").exists()  # the dead one's file is gone
    pid = int(re.search(r"\(process (\d+),", err)[1])
    deadline = time.monotonic() + 120
    while (_alive(pid) or _servers(home, b"uvicorn")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(pid) and not _servers(home, b"uvicorn"), "the unused server did not stop by itself"
    assert "stopped (unused for 3 s)" in (home / f"thermocal-server-{port + 1}.log").read_text()
    assert not (home / f"thermocal-server-{port + 1}.pid").exists()


def test_a_server_killed_under_its_supervisor_is_replaced(tmp_path, home, readings_csv):
    port = _free_port()
    env = _env(home, port)
    _finish(_run(env, tmp_path / "store", "--data", str(readings_csv), "--epochs", "50"))
    [pid] = _supervisors(home)
    [server] = [member for member in _group(pid) if b"uvicorn" in Path(f"/proc/{member}/cmdline").read_bytes()]
    os.kill(server, signal.SIGKILL)  # the supervisor sees its server exit, tidies up and exits
    deadline = time.monotonic() + 120
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(pid) and not _servers(home, b"flows.warm")  # its warm process went with it
    try:
        result, err = _finish(_run(env, tmp_path / "store", "--data", str(readings_csv), "--epochs", "60"))
        assert "starting a local Prefect server" in err and result["epochs_run"] == 60
        assert len(_supervisors(home)) == 1 and _supervisors(home) != [pid]
    finally:
        subprocess.run([str(BIN / "thermocal"), "server", "stop"], capture_output=True, env=env, timeout=120)


def test_prefect_api_url_and_thermocal_server_ephemeral_start_no_local_server(tmp_path, home, readings_csv):
    env = _env(home, _free_port(), THERMOCAL_SERVER="ephemeral")
    result, err = _finish(_run(env, tmp_path / "store", "--data", str(readings_csv), "--epochs", "20"))
    assert result["epochs_run"] == 20
    assert "local Prefect server" not in err and not _supervisors(home) and not list(home.glob("thermocal-server-*"))
    for name, value, message in (("THERMOCAL_SERVER", "remote", "THERMOCAL_SERVER must be local or ephemeral (got 'remote')"),
                                 ("THERMOCAL_SERVER_PORT", "42x", "THERMOCAL_SERVER_PORT must be a port number from 1024 to 65515 (got '42x')"),
                                 ("THERMOCAL_SERVER_IDLE", "3h", "THERMOCAL_SERVER_IDLE must be a number of seconds (got '3h')")):
        bad = subprocess.run([str(BIN / "thermocal"), "run", "--data", str(readings_csv)], capture_output=True, text=True,
                             env={**env, "THERMOCAL_SERVER": "local", name: value}, timeout=120)
        assert bad.returncode == 2 and f"thermocal: error: {message}" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not _supervisors(home)


@pytest.mark.parametrize("source", ["environment", ".env", "prefect.toml", "pyproject.toml", "profile"])
def test_a_prefect_api_url_from_any_of_prefects_sources_wins_over_the_local_server(tmp_path, source):
    """Read as Prefect would, without importing it (run in a fresh process: this one has Prefect loaded)."""
    url = "http://127.0.0.1:9/api"
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    files = {".env": f'export PREFECT_API_URL="{url}"\n', "prefect.toml": f'[api]\nurl = "{url}"\n',
             "pyproject.toml": f'[tool.prefect.api]\nurl = "{url}"\n'}
    if source == "environment":
        env["PREFECT_API_URL"] = url
    elif source == "profile":
        (home / "profiles.toml").write_text(f'active = "mine"\n[profiles.mine]\nPREFECT_API_URL = "{url}"\n')
    else:
        (tmp_path / source).write_text(files[source])
    check = "from flows.connect import _configured_api_url; print(_configured_api_url())"
    found = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert found.stdout.strip() == url, found.stderr
    for name in files:
        (tmp_path / name).unlink(missing_ok=True)
    (home / "profiles.toml").unlink(missing_ok=True)
    env.pop("PREFECT_API_URL", None)
    none = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert none.stdout.strip() == "None", none.stderr


def test_prefect_clients_share_one_verified_tls_context_per_certificate_file(tmp_path, monkeypatch):
    # Prefect builds a verified TLS context (every CA certificate loaded, 25-30 ms) for each API
    # client; share_tls_context gives each the same one, built as Prefect builds it, once per file
    import ssl

    import certifi
    from prefect.client.orchestration import PrefectClient, SyncPrefectClient
    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY, temporary_settings

    from flows.connect import share_tls_context, verified_tls

    built = []
    real = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *args, **kwargs: built.append(kwargs) or real(*args, **kwargs))
    share_tls_context()
    share_tls_context()  # installed once
    verified_tls.cache_clear()
    api = "http://127.0.0.1:9/api"
    default = PREFECT_API_SSL_CERT_FILE.value() or certifi.where()  # Prefect's choice (SSL_CERT_FILE, if set)
    for cls in (PrefectClient, SyncPrefectClient, PrefectClient):
        cls(api)
    assert built == [{"cafile": default}]
    assert verified_tls(default).verify_mode == ssl.CERT_REQUIRED and verified_tls(default).check_hostname
    own = tmp_path / "ca.pem"
    own.write_text(Path(certifi.where()).read_text())
    with temporary_settings({PREFECT_API_SSL_CERT_FILE: str(own)}):
        SyncPrefectClient(api), PrefectClient(api)
    assert built == [{"cafile": default}, {"cafile": str(own)}]  # the file PREFECT_API_SSL_CERT_FILE names, once
    with temporary_settings({PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):  # left to Prefect, which turns checks off
        PrefectClient(api), PrefectClient(api)
    assert built[2:] == [{}, {}]
    PrefectClient(api, httpx_settings={"verify": real()})  # a client given a context of its own builds none
    assert len(built) == 4
