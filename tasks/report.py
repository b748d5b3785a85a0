"""The seed's picture and a readable summary of a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


PLOT_POINTS = 2000  # a scatter of millions of points takes minutes and shows nothing more


def plot_calibration(path: Path, table: pd.DataFrame, slope: float, intercept: float, train_loss: np.ndarray, val_loss: np.ndarray | None) -> None:
    """Readings as points with the fitted line (raw units), and the loss curves, as one PNG.

    `table` has columns reading, celsius and subset; past PLOT_POINTS rows a seeded sample is drawn.
    """
    import matplotlib

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
    xs = np.linspace(*full_range, 100)
    left.plot(xs, slope * xs + intercept, "-", label=f"°C = {slope:.4f} × reading {intercept:+.4f}")
    left.set_xlabel("Reading (instrument units)")
    left.set_ylabel("Temperature (°Celsius)")
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


def calibration_markdown(summary: dict, settings: dict, image: str, stages: dict | None = None) -> str:
    """A readable report: the calibration in raw units, the losses, the gap to least squares, the
    settings, where each stage's output lives and whether it was cached, and the plot at `image`."""
    cal, opt = summary["calibration"], summary["optimum"]
    val = "n/a (no validation split)" if summary["val_loss"] is None else f"{summary['val_loss']:.6f}"
    rows = [
        ("training loss (MSE)", f"{summary['train_loss']:.6f}"),
        ("validation loss (MSE)", val),
        ("least-squares optimum on the training rows (MSE)", f"{opt['train_loss']:.6f}"),
        ("gap to the optimum (relative)", f"{summary['gap_to_optimum']:.3e}"),
        ("converged (gap at most 0.1%)", "yes" if summary["converged"] else "**no**"),
        ("model w, b (on normalized readings)", f"{summary['model']['w']:.6f}, {summary['model']['b']:.6f}"),
        ("epochs", str(summary["epochs_run"])),
    ]
    if "train_rows" in summary:
        rows.append(("rows (training / validation)", f"{summary['train_rows']} / {summary['val_rows']}"))
    parts = [
        "# thermocal calibration",
        f"**°C = {cal['slope']:.6f} × reading {cal['intercept']:+.6f}**",
        "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows),
        "## Settings",
        "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in settings.items()),
    ]
    if stages:
        parts += [
            "## Stages",
            "| stage | cached | output |\n|---|---|---|\n"
            + "\n".join(f"| {name} | {'yes' if st['cached'] else 'no'} | `{st['path']}` |" for name, st in stages.items()),
        ]
    parts.append(f"![calibration plot]({image})")
    return "\n\n".join(parts) + "\n"


def plot_comparison(path: Path, rows: list[dict]) -> None:
    """A sweep at a glance: each training's gap to the least-squares optimum (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['strategy']} · {r['normalization']} · lr {r['lr']:g}" for r in rows]
    gaps = [max(r["gap_to_optimum"], 1e-16) if r["status"] == "ok" else float("nan") for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.5), dpi=100)
    ax.barh(range(len(rows)), gaps, color=["tab:blue" if r["status"] == "ok" else "tab:red" for r in rows])
    for i, r in enumerate(rows):
        if r["status"] != "ok":
            ax.text(1e-16, i, " failed (diverged)", va="center", color="tab:red")
    ax.set_yticks(range(len(rows)), labels)
    ax.set_xscale("log")
    ax.set_xlabel("gap to the least-squares optimum (relative training loss)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
