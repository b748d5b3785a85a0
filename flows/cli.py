"""The command line: `thermocal run | sweep | serve | server | synth | predict | runs | sensors` (also `python -m flows`).

Exit codes: 0 success; 2 a user's mistake (bad data file, bad option, unknown run);
3 training diverged; 1 anything else (an internal fault).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from pathlib import Path

from flows import results
from flows.connect import prefect_session, silence_prefect_console, warm_port
from tasks.errors import UNREADABLE, InvalidInput, ThermocalError, unreadable

if typing.TYPE_CHECKING:
    from tasks.settings import CalibrationSettings

# the commands whose options are CalibrationSettings' fields: only their parsers import it (and
# pydantic, 0.1-0.2 s here), so that `predict`, `runs` and `--help` answer without it
SETTINGS_COMMANDS = ("run", "serve", "sweep")


def _add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default="data/runs", help="where runs and stage outputs live (default: %(default)s)")


def _option(name: str, field) -> tuple[str, dict]:
    """The argparse flag and keywords of one settings field: `val_fraction: float = 0.2` ->
    ('--val-fraction', type=float, default=0.2, help='… (default: 0.2)'); a Literal gives choices, a bool a switch."""
    annotation = field.annotation
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] if typing.get_origin(annotation) in (typing.Union, types.UnionType) else [annotation]
    kind = kinds[0]
    options: dict = {"default": field.default, "help": field.description}
    if kind is bool:  # a switch: --drop-outliers
        return "--" + name.replace("_", "-"), {**options, "action": "store_true"}
    if typing.get_origin(kind) is typing.Literal and not field.metadata:
        options["choices"] = typing.get_args(kind)
        if any("," in choice for choice in options["choices"]):  # argparse's {.,,} would read as nonsense
            options["metavar"] = "|".join(f"'{choice}'" for choice in options["choices"])
    elif kind in (int, float):
        options["type"] = kind
    if field.default is not None:
        options["help"] += " (default: %(default)s)"
    return "--" + name.replace("_", "-"), options


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """`--data`, `--store`, `--predict`, and one option per field of CalibrationSettings."""
    from tasks.settings import CalibrationSettings

    parser.add_argument("--data", default="data/readings.csv", help="CSV of paired readings (default: %(default)s)")
    _add_store(parser)
    for name, field in CalibrationSettings.model_fields.items():
        flag, options = _option(name, field)
        parser.add_argument(flag, **options)
    parser.add_argument("--predict", type=float, nargs="+", default=[], metavar="READING", help="new readings to convert to °C")


def _add_runner_options(parser: argparse.ArgumentParser, what: str) -> None:
    """Where tasks run: threads (default), one at a time, a local Dask cluster or an existing one."""
    runner = parser.add_mutually_exclusive_group()
    runner.add_argument("--sequential", action="store_true", help=f"{what} one at a time")
    runner.add_argument("--dask", action="store_true", help=f"run {what} on a local Dask cluster (prefect-dask)")
    runner.add_argument("--dask-address", metavar="tcp://HOST:PORT", help=f"run {what} on an existing Dask cluster")
    parser.add_argument("--workers", type=int, help="threads, or Dask workers with --dask (default: 2 Dask workers, or up to 4 threads)")


def _version() -> str:
    from importlib.metadata import version

    return f"thermocal {version('thermocal')} (prefect {version('prefect')}, torch {version('torch')})"


class _Parser(argparse.ArgumentParser):
    """argparse, whose mistakes are said like every other: `thermocal: error: …` (and JSON with --json), exit 2."""

    def error(self, message: str):
        raise InvalidInput(f"{message} (see {self.prog} --help)")


def _parser(command: str | None) -> argparse.ArgumentParser:
    """The command line's parser; the settings' options only on `command`'s parser when it takes
    them (the others' are never read, and `--help` lists commands by name)."""
    settings = command in SETTINGS_COMMANDS
    parser = _Parser(prog="thermocal", description="Learn a thermometer's calibration by gradient descent.")
    parser.add_argument("--version", action="version", version=_version(), help="print thermocal's version (and Prefect's and torch's)")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run", help="run the calibration pipeline", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Learn °C from paired readings (a CSV with a reading and a °C column) and persist every stage:\n"
                    "ingest -> normalize, split -> train -> validate, infer -> report. A repeated run recomputes nothing.",
        epilog="examples:\n"
               "  thermocal run --predict 45 60.2                       the shipped readings; convert two new ones\n"
               "  thermocal run --data logger.csv --reading-column Raw_mV --celsius-column Ref_C --model poly:2",
    )
    if settings:
        _add_run_options(run)
    run.add_argument("--json", action="store_true", help="print one JSON object")
    _add_runner_options(run, "a fleet's partitions")

    serve = commands.add_parser("serve", help="serve the pipeline as a scheduled deployment (on PREFECT_API_URL's server, or thermocal's local one)")
    when = serve.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help="cron schedule, e.g. '0 * * * *' for hourly")
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS")
    serve.add_argument("--name", default="scheduled", help="deployment name (default: %(default)s)")
    if settings:
        _add_run_options(serve)

    sweep = commands.add_parser("sweep", help="train a grid of strategies, learning rates and normalizations in one flow")
    sweep.add_argument("--strategies", default="analytic", help="comma-separated, e.g. analytic,autograd (default: %(default)s)")
    sweep.add_argument("--lrs", default="0.01", help="comma-separated learning rates, e.g. 1e-2,1e-3 (default: %(default)s)")
    sweep.add_argument("--normalizations", default="standard", help="comma-separated, e.g. scale,standard (default: %(default)s)")
    sweep.add_argument("--models", help="comma-separated model specs, e.g. linear,poly:2,poly:3,mlp:13 (default: --model)")
    _add_runner_options(sweep, "trainings")
    if settings:
        _add_run_options(sweep)
    sweep.add_argument("--json", action="store_true", help="print the comparison rows as JSON")

    server = commands.add_parser("server", help="a local Prefect server and UI on 127.0.0.1")
    server.add_argument("action", choices=("start", "status", "stop"),
                        help="start: a server on 127.0.0.1 (foreground, or --background); status: up or down (exit 0/1); "
                             "stop: thermocal's server (the one `thermocal run` starts on first need, or a --background one)")
    server.add_argument("--port", type=int, help="API and UI port (default: 4200 for start; for status and stop, thermocal's servers wherever they run)")
    server.add_argument("--background", action="store_true", help="with start: return once its API answers (or fail with its log)")
    server.add_argument("--idle", type=float, default=0.0, metavar="SECONDS",
                        help="with start --background: stop after this long unused; 0: never (default: %(default)s)")

    predict = commands.add_parser(
        "predict", help="convert readings to °C with a persisted model, without retraining", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="°C for instrument readings from a persisted calibration: the latest run whose model converged\n"
                    "(of the data file --data names; without it, of any data file, and it says which), or --run ID.",
        epilog="examples:\n  thermocal predict 45 60.2 --data data/readings.csv\n  thermocal predict 2.0 --run 20261130-063405-8f6691f9 --json",
    )
    predict.add_argument("readings", type=float, nargs="+", metavar="READING", help="instrument readings, in the units of the data's reading column")
    predict.add_argument("--run", dest="run_id", help="run id, even one whose model did not converge (default: the latest run whose model did)")
    predict.add_argument("--data", help="only runs trained on this data file")
    predict.add_argument("--sensor", metavar="ID", help="a fleet's sensor: its calibration in the latest fleet run (or --run)")
    _add_store(predict)
    predict.add_argument("--json", action="store_true", help="print one JSON object: run_id, model, data, predictions (and warning)")

    synth = commands.add_parser("synth", help="write realistic synthetic readings (a hidden calibration plus noise), of one thermometer or a fleet")
    synth.add_argument("--rows", type=int, required=True, help="rows of readings to write (with --sensors: in all)")
    synth.add_argument("--out", required=True, help="CSV file to write")
    synth.add_argument("--sensors", type=int, help="a fleet: columns sensor, reading, celsius; each sensor its own hidden calibration and noise, "
                                                   "one in 2000 broken")
    synth.add_argument("--truth", help="with --sensors: CSV file of each sensor's hidden calibration, noise and why it is broken")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    synth.add_argument("--json", action="store_true", help="print what was written as JSON")

    sensors = commands.add_parser("sensors", help="a fleet run's per-sensor results: counts, the worst sensors, failures")
    sensors.add_argument("--run", dest="run_id", help="run id (default: the latest fleet run)")
    sensors.add_argument("--data", help="only fleet runs of this data file")
    _add_store(sensors)
    sensors.add_argument("--json", action="store_true", help="print every sensor as a JSON list (the sensors table's fields)")

    runs = commands.add_parser("runs", help="list the persisted runs")
    runs.add_argument("--data", help="only runs trained on this data file")
    _add_store(runs)
    runs.add_argument("--json", action="store_true", help="print a JSON list")
    return parser


