"""make bench: thermocal against its references, each pair measured side by side in this run.

Prints one table. Times are the best of several repeats (this machine is shared and noisy);
memory is the peak resident size a fresh process adds while doing the one thing measured.
"""

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
PYTHON = sys.executable
ROWS = int(os.environ.get("BENCH_ROWS", 10_000_000))
rows_out: list[tuple[str, str, str, str]] = []


def report(measure: str, thermocal: str, reference: str, ratio: str) -> None:
    rows_out.append((measure, thermocal, reference, ratio))
    print(f"  {measure}: {thermocal} vs {reference} ({ratio})", file=sys.stderr, flush=True)


def best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def seed_data():
    import pandas as pd
    import torch

    table = pd.read_csv(ROOT / "data" / "readings.csv")
    return (torch.tensor(table["reading"].to_numpy(), dtype=torch.float32),
            torch.tensor(table["celsius"].to_numpy(), dtype=torch.float32))


def bench_strategies() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from seed_loops import run_seed_loop

    from tasks.train import train_model

    t_u, t_c = seed_data()
    t_un = 0.1 * t_u
    for strategy in ("analytic", "finite-difference", "autograd", "optimizer"):
        ours = lambda: train_model(t_un, t_c, None, None, strategy=strategy, lr=1e-2, epochs=5000, optimizer="sgd")
        seed = lambda: run_seed_loop(strategy, t_un, t_c)
        ours(), seed()  # warm-up: torch's first calls allocate and dispatch lazily
        ours_s, seed_s = best(ours), best(seed)
        report(f"train 5000 epochs, {strategy}", f"{ours_s * 1e6 / 5000:.0f} µs/epoch",
               f"seed loop {seed_s * 1e6 / 5000:.0f} µs/epoch", f"{ours_s / seed_s:.2f}x")


def bench_models() -> None:
    """The other model families' loops, 5000 epochs on the seed's x0.1 readings, against a plain
    autograd loop of the same model in the same run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import io
    from contextlib import redirect_stdout

    from seed_loops import plain_autograd

    from tasks.models import make_model
    from tasks.train import train_model

    t_u, t_c = seed_data()
    x = 0.1 * t_u
    for spec, lr in (("poly:3", 0.5), ("mlp:13", 1e-3)):
        model = make_model(spec).fit(x.double().numpy())
        f = model.features(x.double()).float()

        def reference():
            with redirect_stdout(io.StringIO()):  # its progress prints, as the seed's loops
                plain_autograd(spec, f, t_c, lr)

        reference()
        ref_s = best(reference)
        for strategy in ("analytic", "finite-difference", "autograd", "optimizer"):
            ours = lambda: train_model(f, t_c, None, None, model=model, strategy=strategy, lr=lr, epochs=5000, delta=1e-2)
            ours()
            ours_s = best(ours)
            report(f"train 5000 epochs, {spec}, {strategy}", f"{ours_s * 1e6 / 5000:.0f} µs/epoch",
                   f"plain autograd loop of {spec} {ref_s * 1e6 / 5000:.0f} µs/epoch", f"{ours_s / ref_s:.2f}x")


def bench_time_to_optimum() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import numpy as np
    from seed_loops import run_seed_loop

    from tasks.model import least_squares
    from tasks.models import Linear
    from tasks.normalize import fit_normalizer
    from tasks.settings import CalibrationSettings
    from tasks.train import Stopping, train_model

    t_u, t_c = seed_data()
    defaults = CalibrationSettings()
    normalizer = fit_normalizer(t_u.numpy(), defaults.normalize)
    x = __import__("torch").from_numpy(normalizer.apply(t_u.numpy()))
    run = lambda: train_model(x, t_c, None, None, strategy=defaults.strategy, lr=defaults.learning_rate,
                              epochs=defaults.max_epochs, stopping=Stopping(tol=defaults.stopping_tol, patience=defaults.patience))
    result = run()
    intercept, slope = Linear().raw_coefficients(result.params, normalizer)
    raw = t_u.numpy().astype(np.float64)
    _, _, optimum = least_squares(raw, t_c.numpy())
    gap = (np.mean((slope * raw + intercept - t_c.numpy()) ** 2) - optimum) / optimum
    seed = lambda: run_seed_loop("analytic", 0.1 * t_u, t_c)
    seed()
    ours_s, seed_s = best(run, 5), best(seed)
    report("time to the optimum, default configuration", f"{ours_s * 1000:.2f} ms ({result.epochs_run} epochs, gap {gap:.1e})",
           f"seed hand gradient {seed_s * 1000:.0f} ms (5000 epochs)", f"{ours_s / seed_s:.4f}x")


MEASURE = r"""
import sys, time, json
from pathlib import Path

def peak_mb():
    # VmHWM: this process's peak resident size (getrusage's ru_maxrss survives exec from a big parent)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

what, path = sys.argv[1], Path(sys.argv[2])
import pandas as pd
if what == "thermocal":
    from tasks.ingest import load_readings, readings_schema
    readings_schema("reading", "celsius")
