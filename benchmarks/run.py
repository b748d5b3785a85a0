"""make bench: thermocal against its references, each pair measured side by side in this run.

Every figure is what a person waits for: whole processes for commands (wall time of the process,
as `time` shows it), and for stages the seconds a real run reports in its JSON. Pairs are measured
alternately, several times, and the medians compared (this machine is shared and noisy). Prints
one table: measure, thermocal, reference, ratio, and the goal the ratio is held to (issue 10).

A local server of thermocal's own (flows/daemon.py) is started in a fresh PREFECT_HOME below
benchmarks/.cache and stopped at the end; nothing else is left running. Once its warm process
(flows/warm.py) is ready, runs fork from it, as a user's later runs do; the rows that measure a
run's peak memory run it in a process of its own (THERMOCAL_WARM=0), where its memory is its own.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
PYTHON = sys.executable
THERMOCAL = str(Path(PYTHON).parent / "thermocal")
ROWS = int(os.environ.get("BENCH_ROWS", 10_000_000))
REPEATS = int(os.environ.get("BENCH_REPEATS", 5))
SHIPPED = ROOT / "data" / "readings.csv"
rows_out: list[tuple[str, ...]] = []

# Prefect's own one-task flow, the reference for a run's fixed cost
MINIMAL = """
from prefect import flow, task

@task
def one():
    return 1

@flow
def minimal():
    return one()

minimal()
"""

# one of the seed's loops (benchmarks/seed_loops.py) in a fresh process, timed as the real run
# times its training: the loop alone, first call, on the readings x0.1
SEED_LOOP = """
import sys, time
import pandas as pd, torch
sys.path.insert(0, "benchmarks")
from seed_loops import run_seed_loop, plain_autograd
table = pd.read_csv("data/readings.csv")
t_u = torch.tensor(table["reading"].to_numpy(), dtype=torch.float32)
t_c = torch.tensor(table["celsius"].to_numpy(), dtype=torch.float32)
what = sys.argv[1]
if what in ("analytic", "finite-difference", "autograd", "optimizer"):
    started = time.perf_counter()
    run_seed_loop(what, 0.1 * t_u, t_c)
else:
    import io, contextlib
    from tasks.models import make_model
    model = make_model(what).fit((0.1 * t_u).double().numpy())
    f = model.features(0.1 * t_u.double()).float()
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        plain_autograd(what, f, t_c, float(sys.argv[2]))
print(time.perf_counter() - started)
"""

# a command as a child, its wall time and its peak resident memory (RUSAGE_CHILDREN: the child alone)
PEAK = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"seconds": time.perf_counter() - started, "peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "code": done.returncode, "stdout": done.stdout, "stderr": done.stderr[-2000:]}))
"""

READ_CSV = """
import sys, time
import pandas as pd
started = time.perf_counter()
pd.read_csv(sys.argv[1])
print(time.perf_counter() - started)
"""


def report(measure: str, thermocal: str, reference: str, ratio: float | None, goal: float | None = None, fmt: str = "{:.2f}x") -> None:
    ratio_text = "-" if ratio is None else fmt.format(ratio)
    goal_text = "-" if goal is None else f"≤ {fmt.format(goal)}: {'met' if ratio is not None and ratio <= goal else 'NOT met'}"
    rows_out.append((measure, thermocal, reference, ratio_text, goal_text))
    print(f"  {measure}: {thermocal} vs {reference} ({ratio_text}; goal {goal_text})", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "THERMOCAL_"))}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", **extra}


def wall(command: list[str], env: dict, check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-3000:]}")
    return seconds, done


