"""The seed's four ways to descend the gradient, behind one interface: a stepper, for any model.

A stepper holds the packed parameters theta of a model (tasks.models) and offers
`loss_and_gradient(f, y)` (at the current parameters, nothing updated) and `step(f, y)` (one
update, returning the loss before it); `f` is what the model's forward reads. Both evaluate the
model's Objective on (f, y) (tasks.objectives), built once and kept while the same tensors come back
every epoch. `make_stepper` picks one from STEPPERS by the strategy's name; a new strategy
registers there and joins the gradient-agreement tests, which run over every strategy and every
model family.
"""

from __future__ import annotations

import functools
import inspect

import torch

# torch.optim classes that cannot train a 1-D parameter vector with dense gradients.
_UNUSABLE_OPTIMIZERS = {"optimizer", "sparseadam", "muon"}
# finite differences evaluate every shifted parameter point at once; past this many numbers in
# one evaluation (points x rows x the model's width) the points go in slices of that size
FD_BUDGET = 1 << 24


# torch's autograd engine, as loss.backward() reaches it. On a few rows, backward()'s own Python
# (normalizing its arguments, making the seed gradient 1, checking logging hooks and tensor
# subclasses, none of which applies here) costs about as much as the whole forward and backward:
# `backward` calls the engine as backward() does, with those already settled.
_ENGINE = torch.autograd.Variable._execution_engine


def backward(loss: torch.Tensor, one: torch.Tensor) -> None:
    """loss.backward() for a 0-dim `loss` with gradient `one` (1 in its dtype): into the leaves' .grad."""
    _ENGINE.run_backward((loss,), (one,), False, False, (), allow_unreachable=True, accumulate_grad=True)


@functools.cache
def _optimizer_classes() -> dict[str, type[torch.optim.Optimizer]]:
    return {
        name.lower(): cls
        for name, cls in vars(torch.optim).items()
        if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer) and name.lower() not in _UNUSABLE_OPTIMIZERS
    }


def optimizer_names() -> list[str]:
    """torch.optim optimizers usable by name, lowercase, sorted."""
    return sorted(_optimizer_classes())


