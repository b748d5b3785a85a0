"""A one-page calibration certificate (PDF), in the shape an accredited laboratory files one:
what was calibrated against what, the calibration function with its coefficients and their
expanded uncertainties (k = 2), a correction table across the calibrated range with its 95 %
intervals, the residuals, and what identifies the result (data file hash, run id, code version).

matplotlib writes it (no other dependency). Its text is text, with a Unicode map for every glyph,
so a PDF reader can search and copy it, and the tests read it back (pypdf).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

A4 = (8.27, 11.69)  # inches
TEXT = {"family": "DejaVu Sans Mono", "size": 8.0}


def _lines(summary: dict, identity: dict) -> list[tuple[str, str]]:
    """(style, text) lines of the certificate, top to bottom; style: title, heading or plain."""
    from tasks.report import calibration_formula, coefficient_rows
    from tasks.uncertainty import expanded

    cal = summary["calibration"]
    low, high = cal["range"]
    out = [("title", "Calibration certificate"),
           ("plain", f"thermocal {identity['version']}   run {identity['run_id']}   issued {identity['issued']}"),
           ("heading", "Item and data"),
           ("plain", f"data file       {identity['data_name']}"),
           ("plain", f"sha256          {identity['data_sha256']}"),
           ("plain", f"points          {summary['train_rows']} fitted, {summary['val_rows']} held out for validation"
                     + (f", {len(summary.get('dropped_outliers') or [])} dropped as outliers" if summary.get("dropped_outliers") else "")),
           ("plain", f"calibrated range {low:g} to {high:g} (instrument units; outside it values are extrapolated)"),
           ("heading", f"Calibration function ({summary['model']['spec']})")]
    formula = calibration_formula(cal, "r")
    out.append(("plain", formula if formula else "a neural network: no closed form; see the correction table"))
    settings = summary.get("settings") or {}
    if settings:
        gap = summary.get("gap_to_optimum")
        out.append(("plain", f"fitted by gradient descent ({settings.get('strategy')}, lr {settings.get('lr'):g}, "
                             f"{summary['epochs_run']} epochs)" + ("" if gap is None else f"; gap to the least-squares optimum {max(gap, 0):.1e}")))
    method = ("a bootstrap of the network (pairs resampling)" if cal.get("uncertainty_method") == "bootstrap"
              else "least-squares formulas at the learned parameters (GUM; ISO/TS 28037, 28038)")
    out.append(("plain", f"uncertainty: {method}"))
    rows = coefficient_rows(cal)
    if rows:
        out.append(("plain", f"{'coefficient':<12} {'value':>16} {'u (k = 1)':>12} {'U (k = 2)':>12}  unit"))
        for r in rows:
            u = "-" if r["u"] is None else f"{r['u']:.4g}"
            big_u = "-" if r["U"] is None else f"{r['U']:.4g}"
            out.append(("plain", f"{r['name']:<12} {r['value']:>16.9g} {u:>12} {big_u:>12}  {r['unit']}"))
    if cal.get("residual_sd") is not None:
        how = "out-of-bag (bootstrap)" if cal.get("uncertainty_method") == "bootstrap" else f"{cal['dof']} degrees of freedom"
        out.append(("plain", f"residual standard deviation s = {cal['residual_sd']:.4g} °C, {how}"))
    if cal.get("bootstrap"):
        b = cal["bootstrap"]
        out.append(("plain", f"bootstrap: {b['used']} of {b['replicates']} replicates, {b['method']} resampling, seed {b['seed']}"))
    out += [("heading", "Correction table: °C ± U, U the half width of the 95 % interval for a new reading"),
            ("plain", f"{'reading':>12} {'°C':>12} {'± U (95 %)':>12} {'u_fit':>10}")]
    for r in summary["correction_table"]:
        big_u, u = expanded(r), r.get("u_fit")
        out.append(("plain", f"{r['reading']:>12.6g} {r['celsius']:>12.4f} {'-' if big_u is None else f'{big_u:.4f}':>12} "
                             f"{'-' if u is None else f'{u:.4f}':>10}"))
    outliers = summary.get("outliers") or []
    out.append(("heading", "Residual checks"))
    out.append(("plain", f"{len(outliers)} outlier(s) beyond the Bonferroni-corrected 5 % limit of the studentized residuals"
                + (": lines " + ", ".join(str(o["row"]) for o in outliers[:12]) + (", ..." if len(outliers) > 12 else "")
                   if outliers else "")))
    out.append(("plain", f"code version    {identity['code']}"))
    return out


def write_certificate(path: Path, summary: dict, identity: dict, residuals: pd.DataFrame | None) -> None:
    """One A4 page: the lines of `_lines` above, the residual plot below. `identity` holds
    version, run_id, issued, data_name, data_sha256 and code."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.report import plot_residuals

    fig = plt.figure(figsize=A4)
    y, step = 0.965, 0.0155
    for style, text in _lines(summary, identity):
        if style == "title":
            fig.text(0.06, y, text, fontsize=15, fontweight="bold")
            y -= 0.026
        elif style == "heading":
            y -= 0.006
            fig.text(0.06, y, text, fontsize=9.5, fontweight="bold")
            y -= step
        else:
            fig.text(0.06, y, text, **TEXT)
            y -= step
    if residuals is not None and len(residuals):
        ax = fig.add_axes((0.12, 0.05, 0.8, max(0.12, min(0.32, y - 0.11))))
        plot_residuals(ax, residuals)
    # Type 3 fonts, matplotlib's default, write in half the time of embedded TrueType and keep the text extractable
    fig.savefig(path, format=Path(path).suffix.lstrip(".") or "pdf")  # (a .png path: the same page as an image)
    plt.close(fig)