def alternate(commands: dict[str, tuple[list[str], dict]], repeats: int = REPEATS) -> dict[str, float]:
    """Median wall seconds of each command, run in turn `repeats` times."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, (command, env) in commands.items():
            times[name].append(wall(command, env)[0])
    return {name: statistics.median(values) for name, values in times.items()}


def run_json(env: dict, *args: str) -> dict:
    _, done = wall([THERMOCAL, "run", "--json", *args], env)
    return json.loads(done.stdout)


def stop_servers(env: dict) -> None:
    subprocess.run([THERMOCAL, "server", "stop"], capture_output=True, env=env, cwd=ROOT, timeout=120)


# -- 2. local runs in seconds, 3. a cached run costs what Prefect costs -------------------------------


def bench_local_server(work: Path) -> dict:
    """First run on a fresh machine, then cached and --lr runs against the server it started.
    Returns the environment of the server left running for the benches after it."""
    firsts, prefect_firsts = [], []
    for attempt in range(2):
        ours_home, prefect_home = work / f"first-home-{attempt}", work / f"prefect-first-home-{attempt}"
        env = base_env(ours_home, THERMOCAL_SERVER_PORT=str(free_port()))
        # Prefect's default 20 s start-up timeout is too short for a first start here (../shared/FACTS.md)
        prefect_firsts.append(wall([PYTHON, "-c", MINIMAL], base_env(prefect_home, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120"))[0])
        seconds, _ = wall([THERMOCAL, "run", "--store", str(work / f"first-store-{attempt}")], env)
        firsts.append(seconds)
        if attempt == 0:
            stop_servers(env)
    ours, prefect = statistics.median(firsts), statistics.median(prefect_firsts)
    report("first `thermocal run` on a fresh machine (no server, fresh PREFECT_HOME; starts the local server; computes every stage)",
           f"{ours:.1f} s", f"Prefect's own first one-task flow, ephemeral, fresh PREFECT_HOME {prefect:.1f} s", ours / prefect, 1.0)

    port = int(env["THERMOCAL_SERVER_PORT"])
    warm = wait_for_warm(env)
    store = str(work / "first-store-1")
    reference = ([PYTHON, "-c", MINIMAL], {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"})
    own = {**env, "THERMOCAL_WARM": "0"}
    for first_rate, how, run_env, goals in ((0.30, "forked from the local server's warm process", env, (1.1, 1.4)),
                                            (0.40, "in a process of its own, THERMOCAL_WARM=0", own, (None, None))):
        cached = alternate({"ours": ([THERMOCAL, "run", "--store", store], run_env), "prefect": reference})
        report(f"`thermocal run` again, every stage cached (whole process, {how}; the local server from the run before)",
               f"{cached['ours']:.2f} s", f"Prefect's one-task flow against the same server {cached['prefect']:.2f} s",
               cached["ours"] / cached["prefect"], goals[0])
        ours, prefect = [], []
        for i in range(REPEATS):  # a new rate each time, so the training is never cached
            ours.append(wall([THERMOCAL, "run", "--store", store, "--lr", f"{first_rate + 0.01 * i:.2f}"], run_env)[0])
            prefect.append(wall(*reference)[0])
        changed = {"ours": statistics.median(ours), "prefect": statistics.median(prefect)}
        report(f"`thermocal run --lr` with a new rate (train, validate, infer and report computed; whole process, {how})",
               f"{changed['ours']:.2f} s", f"Prefect's one-task flow against the same server {changed['prefect']:.2f} s",
               changed["ours"] / changed["prefect"], goals[1])
    forked = (Path(env["PREFECT_HOME"]) / f"thermocal-server-{port}.log").read_text().count("thermocal: run ")
    print(f"warm process {warm}: {forked} runs forked from it so far", file=sys.stderr)
    return env


def wait_for_warm(env: dict, timeout: float = 300.0) -> int:
    """The pid of the local server's warm process, once it says it is ready (it imports after the
    first run has finished: a user's next runs find it so)."""
    log = Path(env["PREFECT_HOME"]) / f"thermocal-server-{env['THERMOCAL_SERVER_PORT']}.log"
    deadline = time.monotonic() + timeout
    while "ready for runs" not in (log.read_text() if log.exists() else ""):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the warm process did not get ready within {timeout:g} s: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    return int(log.read_text().split("warm process ", 1)[1].split()[0])


# -- 1. instant commands ------------------------------------------------------------------------------


def bench_commands(work: Path, env: dict) -> None:
    store = work / "families"
    run_ids = {spec: run_json(env, "--store", str(store), "--model", spec)["run_id"] for spec in ("linear", "poly:3", "mlp:13")}
    commands = {
        "thermocal --help": [THERMOCAL, "--help"],
        "thermocal synth --help": [THERMOCAL, "synth", "--help"],
        "thermocal runs": [THERMOCAL, "runs", "--store", str(store)],
        **{f"thermocal predict 45 (a {spec} run)": [THERMOCAL, "predict", "45", "--run", run_id, "--store", str(store)]
           for spec, run_id in run_ids.items()},
    }
    pandas = [PYTHON, "-c", "import pandas"]
    for name, command in commands.items():
        t = alternate({"ours": (command, env), "pandas": (pandas, env)})
        report(f"`{name}` (whole process)", f"{t['ours']:.2f} s", f"`python -c \"import pandas\"` {t['pandas']:.2f} s",
               t["ours"] / t["pandas"], 1.0)


# -- 4. training loops at the hardware's pace ---------------------------------------------------------


def _seed_seconds(what: str, lr: float = 0.0) -> float:
    _, done = wall([PYTHON, "-c", SEED_LOOP, what, str(lr)], {**os.environ})
    return float(done.stdout.strip().splitlines()[-1])


