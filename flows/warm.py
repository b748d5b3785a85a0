"""A warm interpreter beside the local server: `thermocal run` in a process forked from it.

A run that computes a stage pays for importing torch (about 2.5 s here), matplotlib, pandas and
pandera on top of Prefect's own start-up; a run with a new --lr took 2.3 times Prefect's one-task
flow. The local server's supervisor (flows.daemon) therefore keeps one more process: this one,
which imports those libraries once (after any command then running has finished, so it never
competes with one) and then waits on a Unix socket. `thermocal run` hands it its command line,
working directory, environment, import path and terminal (stdin, stdout and stderr, passed as
file descriptors), and it forks: the copy becomes the run, as the process that started it would
have. In the copy, Prefect re-reads its settings and sets up its logging from the command's
environment and folder (as Prefect itself does after plugins change the environment), and
thermocal's own modules are imported fresh from the command's import path (an edited checkout
runs its edits). The command waits for the copy's exit code and passes on Ctrl-C and termination
signals; the copy ends if the command does. This is the zygote of Android and the fork server of
Python's multiprocessing, kept as Gradle keeps its daemon. A run then skips the 2-5 s its imports
took: in `make bench` a cached run took 0.5-0.6x Prefect's own one-task flow and a run with a new
--lr 0.7-0.9x (2.4x in a process of its own).

The command falls back to running in its own process whenever the warm process is not there yet,
was started from other library files (a package upgraded since: it then exits, and the supervisor
starts a fresh one) or from another interpreter or import-time environment (THERMOCAL_WARM_ENV
below), and always with THERMOCAL_WARM=0 (or with a PREFECT_API_URL or THERMOCAL_SERVER=ephemeral,
which have no local server). Only the user who started it can connect (SO_PEERCRED).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import signal
import socket
import struct
import sys
import threading
import time

# what the warm process imports (the modules of Prefect that thermocal's flows use, not its server);
# the fingerprint stats their packages' files, without importing them
PRELOADED = ("numpy", "pandas", "pandera.pandas", "joblib", "torch", "matplotlib", "matplotlib.pyplot",
             "prefect", "prefect.main", "prefect.artifacts", "prefect.client.orchestration", "prefect.context", "prefect.events",
             "prefect.futures", "prefect.logging.handlers", "prefect.runtime", "prefect.settings", "prefect.states",
             "prefect.task_runners", "prefect.utilities.annotations")
# environment variables these libraries (or the interpreter) read once, at start-up or import:
# a command whose values differ gets a process of its own
THERMOCAL_WARM_ENV = ("PANDERA_", "MPL", "MATPLOTLIB", "TORCH", "PYTORCH", "OMP_", "MKL_", "KMP_", "OPENBLAS", "NUMEXPR",
                      "PYTHON", "LD_", "LANG", "LC_", "HOME", "XDG_", "TMP", "TEMP", "CUDA")
STAT_SAMPLES = ("__init__.py", "version.py", "_version.py")


def enabled() -> bool:
    """False with THERMOCAL_WARM=0 (or off, no, false): every run in a process of its own, as before."""
    return os.environ.get("THERMOCAL_WARM", "1").strip().lower() not in ("0", "off", "no", "false")


def _address(port: int) -> bytes:
    """An abstract Unix socket (no file to leave behind, no path-length limit) named by PREFECT_HOME and port."""
    from flows.daemon import home

    digest = hashlib.sha256(str(home().resolve()).encode()).hexdigest()[:16]
    return f"\0thermocal-warm-{digest}-{port}".encode()


def _library_files() -> list[str]:
    """sizes and modification times of the preloaded packages' files (a reinstall changes them)."""
    found = []
    for name in dict.fromkeys(module.split(".")[0] for module in PRELOADED):
        spec = importlib.util.find_spec(name)
        folder = os.path.dirname(spec.origin) if spec and spec.origin else None
        for sample in STAT_SAMPLES if folder else ():
            with contextlib.suppress(OSError):
                info = os.stat(os.path.join(folder, sample))
                found.append(f"{name}/{sample}:{info.st_size}:{info.st_mtime_ns}")
    return found


def fingerprint() -> dict:
    """What must match between a command and the warm process for the fork to be that command."""
    env = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith(THERMOCAL_WARM_ENV))
    interpreter = [sys.executable, sys.prefix, sys.version, repr(sys.flags), repr(sys.warnoptions), repr(sys._xoptions)]
    return {"interpreter": interpreter, "env": env, "libraries": _library_files()}


def _send(conn: socket.socket, message: dict) -> None:
    data = json.dumps(message).encode()
    conn.sendall(struct.pack("!I", len(data)) + data)


def _receive(conn: socket.socket, fds: int = 0) -> tuple[dict, list[int]]:
    head, received, _, _ = socket.recv_fds(conn, 4, fds) if fds else (conn.recv(4, socket.MSG_WAITALL), [], 0, None)
    if len(head) < 4:
        raise ConnectionError("closed")
    size, data = struct.unpack("!I", head)[0], b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return json.loads(data), received


