"""A fleet's rows as per-sensor arrays, for tasks.fleet: grouped by sensor, split, padded to a
batch; each sensor's normalizer statistics and polynomial basis; the maps from its parameters to
raw-unit coefficients; every row through its own sensor's calibration.

Plain numpy, vectorized over sensors: the loops here run over the distinct row counts of a
partition (one split each), a polynomial's degree, or slices of rows, never over sensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tasks.models import Model, orthonormal_basis
from tasks.split import split_indices
from tasks.uncertainty import SLICE_ROWS


@dataclass(frozen=True)
class Rows:
    """Rows grouped by sensor: sensor s's rows, in file order, are order[starts[s] : starts[s] + counts[s]]."""

    order: np.ndarray  # (N,) row positions sorted by sensor, stable: file order within a sensor
    counts: np.ndarray  # (S,) int64
    starts: np.ndarray  # (S,) int64


def group_rows(codes: np.ndarray, sensors: int) -> Rows:
    """Group rows by their sensor code (0..sensors - 1)."""
    # numpy sorts 16-bit integers by radix: 6 times faster than 32-bit ones on a million rows
    keys = codes.astype(np.uint16) if sensors <= np.iinfo(np.uint16).max + 1 else codes
    counts = np.bincount(codes, minlength=sensors).astype(np.int64)
    return Rows(np.argsort(keys, kind="stable"), counts, np.cumsum(counts) - counts)


def never_vary(readings: np.ndarray, codes: np.ndarray, rows: Rows) -> np.ndarray:
    """(S,) bool: every reading of the sensor equals its first (or it has none). Compared exactly,
    as ingest's check that the readings' min < max: the standard deviation of equal readings can
    round to a tiny positive number (3.6e-15 for ten readings of 25.3)."""
    first = np.zeros(len(rows.counts))
    some = rows.counts > 0
    first[some] = readings[rows.order[rows.starts[some]]]
    return np.bincount(codes, readings != first[codes], minlength=len(first)) == 0