def bench_loops(work: Path, env: dict, repeats: int = 3) -> None:
    goals = {"analytic": 0.5, "finite-difference": 0.5, "autograd": 1.0, "optimizer": 1.0}
    count = iter(range(10_000))
    seed_analytic = []
    for strategy, goal in goals.items():
        ours, seed = [], []
        for _ in range(repeats):
            extra = ["--optimizer", "sgd"] if strategy == "optimizer" else []
            result = run_json(env, "--store", str(work / f"loops-{next(count)}"), "--normalize", "scale", "--lr", "1e-2",
                              "--epochs", "5000", "--strategy", strategy, *extra)
            ours.append(result["train_seconds"])
            seed.append(_seed_seconds(strategy))
        if strategy == "analytic":
            seed_analytic = seed
        o, s = statistics.median(ours), statistics.median(seed)
        report(f"5000 epochs in a real run (`train_seconds`), {strategy}{' sgd' if strategy == 'optimizer' else ''}, the seed's configuration",
               f"{o * 1e6 / 5000:.0f} µs/epoch", f"the seed's own loop {s * 1e6 / 5000:.0f} µs/epoch", o / s, goal)
    # a few milliseconds, in which one descheduling of the training thread on this 2-core machine
    # (the server handles the run's calls meanwhile) costs as much again: five runs, as the table's others
    default = statistics.median(run_json(env, "--store", str(work / f"loops-{next(count)}"))["train_seconds"] for _ in range(5))
    seed = statistics.median(seed_analytic)
    report("default run's training on the shipped readings (`train_seconds`)", f"{default * 1000:.1f} ms",
           f"the seed's 5000-epoch hand-gradient loop {seed * 1000:.0f} ms", default / seed, 0.01, fmt="{:.4f}x")
    for spec, lr in (("poly:3", 0.5), ("mlp:13", 1e-3)):
        reference = statistics.median(_seed_seconds(spec, lr) for _ in range(repeats))
        for strategy in goals:
            ours = statistics.median(
                run_json(env, "--store", str(work / f"loops-{next(count)}"), "--model", spec, "--normalize", "scale", "--lr", str(lr),
                         "--epochs", "5000", "--strategy", strategy, "--delta", "1e-2")["train_seconds"] for _ in range(repeats - 1))
            report(f"5000 epochs in a real run (`train_seconds`), {spec}, {strategy}", f"{ours * 1e6 / 5000:.0f} µs/epoch",
                   f"a plain autograd loop of {spec} {reference * 1e6 / 5000:.0f} µs/epoch", ours / reference)


# -- 5. large files -----------------------------------------------------------------------------------


def bench_large_file(work: Path, env: dict) -> None:
    from tasks.synth import write_synthetic

    path = CACHE / f"synthetic-{ROWS}.csv"
    if not path.exists():
        write_synthetic(path, ROWS, seed=0)
    table_mb = ROWS * 2 * 8 / 2**20  # two float64 columns

    own = {**env, "THERMOCAL_WARM": "0"}  # memory: the run's process is the one measured

    def peak(data: Path, store: Path, run_env: dict = own) -> dict:
        _, done = wall([PYTHON, "-c", PEAK, THERMOCAL, "run", "--json", "--data", str(data), "--store", str(store)], run_env)
        # each run's store goes once measured: a gigabyte of page cache per run left behind makes the
        # kernel reclaim memory in the middle of a later run's writes
        shutil.rmtree(store, ignore_errors=True)
        measured = json.loads(done.stdout)
        if measured["code"] != 0:
            raise RuntimeError(measured["stderr"])
        return {**measured, "result": json.loads(measured["stdout"])}

    small = [peak(SHIPPED, work / f"small-{i}") for i in range(2)]
    runs, forked, reads = [], [], []
    for i in range(3):
        runs.append(peak(path, work / f"large-{i}"))
        forked.append(peak(path, work / f"large-forked-{i}", env))
        reads.extend(float(wall([PYTHON, "-c", READ_CSV, str(path)], env)[1].stdout) for _ in range(2))
    read = statistics.median(reads)
    for how, measured, goal in (("forked from the warm process", forked, 2.0), ("in a process of its own, THERMOCAL_WARM=0", runs, None)):
        ingest = statistics.median(r["result"]["stages"]["ingest"]["seconds"] for r in measured)
        report(f"ingest stage on {ROWS:,} rows (`seconds` in the run's JSON; {how})", f"{ingest:.2f} s",
               f"`pandas.read_csv` of the file in a fresh process {read:.2f} s", ingest / read, goal)
    extra = max(r["peak_mb"] for r in runs) - max(r["peak_mb"] for r in small)
    report(f"whole run on {ROWS:,} rows: peak resident memory above a run on the shipped readings (each in a process of its own)",
           f"{extra:.0f} MB", f"the table itself {table_mb:.0f} MB", extra / table_mb, 3.0)
    stages = ", ".join(f"{name} {stage['seconds']:.1f}" for name, stage in runs[-1]["result"]["stages"].items())
    report(f"whole run on {ROWS:,} rows, wall time (stage seconds: {stages})", f"{statistics.median(r['seconds'] for r in runs):.1f} s",
           f"{runs[-1]['result']['epochs_run']} full-batch epochs, gap {runs[-1]['result']['gap_to_optimum']:.1e}", None)


