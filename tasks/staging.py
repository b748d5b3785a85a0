"""What every stage is made of: its cache key (code and inputs), a Prefect task whose body runs in
a thread, and writers for its output files."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.util
import sys
from pathlib import Path

from prefect import task

from tasks.durable import sha256_json, write_buffers, write_json
from tasks.store import limit_heap_retention

# the modules whose source decides each stage's output; editing one invalidates that stage's cache
CODE_MODULES: dict[str, tuple[str, ...]] = {}


@functools.cache
def _source_sha256(module: str) -> str:
    """sha256 of a module's source file, read once per process (found without importing it)."""
    return hashlib.sha256(Path(importlib.util.find_spec(module).origin).read_bytes()).hexdigest()


@functools.cache
def code_version(modules: tuple[str, ...]) -> str:
    """sha256 over the source files of `modules`."""
    return sha256_json({name: _source_sha256(name) for name in modules})


def stage_key(stage: str, inputs: dict) -> str:
    """The cache key of a stage: its name, its code, and the inputs that decide its output."""
    return sha256_json({"stage": stage, "code": code_version(CODE_MODULES[stage]), "inputs": inputs})


def _cache_key(context, parameters: dict) -> str:
    return parameters["key"]


def _in_worker(body, *args, **kwargs):
    limit_heap_retention()
    return body(*args, **kwargs)


def threaded_task(**options):
    """A Prefect task whose body, plain blocking code (torch, pandas, files), runs in a worker
    thread with the task's context.

    The task itself is async, so the async flows await it on their event loop: a cached stage then
    costs one API round trip, and the flow does not wait a second at its end for a heartbeat thread
    as a sync flow does (../shared/FACTS.md). The body runs where no event loop runs, but its run
    context names an async task, so Prefect functions that pick sync or async by context (the
    artifact functions) must be called with `_sync=True` there; the run logger needs nothing.
    """

    def decorate(body):
        @functools.wraps(body)  # Prefect reads the parameters through __wrapped__
        async def in_a_thread(*args, **kwargs):
            return await asyncio.to_thread(_in_worker, body, *args, **kwargs)

        return task(**options)(in_a_thread)

    return decorate


def stage(name: str, modules: tuple[str, ...]):
    """A pipeline stage as a cached Prefect task; `modules`: the source that decides its output
    (its own module first), keyed with tasks.staging, tasks.store and tasks.durable."""
    CODE_MODULES[name] = (*modules, "tasks.staging", "tasks.store", "tasks.durable")
    return threaded_task(name=name, task_run_name=name, cache_key_fn=_cache_key, result_serializer="json", persist_result=True)


# Tables up to this many rows also get a CSV (or JSON) copy for people; larger ones only the
# joblib file, since writing 10 million rows as text takes longer than the whole pipeline.
READABLE_ROWS = 100_000


def _canonical(value):
    """The same data with every string interned: pickle memoizes by object identity, so equal
    strings that are one object here and two there (parameters unpickled on a Dask worker) would
    otherwise give different bytes, and a different content hash, for the same content."""
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        return {_canonical(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_canonical(v) for v in value)
    return value


def joblib_file(value):
    import joblib

    return lambda path: joblib.dump(_canonical(value), path)


def columns_file(columns: list):
    """The columns (equally long float64 arrays) as one .npy file of shape (rows, columns) in
    Fortran order: exactly np.save's bytes for that array, written from the columns as they are,
    with no array built for it (tasks.durable.write_buffers)."""
    import io

    import numpy as np

    arrays = [np.ascontiguousarray(column, dtype=np.float64) for column in columns]
    if len({len(array) for array in arrays}) > 1 or any(array.ndim != 1 for array in arrays):
        raise ValueError(f"columns of one table must be 1-D and equally long, not of shapes {[a.shape for a in arrays]}")
    header = io.BytesIO()
    shape = (len(arrays[0]) if arrays else 0, len(arrays))
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float64)),
                                                  "fortran_order": True, "shape": shape})
    return lambda path: write_buffers(path, [header.getvalue(), *arrays])


def csv_file(frame):
    return lambda path: frame.to_csv(path, index=False)


def json_file(value):
    return lambda path: write_json(path, value)
