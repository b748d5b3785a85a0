"""The model families: `linear` (the seed's line), `poly:K` (orthonormal polynomials), `mlp:H` (the book's network).

Every model offers the same few verbs, so the strategies, the training loop, validation, inference
and the tests work on any of them (the registry MODELS, like STEPPERS for strategies):

- `fit(x)`: constants taken from the training rows' normalized readings (the polynomial basis);
- `features(x)`: what `forward` reads, computed once per data set (readings, or basis values);
- `forward(theta, f)`: predictions; theta is every parameter packed into one vector, shape (P,)
  for one model or (B, P) for B models at once (finite differences, bootstraps, fleets), giving
  (n,) or (B, n). The features are shared by every model, or per model with leading dimensions
  that broadcast against theta's ((B, n) readings or (B, n, P) design matrices for theta (B, P);
  finite differences of B models pass (B, 1, ...) against points (B, 2P + 1, P));
- `loss_and_gradient(theta, f, y)`: the MSE and its hand-derived gradient;
- `objective(f, y)`: that loss on fixed data as training evaluates it every epoch
  (tasks.objectives), with what depends only on the data computed once;
- `weighted_loss_and_gradient(theta, f, y, weights)` / `batched_objective(f, y, weights)`: the
  same for B models at once, each with its own weighted mean of squared residuals (tasks.batched);
- `initial(generator)`: starting parameters, drawn from the run's own generator where random;
- `unpack(theta)` / `pack(arrays)`: named arrays as a state_dict holds them, and back;
- `design(f)` (models linear in their parameters): the matrix X with forward = X @ theta, for least squares
  ((n, P), or (B, n, P) for per-model features);
- `feature_ndim`: the dimensions of one data set's features ((n,) readings: 1, (n, K + 1) basis values:
  2), so that a leading model dimension can be told apart;
- `raw_coefficients(theta, normalizer)`: °C = sum(c_i reading^i) in raw units (None for the network).
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

import numpy as np

from tasks.errors import InvalidInput
from tasks.specs import AUTO_LR, parse_spec

if TYPE_CHECKING:
    import torch

    from tasks.objectives import Objective

def _xp(array):
    """numpy for a numpy array, torch for a tensor. `features` and `forward` are written once for
    both, so a command that only evaluates a calibration (`thermocal predict`) needs no torch;
    training, validation and the infer stage pass tensors."""
    return np if isinstance(array, np.ndarray) else sys.modules["torch"]


class Model:
    """The interface every model family implements (see the module docstring)."""

    kind: str
    spec: str
    linear_in_params = False
    random_start = False  # initial(generator) draws from the generator (otherwise it takes None)
    feature_ndim = 1  # features of one data set are (n,) readings; Poly's basis values are (n, K + 1)
    # the learning rate of plain gradient descent when --lr is not given, by normalization
    AUTO_LR: dict[str, float]
    names: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]

    @property
    def size(self) -> int:
        return sum(math.prod(self.shapes[name]) for name in self.names)

    @property
    def width(self) -> int:
        """Numbers `forward` makes per row and parameter point (bounds finite differences' memory)."""
        return 1

    def fit(self, x: np.ndarray) -> Model:
        return self

    def buffers(self) -> dict[str, np.ndarray]:
        return {}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def design(self, f: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.spec} is not linear in its parameters")

    def objective(self, f: torch.Tensor, y: torch.Tensor) -> Objective:
        from tasks.objectives import LeastSquares, Objective  # training only: it needs torch

        return LeastSquares(self, f, y) if self.linear_in_params else Objective(self, f, y)

    def loss_and_gradient(self, theta: torch.Tensor, f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # models linear in their parameters share one derivation (LeastSquares); others derive their own
        return self.objective(f, y).loss_and_gradient(theta)

    def batched_objective(self, f: torch.Tensor, y: torch.Tensor, weights: torch.Tensor):
        """The weighted losses of B models at once (tasks.batched): f and y shared or per model, weights (B, n)
        summing to 1 per model."""
        from tasks.batched_steps import WeightedLeastSquares, WeightedObjective  # training only: it needs torch

        return WeightedLeastSquares(self, f, y, weights) if self.linear_in_params else WeightedObjective(self, f, y, weights)

    def weighted_loss_and_gradient(self, theta: torch.Tensor, f: torch.Tensor, y: torch.Tensor,
                                   weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Losses (B,) and hand-derived gradients (B, P) of B models theta (B, P): model b's loss is
        sum_i weights[b, i] * r_bi^2, its weights (B, n) summing to 1 (row multiplicities over their
        total: the weighted mean). Models linear in their parameters share one derivation
        (tasks.batched.WeightedLeastSquares); others derive their own."""
        return self.batched_objective(f, y, weights).loss_and_gradient(theta)

    def unpack(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        arrays, start = {}, 0
        for name in self.names:
            count = math.prod(self.shapes[name])
            arrays[name] = np.asarray(theta[start : start + count]).reshape(self.shapes[name]).copy()
            start += count
        return arrays

    def pack(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([np.asarray(arrays[name]).reshape(-1) for name in self.names])

    def raw_coefficients(self, theta: np.ndarray, normalizer) -> list[float] | None:
        return None


class Linear(Model):
    """The seed's line w * x + b on the normalized reading, from its start w = 1, b = 0."""

    kind = spec = "linear"
    linear_in_params = True
    AUTO_LR = AUTO_LR["linear"]
    names = ("w", "b")
    shapes = {"w": (), "b": ()}

    def __init__(self, size: int = 1):
        pass  # the line has one size; the argument keeps every family's constructor alike

    def forward(self, theta, x):
        """x: the readings (n,), or their design matrix (n, 2) (rows [x_i, 1]), which training uses,
        or per model (B, n, 2). Per-model readings (B, n) go through their design matrix: as 2-D
        arrays they could not be told from one data set's design matrix."""
        if x.ndim >= 2:
            return _design_forward(theta, x)
        if theta.ndim == 1:
            w, b = theta
            return w * x + b
        return theta[..., :1] * x + theta[..., 1:]

    def initial(self, generator=None):
        import torch

        return torch.tensor([1.0, 0.0])

    def design(self, x):
        xp = _xp(x)
        return xp.stack([x, xp.ones_like(x)], axis=-1)  # (n, 2), or (B, n, 2) for per-model readings (B, n)

    def raw_coefficients(self, theta, normalizer):
        w, b = (float(v) for v in theta)
        slope = w * normalizer.factor
        return [b - slope * normalizer.shift, slope]


class Poly(Model):
    """c_0 P_0(x) + ... + c_K P_K(x): polynomials of degree K in the normalized reading x, in the
    basis of polynomials orthonormal on the training rows (mean(P_i P_j) = 1 if i = j, else 0).

    In that basis the MSE's Hessian is exactly 2 I whatever the readings' scale, so plain gradient
    descent at lr 0.5 is a Newton step; monomials x^k of the same readings are ill-conditioned as K
    grows (on raw 100-250 ohm readings, cond(X^T X) passes 1e20 at K = 3). The basis is the
    three-term (Stieltjes) recurrence P_{k+1} = ((x - alpha_k) P_k - beta_k P_{k-1}) / beta_{k+1},
    P_0 = 1, its constants fitted in float64 and kept with the model; the coefficients in powers
    of the raw reading are derived from it for the user.
    """

    kind = "poly"
    linear_in_params = True
    feature_ndim = 2
    names = ("c",)
    AUTO_LR = AUTO_LR["poly"]

    def __init__(self, degree: int, alpha=None, beta=None):
        self.degree = degree
        self.spec = f"poly:{degree}"
        self.shapes = {"c": (degree + 1,)}
        self.alpha = None if alpha is None else np.asarray(alpha, dtype=np.float64)
        self.beta = None if beta is None else np.asarray(beta, dtype=np.float64)

    def fit(self, x):
        x = np.asarray(x, dtype=np.float64)
        distinct = len(np.unique(x))
        if distinct <= self.degree:
            raise InvalidInput(
                f"--model {self.spec} has {self.degree + 1} coefficients, but the training rows hold only {distinct} "
                f"different reading(s); use a lower degree, or more readings"
            )
        alpha, beta = np.zeros(self.degree), np.zeros(self.degree + 1)
        previous, current = np.zeros_like(x), np.ones_like(x)
        for k in range(self.degree):
            alpha[k] = np.mean(x * current * current)
            following = (x - alpha[k]) * current - beta[k] * previous
            beta[k + 1] = math.sqrt(np.mean(following * following))
            previous, current = current, following / beta[k + 1]
        return Poly(self.degree, alpha, beta[1:])

    def buffers(self):
        return {"alpha": self.alpha, "beta": self.beta}

    def _basis(self, x, one, zero) -> list:
        """P_0 ... P_K by the recurrence, for x of any type with arithmetic: a tensor of readings, or
        numpy's Polynomial of x itself (which gives each P_k's coefficients in powers of x)."""
        return orthonormal_basis(x, one, zero, [float(a) for a in self.alpha], [float(b) for b in self.beta])

    def features(self, x):
        """P_0(x) ... P_K(x) as columns, shape (n, K + 1) (or (B, n, K + 1) for readings (B, n)), in x's dtype."""
        xp = _xp(x)
        return xp.stack(self._basis(x, xp.ones_like(x), xp.zeros_like(x)), axis=-1)

    def design(self, f):
        return f

    def forward(self, theta, f):
        return _design_forward(theta, f)

    def initial(self, generator=None):
        import torch

        return torch.zeros(self.degree + 1)

    def raw_coefficients(self, theta, normalizer):
        P = np.polynomial.Polynomial
        in_x = sum((float(c) * p for c, p in zip(theta, self._basis(P([0.0, 1.0]), P([1.0]), P([0.0])))), P([0.0]))
        # x = (reading - shift) * factor
        raw = in_x(np.polynomial.Polynomial([-normalizer.shift * normalizer.factor, normalizer.factor]))
        coefficients = [float(c) for c in raw.coef] + [0.0] * (self.degree + 1 - len(raw.coef))
        return coefficients[: self.degree + 1]


class MLP(Model):
    """nn.Sequential(nn.Linear(1, H), nn.Tanh(), nn.Linear(H, 1)) as plain tensors; its parameters
    carry the state_dict's names, so `net.load_state_dict` takes them as they are."""

    kind = "mlp"
    random_start = True
    names = ("0.weight", "0.bias", "2.weight", "2.bias")
    AUTO_LR = AUTO_LR["mlp"]

    def __init__(self, hidden: int):
        self.hidden = hidden
        self.spec = f"mlp:{hidden}"
        self.shapes = {"0.weight": (hidden, 1), "0.bias": (hidden,), "2.weight": (1, hidden), "2.bias": (1,)}

    @property
    def width(self) -> int:
        return self.hidden

    def _split(self, theta):
        H = self.hidden
        return theta[..., :H], theta[..., H : 2 * H], theta[..., 2 * H : 3 * H], theta[..., 3 * H :]

    def forward(self, theta, x):
        w1, b1, w2, b2 = self._split(theta)
        xp = _xp(theta)
        if theta.ndim == 1:
            hidden = xp.tanh(xp.outer(x, w1) + b1)  # (n, H)
            return hidden @ w2 + b2
        # theta (B, P) on readings (n,) or (B, n) -> (B, n, H); any leading dimensions that broadcast
        hidden = xp.tanh(x[..., None] * w1[..., None, :] + b1[..., None, :])
        if xp is np:  # numpy's matmul sums in another order than its einsum, which inference has always used
            return xp.einsum("...nh,...h->...n", hidden, w2) + b2
        return (hidden @ w2[..., None])[..., 0] + b2  # torch: einsum("bnh,bh->bn")'s numbers, at a fraction of its overhead

    def loss_and_gradient(self, theta, x, y):
        import torch

        w1, b1, w2, b2 = self._split(theta)
        z = torch.outer(x, w1) + b1  # (n, H)
        hidden = torch.tanh(z)
        pred = hidden @ w2 + b2  # (n,)
        d_pred = (pred - y) * (2.0 / len(y))  # dL/dpred of the mean of squares
        d_hidden = torch.outer(d_pred, w2)  # (n, H): through the second layer's weights
        d_z = d_hidden * (1.0 - hidden * hidden)  # tanh'(z) = 1 - tanh(z)^2
        grad = torch.cat([x @ d_z, d_z.sum(0), d_pred @ hidden, d_pred.sum().reshape(1)])
        return ((pred - y) ** 2).mean(), grad

    def weighted_loss_and_gradient(self, theta, x, y, weights):
        """loss_and_gradient's derivation for B networks theta (B, P) at once, each on its weighted
        mean (weights (B, n) summing to 1 per model); x and y are (n,) shared or (B, n) per model.
        Few operations, fused where torch offers it: on a few rows each costs about the same whatever its size."""
        import torch

        w1, b1, w2, b2 = self._split(theta)  # (B, H), (B, H), (B, H), (B, 1)
        hidden = torch.addcmul(b1[:, None, :], x[..., None], w1[:, None, :]).tanh_()  # (B, n, H)
        # products summed over the hidden units or the rows, not batched matrix products: on B tiny
        # matrices those cost more (measured 5-40 % of the whole, with B = 100, n = 9, H = 13)
        residual = (hidden * w2[:, None, :]).sum(2) + (b2 - y)  # (B, n)
        weighted = weights * residual
        d_pred = weighted + weighted  # dL/dpred of sum(w r^2): 2 w r (doubling is exact)
        d_hidden = d_pred[..., None] * w2[:, None, :]  # (B, n, H): back through the second layer's weights
        d_z = torch.addcmul(d_hidden, d_hidden * hidden, hidden, value=-1.0)  # tanh'(z) = 1 - tanh(z)^2
        grad = torch.cat([(x[..., None] * d_z).sum(1), d_z.sum(1), (d_pred[..., None] * hidden).sum(1), d_pred.sum(1, keepdim=True)],
                         dim=1)
        return torch.linalg.vecdot(weighted, residual), grad

    def initial(self, generator=None):
        """nn.Linear's default ranges: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in 1 then H; drawn
        from `generator` so the same seed gives the same start on any machine, in any process."""
        import torch

        H = self.hidden
        bounds = torch.cat([torch.ones(2 * H), torch.full((H + 1,), 1.0 / math.sqrt(H))])
        return (torch.rand(3 * H + 1, generator=generator) * 2.0 - 1.0) * bounds


def orthonormal_basis(x, one, zero, alpha, beta) -> list:
    """Poly's P_0 ... P_K of x by the three-term recurrence with the constants alpha[k], beta[k]
    (K of each): numbers (one fitted model), or arrays broadcasting against x (a fleet's rows, each
    with its own sensor's constants, tasks.fleet)."""
    basis, previous = [one], zero
    for k in range(len(alpha)):
        beta_k = beta[k - 1] if k > 0 else 0.0
        following = ((x - alpha[k]) * basis[-1] - beta_k * previous) / beta[k]
        previous = basis[-1]
        basis.append(following)
    return basis


def _design_forward(theta, X):
    """X @ theta for models linear in their parameters: one design matrix X (n, P) for theta (P,)
    or (..., P) -> (..., n), or per-model ones (B, n, P) (leading dimensions broadcasting against
    theta's) -> (B, n). The first two are the products single-model training has always used."""
    if theta.ndim == 1:
        return X @ theta
    if X.ndim == 2:
        return theta @ X.T
    return (X @ theta[..., None])[..., 0]


def make_model(spec: str) -> Model:
    """An unfitted model of the family `spec` names."""
    kind, size = parse_spec(spec)
    return MODELS[kind](size)


def load_model(spec: str, buffers: dict | None = None) -> Model:
    """A model as persisted: its spec and its fitted constants."""
    model = make_model(spec)
    return Poly(model.degree, **buffers) if isinstance(model, Poly) else model


MODELS = {"linear": Linear, "poly": Poly, "mlp": MLP}
# one of each family the tests run over (gradient agreement, inference, persistence)
EXAMPLE_SPECS = ("linear", "poly:1", "poly:2", "poly:3", "poly:4", "poly:5", "mlp:1", "mlp:13")
