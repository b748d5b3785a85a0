"""The last step of a fleet run, and the drift check every run makes: its manifest, the sensors
that failed, and which calibrations moved since the baseline run."""

from __future__ import annotations

import statistics
from datetime import datetime, timezone
from pathlib import Path

from prefect.runtime import flow_run

from tasks.errors import StoreError
from tasks.fleet_report import artifact_rows, finite, plain, worst_sensors
from tasks.runs import baseline_manifest, calibrations_of
from tasks.record import manifest_identity
from tasks.staging import threaded_task
from tasks.store import Store


def drift_since(store: Store, data: str, baseline: str | None, run_id: str, current: dict[str, dict],
                threshold: float) -> tuple[list[dict], str | None]:
    """The sensors whose calibration moved more than `threshold` °C since the baseline run, and that
    run's id (None: no baseline, nothing to compare)."""
    from tasks.drift import calibration_drift

    found = baseline_manifest(store, data, baseline, run_id)
    if found is None:
        return [], None
    try:
        previous = calibrations_of(store, found)
    except StoreError:
        if baseline is not None:
            raise
        return [], None  # an earlier run whose files were removed: no baseline
    return calibration_drift(previous, current, threshold), found["run_id"]


def _median(values) -> float | None:
    """The median of the finite values; None when there is none."""
    numbers = [v for v in (finite(x) for x in values) if v is not None]
    return statistics.median(numbers) if numbers else None


@threaded_task(name="record-fleet", task_run_name="record-fleet")
def record_fleet(store: str, data: str, data_sha256: str, settings: dict, effective: dict, stages: dict[str, dict],
                 partitions: dict, failed: list[dict], run_id: str, baseline: str | None, outputs: list[dict]) -> dict:
    """Compare every sensor's calibration with the baseline run's, write the manifest, and return
    the run's summary (what `thermocal run --json` prints for a fleet). `outputs`: each partition's
    content hash and its stages' files, for the manifest."""
    s = Store(store)
    report = stages["report"]["ref"]
    table = s.load({"stage": "fleet-report", **{k: report[k] for k in ("path", "sha256")}})
    rows = [{k: plain(v) for k, v in row.items()} for row in table.to_dict(orient="records")]
    current = s.load(s.file_ref(report, "calibrations.joblib"))
    drift, compared_with = drift_since(s, data, baseline, run_id, current, settings["drift_threshold"])
    calibrated = sum(1 for r in rows if r["status"] == "calibrated")
    summary = {
        "run_id": run_id,
        "run_dir": str(s.run_dir(run_id)),
        "model": {"spec": settings["model"]},
        "fleet": {"sensors": len(rows), "calibrated": calibrated, "failed": len(rows) - calibrated, "partitions": partitions},
        "sensors_table": str(s.path(report["files"]["sensors.csv"])),
        "sensors_failed": failed,
        "drift": drift,
        "drift_baseline": compared_with,
        "worst_sensors": [{k: r[k] for k in ("sensor", "residual_sd", "coefficients", "val_loss", "gap_to_optimum")} for r in worst_sensors(rows)],
        "worst_table": artifact_rows(rows),
        "train_loss": _median(r["train_loss"] for r in rows), "val_loss": _median(r["val_loss"] for r in rows),
        "stages": {name: {"path": str(s.path(run["ref"]["path"])), "cached": run["cached"], "seconds": run["seconds"]}
                   for name, run in stages.items()},
        "report": str(s.path(report["files"]["fleet.png"])),
        "warnings": [f"{len(failed)} of {len(rows)} sensors could not be calibrated (sensors_failed says why)"] if failed else [],
    }
    now = datetime.now(timezone.utc)
    manifest = {
        "run_id": run_id, "created": now.isoformat(), "flow_run_id": flow_run.id,
        "data": {"path": data, "sha256": data_sha256},
        "parameters": {**settings, "predict": []}, "effective": effective, **manifest_identity(),
        "stages": {name: {**{k: run["ref"][k] for k in ("key", "path", "sha256", "files")}, "cached": run["cached"], "seconds": run["seconds"]}
                   for name, run in stages.items()},
        "partitions": outputs,
        "results": {**{k: summary[k] for k in ("model", "fleet", "sensors_failed", "drift", "drift_baseline", "train_loss",
                                              "val_loss", "warnings")},
                    "calibration": None, "converged": None, "model_warnings": []},
    }
    s.write_manifest(run_id, manifest)
    return summary


FLEET_KEY, DRIFT_KEY, FLEET_REPORT_KEY = "thermocal-fleet", "thermocal-drift", "thermocal-fleet-report"


async def publish_fleet(summary: dict) -> None:
    """The fleet's artifacts on the flow run: its worst sensors, its drift, and the report with the plot."""
    import base64

    from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

    from tasks.fleet_report import fleet_markdown

    rows = summary.pop("worst_table")  # for the UI; the JSON has worst_sensors
    await acreate_table_artifact(key=FLEET_KEY, table=rows or [{"sensor": "-", "note": "no sensor calibrated"}],
                                 description=f"the fleet's worst sensors first (residual SD), of {summary['fleet']['sensors']}")
    drift = summary["drift"] or [{"sensor": "-", "max_delta_celsius": 0.0, "at_reading": None}]
    await acreate_table_artifact(key=DRIFT_KEY, table=drift,
                                 description=f"calibrations that moved beyond the threshold since run {summary['drift_baseline']}")
    image = "data:image/png;base64," + base64.b64encode(Path(summary["report"]).read_bytes()).decode()
    await acreate_markdown_artifact(key=FLEET_REPORT_KEY, markdown=fleet_markdown(summary, image), description="thermocal fleet report")
