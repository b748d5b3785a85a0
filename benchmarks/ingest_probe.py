"""Goal 5 (large files), measured as the issue states it: the ingest stage's `seconds` from a whole
run's JSON against `pandas.read_csv` of the same file in a fresh process, and a whole run's peak
resident memory on the big file over a run on the shipped readings.

Every measurement is its own child process, timed or sized through os.wait4 (that child's own
ru_maxrss, as a fresh wrapper's RUSAGE_CHILDREN would give: a parent that already read the file
would hide part of it). Kinds alternate within each repeat; medians are printed.

    python -m flows synth --rows 10000000 --out /tmp/ingest/big.csv
    PREFECT_API_URL=http://127.0.0.1:4392/api PREFECT_HOME=/tmp/ingest-home \
        python benchmarks/ingest_probe.py /tmp/ingest/big.csv --repeats 3 [--tree /tmp/base --tree .]

`python -m flows` runs with each --tree as its working directory, so it picks that tree's modules
(default: this checkout); give two trees (e.g. `git archive` of the base commit unpacked in /tmp)
to compare before and after in one session. Each run gets a fresh store under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READ_CSV = "import sys, time, pandas as pd; t = time.perf_counter(); pd.read_csv(sys.argv[1]); print(time.perf_counter() - t)"


def _child(argv: list[str], cwd: Path | None = None) -> tuple[str, float, int]:
    """(stdout, wall seconds, peak RSS in MB) of one child process."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.DEVNULL, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0)
        text = out.read().decode()
    if process.returncode != 0:
        raise SystemExit(f"{argv} exited {process.returncode}:\n{text[-2000:]}")
    return text, seconds, usage.ru_maxrss // 1024  # Linux: kilobytes


def read_csv_seconds(path: Path) -> float:
    return float(_child([sys.executable, "-c", READ_CSV, str(path)])[0])


def run(tree: Path, path: Path, work: Path) -> dict:
    """One whole `python -m flows run --json` of `tree`'s code on `path` into a fresh store."""
    store = Path(tempfile.mkdtemp(prefix="store-", dir=work))
    try:
        argv = [sys.executable, "-m", "flows", "run", "--json", "--data", str(path.resolve()), "--store", str(store)]
        text, seconds, peak = _child(argv, cwd=tree)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    stages = json.loads(text)["stages"]
    return {"wall": seconds, "peak_mb": peak, **{name: stage["seconds"] for name, stage in stages.items()}}


def _report(tree: Path, read: list[float], big: list[dict], small: list[dict]) -> None:
    median = statistics.median
    ingest = median(r["ingest"] for r in big)
    print(f"{tree}: median ingest stage {ingest:.3f} s vs read_csv {median(read):.3f} s: ratio {ingest / median(read):.2f} (target <= 2)")
    print("  stage medians: " + ", ".join(f"{name} {median(r[name] for r in big):.2f}" for name in big[0] if name not in ("wall", "peak_mb")))
    if small:
        big_peak, small_peak = median(r["peak_mb"] for r in big), median(r["peak_mb"] for r in small)
        print(f"  median peak RSS: big run {big_peak} MB, small run {small_peak} MB: extra {big_peak - small_peak:.0f} MB "
              f"(target <= 480; big runs {[r['peak_mb'] for r in big]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("big", type=Path, help="the large CSV (thermocal synth --rows 10000000)")
    parser.add_argument("--small", type=Path, default=Path("data/readings.csv"), help="the baseline run's data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tree", type=Path, action="append", help="code to run (repeatable; default: this checkout)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()), help="where the runs' stores go")
    parser.add_argument("--no-small", action="store_true", help="skip the baseline run (time only)")
    args = parser.parse_args()
    if "PREFECT_API_URL" not in os.environ:
        print("note: no PREFECT_API_URL, every run starts its own temporary server", file=sys.stderr)
    trees = [t.resolve() for t in args.tree or [Path(__file__).resolve().parents[1]]]
    args.work.mkdir(parents=True, exist_ok=True)
    read: list[float] = []
    big: dict[Path, list[dict]] = {t: [] for t in trees}
    small: dict[Path, list[dict]] = {t: [] for t in trees}
    for repeat in range(args.repeats):
        for tree in trees:  # alternating: read_csv, then each tree's big and small runs
            read.append(read_csv_seconds(args.big))
            big[tree].append(run(tree, args.big, args.work))
            if not args.no_small:
                small[tree].append(run(tree, args.small.resolve(), args.work))
            b = big[tree][-1]
            stages = " ".join(f"{k} {v:.2f}" for k, v in b.items() if k not in ("wall", "peak_mb"))
            print(f"repeat {repeat + 1} {tree.name}: read_csv {read[-1]:.3f} s | big run: {stages} | peak {b['peak_mb']} MB"
                  + (f" | small run peak {small[tree][-1]['peak_mb']} MB" if small[tree] else ""), flush=True)
    for tree in trees:
        _report(tree, read, big[tree], small[tree])


if __name__ == "__main__":
    main()
