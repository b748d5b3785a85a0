"""The calibration flow: ingest -> normalize -> split -> train -> validate -> infer -> report."""

from __future__ import annotations

import platform
import subprocess
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

from prefect import flow, task
from prefect.runtime import flow_run

from tasks.errors import InvalidInput
from tasks.settings import CalibrationSettings
from tasks.split import rows_needed
from tasks.stages import (
    CODE_MODULES,
    code_version,
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

LIBRARIES = ("torch", "prefect", "pandera", "pandas", "numpy", "joblib", "pydantic", "matplotlib")


@dataclass(frozen=True)
class StageRun:
    ref: dict
    cached: bool


def _content(value):
    return value["sha256"] if isinstance(value, dict) and "sha256" in value else value


def _run_stage(stage_task, store: Store, keyed: dict, **unkeyed) -> StageRun:
    """Run one stage through Prefect's cache; a stage whose files are gone or altered is recomputed."""
    # an upstream stage enters the key by its content hash, as DVC keys on file contents
    key_inputs = {name: _content(value) for name, value in keyed.items()}
    key = stage_key(stage_task.name, key_inputs)
    configured = stage_task.with_options(result_storage=store.records, refresh_cache=not store.stage_intact(stage_task.name, key))
    state = configured(store=str(store.root), key=key, **keyed, **unkeyed, return_state=True)
    if state.is_failed():
        _discard_failure_record(state, store)
    ref = state.result()  # raises the stage's own error when it failed
    return StageRun(ref, state.name == "Cached")


def _discard_failure_record(state, store: Store) -> None:
    """Prefect writes a failed task's exception as a result record; a failed run leaves nothing in the store."""
    storage_key = getattr(getattr(state.data, "metadata", None), "storage_key", None)
    if storage_key and Path(storage_key).resolve().is_relative_to(store.records):
        Path(storage_key).unlink(missing_ok=True)


def _data_sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InvalidInput(f"{path}: is a directory, not a CSV file") from None
    except PermissionError:
        raise InvalidInput(f"{path}: permission denied") from None


def _code_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@task(name="record-run")
def record_run(store: str, data: str, data_sha256: str, settings: dict, predict: list[float], stages: dict[str, dict]) -> dict:
    """Write the run's manifest and return the run's summary."""
    s = Store(store)
    now = datetime.now(timezone.utc)
    run_id = f"{now:%Y%m%d-%H%M%S}-{(flow_run.id or uuid.uuid4().hex).replace('-', '')[:8]}"
    train, validate, infer = (stages[n]["ref"]["summary"] for n in ("train", "validate", "infer"))
    summary = {
        "run_id": run_id,
        "run_dir": str(s.run_dir(run_id)),
        "model": {"w": train["w"], "b": train["b"]},
        "calibration": {"slope": train["slope"], "intercept": train["intercept"]},
        "train_loss": validate["train_loss"],
        "val_loss": validate["val_loss"],
        "optimum": validate["optimum"],
        "gap_to_optimum": validate["gap_to_optimum"],
        "epochs_run": train["epochs_run"],
        "predictions": infer["new"],
        "stages": {name: {"path": str(s.path(run["ref"]["path"])), "cached": run["cached"]} for name, run in stages.items()},
        "report": str(s.path(stages["report"]["ref"]["files"]["report.png"])),
    }
    manifest = {
        "run_id": run_id,
        "created": now.isoformat(),
        "flow_run_id": flow_run.id,
        "data": {"path": data, "sha256": data_sha256},
        "parameters": {**settings, "predict": predict},
        "code": {
            "revision": _code_revision(),
            "sha256": code_version(tuple(sorted({m for mods in CODE_MODULES.values() for m in mods}))),
        },
        "libraries": {"python": platform.python_version(), **{name: version(name) for name in LIBRARIES}},
        "stages": {
            name: {**{k: run["ref"][k] for k in ("key", "path", "sha256", "files")}, "cached": run["cached"]}
            for name, run in stages.items()
        },
        "results": {k: summary[k] for k in ("model", "calibration", "train_loss", "val_loss", "optimum", "gap_to_optimum", "epochs_run", "predictions")},
    }
    s.write_manifest(run_id, manifest)
    return summary


@flow(name="thermocal-calibrate", persist_result=False)
def calibrate(
    data: str = "data/readings.csv",
    store: str = "data/runs",
    settings: CalibrationSettings = CalibrationSettings(),
    predict: list[float] | None = None,
) -> dict:
    """Learn °C = slope × reading + intercept from paired readings, persisting every stage."""
    s, data_path, predict = Store(store), Path(data).resolve(), list(predict or [])
    with s.tidy_on_failure():
        data_sha256 = _data_sha256(data_path)
        ingest = _run_stage(
            ingest_readings, s,
            {"data_sha256": data_sha256, "reading_column": settings.reading_column,
             "celsius_column": settings.celsius_column, "min_rows": rows_needed(settings.val_fraction)},
            data=str(data_path),
        )
        normalize = _run_stage(
            normalize_readings, s,
            {"ingest": ingest.ref, "method": settings.normalize,
             "scale": settings.scale if settings.normalize == "scale" else None},
        )
        split = _run_stage(split_readings, s, {"ingest": ingest.ref, "val_fraction": settings.val_fraction, "seed": settings.seed})
        upstream = {"ingest": ingest.ref, "normalize": normalize.ref, "split": split.ref}
        train = _run_stage(
            train_calibration, s,
            {**upstream, "strategy": settings.strategy, "lr": settings.lr, "epochs": settings.epochs,
             "optimizer": settings.optimizer if settings.strategy == "optimizer" else None,
             "delta": settings.delta if settings.strategy == "finite-difference" else None},
            log_every=settings.log_every,
        )
        validate = _run_stage(validate_calibration, s, {**upstream, "train": train.ref})
        infer = _run_stage(infer_celsius, s, {**upstream, "train": train.ref, "readings": predict})
        report = _run_stage(
            report_run, s,
            {"train": train.ref, "validate": validate.ref, "infer": infer.ref,
             "settings": settings.model_dump(exclude={"log_every"})},
        )
        stages = {"ingest": ingest, "normalize": normalize, "split": split, "train": train,
                  "validate": validate, "infer": infer, "report": report}
        return record_run(str(s.root), str(data_path), data_sha256, settings.model_dump(), predict,
                          {name: {"ref": run.ref, "cached": run.cached} for name, run in stages.items()})
