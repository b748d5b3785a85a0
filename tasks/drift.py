"""Calibration drift across a fleet: how far each sensor's new calibration moved from its previous
one, as the largest |°C difference| over the new calibration's range, and Prefect events for the
sensors that moved too far.

The maximum is exact where the families allow it, and each family is computed in bulk:
- two lines: their difference is linear, so its largest magnitude lies at an end of the range;
  slopes, intercepts and ranges are arrays, so 10,000 sensors are a few array operations;
- polynomials (poly:K, or a line against one): the difference is a polynomial of degree
  D = max(K_previous, K_current), recovered exactly from D + 1 values of each side and evaluated
  at the ends, at its stationary points (the roots of its derivative) and on a small grid;
- a network on either side: no formula, so a dense grid of `points` readings across the range.
"""

from __future__ import annotations

from collections import defaultdict
from functools import cache

import numpy as np
from numpy.polynomial import chebyshev

from tasks.calibration import Calibration
from tasks.specs import parse_spec

# readings per range where a network is involved: spacing h = (high - low) / 1024. The grid holds
# both ends; at an interior maximum it falls short by at most max|Δ''| h² / 8 (a tanh network's
# difference is smooth), e.g. 1.2e-5 °C for a difference whose |Δ''| (high - low)² is 100 °C.
# Cost: tanh of points x H per side and sensor (0.7-0.9 ms a sensor for mlp:13 here)
NETWORK_POINTS = 1025
# a floor under the polynomial maximum that does not depend on root finding (the eigenvalue
# problem behind the roots may return two close extrema as a complex pair; their real part is
# evaluated too, and the grid bounds what is lost even then)
POLY_GRID = 33
EVENT_NAME = "thermocal.calibration.drifted"
SUMMARY_EVENT_NAME = "thermocal.calibration.drift-summary"
# sensors given an event each, the largest first; beyond them one summary event. Measured against a
# local `prefect server start` (benchmarks/drift_probe.py): 10,000 events took 9 s of emit_event
# calls inside the flow, 9 s more to leave the process and 40 s more of the server's SQLite writes
# before it listed them all, and an automation on the event would fire 10,000 times; 100 events
# took 0.2 s, 0.4 s and 0.2 s. That many sensors drifting at once has a fleet-wide cause (a new
# reference, a changed procedure), which one summary states; the drift rows name every sensor.
EVENT_LIMIT = 100


def max_deltas(previous: dict[str, dict], current: dict[str, dict], points: int = NETWORK_POINTS) -> list[dict]:
    """Every sensor present on both sides: {"sensor", "max_delta_celsius", "at_reading"}, the largest
    |current - previous| in °C over the current record's range and the reading where it occurs,
    largest first (ties by sensor id), so a report can show the whole distribution.

    Args:
        previous, current: sensor id -> Calibration record (Calibration.to_record()).
        points: readings per range where a network is on either side (at least 2).
    """
    if points < 2:
        raise ValueError(f"points must be at least 2 (got {points})")
    groups: dict[str | int, list[str]] = defaultdict(list)
    for sensor, record in current.items():  # in the fleet's order: records visited in a set's hash order took 3x as long
        if sensor in previous:
            groups[_family(previous[sensor]["spec"], record["spec"])].append(sensor)
    sensors, deltas, readings = [], [], []
    for family, members in groups.items():
        before, after = [previous[s] for s in members], [current[s] for s in members]
        if family == "linear":
            delta, at = _linear_deltas(before, after)
        elif family == "network":
            delta, at = _network_deltas(before, after, points)
        else:
            delta, at = _polynomial_deltas(before, after, family)
        sensors += members
        deltas.append(delta)
        readings.append(at)
    if not sensors:
        return []
    delta, at = np.concatenate(deltas), np.concatenate(readings)
    order = np.lexsort((np.array(sensors), -delta))  # largest first, ties by sensor id
    return [{"sensor": sensors[i], "max_delta_celsius": float(delta[i]), "at_reading": float(at[i])} for i in order]


def calibration_drift(previous: dict[str, dict], current: dict[str, dict], threshold: float,
                      points: int = NETWORK_POINTS) -> list[dict]:
    """The sensors whose calibration moved more than `threshold` °C somewhere in the current
    range (max_deltas' rows above it, largest first); sensors on one side only are skipped."""
    return [row for row in max_deltas(previous, current, points) if row["max_delta_celsius"] > threshold]


@cache
def _family(before: str, after: str) -> str | int:
    """"linear" for two lines, "network" if either side is a network, else the degree D of the
    difference polynomial (a line is degree 1). Cached: a fleet holds a handful of spec pairs."""
    (kind_before, size_before), (kind_after, size_after) = parse_spec(before), parse_spec(after)
    if "mlp" in (kind_before, kind_after):
        return "network"
    if kind_before == kind_after == "linear":
        return "linear"
    return max(size_before, size_after)


