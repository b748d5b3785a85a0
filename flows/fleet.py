"""A fleet run: one ingest, then every partition's train -> validate, infer through the flow's task
runner (threads, or Dask), then the fleet's report, drift check and record.

Partitions' trainings are submitted all at once; each partition's validation and inference are
submitted once its training is done (taken in partition order), behind the trainings still queued.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact
from prefect.utilities.annotations import quote

from flows.calibrate import Call, StageRun, _run_stage, data_file_sha256, done, settings_used, stage_result, submit, train_inputs
from tasks.errors import InvalidInput
from tasks.fleet_record import publish_fleet, record_fleet
from tasks.fleet_stages import infer_partition, ingest_fleet, report_fleet, train_partition, validate_partition
from tasks.record import new_run_id
from tasks.settings import CalibrationSettings
from tasks.staging import stage_key
from tasks.store import Store

FLEET_PROGRESS_KEY = "thermocal-fleet-progress"


def fleet_ingest_inputs(settings: CalibrationSettings, data_sha256: str) -> dict:
    return {"data_sha256": data_sha256, "reading_column": settings.reading_column, "celsius_column": settings.celsius_column,
            "sensor_column": settings.sensor_column, "partition_size": settings.partition_size, "sep": settings.sep,
            "decimal": settings.decimal}


def training_settings(settings: CalibrationSettings) -> dict:
    """What decides every sensor's calibration: the settings a single-sensor training keys on, and
    the normalization and split (done per sensor inside the partition)."""
    used = {k: v for k, v in train_inputs(settings, {}).items() if k not in ("bootstrap",)}
    return {**used, "normalize": settings.normalize, "scale": settings.scale if settings.normalize == "scale" else None,
            "val_fraction": settings.val_fraction}


@dataclass
class Partition:
    """One partition's three task runs as they finish."""

    entry: dict  # the ingest summary's: name, file, sensors, rows, sha256
    train: StageRun | None = None
    validate: StageRun | None = None
    infer: StageRun | None = None

    @property
    def cached(self) -> bool:
        return all(run.cached for run in (self.train, self.validate, self.infer))


def _submit(task, s: Store, stage: str, partition: dict, keyed: dict, upstream: list[StageRun], **arguments):
    """Submit one partition's stage to the flow's task runner, cached on `keyed` (the partition's
    content hash, upstream outputs' hashes, settings); task run named `stage[pNNNNN]`."""
    key = stage_key(task.name, keyed)
    configured = task.with_options(result_storage=s.records, refresh_cache=not s.stage_intact(task.name, key),
                                   task_run_name=f"{stage}[{partition['name']}]")
    call = Call(task.name, {"store": str(s.root), "key": key, "partition": partition, **arguments},
                [run.state for run in upstream], frozenset(run.name for run in upstream))
    return submit(configured, call), call, time.perf_counter()


async def _finish(submitted, s: Store) -> StageRun:
    future, call, started = submitted
    future.wait()
    return await stage_result(future.state, s, started, call)


class Progress:
    """Partitions done of the total: a log line each, and a progress artifact the UI shows."""

    def __init__(self, total: int):
        self.total, self.done, self.artifact = total, 0, None

    async def start(self) -> None:
        self.artifact = await acreate_progress_artifact(0.0, key=FLEET_PROGRESS_KEY, description="fleet partitions done (%)")

    async def advance(self, partition: Partition) -> None:
        self.done += 1
        get_run_logger().info("partition %s done (%s): %d of %d", partition.entry["name"],
                              "cached" if partition.cached else "computed", self.done, self.total)
        await aupdate_progress_artifact(self.artifact, 100.0 * self.done / self.total)


async def run_partitions(s: Store, ingest: StageRun, settings: CalibrationSettings) -> list[Partition]:
    """Every partition's train, then validate and infer as soon as its training is done."""
    entries = ingest.ref["summary"]["partitions"]
    trained = training_settings(settings)
    partitions = [Partition(entry) for entry in entries]
    trains = [_submit(train_partition, s, "train", p.entry, {"partition": p.entry["sha256"], "settings": trained}, [ingest],
                      ingest=ingest.ref, settings=settings.model_dump()) for p in partitions]
    progress = Progress(len(partitions))
    await progress.start()
    evaluations = []
    for partition, submitted in zip(partitions, trains):
        partition.train = await _finish(submitted, s)
        keyed = {"partition": partition.entry["sha256"], "train": partition.train.ref["sha256"]}
        evaluations.append([_submit(task, s, name, partition.entry, keyed, [ingest, partition.train],
                                    ingest=ingest.ref, train=partition.train.ref)
                            for task, name in ((validate_partition, "validate"), (infer_partition, "infer"))])
    for partition, (validating, inferring) in zip(partitions, evaluations):
        partition.validate, partition.infer = await _finish(validating, s), await _finish(inferring, s)
        await progress.advance(partition)
    return partitions


