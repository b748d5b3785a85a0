"""Fleet drift (tasks/drift.py), timed: max_deltas on fleets of each family, and with --events,
what emitting drift events costs against a running server (in a flow run, as the pipeline does).

    python benchmarks/drift_probe.py --repeats 5
    PREFECT_API_URL=http://127.0.0.1:4392/api PREFECT_HOME=/tmp/drift-home \
        python benchmarks/drift_probe.py --repeats 1 --events 1000 10000

Run from the repository root (it imports this checkout's tasks). Medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.calibration import Calibration
from tasks.drift import EVENT_LIMIT, EVENT_NAME, emit_drift_events, max_deltas
from tasks.models import make_model
from tasks.normalize import Normalizer


def _record(spec: str, rng: np.random.Generator) -> dict:
    """A calibration of family `spec` with random parameters near a line (the poly basis fitted on its range)."""
    model, normalizer = make_model(spec), Normalizer("standard", 150.0, 1 / 40)
    if spec.startswith("poly"):
        model = model.fit(normalizer.apply64(np.linspace(100.0, 200.0, 20)))
    theta = rng.normal(size=model.size).astype(np.float32)
    return Calibration(model, theta, normalizer, (100.0, 200.0)).to_record()


def _fleet(spec: str, sensors: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    return tuple({f"s{i:05d}": _record(spec, rng) for i in range(sensors)} for _ in range(2))


def time_drift(repeats: int) -> None:
    for spec, sensors in (("linear", 10_000), ("poly:3", 1_000), ("mlp:13", 1_000)):
        previous, current = _fleet(spec, sensors)
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            max_deltas(previous, current)
            seconds.append(time.perf_counter() - started)
        median = statistics.median(seconds)
        print(f"max_deltas {spec:7} {sensors:6} sensors: {median:.3f} s ({median / sensors * 1e6:.0f} µs a sensor)")


def time_events(counts: list[int]) -> None:
    """Per count: drifted rows given to emit_drift_events uncapped (limit = count) and with the default cap."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter
    from prefect.events.worker import EventsWorker

    @flow(name="thermocal-drift-probe")
    def emit(count: int, run_id: str, limit: int) -> tuple[float, float]:
        drift = [{"sensor": f"s{i:05d}", "max_delta_celsius": 1.0, "at_reading": 150.0} for i in range(count)]
        started = time.perf_counter()
        emit_drift_events(drift, run_id, "probe.csv", 0.1, limit=limit)
        emitted = time.perf_counter() - started
        EventsWorker.drain_all()  # until every event has left the process
        return emitted, time.perf_counter() - started - emitted

    for count in counts:
        for limit in (count, EVENT_LIMIT):
            run_id = f"probe-{time.time_ns()}"
            emitted, sent = emit(count, run_id, limit)
            started, expected = time.perf_counter(), min(count, limit)
            with get_client(sync_client=True) as client:
                while client.read_events(EventFilter(event=EventNameFilter(name=[EVENT_NAME]),
                                                     related=EventRelatedFilter(id=[f"thermocal.run.{run_id}"])), limit=1).total < expected:
                    time.sleep(0.5)
            print(f"{count:6} drifted, limit {limit:6}: emit_event calls {emitted:.2f} s, sending {sent:.2f} s, "
                  f"listed by the server {time.perf_counter() - started:.2f} s later")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--events", type=int, nargs="*", default=[], help="drifted sensors to emit events for (needs a server)")
    args = parser.parse_args()
    time_drift(args.repeats)
    if args.events:
        time_events(args.events)
