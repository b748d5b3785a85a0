"""The warm process beside the local server (flows/warm.py): `thermocal run` forks from it once it
is ready, gives the numbers and files a run of its own gives, passes exit codes, messages and
Ctrl-C through, refuses a command from another environment or after its libraries changed, and
ends with the server. Every test stops what it starts, by process id (the `home` fixture checks)."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from tests.test_local_server import BIN, _alive, _env, _finish, _free_port, _run, _servers, home  # noqa: F401 (a fixture)


def _log(home: Path, port: int) -> str:
    path = home / f"thermocal-server-{port}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _wait_for(condition, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _ready(home: Path, port: int, count: int = 1) -> int:
    """The pid of the warm process once `count` of them have said they are ready."""
    _wait_for(lambda: len(re.findall(r"warm process (\d+) ready", _log(home, port))) >= count, "the warm process")
    return int(re.findall(r"warm process (\d+) ready", _log(home, port))[-1])


def _forked(home: Path, port: int) -> list[int]:
    return [int(pid) for pid in re.findall(r"thermocal: run (\d+): run ", _log(home, port))]


def _stop(env: dict) -> None:
    subprocess.run([str(BIN / "thermocal"), "server", "stop"], capture_output=True, env=env, timeout=120)


def test_runs_fork_from_the_warm_process_and_equal_runs_of_their_own(tmp_path, home, readings_csv):
    port = _free_port()
    env = _env(home, port)
    try:
        _finish(_run(env, tmp_path / "first", "--data", str(readings_csv)))  # starts the server
        warm = _ready(home, port)
        assert warm in _servers(home, b"flows.warm")
        # two at once, each a fork; and the same runs in processes of their own
        a, b = _run(env, tmp_path / "a", "--data", str(readings_csv), "--lr", "0.3"), _run(env, tmp_path / "b", "--data", str(readings_csv), "--model", "poly:3")
        (forked_a, _), (forked_b, err_b) = _finish(a), _finish(b)
        assert len(_forked(home, port)) == 2 and not set(_forked(home, port)) & {warm}
        plain = {**env, "THERMOCAL_WARM": "0"}
        own_a, _ = _finish(_run(plain, tmp_path / "a2", "--data", str(readings_csv), "--lr", "0.3"))
        own_b, own_err_b = _finish(_run(plain, tmp_path / "b2", "--data", str(readings_csv), "--model", "poly:3"))
        assert len(_forked(home, port)) == 2  # THERMOCAL_WARM=0: not handed over
        for forked, own in ((forked_a, own_a), (forked_b, own_b)):
            assert forked["calibration"] == own["calibration"] and forked["train_loss"] == own["train_loss"]
            assert {name: Path(stage["path"]).parent.name for name, stage in forked["stages"].items()} == \
                   {name: Path(stage["path"]).parent.name for name, stage in own["stages"].items()}  # the same stage keys
            assert Path(forked["run_dir"], "manifest.json").exists()
        lines = [re.sub(r"^\S+ \| ", "", line) for line in err_b.splitlines() if "Task run" in line]
        assert lines == [re.sub(r"^\S+ \| ", "", line) for line in own_err_b.splitlines() if "Task run" in line]  # the same terminal lines

        # a user's mistake: the same message and exit code, through the fork
        bad = subprocess.run([str(BIN / "thermocal"), "run", "--data", str(tmp_path / "missing.csv")], capture_output=True, text=True,
                             env=env, timeout=300)
        own_bad = subprocess.run([str(BIN / "thermocal"), "run", "--data", str(tmp_path / "missing.csv")], capture_output=True,
                                 text=True, env=plain, timeout=300)
        assert len(_forked(home, port)) == 3
        assert bad.returncode == own_bad.returncode == 2 and bad.stderr == own_bad.stderr and "missing.csv" in bad.stderr
        assert "Traceback" not in bad.stderr
        assert not any(_alive(pid) for pid in _forked(home, port))  # every fork ended with its command
    finally:
        _stop(env)
    assert not _servers(home, b"flows.warm")


def test_ctrl_c_reaches_the_forked_run(tmp_path, home, readings_csv):
    port = _free_port()
    env = _env(home, port)
    try:
        _finish(_run(env, tmp_path / "store", "--data", str(readings_csv), "--epochs", "20"))
        _ready(home, port)
        long = subprocess.Popen([str(BIN / "thermocal"), "run", "--data", str(readings_csv), "--store", str(tmp_path / "store"),
                                 "--strategy", "finite-difference", "--epochs", "200000", "--log-every", "1000"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        _wait_for(lambda: _forked(home, port), "the fork")
        [fork] = _forked(home, port)
        time.sleep(3)  # into the training (200,000 epochs take 10-20 s)
        assert _alive(fork) and long.poll() is None
        long.send_signal(signal.SIGINT)
        # the fork gets the signal and ends as a run of its own does (today: once the training thread is done)
        out, err = long.communicate(timeout=300)
        assert long.returncode == 130 and "thermocal: interrupted" in err, err[-2000:]
        _wait_for(lambda: not _alive(fork), "the fork to end", timeout=60)
    finally:
        _stop(env)


def test_other_environments_and_changed_libraries_run_in_their_own_process(tmp_path, home, readings_csv):
    port = _free_port()
    env = _env(home, port, THERMOCAL_SERVER_IDLE="100")  # the supervisor looks every 10 s
    sample = Path(json.loads(subprocess.run([str(BIN / "python"), "-c", "import numpy, json; print(json.dumps(numpy.__file__))"],
                                            capture_output=True, text=True, timeout=60).stdout))
    try:
        _finish(_run(env, tmp_path / "store", "--data", str(readings_csv), "--epochs", "20"))
        first = _ready(home, port)
        other, _ = _finish(_run({**env, "PANDERA_VALIDATION_DEPTH": "SCHEMA_AND_DATA"}, tmp_path / "store", "--data",
                                str(readings_csv), "--epochs", "21"))
        assert other["epochs_run"] == 21 and not _forked(home, port)
        assert "not served (refused: another env)" in _log(home, port) and _alive(first)

        before = sample.stat()
        os.utime(sample, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))  # as a reinstall would
        try:
            upgrading = _run(env, tmp_path / "store", "--data", str(readings_csv), "--epochs", "22")
            _wait_for(lambda: "preloaded libraries changed on disk" in _log(home, port), "the warm process to notice")
        finally:
            os.utime(sample, ns=(before.st_atime_ns, before.st_mtime_ns))  # the next warm process sees these again
        upgraded, _ = _finish(upgrading)
        assert upgraded["epochs_run"] == 22 and not _forked(home, port)
        _wait_for(lambda: not _alive(first), "the stale warm process to exit", timeout=60)
        second = _ready(home, port, count=2)  # the supervisor started a fresh one
        assert second != first
        again, _ = _finish(_run(env, tmp_path / "store", "--data", str(readings_csv), "--epochs", "23"))
        assert again["epochs_run"] == 23 and len(_forked(home, port)) == 1, _log(home, port)
    finally:
        _stop(env)
    assert not _servers(home, b"flows.warm")
