"""`thermocal predict` and `thermocal runs`: the store's runs, read without Prefect or retraining."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def print_calibration(calibration: dict, prefix: str = "calibration: ") -> None:
    """The calibration function in raw units, or, for the network, °C at readings across its range."""
    from tasks.report import calibration_formula

    formula = calibration_formula(calibration)
    if formula is not None:
        print(f"{prefix}{formula}")
        return
    low, high = calibration["range"]
    print(f"{prefix}°C at readings across the calibrated range {low:g} to {high:g}:")
    for row in calibration["table"]:
        print(f"  {row['reading']:>12.6g} -> {row['celsius']:10.4f} °C")


def print_uncertainty(calibration: dict) -> None:
    """The coefficients' standard uncertainties and s, as a line a person reads."""
    sd, s, dof = calibration.get("standard_uncertainties"), calibration.get("residual_sd"), calibration.get("dof")
    if sd:
        names = ("intercept", "slope") if calibration.get("kind") == "linear" else tuple(f"c{i}" for i in range(len(sd)))
        print("standard uncertainties: " + ", ".join(f"u({name}) = {u:.3g}" for name, u in zip(names, sd)))
    if s is not None:
        how = "out-of-bag, bootstrap" if calibration.get("uncertainty_method") == "bootstrap" else f"{dof} degrees of freedom"
        print(f"residual standard deviation s = {s:.4g} °C ({how})")
    elif dof is not None and dof <= 0:
        print("no uncertainty: as many training rows as coefficients leave no degree of freedom for the residuals")


def print_predictions(rows: list[dict]) -> None:
    """'reading 45 -> 10.7218 °C ± 1.9912 °C (95 %)', and a warning for each extrapolated reading."""
    from tasks.uncertainty import expanded

    for row in rows:
        half = expanded(row)
        spread = f" ± {half:.4f} °C (95 %)" if half is not None else ""
        print(f"  reading {row['reading']:g} -> {row['celsius']:.4f} °C{spread}"
              + ("  [extrapolated: outside the calibrated range]" if row.get("extrapolated") else ""))


def predict(args: argparse.Namespace) -> int:
    """°C for readings from a persisted model: the latest one that may be trusted, or `--run`."""
    from tasks.calibration import Calibration
    from tasks.runs import choose_run
    from tasks.store import Store

    store = Store(args.store)
    manifest, warnings = choose_run(store, args.run_id, args.data, fleet=args.sensor is not None)
    if args.sensor is not None:
        record = sensor_calibration(store, manifest, args.sensor)
        trained = {"calibration": Calibration.from_record(record).summary()}
    else:
        trained = store.load({"stage": "train", **manifest["stages"]["train"]})
    calibration = Calibration.from_record(record if args.sensor is not None else trained["model"])
    # float64, from the persisted parameters and uncertainty, without torch (or scipy)
    rows = calibration.predictions(args.readings, engine="numpy")
    low, high = calibration.range
    outside = [f"{r:g}" for r in args.readings if not low <= r <= high]
    if outside:
        warnings.append(f"reading(s) {', '.join(outside)} outside the calibrated range {low:g} to {high:g}: extrapolated")
    for warning in warnings:
        print(f"thermocal: warning: {warning}", file=sys.stderr)
    if args.json:
        answer = {"run_id": manifest["run_id"], "model": calibration.model.spec, "data": manifest["data"]["path"],
                  **({"sensor": args.sensor} if args.sensor is not None else {}), "predictions": rows}
        print(json.dumps({**answer, **({"warning": "; ".join(warnings), "warnings": warnings} if warnings else {})}))
        return 0
    sensor = f", sensor {args.sensor}" if args.sensor is not None else ""
    print(f"run {manifest['run_id']} ({calibration.model.spec}{sensor}) of {manifest['data']['path']}")
    print_calibration(trained["calibration"])
    print_predictions(rows)
    return 0


def _calibration_cell(row: dict) -> str:
    from tasks.report import calibration_formula

    if row.get("sensors") is not None:
        return f"(fleet: {row['sensors']} sensors, median losses)"
    return calibration_formula(row["calibration"], "r") or "(network)"


def sensor_calibration(store, manifest: dict, sensor: str) -> dict:
    """One sensor's calibration record from a fleet run; StoreError naming the run when it has none."""
    from tasks.errors import StoreError
    from tasks.runs import calibrations_of

    calibrations = calibrations_of(store, manifest)
    if sensor in calibrations:
        return calibrations[sensor]
    failed = {f["sensor"]: f["reason"] for f in manifest["results"].get("sensors_failed", [])}
    if sensor in failed:
        raise StoreError(f"sensor {sensor!r} could not be calibrated in run {manifest['run_id']}: {failed[sensor]}")
    raise StoreError(f"no sensor {sensor!r} in run {manifest['run_id']} ({len(calibrations)} sensors calibrated; "
                     "`thermocal sensors` lists them)")


