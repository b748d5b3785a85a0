"""The calibration flow: ingest -> normalize -> split -> train -> validate -> infer -> report."""


import asyncio
import concurrent.futures
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow
from prefect.context import FlowRunContext
from prefect.futures import PrefectConcurrentFuture
from prefect.runtime import flow_run
from prefect.states import State
from prefect.utilities.annotations import quote

from tasks.errors import UNREADABLE, unreadable
from tasks.settings import CalibrationSettings
from tasks.split import rows_needed
from tasks.record import new_run_id, publish_run, record_run, run_identity
from tasks.stages import (
    infer_celsius,
    ingest_readings,
    normalize_readings,
    report_run,
    split_readings,
    train_calibration,
    validate_calibration,
)
from tasks.staging import stage_key
from tasks.durable import sha256_file
from tasks.store import Store


@dataclass(frozen=True)
class StageRun:
    name: str
    ref: dict  # where the stage's output lives and its content hash (tasks.store)
    cached: bool
    seconds: float  # wall time of the stage in this run, Prefect's part included
    state: State
    ancestors: frozenset[str]  # every stage this one's output depends on, directly or not


def _content(value):
    if isinstance(value, StageRun):
        return value.ref["sha256"]
    return value["sha256"] if isinstance(value, dict) and "sha256" in value else value


def stage_call(stage_task, store: Store, keyed: dict, **unkeyed):
    """The stage task configured for this store, its arguments with the cache key, and what it waits for.

    `keyed` inputs decide the output (an upstream StageRun enters the key by its content hash, as
    DVC keys on file contents, and the stage gets its ref); `unkeyed` ones do not (paths, logging).
    A stage whose files are gone or altered is recomputed (refresh_cache) rather than trusted.

    In this process every argument is passed quoted (`Call.quoted`), so Prefect does not guess
    dependencies from the values (it matches them by object identity, and small refs share strings
    and numbers with unrelated results); the run graph's edges are declared instead: the upstream stages read, less those
    reached through another one read (train reads ingest, but through normalize and split), so the
    graph reads ingest -> normalize, split -> train -> validate, infer -> report.
    """
    key = stage_key(stage_task.name, {name: _content(value) for name, value in keyed.items()})
    configured = stage_task.with_options(result_storage=store.records, refresh_cache=not store.stage_intact(stage_task.name, key))
    reads = [value for value in keyed.values() if isinstance(value, StageRun)]
    implied = frozenset().union(*(run.ancestors for run in reads))
    arguments = {"store": str(store.root), "key": key, **{k: v.ref if isinstance(v, StageRun) else v for k, v in keyed.items()}, **unkeyed}
    call = Call(stage_task.name, arguments, [run.state for run in reads if run.name not in implied],
                frozenset(run.name for run in reads) | implied)
    return configured, call


def done(state: State) -> PrefectConcurrentFuture:
    """A finished task run as a future. Prefect takes the run of a future as a dependency and looks
    no further; a State passed in `wait_for` is searched field by field, where Prefect's
    identity-based matching finds unrelated runs (ids of freed objects are reused)."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(state)
    return PrefectConcurrentFuture(task_run_id=state.state_details.task_run_id, wrapped_future=future)


@dataclass(frozen=True)
class Call:
    """A stage's arguments, the states of the stages it builds on, and what its output will depend on."""

    name: str
    arguments: dict
    upstream: list[State]
    ancestors: frozenset[str]

    @property
    def quoted(self) -> dict:
        """The arguments as Prefect should take them in this process: as they are, not searched for dependencies."""
        return {name: quote(value) for name, value in self.arguments.items()}

    @property
    def wait_for(self) -> list[PrefectConcurrentFuture]:
        """The upstream stages as finished futures, for a call in this process (see `done`)."""
        return [done(state) for state in self.upstream]


