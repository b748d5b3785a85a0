"""load_fleet against `pandas.read_csv` of the same fleet file: seconds, and peak resident memory over
what each process holds after its imports alone, as a multiple of the lean table (two float64
columns and an int32 code: 20 bytes a row).

Every measurement is its own child process, sized through os.wait4 (that child's own ru_maxrss);
kinds alternate within each repeat; medians are printed.

    python -m flows synth --sensors 10000 --rows 10000000 --out /tmp/fleet/big.csv
    python benchmarks/fleet_ingest_probe.py /tmp/fleet/big.csv --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from ingest_probe import _child

ROOT = Path(__file__).resolve().parents[1]
# each prints its seconds; the imports alone give each kind's baseline
KINDS = {
    "read_csv": "import sys, time, pandas as pd; t = time.perf_counter(); pd.read_csv(sys.argv[1]); print(time.perf_counter() - t)",
    "load_fleet": "import sys, time; from pathlib import Path; from tasks.fleet_ingest import load_fleet; t = time.perf_counter(); "
                  "load_fleet(Path(sys.argv[1]), 'reading', 'celsius', 'sensor'); print(time.perf_counter() - t)",
}
IMPORTS = {"read_csv": "import pandas; print(0)", "load_fleet": "import tasks.fleet_ingest; print(0)"}
LEAN_BYTES_PER_ROW = 8 + 8 + 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fleet", type=Path, help="a fleet CSV with columns sensor, reading, celsius (thermocal synth --sensors)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with open(args.fleet, "rb") as handle:
        rows = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 24), b"")) - 1
    lean_mb = rows * LEAN_BYTES_PER_ROW / 2**20
    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    extra: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for repeat in range(args.repeats):
        for kind, code in KINDS.items():
            _, _, base = _child([sys.executable, "-c", IMPORTS[kind]], cwd=ROOT)
            text, _, peak = _child([sys.executable, "-c", code, str(args.fleet.resolve())], cwd=ROOT)
            seconds[kind].append(float(text))
            extra[kind].append(peak - base)
            print(f"repeat {repeat + 1} {kind}: {seconds[kind][-1]:.2f} s, peak {peak} MB = imports {base} MB + {peak - base} MB", flush=True)
    median = statistics.median
    print(f"{rows} rows; lean table {lean_mb:.0f} MB")
    for kind in KINDS:
        print(f"  {kind:<10} median {median(seconds[kind]):.2f} s, extra peak {median(extra[kind]):.0f} MB "
              f"({median(extra[kind]) / lean_mb:.2f}x the lean table)")
    print(f"  load_fleet / read_csv: {median(seconds['load_fleet']) / median(seconds['read_csv']):.2f}x the time")


if __name__ == "__main__":
    main()