def runs(args: argparse.Namespace) -> int:
    """Every run: its data file, model, settings, convergence and losses."""
    from tasks.runs import list_runs
    from tasks.store import Store

    rows = list_runs(Store(args.store), args.data)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        scope = f" of {Path(args.data).resolve()}" if args.data else ""
        print(f"no runs{scope} in {Path(args.store).resolve()}")
        return 0
    print(f"{'run id':<24} {'data (sha256)':<30} {'model':<8} {'strategy':<17} {'normalize':<9} {'lr':>7} {'rows':>5} "
          f"{'epochs':>6} {'train loss':>11} {'val loss':>10} {'converged (gap)':<17} calibration")
    for row in rows:
        strategy = row["strategy"] + (f"/{row['optimizer']}" if row["optimizer"] else "")
        val = "-" if row["val_loss"] is None else f"{row['val_loss']:.6f}"
        name = Path(row["data"]).name
        data = f"{name if len(name) <= 19 else name[:18] + '…'} ({row['data_sha256'][:8]})"
        if row["converged"] is None:
            converged = "n/a" if row["usable"] else "warning"
        else:
            converged = f"{'yes' if row['converged'] else 'NO'} ({max(row['gap_to_optimum'], 0.0):.1e})"
        loss = "-" if row["train_loss"] is None else f"{row['train_loss']:.6f}"
        print(f"{row['run_id']:<24} {data:<30} {row['model']:<8} {strategy:<17} {row['normalize']:<9} {row['lr']:>7g} "
              f"{row['train_rows'] if row['train_rows'] is not None else '-':>5} {row['epochs']:>6} {loss:>11} "
              f"{val:>10} {converged:<17} {_calibration_cell(row)}")
    folders = sorted({row["data"] for row in rows})
    if len(folders) > 1:
        print("data files: " + "; ".join(folders) + "  (--data PATH shows one)")
    return 0


