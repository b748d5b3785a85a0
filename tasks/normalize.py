"""Normalization of the readings as an affine map x_n = (x - shift) * factor, and its inverse."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tasks.errors import InvalidInput


@dataclass(frozen=True)
class Normalizer:
    """The statistics of a normalization; data, so it persists and reloads as a dict."""

    method: str
    shift: float = 0.0
    factor: float = 1.0

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Raw readings -> what the model sees (float32, as the seed's tensors)."""
        return self.apply64(x).astype(np.float32)

    def apply64(self, x: np.ndarray) -> np.ndarray:
        """The same in float64, for least squares and inference."""
        out = np.asarray(x, dtype=np.float64) - self.shift  # a new array, scaled in place: one n-row temporary, not two
        out *= self.factor
        return out

    def invert(self, x_n: np.ndarray) -> np.ndarray:
        """What the model sees -> raw readings."""
        return np.asarray(x_n, dtype=np.float64) / self.factor + self.shift

    def to_dict(self) -> dict:
        return asdict(self)


def fit_normalizer(x: np.ndarray, method: str, scale: float = 0.1) -> Normalizer:
    """Statistics of `method` on the readings `x`: none, scale (x * scale) or standard (z-score)."""
    if method == "none":
        return Normalizer("none")
    if method == "scale":
        return Normalizer("scale", 0.0, float(scale))
    if method == "standard":
        x = np.asarray(x, dtype=np.float64)
        std = float(x.std())  # population std (ddof=0): the z-scored readings have variance exactly 1
        if not std > 0:
            raise InvalidInput(
                f"--normalize standard needs readings that vary; every reading is {x[0]:g}. "
                "A calibration needs at least two different readings."
            )
        return Normalizer("standard", float(x.mean()), 1.0 / std)
    raise InvalidInput(f"unknown normalization {method!r}; choose none, scale or standard")
