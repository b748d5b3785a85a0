"""Synthetic readings for tests and benchmarks: a hidden linear calibration plus noise, for one
thermometer or a fleet of sensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tasks.durable import atomic_write
from tasks.errors import InvalidInput

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


# A fleet: many sensors, each with its own hidden calibration drawn around the seed's thermometer
SLOPE_SPREAD = 0.05  # relative sd of the sensors' slopes around HIDDEN_SLOPE
INTERCEPT_SPREAD = 2.0  # °C sd of the sensors' intercepts around HIDDEN_INTERCEPT
FLAKY_SHARE, FLAKY_DROPOUT = 0.1, 0.05  # a tenth of the sensors lose 5 % of their readings; the rest DROPOUT_RATE
SPAN_MINUTES = 2 * 1440  # a sensor logs every few minutes, so that its rows span about two days of weather
SENSORS_PER_BROKEN = 2000  # one broken sensor per 2000: 0.05 % of a fleet, none in a fleet under 2000
BROKEN_KINDS = ("stuck", "single_row")  # a reading that never varies; one row, which fixes no line
FLEET_HEADER = b"sensor,reading,celsius\n"
TENS = 10 ** np.arange(1, 19)  # 10 … 10**18: the int64 powers of ten


def _fleet_ids(sensors: int) -> np.ndarray:
    """'s00000', 's00001', …: zero-padded to one width, so the ids sort as their numbers do."""
    width = max(5, len(str(sensors - 1)))
    return np.array([f"s{i:0{width}d}" for i in range(sensors)])


def _fleet_truth(rng: np.random.Generator, sensors: int) -> pd.DataFrame:
    """Each sensor's hidden calibration and noise, and why it is broken ('' for a working one)."""
    broken = np.full(sensors, "", dtype=object)
    which = np.sort(rng.choice(sensors, sensors // SENSORS_PER_BROKEN, replace=False))
    broken[which] = [BROKEN_KINDS[i % len(BROKEN_KINDS)] for i in range(len(which))]
    return pd.DataFrame({
        "sensor": _fleet_ids(sensors),
        "slope": HIDDEN_SLOPE * (1.0 + rng.normal(0.0, SLOPE_SPREAD, sensors)),
        "intercept": HIDDEN_INTERCEPT + rng.normal(0.0, INTERCEPT_SPREAD, sensors),
        "noise_celsius": rng.uniform(0.2, NOISE_C, sensors),
        "broken": broken,
    })


def _segment_cumsum(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Running sums of `values` that restart with each segment (one segment per sensor, of `lengths` rows)."""
    total = np.cumsum(values)
    before = np.append(0, total[np.cumsum(lengths)[:-1] - 1])  # the running sum where each segment starts
    return total - np.repeat(before, lengths)


def _fleet_chunks(truth: pd.DataFrame, rng: np.random.Generator, rows: int):
    """Rows of the fleet, sensor by sensor, each logging every few minutes: its own daily phase and
    site offset, slow weather, dropped readings, noise in the reference °C.

    Yields (sensor code, reading, celsius, dropouts) arrays of at most CHUNK rows; a sensor's clock
    and weather carry over from one chunk to the next, so a chunk boundary leaves no seam in its series.
    """
    sensors = len(truth)
    slope, intercept, noise = (truth[name].to_numpy() for name in ("slope", "intercept", "noise_celsius"))
    single, stuck = (truth["broken"] == "single_row").to_numpy(), (truth["broken"] == "stuck").to_numpy()
    weights = np.where(single, 0.0, rng.uniform(0.5, 1.5, sensors))  # ragged: from half to 1.5 times rows / sensors
    counts = 1 + rng.multinomial(rows - sensors, weights / weights.sum())
    offset = rng.normal(0.0, 3.0, sensors)  # °C: a sensor in the sun, one in a cellar
    dropout = np.where(rng.random(sensors) < FLAKY_SHARE, FLAKY_DROPOUT, DROPOUT_RATE)
    stuck_reading = (12.0 + offset - intercept) / slope  # the reading of its mean temperature, forever
    minute = rng.integers(0, 1440, sensors)  # each sensor's clock and weather, carried between chunks
    weather = np.zeros(sensors)
    # minutes between readings: a day's cycle in each sensor's rows, however few (25 rows: every 2 hours)
    interval = max(1, round(SPAN_MINUTES * sensors / rows))
    begins = np.cumsum(counts) - counts  # each sensor's first row
    for start in range(0, rows, CHUNK):
        stop = min(rows, start + CHUNK)
        low, high = np.searchsorted(begins, [start, stop - 1], side="right") - 1  # the sensors in rows start:stop
        present = np.arange(low, high + 1)
        here = np.minimum(begins[present] + counts[present], stop) - np.maximum(begins[present], start)
        sensor = np.repeat(present, here)
        last = np.cumsum(here) - 1  # each sensor's last row in this chunk
        gaps = rng.geometric(1.0 - dropout[sensor])  # readings since the sensor's previous row: 1, or more after dropouts
        t = minute[sensor] + interval * _segment_cumsum(gaps, here)
        drift = weather[sensor] + _segment_cumsum(rng.normal(0.0, 0.02 * np.sqrt(interval), len(sensor)), here)
        minute[sensor[last]], weather[sensor[last]] = t[last], drift[last]
        true_c = 12.0 + 8.0 * np.sin(2 * np.pi * t / 1440.0) + offset[sensor] + np.clip(drift, -10, 10)
        # as for one thermometer: the noise is in the reference °C, the reading is exact
        reading = np.where(stuck[sensor], stuck_reading[sensor], (true_c - intercept[sensor]) / slope[sensor])
        celsius = true_c + rng.normal(0.0, 1.0, len(sensor)) * noise[sensor]
        yield sensor, reading, celsius, int((gaps - 1).sum())


def _fixed_point(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values as right-aligned text with two decimals: (bytes, mask of the bytes that are text), each
    (width, rows), a row of bytes per character position, so that each position is written at once."""
    cents = np.rint(values * 100).astype(np.int64)
    negative, cents = cents < 0, np.abs(cents)
    digits = 1 + np.searchsorted(TENS, cents // 100, side="right")  # of the whole part, exactly (log10 rounds)
    width = int(digits.max()) + 4  # sign, digits, '.', two decimals
    cents = cents.astype(np.uint32 if width <= 11 else np.uint64)  # uint32 divides 3x faster
    text = np.empty((width, len(values)), np.uint8)
    text[-3] = ord(".")
    for position in [-1, -2, *range(-4, -width - 1, -1)]:  # digits from the right; leading zeros are masked
        rest = cents // 10
        text[position] = ord("0") + (cents - rest * 10)
        cents = rest
    mask = np.arange(width)[:, None] >= width - 3 - digits - negative
    text[width - 4 - digits[negative], np.flatnonzero(negative)] = ord("-")
    return text, mask


def _fleet_csv(names: np.ndarray, sensor: np.ndarray, reading: np.ndarray, celsius: np.ndarray) -> bytes:
    """Lines `id,reading,celsius` of one chunk, formatted by numpy: about 7x faster than to_csv's
    '%.2f' (0.5 s a million rows), with no Python string per row. `names`: the ids' ASCII bytes,
    (sensors, id width)."""
    reading_text, reading_mask = _fixed_point(reading)
    celsius_text, celsius_mask = _fixed_point(celsius)
    comma, newline = np.full((1, len(sensor)), ord(","), np.uint8), np.full((1, len(sensor)), ord("\n"), np.uint8)
    text = np.vstack([names[sensor].T, comma, reading_text, comma, celsius_text, newline])
    keep = np.ones((1, len(sensor)), bool)
    mask = np.vstack([np.ones((names.shape[1] + 1, len(sensor)), bool), reading_mask, keep, celsius_mask, keep])
    return np.ascontiguousarray(text.T)[np.ascontiguousarray(mask.T)].tobytes()  # line by line


def write_fleet(out: Path, sensors: int, rows: int, seed: int = 0, truth: Path | None = None) -> dict:
    """Write a fleet's `rows` readings to `out` (and the hidden calibrations to `truth`), atomically;
    returns what was written. Refuses, writing nothing, fewer than one row per sensor."""
    if sensors < 1:
        raise InvalidInput(f"--sensors must be at least 1 (got {sensors})")
    if rows < sensors:
        raise InvalidInput(f"--rows must be at least --sensors: every sensor writes a row (got {rows} rows for {sensors} sensors)")
    rng = np.random.default_rng(seed)
    hidden = _fleet_truth(rng, sensors)
    ids = hidden["sensor"].to_numpy().astype(np.bytes_)
    names = ids.view(np.uint8).reshape(sensors, ids.itemsize)  # one width, ASCII
    dropouts = 0

    def write(tmp: Path) -> None:
        nonlocal dropouts
        with open(tmp, "wb") as handle:
            handle.write(FLEET_HEADER)
            for sensor, reading, celsius, dropped in _fleet_chunks(hidden, rng, rows):
                handle.write(_fleet_csv(names, sensor, reading, celsius))
                dropouts += dropped

    atomic_write(Path(out), write)
    if truth is not None:
        atomic_write(Path(truth), lambda tmp: hidden.to_csv(tmp, index=False))
    broken = hidden[hidden["broken"] != ""]
    return {"path": str(out), "rows": rows, "sensors": sensors, "seed": seed, "truth": None if truth is None else str(truth),
            "broken": [{"sensor": s, "reason": r} for s, r in zip(broken["sensor"], broken["broken"])],
            "dropouts_kept_out": dropouts}
