"""Drift between two calibrations of a fleet (tasks/drift.py): exact maxima for lines and
polynomials against brute force, the threshold and the order; drift events read back through
Prefect's API; the drift computed on a real Dask cluster of separate processes."""

import os
import time

import numpy as np
import pytest
from prefect import flow, task

from tasks.calibration import Calibration
from tasks.drift import EVENT_NAME, SUMMARY_EVENT_NAME, calibration_drift, emit_drift_events, max_deltas
from tasks.models import make_model
from tasks.normalize import Normalizer, fit_normalizer
from tests.dask_cluster import alive, dask_processes, worker_env

BRUTE_POINTS = 2_000_001  # readings of the brute-force grid
STANDARD = Normalizer("standard", 50.0, 0.04)  # readings 0-100 z-scored, as training would store them


def line(slope: float, intercept: float, low: float = 0.0, high: float = 100.0, normalizer: Normalizer = STANDARD) -> dict:
    """A line's record: °C = slope * reading + intercept, stored as training stores it (w, b on the
    normalized reading, float32)."""
    w, b = slope / normalizer.factor, intercept + slope * normalizer.shift
    return Calibration(make_model("linear"), np.array([w, b], np.float32), normalizer, (low, high)).to_record()


def poly(coefficients: list[float], degree: int, low: float = 100.0, high: float = 250.0) -> dict:
    """A poly:K record whose °C is the polynomial of ascending raw-reading `coefficients` (degree
    <= K), fitted exactly on 50 readings of the range (orthonormal basis, float32 parameters)."""
    x = np.linspace(low, high, 50)
    normalizer = fit_normalizer(x, "standard")
    model = make_model(f"poly:{degree}").fit(normalizer.apply64(x))
    theta = np.linalg.lstsq(model.features(normalizer.apply64(x)), np.polynomial.polynomial.polyval(x, coefficients), rcond=None)[0]
    return Calibration(model, theta.astype(np.float32), normalizer, (low, high)).to_record()


def network(hidden: int, seed: int, low: float = 0.0, high: float = 100.0) -> dict:
    theta = np.random.default_rng(seed).normal(size=3 * hidden + 1).astype(np.float32)
    return Calibration(make_model(f"mlp:{hidden}"), theta, Normalizer("scale", 0.0, 0.02), (low, high)).to_record()


def brute_force(previous: dict, current: dict, points: int = BRUTE_POINTS) -> tuple[float, float]:
    """The largest |difference| on a dense grid of the current range, and where."""
    readings = np.linspace(*current["range"], points)
    after, before = Calibration.from_record(current), Calibration.from_record(previous)
    difference = np.abs(after.predict(readings, engine="numpy") - before.predict(readings, engine="numpy"))
    return float(difference.max()), float(readings[difference.argmax()])


def only(previous: dict, current: dict, **options) -> dict:
    [row] = max_deltas({"s": previous}, {"s": current}, **options)
    return row


@pytest.mark.parametrize("previous, current, end", [
    (line(1.0, 0.0), line(1.1, -3.0), 100.0),  # crossing at 30: 3 °C at 0, 7 °C at 100
    (line(1.0, 0.0), line(0.9, 6.0), 0.0),  # crossing at 60: 6 °C at 0, 4 °C at 100
    (line(1.0, 0.0, normalizer=Normalizer("none")), line(1.0, 2.5, 20.0, 80.0, Normalizer("scale", 0.0, 0.1)), 20.0),  # parallel: both ends
])
def test_two_lines_differ_most_at_an_end_exactly(previous, current, end):
    row = only(previous, current)
    assert row["at_reading"] == end
    after, before = Calibration.from_record(current), Calibration.from_record(previous)
    at_end = abs(after.predict([end], engine="numpy")[0] - before.predict([end], engine="numpy")[0])
    assert row["max_delta_celsius"] == at_end  # the same numbers as Calibration.predict, bit for bit
    brute, _ = brute_force(previous, current, 100_001)
    assert brute - 1e-12 <= row["max_delta_celsius"] <= brute + 1e-9