# -- the command's side ---------------------------------------------------------------------------


def delegate(port: int, argv: list[str]) -> int | None:
    """Run `thermocal ARGV` in a fork of the warm process for the server on `port`; its exit code,
    or None when there is no such process or it is not this command's (the caller runs it itself)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(_address(port))
        request = {"fingerprint": fingerprint(), "argv": [sys.argv[0], *argv], "cwd": os.getcwd(), "env": dict(os.environ),
                   "path": sys.path, "encoding": [sys.stdout.encoding, sys.stderr.encoding]}
        data = json.dumps(request).encode()
        sys.stdout.flush()
        sys.stderr.flush()
        socket.send_fds(conn, [struct.pack("!I", len(data)) + data], [0, 1, 2])
        answer, _ = _receive(conn)
    except OSError:  # no warm process (yet), or a descriptor that cannot be passed
        conn.close()
        return None
    if "pid" not in answer:
        conn.close()
        return None
    pid = answer["pid"]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, lambda number, _frame: _forward(pid, number))
    try:
        return int(_receive(conn)[0]["exit"])
    except (OSError, ValueError, KeyError):
        return 1
    finally:
        conn.close()


def _forward(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, number)


# -- the warm process -----------------------------------------------------------------------------


def _wait_while_leased(port: int) -> None:
    """Until no command holds a lease on the server: the imports take a core for seconds."""
    from flows.daemon import ServerFiles, leased

    while leased(ServerFiles(port)):
        time.sleep(0.2)


def _preload() -> dict:
    """Import PRELOADED; returns the environment variables the imports set (torch, pandera set some)."""
    import importlib

    before = dict(os.environ)
    import matplotlib

    matplotlib.use("Agg")  # what tasks.report draws with
    for name in PRELOADED:
        importlib.import_module(name)
    return {k: v for k, v in os.environ.items() if before.get(k) != v}


def _warm_up() -> None:
    """Run, once, what every run's first calls would otherwise set up in each fork: torch's
    kernels for the training ops (a least-squares step, a batched evaluation, autograd's backward
    and a torch.optim step, whose first call loads torch._dynamo), pandas' CSV parser, a pandera
    validation, a matplotlib figure saved as PNG and PDF (its fonts), and the TLS context Prefect's
    API clients share (flows.connect.share_tls_context). All on a few numbers, in
    this thread only: torch starts no thread pool for tensors this small, which the check after it
    confirms (a fork copies only the thread that forks; numpy's OpenBLAS, whose thread exists from
    its import, restarts its own in a fork)."""
    import io

    threads = _threads()

    import matplotlib.pyplot as plt
    import pandas as pd
    import pandera.pandas as pa
    import torch

    x, y = torch.linspace(0.0, 1.0, 8), torch.linspace(1.0, 2.0, 8)
    design = torch.stack([x, torch.ones_like(x)], dim=1)
    theta = torch.zeros(2)
    residual = torch.addmv(-y, design, theta)
    torch.sub(theta, torch.mv(design.T.contiguous(), residual), alpha=0.1)
    residuals = torch.addmm(-y, theta[None] + torch.eye(2), design.T.contiguous())  # two points at once
    losses = torch.linalg.vecdot(residuals, residuals) / torch.tensor(8.0)
    bool((losses <= 1e30).all() & (theta.abs() <= 1e30).all())  # the divergence checks
    torch.cat([torch.stack([losses[0], losses[1]]), losses])
    weights = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.SGD([weights], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(torch.mv(design, weights), y).backward()  # the loss autograd's loops differentiate
        optimizer.step()
    table = pd.read_csv(io.StringIO("reading,celsius\n1.0,2.0\n3.0,4.0\n"))
    pa.DataFrameSchema({"reading": pa.Column(float, pa.Check(lambda s: s > -1e9), coerce=True)}).validate(table, lazy=True)
    fig, ax = plt.subplots(1, 2, figsize=(5, 2))
    ax[0].plot([0, 1], [0, 1], "o-", label="readings")
    ax[1].plot([1, 2], [3, 1])
    ax[1].set_yscale("log")
    ax[0].legend()
    ax[0].set_title("Calibration")
    fig.tight_layout()
    fig.savefig(io.BytesIO(), format="png")
    fig.savefig(io.BytesIO(), format="pdf")
    plt.close(fig)
    import certifi

    from flows.connect import share_tls_context, verified_tls

    share_tls_context()
    verified_tls(certifi.where())  # the TLS context of Prefect's clients, built once for every fork
    if _threads() != threads:
        raise RuntimeError(f"the warm-up started threads ({threads} before, {_threads()} after): forks would miss them")


def _threads() -> int:
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1


def _child(conn: socket.socket, request: dict, fds: list[int], imports_set: dict) -> int:
    """In the fork: become the command, run it, return its exit code."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    out_encoding, err_encoding = request["encoding"]
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding=out_encoding, line_buffering=os.isatty(1))
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding=err_encoding, line_buffering=True)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    os.chdir(request["cwd"])
    os.environ.clear()
    # as after those imports in the command's own process; THERMOCAL_WARM=0: this run runs here, it
    # is not handed on again; THERMOCAL_FORKED_FROM: the objects it shares stay frozen (tasks.store)
    os.environ.update({**imports_set, **request["env"], "THERMOCAL_WARM": "0", "THERMOCAL_FORKED_FROM": str(os.getppid())})
    sys.argv, sys.path[:] = request["argv"], request["path"]
    for name in [m for m in sys.modules if m.split(".")[0] in ("flows", "tasks")]:
        del sys.modules[name]  # thermocal's own code comes from the command's import path, as edited now
    import random

    import matplotlib
    import numpy as np

    from prefect.context import refresh_global_settings_context
    from prefect.logging.configuration import setup_logging

    random.seed()  # a fresh interpreter's random state, not the one every fork would share
    np.random.seed()
    matplotlib.rcParams.update(matplotlib.rc_params())  # a matplotlibrc in the command's folder
    # Prefect's settings and logging as this command's environment and folder give them (Prefect's
    # own refresh, for variables set after its import), its handlers on this command's terminal
    from flows.connect import PREFECT_DEFAULTS

    for name, value in PREFECT_DEFAULTS.items():  # as flows.connect sets them before Prefect loads
        os.environ.setdefault(name, value)
    refresh_global_settings_context()
    setup_logging(incremental=False)
    threading.Thread(target=_end_with_command, args=(conn,), daemon=True).start()
    from flows.cli import main

    return main(sys.argv[1:])


