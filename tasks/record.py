"""The last step of a run: its manifest in the store and its artifacts in Prefect."""

from __future__ import annotations

import base64
import functools
import platform
import subprocess
import uuid
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

from prefect import task
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact, create_table_artifact
from prefect.runtime import flow_run

from tasks.durable import atomic_write
from tasks.report import calibration_formula, calibration_markdown
from tasks.staging import CODE_MODULES, code_version, threaded_task
from tasks.store import Store
from tasks.uncertainty import expanded

LIBRARIES = ("torch", "prefect", "pandera", "pandas", "numpy", "joblib", "pydantic", "matplotlib")
# artifact keys: lowercase letters, digits and dashes, the same in every run so the UI tracks them
METRICS_KEY, REPORT_KEY = "thermocal-metrics", "thermocal-report"


def extrapolation_warnings(predictions: list[dict], calibrated_range) -> list[str]:
    outside = [f"{p['reading']:g}" for p in predictions if p.get("extrapolated")]
    if not outside:
        return []
    low, high = calibrated_range
    return [f"reading(s) {', '.join(outside)} outside the calibrated range {low:g} to {high:g}: extrapolated, "
            "and their uncertainty grows quickly outside the range"]


def run_identity(run_id: str, data: Path) -> dict:
    """What the certificate names: the run, thermocal's version, the date, the data file and the code."""
    code = f"{_code_revision() or 'unknown revision'}, sources sha256 {sources_sha256()[:16]}"
    return {"run_id": run_id, "version": version("thermocal"), "issued": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "data_name": Path(data).name, "code": code}


def sources_sha256() -> str:
    """sha256 over the source of every stage's modules (the stages register them as they are imported)."""
    import tasks.fleet_stages  # noqa: F401 - every stage module registered, whichever flow imported this
    import tasks.stages  # noqa: F401

    return code_version(tuple(sorted({m for mods in CODE_MODULES.values() for m in mods})))


def manifest_identity() -> dict:
    """The code and libraries a run used, as its manifest records them."""
    return {"code": {"revision": _code_revision(), "sha256": sources_sha256()},
            "libraries": {"python": platform.python_version(), **{name: version(name) for name in LIBRARIES}}}


@functools.cache
def _code_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def new_run_id(now: datetime) -> str:
    """'20261130-063405-8f6691f9': UTC time, then the flow run's id (or a random one)."""
    return f"{now:%Y%m%d-%H%M%S}-{(flow_run.id or uuid.uuid4().hex).replace('-', '')[:8]}"


def _metrics_table(summary: dict) -> list[dict]:
    cal, opt = summary["calibration"], summary["optimum"]
    rows = [{"metric": "model", "value": summary["model"]["spec"]}]
    if cal["kind"] == "linear":
        rows += [{"metric": "slope (°C per reading)", "value": cal["slope"]}, {"metric": "intercept (°C)", "value": cal["intercept"]}]
    elif cal["coefficients"] is not None:
        rows += [{"metric": f"c{i} (°C per reading^{i})", "value": c} for i, c in enumerate(cal["coefficients"])]
    sd = cal.get("standard_uncertainties") or []
    names = ("intercept", "slope") if cal["kind"] == "linear" else [f"c{i}" for i in range(len(sd))]
    rows += [{"metric": f"u({name}), standard uncertainty", "value": u} for name, u in zip(names, sd)]
    if cal.get("residual_sd") is not None:
        rows += [{"metric": "residual standard deviation s (°C)", "value": cal["residual_sd"]},
                 {"metric": "degrees of freedom of s", "value": cal["dof"]}]
    rows += [{"metric": "training loss (MSE)", "value": summary["train_loss"]},
             {"metric": "validation loss (MSE)", "value": summary["val_loss"]}]
    if opt is not None:
        rows += [{"metric": "least-squares optimum (MSE)", "value": opt["train_loss"]},
                 {"metric": "gap to optimum (relative)", "value": summary["gap_to_optimum"]},
                 {"metric": "converged", "value": summary["converged"]}]
    rows += [{"metric": f"best {spec} (MSE)", "value": loss} for spec, loss in (summary.get("baselines") or {}).items()]
    rows += [{"metric": "epochs", "value": summary["epochs_run"]}]
    rows += [{"metric": "outliers (CSV lines)", "value": ", ".join(str(o["row"]) for o in summary.get("outliers", [])) or "none"}]
    for p in summary["predictions"]:
        rows.append({"metric": f"°C at reading {p['reading']:g}", "value": p["celsius"]})
        if expanded(p) is not None:
            rows.append({"metric": f"± U (95 %) at reading {p['reading']:g}" + (" (extrapolated)" if p.get("extrapolated") else ""),
                         "value": expanded(p)})
    return rows


