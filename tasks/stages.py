"""The seven pipeline stages as thin Prefect tasks around the plain logic.

Each stage gets the store, its cache key (computed by the flow from its inputs, code and
settings, see tasks.staging.stage_key) and its inputs; it loads upstream outputs from the store by their
refs, calls plain functions, writes its own output folder and returns its ref (small JSON).
Prefect caches that ref under the key, so a repeated stage is reported `Cached`.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger

from tasks.progress import TrainingProgress
from tasks.staging import READABLE_ROWS, columns_file, csv_file, joblib_file, json_file, stage
from tasks.store import Store, spare_the_collector

NAMED_OUTLIERS = 20  # a warning names this many outliers (the first by line) and counts the rest

# numpy, joblib, torch, pandas, pandera and matplotlib are imported inside the stages that use
# them: a run whose every stage is cached runs no stage body, so it never pays for them
# (tests/test_fast_commands.py)


@stage("ingest", ("tasks.stages", "tasks.ingest", "tasks.errors"))
def ingest_readings(store: str, key: str, data_sha256: str, reading_column: str, celsius_column: str, min_rows: int, data: str,
                    sep: str = ",", decimal: str = ".") -> dict:
    """Read the CSV (fields separated by `sep`, numbers with the `decimal` mark) and validate it against the readings schema."""
    from tasks.ingest import CELSIUS, READING, parsed_floats, read_readings, validate_readings

    path = Path(data)
    frame, found = read_readings(path, reading_column, celsius_column, sep, decimal)
    columns = parsed_floats(frame, reading_column, celsius_column)

    def validated():
        return validate_readings(frame, found, path, reading_column, celsius_column, min_rows, sep, decimal)

    with Store(store).stage_folder("ingest", key) as folder:
        if columns is not None:  # written while the schemas are checked; installed only if they hold
            table = folder.write("ingest.npy", columns_file(columns), beside_it=validated)
        else:
            table = validated()
            folder.write("ingest.npy", columns_file([table[READING].to_numpy(), table[CELSIUS].to_numpy()]))
        get_run_logger().info("ingested %d valid readings from %s", len(table), data)
        if len(table) <= READABLE_ROWS:
            folder.write("readings.csv", csv_file(table))
        return folder.install({"rows": len(table), "data_sha256": data_sha256})


def _table(store: Store, ingest: dict):
    """The ingested table (ingest.npy: one float64 column each for reading and °C) as a DataFrame
    over the loaded array, without a copy."""
    import pandas as pd

    from tasks.ingest import CELSIUS, READING

    return pd.DataFrame(store.load(ingest), columns=[READING, CELSIUS], copy=False)


@stage("normalize", ("tasks.stages", "tasks.normalize", "tasks.errors"))
def normalize_readings(store: str, key: str, ingest: dict, method: str, scale: float | None) -> dict:
    """Fit the normalization on the readings and apply it."""
    from tasks.ingest import READING
    from tasks.normalize import fit_normalizer

    s = Store(store)
    readings = _table(s, ingest)[READING].to_numpy()
    normalizer = fit_normalizer(readings, method, scale if scale is not None else 0.1)
    output = {"normalizer": normalizer.to_dict(), "x": normalizer.apply(readings)}
    files = {"normalize.joblib": joblib_file(output), "normalize.json": json_file(normalizer.to_dict())}
    return s.write_stage("normalize", key, files, normalizer.to_dict())


@stage("split", ("tasks.stages", "tasks.split",))
def split_readings(store: str, key: str, ingest: dict, val_fraction: float, seed: int) -> dict:
    """Seeded train/validation indices."""
    import numpy as np

    from tasks.split import split_indices

    rows = ingest["summary"]["rows"]
    train_idx, val_idx = split_indices(rows, val_fraction, seed)
    index = np.int32 if rows < 2**31 else np.int64  # half the size of torch's int64 indices
    output = {"train": train_idx.astype(index), "validation": val_idx.astype(index), "val_fraction": val_fraction, "seed": seed}
    files = {"split.joblib": joblib_file(output)}
    if rows <= READABLE_ROWS:
        files["split.json"] = json_file({**output, "train": train_idx.tolist(), "validation": val_idx.tolist()})
    return Store(store).write_stage("split", key, files, {"train_rows": len(train_idx), "val_rows": len(val_idx)})


def _rows(store: Store, ingest: dict, split: dict, table=None):
    """The ingested readings and °C (float64) and the split's indices, each verified against its
    hash (`table`: the ingested table, when the caller has loaded it already)."""
    from tasks.ingest import CELSIUS, READING

    table, idx = _table(store, ingest) if table is None else table, store.load(split)
    return table[READING].to_numpy(), table[CELSIUS].to_numpy(), idx["train"], idx["validation"]


def model_summary(calibration) -> dict:
    """The trained model as JSON: its spec and named parameters (nested lists, on normalized
    readings); the line keeps the seed's w and b beside them."""
    parameters = {name: array.tolist() for name, array in calibration.model.unpack(calibration.theta).items()}
    out = {"spec": calibration.model.spec, "parameters": parameters}
    return {**parameters, **out} if calibration.model.kind == "linear" else out


