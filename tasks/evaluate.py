"""Validation metrics and inference, both through calc_forward with gradients off."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from tasks.model import calc_forward, least_squares
from tasks.normalize import Normalizer


# A run whose training loss is within 0.1% of the least-squares optimum of its training rows has
# converged; further from it, the run still finishes but says so (more epochs, a larger --lr, or
# normalized readings would close the gap).
CONVERGED_GAP = 1e-3


def _params(w: float, b: float) -> torch.Tensor:
    return torch.tensor([w, b], dtype=torch.float32)


def _loss(params: torch.Tensor, x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) == 0:
        return None
    _, loss = calc_forward(params, torch.from_numpy(x), torch.from_numpy(y), is_train=False)
    return float(loss)


def predict_line64(w: float, b: float, normalizer: Normalizer, raw_x: np.ndarray) -> np.ndarray:
    """The learned line in raw units, evaluated in float64."""
    slope, intercept = normalizer.raw_calibration(w, b)
    return slope * np.asarray(raw_x, dtype=np.float64) + intercept


def evaluate_model(
    w: float, b: float, normalizer: Normalizer, x_n: np.ndarray, raw_x: np.ndarray, y: np.ndarray,
    train_idx: np.ndarray, val_idx: np.ndarray,
) -> dict:
    """Final train/validation MSE of the model, and its gap to the least-squares optimum of the training rows."""
    params = _params(w, b)
    y32 = y.astype(np.float32)
    train_loss = _loss(params, x_n[train_idx], y32[train_idx])
    val_loss = _loss(params, x_n[val_idx], y32[val_idx])
    slope, intercept, optimum = least_squares(raw_x[train_idx], y[train_idx])
    # the gap is measured in float64 on the learned line, so float32 rounding cannot make it negative
    line = predict_line64(w, b, normalizer, raw_x[train_idx])
    achieved = float(np.mean((line - y[train_idx]) ** 2))
    return {
        "train_loss": train_loss,
        "val_loss": val_loss,
        "train_rows": int(len(train_idx)),
        "val_rows": int(len(val_idx)),
        "optimum": {"slope": slope, "intercept": intercept, "train_loss": optimum},
        # relative excess of the training loss over the best any line can do on these rows
        "gap_to_optimum": (gap := (achieved - optimum) / optimum if optimum > 0 else achieved - optimum),
        "converged": bool(gap <= CONVERGED_GAP),
    }


def not_converged_message(metrics: dict) -> str:
    return (
        f"not converged: the training loss {metrics['train_loss']:.6f} is {100 * metrics['gap_to_optimum']:.3g}% above "
        f"the least-squares optimum {metrics['optimum']['train_loss']:.6f} of the training rows; "
        "train longer (--epochs), raise --lr, or normalize the readings (--normalize standard)"
    )


def predict_celsius(w: float, b: float, normalizer: Normalizer, readings) -> np.ndarray:
    """°C for raw readings: the persisted normalization, then the model, with no graph built."""
    x_n = torch.from_numpy(normalizer.apply(np.asarray(readings, dtype=np.float64).reshape(-1)))
    pred, _ = calc_forward(_params(w, b), x_n, None, is_train=False)
    return pred.numpy().astype(np.float64)


def predictions_table(
    w: float, b: float, normalizer: Normalizer, raw_x: np.ndarray, y: np.ndarray, val_idx: np.ndarray
) -> pd.DataFrame:
    """Every reading's fitted °C, residual (fitted - true) and subset (train or validation), row for
    row with the ingested table (which holds the readings themselves: not copied here)."""
    fitted = predict_celsius(w, b, normalizer, raw_x).astype(np.float32)  # the model computes in float32
    codes = np.zeros(len(raw_x), dtype=np.int8)
    codes[val_idx] = 1
    subset = pd.Categorical.from_codes(codes, categories=["train", "validation"])
    return pd.DataFrame({"fitted": fitted, "residual": fitted - y.astype(np.float32), "subset": subset})