class Stepper:
    """Plain gradient descent: theta <- theta - lr * gradient."""

    def __init__(self, model, params: torch.Tensor, lr: float):
        self.model = model
        self.params = params.detach().clone()
        self.lr = lr
        self._data = self._objective = None

    def objective(self, f: torch.Tensor, y: torch.Tensor):
        """The model's Objective on (f, y): the same one while the same tensors come back (every epoch)."""
        if self._data is None or self._data[0] is not f or self._data[1] is not y:
            self._data, self._objective = (f, y), self.model.objective(f, y)
        return self._objective

    def loss_and_gradient(self, f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def step(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss, grad = self.loss_and_gradient(f, y)
        # a new tensor each step, never written in place: `snapshot` can hand it out without a copy
        self.params = torch.sub(self.params, grad, alpha=self.lr)
        return loss

    def snapshot(self) -> torch.Tensor:
        """The current parameters, as a tensor later steps do not change (for validation in bulk)."""
        return self.params


class AnalyticStepper(Stepper):
    """The model's hand-derived gradient (tasks.models: the network derives its own, the models
    linear in their parameters share LeastSquares')."""

    def loss_and_gradient(self, f, y):
        return self.objective(f, y).loss_and_gradient(self.params)

    def step(self, f, y):
        loss, self.params = self.objective(f, y).descend(self.params, self.lr)  # the update fused where the model can
        return loss


class FiniteDifferenceStepper(Stepper):
    """Central differences: dL/dp_i = (L(p + d e_i) - L(p - d e_i)) / 2d for every parameter.

    The loss at p and at the 2P shifted points are evaluated as the rows of one batched forward
    (theta of shape (2P + 1, P)), not a loop over parameters; only when that evaluation would
    exceed FD_BUDGET numbers (a wide network on many rows) do the points go in slices.
    """

    def __init__(self, model, params, lr, delta: float):
        super().__init__(model, params, lr)
        self.delta = delta
        count = params.numel()
        shifts = torch.eye(count, dtype=params.dtype) * delta
        # rows: p, p + d e_0, p - d e_0, p + d e_1, p - d e_1, ...  -> shape (2P + 1, P)
        self.offsets = torch.cat([torch.zeros(1, count, dtype=params.dtype),
                                  torch.stack([shifts, -shifts], dim=1).reshape(-1, count)])
        # up to this many rows, every point is evaluated at once (decided here, not every epoch)
        self.whole_rows = FD_BUDGET // (len(self.offsets) * model.width)
        # grad = (losses[1::2] - losses[2::2]) / 2d as one product: rows of +1/-1 pick each pair, and
        # multiplying by 1 and adding 0 are exact, so the difference is rounded once, as written out
        pairs = torch.zeros(count, len(self.offsets), dtype=params.dtype)
        pairs[torch.arange(count), 1 + 2 * torch.arange(count)] = 1.0
        pairs[torch.arange(count), 2 + 2 * torch.arange(count)] = -1.0
        self.pairs = pairs
        self.two_delta = torch.tensor(2.0 * delta, dtype=params.dtype)

    def _losses(self, points, f, y):
        objective = self.objective(f, y)
        if y.shape[0] <= self.whole_rows:
            return objective.losses(points)
        chunk = max(1, FD_BUDGET // (y.shape[0] * self.model.width))
        return torch.cat([objective.losses(part) for part in points.split(chunk)])

    def loss_and_gradient(self, f, y):
        losses = self._losses(self.params + self.offsets, f, y)  # (2P + 1,)
        return losses[0], torch.mv(self.pairs, losses) / self.two_delta

    def step(self, f, y):
        losses = self._losses(self.params + self.offsets, f, y)
        # theta - lr * (L(p + d e_i) - L(p - d e_i)) / 2d: the update fused into the product that
        # takes the differences (one call instead of three)
        self.params = torch.addmv(self.params, self.pairs, losses, alpha=-self.lr / (2.0 * self.delta))
        return losses[0]


class AutogradStepper(Stepper):
    """backward() fills params.grad; each step makes the next parameters a new leaf tensor.

    The seed updates its leaf in place and zeroes its gradient; a new leaf each epoch does the same
    arithmetic (theta - lr * grad, outside the graph) with a fresh gradient, and the old parameters
    stay as they were, so `snapshot` hands them out without a copy.
    """

    def __init__(self, model, params, lr):
        super().__init__(model, params, lr)
        self.params.requires_grad_(True)
        self.no_grad = torch.no_grad()  # one context object, entered every epoch
        self.one = torch.ones((), dtype=self.params.dtype)  # d loss / d loss

    def _backward(self, f, y) -> torch.Tensor:
        """The loss at the current parameters (in the graph), its gradient added to params.grad."""
        loss = self.objective(f, y).loss(self.params)
        backward(loss, self.one)
        return loss

    def loss_and_gradient(self, f, y):
        self.params.grad = None  # zeroed as torch.optim's zero_grad does: dropped, refilled by backward
        return self._backward(f, y).detach(), self.params.grad

    def step(self, f, y):
        loss = self._backward(f, y)  # a new leaf has no gradient yet: nothing to zero
        with self.no_grad:  # the update is not part of the graph
            self.params = torch.sub(self.params, self.params.grad, alpha=self.lr)
        self.params.requires_grad_(True)
        return loss.detach()

    def snapshot(self):
        return self.params.detach()  # never written again: replaced by the next step


class OptimizerStepper(AutogradStepper):
    """A torch.optim optimizer owns the update (gradients dropped, backward, its step)."""

    def __init__(self, model, params, lr, optimizer: str):
        super().__init__(model, params, lr)
        self.optimizer = _optimizer_classes()[optimizer.lower()]([self.params], lr=lr)
        self.needs_closure = isinstance(self.optimizer, torch.optim.LBFGS)  # it evaluates the loss several times

    def snapshot(self):
        return self.params.detach().clone()  # the optimizer updates them in place: a copy

    def _closure(self, f, y):
        # what optimizer.zero_grad() does for its one parameter (set_to_none), without its profiler
        # bookkeeping, which costs about as much as the whole forward here
        self.params.grad = None
        return self._backward(f, y)

    def step(self, f, y):
        if self.needs_closure:
            return self.optimizer.step(lambda: self._closure(f, y)).detach()
        loss = self._closure(f, y)
        self.optimizer.step()
        return loss.detach()


STEPPERS = {
    "finite-difference": lambda model, params, lr, delta, optimizer: FiniteDifferenceStepper(model, params, lr, delta),
    "analytic": lambda model, params, lr, delta, optimizer: AnalyticStepper(model, params, lr),
    "autograd": lambda model, params, lr, delta, optimizer: AutogradStepper(model, params, lr),
    "optimizer": lambda model, params, lr, delta, optimizer: OptimizerStepper(model, params, lr, optimizer),
}


def make_stepper(strategy: str, model, params: torch.Tensor, lr: float, delta: float = 0.1, optimizer: str = "sgd") -> Stepper:
    """The stepper for `strategy` training `model`, starting from a copy of `params`."""
    return STEPPERS[strategy](model, params, lr, delta, optimizer)