@stage("train", ("tasks.stages", "tasks.train", "tasks.strategies", "tasks.objectives", "tasks.model", "tasks.models", "tasks.calibration",
                  "tasks.normalize", "tasks.errors", "tasks.stability", "tasks.uncertainty", "tasks.batched", "tasks.batched_steps",
                  "tasks.progress"))
def train_calibration(
    store: str, key: str, ingest: dict, normalize: dict, split: dict, model: str,
    strategy: str, optimizer: str | None, lr: float, epochs: int, delta: float | None,
    tol: float, patience: int, val_patience: int, batch_size: int | None, seed: int, log_every: int,
    bootstrap: int = 0, exclude: list[int] | None = None,
) -> dict:
    """Gradient descent on the training rows, validation loss every epoch; then the calibration's
    uncertainty (tasks.uncertainty): the least-squares formulas and/or `bootstrap` replicates
    trained at once. `exclude`: rows (positions in the table) left out of training (--drop-outliers)."""
    import numpy as np
    import pandas as pd
    import torch

    from tasks.calibration import Calibration
    from tasks.errors import TrainingDiverged
    from tasks.ingest import READING
    from tasks.models import make_model
    from tasks.normalize import Normalizer
    from tasks.stability import PLAIN_STEPS, advice, lr_warning
    from tasks.train import Stopping, train_model
    from tasks.uncertainty import analytic_uncertainty, bootstrap_uncertainty

    s = Store(store)
    raw, celsius, train_idx, val_idx = _rows(s, ingest, split)
    if exclude:
        train_idx = train_idx[~np.isin(train_idx, np.asarray(exclude, dtype=train_idx.dtype))]
    normalizer = Normalizer(**s.load(normalize)["normalizer"])
    # the rows each part needs, then the table goes: on 10 million rows it is 160 MB
    raw_train, raw_val, y64 = raw[train_idx], raw[val_idx], celsius[train_idx]
    y_train, y_val = (torch.from_numpy(celsius[i].astype(np.float32)) for i in (train_idx, val_idx))
    del raw, celsius
    calibrated_range = (float(raw_train.min()), float(raw_train.max()))
    x_train = normalizer.apply64(raw_train)  # kept in float64 with y64 for the uncertainty
    del raw_train
    fitted = make_model(model).fit(x_train)  # constants from the training rows only (the polynomial basis)
    # the model reads float32, as the seed's tensors; its features are computed once, in float64
    f_train = fitted.features(torch.from_numpy(x_train)).float()
    f_val = fitted.features(torch.from_numpy(normalizer.apply64(raw_val))).float()
    del raw_val
    warnings = [w for w in [lr_warning(fitted, f_train, lr)] if w and strategy in PLAIN_STEPS]
    for warning in warnings:  # before training: the run still goes, and diverging is a lesson of its own
        get_run_logger().warning(warning)
    progress = TrainingProgress(epochs, log=get_run_logger().info)
    started = time.perf_counter()
    try:
        with spare_the_collector():
            result = train_model(
                f_train, y_train, f_val, y_val, model=fitted,
                strategy=strategy, lr=lr, epochs=epochs, delta=delta or 0.1, optimizer=optimizer or "sgd",
                stopping=Stopping(tol=tol, patience=patience, val_patience=val_patience), batch_size=batch_size, seed=seed,
                log_every=log_every, log=progress.log, progress=progress,
            )
        seconds = time.perf_counter() - started
    except TrainingDiverged as error:
        progress.close()  # its lines before the error
        readings = _table(s, ingest)[READING].to_numpy()
        hint = advice(model, readings[train_idx], y_train.double().numpy(), normalizer, seed, epochs, all_raw=readings)
        raise TrainingDiverged(f"{error} {hint} No model was saved.") from None
    finally:
        progress.close()
    progress.finish()
    del f_val, y_val
    uncertainty = analytic_uncertainty(fitted, result.params, x_train, y64) if fitted.linear_in_params else None
    if bootstrap:
        started_bootstrap = time.perf_counter()
        options = {"strategy": strategy, "lr": lr, "epochs": epochs, "delta": delta or 0.1, "optimizer": optimizer or "sgd",
                   "stopping": Stopping(tol=tol, patience=patience)}
        uncertainty = bootstrap_uncertainty(fitted, result.params, x_train, y64, bootstrap, seed, uncertainty, options)
        get_run_logger().info("%d bootstrap replicates trained at once in %.2f s (%s bootstrap)", bootstrap,
                              time.perf_counter() - started_bootstrap, uncertainty["bootstrap"]["method"])
        if uncertainty["bootstrap"]["used"] < bootstrap:
            warnings.append(f"{bootstrap - uncertainty['bootstrap']['used']} of {bootstrap} bootstrap replicates diverged "
                            "and were left out of the uncertainty")
    calibration = Calibration(fitted, result.params, normalizer, calibrated_range, uncertainty)
    settings = {"model": model, "strategy": strategy, "optimizer": optimizer, "lr": lr, "epochs": epochs, "delta": delta,
                "tol": tol, "patience": patience, "val_patience": val_patience, "batch_size": batch_size, "seed": seed,
                "bootstrap": bootstrap, "exclude": list(exclude or [])}
    output = {
        "model": calibration.to_record(),
        "calibration": calibration.summary(),
        "settings": settings,
        "history": {"train_loss": result.train_loss, "val_loss": result.val_loss},
        "epochs_run": result.epochs_run,
        "stopped_by": result.stopped_by,
        "excluded": list(exclude or []),
    }  # data only: no timings, so the same inputs give byte-identical files
    history = pd.DataFrame({"epoch": np.arange(1, result.epochs_run + 1), "train_loss": result.train_loss})
    if result.val_loss is not None:
        history["val_loss"] = result.val_loss
    files = {"train.joblib": joblib_file(output), "loss_history.csv": csv_file(history)}
    summary = {"model": model_summary(calibration), "calibration": output["calibration"], "epochs_run": result.epochs_run,
               "stopped_by": result.stopped_by, "train_seconds": seconds, "warnings": warnings}
    return s.write_stage("train", key, files, summary)


