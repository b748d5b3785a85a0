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
        self.params.sub_(grad, alpha=self.lr)  # no graph here: these parameters do not require grad
        return loss


class AnalyticStepper(Stepper):
    """The hand-derived gradient of the MSE of w * x + b."""

    def loss_and_gradient(self, x, y):
        w, b = self.params
        pred = model(x, w, b)
        residual = pred - y
        # dL/dpred = 2 (pred - y) / n; dpred/dw = x, dpred/db = 1, and the sums over rows undo the
        # broadcast of w and b: dL/dw = 2/n sum(r x) (a dot product), dL/db = 2/n sum(r)
        grad = torch.stack([torch.dot(residual, x), residual.sum()]) * (2.0 / pred.size(0))
        return loss_fn(pred, y), grad


def loss_fn_rows(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The MSE of each row of `pred` against `target`."""
    return ((pred - target) ** 2).mean(dim=1)


class FiniteDifferenceStepper(Stepper):
    """Central differences: dL/dp_i = (L(p + d e_i) - L(p - d e_i)) / 2d for each parameter.

    The loss at p and at the four shifted points are evaluated at once, as five rows of one
    broadcast model evaluation: fewer, larger tensor operations than five separate ones.
    """

    def __init__(self, params, lr, delta: float):
        super().__init__(params, lr)
        self.delta = delta
        shifts = torch.eye(params.numel(), dtype=params.dtype) * delta
        # rows: p, p + d e_w, p - d e_w, p + d e_b, p - d e_b  -> shape (5, 2)
        self.offsets = torch.cat([torch.zeros(1, params.numel(), dtype=params.dtype),
                                  torch.stack([shifts, -shifts], dim=1).reshape(-1, params.numel())])

    def loss_and_gradient(self, x, y):
        points = self.params + self.offsets  # (5, 2)
        pred = model(x, points[:, :1], points[:, 1:])  # (5, rows): each row one parameter point
        losses = loss_fn_rows(pred, y)  # (5,)
        grad = (losses[1::2] - losses[2::2]) / (2.0 * self.delta)
        return losses[0], grad


class AutogradStepper(Stepper):
    """backward() fills params.grad; zeroed every epoch, since gradients accumulate."""

    def __init__(self, params, lr):
        super().__init__(params, lr)
        self.params.requires_grad_(True)
        self.no_grad = torch.no_grad()  # one context object, entered every epoch

    def loss_and_gradient(self, x, y):
        self.params.grad = None  # zeroed as torch.optim's zero_grad does: dropped, refilled by backward
        loss = loss_fn(model(x, *self.params), y)
        loss.backward()
        return loss.detach(), self.params.grad

    def step(self, x, y):
        loss, grad = self.loss_and_gradient(x, y)
        with self.no_grad:  # the update is not part of the graph
            self.params -= self.lr * grad
        return loss


class OptimizerStepper(AutogradStepper):
    """A torch.optim optimizer owns the update (zero_grad, backward, step)."""

    def __init__(self, params, lr, optimizer: str):
        super().__init__(params, lr)
        self.optimizer = _optimizer_classes()[optimizer.lower()]([self.params], lr=lr)
        self.needs_closure = isinstance(self.optimizer, torch.optim.LBFGS)  # it evaluates the loss several times

    def _closure(self, x, y):
        self.optimizer.zero_grad()
        loss = loss_fn(model(x, *self.params), y)
        loss.backward()
        return loss

    def step(self, x, y):
        if self.needs_closure:
            return self.optimizer.step(lambda: self._closure(x, y)).detach()
        loss = self._closure(x, y)
        self.optimizer.step()
        return loss.detach()


STEPPERS = {
    "finite-difference": lambda params, lr, delta, optimizer: FiniteDifferenceStepper(params, lr, delta),
    "analytic": lambda params, lr, delta, optimizer: AnalyticStepper(params, lr),
    "autograd": lambda params, lr, delta, optimizer: AutogradStepper(params, lr),
    "optimizer": lambda params, lr, delta, optimizer: OptimizerStepper(params, lr, optimizer),
}


def make_stepper(strategy: str, params: torch.Tensor, lr: float, delta: float = 0.1, optimizer: str = "sgd") -> Stepper:
    """The stepper for `strategy`, starting from a copy of `params`."""
    return STEPPERS[strategy](params, lr, delta, optimizer)
