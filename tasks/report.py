"""The seed's picture and a readable summary of a run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd


PLOT_POINTS = 2000  # a scatter of millions of points takes minutes and shows nothing more


_SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def _signed(value: float, text: str) -> str:
    """' + text' or ' − text' (a true minus sign, spaced like the plus)."""
    return f" {'−' if value < 0 else '+'} {text}"


def calibration_formula(calibration: dict, reading: str = "reading") -> str | None:
    """'°C = 0.248945 × reading − 2.715886' for the line; ascending powers for a polynomial
    ('°C = −2.1 + 0.25 × reading + 3.1e-05 × reading²'); None for the network."""
    if calibration.get("kind", "linear") == "linear":  # runs recorded before model families carry no kind
        slope, intercept = calibration["slope"], calibration["intercept"]
        return f"°C = {slope:.6f} × {reading}{_signed(intercept, f'{abs(intercept):.6f}')}"
    coefficients = calibration["coefficients"]
    if coefficients is None:
        return None
    text = f"°C = {coefficients[0]:.7g}".replace("-", "−")
    for power, c in enumerate(coefficients[1:], start=1):
        term = f"{abs(c):.7g} × {reading}" + (str(power).translate(_SUPERSCRIPT) if power > 1 else "")
        text += _signed(c, term)
    return text


def plot_calibration(
    path: Path, table: pd.DataFrame, predict, calibrated_range, train_loss: np.ndarray, val_loss: np.ndarray | None,
    labels: tuple[str, str] = ("reading (instrument units)", "celsius (°C)"), residuals: pd.DataFrame | None = None,
) -> None:
    """Readings as points with the fitted curve (raw units, dense over the calibrated range; dashed
    where the data reach beyond it), the loss curves, and the training residuals against the
    reading (outliers marked), as one PNG.

    `table` has columns reading, celsius and subset; past PLOT_POINTS rows a seeded sample is drawn.
    `residuals`: the validate stage's table (reading, residual, studentized) and its `outliers` flag.
    """
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full_range = table["reading"].min(), table["reading"].max()
    if len(table) > PLOT_POINTS:
        table = table.sample(PLOT_POINTS, random_state=0)
    panels = 3 if residuals is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5), dpi=100)
    left, right = axes[0], axes[1]
    if residuals is not None:
        plot_residuals(axes[2], residuals, labels[0])
    for subset, marker in (("train", "o"), ("validation", "s")):
        rows = table[table["subset"] == subset]
        if len(rows):
            left.plot(rows["reading"], rows["celsius"], marker, label=f"{subset} readings")
    low, high = calibrated_range
    xs = np.linspace(low, high, 400)
    left.plot(xs, predict(xs), "-", color="tab:green", label="calibration (fitted)")
    for start, end in ((full_range[0], low), (high, full_range[1])):
        if end > start:
            beyond = np.linspace(start, end, 50)
            left.plot(beyond, predict(beyond), "--", color="tab:green", label="outside the calibrated range")
    left.set_xlabel(labels[0])
    left.set_ylabel(labels[1])
    left.set_title("Calibration")
    left.legend()
    epochs = np.arange(1, len(train_loss) + 1)
    right.plot(epochs, train_loss, label="training loss")
    if val_loss is not None:
        right.plot(epochs, val_loss, label="validation loss")
    right.set_yscale("log")
    right.set_xlabel("Epoch")
    right.set_ylabel("MSE (°C²)")
    right.set_title("Loss")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def residual_points(residuals: pd.DataFrame, readings: np.ndarray, outliers: list[int]) -> pd.DataFrame:
    """The validate stage's residual table as plotted: past PLOT_POINTS rows a seeded sample, every
    outlier kept; with each row's reading (from the ingested table) and an `outlier` flag."""
    import pandas as pd

    flagged = residuals["index"].isin(outliers)
    others = residuals[~flagged]
    if len(others) > PLOT_POINTS:
        others = others.sample(PLOT_POINTS, random_state=0)
    points = pd.concat([others, residuals[flagged]])
    return points.assign(reading=readings[points["index"].to_numpy()], outlier=points["index"].isin(outliers))