@stage("validate", ("tasks.stages", "tasks.evaluate", "tasks.calibration", "tasks.model", "tasks.models", "tasks.normalize", "tasks.stability",
                     "tasks.uncertainty", "tasks.ingest"))
def validate_calibration(store: str, key: str, ingest: dict, split: dict, train: dict, data: str | None = None) -> dict:
    """Final losses with gradients off, the gap to the least-squares optimum (or, for the network,
    the best polynomials' losses), and the residual checks: every training row's residual and
    externally studentized residual, the outliers among them named by their line in `data`."""
    import numpy as np
    import pandas as pd

    from tasks.calibration import Calibration
    from tasks.evaluate import fit_quality, prediction_losses, warnings_for  # the two halves of evaluate_model
    from tasks.ingest import lines_of_rows
    from tasks.stability import slow_advice
    from tasks.uncertainty import residual_checks

    s = Store(store)
    raw, celsius, train_idx, val_idx = _rows(s, ingest, split)
    trained = s.load(train)
    excluded = np.asarray(trained.get("excluded", []), dtype=np.int64)
    if len(excluded):
        train_idx = train_idx[~np.isin(train_idx, excluded)]
    calibration = Calibration.from_record(trained["model"])
    losses = prediction_losses(calibration, raw, celsius, train_idx, val_idx)
    x_train, y_train = raw[train_idx], celsius[train_idx]
    del raw, celsius  # the whole table: least squares needs only the training rows
    metrics = {**losses, **fit_quality(calibration, x_train, y_train, losses["train_loss"])}
    hint = "" if metrics["converged"] is not False else slow_advice(
        calibration.model.spec, x_train, y_train, calibration.normalizer, trained["settings"]["lr"])
    metrics["warnings"] = warnings_for(metrics, calibration.model.spec, hint)
    checks = residual_checks(calibration, x_train, y_train)
    readable = len(train_idx) <= READABLE_ROWS  # a residual table for people too: every row's line
    lines = lines_of_rows(data, train_idx if readable else train_idx[checks["outliers"]]) if data else {}
    metrics["outliers"] = sorted(({
        "row": lines.get(int(train_idx[i]), int(train_idx[i]) + 2), "reading": float(x_train[i]), "celsius": float(y_train[i]),
        "residual": float(checks["residual"][i]), "studentized": float(checks["studentized"][i]), "index": int(train_idx[i]),
    } for i in checks["outliers"]), key=lambda o: o["row"])
    metrics["outlier_limit"] = checks["limit"]
    metrics["data_warnings"] = []
    if metrics["outliers"]:
        shown = metrics["outliers"][:NAMED_OUTLIERS]
        named = ", ".join(f"line {o['row']} (reading {o['reading']:g}, {o['celsius']:g} °C: residual {o['residual']:+.3g} °C, "
                          f"studentized {o['studentized']:+.2f})" for o in shown)
        if len(metrics["outliers"]) > len(shown):
            named += f" and {len(metrics['outliers']) - len(shown)} more (all in metrics.json)"
        metrics["data_warnings"].append(
            f"{len(metrics['outliers'])} outlier(s) among the training rows, beyond the Bonferroni-corrected 5 % limit "
            f"|t| > {checks['limit']:.2f}: {named}; they were kept (--drop-outliers refits without them)")
    for warning in metrics["warnings"] + metrics["data_warnings"]:
        get_run_logger().warning(warning)
    # per training row, in the split's order: its position in the ingested table (which holds its
    # reading and °C), residual and studentized residual; 9 bytes a row on 10 million rows
    residuals = pd.DataFrame({"index": train_idx, "residual": checks["residual"].astype(np.float32),
                              "studentized": checks["studentized"]})
    files = {"validate.joblib": joblib_file({**metrics, "residuals": residuals}), "metrics.json": json_file(metrics)}
    if readable:  # for people: in file order, with the line, reading and °C
        table = residuals.assign(row=[lines.get(int(i), int(i) + 2) for i in train_idx], reading=x_train, celsius=y_train)
        files["residuals.csv"] = csv_file(table.sort_values("row")[["row", "reading", "celsius", "residual", "studentized"]])
    return s.write_stage("validate", key, files, metrics)