def _span(runs: list[StageRun]) -> float:
    """From the first computed run's start to the last one's end, as the task bodies reported them
    (their wall clocks: partitions run side by side, so their seconds do not add up); 0 when all were cached."""
    computed = [r.ref["summary"] for r in runs if not r.cached]
    return max(c["ended"] for c in computed) - min(c["started"] for c in computed) if computed else 0.0


def stage_totals(ingest: StageRun, partitions: list[Partition], report: StageRun) -> dict:
    """The run's stages as a single run reports them; train, validate and infer over all partitions
    (`path`: the stage's folder, `seconds`: the span of its computed partitions, see _span)."""

    def total(name: str) -> dict:
        runs = [getattr(p, name) for p in partitions]
        return {"ref": {**runs[0].ref, "path": str(Path(runs[0].ref["path"]).parent.parent)}, "cached": all(r.cached for r in runs),
                "seconds": _span(runs)}

    return {"ingest": {"ref": ingest.ref, "cached": ingest.cached, "seconds": ingest.seconds}, "train": total("train"),
            "validate": total("validate"), "infer": total("infer"),
            "report": {"ref": report.ref, "cached": report.cached, "seconds": report.seconds}}


async def calibrate_fleet(s: Store, data_path: Path, settings: CalibrationSettings) -> tuple[dict, list[Partition], str, StageRun]:
    """The fleet's stages; returns the stages as the record takes them, the partitions, the data's sha256 and the report's run."""
    data_sha256 = data_file_sha256(data_path)
    ingest = await _run_stage(ingest_fleet, s, fleet_ingest_inputs(settings, data_sha256), data=str(data_path))
    partitions = await run_partitions(s, ingest, settings)
    contents = [[p.train.ref["sha256"], p.validate.ref["sha256"]] for p in partitions]
    report = await _run_stage(report_fleet, s, {"contents": contents, "model": settings.model},
                              trains=[p.train.ref for p in partitions], validates=[p.validate.ref for p in partitions])
    return stage_totals(ingest, partitions, report), partitions, data_sha256, report


async def announce_drift(summary: dict, data: str, threshold: float) -> None:
    """One Prefect event per drifted calibration (tasks.drift), for automations to act on."""
    if summary.get("drift"):
        from tasks.drift import emit_drift_events

        emit_drift_events(summary["drift"], summary["run_id"], data, threshold)
        get_run_logger().warning("%d calibration(s) drifted more than %g °C since run %s: %s", len(summary["drift"]), threshold,
                                 summary["drift_baseline"], ", ".join(d["sensor"] for d in summary["drift"][:10]))


async def fleet_run(s: Store, data_path: Path, settings: CalibrationSettings, predict: list[float]) -> dict:
    """The whole fleet run: stages, record, artifacts, drift events; returns the run's summary."""
    if predict:
        raise InvalidInput("--predict converts readings of one calibration; a fleet has one per sensor: "
                           "`thermocal predict --sensor ID READING ...` after the run")
    stages, partitions, data_sha256, report = await calibrate_fleet(s, data_path, settings)
    failed = [failure for p in partitions for failure in p.train.ref["summary"]["failed"]]
    cached = sum(p.cached for p in partitions)
    counts = {"total": len(partitions), "computed": len(partitions) - cached, "cached": cached}
    effective = {"lr": settings.learning_rate, "epochs": settings.max_epochs, "tol": settings.stopping_tol}
    run_id = new_run_id(datetime.now(timezone.utc))
    outputs = [{**{k: p.entry[k] for k in ("name", "sensors", "rows", "sha256")}, "cached": p.cached,
                **{name: getattr(p, name).ref["path"] for name in ("train", "validate", "infer")}} for p in partitions]
    summary = await record_fleet(quote(str(s.root)), quote(str(data_path)), quote(data_sha256), quote(settings_used(settings)),
                                 quote(effective), quote(stages), quote(counts), quote(failed), quote(run_id), quote(settings.baseline),
                                 quote(outputs), wait_for=[done(report.state)])
    await publish_fleet(summary)
    await announce_drift(summary, str(data_path), settings.drift_threshold)
    return summary
