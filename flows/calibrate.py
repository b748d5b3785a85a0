"""The calibration flow: ingest -> normalize -> split -> train -> validate -> infer -> report."""


import time
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, tags
from prefect.runtime import flow_run

from tasks.errors import UNREADABLE, unreadable
from tasks.settings import CalibrationSettings
from tasks.split import rows_needed
from tasks.record import record_run
from tasks.stages import (
    infer_celsius,
    ingest_readings,
    normalize_readings,
    report_run,
    split_readings,
    stage_key,
    train_calibration,
    validate_calibration,
)
from tasks.store import Store, sha256_file


@dataclass(frozen=True)
class StageRun:
    ref: dict
    cached: bool
    seconds: float  # wall time of the stage in this run, Prefect's part included


def _content(value):
    return value["sha256"] if isinstance(value, dict) and "sha256" in value else value


def stage_call(stage_task, store: Store, keyed: dict, **unkeyed):
    """The stage task configured for this store, and its arguments with the cache key.

    `keyed` inputs decide the output (an upstream stage enters the key by its content hash, as
    DVC keys on file contents); `unkeyed` ones do not (paths, logging). A stage whose files are
    gone or altered is recomputed (refresh_cache) rather than trusted.
    """
    key = stage_key(stage_task.name, {name: _content(value) for name, value in keyed.items()})
    configured = stage_task.with_options(result_storage=store.records, refresh_cache=not store.stage_intact(stage_task.name, key))
    return configured, {"store": str(store.root), "key": key, **keyed, **unkeyed}


def stage_result(state, store: Store, started: float) -> StageRun:
    """The stage's ref from its final state; raises the stage's own error when it failed."""
    if state.is_failed():
        _discard_failure_record(state, store)
    return StageRun(state.result(), state.name == "Cached", time.perf_counter() - started)


def _run_stage(stage_task, store: Store, keyed: dict, **unkeyed) -> StageRun:
    """Run one stage through Prefect's cache, in this thread."""
    started = time.perf_counter()
    configured, arguments = stage_call(stage_task, store, keyed, **unkeyed)
    return stage_result(configured(**arguments, return_state=True), store, started)


def _discard_failure_record(state, store: Store) -> None:
    """Prefect writes a failed task's exception as a result record; a failed run leaves nothing in the store."""
    storage_key = getattr(getattr(state.data, "metadata", None), "storage_key", None)
    if storage_key and Path(storage_key).resolve().is_relative_to(store.records):
        Path(storage_key).unlink(missing_ok=True)


def run_tags(settings: CalibrationSettings) -> list[str]:
    """Tags that let the UI filter runs by strategy and normalization."""
    found = [f"strategy:{settings.strategy}", f"normalize:{settings.normalize}"]
    return found + ([f"optimizer:{settings.optimizer}"] if settings.strategy == "optimizer" else [])


def _tag_flow_run(extra: list[str]) -> None:
    """Add tags to this flow run, however it was started (CLI, schedule, UI form)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=sorted(set(flow_run.tags) | set(extra)))


def data_file_sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except UNREADABLE as error:
        raise unreadable(path, error) from None


def ingest_inputs(settings: CalibrationSettings, data_sha256: str) -> dict:
    return {"data_sha256": data_sha256, "reading_column": settings.reading_column,
            "celsius_column": settings.celsius_column, "min_rows": rows_needed(settings.val_fraction)}


def normalize_inputs(settings: CalibrationSettings, ingest: dict) -> dict:
    return {"ingest": ingest, "method": settings.normalize, "scale": settings.scale if settings.normalize == "scale" else None}


def split_inputs(settings: CalibrationSettings, ingest: dict) -> dict:
    return {"ingest": ingest, "val_fraction": settings.val_fraction, "seed": settings.seed}


def train_inputs(settings: CalibrationSettings, upstream: dict) -> dict:
    """What decides a training: the data's stages and the training settings that apply."""
    return {
        **upstream, "model": settings.model, "strategy": settings.strategy, "lr": settings.learning_rate, "epochs": settings.max_epochs,
        "optimizer": settings.optimizer if settings.strategy == "optimizer" else None,
        "delta": settings.delta if settings.strategy == "finite-difference" else None,
        "tol": settings.stopping_tol, "patience": settings.patience, "val_patience": settings.val_patience,
        "batch_size": settings.batch_size, "seed": settings.seed,
    }


def evaluate_inputs(ingest: dict, split: dict, train: dict) -> dict:
    """What validation and inference read: the readings, the split and the trained calibration."""
    return {"ingest": ingest, "split": split, "train": train}


@flow(name="thermocal-calibrate", persist_result=False)
def calibrate(
    data: str = "data/readings.csv",
    store: str = "data/runs",
    settings: CalibrationSettings = CalibrationSettings(),
    predict: list[float] | None = None,
) -> dict:
    """Learn a calibration (°C from readings: a line, a polynomial or a small network) from paired readings, persisting every stage."""
    s, data_path, predict = Store(store), Path(data).resolve(), list(predict or [])
    _tag_flow_run(run_tags(settings))
    with s.tidy_on_failure(), tags(*run_tags(settings)):
        data_sha256 = data_file_sha256(data_path)
        ingest = _run_stage(ingest_readings, s, ingest_inputs(settings, data_sha256), data=str(data_path))
        normalize = _run_stage(normalize_readings, s, normalize_inputs(settings, ingest.ref))
        split = _run_stage(split_readings, s, split_inputs(settings, ingest.ref))
        upstream = {"ingest": ingest.ref, "normalize": normalize.ref, "split": split.ref}
        train = _run_stage(train_calibration, s, train_inputs(settings, upstream), log_every=settings.log_every)
        validate = _run_stage(validate_calibration, s, evaluate_inputs(ingest.ref, split.ref, train.ref))
        infer = _run_stage(infer_celsius, s, {**evaluate_inputs(ingest.ref, split.ref, train.ref), "readings": predict})
        report = _run_stage(
            report_run, s,
            {"ingest": ingest.ref, "train": train.ref, "validate": validate.ref, "infer": infer.ref,
             "settings": settings.model_dump(exclude={"log_every"})},
        )
        stages = {"ingest": ingest, "normalize": normalize, "split": split, "train": train,
                  "validate": validate, "infer": infer, "report": report}
        effective = {"lr": settings.learning_rate, "epochs": settings.max_epochs, "tol": settings.stopping_tol}
        return record_run(str(s.root), str(data_path), data_sha256, settings.model_dump(), effective, predict,
                          {name: {"ref": run.ref, "cached": run.cached, "seconds": run.seconds} for name, run in stages.items()})