@stage("infer", ("tasks.stages", "tasks.evaluate", "tasks.calibration", "tasks.model", "tasks.models", "tasks.normalize", "tasks.uncertainty"))
def infer_celsius(store: str, key: str, ingest: dict, split: dict, train: dict, readings: list[float]) -> dict:
    """°C for every reading of the dataset and for the new readings asked, each with its
    uncertainty: u_fit, the 95 % interval for a new observation, and whether it is extrapolated."""
    import pandas as pd

    from tasks.calibration import Calibration
    from tasks.evaluate import predictions_table

    s = Store(store)
    table, trained = _table(s, ingest), s.load(train)
    raw, celsius, _, val_idx = _rows(s, ingest, split, table)
    calibration = Calibration.from_record(trained["model"])
    dataset = predictions_table(calibration, raw, celsius, val_idx, trained.get("excluded"))
    records = calibration.predictions(readings)
    new = pd.DataFrame([{**{k: v for k, v in r.items() if k != "interval"},
                         "interval_low": r["interval"][0] if r["interval"] else None,
                         "interval_high": r["interval"][1] if r["interval"] else None} for r in records],
                       columns=["reading", "celsius", "u_fit", "interval_low", "interval_high", "extrapolated"])
    files = {"infer.joblib": joblib_file({"dataset": dataset, "new": new, "records": records}), "new_predictions.csv": csv_file(new)}
    if len(dataset) <= READABLE_ROWS:
        files["predictions.csv"] = csv_file(pd.concat([table, dataset], axis=1))
    return s.write_stage("infer", key, files, {"new": records})


