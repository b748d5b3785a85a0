"""The training loop: one loop for every strategy, losses recorded each epoch, divergence caught."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from tasks.errors import TrainingDiverged
from tasks.model import loss_fn, model
from tasks.strategies import make_stepper

INITIAL_PARAMS = (1.0, 0.0)  # the seed's w = 1, b = 0


@dataclass(frozen=True)
class TrainResult:
    """The trained [w, b] (as the model sees the normalized readings) and per-epoch losses."""

    w: float
    b: float
    train_loss: np.ndarray  # shape (epochs_run,), loss before each epoch's update, as the seed prints it
    val_loss: np.ndarray | None  # same shape, or None without a validation set
    epochs_run: int
    log_lines: list[str] = field(default_factory=list)


def _log_line(epoch: int, train: float, val: float | None) -> str:
    line = f"Epoch {epoch}, Training loss {train:.4f}"
    return line if val is None else f"{line}, Validation loss {val:.4f}"


# A loss a millionfold above its first value has left any basin gradient descent can return from:
# in float32 the parameters then grow past the resolution that finite differences need (w ± delta == w),
# so the loss can stall at a huge finite value instead of reaching inf.
BLOW_UP = 1e6


def _first_bad_epoch(losses: torch.Tensor, start: int, limit: float) -> int | None:
    bad = (~torch.isfinite(losses) | (losses > limit)).nonzero()
    return None if bad.numel() == 0 else start + int(bad[0]) + 1


def _diverged(epoch: int, loss: float, first: float, strategy: str, lr: float) -> TrainingDiverged:
    what = f"became {loss}" if not np.isfinite(loss) else f"grew to {loss:.4g}, over {BLOW_UP:g} times its first value {first:.4g}"
    return TrainingDiverged(
        f"training diverged at epoch {epoch}: the training loss {what} (strategy {strategy}, lr {lr:g}). "
        f"Use a smaller learning rate (e.g. --lr {lr / 100:g}) or normalize the readings "
        "(--normalize standard, or --normalize scale --scale 0.1). No model was saved."
    )


def train_model(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor | None,
    y_val: torch.Tensor | None,
    *,
    strategy: str,
    lr: float,
    epochs: int,
    delta: float = 0.1,
    optimizer: str = "sgd",
    log_every: int = 500,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train [w, b] from the seed's start; raise TrainingDiverged when the loss turns inf or NaN.

    `log` gets the seed's progress lines; `progress(epoch)` is called after every epoch and must
    stay cheap (it must not read a loss back).
    """
    stepper = make_stepper(strategy, torch.tensor(INITIAL_PARAMS), lr=lr, delta=delta, optimizer=optimizer)
    has_val = x_val is not None and x_val.numel() > 0
    train_hist = torch.empty(epochs)
    val_hist = torch.empty(epochs) if has_val else None
    checked = 0  # losses before this index have been checked for inf/NaN
    log_lines: list[str] = []
    for epoch in range(1, epochs + 1):
        if has_val:
            with torch.no_grad():  # validation never builds a graph
                val_hist[epoch - 1] = loss_fn(model(x_val, *stepper.params), y_val)
        train_hist[epoch - 1] = stepper.step(x_train, y_train)
        if progress is not None:
            progress(epoch)
        # reading a loss back is a host sync: do it only at the seed's print cadence and at the end
        if epoch <= 3 or epoch % log_every == 0 or epoch == epochs:
            first = float(train_hist[0])
            bad = _first_bad_epoch(train_hist[checked:epoch], checked, BLOW_UP * max(first, 1e-12))
            if bad is not None or not torch.isfinite(stepper.params).all():
                bad = bad or epoch
                raise _diverged(bad, float(train_hist[bad - 1]), first, strategy, lr)
            checked = epoch
            line = _log_line(epoch, float(train_hist[epoch - 1]), float(val_hist[epoch - 1]) if has_val else None)
            log_lines.append(line)
            if log is not None:
                log(line)
    w, b = (float(v) for v in stepper.params.detach())
    return TrainResult(
        w=w,
        b=b,
        train_loss=train_hist.numpy(),
        val_loss=val_hist.numpy() if has_val else None,
        epochs_run=epochs,
        log_lines=log_lines,
    )