def normalizer_stats(readings: np.ndarray, codes: np.ndarray, counts: np.ndarray, method: str,
                     scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Each sensor's fit_normalizer (tasks.normalize) on all its readings, as (shift, factor)
    arrays (S,): standard is its mean and 1 / its population standard deviation, two-pass as numpy's."""
    S = len(counts)
    if method == "none":
        return np.zeros(S), np.ones(S)
    if method == "scale":
        return np.zeros(S), np.full(S, float(scale))
    with np.errstate(invalid="ignore", divide="ignore"):  # sensors without rows or without spread: failed before use
        mean = np.bincount(codes, readings, minlength=S) / counts
        centred = readings - mean[codes]
        std = np.sqrt(np.bincount(codes, centred * centred, minlength=S) / counts)
        return mean, 1.0 / std


def split_positions(counts: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each sensor's split_indices(count, val_fraction, seed): its training and validation rows as
    positions among its own rows, (S, m) and (S, v) int64 padded with -1. The permutation depends
    on the row count alone, so it is drawn once per distinct count, not once per sensor."""
    distinct, which = np.unique(counts, return_inverse=True)
    splits = [split_indices(int(n), val_fraction, seed) for n in distinct]
    train = np.full((len(counts), max((len(t) for t, _ in splits), default=0)), -1, dtype=np.int64)
    val = np.full((len(counts), max((len(v) for _, v in splits), default=0)), -1, dtype=np.int64)
    for k, (t, v) in enumerate(splits):
        members = which == k
        train[members, : len(t)] = t
        val[members, : len(v)] = v
    return train, val


def gather(rows: Rows, sensors: np.ndarray, positions: np.ndarray, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """The (B, m) mask of real rows (positions -1 pad), and each column's values at the given
    positions among each sensor's own rows, (B, m) float64, 0 in the padding."""
    mask = positions >= 0
    index = rows.starts[sensors, None] + positions
    index[~mask] = 0
    np.take(rows.order, index, out=index)
    gathered = tuple(np.take(column, index) for column in columns)
    for values in gathered:  # in place: every new (B, m) array is a fresh mapping (tasks.store.limit_heap_retention)
        values[~mask] = 0.0
    return mask, *gathered


def distinct_at_least(values: np.ndarray, mask: np.ndarray, need: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a padded batch: whether its real values hold at least `need` different numbers,
    and how many they hold (capped at 2 when need <= 2, where comparing with the first suffices)."""
    if need <= 2:
        count = 1 + (mask & (values != values[:, :1])).any(axis=1)
        return count >= need, count
    ordered = np.sort(np.where(mask, values, np.inf), axis=1)
    with np.errstate(invalid="ignore"):  # inf - inf, between padding
        count = 1 + ((np.diff(ordered, axis=1) > 0) & np.isfinite(ordered[:, 1:])).sum(axis=1)
    return count >= need, count


def fit_bases(x: np.ndarray, mask: np.ndarray, degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Poly.fit (tasks.models) for every sensor at once: the recurrence's constants alpha, beta
    (B, degree) from each sensor's normalized training readings x (B, m), padding masked out."""
    weights = mask / mask.sum(axis=1, keepdims=True)  # each sensor's mean as one weighted sum
    alpha, beta = np.zeros((len(x), degree)), np.ones((len(x), degree + 1))
    previous, current = np.zeros_like(x), np.ones_like(x)
    for k in range(degree):
        alpha[:, k] = (weights * x * current * current).sum(axis=1)
        following = (x - alpha[:, k, None]) * current - (beta[:, k, None] if k else 0.0) * previous
        beta[:, k + 1] = np.sqrt((weights * following * following).sum(axis=1))
        previous, current = current, following / beta[:, k + 1, None]
    return alpha, beta[:, 1:]


def basis_values(x: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """P_0 ... P_K at x (..., n) with each leading index's constants alpha, beta (..., K): (..., n, K + 1)."""
    return np.stack(orthonormal_basis(x, np.ones_like(x), np.zeros_like(x), np.moveaxis(alpha[..., None], -2, 0),
                                      np.moveaxis(beta[..., None], -2, 0)), axis=-1)


def design_values(model: Model, x: np.ndarray, alpha: np.ndarray | None, beta: np.ndarray | None,
                  sensors=slice(None)) -> np.ndarray:
    """The design matrices (B, n, P) of normalized readings x (B, n) of a model linear in its
    parameters, the polynomial's with the basis constants alpha[sensors], beta[sensors] (B, K)."""
    return basis_values(x, alpha[sensors], beta[sensors]) if model.kind == "poly" else model.design(x)


def raw_maps(model: Model, shift: np.ndarray, factor: np.ndarray, alpha: np.ndarray | None,
             beta: np.ndarray | None) -> np.ndarray:
    """(S, P, P) maps A with each sensor's raw-unit coefficients theta @ A[s] (ascending powers of
    the raw reading), for a model linear in its parameters: its raw_coefficients for every sensor."""
    S = len(shift)
    if model.kind == "linear":  # theta = (w, b): w multiplies x, b a constant
        in_x = np.broadcast_to(np.array([[0.0, 1.0], [1.0, 0.0]]), (S, 2, 2))
    else:  # the basis' recurrence on coefficient arrays: in_x[s, k, j] is x^j's coefficient in P_k
        K = model.degree
        in_x = np.zeros((S, K + 1, K + 1))
        in_x[:, 0, 0] = 1.0
        for k in range(K):
            times_x = np.roll(in_x[:, k], 1, axis=1)  # x * P_k: powers up by one (the top one is 0 below degree K)
            following = times_x - alpha[:, k, None] * in_x[:, k] - (beta[:, k - 1, None] * in_x[:, k - 1] if k else 0.0)
            in_x[:, k + 1] = following / beta[:, k, None]
    # x = (reading - shift) * factor, so x^j = factor^j sum_i C(j, i) reading^i (-shift)^(j - i)
    powers = in_x.shape[2]
    to_raw = np.zeros((S, powers, powers))
    for j in range(powers):
        for i in range(j + 1):
            to_raw[:, j, i] = math.comb(j, i) * factor**j * (-shift) ** (j - i)
    return in_x @ to_raw


def forward_rows(model: Model, trained: dict, readings: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Every row through its own sensor's calibration, in float64 (NaN for failed sensors): the
    model's forward with one parameter row per reading, in slices of rows whose gathered parameters
    and the network's hidden layer hold about SLICE_ROWS numbers."""
    params, shift, factor = trained["params"].astype(np.float64), trained["shift"], trained["factor"]
    alpha, beta = trained.get("alpha"), trained.get("beta")
    rows = max(1, SLICE_ROWS // (model.size + model.width))
    out = np.empty(len(readings))
    for start in range(0, len(readings), rows):
        part = slice(start, start + rows)
        c = codes[part]
        x = (readings[part] - shift[c]) * factor[c]
        # each reading a data set of one row, (n, 1): a one-row design matrix for the models linear in their parameters
        features = design_values(model, x[:, None], alpha, beta, c) if model.linear_in_params else x[:, None]
        out[part] = model.forward(params[c], features)[:, 0]
    return out