def _plus(coefficients: list[float], scale: float, roots: list[float]) -> list[float]:
    """Ascending coefficients of coefficients + scale * prod(r - root)."""
    return list(np.polynomial.polynomial.polyadd(coefficients, scale * np.polynomial.polynomial.polyfromroots(roots)))


@pytest.mark.parametrize("previous, current, vertex, peak", [
    # difference -0.001 (r - 160)^2 + 5: 1.4 °C at 100, 3.1 °C at 250, 5 °C at 160
    (line(1.0, 0.0, 100.0, 250.0), poly([-20.6, 1.32, -0.001], 2), 160.0, 5.0),
    (poly([-20.6, 0.32, -0.001], 2), poly([0.0, 0.0], 3), 160.0, 5.0),
    # differences vanishing at both ends, largest between two inner roots: a cubic (at 213.6, 4.4 °C), a quintic (about 2 °C)
    (poly([3.0, 0.2], 3), poly(_plus([3.0, 0.2], 2e-5, [100, 160, 250]), 3), None, None),
    (poly([1.0, 0.5, 1e-4], 5), poly(_plus([1.0, 0.5, 1e-4], 1e-8, [100, 130, 180, 220, 250]), 5), None, None),
])
def test_an_interior_maximum_between_polynomials_is_found_exactly(previous, current, vertex, peak):
    row = only(previous, current)
    brute, where = brute_force(previous, current)
    # the grid's spacing (7.5e-5 readings) misses an interior maximum by |Δ''| h² / 8 < 1e-11 °C
    assert abs(row["max_delta_celsius"] - brute) < 1e-9
    assert abs(row["at_reading"] - where) < 1e-3
    low, high = current["range"]
    ends = [abs(d) for d in (only_at(previous, current, low), only_at(previous, current, high))]
    assert low < row["at_reading"] < high and row["max_delta_celsius"] > max(ends) + 0.1  # an interior maximum indeed
    if vertex is not None:  # and the analytic one, to float32 parameters' rounding
        assert abs(row["at_reading"] - vertex) < 1e-2 and abs(row["max_delta_celsius"] - peak) < 1e-3


def only_at(previous: dict, current: dict, reading: float) -> float:
    return float(Calibration.from_record(current).predict([reading], engine="numpy")[0]
                 - Calibration.from_record(previous).predict([reading], engine="numpy")[0])


def test_a_network_is_checked_on_its_grid():
    previous, current = network(13, 0), network(13, 1)
    row = only(previous, current, points=1025)
    brute, _ = brute_force(previous, current, 200_001)
    assert row["at_reading"] in np.linspace(0.0, 100.0, 1025)
    assert brute - 1e-3 < row["max_delta_celsius"] <= brute + 1e-12  # a grid never overshoots
    assert only(network(4, 2), line(1.0, 0.0), points=2)["at_reading"] in (0.0, 100.0)  # a network against a line: the grid too


def test_threshold_keeps_larger_drifts_largest_first_ties_by_sensor():
    none = Normalizer("none")
    previous = {s: line(1.0, 0.0, normalizer=none) for s in ("a", "b", "c", "d")}
    current = {"a": line(1.0, 0.5, normalizer=none), "b": line(1.0, -2.0, normalizer=none), "c": line(1.0, 1.0, normalizer=none),
               "d": line(1.0, 2.0, normalizer=none)}
    assert [(r["sensor"], r["max_delta_celsius"]) for r in max_deltas(previous, current)] == [("b", 2.0), ("d", 2.0), ("c", 1.0), ("a", 0.5)]
    assert [r["sensor"] for r in calibration_drift(previous, current, threshold=1.0)] == ["b", "d"]  # 1.0 itself is not above
    assert calibration_drift(previous, current, threshold=5.0) == []
    with pytest.raises(ValueError, match="points must be at least 2"):
        max_deltas(previous, current, points=1)


