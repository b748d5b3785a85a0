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
    labels: tuple[str, str] = ("reading (instrument units)", "celsius (°C)"),
) -> None:
    """Readings as points with the fitted curve (raw units, dense over the calibrated range; dashed
    where the data reach beyond it), and the loss curves, as one PNG.

    `table` has columns reading, celsius and subset; past PLOT_POINTS rows a seeded sample is drawn.
    """
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full_range = table["reading"].min(), table["reading"].max()
    if len(table) > PLOT_POINTS:
        table = table.sample(PLOT_POINTS, random_state=0)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
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


def _table_markdown(rows: list[dict]) -> str:
    return "| reading | °C |\n|---|---|\n" + "\n".join(f"| {r['reading']:.6g} | {r['celsius']:.4f} |" for r in rows)


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
        parts += ["## New readings", _table_markdown(summary["predictions"])]
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
