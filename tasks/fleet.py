"""Calibrating a fleet of sensors: every sensor gets what a single-sensor run on its own rows gets
(tasks.stages.train_calibration: its own normalization of all its readings, its own seeded split,
its polynomial basis from its training rows, the same start, stopping rules and analytic
uncertainty), while all the sensors of a partition train in one train_batched call (tasks.batched),
their ragged rows padded with weight 0. Plain functions: the Prefect tasks and the CLI wrap them.

A fleet is cut into partitions by a stable hash of the sensor ids (`partition_of`); each is trained
by `train_sensors` into plain data, which `validate_sensors`, `infer_sensors` and
`fleet_calibration` read without retraining. A sensor that cannot be calibrated (too few rows,
readings that never vary, a diverging loss) is listed with the reason, not raised: one broken
logger should not stop a fleet of ten thousand.

`train_sensors` returns (arrays are per sensor, in the order of `sensors`, unless said otherwise):

    sensors        list[str], S ids
    spec           the model spec (settings.model); normalize: the normalization method
    calibrated     (S,) bool
    params         (S, P) float32: each sensor's packed parameters on its normalized readings; NaN rows if failed
    shift, factor  (S,) float64: each sensor's Normalizer (x = (reading - shift) * factor)
    range          (S, 2) float64: its lowest and highest training reading
    alpha, beta    (S, K) float64: poly:K's basis constants per sensor (only for poly)
                   (params, shift, factor, range, alpha, beta: NaN for failed sensors)
    uncertainty    linear and poly: analytic_uncertainty's fields as arrays (residual_sd, dof, t95 (S,);
                   gram_inverse, covariance_theta (S, P, P); NaN where undefined); None for mlp (no bootstrap)
    epochs_run     (S,) int64: 0 for sensors that never trained
    stopped_by     list[str | None]: "epochs", "tol", "validation", "diverged"; None if never trained
    train_loss     (S,) float32: each sensor's last training loss (before its last update, as TrainResult's)
    is_validation  (N,) bool, per row in the order given: the split (a sensor too small to split: all False)
    failed         list of {"sensor": id, "reason": a sentence naming the cause}
    seconds        wall time of the one train_batched call: the only field that is not a function of the inputs

Columns rather than a record per sensor: validation and inference read them as arrays for
thousands of sensors at once; `fleet_calibration` gives one sensor's Calibration (and its record).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tasks.calibration import Calibration
from tasks.errors import InvalidInput
from tasks.fleet_arrays import (basis_values, design_values, distinct_at_least, fit_bases, forward_rows, gather, group_rows,
                                never_vary, normalizer_stats, raw_maps, split_positions)
from tasks.models import Model, load_model, make_model
from tasks.normalize import Normalizer
from tasks.settings import CalibrationSettings
from tasks.split import rows_needed
from tasks.uncertainty import SLICE_ROWS


def partition_of(sensors: np.ndarray, partition_size: int) -> np.ndarray:
    """Each sensor's partition (int32, one per element; an id that repeats gets one partition), at
    most `partition_size` distinct sensors a partition.

    The distinct ids are ordered by a stable 64-bit hash (the first 8 bytes of blake2b of the UTF-8
    id; Python's hash() of a str is salted per process), ties by the id, and cut into
    ceil(S / partition_size) consecutive chunks whose sizes differ by at most one. So the same ids
    give the same partitions in any process and in any order. A partition depends on the whole set
    of ids, though: adding sensors shifts the chunk boundaries (and may add a partition), so a
    sensor near a boundary can move to a neighbouring partition.
    """
    if partition_size < 1:
        raise InvalidInput(f"partition_size must be at least 1; got {partition_size}")
    ids, inverse = np.unique(np.asarray(sensors, dtype=str), return_inverse=True)
    if not len(ids):
        return np.zeros(0, dtype=np.int32)
    hashes = np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") for i in ids.tolist()],
                      dtype=np.uint64)
    rank = np.empty(len(ids), dtype=np.int64)
    rank[np.lexsort((ids, hashes))] = np.arange(len(ids))
    partitions = -(-len(ids) // partition_size)
    return (rank * partitions // len(ids))[inverse.reshape(-1)].astype(np.int32)


def _checked_rows(sensors: int, readings, codes, celsius=None):
    """readings (float64), codes (int64) and celsius (float64, if given) as arrays of one length,
    codes in 0..sensors - 1, values finite."""
    readings, codes = np.asarray(readings, dtype=np.float64).reshape(-1), np.asarray(codes).reshape(-1)
    columns = [readings] if celsius is None else [readings, np.asarray(celsius, dtype=np.float64).reshape(-1)]
    if any(len(column) != len(codes) for column in columns):
        raise InvalidInput(f"readings, celsius and codes must have one length; got {[len(c) for c in columns]} and {len(codes)}")
    if not np.issubdtype(codes.dtype, np.integer) or (len(codes) and (codes.min() < 0 or codes.max() >= sensors)):
        raise InvalidInput(f"codes must be integers in 0..{sensors - 1}, one sensor index per row")
    if not all(np.isfinite(column).all() for column in columns):
        raise InvalidInput("readings and celsius must be finite numbers")
    return readings, codes.astype(np.int64), columns[-1] if celsius is not None else None


def _check_settings(settings: CalibrationSettings) -> None:
    """Refuse what a fleet cannot do as a single run would, instead of quietly doing something else."""
    refused = [(settings.batch_size is not None, "--batch-size (a fleet trains each sensor on its whole training set)"),
               (bool(settings.bootstrap), "--bootstrap (a fleet's uncertainty is the analytic one; none for mlp)"),
               (settings.drop_outliers, "--drop-outliers (a fleet does not refit)")]
    named = [what for bad, what in refused if bad]
    if named:
        raise InvalidInput(f"a fleet calibration cannot take {'; '.join(named)}")


@dataclass(frozen=True)
class _Padded:
    """Some rows of each sensor of a batch (its training or its validation rows), padded: (B, m) each."""

    mask: np.ndarray  # bool: a real row, not padding
    raw: np.ndarray  # readings, float64, 0 in the padding (finite, so that weight 0 leaves them out)
    x: np.ndarray  # normalized readings
    y: np.ndarray  # °C

    def take(self, keep: np.ndarray) -> _Padded:
        return _Padded(self.mask[keep], self.raw[keep], self.x[keep], self.y[keep])


def _padded(rows, batch, positions, readings, celsius, shift, factor) -> _Padded:
    mask, raw, y = gather(rows, batch, positions, readings, celsius)
    x = raw - shift[batch, None]
    x *= factor[batch, None]
    x[~mask] = 0.0
    return _Padded(mask, raw, x, y)


def train_sensors(readings, celsius, codes, sensors, settings: CalibrationSettings) -> dict:
    """Calibrate one partition's sensors, all in one batched training (the returned fields: the module docstring).

    readings, celsius: (N,) float64, the partition's rows in file order; codes: (N,) each row's
    sensor as an index into `sensors` (S distinct ids). Failed sensors are in `failed`, not raised.
    The batch is padded to the partition's longest sensor: its arrays are S x that sensor's rows.
    """
    from tasks.uncertainty import analytic_uncertainties

    _check_settings(settings)
    sensors = [str(s) for s in sensors]
    if len(set(sensors)) != len(sensors):
        raise InvalidInput("sensors must be distinct ids: codes index them")
    readings, codes, celsius = _checked_rows(len(sensors), readings, codes, celsius)
    S, model = len(sensors), make_model(settings.model)
    rows = group_rows(codes, S)
    reasons: dict[int, str] = {}  # sensor index -> why it is not calibrated
    needed = rows_needed(settings.val_fraction)
    splittable = rows.counts >= needed
    constant = splittable & never_vary(readings, codes, rows)
    for s in np.flatnonzero(~splittable):
        reasons[s] = f"{rows.counts[s]} row(s); the split needs at least {needed}"
    for s in np.flatnonzero(constant):
        reasons[s] = f"every reading is {readings[rows.order[rows.starts[s]]]:g}; a calibration needs readings that vary"
    shift, factor = normalizer_stats(readings, codes, rows.counts, settings.normalize, settings.scale)
    train_pos, val_pos = split_positions(np.where(splittable, rows.counts, 0), settings.val_fraction, settings.seed)
    is_validation = np.zeros(len(codes), dtype=bool)
    is_validation[rows.order[(rows.starts[:, None] + val_pos)[val_pos >= 0]]] = True

    batch = np.flatnonzero(splittable & ~constant)
    train = _padded(rows, batch, train_pos[batch], readings, celsius, shift, factor)
    need = model.size if model.linear_in_params else 2  # a network through one reading is a constant
    enough, distinct = distinct_at_least(train.raw, train.mask, need)
    for i in np.flatnonzero(~enough):
        reasons[batch[i]] = f"its training rows hold only {distinct[i]} different reading(s); {model.spec} needs {need}"
    if not enough.all():
        batch, train = batch[enough], train.take(enough)
    val = _padded(rows, batch, val_pos[batch], readings, celsius, shift, factor)
    alpha, beta = fit_bases(train.x, train.mask, model.degree) if model.kind == "poly" else (None, None)
    result, seconds = _train_batch(model, train, val, alpha, beta, settings)
    ok = np.array([reason != "diverged" for reason in result.stopped_by], dtype=bool)
    for i in np.flatnonzero(~ok):
        reasons[batch[i]] = (f"training diverged at epoch {result.diverged_at[i]} (strategy {settings.strategy}, "
                             f"lr {settings.learning_rate:g}); a smaller --lr may train it")

    done = batch[ok]
    calibrated = np.zeros(S, dtype=bool)
    calibrated[done] = True
    low = np.where(train.mask, train.raw, np.inf).min(axis=1, initial=np.inf)
    high = np.where(train.mask, train.raw, -np.inf).max(axis=1, initial=-np.inf)
    out = {"sensors": sensors, "spec": model.spec, "normalize": settings.normalize, "calibrated": calibrated,
           "params": _spread(S, done, result.params[ok], np.float32),
           "shift": np.where(calibrated, shift, np.nan), "factor": np.where(calibrated, factor, np.nan),
           "range": _spread(S, done, np.stack([low, high], axis=1)[ok]),
           "uncertainty": None,
           "epochs_run": _spread(S, batch, result.epochs_run, np.int64, fill=0),
           "stopped_by": _spread(S, batch, np.array(result.stopped_by, dtype=object), object, fill=None).tolist(),
           "train_loss": _spread(S, batch, result.train_loss[np.arange(len(batch)), result.epochs_run - 1], np.float32),
           "is_validation": is_validation,
           "failed": [{"sensor": sensors[s], "reason": reasons[s]} for s in sorted(reasons)],
           "seconds": seconds}
    if model.kind == "poly":
        out["alpha"], out["beta"] = _spread(S, done, alpha[ok]), _spread(S, done, beta[ok])
    if model.linear_in_params:
        design = design_values(model, train.x, alpha, beta) * train.mask[..., None]  # padding rows: zero rows
        fields = analytic_uncertainties(design, result.params, train.y, train.mask.sum(axis=1))
        out["uncertainty"] = {"method": fields["method"], "dof": _spread(S, done, fields["dof"][ok], np.int64, fill=0),
                              **{k: _spread(S, done, fields[k][ok]) for k in ("residual_sd", "t95", "gram_inverse", "covariance_theta")}}
    return out


def _train_batch(model: Model, train: _Padded, val: _Padded, alpha, beta, settings: CalibrationSettings):
    """The batch's one train_batched call, and its seconds; a result of no models for an empty batch."""
    import torch

    from tasks.batched import BatchedResult, train_batched
    from tasks.train import Stopping

    if not len(train.mask):
        return BatchedResult(np.zeros((0, model.size), np.float32), np.zeros((0, 1), np.float32), None, np.zeros(0, np.int64),
                             [], np.zeros(0, np.int64)), 0.0

    def tensor(values):
        return torch.from_numpy(values).float()

    def features(x):  # what the model reads, computed in float64 and trained on in float32, as a single run does
        return tensor(basis_values(x, alpha, beta) if model.kind == "poly" else x)

    has_val = val.mask.shape[1] > 0
    started = time.perf_counter()
    result = train_batched(
        model, features(train.x), tensor(train.y), tensor(train.mask), strategy=settings.strategy, lr=settings.learning_rate,
        epochs=settings.max_epochs, delta=settings.delta, optimizer=settings.optimizer,
        stopping=Stopping(tol=settings.stopping_tol, patience=settings.patience, val_patience=settings.val_patience),
        seed=settings.seed, f_val=features(val.x) if has_val else None, y_val=tensor(val.y) if has_val else None,
        weights_val=tensor(val.mask) if has_val else None)
    return result, time.perf_counter() - started


def _spread(S: int, sensors: np.ndarray, values, dtype=np.float64, fill=np.nan) -> np.ndarray:
    """(S, ...) array holding `values` at the rows `sensors`, `fill` elsewhere."""
    values = np.asarray(values)
    out = np.full((S, *values.shape[1:]), fill, dtype=dtype)
    out[sensors] = values
    return out


def fleet_calibration(trained: dict, sensor: str) -> Calibration:
    """One sensor's calibration from a partition's training (`thermocal predict --sensor`);
    InvalidInput naming the reason if it is unknown or was not calibrated."""
    try:
        s = list(trained["sensors"]).index(sensor)
    except ValueError:
        raise InvalidInput(f"no sensor {sensor!r} among the {len(trained['sensors'])} sensors of this partition") from None
    if not trained["calibrated"][s]:
        reason = next(f["reason"] for f in trained["failed"] if f["sensor"] == sensor)
        raise InvalidInput(f"sensor {sensor!r} has no calibration: {reason}")
    buffers = {"alpha": trained["alpha"][s], "beta": trained["beta"][s]} if "alpha" in trained else None
    model = load_model(trained["spec"], buffers)
    u = trained["uncertainty"]
    uncertainty = None
    if u is not None:
        dof = int(u["dof"][s])
        uncertainty = {"method": "analytic", "residual_sd": _number(u["residual_sd"][s]), "dof": dof, "t95": _number(u["t95"][s]),
                       "gram_inverse": u["gram_inverse"][s].copy(),
                       "covariance_theta": u["covariance_theta"][s].copy() if dof > 0 else None}
    normalizer = Normalizer(trained["normalize"], float(trained["shift"][s]), float(trained["factor"][s]))
    low, high = (float(v) for v in trained["range"][s])
    return Calibration(model, trained["params"][s].copy(), normalizer, (low, high), uncertainty)


def _number(value) -> float | None:
    return float(value) if np.isfinite(value) else None


def infer_sensors(readings, codes, trained: dict) -> np.ndarray:
    """°C per row (float32) through its own sensor's calibration, computed in float64; NaN for failed sensors."""
    readings, codes, _ = _checked_rows(len(trained["sensors"]), readings, codes)
    return forward_rows(make_model(trained["spec"]), trained, readings, codes).astype(np.float32)


def validate_sensors(readings, celsius, codes, trained: dict) -> pd.DataFrame:
    """One row per sensor: its raw-unit calibration, losses and gap to the least-squares optimum.

    The rows must be those given to train_sensors, in the same order (the split is read from
    `trained["is_validation"]`). Losses are float64 MSEs of float64 predictions, as
    tasks.evaluate.prediction_losses computes them; gap_to_optimum as tasks.evaluate.fit_quality
    (relative excess of the training loss over its family's least-squares optimum on the training
    rows). Numbers that do not apply are NaN (mlp: gap, residual_sd; failed sensors: all of them),
    lists None.
    """
    S = len(trained["sensors"])
    readings, codes, celsius = _checked_rows(S, readings, codes, celsius)
    is_val = np.asarray(trained["is_validation"], dtype=bool)
    if len(is_val) != len(codes):
        raise InvalidInput(f"these are {len(codes)} rows; the partition was trained on {len(is_val)}")
    model, calibrated = make_model(trained["spec"]), trained["calibrated"]
    squared = forward_rows(model, trained, readings, codes)
    squared -= celsius
    squared *= squared
    train, c_train, c_val = ~is_val, codes[~is_val], codes[is_val]
    train_rows, val_rows = np.bincount(c_train, minlength=S), np.bincount(c_val, minlength=S)
    with np.errstate(invalid="ignore", divide="ignore"):
        train_loss = np.bincount(c_train, squared[train], minlength=S) / train_rows
        val_loss = np.bincount(c_val, squared[is_val], minlength=S) / val_rows
    coefficients = uncertainties = None
    gap = residual_sd = np.full(S, np.nan)
    if model.linear_in_params:
        best = _optimum_losses(model, trained, readings[train], celsius[train], c_train, train_rows)
        with np.errstate(invalid="ignore", divide="ignore"):
            gap = np.where(best > 0, (train_loss - best) / best, train_loss - best)
        maps = raw_maps(model, trained["shift"], trained["factor"], trained.get("alpha"), trained.get("beta"))
        coefficients = np.einsum("sp,spi->si", trained["params"].astype(np.float64), maps)
        u = trained["uncertainty"]
        uncertainties = np.sqrt(np.clip(np.einsum("spi,spq,sqi->si", maps, u["covariance_theta"], maps), 0.0, None))
        residual_sd = u["residual_sd"]
    reasons = {f["sensor"]: f["reason"] for f in trained["failed"]}
    return pd.DataFrame({
        "sensor": trained["sensors"], "model": trained["spec"],
        "status": np.where(calibrated, "calibrated", "failed"),
        "reason": [reasons.get(s) for s in trained["sensors"]],
        "coefficients": _lists(coefficients, calibrated), "standard_uncertainties": _lists(uncertainties, calibrated),
        "train_loss": train_loss, "val_loss": val_loss, "gap_to_optimum": gap, "residual_sd": residual_sd,
        "epochs_run": trained["epochs_run"], "stopped_by": trained["stopped_by"],
        "range_low": trained["range"][:, 0], "range_high": trained["range"][:, 1],
        "train_rows": train_rows, "val_rows": val_rows,
    })


def _lists(values: np.ndarray | None, keep: np.ndarray) -> list:
    """Each sensor's row as a list, None where `keep` is False, there are no values, or they are not finite."""
    if values is None:
        return [None] * len(keep)
    keep = keep & np.isfinite(values).all(axis=1)
    return [row if ok else None for row, ok in zip(values.tolist(), keep.tolist())]


def _optimum_losses(model: Model, trained: dict, x: np.ndarray, y: np.ndarray, codes: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Each sensor's least-squares MSE on its training rows (raw readings x, °C y), in float64.

    The line: the closed form on centred readings (as tasks.model.least_squares). The polynomial:
    the normal equations in the sensor's own basis, which is orthonormal on exactly these rows (the
    Gram matrix is n I up to rounding), so they are as well conditioned in any normalization.
    Failed sensors: NaN.
    """
    S = len(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        if model.kind == "linear":
            dx = x - (np.bincount(codes, x, minlength=S) / n)[codes]
            dy = y - (np.bincount(codes, y, minlength=S) / n)[codes]
            slope = np.bincount(codes, dx * dy, minlength=S) / np.bincount(codes, dx * dx, minlength=S)
            residual = slope[codes] * dx - dy
            return np.bincount(codes, residual * residual, minlength=S) / n
        P, ok = model.size, trained["calibrated"]
        parts = [slice(start, start + SLICE_ROWS // P) for start in range(0, len(x), SLICE_ROWS // P)]

        def design(part):  # the rows' design matrices in their sensors' bases, (rows, P)
            c = codes[part]
            return design_values(model, ((x[part] - trained["shift"][c]) * trained["factor"][c])[:, None],
                                 trained["alpha"], trained["beta"], c)[:, 0]

        gram, moment = np.zeros((S, P, P)), np.zeros((S, P))
        for part in parts:
            X, c = design(part), codes[part]
            for p in range(P):
                moment[:, p] += np.bincount(c, X[:, p] * y[part], minlength=S)
                for q in range(p + 1):
                    gram[:, p, q] += np.bincount(c, X[:, p] * X[:, q], minlength=S)
        gram = np.tril(gram) + np.tril(gram, -1).transpose(0, 2, 1)
        theta = np.full((S, P), np.nan)
        theta[ok] = np.linalg.solve(gram[ok], moment[ok][..., None])[..., 0]
        squares = np.zeros(S)
        for part in parts:
            residual = np.einsum("np,np->n", design(part), theta[codes[part]]) - y[part]
            squares += np.bincount(codes[part], residual * residual, minlength=S)
        return squares / n