def _settings(args: argparse.Namespace) -> CalibrationSettings:
    from pydantic import ValidationError

    from tasks.settings import CalibrationSettings, describe_validation_error

    fields = {name: getattr(args, name) for name in CalibrationSettings.model_fields}
    try:
        return CalibrationSettings(**fields)
    except ValidationError as error:
        raise InvalidInput(describe_validation_error(error)) from None


def _header(path: str, sep: str = ",") -> list[str]:
    """The CSV's column names as the csv module reads its first line; [] if that fails."""
    import csv

    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return next(csv.reader(handle, delimiter=sep), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _check_data_file(path: str, settings: CalibrationSettings) -> None:
    """Refuse a data file that cannot be opened, or lacks a column asked for, before paying for
    Prefect's start-up (the ingest stage checks it all again, row by row). A header that names
    both columns passes at once; any other gets pandas' and pandera's reading and its message."""
    try:
        open(path, "rb").close()
    except UNREADABLE as error:
        raise unreadable(path, error) from None
    needed = {settings.reading_column, settings.celsius_column} | ({settings.sensor_column} - {None})
    if needed <= set(_header(path, settings.sep)):
        return
    from tasks.ingest import check_header

    check_header(Path(path), settings.reading_column, settings.celsius_column, settings.sep, settings.decimal, settings.sensor_column)


def _run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _check_data_file(args.data, settings)
    with prefect_session():
        import asyncio

        from flows.calibrate import calibrate

        flow = calibrate
        if settings.sensor_column is not None:
            flow = calibrate.with_options(task_runner=_fleet_runner(args))
        elif args.dask or args.dask_address or args.sequential or args.workers:
            flow = calibrate.with_options(task_runner=_task_runner(args, 4))
        summary = asyncio.run(flow(data=args.data, store=args.store, settings=settings, predict=args.predict))
    if args.json:
        print(json.dumps(summary, indent=2))
    elif "fleet" in summary:
        results.print_fleet(summary)
    else:
        results.print_run(summary)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from flows.serving import deployment_parameters, serve_calibration

    settings = _settings(args)
    _check_data_file(args.data, settings)
    if args.interval is not None and not args.interval > 0:
        raise InvalidInput(f"--interval must be a positive number of seconds (got {args.interval:g})")
    parameters = deployment_parameters(args.data, args.store, settings, args.predict)
    with prefect_session(serving=True):  # a schedule needs a real server: serve_calibration checks for one
        serve_calibration(args.name, parameters, settings, args.cron, args.interval)
    return 0


def _split_list(text: str, name: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise InvalidInput(f"--{name} needs at least one value")
    return items


def _task_runner(args: argparse.Namespace, trainings: int):
    from prefect.task_runners import ThreadPoolTaskRunner

    if args.workers is not None and args.workers < 1:
        raise InvalidInput(f"--workers must be at least 1 (got {args.workers})")
    if args.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=args.dask_address)
    if args.dask:
        from prefect_dask import DaskTaskRunner

        # one thread per worker process: trainings run side by side, each on its own core
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": args.workers or 2, "threads_per_worker": 1, "dashboard_address": None})
    if args.sequential:
        return ThreadPoolTaskRunner(max_workers=1)
    return ThreadPoolTaskRunner(max_workers=args.workers or min(4, trainings))


def _fleet_runner(args: argparse.Namespace):
    """A fleet's partitions side by side, one per core, each on one torch thread: two threads per
    partition would only wait for each other (tasks/batched.py). Set before torch is imported."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return _task_runner(args, os.cpu_count() or 1)


def _sweep(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from tasks.settings import describe_validation_error, sweep_grid

    settings = _settings(args)
    _check_data_file(args.data, settings)
    try:
        lrs = [float(v) for v in _split_list(args.lrs, "lrs")]
    except ValueError:
        raise InvalidInput(f"--lrs must be comma-separated numbers (got {args.lrs!r})") from None
    strategies, normalizations = _split_list(args.strategies, "strategies"), _split_list(args.normalizations, "normalizations")
    models = _split_list(args.models, "models") if args.models is not None else [settings.model]
    try:
        grid = sweep_grid(settings, strategies, lrs, normalizations, models)
    except ValidationError as error:
        raise InvalidInput(describe_validation_error(error)) from None
    models = list(dict.fromkeys(config.model for config in grid))  # canonical specs, in the order given
    with prefect_session():
        import asyncio

        from flows.sweep import sweep

        runner = _fleet_runner(args) if settings.sensor_column is not None else _task_runner(args, len(grid))
        result = asyncio.run(sweep.with_options(task_runner=runner)(
            data=args.data, store=args.store, settings=settings, strategies=strategies, lrs=lrs, normalizations=normalizations,
            models=models,
        ))
    if args.json:
        print(json.dumps(result["rows"], indent=2))
    else:
        results.print_sweep(result)
    return 0


def _server(args: argparse.Namespace) -> int:
    from flows import serving

    if args.action == "start":
        return serving.server_start(args.port or serving.DEFAULT_PORT, args.background, args.idle)
    if args.action == "status":
        return serving.server_status(args.port)
    return serving.server_stop(args.port)


def _synth(args: argparse.Namespace) -> int:
    from tasks.synth import write_fleet, write_synthetic

    if args.rows < 1:
        raise InvalidInput(f"--rows must be at least 1 (got {args.rows})")
    for flag, path in (("--out", args.out), ("--truth", args.truth)):
        if path is not None and Path(path).is_dir():
            raise InvalidInput(f"{path}: is a directory; {flag} names the CSV file to write")
    if args.sensors is None:
        if args.truth is not None:
            raise InvalidInput("--truth needs --sensors (one thermometer's hidden calibration is printed, not written)")
        return _print_synth(write_synthetic(Path(args.out), args.rows, args.seed), args.json)
    if args.truth is not None and Path(args.truth).resolve() == Path(args.out).resolve():
        raise InvalidInput(f"--truth and --out both name {args.out}; the fleet and its hidden calibrations need two files")
    return _print_synth(write_fleet(Path(args.out), args.sensors, args.rows, args.seed, Path(args.truth) if args.truth else None), args.json)


def _print_synth(written: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(written))
    elif "sensors" in written:
        broken = ", ".join(f"{b['sensor']} ({b['reason']})" for b in written["broken"]) or "none"
        truth = f"; hidden calibrations in {written['truth']}" if written["truth"] else ""
        print(f"wrote {written['rows']} readings of {written['sensors']} sensors to {written['path']} "
              f"({written['dropouts_kept_out']} dropouts kept out); broken sensors: {broken}{truth}")
    else:
        hidden = written["hidden_calibration"]
        print(f"wrote {written['rows']} readings to {written['path']} ({written['dropouts_kept_out']} sensor dropouts kept out); "
              f"hidden calibration °C = {hidden['slope']} × reading {hidden['intercept']:+}, noise {written['noise_celsius']} °C")
    return 0


def _fail(error: ThermocalError, as_json: bool) -> int:
    """Say the error once, last; with --json also as JSON on stdout, for tools. Returns its exit code."""
    silence_prefect_console()
    if as_json:
        print(json.dumps({"error": str(error), "exit_code": error.exit_code}))
    print(f"thermocal: error: {error}", file=sys.stderr)
    return error.exit_code


def main(argv: list[str] | None = None) -> int:
    """Entry point of `thermocal` and `python -m flows`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        # the command: the first word (thermocal's own options, --help and --version, take no value)
        args = _parser(next((word for word in argv if not word.startswith("-")), None)).parse_args(argv)
    except InvalidInput as error:
        return _fail(error, "--json" in argv)
    command = {"run": _run, "sweep": _sweep, "serve": _serve, "server": _server, "synth": _synth,
               "predict": results.predict, "runs": results.runs, "sensors": results.sensors}[args.command]
    try:
        if args.command == "run" and not (args.dask or args.dask_address) and (port := warm_port()) is not None:
            from flows.warm import delegate

            if (code := delegate(port, argv)) is not None:  # run in a fork of the warm process (flows.warm)
                return code
        return command(args)
    except ThermocalError as error:
        return _fail(error, getattr(args, "json", False))
    except KeyboardInterrupt:
        print("thermocal: interrupted", file=sys.stderr)
        return 130
