"""The seed's linear model, its MSE loss, the forward pass of validation and inference, least squares."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def model(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """°C predicted from (normalized) readings: w * x + b."""
    return w * x + b


def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, mean((pred - target)^2), as one fused operation (and one in backward)."""
    return F.mse_loss(pred, target)


def calc_forward(
    params: torch.Tensor, x: torch.Tensor, target: torch.Tensor | None, is_train: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Predictions and loss, building a graph only when `is_train` (the seed's calc_forward)."""
    with torch.set_grad_enabled(is_train):
        pred = model(x, *params)
        loss = None if target is None else loss_fn(pred, target)
    return pred, loss


def least_squares(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Closed-form optimum of the MSE in float64: (slope, intercept, mse)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x_mean, y_mean = x.mean(), y.mean()
    dx = x - x_mean
    slope = float((dx * (y - y_mean)).sum() / (dx * dx).sum())
    intercept = float(y_mean - slope * x_mean)
    mse = float(np.mean((slope * x + intercept - y) ** 2))
    return slope, intercept, mse
