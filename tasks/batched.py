"""Training B independent models of one family at once, as one tensor program.

Two uses: the bootstrap (B resampled training sets of the same rows, given as row weights: how
often each row was drawn) and fleets (thousands of sensors, each with its own rows: ragged row
counts padded to the longest with weight 0, features per model). Each model's parameters are one
row of a (B, P) tensor and every epoch is a fixed number of tensor operations whatever B is: no
Python loop over models (but the one inside torch.optim for optimizers that need a parameter per
model, below), so on a few rows a hundred models cost a few times what one does, not a hundred.

Each model's loss is its weighted mean of squared residuals, sum(w r^2) / sum(w): with integer
weights that is the MSE on its rows repeated that many times, so every model of a batch follows
the training `train_model` (tasks.train) would give it on its own rows, to float32 rounding.
The weights are divided by their total once, before training, so an epoch only multiplies.

The strategies are tasks.strategies' four, batched:

- analytic: the model family's hand-derived gradient of the weighted loss for all B models at
  once (`Model.weighted_loss_and_gradient`: WeightedLeastSquares below for the models linear in
  their parameters, through their design matrix; the network derives its own, tasks.models);
- autograd: backward of the sum of the B losses; model b's loss depends on its row of theta only,
  so each row's gradient is that model's own;
- finite-difference: FiniteDifferenceStepper's central differences, its points and its pairing,
  for the B x (2P + 1) points in one batched forward, sliced only past FD_BUDGET numbers;
- optimizer: a torch.optim optimizer. Those whose update is elementwise (SGD, Adam, ...: state and
  step per element, scalars depending only on the step count) get one (B, P) parameter and treat
  each model as they would alone; any other (Adafactor factorizes a 2-D parameter and scales by
  its norm) gets B parameters of shape (P,), views into one (B, P) tensor, in one optimizer.
  LBFGS is refused: its line search evaluates one loss for all its parameters, coupling the models.

Stopping and divergence are decided per model with train_model's rules, on device, every epoch:
a mask of the models still training, and torch.where keeping the parameters of the others as they
were. A model whose loss turns non-finite, or passes BLOW_UP times its first loss, or whose update
is not finite, is marked diverged and keeps its last finite parameters; the others go on. The host
reads one flag back every STOP_CHECK epochs (are any still training?), never the losses: why and
when each model stopped is worked out after the loop from the masks each epoch made.

torch's intra-op threads are left as the process has them. An epoch's tensors are small (B x n x
the model's width numbers), and an operation torch splits between threads then waits for each;
where another process keeps the other core busy, that wait is a scheduler's time slice (a tanh of
100 x 9 x 13 numbers measured 6 ms on two threads, 60 us on one). A process that trains on few
rows on a busy machine may set one thread at its start. Setting one for the call and restoring the
count after it is not done here: torch.set_num_threads also switches MKL's dynamic threading off
for the whole process, and after the restore MKL ran even the tiny products of later single-model
trainings on two threads, 10 to 30 times slower on this 2-core machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tasks.batched_steps import WeightedObjective, _make_stepper, _Stepper
from tasks.errors import InvalidInput
from tasks.models import Model
from tasks.train import BLOW_UP, Stopping

# how often the loop asks whether any model is still training (a read-back, a device sync where
# there is a device); up to STOP_CHECK - 1 epochs run in vain once the last one has stopped, and
# the results are trimmed to the epochs that counted
STOP_CHECK = 8

# why a model stopped, as codes (worked out after the loop)
_EPOCHS, _TOL, _VALIDATION, _DIVERGED = 0, 1, 2, 3
_REASONS = {_EPOCHS: "epochs", _TOL: "tol", _VALIDATION: "validation", _DIVERGED: "diverged"}


@dataclass(frozen=True)
class BatchedResult:
    """B models' trained parameters and per-epoch losses (train_model's TrainResult, one row per model)."""

    params: np.ndarray  # (B, P) float32: final parameters (for validation stops those of the best validation epoch)
    train_loss: np.ndarray  # (B, E) float32: loss before each epoch's update, NaN after the model stopped; E = most epochs run
    val_loss: np.ndarray | None  # (B, E), or None without validation rows
    epochs_run: np.ndarray  # (B,) int
    stopped_by: list[str]  # per model: "epochs", "tol", "validation" or "diverged"
    diverged_at: np.ndarray  # (B,) int: the epoch at which the model diverged, 0 if it did not


def _tensor(value, dtype=None) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) and (dtype is None or value.dtype == dtype) else torch.as_tensor(value, dtype=dtype)


def _checked_data(model: Model, f, y, weights, B: int | None, what: str):
    """f, y and the weights as tensors of one floating dtype (y's), their shapes checked: B models on n rows."""
    y = _tensor(y)
    dtype = y.dtype if y.is_floating_point() else torch.float32
    y, f = y.to(dtype), _tensor(f, dtype)
    if weights is None:  # validation rows count once each, for every model
        rows = y.shape[-1] if y.ndim else 0
        weights = torch.ones(B, rows, dtype=dtype)
    weights = _tensor(weights, dtype)
    if weights.ndim != 2 or 0 in weights.shape:
        raise InvalidInput(f"{what} weights must be (B, n), one row weight per model and row; got shape {tuple(weights.shape)}")
    B = B or weights.shape[0]
    n = weights.shape[1]
    if weights.shape[0] != B:
        raise InvalidInput(f"{what} weights are for {weights.shape[0]} models, the batch has {B}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise InvalidInput(f"{what} weights must be finite and non-negative (0: the row is absent for that model)")
    empty = (weights.sum(dim=1) <= 0).nonzero().flatten()
    if len(empty):
        raise InvalidInput(f"{what} weights of model(s) {empty.tolist()[:10]} are all 0: a model needs at least one row")
    shared, per_model = (n,), (B, n)
    if f.ndim == model.feature_ndim + 1:
        feature_ok = tuple(f.shape[:2]) == per_model
    else:
        feature_ok = f.ndim == model.feature_ndim and f.shape[0] == n
    if not feature_ok:
        raise InvalidInput(f"{what} features of shape {tuple(f.shape)} do not fit {B} model(s) on {n} rows: {model.spec} reads "
                           f"{model.feature_ndim}-D features of one data set, or per model with a leading dimension of {B}")
    if model.feature_ndim == 2 and f.shape[-1] != model.size:
        raise InvalidInput(f"{what} features have {f.shape[-1]} columns; {model.spec} reads {model.size}")
    if tuple(y.shape) not in (shared, per_model):
        raise InvalidInput(f"{what} targets of shape {tuple(y.shape)} do not fit {B} model(s) on {n} rows: (n,) or (B, n)")
    return f, y, weights


def train_batched(model: Model, f, y, weights, *, strategy: str, lr: float, epochs: int, delta: float = 0.1,
                  optimizer: str = "sgd", stopping: Stopping = Stopping(), seed: int = 0, initial=None,
                  f_val=None, y_val=None, weights_val=None) -> BatchedResult:
    """Train B models of `model`'s family at once; model b on rows weighted by weights[b].

    `f`: what model.forward reads, shared ((n,) readings, (n, K + 1) basis values) or per model
    ((B, n), (B, n, K + 1)); `y`: (n,) or (B, n); `weights`: (B, n), non-negative, each model's row
    multiplicities (0: absent; padded rows must hold finite values). `initial`: (B, P) or (P,);
    by default every model starts where train_model(..., seed=seed) does. Validation rows
    (f_val, y_val, weights_val, the same shapes; weights 1 if not given) give each model's
    validation loss every epoch, at its parameters before the epoch's update.

    Each model stops by train_model's rules (`stopping`), or diverges (no exception: stopped_by
    "diverged", its last finite parameters kept); the others go on until all have stopped or
    `epochs` have run. Every epoch is one full-batch step per model: no mini-batches.
    """
    if epochs < 1:
        raise InvalidInput(f"epochs must be at least 1; got {epochs}")
    f, y, weights = _checked_data(model, f, y, weights, None, "training")
    dtype, B = y.dtype, weights.shape[0]
    if initial is None:
        initial = model.initial(torch.Generator().manual_seed(seed))
    theta = _tensor(initial, dtype)
    if theta.shape not in ((model.size,), (B, model.size)):
        raise InvalidInput(f"initial parameters of shape {tuple(theta.shape)}: {model.spec} has {model.size}, as (P,) or (B, P)")
    theta = theta.expand(B, model.size).clone()
    # each model's weights over their total: its loss, a weighted mean, is then one weighted sum
    stepper = _make_stepper(strategy, model.batched_objective(f, y, weights / weights.sum(dim=1, keepdim=True)), theta, lr,
                            delta, optimizer)

    has_val = f_val is not None and y_val is not None and _tensor(y_val).numel() > 0
    if has_val:
        f_val, y_val, weights_val = _checked_data(model, f_val, _tensor(y_val).to(dtype), weights_val, B, "validation")
    val_objective = model.batched_objective(f_val, y_val, weights_val / weights_val.sum(dim=1, keepdim=True)) if has_val else None
    return _train(stepper, val_objective, y, weights, epochs, stopping)


def _train(stepper: _Stepper, val_objective: WeightedObjective | None, y, weights, epochs: int, stopping: Stopping) -> BatchedResult:
    """train_batched's loop: every epoch the same tensor operations for all B models, whichever are still training."""
    B = weights.shape[0]
    tol, patience, val_patience = stopping.tol, stopping.patience, stopping.val_patience
    if tol:
        # train_model's band test in float64, as it does it with Python floats of the same float32 losses
        recent = torch.zeros(B, patience + 1, dtype=torch.float64)
        y64, w64 = y.double(), weights.double()
        # eps^2 * each model's own weighted mean(y^2): the rounding floor is sqrt(low * floor2)
        floor2 = (w64 * y64 * y64).sum(dim=1) / w64.sum(dim=1) * torch.finfo(y.dtype).eps ** 2
    if val_objective is not None and val_patience:
        best_val = torch.full((B,), math.inf, dtype=y.dtype)
        best_epoch = torch.zeros(B, dtype=torch.int64)
        best_theta = stepper.theta.detach().clone()
    never = torch.zeros(B, dtype=torch.bool)

    # Per epoch, only what the rules need is computed on device; why and when each model stopped is
    # worked out at the end from these masks, (B,) each: no host reads, few operations per epoch.
    active = torch.ones(B, dtype=torch.bool)  # still training at the start of the epoch
    actives, oks, settleds, val_stops = [], [], [], []
    train_hist: list[torch.Tensor] = []  # (B,) losses, stacked at the end
    val_hist: list[torch.Tensor] = []
    limit = None
    for epoch in range(1, epochs + 1):
        following = active
        if val_objective is not None:
            with torch.no_grad():
                val = val_objective.losses(stepper.theta.detach())  # the parameters before this epoch's step
            val_hist.append(val)
            if val_patience:
                # train_model's rule per model: a new minimum keeps its parameters; none for val_patience epochs stops it
                improved = active & (val < best_val)
                best_val = torch.where(improved, val, best_val)
                best_epoch.masked_fill_(improved, epoch)
                best_theta = torch.where(improved[:, None], stepper.theta.detach(), best_theta)
                val_stop = ~improved & (best_epoch <= epoch - val_patience)
                val_stops.append(val_stop)
                following = following & ~val_stop
        loss, proposal = stepper.step()
        train_hist.append(loss)
        if limit is None:
            limit, zero = _limit(loss), torch.zeros((), dtype=loss.dtype)
        # divergence: a loss past the limit or not finite (NaN compares false), or an update not finite;
        # that one turns the sum of the model's parameters inf or NaN, and loss + sum * 0 NaN with it
        ok = torch.addcmul(loss, proposal.sum(dim=1), zero) <= limit
        keep = active & ok
        stepper.accept(keep, proposal)  # the others keep their parameters: stopped before, or diverging now
        following = following & ok
        actives.append(active)
        oks.append(ok)
        if tol:
            recent[:, (epoch - 1) % (patience + 1)] = loss
            if epoch > patience:
                low, high = torch.aminmax(recent, dim=1)
                # train_model's band: within tol relative, or within the loss's own float rounding (losses
                # are sums of squares, so its abs(low) and max(low, 0) are low itself)
                settled = high - low <= torch.maximum(low * tol, (low * floor2).sqrt())
                following = following & ~settled
            else:
                settled = never
            settleds.append(settled)
        active = following
        if epoch % STOP_CHECK == 0 and not bool(active.any()):
            break

    # epochs run: those a model started active (once stopped it stays so); why it stopped: the rules'
    # masks at its last epoch, in train_model's precedence (divergence raises there; tol overrides validation)
    epochs_run = torch.stack(actives).sum(dim=0)
    last, models = epochs_run - 1, torch.arange(B)
    reason = torch.full((B,), _EPOCHS, dtype=torch.int8)
    if val_stops:
        reason.masked_fill_(torch.stack(val_stops)[last, models], _VALIDATION)
    if settleds:
        reason.masked_fill_(torch.stack(settleds)[last, models], _TOL)
    diverged = ~torch.stack(oks)[last, models]
    reason.masked_fill_(diverged, _DIVERGED)
    E = int(epochs_run.max())
    after = torch.arange(1, E + 1)[None, :] > epochs_run[:, None]  # (B, E): epochs after a model stopped
    train_loss = torch.stack(train_hist[:E], dim=1).masked_fill(after, math.nan)
    val_loss = torch.stack(val_hist[:E], dim=1).masked_fill(after, math.nan) if val_hist else None
    params = stepper.theta.detach()
    if val_stops:
        params = torch.where((reason == _VALIDATION)[:, None], best_theta, params)
    return BatchedResult(
        params=params.float().numpy().copy(),
        train_loss=train_loss.float().numpy(),
        val_loss=val_loss.float().numpy() if val_loss is not None else None,
        epochs_run=epochs_run.numpy().astype(int),
        stopped_by=[_REASONS[code] for code in reason.tolist()],
        diverged_at=torch.where(diverged, epochs_run, 0).numpy().astype(int),
    )


def _limit(first: torch.Tensor) -> torch.Tensor:
    """BLOW_UP times each model's first loss (at least 1e-12), as train_model compares it in float64,
    rounded down to the losses' dtype: for a loss of that dtype, loss > limit is then the same test,
    without converting every epoch. A non-finite first loss gives a finite limit, which it fails."""
    exact = BLOW_UP * first.double().clamp(1e-12, 1e300)
    limit = exact.to(first.dtype)
    return torch.where(limit.double() > exact, torch.nextafter(limit, torch.tensor(-math.inf, dtype=first.dtype)), limit)
