"""A fleet's stages as thin Prefect tasks: one ingest, then train, validate and infer once per
partition (each cached on its own partition's rows), then one report over all of them.

The ingest stage groups the rows by partition (tasks.fleet.partition_of: a stable hash of each
sensor's id) and writes each partition's rows as a file of their own, with the sha256 of its
content in the stage's summary: a partition's stages key on that hash and the settings, so new
readings for one sensor change one partition's key and every other partition comes back Cached.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from prefect import get_run_logger

from tasks.staging import READABLE_ROWS, csv_file, joblib_file, stage
from tasks.store import Store

FLEET_MODULES = ("tasks.fleet", "tasks.fleet_arrays", "tasks.models", "tasks.calibration", "tasks.normalize", "tasks.split",
                 "tasks.batched", "tasks.batched_steps", "tasks.strategies", "tasks.train", "tasks.uncertainty", "tasks.evaluate",
                 "tasks.model", "tasks.errors")
# what the sensors table holds, in this order (`thermocal sensors --json` gives these fields)
TABLE_FIELDS = ("sensor", "model", "coefficients", "standard_uncertainties", "train_loss", "val_loss", "gap_to_optimum",
                "epochs_run", "status")


def partition_name(index: int) -> str:
    return f"p{index:05d}"


def _content_sha256(*arrays) -> str:
    """sha256 over arrays' dtypes, shapes and bytes: a partition's identity, whatever file holds it."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


@stage("fleet-ingest", ("tasks.fleet_stages", "tasks.fleet_ingest", "tasks.ingest", "tasks.fleet", "tasks.errors"))
def ingest_fleet(store: str, key: str, data_sha256: str, reading_column: str, celsius_column: str, sensor_column: str,
                 partition_size: int, data: str, sep: str = ",", decimal: str = ".") -> dict:
    """Read and validate the fleet file (one pass), then write each partition's rows (file order
    within a sensor) as `part-NNNNN.joblib`: readings, °C, local sensor codes and the ids."""
    import numpy as np

    from tasks.fleet import partition_of
    from tasks.fleet_ingest import load_fleet

    table, sensors = load_fleet(Path(data), reading_column, celsius_column, sensor_column, sep, decimal)
    rows = len(table)
    partition = partition_of(sensors, partition_size)  # per sensor code
    row_partition = partition[table["sensor"].to_numpy()]
    order = np.argsort(row_partition, kind="stable")  # rows grouped by partition, in file order within
    bounds = np.concatenate([[0], np.cumsum(np.bincount(row_partition, minlength=int(partition.max()) + 1))])
    # the sorted copies replace the table column by column: at most one column exists twice
    reading, celsius, code = (table.pop(c).to_numpy()[order] for c in ("reading", "celsius", "sensor"))
    del table, row_partition, order
    parts, files = [], {}
    for p in range(len(bounds) - 1):
        members = np.flatnonzero(partition == p)  # the partition's sensors by code: sorted ids
        part = slice(bounds[p], bounds[p + 1])
        local = np.searchsorted(members, code[part]).astype(np.int32)
        ids = np.asarray(sensors[members], dtype=str)
        content = {"reading": reading[part], "celsius": celsius[part], "codes": local, "sensors": ids}
        name = f"part-{p:05d}.joblib"
        files[name] = joblib_file(content)
        parts.append({"name": partition_name(p), "file": name, "sensors": len(members), "rows": int(bounds[p + 1] - bounds[p]),
                      "sha256": _content_sha256(reading[part], celsius[part], local, np.char.encode(ids, "utf-8"))})
    index = {"sensors": np.asarray(sensors, dtype=str), "partition": partition}
    get_run_logger().info("ingested %d valid readings of %d sensors from %s, in %d partition(s)", rows, len(sensors), data, len(parts))
    summary = {"rows": rows, "sensors": len(sensors), "partitions": parts, "data_sha256": data_sha256}
    return Store(store).write_stage("fleet-ingest", key, {"fleet.joblib": joblib_file(index), **files}, summary)


def _part(s: Store, ingest: dict, partition: dict) -> dict:
    return s.load(s.file_ref(ingest, partition["file"]))


