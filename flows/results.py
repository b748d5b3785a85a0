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
    manifest, warnings = choose_run(store, args.run_id, args.data)
    trained = store.load({"stage": "train", **manifest["stages"]["train"]})
    calibration = Calibration.from_record(trained["model"])
    # float64, from the persisted parameters and uncertainty, without torch (or scipy)
    rows = calibration.predictions(args.readings, engine="numpy")
    low, high = calibration.range
    outside = [f"{r:g}" for r in args.readings if not low <= r <= high]
    if outside:
        warnings.append(f"reading(s) {', '.join(outside)} outside the calibrated range {low:g} to {high:g}: extrapolated")
    for warning in warnings:
        print(f"thermocal: warning: {warning}", file=sys.stderr)
    if args.json:
        answer = {"run_id": manifest["run_id"], "model": calibration.model.spec, "data": manifest["data"]["path"], "predictions": rows}
        print(json.dumps({**answer, **({"warning": "; ".join(warnings), "warnings": warnings} if warnings else {})}))
        return 0
    print(f"run {manifest['run_id']} ({calibration.model.spec}) of {manifest['data']['path']}")
    print_calibration(trained["calibration"])
    print_predictions(rows)
    return 0


def runs(args: argparse.Namespace) -> int:
    """Every run: its data file, model, settings, convergence and losses."""
    from tasks.report import calibration_formula
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
        print(f"{row['run_id']:<24} {data:<30} {row['model']:<8} {strategy:<17} {row['normalize']:<9} {row['lr']:>7g} "
              f"{row['train_rows'] if row['train_rows'] is not None else '-':>5} {row['epochs']:>6} {row['train_loss']:>11.6f} "
              f"{val:>10} {converged:<17} {calibration_formula(row['calibration'], 'r') or '(network)'}")
    folders = sorted({row["data"] for row in rows})
    if len(folders) > 1:
        print("data files: " + "; ".join(folders) + "  (--data PATH shows one)")
    return 0