def _ranges(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    ranges = np.array([r["range"] for r in records], dtype=np.float64).reshape(-1, 2)
    return ranges[:, 0], ranges[:, 1]


def _line_celsius(records: list[dict], readings: np.ndarray) -> np.ndarray:
    """°C of N lines at readings (N, n), by the operations of Calibration.predict(engine="numpy")
    (float32 parameters in float64, (reading - shift) * factor, w x + b), so the numbers are its numbers."""
    parameters, normalizers = [r["parameters"] for r in records], [r["normalizer"] for r in records]
    w, b = (np.array([p[name] for p in parameters], dtype=np.float64)[:, None] for name in ("w", "b"))
    shift, factor = (np.array([n[name] for n in normalizers], dtype=np.float64)[:, None] for name in ("shift", "factor"))
    return w * ((readings - shift) * factor) + b


def _linear_deltas(before: list[dict], after: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Two lines differ by a line: its largest magnitude is at one end of the range (exact)."""
    ends = np.stack(_ranges(after), axis=1)  # (N, 2): low, high
    delta = np.abs(_line_celsius(after, ends) - _line_celsius(before, ends))
    end = delta.argmax(axis=1)
    rows = np.arange(len(ends))
    return delta[rows, end], ends[rows, end]


def _polynomial_deltas(before: list[dict], after: list[dict], degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Differences that are polynomials of `degree` D: exact maxima.

    Each difference is interpolated at the D + 1 Chebyshev points of its range (exact for a
    polynomial of degree D, and well conditioned, unlike monomials of raw readings in the hundreds);
    in the variable t in [-1, 1] that maps onto the range, its Chebyshev coefficients for all N
    sensors are one linear solve. Its maximum magnitude is at an end or at a root of its derivative.
    """
    low, high = _ranges(after)
    middle, half = (low + high) / 2, (high - low) / 2
    nodes = chebyshev.chebpts1(degree + 1)
    readings = middle[:, None] + half[:, None] * nodes  # (N, D + 1)
    values = np.stack([Calibration.from_record(a).predict(r, engine="numpy") - Calibration.from_record(b).predict(r, engine="numpy")
                       for a, b, r in zip(after, before, readings)])
    coefficients = np.linalg.solve(chebyshev.chebvander(nodes, degree), values.T)  # (D + 1, N)
    slopes = chebyshev.chebder(coefficients)  # (D, N)
    # roots of each derivative (at most D - 1), real parts clipped into the range; missing ones at an end
    stationary = np.full((len(low), max(degree - 1, 0)), -1.0)
    for i, slope in enumerate(slopes.T):
        roots = chebyshev.chebroots(slope).real
        stationary[i, : len(roots)] = roots
    grid = np.broadcast_to(np.linspace(-1.0, 1.0, POLY_GRID), (len(low), POLY_GRID))  # includes both ends
    candidates = np.concatenate([grid, np.clip(stationary, -1.0, 1.0)], axis=1)  # (N, K)
    delta = np.abs(chebyshev.chebval(candidates.T, coefficients, tensor=False)).T  # (N, K)
    best = delta.argmax(axis=1)
    rows = np.arange(len(low))
    return delta[rows, best], middle + half * candidates[rows, best]


def _network_deltas(before: list[dict], after: list[dict], points: int) -> tuple[np.ndarray, np.ndarray]:
    """A network on either side: the largest |difference| on `points` evenly spaced readings of the range."""
    low, high = _ranges(after)
    delta, at = np.empty(len(low)), np.empty(len(low))
    for i, (a, b) in enumerate(zip(after, before)):
        readings = np.linspace(low[i], high[i], points)
        difference = np.abs(Calibration.from_record(a).predict(readings, engine="numpy")
                            - Calibration.from_record(b).predict(readings, engine="numpy"))
        best = difference.argmax()
        delta[i], at[i] = difference[best], readings[best]
    return delta, at


def emit_drift_events(drift: list[dict], run_id: str, data: str, threshold: float, limit: int = EVENT_LIMIT) -> int:
    """One `thermocal.calibration.drifted` event per drifted sensor (calibration_drift's rows,
    largest first), for the `limit` largest; if more drifted, one `thermocal.calibration.drift-summary`
    event about the run says how many were left out. Returns the number of events handed to Prefect.

    Each event's resource is the sensor (`thermocal.sensor.<id>`), its related resource the
    thermocal run; inside a flow run Prefect adds the flow run, the flow and the tags. Outside one,
    emit_event sends to PREFECT_API_URL, and with none set (and no API key) it starts Prefect's
    temporary server in this process first (seconds): call it from the flow. Events leave from a
    background thread; a process that ends drains them at exit.
    """
    from prefect.events import emit_event

    run = {"prefect.resource.id": f"thermocal.run.{run_id}", "prefect.resource.role": "calibration-run"}
    common = {"threshold": threshold, "run_id": run_id, "data": data}
    emitted = 0
    for row in drift[:limit]:
        sensor = row["sensor"]
        event = emit_event(EVENT_NAME, resource={"prefect.resource.id": f"thermocal.sensor.{sensor}", "prefect.resource.name": sensor},
                           related=[run], payload={"max_delta_celsius": row["max_delta_celsius"], "at_reading": row["at_reading"], **common})
        emitted += event is not None
    if len(drift) > limit:
        event = emit_event(SUMMARY_EVENT_NAME, resource={"prefect.resource.id": f"thermocal.run.{run_id}", "prefect.resource.name": run_id},
                           payload={"drifted": len(drift), "emitted": limit, "not_emitted": len(drift) - limit,
                                    "largest_not_emitted_celsius": drift[limit]["max_delta_celsius"], **common})
        emitted += event is not None
    return emitted
