"""The loss, the seed's calc_forward for validation and inference, and least squares in float64."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, mean((pred - target)^2), as one fused operation (and one in backward)."""
    return F.mse_loss(pred, target)


def calc_forward(
    model, theta: torch.Tensor, features: torch.Tensor, target: torch.Tensor | None, is_train: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Predictions and loss of `model` at `theta`, building a graph only when `is_train` (the seed's calc_forward)."""
    with torch.set_grad_enabled(is_train):
        pred = model.forward(theta, features)
        loss = None if target is None else loss_fn(pred, target)
    return pred, loss


def least_squares(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Closed-form optimum of the line's MSE in float64: (slope, intercept, mse)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x_mean, y_mean = x.mean(), y.mean()
    dx = x - x_mean
    slope = float((dx * (y - y_mean)).sum() / (dx * dx).sum())
    intercept = float(y_mean - slope * x_mean)
    mse = float(np.mean((slope * x + intercept - y) ** 2))
    return slope, intercept, mse


def least_squares_fit(design: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """The parameters minimizing mean((design @ theta - y)^2), in float64, and that minimum."""
    design, y = np.asarray(design, dtype=np.float64), np.asarray(y, dtype=np.float64)
    theta, *_ = np.linalg.lstsq(design, y, rcond=None)
    return theta, float(np.mean((design @ theta - y) ** 2))