def submit(configured, call: Call):
    """Submit a configured stage to the flow's task runner. To a Dask cluster (another process):
    plain arguments and upstream states, which pickle; in this process: quoted arguments and
    finished futures (see `Call`)."""
    if type(FlowRunContext.get().task_runner).__name__ == "DaskTaskRunner":
        return configured.submit(**call.arguments, wait_for=call.upstream)
    return configured.submit(**call.quoted, wait_for=call.wait_for)


async def stage_result(state, store: Store, started: float, call: Call) -> StageRun:
    """The stage's run from its final state; raises the stage's own error when it failed."""
    if state.is_failed():
        _discard_failure_record(state, store)
    return StageRun(call.name, await state.aresult(), state.name == "Cached", time.perf_counter() - started, state, call.ancestors)


async def _run_stage(stage_task, store: Store, keyed: dict, run_name: str | None = None, **unkeyed) -> StageRun:
    """Run one stage through Prefect's cache, awaited on the flow's event loop (its body runs in a
    thread); `run_name`: the task run's name when a stage runs twice (the refit without outliers)."""
    started = time.perf_counter()
    configured, call = stage_call(stage_task, store, keyed, **unkeyed)
    if run_name:
        configured = configured.with_options(task_run_name=run_name)
    return await stage_result(await configured(**call.quoted, wait_for=call.wait_for, return_state=True), store, started, call)


def _discard_failure_record(state, store: Store) -> None:
    """Prefect writes a failed task's exception as a result record; a failed run leaves nothing in the store."""
    storage_key = getattr(getattr(state.data, "metadata", None), "storage_key", None)
    if storage_key and Path(storage_key).resolve().is_relative_to(store.records):
        Path(storage_key).unlink(missing_ok=True)


def run_tags(settings: CalibrationSettings) -> list[str]:
    """Tags that let the UI filter runs by strategy and normalization."""
    found = [f"strategy:{settings.strategy}", f"normalize:{settings.normalize}"]
    return found + ([f"optimizer:{settings.optimizer}"] if settings.strategy == "optimizer" else [])


async def _tag_flow_run(extra: list[str]) -> None:
    """Add tags to this flow run, however it was started (CLI, schedule, UI form)."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        await client.update_flow_run(flow_run.id, tags=sorted(set(flow_run.tags) | set(extra)))


def data_file_sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except UNREADABLE as error:
        raise unreadable(path, error) from None


def ingest_inputs(settings: CalibrationSettings, data_sha256: str) -> dict:
    return {"data_sha256": data_sha256, "reading_column": settings.reading_column, "celsius_column": settings.celsius_column,
            "min_rows": rows_needed(settings.val_fraction), "sep": settings.sep, "decimal": settings.decimal}


def normalize_inputs(settings: CalibrationSettings, ingest: StageRun) -> dict:
    return {"ingest": ingest, "method": settings.normalize, "scale": settings.scale if settings.normalize == "scale" else None}


def split_inputs(settings: CalibrationSettings, ingest: StageRun) -> dict:
    return {"ingest": ingest, "val_fraction": settings.val_fraction, "seed": settings.seed}


def train_inputs(settings: CalibrationSettings, upstream: dict[str, StageRun]) -> dict:
    """What decides a training: the data's stages and the training settings that apply."""
    return {
        **upstream, "model": settings.model, "strategy": settings.strategy, "lr": settings.learning_rate, "epochs": settings.max_epochs,
        "optimizer": settings.optimizer if settings.strategy == "optimizer" else None,
        "delta": settings.delta if settings.strategy == "finite-difference" else None,
        "tol": settings.stopping_tol, "patience": settings.patience, "val_patience": settings.val_patience,
        "batch_size": settings.batch_size, "seed": settings.seed, "bootstrap": settings.bootstrap_replicates,
    }


def settings_used(settings: CalibrationSettings) -> dict:
    """The settings as the run used them: the learning rate, epoch cap and tolerance resolved."""
    used = settings.model_dump(exclude={"log_every"})
    return {**used, "lr": settings.learning_rate, "epochs": settings.max_epochs, "tol": settings.stopping_tol}


