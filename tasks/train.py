"""The training loop: one loop for every strategy, losses recorded each epoch, divergence caught."""

from __future__ import annotations

import contextvars
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from tasks.errors import TrainingDiverged
from tasks.models import Linear, Model
import tasks.objectives  # noqa: F401 - loaded here with torch: Model.objective imports it lazily, on first use, inside the timed loop
from tasks.strategies import make_stepper


@dataclass(frozen=True)
class TrainResult:
    """The trained parameters (packed, as the model sees the normalized readings) and per-epoch losses."""

    params: np.ndarray  # float32, shape (P,): the model's parameters packed (tasks.models)
    train_loss: np.ndarray  # shape (epochs_run,), loss before each epoch's update, as the seed prints it
    val_loss: np.ndarray | None  # same shape, or None without a validation set
    epochs_run: int
    stopped_by: str = "epochs"  # "epochs", "tol" (training loss stopped improving) or "validation"
    best_epoch: int = 0  # the epoch whose parameters were kept
    log_lines: list[str] = field(default_factory=list)

    @property
    def w(self) -> float:
        """The line's slope on normalized readings (linear model)."""
        return float(self.params[0])

    @property
    def b(self) -> float:
        return float(self.params[1])


class Reporter:
    """Calls made to report training (log lines, progress updates) run in order on a thread of
    their own, in the context of the thread that made the Reporter (its contextvars: an
    orchestrator's run context), so the loop hands them over and never waits on them. `close`
    waits for every call handed over and re-raises the first error one raised.

    The thread starts on the calls only `delay` seconds after the Reporter was made (or at close,
    if sooner). Rendering a log line holds the GIL for milliseconds, and a loop that wants the GIL
    back waits up to the interpreter's switch interval (5 ms): a training of a few dozen epochs,
    about a millisecond of work, took five times that while its first lines were rendered beside
    it. Now such a training finishes first and its lines follow at once; a long one shows them
    `delay` late.
    """

    def __init__(self, delay: float = 0.0):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._delay, self._go = delay, threading.Event()
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._work,),
                                        name="training-reporter", daemon=True)
        self._thread.start()

    def call(self, fn: Callable, *args) -> None:
        self._calls.put((fn, args))

    def _work(self) -> None:
        self._go.wait(self._delay)
        while (item := self._calls.get()) is not None:
            fn, args = item
            if self._error is None:  # after an error, the rest are dropped
                try:
                    fn(*args)
                except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread by close()
                    self._error = error

    def close(self) -> None:
        self._go.set()
        if self._thread.is_alive():
            self._calls.put(None)
            self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _log_line(epoch: int, train: float, val: float | None) -> str:
    line = f"Epoch {epoch}, Training loss {train:.4f}"
    return line if val is None else f"{line}, Validation loss {val:.4f}"


# A loss a millionfold above its first value has left any basin gradient descent can return from:
# in float32 the parameters then grow past the resolution that finite differences need (w ± delta == w),
# so the loss can stall at a huge finite value instead of reaching inf.
BLOW_UP = 1e6


# Losses are read back (divergence checked, validation losses of the epochs since computed in one
# batched forward, log lines written) at the end and at most this often. A short training (the
# default run: 17 epochs, about a millisecond) reads them back once: each read-back costs 0.1-0.6 ms
# of torch calls, more than all its epochs. A long one shows its lines as it goes.
LOOK_EVERY = 0.1  # seconds


def _blow_up_limit(first: float, dtype: torch.dtype) -> float:
    """The loss past which training has diverged: BLOW_UP times the first loss, within the losses'
    range (an inf first loss still catches inf)."""
    return min(BLOW_UP * max(first, 1e-12), torch.finfo(dtype).max)