def _end_with_command(conn: socket.socket) -> None:
    """The command sends nothing more: the connection ends only when it does; then so does this run."""
    with contextlib.suppress(OSError):
        conn.recv(1)
    os.kill(os.getpid(), signal.SIGTERM)


def _report_exit(conn: socket.socket, pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):
        _send(conn, {"exit": os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)})
    conn.close()


def _end_with_supervisor() -> None:
    """SIGTERM to this process when the supervisor that started it dies, even by SIGKILL (Linux)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # it died before that took effect
        sys.exit(0)


def serve(port: int) -> int:
    """The warm process: preload, then fork a run per request (returns in each fork: its exit code)."""
    _end_with_supervisor()
    _wait_while_leased(port)
    started = fingerprint()  # before the imports, which set variables of their own
    imports_set = _preload()
    _warm_up()
    import gc

    # what every fork shares stays shared: the collector would otherwise write to every object it
    # scans, and the system would copy each page it touches into each fork (copy-on-write)
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(_address(port))
    listener.listen(16)
    print(f"thermocal: warm process {os.getpid()} ready for runs on the server at port {port}", flush=True)
    while True:
        conn, _ = listener.accept()
        fds: list[int] = []
        try:
            peer = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            if peer[1] != os.getuid():
                raise ConnectionError(f"a process of user {peer[1]}")
            request, fds = _receive(conn, fds=3)
            if len(fds) != 3 or request["fingerprint"] != started:
                differs = [part for part in started if request["fingerprint"].get(part) != started[part]]
                _send(conn, {"refused": f"another {' and '.join(differs) or 'terminal'} than this process's"})
                if fingerprint()["libraries"] != started["libraries"]:
                    print("thermocal: the preloaded libraries changed on disk; the warm process exits", flush=True)
                    return 0  # the supervisor starts a fresh one
                raise ConnectionError(f"refused: another {' and '.join(differs) or 'terminal'}")
        except (OSError, ValueError, KeyError, struct.error) as error:
            for fd in fds:
                os.close(fd)
            conn.close()
            print(f"thermocal: a request was not served ({error})", flush=True)
            continue
        pid = os.fork()
        if pid == 0:
            listener.close()
            return _child(conn, request, fds, imports_set)
        for fd in fds:
            os.close(fd)  # the fork holds them; kept here, they would keep the command's pipes open
        print(f"thermocal: run {pid}: {' '.join(request['argv'][1:])}", flush=True)
        _send(conn, {"pid": pid})
        threading.Thread(target=_report_exit, args=(conn, pid), daemon=True).start()


def _exit(code: int) -> None:
    """End a fork as an interpreter ends (other threads joined, exit handlers run: Prefect sends
    what it still holds), without tearing down its modules: that would write to every object the
    fork shares with the warm process, copying hundreds of megabytes for nothing (over a second)."""
    import atexit

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.warm", description="thermocal's warm interpreter (started by the local server)")
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args(argv).port
    parent = os.getpid()
    code = serve(port)
    if os.getpid() != parent:  # a fork that ran a command
        _exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