@stage("fleet-train", ("tasks.fleet_stages", *FLEET_MODULES))
def train_partition(store: str, key: str, ingest: dict, partition: dict, settings: dict) -> dict:
    """Every sensor of one partition trained at once (tasks.fleet.train_sensors); sensors that
    cannot be calibrated are listed with the reason, the others calibrated."""
    # the libraries training uses, imported before its clock starts: their import is not training
    import scipy.special  # noqa: F401 - Student's t of the uncertainty
    import torch  # noqa: F401

    from tasks.fleet import train_sensors
    from tasks.settings import CalibrationSettings

    s = Store(store)
    part = _part(s, ingest, partition)
    started = time.time()
    trained = train_sensors(part["reading"], part["celsius"], part["codes"], part["sensors"], CalibrationSettings(**settings))
    ended = time.time()
    batched = trained.pop("seconds")  # a timing, not data: the same inputs give byte-identical files
    failed = trained["failed"]
    get_run_logger().info("partition %s: %d sensors, %d calibrated, %d failed, trained in %.2f s", partition["name"],
                          partition["sensors"], partition["sensors"] - len(failed), len(failed), ended - started)
    summary = {"partition": partition["name"], "sensors": partition["sensors"], "failed": failed, "batched_seconds": batched,
               "started": started, "ended": ended}  # wall-clock times, so the flow can tell the fleet's training span
    return s.write_stage("fleet-train", key, {"train.joblib": joblib_file(trained)}, summary)


@stage("fleet-validate", ("tasks.fleet_stages", *FLEET_MODULES))
def validate_partition(store: str, key: str, ingest: dict, partition: dict, train: dict) -> dict:
    """Per sensor: losses in float64, the gap to its least-squares optimum, its residual SD."""
    from tasks.fleet import validate_sensors

    s, started = Store(store), time.time()
    part, trained = _part(s, ingest, partition), s.load(train)
    table = validate_sensors(part["reading"], part["celsius"], part["codes"], trained)
    summary = {"partition": partition["name"], "started": started, "ended": time.time()}
    return s.write_stage("fleet-validate", key, {"validate.joblib": joblib_file(table)}, summary)


@stage("fleet-infer", ("tasks.fleet_stages", *FLEET_MODULES))
def infer_partition(store: str, key: str, ingest: dict, partition: dict, train: dict) -> dict:
    """Every reading of the partition through its sensor's calibration (float32 °C, NaN for failed sensors)."""
    import pandas as pd

    from tasks.fleet import infer_sensors

    s, started = Store(store), time.time()
    part, trained = _part(s, ingest, partition), s.load(train)
    fitted = infer_sensors(part["reading"], part["codes"], trained)
    table = pd.DataFrame({"sensor": pd.Categorical.from_codes(part["codes"], categories=part["sensors"]),
                          "reading": part["reading"], "celsius": part["celsius"], "fitted": fitted})
    files = {"infer.joblib": joblib_file(table)}
    if len(table) <= READABLE_ROWS:
        files["predictions.csv"] = csv_file(table)
    return s.write_stage("fleet-infer", key, files, {"partition": partition["name"], "started": started, "ended": time.time()})


@stage("fleet-report", ("tasks.fleet_stages", "tasks.fleet_report", *FLEET_MODULES))
def report_fleet(store: str, key: str, contents: list[list[str]], model: str, trains: list[dict], validates: list[dict]) -> dict:
    """The per-sensor table of the whole fleet (CSV for people, joblib for tools), every sensor's
    calibration in one file (`thermocal predict --sensor`), and the distribution plot. `contents`:
    each partition's training and validation hashes (the key); `trains`, `validates`: their refs."""
    import pandas as pd

    from tasks.fleet import fleet_calibration
    from tasks.fleet_report import plot_distribution

    s = Store(store)
    table = pd.concat([s.load(ref) for ref in validates], ignore_index=True).sort_values("sensor", kind="stable", ignore_index=True)
    calibrations = {}
    for ref in trains:
        trained = s.load(ref)
        calibrations.update({sensor: fleet_calibration(trained, sensor).to_record()
                             for sensor, ok in zip(trained["sensors"], trained["calibrated"]) if ok})
    files = {"sensors.joblib": joblib_file(table), "sensors.csv": csv_file(table), "calibrations.joblib": joblib_file(calibrations),
             "fleet.png": lambda path: plot_distribution(path, table, model)}
    counts = table["status"].value_counts().to_dict()
    return s.write_stage("fleet-report", key, files, {"sensors": len(table), "calibrated": int(counts.get("calibrated", 0))})
