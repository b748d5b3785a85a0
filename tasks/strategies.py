"""The seed's four ways to descend the gradient, behind one interface: a stepper.

A stepper holds the parameters [w, b] and offers `loss_and_gradient(x, y)` (at the current
parameters, nothing updated) and `step(x, y)` (one update, returning the loss before it).
`make_stepper` picks one from STEPPERS by the strategy's name; a new strategy registers there
and joins the gradient-agreement tests.
"""

from __future__ import annotations

import functools
import inspect

import torch

from tasks.model import loss_fn, model

# torch.optim classes that cannot train a 1-D parameter vector with dense gradients.
_UNUSABLE_OPTIMIZERS = {"optimizer", "sparseadam", "muon"}


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
    """Plain gradient descent: params <- params - lr * gradient."""

    def __init__(self, params: torch.Tensor, lr: float):
        self.params = params.detach().clone()
        self.lr = lr

    def loss_and_gradient(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss, grad = self.loss_and_gradient(x, y)
        with torch.no_grad():
            self.params -= self.lr * grad
        return loss.detach()


class AnalyticStepper(Stepper):
    """The hand-derived gradient of the MSE of w * x + b."""

    def loss_and_gradient(self, x, y):
        w, b = self.params
        pred = model(x, w, b)
        dloss_dpred = 2 * (pred - y) / pred.size(0)  # d mean((p - y)^2) / dp
        # dp/dw = x, dp/db = 1; the sums undo the broadcast of w and b over the rows
        grad = torch.stack([(dloss_dpred * x).sum(), dloss_dpred.sum()])
        return loss_fn(pred, y), grad


class FiniteDifferenceStepper(Stepper):
    """Central differences, one parameter at a time: (L(p + d) - L(p - d)) / 2d."""

    def __init__(self, params, lr, delta: float):
        super().__init__(params, lr)
        self.delta = delta
        # each row of `offsets` moves one parameter by +delta: [[d, 0], [0, d]]
        self.offsets = torch.eye(params.numel(), dtype=params.dtype) * delta

    def _loss_at(self, params, x, y):
        return loss_fn(model(x, *params), y)

    def loss_and_gradient(self, x, y):
        with torch.no_grad():
            p = self.params
            grad = torch.stack(
                [(self._loss_at(p + o, x, y) - self._loss_at(p - o, x, y)) / (2.0 * self.delta) for o in self.offsets]
            )
            return self._loss_at(p, x, y), grad


class AutogradStepper(Stepper):
    """backward() fills params.grad; zeroed every epoch, since gradients accumulate."""

    def __init__(self, params, lr):
        super().__init__(params, lr)
        self.params.requires_grad_(True)

    def loss_and_gradient(self, x, y):
        if self.params.grad is not None:
            self.params.grad.zero_()
        loss = loss_fn(model(x, *self.params), y)
        loss.backward()
        return loss, self.params.grad


class OptimizerStepper(AutogradStepper):
    """A torch.optim optimizer owns the update (zero_grad, backward, step)."""

    def __init__(self, params, lr, optimizer: str):
        super().__init__(params, lr)
        self.optimizer = _optimizer_classes()[optimizer.lower()]([self.params], lr=lr)

    def step(self, x, y):
        def closure():  # LBFGS evaluates the loss several times per step; the rest once
            self.optimizer.zero_grad()
            loss = loss_fn(model(x, *self.params), y)
            loss.backward()
            return loss

        return self.optimizer.step(closure).detach()


STEPPERS = {
    "finite-difference": lambda params, lr, delta, optimizer: FiniteDifferenceStepper(params, lr, delta),
    "analytic": lambda params, lr, delta, optimizer: AnalyticStepper(params, lr),
    "autograd": lambda params, lr, delta, optimizer: AutogradStepper(params, lr),
    "optimizer": lambda params, lr, delta, optimizer: OptimizerStepper(params, lr, optimizer),
}


def make_stepper(strategy: str, params: torch.Tensor, lr: float, delta: float = 0.1, optimizer: str = "sgd") -> Stepper:
    """The stepper for `strategy`, starting from a copy of `params`."""
    return STEPPERS[strategy](params, lr, delta, optimizer)
