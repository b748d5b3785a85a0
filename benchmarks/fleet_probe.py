"""A fleet's calibration (tasks.fleet) against pandas groupby + numpy.polyfit per sensor, same process, same data.

A synthetic fleet (each sensor its own slope, intercept and noise; rows of all sensors interleaved,
as a logger file has them) is calibrated both ways, alternately, `--reps` times:

- reference: df.groupby("sensor") and np.polyfit(reading, celsius, 1) per group;
- fleet: the ids factorized, partition_of, each partition's rows taken out, train_sensors per
  partition (default settings: linear, analytic, standard, val_fraction 0.2, seed 42).

It prints each time, their medians, and how close the calibrations are to float64 least squares
(validate_sensors' gap_to_optimum; slopes against polyfit's, which fit every row, so only roughly).
The first repetition also pays for importing torch (in the first train_sensors call). Run from
the repository root:

    python benchmarks/fleet_probe.py --sensors 10000 --rows 1000 --partition 1000 --reps 3 [--threads 1]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.fleet import infer_sensors, partition_of, train_sensors, validate_sensors  # noqa: E402
from tasks.settings import CalibrationSettings  # noqa: E402


def make_fleet(sensors: int, rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    which = rng.permutation(np.repeat(np.arange(sensors), rows))
    slope, intercept, noise = rng.uniform(0.3, 0.8, sensors), rng.uniform(-30, 10, sensors), rng.uniform(0.05, 2.0, sensors)
    reading = rng.uniform(20, 200, len(which))
    celsius = intercept[which] + slope[which] * reading + rng.normal(0, 1, len(which)) * noise[which]
    ids = np.array([f"sensor-{i:05d}" for i in range(sensors)])
    return pd.DataFrame({"sensor": ids[which], "reading": reading, "celsius": celsius})


def reference(df: pd.DataFrame) -> dict:
    return {name: np.polyfit(group["reading"].to_numpy(), group["celsius"].to_numpy(), 1) for name, group in df.groupby("sensor")}


def partitions(df: pd.DataFrame, size: int):
    """Each partition's rows (file order), local codes and ids; the seconds this took."""
    started = time.perf_counter()
    codes, ids = pd.factorize(df["sensor"])
    ids = np.asarray(ids, dtype=str)
    part = partition_of(ids, size)
    row_part = part[codes].astype(np.uint16)  # numpy sorts 16-bit keys by radix
    order = np.argsort(row_part, kind="stable")
    bounds = np.searchsorted(row_part[order], np.arange(part.max() + 2))
    readings, celsius = df["reading"].to_numpy(), df["celsius"].to_numpy()
    out = []
    for p in range(part.max() + 1):
        rows = order[bounds[p] : bounds[p + 1]]
        members = np.flatnonzero(part == p)
        local = np.full(len(ids), -1)
        local[members] = np.arange(len(members))
        out.append((readings[rows], celsius[rows], local[codes[rows]].astype(np.int32), ids[members]))
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sensors", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--partition", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the whole process (default: torch's own); "
                        "on a machine whose other processes keep the cores busy, 1 is several times faster (tasks/batched.py)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    df = make_fleet(args.sensors, args.rows)
    settings = CalibrationSettings()
    print(f"{args.sensors} sensors x {args.rows} rows = {len(df)} rows; partitions of {args.partition}")
    times = {"reference": [], "split": [], "train": [], "batched": []}
    for rep in range(args.reps):
        started = time.perf_counter()
        fits = reference(df)
        times["reference"].append(time.perf_counter() - started)
        parts, seconds = partitions(df, args.partition)
        times["split"].append(seconds)
        started = time.perf_counter()
        trained = [train_sensors(*part, settings) for part in parts]
        times["train"].append(time.perf_counter() - started)
        times["batched"].append(sum(t["seconds"] for t in trained))
        print(f"rep {rep + 1}: groupby + polyfit {times['reference'][-1]:.2f} s; fleet: partitions {seconds:.2f} s, "
              f"train_sensors {times['train'][-1]:.2f} s (of which train_batched {times['batched'][-1]:.2f} s)")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"medians: groupby + polyfit {med['reference']:.2f} s; fleet train_sensors {med['train']:.2f} s "
          f"(ratio {med['train'] / med['reference']:.2f}), with factorize + partitions {med['split'] + med['train']:.2f} s "
          f"(ratio {(med['split'] + med['train']) / med['reference']:.2f})")
    started = time.perf_counter()
    tables = [validate_sensors(r, c, k, t) for (r, c, k, _), t in zip(parts, trained)]
    print(f"validate_sensors, all partitions: {time.perf_counter() - started:.2f} s")
    started = time.perf_counter()
    for (r, _, k, _), t in zip(parts, trained):
        infer_sensors(r, k, t)
    print(f"infer_sensors, all partitions: {time.perf_counter() - started:.2f} s")
    table = pd.concat(tables, ignore_index=True)
    gap = table["gap_to_optimum"].to_numpy()
    print(f"calibrated {int((table['status'] == 'calibrated').sum())} of {len(table)}; epochs_run median "
          f"{table['epochs_run'].median():.0f}, max {table['epochs_run'].max()}")
    print(f"gap_to_optimum: median {np.median(gap):.2e}, 99.9th percentile {np.quantile(gap, 0.999):.2e}, max {gap.max():.2e}; "
          f"share <= 1e-6: {np.mean(gap <= 1e-6):.4%}")
    slopes = np.array([c[1] for c in table["coefficients"]])
    polyfit = np.array([fits[s][0] for s in table["sensor"]])
    print(f"slope vs polyfit on all rows (the fleet's are on its 80 % training rows): median |rel diff| "
          f"{np.median(np.abs(slopes / polyfit - 1)):.2e}")


if __name__ == "__main__":
    main()
