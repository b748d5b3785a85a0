"""The loss of a model on fixed data, in the forms the strategies use every epoch (training only).

`Model.objective(f, y)` (tasks.models) gives one: models linear in their parameters share the
least-squares derivation (LeastSquares), any other model gets the generic Objective over its own
forward and hand-derived gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tasks.models import Model

# mean((pred - y)^2) as one operation, one node of autograd's graph: the function F.mse_loss calls
# once it has checked its arguments, which costs about 12 µs a call here (a third of an autograd
# step on a few rows); the arguments here are always two float tensors of one shape
_mse_loss = torch._C._nn.mse_loss
_MEAN = 1  # torch's reduction code for "mean" (torch.nn._reduction.get_enum("mean"))


class Objective:
    """mean((forward(theta, f) - y)^2) on fixed data, in the forms the strategies use every epoch.

    Built once per data set (the training rows, the validation rows, a mini-batch): on a few rows
    each torch call costs microseconds whatever its size, so what depends only on the data is
    computed here, not in the loop.
    """

    def __init__(self, model: Model, f: torch.Tensor, y: torch.Tensor):
        self.model, self.f, self.y = model, f, y

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        """The loss at theta (P,), through the model's forward (differentiable: autograd, torch.optim)."""
        return _mse_loss(self.model.forward(theta, self.f), self.y, _MEAN)

    def losses(self, thetas: torch.Tensor) -> torch.Tensor:
        """The losses at B points at once, thetas (B, P) -> (B,), in one batched forward."""
        residual = self.model.forward(thetas, self.f) - self.y
        return (residual * residual).mean(dim=1)

    def loss_and_gradient(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and the model's hand-derived gradient at theta."""
        return self.model.loss_and_gradient(theta, self.f, self.y)

    def descend(self, theta: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss at theta and the next point theta - lr * gradient (a new tensor; theta is untouched)."""
        loss, grad = self.loss_and_gradient(theta)
        return loss, torch.sub(theta, grad, alpha=lr)


class LeastSquares(Objective):
    """The MSE of a model linear in its parameters: forward = X theta with X = model.design(f).

    The residual r = X theta - y is one matrix-vector product (y negated once, which is exact), the
    loss r.r / n one dot product, and the hand-derived gradient 2/n X^T r (for the line, X = [x, 1]:
    dL/dw = 2/n sum(r x), dL/db = 2/n sum(r)) one more with 2/n X^T formed once; a step
    theta - lr * 2/n X^T r is that product with the update fused in. (Scaling X and y by 1/sqrt(n)
    instead would save the division but round y: a loss near a perfect fit then loses digits.)
    """

    def __init__(self, model: Model, f: torch.Tensor, y: torch.Tensor):
        super().__init__(model, f, y)
        self.design = model.design(f).contiguous()  # (n, P)
        self.neg_y = -y
        self.n = torch.tensor(float(len(y)), dtype=y.dtype)  # a tensor: dividing by a Python number costs more
        self.gradient_map = (self.design.T * (2.0 / len(y))).contiguous()  # 2/n X^T, (P, n)
        self._design_t = None

    def _residual(self, theta):
        return torch.addmv(self.neg_y, self.design, theta)  # X theta - y, shape (n,)

    def loss(self, theta):
        # for autograd: X theta and the mean of squares, two nodes to differentiate (the residual and
        # its dot product divided by n would be three)
        return _mse_loss(torch.mv(self.design, theta), self.y, _MEAN)

    def losses(self, thetas):
        if thetas.ndim == 2:  # (B, P): -y + thetas X^T, the product and the sum in one call
            if self._design_t is None:
                self._design_t = self.design.T.contiguous()  # (P, n), formed on first use
            residual = torch.addmm(self.neg_y, thetas, self._design_t)
        else:
            residual = self.model.forward(thetas, self.design) + self.neg_y  # (..., n)
        return torch.linalg.vecdot(residual, residual) / self.n

    def loss_and_gradient(self, theta):
        residual = self._residual(theta)
        return torch.dot(residual, residual) / self.n, torch.mv(self.gradient_map, residual)

    def descend(self, theta, lr):
        residual = self._residual(theta)
        return torch.dot(residual, residual) / self.n, torch.addmv(theta, self.gradient_map, residual, alpha=-lr)
