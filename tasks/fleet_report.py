"""What a fleet run shows people: the worst sensors, the distribution of slopes and residual SDs."""

from __future__ import annotations

import math
from pathlib import Path

WORST = 10  # sensors the terminal summary names, worst residual SD first
ARTIFACT_ROWS = 50  # rows of the UI's fleet table (the sensors table holds them all)


def finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def plain(value):
    """A table cell as JSON takes it: numpy scalars and arrays as Python numbers and lists, NaN as None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def slope_of(coefficients) -> float | None:
    """°C per reading at the calibration's linear term (c1); None without coefficients (the network)."""
    if coefficients is None or len(coefficients) < 2:
        return None
    return finite(coefficients[1])


def worst_sensors(rows: list[dict], count: int = WORST) -> list[dict]:
    """Calibrated sensors by residual standard deviation, largest first (ties by id)."""
    ranked = [r for r in rows if r.get("status") == "calibrated" and finite(r.get("residual_sd")) is not None]
    return sorted(ranked, key=lambda r: (-float(r["residual_sd"]), r["sensor"]))[:count]


def artifact_rows(rows: list[dict], count: int = ARTIFACT_ROWS) -> list[dict]:
    """The UI's fleet table: the worst sensors first, as flat rows."""
    out = []
    for r in worst_sensors(rows, count):
        out.append({"sensor": r["sensor"], "model": r["model"], "slope": slope_of(r.get("coefficients")),
                    "residual_sd": finite(r["residual_sd"]), "train_loss": finite(r["train_loss"]),
                    "val_loss": finite(r["val_loss"]), "gap_to_optimum": finite(r["gap_to_optimum"]),
                    "epochs_run": int(r["epochs_run"])})
    return out


def plot_distribution(path: Path, table, model: str) -> None:
    """Histograms of the calibrated sensors' slopes (models with coefficients) and residual SDs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calibrated = table[table["status"] == "calibrated"]
    slopes = [s for s in (slope_of(c) for c in calibrated["coefficients"]) if s is not None]
    sds = [v for v in (finite(x) for x in calibrated["residual_sd"]) if v is not None]
    panels = [("slope c1 (°C per reading)", slopes)] if slopes else []
    panels.append(("residual standard deviation (°C)", sds))
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for axis, (label, values) in zip(axes[0], panels):
        axis.hist(values, bins=min(50, max(5, int(math.sqrt(max(len(values), 1))))), color="#3b6ea5")
        axis.set_xlabel(label)
        axis.set_ylabel("sensors")
    figure.suptitle(f"{len(calibrated)} sensors calibrated ({model}) of {len(table)}")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def fleet_markdown(summary: dict, image: str) -> str:
    """The fleet run as markdown: counts, failed sensors, drift, the worst sensors and the plot."""
    fleet = summary["fleet"]
    lines = [f"# Fleet calibration ({summary['model']['spec']})", "",
             f"{fleet['sensors']} sensors: {fleet['calibrated']} calibrated, {fleet['failed']} failed; "
             f"partitions {fleet['partitions']['total']} ({fleet['partitions']['computed']} computed, "
             f"{fleet['partitions']['cached']} cached).", "", f"![distribution]({image})", ""]
    if summary["sensors_failed"]:
        lines += ["## Failed sensors", "", "| sensor | reason |", "|---|---|"]
        lines += [f"| {f['sensor']} | {f['reason']} |" for f in summary["sensors_failed"][:ARTIFACT_ROWS]]
        lines.append("")
    lines += drift_markdown(summary["drift"], summary.get("drift_baseline"))
    return "\n".join(lines) + "\n"


def drift_markdown(drift: list[dict], baseline: str | None) -> list[str]:
    if baseline is None:
        return ["No earlier run to compare calibrations with: drift is checked from the next run on.", ""]
    if not drift:
        return [f"No calibration moved beyond the drift threshold since run {baseline}.", ""]
    lines = [f"## Drift since run {baseline}", "", "| sensor | max change (°C) | at reading |", "|---|---|---|"]
    lines += [f"| {d['sensor']} | {d['max_delta_celsius']:.4g} | {d['at_reading']:.6g} |" for d in drift[:ARTIFACT_ROWS]]
    return lines + [""]