base = peak_mb()
started = time.perf_counter()
table = pd.read_csv(path) if what == "pandas" else load_readings(path, "reading", "celsius", 5)
seconds = time.perf_counter() - started
peak = peak_mb() - base
print(json.dumps({"seconds": seconds, "peak_mb": peak, "table_mb": table.memory_usage().sum() / 2**20, "rows": len(table)}))
"""


def _measure(what: str, path: Path) -> dict:
    runs = [json.loads(subprocess.run([PYTHON, "-c", MEASURE, what, str(path)], capture_output=True, text=True,
                                      check=True, cwd=ROOT).stdout) for _ in range(3)]
    return {**min(runs, key=lambda r: r["seconds"]), "peak_mb": max(r["peak_mb"] for r in runs)}


def bench_large_file() -> None:
    from tasks.synth import write_synthetic

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"synthetic-{ROWS}.csv"
    if not path.exists():
        write_synthetic(path, ROWS, seed=0)
    pandas, ours = _measure("pandas", path), _measure("thermocal", path)
    report(f"ingest + validate {ROWS:,} rows, time", f"{ours['seconds']:.2f} s", f"pandas.read_csv alone {pandas['seconds']:.2f} s",
           f"{ours['seconds'] / pandas['seconds']:.2f}x")
    report(f"ingest + validate {ROWS:,} rows, peak memory", f"{ours['peak_mb']:.0f} MB",
           f"the table in memory {ours['table_mb']:.0f} MB (pandas.read_csv peaks {pandas['peak_mb']:.0f} MB)",
           f"{ours['peak_mb'] / ours['table_mb']:.2f}x")
    env = {**os.environ, "PREFECT_HOME": str(CACHE / "prefect-home")}
    store = CACHE / "store-large"
    subprocess.run(["rm", "-rf", str(store)], check=True)
    started = time.perf_counter()
    out = subprocess.run([str(Path(PYTHON).parent / "thermocal"), "run", "--json", "--data", str(path), "--store", str(store)],
                         capture_output=True, text=True, env=env, check=True)
    whole = time.perf_counter() - started
    result = json.loads(out.stdout)
    stages = ", ".join(f"{n} {s['seconds']:.1f}" for n, s in result["stages"].items())
    report(f"whole pipeline on {ROWS:,} rows (fresh store, ephemeral Prefect)", f"{whole:.1f} s wall; stages (s): {stages}",
           f"{result['epochs_run']} full-batch epochs, gap {result['gap_to_optimum']:.1e}", "-")


OVERHEAD = r"""
import json, sys, time
from pathlib import Path
from flows.serving import start_ephemeral_server
start_ephemeral_server()
from prefect import flow, task
from flows.calibrate import calibrate

@task
def one():
    return 1

@flow
def minimal():
    return one()

def best(fn, n=3):
    times = []
    for _ in range(n):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return min(times)

store = sys.argv[1]
minimal()
floor = best(minimal)
fresh = []
for i in range(3):
    t = time.perf_counter(); calibrate(data="data/readings.csv", store=f"{store}-{i}"); fresh.append(time.perf_counter() - t)
cached = best(lambda: calibrate(data="data/readings.csv", store=f"{store}-0"))
print(json.dumps({"minimal": floor, "fresh": min(fresh), "cached": cached}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_overhead() -> None:
    from flows.daemon import healthy as server_healthy
    from flows.daemon import server_env

    home = CACHE / "prefect-home"
    base = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    base.pop("PREFECT_API_URL", None)
    modes = {"ephemeral": base}
    port = _free_port()
    server = subprocess.Popen([str(Path(PYTHON).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env={**server_env(port), "PREFECT_HOME": str(home)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not server_healthy(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        modes["running server"] = {**base, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        for mode, env in modes.items():
            out = subprocess.run([PYTHON, "-c", OVERHEAD, str(CACHE / f"overhead-{mode.replace(' ', '-')}")],
                                 capture_output=True, text=True, env=env, check=True, cwd=ROOT)
            t = json.loads(out.stdout.strip().splitlines()[-1])
            report(f"flow overhead ({mode}), thermocal run", f"{t['fresh']:.2f} s computed, {t['cached']:.2f} s fully cached",
                   f"Prefect's minimal one-task flow {t['minimal']:.2f} s", f"{t['cached'] / t['minimal']:.2f}x cached")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def bench_sweep() -> None:
    env = {**os.environ, "PREFECT_HOME": str(CACHE / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    # Long trainings on the 11 shipped readings are bound by Python, one core each, so worker
    # processes can share them out; on large tables torch already spreads one training over both
    # cores and a second process only competes for them.
    grid = ["--strategies", "analytic,finite-difference,autograd,optimizer", "--lrs", "0.5,0.1",
            "--normalizations", "standard", "--epochs", "60000"]
    times = {}
    for name, runner in {"sequential": ["--sequential"], "dask": ["--dask", "--workers", "2"]}.items():
        store = CACHE / f"sweep-{name}"
        subprocess.run(["rm", "-rf", str(store)], check=True)
        started = time.perf_counter()
        subprocess.run([str(Path(PYTHON).parent / "thermocal"), "sweep", "--json", "--store", str(store), *grid, *runner],
                       capture_output=True, text=True, env=env, check=True, cwd=ROOT)
        times[name] = time.perf_counter() - started
    report("sweep of 8 trainings x 60000 epochs on the shipped readings, wall time (whole command)", f"Dask, 2 workers: {times['dask']:.1f} s",
           f"sequential {times['sequential']:.1f} s", f"{times['dask'] / times['sequential']:.2f}x")


def main() -> int:
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
          f"Python {platform.python_version()}, torch {__import__('torch').__version__}", file=sys.stderr)
    for bench in (bench_strategies, bench_models, bench_time_to_optimum, bench_large_file, bench_overhead, bench_sweep):
        bench()
    print("\n| measure | thermocal | reference | ratio |\n|---|---|---|---|")
    for row in rows_out:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