def plot_residuals(ax, residuals: pd.DataFrame, reading_label: str = "reading (instrument units)") -> None:
    """The training rows' residuals (fitted - true, °C) against the reading; outliers in red
    (`residuals`: reading, residual and outlier, as `residual_points` gives them)."""
    flagged = residuals["outlier"] if "outlier" in residuals else None
    kept = residuals if flagged is None else residuals[~flagged]
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.plot(kept["reading"], kept["residual"], "o", label="training rows")
    if flagged is not None and flagged.any():
        ax.plot(residuals["reading"][flagged], residuals["residual"][flagged], "o", color="tab:red", label="outliers")
    ax.set_xlabel(reading_label)
    ax.set_ylabel("residual, fitted − true (°C)")
    ax.set_title("Residuals")
    ax.legend()


def _table_markdown(rows: list[dict]) -> str:
    return "| reading | °C |\n|---|---|\n" + "\n".join(f"| {r['reading']:.6g} | {r['celsius']:.4f} |" for r in rows)


def _u(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def coefficient_rows(calibration: dict) -> list[dict]:
    """Each raw-unit coefficient with its standard uncertainty and expanded uncertainty (k = 2)."""
    from tasks.uncertainty import COVERAGE_FACTOR

    coefficients, sd = calibration.get("coefficients"), calibration.get("standard_uncertainties")
    if coefficients is None:
        return []
    sd = sd or [None] * len(coefficients)
    return [{"name": f"c{i}", "unit": "°C" if i == 0 else f"°C per reading{'' if i == 1 else str(i).translate(_SUPERSCRIPT)}",
             "value": c, "u": u, "U": None if u is None else COVERAGE_FACTOR * u} for i, (c, u) in enumerate(zip(coefficients, sd))]


def uncertain_table_markdown(rows: list[dict]) -> str:
    """reading | °C | U (95 %) | u_fit | extrapolated."""
    from tasks.uncertainty import expanded

    lines = [f"| {r['reading']:.6g} | {r['celsius']:.4f} | {_u(expanded(r))} | {_u(r.get('u_fit'))} | "
             f"{'**yes**' if r.get('extrapolated') else 'no'} |" for r in rows]
    return "| reading | °C | ± U (95 %) | u_fit | extrapolated |\n|---|---|---|---|---|\n" + "\n".join(lines)


def uncertainty_markdown(summary: dict) -> list[str]:
    """The certificate's tables: coefficients ± U (k = 2), s, the correction table, the outliers."""
    cal = summary["calibration"]
    parts = ["## Uncertainty"]
    rows = coefficient_rows(cal)
    if rows:
        parts.append("| coefficient | value | standard uncertainty u | expanded U (k = 2) |\n|---|---|---|---|\n" + "\n".join(
            f"| {r['name']} ({r['unit']}) | {r['value']:.7g} | {_u(r['u'])} | {_u(r['U'])} |" for r in rows))
    if cal.get("residual_sd") is not None:
        how = ("out-of-bag, from the bootstrap" if cal.get("uncertainty_method") == "bootstrap"
               else f"{cal['dof']} degrees of freedom")
        parts.append(f"Residual standard deviation s = {cal['residual_sd']:.4g} °C ({how}).")
    if cal.get("bootstrap"):
        b = cal["bootstrap"]
        parts.append(f"Bootstrap: {b['used']} of {b['replicates']} replicates ({b['method']} resampling, seed {b['seed']}).")
    if summary.get("correction_table"):
        parts += ["### Correction table (calibrated range)", uncertain_table_markdown(summary["correction_table"])]
    if summary.get("outliers"):
        parts += ["### Outliers among the training rows (kept unless --drop-outliers)",
                  "| line | reading | °C | residual | studentized |\n|---|---|---|---|---|\n" + "\n".join(
                      f"| {o['row']} | {o['reading']:g} | {o['celsius']:g} | {o['residual']:+.4g} | {o['studentized']:+.3f} |"
                      for o in summary["outliers"])]
    return parts


def calibration_markdown(summary: dict, settings: dict, image: str, stages: dict | None = None) -> str:
    """A readable report, most wanted first: the calibration in raw units, the plot at `image`, the
    new readings' °C; then the losses and the gap to least squares (or, for the network, the best
    polynomials), the settings as used, and where each stage's output lives and whether it was cached."""
    cal, opt = summary["calibration"], summary["optimum"]
    val = "n/a (no validation split)" if summary["val_loss"] is None else f"{summary['val_loss']:.6f}"
    rows = [("model", f"`{summary['model']['spec']}`"), ("training loss (MSE)", f"{summary['train_loss']:.6f}"),
            ("validation loss (MSE)", val)]
    if opt is not None:
        rows += [
            ("least-squares optimum on the training rows (MSE)", f"{opt['train_loss']:.6f}"),
            ("gap to the optimum (relative)", f"{max(summary['gap_to_optimum'], 0.0):.3e}"),
            ("converged (gap at most 0.1%)", "yes" if summary["converged"] else "**no**"),
        ]
    for spec, loss in (summary.get("baselines") or {}).items():
        rows.append((f"best {spec} on the training rows (MSE)", f"{loss:.6f}"))
    if "w" in summary["model"]:
        rows.append(("model w, b (on normalized readings)", f"{summary['model']['w']:.6f}, {summary['model']['b']:.6f}"))
    rows.append(("epochs", str(summary["epochs_run"])))
    if "train_rows" in summary:
        rows.append(("rows (training / validation)", f"{summary['train_rows']} / {summary['val_rows']}"))
    rows.append(("calibrated range (training readings)", f"{cal['range'][0]:g} to {cal['range'][1]:g}"))
    formula = calibration_formula(cal)
    parts = ["# thermocal calibration", f"**{formula}**" if formula else "**°C at readings across the calibrated range**"]
    if formula is None:
        parts.append(_table_markdown(cal["table"]))
    parts.append(f"![calibration plot]({image})")
    if summary.get("predictions"):
        parts += ["## New readings", uncertain_table_markdown(summary["predictions"])]
    parts += uncertainty_markdown(summary)
    parts += [
        "## Metrics",
        "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows),
        "## Settings (as used)",
        "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in settings.items()),
    ]
    if stages:
        parts += [
            "## Stages",
            "| stage | cached | seconds |\n|---|---|---|\n"
            + "\n".join(f"| {name} | {'yes' if st['cached'] else 'no'} | {st['seconds']:.2f} |" for name, st in stages.items()),
            "Outputs:\n\n" + "\n".join(f"- {name}: `{st['path']}`" for name, st in stages.items()),
        ]
    return "\n\n".join(parts) + "\n"


def axis_label(column: str, default_unit: str) -> str:
    """A column name with the unit it implies: 'Raw_mV' -> 'Raw_mV (mV)', 'Ref_C' -> 'Ref_C (°C)';
    a name without one gets `default_unit`."""
    head, _, unit = column.rpartition("_")
    return f"{column} ({_UNITS[unit]})" if head and unit in _UNITS else f"{column} ({default_unit})"


# unit suffixes of column names, as loggers and spreadsheets write them
_UNITS = {"C": "°C", "degC": "°C", "F": "°F", "degF": "°F", "K": "K", "mV": "mV", "V": "V", "uV": "µV", "µV": "µV",
          "mA": "mA", "uA": "µA", "ohm": "Ω", "Ohm": "Ω", "ohms": "Ω", "kohm": "kΩ", "kOhm": "kΩ", "Pa": "Pa", "kPa": "kPa"}


def plot_comparison(path: Path, rows: list[dict]) -> None:
    """A sweep at a glance: each training's training and validation loss side by side (log scale),
    so a model that only fits its training rows stands out from one that generalizes."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']} · {r['strategy']} · {r['normalization']} · lr {r['lr']:g}" for r in rows]
    ok = [r["status"] == "ok" for r in rows]
    train = [r["train_loss"] if good else float("nan") for r, good in zip(rows, ok)]
    val = [r["val_loss"] if good and r["val_loss"] is not None else float("nan") for r, good in zip(rows, ok)]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.5), dpi=100)
    at = np.arange(len(rows))
    ax.barh(at - 0.2, train, height=0.4, color="tab:blue", label="training loss")
    ax.barh(at + 0.2, val, height=0.4, color="tab:orange", label="validation loss")
    finite = [v for v in train + val if np.isfinite(v) and v > 0]
    for i, good in enumerate(ok):
        if not good:
            ax.text(min(finite, default=1.0), i, " failed (diverged)", va="center", color="tab:red")
    ax.set_yticks(at, labels)
    ax.set_xscale("log")
    ax.set_xlabel("MSE (°C²)")
    ax.invert_yaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