def sensors(args: argparse.Namespace) -> int:
    """A fleet run's per-sensor results: counts and the worst sensors, or every sensor as JSON."""
    from tasks.fleet_report import plain, worst_sensors
    from tasks.fleet_stages import TABLE_FIELDS
    from tasks.runs import choose_run
    from tasks.store import Store

    store = Store(args.store)
    manifest, warnings = choose_run(store, args.run_id, args.data, fleet=True)
    report = {"stage": "fleet-report", **manifest["stages"]["report"]}
    table = store.load(report)
    rows = [{field: plain(row[field]) for field in (*TABLE_FIELDS, "residual_sd")} for row in table.to_dict(orient="records")]
    for warning in warnings:
        print(f"thermocal: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    fleet, failed = manifest["results"]["fleet"], manifest["results"].get("sensors_failed", [])
    print(f"run {manifest['run_id']} ({rows[0]['model'] if rows else '-'}) of {manifest['data']['path']}: {fleet['sensors']} sensors, "
          f"{fleet['calibrated']} calibrated, {fleet['failed']} failed")
    print(f"table: {store.path(report['files']['sensors.csv'])}")
    print_worst(worst_sensors(rows))
    for failure in failed[:10]:
        print(f"  failed {failure['sensor']}: {failure['reason']}")
    if len(failed) > 10:
        print(f"  ... and {len(failed) - 10} more failed (--json lists every sensor)")
    return 0


def print_worst(rows: list[dict]) -> None:
    """The worst sensors by residual standard deviation, one line each."""
    if not rows:
        return
    print(f"{len(rows)} worst sensors by residual standard deviation:")
    print(f"  {'sensor':<16} {'s (°C)':>9} {'val loss':>10} {'gap':>9}  coefficients")
    for row in rows:
        val = "-" if row.get("val_loss") is None else f"{row['val_loss']:.4g}"
        gap = "-" if row.get("gap_to_optimum") is None else f"{row['gap_to_optimum']:.1e}"
        coefficients = "-" if row.get("coefficients") is None else ", ".join(f"{c:.6g}" for c in row["coefficients"])
        print(f"  {row['sensor']:<16} {row['residual_sd']:>9.4g} {val:>10} {gap:>9}  {coefficients}")


def print_stages(summary: dict) -> None:
    """Where the run's manifest is, and each stage: cached or computed, its seconds, its output."""
    print(f"run {summary['run_id']}: manifest in {summary['run_dir']}")
    for name, stage in summary["stages"].items():
        print(f"  {name:<9} {'cached  ' if stage['cached'] else 'computed'} {stage['seconds']:6.2f} s  {stage['path']}")


def print_fleet(summary: dict) -> None:
    """A fleet run as a person reads it: counts, partitions, failures, drift, the worst sensors, where things are."""
    fleet, parts = summary["fleet"], summary["fleet"]["partitions"]
    print(f"fleet of {fleet['sensors']} sensors ({summary['model']['spec']}): {fleet['calibrated']} calibrated, {fleet['failed']} failed")
    print(f"partitions: {parts['total']} ({parts['computed']} computed, {parts['cached']} cached)")
    for failure in summary["sensors_failed"][:10]:
        print(f"  failed {failure['sensor']}: {failure['reason']}")
    if len(summary["sensors_failed"]) > 10:
        print(f"  ... and {len(summary['sensors_failed']) - 10} more (sensors_failed in --json, or `thermocal sensors`)")
    if summary["drift_baseline"] is None:
        print("drift: no earlier run of this data file to compare with")
    else:
        print(f"drift since run {summary['drift_baseline']}: {len(summary['drift'])} sensor(s) moved more than the threshold")
        for d in summary["drift"][:10]:
            print(f"  {d['sensor']}: {d['max_delta_celsius']:.4g} °C at reading {d['at_reading']:.6g}")
    print_worst(summary["worst_sensors"])
    print_stages(summary)
    print(f"sensors table: {summary['sensors_table']}")
    print(f"plot: {summary['report']}")


def print_run(summary: dict) -> None:
    print(f"model: {summary['model']['spec']}")
    print_calibration(summary["calibration"])
    print_uncertainty(summary["calibration"])
    val = "n/a" if summary["val_loss"] is None else f"{summary['val_loss']:.6f}"
    if summary["optimum"] is not None:
        print(f"training loss {summary['train_loss']:.6f} (least-squares optimum {summary['optimum']['train_loss']:.6f}, "
              f"gap {max(summary['gap_to_optimum'], 0.0):.2e}), validation loss {val}")
    else:
        best = ", ".join(f"{spec} {loss:.6f}" for spec, loss in summary.get("baselines", {}).items())
        print(f"training loss {summary['train_loss']:.6f} (best polynomials on the same rows: {best}), validation loss {val}")
    stop = {"epochs": "all epochs", "tol": "the loss settled", "validation": "validation stopped improving"}[summary["stopped_by"]]
    print(f"{summary['epochs_run']} epochs ({stop}) in {summary['train_seconds'] * 1000:.1f} ms of training")
    for warning in summary["warnings"]:  # the --lr warning before training included: it said why the run went on
        print(f"warning: {warning}")
    for outlier in summary.get("dropped_outliers", []):
        print(f"dropped outlier: line {outlier['row']} (reading {outlier['reading']:g}, {outlier['celsius']:g} °C, "
              f"studentized residual {outlier['studentized']:+.2f}); the calibration above is refitted without it")
    print_predictions(summary["predictions"])
    for d in summary.get("drift", []):
        print(f"drift: the calibration moved up to {d['max_delta_celsius']:.4g} °C (at reading {d['at_reading']:.6g}) "
              f"since run {summary['drift_baseline']}")
    print_stages(summary)
    print(f"plot: {summary['report']}")
    print(f"certificate: {summary['certificate']}")


def print_sweep(result: dict) -> None:
    print(f"{'model':<8} {'strategy':<17} {'normalize':<9} {'lr':>8} {'train loss':>11} {'val loss':>10} {'gap':>9} {'epochs':>6} {'ms':>8}  calibration")
    for row in result["rows"]:
        head = f"{row['model']:<8} {row['strategy']:<17} {row['normalization']:<9} {row['lr']:>8g}"
        if row["status"] != "ok":
            print(f"{head}  failed: {row['error'].split(':')[0]}")
            continue
        val = "-" if row["val_loss"] is None else f"{row['val_loss']:.6f}"
        gap = "-" if row["gap_to_optimum"] is None else f"{row['gap_to_optimum']:.1e}"
        print(f"{head} {row['train_loss']:>11.6f} {val:>10} {gap:>9} {row['epochs']:>6} "
              f"{row['seconds'] * 1000:>8.1f}  {row['calibration']}")
    files = result["files"]
    print(f"sweep {result['sweep_id']}: {files['comparison.csv']}, {files['comparison.joblib']}, {files['comparison.png']}")
