"""Validation metrics and inference, both through calc_forward with gradients off, in float64."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from tasks.calibration import Calibration
from tasks.model import least_squares, least_squares_fit
from tasks.models import make_model

# A run whose training loss is within 0.1% of the least-squares optimum of its training rows has
# converged; further from it, the run still finishes but says so (more epochs, a larger --lr, or
# normalized readings would close the gap).
CONVERGED_GAP = 1e-3
RESOLUTION_ULPS = 10  # float32 steps of the targets' size that an exact fit may still be off by
# the network has no closed-form optimum: its training loss is compared with the best
# polynomials of these degrees on the same rows instead
BASELINE_DEGREES = (1, 2, 3)


def best_polynomials(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The least-squares MSE of the best polynomial of each degree in BASELINE_DEGREES on (x, y)."""
    found = {}
    for degree in BASELINE_DEGREES:
        if len(np.unique(x)) <= degree:
            continue
        model = make_model(f"poly:{degree}").fit(x)
        _, found[model.spec] = least_squares_fit(model.design(model.features(torch.from_numpy(x))).numpy(), y)
    return found


def _optimum(cal: Calibration, raw_x: np.ndarray, y: np.ndarray) -> dict:
    """The least-squares optimum of the calibration's model family on these rows, in float64."""
    if cal.model.kind == "linear":
        slope, intercept, mse = least_squares(raw_x, y)
        return {"slope": slope, "intercept": intercept, "coefficients": [intercept, slope], "train_loss": mse}
    features = cal.model.features(torch.from_numpy(cal.normalizer.apply64(raw_x)))
    theta, mse = least_squares_fit(cal.model.design(features).numpy(), y)
    return {"coefficients": cal.model.raw_coefficients(theta, cal.normalizer), "train_loss": mse}


def evaluate_model(cal: Calibration, raw_x: np.ndarray, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray) -> dict:
    """Final train/validation MSE of the calibration and, for models linear in their parameters,
    its gap to the least-squares optimum of the training rows; for the network, the best
    polynomials' losses on the same rows. Losses and optimum come from one float64 evaluation."""
    losses = prediction_losses(cal, raw_x, y, train_idx, val_idx)
    return {**losses, **fit_quality(cal, raw_x[train_idx], y[train_idx], losses["train_loss"])}


def prediction_losses(cal: Calibration, raw_x: np.ndarray, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray) -> dict:
    """Train and validation MSE of the calibration's float64 predictions, and the rows of each."""
    squared = cal.predict(raw_x)  # a fresh array: squared in place, no second n-row float64 array
    np.square(np.subtract(squared, y, out=squared), out=squared)
    return {
        "train_loss": float(squared[train_idx].mean()),
        "val_loss": float(squared[val_idx].mean()) if len(val_idx) else None,
        "train_rows": int(len(train_idx)),
        "val_rows": int(len(val_idx)),
    }


def fit_quality(cal: Calibration, x_train: np.ndarray, y_train: np.ndarray, train_loss: float) -> dict:
    """How close `train_loss` is to the best its model family can do on the training rows (raw
    readings `x_train`, °C `y_train`): the least-squares optimum and the gap to it, or, for the
    network, the best polynomials' losses."""
    if not cal.model.linear_in_params:
        return {"optimum": None, "gap_to_optimum": None, "converged": None,
                "baselines": best_polynomials(cal.normalizer.apply64(x_train), y_train)}
    optimum = _optimum(cal, x_train, y_train)
    # relative excess of the training loss over the best any model of this family can do on these rows
    best = optimum["train_loss"]
    gap = (train_loss - best) / best if best > 0 else train_loss - best
    # readings that a model fits (almost) exactly leave an optimum near 0, where float32 parameters
    # cannot get within 0.1%: an excess below their resolution of the targets counts as converged
    resolution = (RESOLUTION_ULPS * np.finfo(np.float32).eps) ** 2 * float(np.mean(y_train ** 2))
    return {"optimum": optimum, "gap_to_optimum": gap, "converged": bool(gap <= CONVERGED_GAP or train_loss - best <= resolution)}


def warnings_for(metrics: dict, spec: str, advice: str = "") -> list[str]:
    """What the user should know about a finished training: not converged (with `advice`: what
    would converge), or a network that fits worse than a straight line."""
    if metrics.get("converged") is False:
        return [not_converged_message(metrics) + (f"; {advice}" if advice else "")]
    line = (metrics.get("baselines") or {}).get("poly:1")
    if line is not None and metrics["train_loss"] > line * (1 + CONVERGED_GAP):
        return [f"{spec} fits the training rows worse than a straight line: training loss {metrics['train_loss']:.6f}, "
                f"the best line's {line:.6f}; train longer (--epochs), change --lr, or use --model linear"]
    return []


def not_converged_message(metrics: dict) -> str:
    return (
        f"not converged: the training loss {metrics['train_loss']:.6f} is above the least-squares optimum "
        f"{metrics['optimum']['train_loss']:.6f} of the training rows by a relative gap of {metrics['gap_to_optimum']:.2e} "
        f"(at most {CONVERGED_GAP:g} counts as converged)"
    )


def predictions_table(cal: Calibration, raw_x: np.ndarray, y: np.ndarray, val_idx: np.ndarray, excluded=None) -> pd.DataFrame:
    """Every reading's fitted °C, residual (fitted - true), subset (train, validation, or excluded:
    dropped from training as an outlier), u_fit, 95 % interval for a new observation and whether it
    lies outside the calibrated range, row for row with the ingested table (which holds the readings
    themselves: not copied here). Float32 columns, filled slice by slice: on 10 million rows no
    column exists in float64 at once, and float32 is finer than any reference thermometer."""
    from tasks.uncertainty import SLICE_ROWS, prediction_columns

    n = len(raw_x)
    codes = np.zeros(n, dtype=np.int8)
    codes[val_idx] = 1
    if excluded is not None and len(excluded):
        codes[np.asarray(excluded, dtype=np.int64)] = 2
    out = {name: np.empty(n, dtype=np.float32) for name in ("fitted", "residual", "u_fit", "interval_low", "interval_high")}
    extrapolated = np.empty(n, dtype=bool)
    for start in range(0, n, SLICE_ROWS):
        part = slice(start, min(start + SLICE_ROWS, n))
        fitted = cal.predict(raw_x[part])
        columns = prediction_columns(cal, raw_x[part], fitted, cross_check=False)  # the table has no bootstrap column
        out["fitted"][part] = fitted
        out["residual"][part] = fitted - y[part]
        out["u_fit"][part], out["interval_low"][part], out["interval_high"][part] = columns["u_fit"], columns["low"], columns["high"]
        extrapolated[part] = columns["extrapolated"]
    subset = pd.Categorical.from_codes(codes, categories=["train", "validation", "excluded"])
    return pd.DataFrame({"fitted": out["fitted"], "residual": out["residual"], "subset": subset, "u_fit": out["u_fit"],
                         "interval_low": out["interval_low"], "interval_high": out["interval_high"], "extrapolated": extrapolated},
                        copy=False)  # the columns as they are: a copy would put 200 MB beside them on 10 million rows