def test_sensors_on_one_side_only_are_skipped():
    previous = {"kept": line(1.0, 0.0), "retired": line(1.0, 0.0)}
    current = {"kept": line(1.0, 3.0), "new": line(5.0, 0.0)}
    assert [r["sensor"] for r in calibration_drift(previous, current, 0.0)] == ["kept"]
    assert max_deltas({"a": line(1.0, 0.0)}, {"b": line(1.0, 0.0)}) == []


def test_a_mixed_fleet_gives_each_sensor_its_own_result():
    pairs = {"l": (line(1.0, 0.0), line(1.1, -3.0)), "p": (line(1.0, 0.0, 100.0, 250.0), poly([-20.6, 1.32, -0.001], 2)),
             "q": (poly([3.0, 0.2], 3), poly([3.0, 0.21], 4)), "n": (network(3, 0), network(3, 1)), "m": (line(1.0, 0.0), network(2, 5))}
    together = max_deltas({s: p for s, (p, _) in pairs.items()}, {s: c for s, (_, c) in pairs.items()})
    assert sorted(together, key=lambda r: r["sensor"]) == sorted([{**only(*pair), "sensor": s} for s, pair in pairs.items()],
                                                               key=lambda r: r["sensor"])


def fleet(sensors: int, seed: int = 0) -> tuple[dict, dict]:
    """Two calibrations of `sensors` lines: slopes about 1, intercepts about 0 (a drift of about 0.2 °C)."""
    rng = np.random.default_rng(seed)
    return tuple({f"s{i:05d}": line(1.0 + rng.normal() * 1e-3, rng.normal() * 0.1) for i in range(sensors)} for _ in range(2))


def test_ten_thousand_lines_take_array_operations_not_a_loop_of_predictions():
    previous, current = fleet(10_000)
    seconds = []
    for _ in range(3):  # the fastest of three: another process on the machine only ever slows one down
        started = time.perf_counter()
        rows = max_deltas(previous, current)
        seconds.append(time.perf_counter() - started)
    assert len(rows) == 10_000
    # measured 0.04-0.08 s here; a Calibration.predict per sensor and side took 0.7 s
    assert min(seconds) < 0.5, f"{min(seconds):.2f} s for 10,000 linear sensors"
    sample = rows[::997]
    assert all(r["max_delta_celsius"] == only(previous[r["sensor"]], current[r["sensor"]])["max_delta_celsius"] for r in sample)


def _events(client, run_id: str) -> list:
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter, EventResourceFilter

    drifted = client.read_events(EventFilter(event=EventNameFilter(name=[EVENT_NAME]),
                                             related=EventRelatedFilter(id=[f"thermocal.run.{run_id}"])), limit=50).events
    summary = client.read_events(EventFilter(event=EventNameFilter(name=[SUMMARY_EVENT_NAME]),
                                             resource=EventResourceFilter(id=[f"thermocal.run.{run_id}"])), limit=50).events
    return drifted + summary