async def publish_run(summary: dict, settings: dict) -> None:
    """The run's metrics table and report as Prefect artifacts. Awaited in the flow's body, so
    the UI lists them on the flow run (from inside a task they would belong to that task run)."""
    await acreate_table_artifact(key=METRICS_KEY, description="Final metrics, the calibration and the new readings' °C of this run",
                                 table=_metrics_table(summary))
    png = Path(summary["report"]).read_bytes()
    image = f"data:image/png;base64,{base64.b64encode(png).decode()}"
    await acreate_markdown_artifact(key=REPORT_KEY, description="thermocal calibration report",
                                    markdown=calibration_markdown(summary, settings, image, summary["stages"]))


RESULTS = ("model", "calibration", "train_loss", "val_loss", "optimum", "gap_to_optimum", "converged", "baselines",
           "warnings", "train_rows", "val_rows", "epochs_run", "stopped_by", "train_seconds", "predictions", "outliers",
           "dropped_outliers", "certificate", "correction_table", "drift", "drift_baseline")
OUTLIER_FIELDS = ("row", "reading", "celsius", "residual", "studentized")


def _public(outlier: dict) -> dict:
    """An outlier as the run's JSON gives it (its position in the table stays internal)."""
    return {k: outlier[k] for k in OUTLIER_FIELDS}


@threaded_task(name="record-run", task_run_name="record-run")
def record_run(
    store: str, data: str, data_sha256: str, settings: dict, effective: dict, predict: list[float], stages: dict[str, dict],
    dropped: list[dict] | None = None, run_id: str | None = None,
) -> dict:
    """Write the run's manifest and return its summary."""
    s = Store(store)
    now = datetime.now(timezone.utc)
    run_id = run_id or new_run_id(now)
    train, validate, infer = (stages[n]["ref"]["summary"] for n in ("train", "validate", "infer"))
    summary = {
        "run_id": run_id,
        "run_dir": str(s.run_dir(run_id)),
        "model": train["model"],
        "calibration": train["calibration"],
        **{k: validate.get(k) for k in ("train_loss", "val_loss", "optimum", "gap_to_optimum", "converged")},
        **({"baselines": validate["baselines"]} if validate.get("baselines") is not None else {}),
        "warnings": train.get("warnings", []) + validate.get("warnings", []) + validate.get("data_warnings", []),
        "train_rows": validate["train_rows"],
        "val_rows": validate["val_rows"],
        "epochs_run": train["epochs_run"],
        "stopped_by": train["stopped_by"],
        "train_seconds": train["train_seconds"],
        "predictions": infer["new"],
        "outliers": [_public(o) for o in validate.get("outliers", [])],
        **({"dropped_outliers": [_public(o) for o in dropped]} if dropped else {}),
        "stages": {
            name: {"path": str(s.path(run["ref"]["path"])), "cached": run["cached"], "seconds": run["seconds"]}
            for name, run in stages.items()
        },
        "report": str(s.path(stages["report"]["ref"]["files"]["report.png"])),
        "certificate": str(s.path(stages["report"]["ref"]["files"]["certificate.pdf"])),
        "correction_table": stages["report"]["ref"]["summary"]["correction_table"],
    }
    summary["warnings"] += extrapolation_warnings(summary["predictions"], summary["calibration"]["range"])
    summary["drift"], summary["drift_baseline"] = single_drift(s, data, settings, run_id, stages["train"]["ref"])
    manifest = {
        "run_id": run_id,
        "created": now.isoformat(),
        "flow_run_id": flow_run.id,
        "data": {"path": data, "sha256": data_sha256},
        "parameters": {**settings, "predict": predict},
        "effective": effective,  # what the defaults of lr, epochs and tol resolved to
        **manifest_identity(),
        "stages": {
            name: {**{k: run["ref"][k] for k in ("key", "path", "sha256", "files")}, "cached": run["cached"], "seconds": run["seconds"]}
            for name, run in stages.items()
        },
        "results": {**{k: summary[k] for k in RESULTS if k in summary},
                    # what decides whether `predict` may trust the model: not the data's outliers or the readings asked
                    "model_warnings": train.get("warnings", []) + validate.get("warnings", [])},
    }
    s.write_manifest(run_id, manifest)
    return summary


