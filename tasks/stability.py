"""How large a learning rate gradient descent can take on a data set, known before training.

For a model linear in its parameters (the line, the polynomials) the MSE is a quadratic with the
Hessian H = 2 XᵀX / n of the design X on the training rows. Plain gradient descent at rate lr
multiplies the error along each eigenvector of H by (1 - lr λ) every epoch: it is stable only for
lr < 2 / λmax, fastest at lr = 2 / (λmax + λmin), and how many epochs it needs follows exactly from
the starting point, the optimum and the eigenvalues. The network is not quadratic; the same
analysis of its Gauss-Newton curvature (2 JᵀJ / n, J the Jacobian of its predictions) at the
starting parameters gives a rate that is stable there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tasks.models import Model, make_model
from tasks.normalize import Normalizer, fit_normalizer
from tasks.specs import default_lr

# the network's curvature grows as it fits: a quarter of the bound at its start stayed stable on
# the shipped readings where half of it (0.17 with z-scored readings) diverged
NETWORK_MARGIN = 0.25
SETTLED_GAP = 1e-6  # the relative excess over the optimum the default run aims for
# the strategies that take plain gradient-descent steps of size lr (so does optimizer sgd, whose
# default has no momentum)
PLAIN_STEPS = ("finite-difference", "analytic", "autograd")


@dataclass(frozen=True)
class Curvature:
    """The eigenvalues of the loss's Hessian, and the starting error along its eigenvectors."""

    eigenvalues: np.ndarray  # ascending
    start_error: np.ndarray | None = None  # (θ0 - θ*) in the eigenbasis; None for the network
    optimum_loss: float | None = None

    @property
    def bound(self) -> float:
        """The largest stable rate of plain gradient descent: 2 / λmax."""
        return 2.0 / float(self.eigenvalues[-1])

    @property
    def best_lr(self) -> float:
        """The rate that contracts the slowest direction fastest: 2 / (λmax + λmin), rounded down to 2 digits."""
        return _round_down(2.0 / float(self.eigenvalues[-1] + self.eigenvalues[0]))

    @property
    def condition(self) -> float:
        return float(self.eigenvalues[-1] / max(self.eigenvalues[0], 1e-300))

    def epochs_to_settle(self, lr: float, limit: int = 10**9) -> int | None:
        """Epochs until the loss is within SETTLED_GAP of the optimum; None when lr is unstable
        or `limit` epochs do not suffice."""
        if self.start_error is None:
            return None
        rates = np.abs(1.0 - lr * self.eigenvalues)
        weights = 0.5 * self.eigenvalues * self.start_error**2  # the excess loss along each direction at epoch 0
        target = SETTLED_GAP * max(self.optimum_loss, 1e-300)
        moving = weights > target * 1e-3
        if np.any(rates[moving] >= 1.0):
            return None
        excess = lambda epochs: float(np.sum(weights * rates ** (2 * epochs)))
        if excess(0) <= target:
            return 0
        if excess(limit) > target:
            return None
        low, high = 0, limit  # excess(low) > target >= excess(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if excess(middle) > target else (low, middle)
        return high


def _round_down(value: float) -> float:
    digits = 10 ** (math.floor(math.log10(value)) - 1)
    return round(math.floor(value / digits * (1 + 1e-9)) * digits, 12)  # 0.4999999999 -> 0.5, not 0.49


GRAM_ROWS = 1 << 20


def _hessian(design: np.ndarray) -> np.ndarray:
    design = np.asarray(design, dtype=np.float64)
    return 2.0 * (design.T @ design) / len(design)


def linear_curvature(model: Model, x: np.ndarray, y: np.ndarray) -> Curvature:
    """The exact curvature of a model linear in its parameters on normalized readings x and °C y."""
    design = model.design(model.features(torch.from_numpy(np.asarray(x, dtype=np.float64)))).numpy()
    eigenvalues, vectors = np.linalg.eigh(_hessian(design))
    theta, *_ = np.linalg.lstsq(design, y, rcond=None)
    start = model.initial(torch.Generator().manual_seed(0)).double().numpy()
    optimum = float(np.mean((design @ theta - y) ** 2))
    return Curvature(np.clip(eigenvalues, 0.0, None), vectors.T @ (start - theta), optimum)


def network_curvature(model: Model, x: np.ndarray, seed: int) -> Curvature:
    """The Gauss-Newton curvature of the network's MSE at its starting parameters."""
    theta = model.initial(torch.Generator().manual_seed(seed)).double()
    features = model.features(torch.from_numpy(np.asarray(x, dtype=np.float64)))
    jacobian = torch.func.jacrev(lambda t: model.forward(t, features))(theta).numpy()  # (n, P)
    return Curvature(np.clip(np.linalg.eigvalsh(_hessian(jacobian)), 0.0, None))