@pytest.mark.usefixtures("prefect_server")
def test_drift_events_emitted_in_a_flow_run_are_read_back_through_the_api():
    from prefect.client.orchestration import get_client

    run_id = f"drift-test-{os.getpid()}-{time.time_ns()}"
    previous = {s: line(1.0, 0.0) for s in ("t1", "t2", "t3", "t4", "gone")}
    current = {"t1": line(1.0, 0.3), "t2": line(1.0, 2.0), "t3": line(1.1, -3.0), "t4": line(1.0, 0.05), "new": line(2.0, 0.0)}
    drift = calibration_drift(previous, current, threshold=0.1)
    assert [r["sensor"] for r in drift] == ["t3", "t2", "t1"]

    @flow(name="thermocal-drift-events")
    def drift_events() -> int:
        return emit_drift_events(drift, run_id, "/data/fleet.csv", 0.1, limit=2)

    state = drift_events(return_state=True)
    assert state.is_completed() and state.result() == 3  # two sensors, then a summary for the third
    flow_run = f"prefect.flow-run.{state.state_details.flow_run_id}"

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while len(events := _events(client, run_id)) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)  # events reach the server asynchronously
    assert len(events) == 3, [e.event for e in events]
    by_resource = {e.resource.id: e for e in events}
    for row in drift[:2]:
        event = by_resource[f"thermocal.sensor.{row['sensor']}"]
        assert event.event == EVENT_NAME and event.resource.name == row["sensor"]
        assert event.payload == {"max_delta_celsius": row["max_delta_celsius"], "at_reading": row["at_reading"], "threshold": 0.1,
                                 "run_id": run_id, "data": "/data/fleet.csv"}
        related = {r.id: r.role for r in event.related}
        assert related[f"thermocal.run.{run_id}"] == "calibration-run" and related[flow_run] == "flow-run"
    summary = by_resource[f"thermocal.run.{run_id}"]
    assert summary.event == SUMMARY_EVENT_NAME
    assert summary.payload == {"drifted": 3, "emitted": 2, "not_emitted": 1, "largest_not_emitted_celsius": drift[2]["max_delta_celsius"],
                               "threshold": 0.1, "run_id": run_id, "data": "/data/fleet.csv"}
    assert "thermocal.sensor.t1" not in by_resource  # the smallest drift is in the summary, not an event of its own


@task
def _deltas_on_a_worker(previous: dict, current: dict) -> tuple[int, list[dict]]:
    time.sleep(0.5)  # long enough that the scheduler gives the two workers one task each
    return os.getpid(), max_deltas(previous, current)


@flow(name="thermocal-drift-on-dask")
def _drift_in_chunks(chunks: int, sensors: int) -> list[tuple[int, list[dict]]]:
    previous, current = fleet(sensors)
    names = sorted(previous)
    parts = [names[i::chunks] for i in range(chunks)]
    futures = [_deltas_on_a_worker.submit({s: previous[s] for s in part}, {s: current[s] for s in part}) for part in parts]
    return [future.result() for future in futures]


def test_drift_runs_in_the_dask_workers_processes_and_reports_to_the_test_server(dask_cluster):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect_dask import DaskTaskRunner

    print(f"dask cluster up in {dask_cluster.started_seconds:.1f} s")
    state = _drift_in_chunks.with_options(task_runner=DaskTaskRunner(address=dask_cluster.address))(4, 200, return_state=True)
    assert state.is_completed()
    results = state.result()
    pids = {pid for pid, _ in results}
    assert os.getpid() not in pids and len(pids) == 2 and pids <= set(dask_cluster.worker_pids)
    rows = sorted((r for _, part in results for r in part), key=lambda r: (-r["max_delta_celsius"], r["sensor"]))
    assert rows == max_deltas(*fleet(200))  # the worktree's tasks.drift, imported on the workers

    flow_run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:  # task runs on the workers reached the same server
        while time.monotonic() < deadline:
            runs = client.read_task_runs(flow_run_filter=flow_run_filter)
            if len(runs) == 4 and all(r.state is not None and r.state.is_completed() for r in runs):
                break
            time.sleep(0.5)
    assert len(runs) == 4 and all(r.state.is_completed() for r in runs)


def test_the_cluster_stops_its_three_processes_when_the_body_fails(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL

    with pytest.raises(RuntimeError, match="a failing test"), dask_processes(tmp_path / "dask", worker_env(PREFECT_API_URL.value())) as cluster:
        assert len(cluster.pids) == 3 and all(alive(pid) for pid in cluster.pids)
        raise RuntimeError("a failing test")
    assert not [pid for pid in cluster.pids if alive(pid)]
    print(f"dask cluster: up in {cluster.started_seconds:.1f} s, stopped in {cluster.stopped_seconds:.1f} s")
