"""The batched trainer's parts (tasks.batched): B models' weighted losses on fixed data, and one
stepper per strategy that moves all B models at once (the module docstring of tasks.batched says
how each strategy is batched and why)."""

from __future__ import annotations

import torch

from tasks import strategies
from tasks.errors import InvalidInput
from tasks.models import Model
from tasks.strategies import FiniteDifferenceStepper, _optimizer_classes

# torch.optim optimizers whose update is elementwise: each element's state and step depend on
# that element's gradient and the step count only, so one (B, P) parameter is B models trained
# alone. Any other optimizer gets one parameter tensor per model.
ELEMENTWISE_OPTIMIZERS = frozenset({"sgd", "adam", "adamw", "adamax", "nadam", "radam", "rmsprop", "rprop", "adagrad",
                                    "adadelta", "asgd"})


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
    exact). With one design per model (a fleet: each sensor its own normalized readings) the
    residuals are P elementwise passes over the design's columns instead, and the gradient P dot
    products: a batched (n, P) @ (P, 1) product per model cost ten times as much for the line.
    A step subtracts lr * gradient from theta after the product, never fused into it:
    torch's CPU addmm/baddbmm add each row's term into theta one at a time, and near the optimum
    every term is below half an ulp of theta, so the step rounded away and training stalled a
    dozen ulps short of the float32 optimum (a relative gap of 3e-6 on 800 rows, against 3e-9).
    """

    def __init__(self, model: Model, f: torch.Tensor, y: torch.Tensor, weights: torch.Tensor):
        super().__init__(model, f, y, weights)
        self.f = model.design(f).contiguous()  # what forward reads from here on: (n, P) or (B, n, P)
        self.neg_y = -y  # (n,) or (B, n)
        if self.per_model:
            self.columns = self.f.permute(2, 0, 1).contiguous()  # (P, B, n): each column of every model's design
        else:
            self.gradient_map = (self.f + self.f).contiguous()  # 2 X
        self._buffers: tuple[torch.Tensor, ...] | None = None

    def _scratch(self, theta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The residuals', weighted residuals' and their products' tensors, (B, n) each, made once
        and rewritten every epoch: a fleet partition's are a few MiB each, which glibc would
        otherwise map and unmap anew every epoch (tasks.store.limit_heap_retention), page faults
        that doubled its training time. Plain tensors only: autograd never passes through them."""
        shape = (theta.shape[0], self.rows)
        if self._buffers is None or self._buffers[0].shape != shape or self._buffers[0].dtype != theta.dtype:
            self._buffers = tuple(torch.empty(shape, dtype=theta.dtype) for _ in range(3))
        return self._buffers

    def _residual(self, theta, out=None):
        if not self.per_model:
            return torch.addmm(self.neg_y, theta, self.f.T, out=out)  # (B, P) @ (P, n)
        residual = torch.addcmul(self.neg_y, self.columns[0], theta[:, :1], out=out)
        for p in range(1, theta.shape[1]):
            residual = torch.addcmul(residual, self.columns[p], theta[:, p:p + 1], out=out)
        return residual

    def _weighted_residuals(self, theta):
        residual, weighted, _ = self._scratch(theta)
        self._residual(theta, out=residual)
        return residual, torch.mul(self.weights, residual, out=weighted)

    def _dots(self, a, b):
        """Row by row dot products of (B, n) by (B, n), the products written over the last scratch tensor."""
        return torch.mul(a, b, out=self._scratch(a)[2]).sum(dim=1)

    def losses(self, theta, models: slice = slice(None)):
        if theta.ndim == 2 and models == slice(None) and not theta.requires_grad:  # not autograd's: the scratch form
            residual, weighted = self._weighted_residuals(theta)
            return self._dots(weighted, residual)
        return super().losses(theta, models)

    def loss_and_gradient(self, theta):
        residual, weighted = self._weighted_residuals(theta)
        if self.per_model:
            grad = 2.0 * torch.stack([self._dots(weighted, column) for column in self.columns], dim=1)
        else:
            grad = weighted @ self.gradient_map
        return self._dots(weighted, residual), grad


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