SENSORS = int(os.environ.get("BENCH_SENSORS", 10_000))

# the obvious alternative to a fleet run's training: pandas groupby on the sensor and numpy.polyfit
# per sensor (the file's reading excluded), and float64 least squares for every sensor's gap
GROUPBY_POLYFIT = """
import json, sys, time
import numpy as np, pandas as pd
frame = pd.read_csv(sys.argv[1], dtype={"sensor": str})
started = time.perf_counter()
fits = {s: np.polyfit(g["reading"].to_numpy(), g["celsius"].to_numpy(), 1) for s, g in frame.groupby("sensor", sort=False)
        if g["reading"].nunique() > 1}
print(json.dumps({"seconds": time.perf_counter() - started, "sensors": len(fits)}))
"""


def bench_fleet(work: Path, env: dict) -> None:
    """A fleet of SENSORS sensors x 1000 readings: the run's training span against groupby + polyfit,
    each calibration's gap to its least squares, and the run's extra peak memory."""
    import pandas as pd

    from tasks.synth import write_fleet

    rows = SENSORS * 1000
    path = CACHE / f"fleet-{SENSORS}x1000.csv"
    if not path.exists():
        write_fleet(path, SENSORS, rows, seed=0)
    lean_mb = rows * (8 + 8 + 4) / 2**20  # two float64 columns and an int32 sensor code

    def peak(data: Path, store: Path, *extra: str) -> dict:  # in a process of its own: its memory is the run's
        _, done = wall([PYTHON, "-c", PEAK, THERMOCAL, "run", "--json", "--data", str(data), "--store", str(store), *extra],
                       {**env, "THERMOCAL_WARM": "0"})
        measured = json.loads(done.stdout)
        if measured["code"] != 0:
            raise RuntimeError(measured["stderr"])
        return {**measured, "result": json.loads(measured["stdout"])}

    small = max(peak(SHIPPED, work / f"fleet-small-{i}")["peak_mb"] for i in range(2))
    runs, references = [], []
    for i in range(2):
        runs.append(peak(path, work / f"fleet-{i}", "--sensor-column", "sensor"))
        references.append(json.loads(wall([PYTHON, "-c", GROUPBY_POLYFIT, str(path)], env)[1].stdout)["seconds"])
    train = statistics.median(r["result"]["stages"]["train"]["seconds"] for r in runs)
    reference = statistics.median(references)
    result = runs[-1]["result"]
    report(f"fleet of {SENSORS:,} sensors x 1,000 readings: training (`stages.train.seconds`; THERMOCAL_WARM=0)", f"{train:.2f} s",
           f"pandas groupby + numpy.polyfit per sensor {reference:.2f} s", train / reference, 1.0)
    table = pd.read_csv(result["sensors_table"])
    calibrated = table[table["status"] == "calibrated"]
    beyond = float((calibrated["gap_to_optimum"] > 1e-6).mean())
    report("fleet: share of calibrated sensors whose gap to float64 least squares exceeds 1e-6",
           f"{beyond:.3%} of {len(calibrated):,}", f"{result['fleet']['failed']} sensors failed (broken in the file)", beyond, 0.001, "{:.3%}")
    extra = max(r["peak_mb"] for r in runs) - small
    stages = ", ".join(f"{name} {stage['seconds']:.1f}" for name, stage in result["stages"].items())
    report(f"fleet run: peak resident memory above a run on the shipped readings (each in a process of its own; stage seconds: {stages})", f"{extra:.0f} MB",
           f"the lean table {lean_mb:.0f} MB", extra / lean_mb, 3.0)


def main() -> int:
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    import torch

    work = CACHE / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
               f"load average {os.getloadavg()[0]:.1f} at the start, Python {platform.python_version()}, torch {torch.__version__}")
    print(f"machine: {machine}", file=sys.stderr)
    env = None
    try:
        env = bench_local_server(work)
        bench_commands(work, env)
        bench_loops(work, env)
        bench_large_file(work, env)
        bench_fleet(work, env)
    finally:
        for home in work.glob("*home*"):
            stop_servers(base_env(home))
    print(f"\nmachine: {machine}; medians of {REPEATS} alternating runs unless stated\n")
    print("| measure | thermocal | reference | ratio | goal |\n|---|---|---|---|---|")
    for row in rows_out:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