def curvature(spec: str, x: np.ndarray, y: np.ndarray, seed: int) -> Curvature:
    """The curvature of `spec`'s loss on normalized training readings x and their °C y."""
    model = make_model(spec).fit(x)
    return linear_curvature(model, x, y) if model.linear_in_params else network_curvature(model, x, seed)


def _lr(value: float) -> str:
    return f"{value:.2g}"


def lr_warning(model: Model, features: torch.Tensor, lr: float) -> str | None:
    """A warning when `lr` exceeds the stable bound of plain gradient descent for a model linear
    in its parameters on these features (the training rows, as the model reads them); else None."""
    if not model.linear_in_params:
        return None
    # the Hessian 2 X^T X / n summed over slices of rows: a float64 design of 10 million rows would add 160 MB
    gram = sum(_hessian(model.design(part.double()).numpy()) * len(part) for part in features.split(GRAM_ROWS))
    largest = float(np.linalg.eigvalsh(gram / len(features))[-1])
    if lr < 2.0 / largest:
        return None
    return (f"--lr {lr:g} exceeds {_lr(2.0 / largest)}, the largest stable learning rate of plain gradient descent for "
            f"{model.spec} on these readings (2 / the largest eigenvalue {largest:.4g} of the loss's Hessian): "
            "expect the loss to diverge")


def advice(spec: str, raw: np.ndarray, y: np.ndarray, normalizer: Normalizer, seed: int, epochs: int,
           all_raw: np.ndarray | None = None) -> str:
    """What to change when training diverged: the stable bound, a rate that converges within the
    epoch budget (or how many epochs the best one needs), and what --normalize standard allows.
    `raw` and `y` are the training rows; `normalizer` the run's; `all_raw` every reading (what
    --normalize standard would be fitted on)."""
    found = curvature(spec, normalizer.apply64(raw), y, seed)
    if found.start_error is None:  # the network: only its curvature at the start is known
        text = (f"At its starting parameters the network's loss allows plain gradient descent up to lr {_lr(found.bound)} "
                f"(2 / the largest eigenvalue of its Gauss-Newton curvature); as training sharpens the curvature, "
                f"--lr {_lr(found.bound * NETWORK_MARGIN)} stays stable.")
    else:
        best = found.best_lr
        needed = found.epochs_to_settle(best)
        text = f"On these readings plain gradient descent is stable only below lr {_lr(found.bound)} (2 / the largest eigenvalue of the loss's Hessian)"
        if needed is not None and needed <= epochs:
            text += f"; --lr {best:g} reaches the optimum in about {_epochs(needed)}."
        else:
            more = f"about {_epochs(needed)} (--epochs {needed})" if needed is not None else "more epochs than can be counted"
            text += (f"; no learning rate converges within {epochs} epochs here (condition number {found.condition:.2g}): "
                     f"the best, --lr {best:g}, needs {more}.")
    z_scores = fit_normalizer(raw if all_raw is None else all_raw, "standard")
    standard = curvature(spec, z_scores.apply64(raw), y, seed) if normalizer.method != "standard" else found
    if standard.bound > 1.5 * found.bound:  # z-scored readings help only where the scale of the readings matters
        if standard.start_error is None:
            text += f" With --normalize standard it is stable up to lr {_lr(standard.bound)}; try --lr {_lr(standard.bound * NETWORK_MARGIN)}."
        else:
            rate = default_lr(spec, "standard") if default_lr(spec, "standard") < standard.bound else standard.best_lr
            text += (f" With --normalize standard it is stable up to lr {_lr(standard.bound)}, and --lr {rate:g} reaches the "
                     f"optimum in about {_epochs(standard.epochs_to_settle(rate))}.")
    return text


def slow_advice(spec: str, raw: np.ndarray, y: np.ndarray, normalizer: Normalizer, lr: float) -> str:
    """What to change when training stopped short of the optimum (a model linear in its
    parameters): the epochs this learning rate needs, a faster one, and --normalize standard."""
    found = curvature(spec, normalizer.apply64(raw), y, 0)
    if found.start_error is None:
        return ""
    parts = []
    needed = found.epochs_to_settle(lr)
    if needed is not None:
        parts.append(f"at --lr {lr:g} it needs about {_epochs(needed)} (--epochs {needed})")
    best = found.best_lr
    if best > 1.5 * lr:
        parts.append(f"--lr {best:g} (stable up to {_lr(found.bound)}) reaches it in about {_epochs(found.epochs_to_settle(best))}")
    if normalizer.method != "standard":
        standard = curvature(spec, fit_normalizer(raw, "standard").apply64(raw), y, 0)  # the training rows' z-scores
        if standard.bound > 1.5 * found.bound:
            rate = default_lr(spec, "standard") if default_lr(spec, "standard") < standard.bound else standard.best_lr
            parts.append(f"with --normalize standard, --lr {rate:g} reaches it in about {_epochs(standard.epochs_to_settle(rate))}")
    return "; ".join(parts)


def _epochs(count: int | None) -> str:
    return "an unknown number of epochs" if count is None else f"{count} epoch{'s' if count != 1 else ''}"