def _cadence(after: int, upto: int, log_every: int, last: int = 0) -> list[int]:
    """The epochs in (after, upto] at the seed's print cadence: 1-3, every `log_every`, and the
    `last` when given. Each is logged, and ends a batch of validation losses (the same batches,
    whenever they are computed, give the same bits)."""
    first_every = (after // log_every + 1) * log_every
    return sorted({*range(after + 1, min(upto, 3) + 1), *range(first_every, upto + 1, log_every), *([last] if after < last <= upto else [])})


def _first_bad_epoch(losses: torch.Tensor, start: int, limit: float) -> int | None:
    """The first epoch (counted from start + 1) whose loss is not at most `limit`: past it, inf or
    NaN (every comparison with NaN is false). One comparison and one reduction while all is well."""
    within = losses <= min(limit, torch.finfo(losses.dtype).max)  # an inf limit (first loss inf) still catches inf
    if bool(within.all()):
        return None
    return start + int((~within).nonzero()[0]) + 1


def _all_finite(values: torch.Tensor) -> bool:
    return bool((values.abs() <= torch.finfo(values.dtype).max).all())  # NaN fails the comparison too


def _diverged(epoch: int, loss: float, first: float, strategy: str, lr: float) -> TrainingDiverged:
    what = f"became {loss}" if not np.isfinite(loss) else f"grew to {loss:.4g}, over {BLOW_UP:g} times its first value {first:.4g}"
    return TrainingDiverged(f"training diverged at epoch {epoch}: the training loss {what} (strategy {strategy}, lr {lr:g}).")


@dataclass(frozen=True)
class Stopping:
    """When training may end before its last epoch."""

    # stop once the training loss has stayed within a band of relative width tol for `patience`
    # epochs: a loss still falling by more than tol/patience per epoch goes on, so does one that
    # oscillates (Adam on raw readings), and a converged loss stops whatever its float32 jitter
    tol: float = 0.0  # 0: never
    patience: int = 10
    # stop once the validation loss has not reached a new minimum for this many epochs, and keep
    # the parameters of that minimum
    val_patience: int = 0  # 0: never


# the validation losses of many epochs' parameters are evaluated together, in forwards of at most
# this many numbers (16 MB of float32; on a few rows that is every epoch since the last look at once)
VALIDATION_BUDGET = 1 << 22


def _validation_losses(objective, thetas: list[torch.Tensor], width: int) -> torch.Tensor:
    """The validation losses at many parameter points, (B,), in batched forwards of at most VALIDATION_BUDGET numbers."""
    chunk = max(1, VALIDATION_BUDGET // (max(1, len(objective.y)) * width))
    with torch.no_grad():
        losses = [objective.losses(torch.stack(thetas[start : start + chunk])) for start in range(0, len(thetas), chunk)]
    return losses[0] if len(losses) == 1 else torch.cat(losses)


def _epoch(stepper, f: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """One pass over the training rows in shuffled mini-batches, one step each."""
    order = torch.randperm(len(f), generator=generator)
    total = torch.zeros((), dtype=y.dtype)
    for start in range(0, len(f), batch_size):
        rows = order[start : start + batch_size]
        total += stepper.step(f[rows], y[rows]) * len(rows)
    return total / len(f)  # mean of the batch losses, weighted by batch size


def train_model(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor | None,
    y_val: torch.Tensor | None,
    *,
    strategy: str,
    model: Model = Linear(),
    lr: float,
    epochs: int,
    delta: float = 0.1,
    optimizer: str = "sgd",
    stopping: Stopping = Stopping(),
    batch_size: int | None = None,
    seed: int = 0,
    log_every: int = 500,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train `model` from its start; raise TrainingDiverged when the loss turns inf or NaN.

    `x_train` and `x_val` are what the model's forward reads (`model.features` of the normalized
    readings). `seed` seeds this training's own generators (the network's initial parameters,
    mini-batch order), so parallel trainings do not share torch's global one. `log` gets the seed's progress lines; `progress(epoch)` is called
    after every epoch and must stay cheap (it must not read a loss back).
    """
    initial = model.initial(torch.Generator().manual_seed(seed) if model.random_start else None).to(y_train.dtype)
    stepper = make_stepper(strategy, model, initial, lr=lr, delta=delta, optimizer=optimizer)
    full_batch = batch_size is None or batch_size >= len(x_train)
    generator = None if full_batch else torch.Generator().manual_seed(seed)
    eps, mean_y2 = torch.finfo(y_train.dtype).eps, float(torch.dot(y_train, y_train)) / len(y_train) if stopping.tol else 0.0
    has_val = x_val is not None and x_val.numel() > 0
    val_objective = model.objective(x_val, y_val) if has_val else None
    # the validation loss of each epoch is that of the parameters before its step: they are kept
    # (`snapshot`, no copy where the stepper replaces them) and evaluated in batched forwards that
    # end at the log cadence, unless early stopping on validation needs each one as it comes
    val_each_epoch = has_val and stopping.val_patience > 0
    snapshots: list[torch.Tensor] = []
    # losses stay 0-dim tensors in lists (appending costs less than writing into a tensor, and
    # reading one back costs a call); stacked only when read back and at the end
    train_hist: list[torch.Tensor] = []
    val_hist: list[torch.Tensor] = []  # 0-dim tensors (per epoch) or 1-D ones (in bulk)
    best_val, best_epoch, best_params = float("inf"), 0, None
    checked = 0  # the training losses up to this epoch are read back: checked for inf/NaN, their lines written
    evaluated = 0  # the validation losses up to this epoch are computed (`snapshots`: those after it)
    log_lines: list[str] = []
    stopped_by = "epochs"
    values: list[float] = []  # the training losses as Python floats, when stopping reads each one back
    first_loss = limit = None  # the first loss and BLOW_UP times it, once read back
    next_look = time.perf_counter() + LOOK_EVERY
    for epoch in range(1, epochs + 1):
        if val_each_epoch:
            val = val_objective.losses(stepper.snapshot()[None])[0]
            val_hist.append(val)
            if float(val) < best_val:
                best_val, best_epoch, best_params = float(val), epoch, stepper.snapshot().detach().clone()
            elif epoch - best_epoch >= stopping.val_patience:
                stopped_by = "validation"
        elif has_val:
            snapshots.append(stepper.snapshot())
        loss = stepper.step(x_train, y_train) if full_batch else _epoch(stepper, x_train, y_train, batch_size, generator)
        train_hist.append(loss)
        if progress is not None:
            progress(epoch)
        look = False
        if stopping.tol:  # the loss is read back every epoch here anyway: a bad one is caught at once
            value = float(loss)
            if limit is None:
                first_loss, limit = value, _blow_up_limit(value, loss.dtype)
            look = not value <= limit
            values.append(value)
            if epoch > stopping.patience:
                recent = values[-(stopping.patience + 1):]  # the last training losses, for tol
                low, high = min(recent), max(recent)
                # settled: within the relative band, or within the loss's own rounding (a float32 loss
                # near a tiny optimum jitters by about eps * sqrt(loss * mean(y^2)), far above tol * loss)
                if high - low <= max(stopping.tol * abs(low), eps * math.sqrt(max(low, 0.0) * mean_y2)):
                    stopped_by = "tol"
        last = epoch == epochs or stopped_by != "epochs"
        # reading losses back is a host sync, and on a few rows its calls cost more than the epochs:
        # it happens at the end and every LOOK_EVERY seconds, for every epoch since the last time
        if last or look or time.perf_counter() >= next_look:
            val_at = {}  # the validation loss at each epoch that ends a batch of them
            for end in _cadence(evaluated, epoch, log_every, epoch if last else 0) if snapshots else ():
                batch = _validation_losses(val_objective, snapshots[: end - evaluated], model.width)
                del snapshots[: end - evaluated]
                val_hist.append(batch)
                val_at[end], evaluated = batch[-1], end
            if values:  # every loss so far is read back and checked already: a bad one made this look
                bad, losses, offset = (epoch if look else None), values, 0
            else:
                window = torch.stack(train_hist[checked:epoch])
                if limit is None:
                    first_loss = float(window[0])
                    limit = _blow_up_limit(first_loss, window.dtype)
                bad, losses, offset = _first_bad_epoch(window, checked, limit), window.tolist(), checked
            if bad is None and last and not _all_finite(stepper.params.detach()):
                bad = epoch  # the last step, after a finite loss, left them inf or NaN (before it, the next loss tells)
            for logged in _cadence(checked, epoch if bad is None else bad - 1, log_every, epoch if last else 0):
                val = (val_hist[logged - 1] if val_each_epoch else val_at[logged]) if has_val else None
                line = _log_line(logged, losses[logged - 1 - offset], None if val is None else float(val))
                log_lines.append(line)
                if log is not None:
                    log(line)
            if bad is not None:
                raise _diverged(bad, float(train_hist[bad - 1]), first_loss, strategy, lr)
            checked, next_look = epoch, time.perf_counter() + LOOK_EVERY
        if last:
            break
    params = best_params if stopped_by == "validation" else stepper.params.detach()
    return TrainResult(
        params=params.numpy().copy(),
        train_loss=torch.stack(train_hist).numpy(),
        val_loss=torch.cat([v.reshape(-1) for v in val_hist]).numpy() if has_val else None,
        epochs_run=epoch,
        stopped_by=stopped_by,
        best_epoch=best_epoch if stopped_by == "validation" else epoch,
        log_lines=log_lines,
    )
