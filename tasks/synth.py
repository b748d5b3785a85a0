"""Synthetic readings for tests and benchmarks: a hidden linear calibration plus noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tasks.store import atomic_write

# the seed's thermometer, as least squares sees it: °C = 0.536772 × reading − 17.30479
HIDDEN_SLOPE, HIDDEN_INTERCEPT = 0.536772, -17.30479
NOISE_C = 1.7  # °C of the reference thermometer; the seed's readings scatter about this much around their best line
DROPOUT_RATE = 1e-4  # share of minutes the sensor reported nothing usable; kept out of the file
CHUNK = 1_000_000


def synth_chunks(rows: int, seed: int):
    """Frames of (reading, celsius) logged once a minute: a daily cycle, slow weather, noise.

    Yields (frame, dropouts) until `rows` good rows have been produced.
    """
    rng = np.random.default_rng(seed)
    minute, weather, made = 0, 0.0, 0
    while made < rows:
        n = min(CHUNK, rows - made)
        t = minute + np.arange(n)
        # weather: a slow random walk, mean-reverting toward 0 (°C offset from the daily cycle)
        steps = rng.normal(0.0, 0.02, n)
        drift = weather + np.cumsum(steps) * 0.999
        weather = float(drift[-1])
        true_c = 12.0 + 8.0 * np.sin(2 * np.pi * t / 1440.0) + np.clip(drift, -10, 10)
        # the instrument shows the true temperature through the hidden calibration; the noise is
        # in the reference °C (noise in the readings would bias any fitted slope toward zero)
        reading = (true_c - HIDDEN_INTERCEPT) / HIDDEN_SLOPE
        celsius = true_c + rng.normal(0.0, NOISE_C, n)
        dropped = rng.random(n) < DROPOUT_RATE
        frame = pd.DataFrame({"reading": reading[~dropped], "celsius": celsius[~dropped]})
        minute += n
        made += len(frame)
        yield frame, int(dropped.sum())


def write_synthetic(out: Path, rows: int, seed: int = 0) -> dict:
    """Write `rows` readings to `out` as CSV (two decimals), atomically; returns what was written."""
    dropouts = 0

    def write(tmp: Path) -> None:
        nonlocal dropouts
        with open(tmp, "w") as handle:
            for index, (frame, dropped) in enumerate(synth_chunks(rows, seed)):
                frame.to_csv(handle, index=False, header=index == 0, float_format="%.2f")
                dropouts += dropped

    atomic_write(Path(out), write)
    return {"path": str(out), "rows": rows, "dropouts_kept_out": dropouts, "seed": seed,
            "hidden_calibration": {"slope": HIDDEN_SLOPE, "intercept": HIDDEN_INTERCEPT}, "noise_celsius": NOISE_C}
