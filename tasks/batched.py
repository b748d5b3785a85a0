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

from tasks import strategies
from tasks.errors import InvalidInput
from tasks.models import Model
from tasks.strategies import FiniteDifferenceStepper, _optimizer_classes
from tasks.train import BLOW_UP, Stopping

# how often the loop asks whether any model is still training (a read-back, a device sync where
# there is a device); up to STOP_CHECK - 1 epochs run in vain once the last one has stopped, and
# the results are trimmed to the epochs that counted
STOP_CHECK = 8

# torch.optim optimizers whose update is elementwise: each element's state and step depend on
# that element's gradient and the step count only, so one (B, P) parameter is B models trained
# alone. Any other optimizer gets one parameter tensor per model.
ELEMENTWISE_OPTIMIZERS = frozenset({"sgd", "adam", "adamw", "adamax", "nadam", "radam", "rmsprop", "rprop", "adagrad",
                                    "adadelta", "asgd"})

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


class WeightedObjective:
    """The weighted losses of B models of one family on fixed data, in the forms the batched
    strategies use every epoch (tasks.objectives' Objective, for B models).

    f is what the model's forward reads, shared by every model (`feature_ndim` dimensions) or per
    model (one more, leading); y is (n,) or (B, n); weights (B, n) are each model's row weights
    summing to 1 (its rows' multiplicities over their total), so that a loss is one weighted sum.
    """

    def __init__(self, model: Model, f: torch.Tensor, y: torch.Tensor, weights: torch.Tensor):
        self.model, self.f, self.y, self.weights = model, f, y, weights
        self.per_model = f.ndim > model.feature_ndim
        self.rows = weights.shape[1]

    def _data(self, models: slice, points: bool):
        """f, y and the weights of the models in `models`, shaped against theta (B, P), or against
        points (B, M, P) with an axis of length 1 for the points."""
        f = self.f[models] if self.per_model else self.f
        y = self.y[models] if self.y.ndim == 2 else self.y
        w = self.weights[models]
        if points:
            f = f[:, None] if self.per_model else f
            y = y[:, None] if y.ndim == 2 else y
            w = w[:, None]
        return f, y, w

    def losses(self, theta: torch.Tensor, models: slice = slice(None)) -> torch.Tensor:
        """Losses through the model's forward (differentiable: autograd, torch.optim): theta (B, P) -> (B,),
        or M points per model (B, M, P) -> (B, M) (finite differences); `models` picks a slice of the models."""
        f, y, w = self._data(models, theta.ndim == 3)
        residual = self.model.forward(theta, f) - y
        return torch.linalg.vecdot(w * residual, residual)

    def loss_and_gradient(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The losses (B,) and the model's hand-derived gradients (B, P) at theta (B, P)."""
        return self.model.weighted_loss_and_gradient(theta, self.f, self.y, self.weights)

    def descend(self, theta: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The losses at theta and the next points theta - lr * gradient (a new tensor)."""
        loss, grad = self.loss_and_gradient(theta)
        return loss, torch.sub(theta, grad, alpha=lr)


class WeightedLeastSquares(WeightedObjective):
    """The weighted losses of B models linear in their parameters: forward = X theta, X = model.design(f),
    one design matrix (n, P) shared or one per model (B, n, P).

    The residuals r = X theta - y are one product for all B models (y negated once, exact), each
    loss the dot product of w * r with r, the hand-derived gradient 2 X^T (w r) (for the line,
    dL/dw = 2 sum(w r x), dL/db = 2 sum(w r)) one more product with 2 X formed once (doubling is
    exact). A step subtracts lr * gradient from theta after the product, never fused into it:
    torch's CPU addmm/baddbmm add each row's term into theta one at a time, and near the optimum
    every term is below half an ulp of theta, so the step rounded away and training stalled a
    dozen ulps short of the float32 optimum (a relative gap of 3e-6 on 800 rows, against 3e-9).
    """

    def __init__(self, model: Model, f: torch.Tensor, y: torch.Tensor, weights: torch.Tensor):
        super().__init__(model, f, y, weights)
        self.f = model.design(f).contiguous()  # what forward reads from here on: (n, P) or (B, n, P)
        self.gradient_map = (self.f + self.f).contiguous()  # 2 X
        # -y broadcast against the residuals: (n,) or (B, n) for a shared design, a column per model for per-model ones
        self.neg_y = -y if not self.per_model else (-y)[..., None]

    def _residual(self, theta):
        if self.per_model:
            return torch.baddbmm(self.neg_y, self.f, theta[:, :, None])[..., 0]  # (B, n, P) @ (B, P, 1)
        return torch.addmm(self.neg_y, theta, self.f.T)  # (B, P) @ (P, n)

    def loss_and_gradient(self, theta):
        residual = self._residual(theta)
        weighted = self.weights * residual
        if self.per_model:
            grad = torch.bmm(weighted[:, None, :], self.gradient_map)[:, 0]
        else:
            grad = weighted @ self.gradient_map
        return torch.linalg.vecdot(weighted, residual), grad


class _Stepper:
    """Plain gradient descent on B models: `step()` gives the losses before the update and the
    updated parameters, `accept(keep)` keeps the update for the models in the mask `keep` and the
    parameters they had for the others (stopped, or diverging at this step)."""

    def __init__(self, objective: WeightedObjective, theta: torch.Tensor, lr: float):
        self.objective, self.theta, self.lr = objective, theta.detach().clone(), lr

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def accept(self, keep: torch.Tensor, proposal: torch.Tensor) -> None:
        # a new tensor each epoch, never written in place: the loop may keep the old one (best parameters)
        self.theta = torch.where(keep[:, None], proposal, self.theta)


class _Analytic(_Stepper):
    def step(self):
        return self.objective.descend(self.theta, self.lr)


class _FiniteDifference(_Stepper):
    """FiniteDifferenceStepper's central differences for B models: its 2P + 1 points around each
    model's parameters, (B, 2P + 1, P), evaluated in one batched forward unless that would pass
    FD_BUDGET numbers; then in slices of models, and of points should one model's pass it alone."""

    def __init__(self, objective, theta, lr, delta):
        super().__init__(objective, theta, lr)
        single = FiniteDifferenceStepper(objective.model, theta[0], lr, delta)  # the same points and pairs as one model's training
        self.offsets = single.offsets  # (M, P), M = 2P + 1
        self.pairs = single.pairs.T.contiguous()  # (M, P): the +1/-1 that take each pair's difference
        self.alpha = -lr / (2.0 * delta)
        B, M = len(theta), len(self.offsets)
        per_model = M * objective.rows * objective.model.width  # numbers one model's points make
        budget = strategies.FD_BUDGET
        self.slices = None  # None: every point of every model at once
        if B * per_model > budget:
            models = max(1, budget // per_model)
            points = M if models > 1 or per_model <= budget else max(1, budget // (objective.rows * objective.model.width))
            # slices of models, each with its slices of points (one slice of all points unless one model passes the budget)
            self.slices = [(slice(a, a + models), [slice(c, c + points) for c in range(0, M, points)]) for a in range(0, B, models)]

    def _losses(self, points):
        if self.slices is None:
            return self.objective.losses(points)  # (B, M)
        return torch.cat([torch.cat([self.objective.losses(points[models, some], models) for some in parts], dim=1)
                          for models, parts in self.slices])

    def step(self):
        losses = self._losses(self.theta[:, None, :] + self.offsets)
        # theta - lr * (L(p + d e_i) - L(p - d e_i)) / 2d, the update fused into the product taking the differences
        return losses[:, 0], torch.addmm(self.theta, losses, self.pairs, alpha=self.alpha)


class _Autograd(_Stepper):
    """backward() of the sum of the B losses: each model's gradient is its own (its loss reads its row of theta only)."""

    def step(self):
        theta = self.theta.detach().requires_grad_(True)  # a fresh leaf: no gradient to drop
        loss = self.objective.losses(theta)
        loss.sum().backward()
        return loss.detach(), torch.sub(self.theta, theta.grad, alpha=self.lr)


class _Optimizer(_Stepper):
    """A torch.optim optimizer owns the update: one (B, P) parameter if its update is elementwise,
    else B parameters (P,), views into one (B, P) tensor (its steps write through to it)."""

    def __init__(self, objective, theta, lr, optimizer: str):
        super().__init__(objective, theta, lr)
        name = optimizer.lower()
        classes = _optimizer_classes()
        if name == "lbfgs":
            raise InvalidInput("the optimizer lbfgs cannot train a batch of models: its line search evaluates one loss for all "
                               "its parameters, so the models of the batch would steer each other's steps; train them one by one, "
                               "or use another optimizer")
        if name not in classes:
            raise InvalidInput(f"unknown optimizer {optimizer!r}; choose one of {', '.join(sorted(classes))}")
        self.elementwise = name in ELEMENTWISE_OPTIMIZERS
        if self.elementwise:
            self.params = [self.theta.requires_grad_(True)]
        else:  # a leaf view of each row: the graph goes through the views, and the optimizer's steps write into theta
            self.params = [row.requires_grad_(True) for row in self.theta.unbind(0)]
        self.optimizer = classes[name](self.params, lr=lr)
        self.before = None

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        current = self.theta if self.elementwise else torch.stack(self.params)
        loss = self.objective.losses(current)
        loss.sum().backward()
        self.before = self.theta.detach().clone()
        self.optimizer.step()
        return loss.detach(), self.theta.detach()

    def accept(self, keep, proposal):
        with torch.no_grad():  # in place: the optimizer holds the parameters (and the views, their storage)
            self.theta.copy_(torch.where(keep[:, None], proposal, self.before))


def _make_stepper(strategy, objective, theta, lr, delta, optimizer) -> _Stepper:
    if strategy == "analytic":
        return _Analytic(objective, theta, lr)
    if strategy == "autograd":
        return _Autograd(objective, theta, lr)
    if strategy == "finite-difference":
        return _FiniteDifference(objective, theta, lr, delta)
    if strategy == "optimizer":
        return _Optimizer(objective, theta, lr, optimizer)
    raise InvalidInput(f"unknown strategy {strategy!r}; choose one of analytic, autograd, finite-difference, optimizer")


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
