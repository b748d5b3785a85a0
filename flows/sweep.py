"""A grid of trainings as one flow: shared data stages, trainings in parallel through a task runner."""

import time
from pathlib import Path

from prefect import flow

from flows.calibrate import (
    _run_stage,
    data_file_sha256,
    evaluate_inputs,
    ingest_inputs,
    normalize_inputs,
    split_inputs,
    stage_call,
    stage_result,
    submit,
    train_inputs,
)
from tasks.errors import ThermocalError
from tasks.record import record_sweep
from tasks.settings import CalibrationSettings, ModelSpec, Normalization, Strategy, sweep_grid
from tasks.stages import ingest_readings, normalize_readings, split_readings, train_calibration, validate_calibration
from tasks.store import Store


@flow(name="thermocal-sweep", persist_result=False)
async def sweep(
    data: str = "data/readings.csv",
    store: str = "data/runs",
    settings: CalibrationSettings = CalibrationSettings(),
    strategies: list[Strategy] = ["analytic"],
    lrs: list[float] = [1e-2],
    normalizations: list[Normalization] = ["standard"],
    models: list[ModelSpec] | None = None,
) -> dict:
    """Train every combination (models x normalizations x strategies x learning rates; `models`
    empty: the settings' model) on the same ingested data and split; compare them in one table."""
    s, data_path = Store(store), Path(data).resolve()
    grid = sweep_grid(settings, strategies, lrs, normalizations, models)
    if settings.sensor_column is not None:
        with s.tidy_on_failure():
            return await _sweep_fleet(s, data_path, grid)
    with s.tidy_on_failure():
        data_sha256 = data_file_sha256(data_path)
        ingest = await _run_stage(ingest_readings, s, ingest_inputs(settings, data_sha256), data=str(data_path))
        split = await _run_stage(split_readings, s, split_inputs(settings, ingest))
        normalized = {n: await _run_stage(normalize_readings, s, normalize_inputs(c, ingest))
                      for n, c in {c.normalize: c for c in grid}.items()}
        submitted = []
        for config in grid:  # every training goes to the task runner at once
            upstream = {"ingest": ingest, "normalize": normalized[config.normalize], "split": split}
            task, call = stage_call(train_calibration, s, train_inputs(config, upstream), log_every=config.log_every)
            submitted.append((config, call, time.perf_counter(), submit(task, call)))
        rows = []
        for config, call, started, future in submitted:
            future.wait()
            try:
                train = await stage_result(future.state, s, started, call)
            except ThermocalError as error:  # one diverging combination does not sink the sweep
                rows.append({"config": config.model_dump(), "error": str(error)})
                continue
            validate = await _run_stage(validate_calibration, s, evaluate_inputs(ingest, split, train), data=str(data_path))
            rows.append({"config": config.model_dump(), "lr": config.learning_rate, "train": train.ref["summary"],
                         "validate": validate.ref["summary"], "cached": train.cached, "train_path": train.ref["path"]})
        return record_sweep(str(s.root), str(data_path), data_sha256, rows)


async def _sweep_fleet(s: Store, data_path: Path, grid: list[CalibrationSettings]) -> dict:
    """A fleet's sweep: every combination calibrates every sensor (its partitions through the task
    runner, flows.fleet); a row per combination sums the fleet up (tasks.record.fleet_row)."""
    from flows.fleet import calibrate_fleet

    results, data_sha256 = [], None
    for config in grid:
        try:
            stages, partitions, data_sha256, report = await calibrate_fleet(s, data_path, config)
        except ThermocalError as error:  # a combination that fails does not sink the sweep
            results.append({"config": config.model_dump(), "error": str(error)})
            continue
        results.append({"config": config.model_dump(), "lr": config.learning_rate, "fleet_table": s.load(report.ref),
                        "seconds": stages["train"]["seconds"], "cached": all(p.cached for p in partitions) and report.cached,
                        "train_path": str(s.path(report.ref["files"]["sensors.csv"]))})
    return record_sweep(str(s.root), str(data_path), data_sha256 or data_file_sha256(data_path), results)