@stage("report", ("tasks.stages", "tasks.report", "tasks.certificate", "tasks.calibration", "tasks.models", "tasks.uncertainty"))
def report_run(store: str, key: str, ingest: dict, train: dict, validate: dict, infer: dict, settings: dict,
               identity: dict | None = None) -> dict:
    """The seed's plot with the residuals, a markdown summary with the uncertainty tables, and the
    one-page certificate. `identity`: the run that computes it (run id, code version, data file),
    which the certificate names; a later run that finds this stage cached reuses that certificate."""
    import numpy as np

    from tasks.calibration import Calibration
    from tasks.certificate import write_certificate
    from tasks.report import axis_label, calibration_markdown, plot_calibration, residual_points
    from tasks.uncertainty import TABLE_POINTS

    s = Store(store)
    trained, metrics, predictions = s.load(train), s.load(validate), s.load(infer)
    calibration = Calibration.from_record(trained["model"])
    # of the dataset's predictions only each row's subset is drawn: the other columns (about 200 MB
    # on 10 million rows) go before the ingested table comes in, which takes the subset as one more
    # column (pd.concat would copy the table)
    subset = predictions["dataset"]["subset"]
    new_predictions = predictions.get("records", predictions["new"].to_dict(orient="records"))
    del predictions
    points = _table(s, ingest)
    points["subset"] = subset.array  # the categorical as it is, row for row
    summary = {
        "model": model_summary(calibration),
        "calibration": trained["calibration"],
        **{k: metrics[k] for k in ("train_loss", "val_loss", "optimum", "gap_to_optimum", "converged", "train_rows", "val_rows")},
        "baselines": metrics.get("baselines"),
        "epochs_run": trained["epochs_run"],
        "predictions": new_predictions,
        "outliers": metrics.get("outliers", []),
        "correction_table": calibration.predictions(np.linspace(*calibration.range, TABLE_POINTS)),
        "settings": settings,
    }
    residuals = metrics.get("residuals")
    if residuals is not None:
        residuals = residual_points(residuals, points["reading"].to_numpy(), [o["index"] for o in summary["outliers"]])
    history = trained["history"]
    summary["axes"] = labels = [axis_label(settings["reading_column"], "instrument units"), axis_label(settings["celsius_column"], "°C")]
    identity = {"run_id": "-", "version": "-", "issued": "-", "data_name": "-", "code": "-",
                **(identity or {}), "data_sha256": ingest["summary"]["data_sha256"]}
    files = {
        "report.joblib": joblib_file(summary),
        "report.png": lambda path: plot_calibration(path, points, calibration.predict, calibration.range,
                                                    history["train_loss"], history["val_loss"], labels, residuals),
        "report.md": lambda path: path.write_text(calibration_markdown(summary, settings, "report.png")),
        "certificate.pdf": lambda path: write_certificate(path, summary, identity, residuals),
    }
    return s.write_stage("report", key, files, {"correction_table": summary["correction_table"], "identity": identity})