def outliers_to_drop(settings: CalibrationSettings, validate: StageRun) -> list[dict]:
    """The outliers validation found, when --drop-outliers asks to refit without them."""
    return list(validate.ref["summary"].get("outliers") or []) if settings.drop_outliers else []


def evaluate_inputs(ingest: StageRun, split: StageRun, train: StageRun) -> dict:
    """What validation and inference read: the readings, the split and the trained calibration."""
    return {"ingest": ingest, "split": split, "train": train}


@flow(name="thermocal-calibrate", persist_result=False)
async def calibrate(
    data: str = "data/readings.csv",
    store: str = "data/runs",
    settings: CalibrationSettings = CalibrationSettings(),
    predict: list[float] | None = None,
) -> dict:
    """Learn a calibration (°C from readings: a line, a polynomial or a small network) from paired readings, persisting every stage."""
    s, data_path, predict = Store(store), Path(data).resolve(), list(predict or [])
    tagging = asyncio.create_task(_tag_flow_run(run_tags(settings)))  # while the stages run
    try:
        # the tags go on the flow run only: a tagged task run asks the server for the tags'
        # concurrency limits before it starts, one round trip per stage (and per fleet partition)
        with s.tidy_on_failure():
            if settings.sensor_column is not None:  # a fleet: one calibration per sensor (flows.fleet)
                from flows.fleet import fleet_run

                return await fleet_run(s, data_path, settings, predict)
            data_sha256 = data_file_sha256(data_path)
            ingest = await _run_stage(ingest_readings, s, ingest_inputs(settings, data_sha256), data=str(data_path))
            normalize = await _run_stage(normalize_readings, s, normalize_inputs(settings, ingest))
            split = await _run_stage(split_readings, s, split_inputs(settings, ingest))
            upstream = {"ingest": ingest, "normalize": normalize, "split": split}
            train = await _run_stage(train_calibration, s, train_inputs(settings, upstream), log_every=settings.log_every)
            validate = await _run_stage(validate_calibration, s, evaluate_inputs(ingest, split, train), data=str(data_path))
            dropped = outliers_to_drop(settings, validate)
            if dropped:  # --drop-outliers: the same training without them, checked again
                refit = {**train_inputs(settings, upstream), "exclude": [o["index"] for o in dropped]}
                train = await _run_stage(train_calibration, s, refit, log_every=settings.log_every, run_name="train-without-outliers")
                validate = await _run_stage(validate_calibration, s, evaluate_inputs(ingest, split, train), data=str(data_path),
                                            run_name="validate-without-outliers")
            infer = await _run_stage(infer_celsius, s, {**evaluate_inputs(ingest, split, train), "readings": predict})
            used = settings_used(settings)
            run_id = new_run_id(datetime.now(timezone.utc))
            report = await _run_stage(report_run, s, {"ingest": ingest, "train": train, "validate": validate, "infer": infer, "settings": used},
                                      identity=run_identity(run_id, data_path))
            stages = {"ingest": ingest, "normalize": normalize, "split": split, "train": train,
                      "validate": validate, "infer": infer, "report": report}
            effective = {"lr": settings.learning_rate, "epochs": settings.max_epochs, "tol": settings.stopping_tol}
            runs = {name: {"ref": run.ref, "cached": run.cached, "seconds": run.seconds} for name, run in stages.items()}
            summary = await record_run(quote(str(s.root)), quote(str(data_path)), quote(data_sha256), quote(settings.model_dump()),
                                       quote(effective), quote(predict), quote(runs), quote(dropped), quote(run_id),
                                       wait_for=[done(report.state)])
            await publish_run(summary, used)
            from flows.fleet import announce_drift

            await announce_drift(summary, str(data_path), settings.drift_threshold)
            return summary
    finally:
        await tagging  # a failed run is tagged too