def single_drift(s: Store, data: str, settings: dict, run_id: str, train: dict) -> tuple[list[dict], str | None]:
    """A single-sensor run's drift check against its baseline (tasks.fleet_record.drift_since);
    a baseline trained by the same train stage (a cached run) has not moved, and is not loaded."""
    from tasks.fleet_record import drift_since
    from tasks.runs import baseline_manifest, single_sensor_id

    baseline = settings.get("baseline")
    found = baseline_manifest(s, data, baseline, run_id)
    if found is None:
        return [], None
    if found.get("stages", {}).get("train", {}).get("sha256") == train["sha256"]:
        return [], found["run_id"]
    current = {single_sensor_id(data): s.load(train)["model"]}
    return drift_since(s, data, baseline, run_id, current, settings["drift_threshold"])


SWEEP_KEY = "thermocal-sweep"


def comparison_rows(results: list[dict]) -> list[dict]:
    """One flat row per training of a sweep, for the table, the CSV and --json."""
    rows = []
    for result in results:
        config = result["config"]
        row = {"model": config["model"],
               "strategy": config["strategy"] + (f"/{config['optimizer']}" if config["strategy"] == "optimizer" else ""),
               "lr": result.get("lr", config["lr"]), "normalization": config["normalize"]}
        if "error" in result:
            rows.append({**row, "status": "failed", "error": result["error"]})
            continue
        if "fleet_table" in result:
            rows.append({**row, **fleet_row(result)})
            continue
        train, validate = result["train"], result["validate"]
        rows.append({
            **row, "status": "ok", "train_loss": validate["train_loss"], "val_loss": validate["val_loss"],
            "gap_to_optimum": validate["gap_to_optimum"], "epochs": train["epochs_run"], "stopped_by": train["stopped_by"],
            "seconds": train["train_seconds"], "calibration": calibration_formula(train["calibration"]) or "(network: see train_path)",
            "cached": result["cached"], "train_path": result["train_path"],
        })
    return rows


def fleet_row(result: dict) -> dict:
    """A fleet's combination in a sweep: median losses and epochs over its calibrated sensors, the
    largest gap, and how many sensors calibrated."""
    table = result["fleet_table"]
    ok = table[table["status"] == "calibrated"]
    median = (lambda column: float(ok[column].median()) if len(ok) and ok[column].notna().any() else None)
    return {"status": "ok", "train_loss": median("train_loss"), "val_loss": median("val_loss"),
            "gap_to_optimum": float(ok["gap_to_optimum"].max()) if len(ok) and ok["gap_to_optimum"].notna().any() else None,
            "epochs": int(ok["epochs_run"].median()) if len(ok) else 0, "stopped_by": "per sensor", "seconds": result["seconds"],
            "calibration": f"fleet: {len(ok)} of {len(table)} sensors calibrated (median losses, largest gap)",
            "cached": result["cached"], "train_path": result["train_path"]}


@task(name="record-sweep", task_run_name="record-sweep")
def record_sweep(store: str, data: str, data_sha256: str, results: list[dict]) -> dict:
    """Persist the comparison (CSV, joblib, plot, manifest) and publish it as a table artifact."""
    import joblib
    import pandas as pd

    from tasks.report import plot_comparison
    from tasks.durable import write_json

    s = Store(store)
    now = datetime.now(timezone.utc)
    sweep_id = new_run_id(now)
    folder = s.sweep_dir(sweep_id)
    rows = comparison_rows(results)
    table = pd.DataFrame(rows)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "comparison.csv", lambda tmp: table.to_csv(tmp, index=False))
    atomic_write(folder / "comparison.joblib", lambda tmp: joblib.dump(table, tmp))
    atomic_write(folder / "comparison.png", lambda tmp: plot_comparison(tmp, rows))
    write_json(folder / "manifest.json", {"sweep_id": sweep_id, "created": now.isoformat(), "flow_run_id": flow_run.id,
                                           "data": {"path": data, "sha256": data_sha256}, "rows": rows})
    create_table_artifact(key=SWEEP_KEY, description="thermocal sweep: one row per training",
                          table=[{k: v for k, v in row.items() if k != "train_path"} for row in rows])
    return {"sweep_id": sweep_id, "sweep_dir": str(folder), "rows": rows,
            "files": {name: str(folder / name) for name in ("comparison.csv", "comparison.joblib", "comparison.png")}}
