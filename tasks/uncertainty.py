"""How far to trust a calibration: the uncertainty of its function and of every value it gives,
and the checks of its residuals (the GUM, JCGM 100:2008; ISO/TS 28037 and 28038 for straight-line
and polynomial calibration functions).

Models linear in their parameters (`linear`, `poly:K`). With X the design matrix of the n
training rows in the model's own basis (forward = X theta, p columns) and r the residuals of the
learned parameters, all in float64:

    s^2        = r.r / (n - p)                  residual variance, n - p degrees of freedom
    V_theta    = s^2 (X^T X)^-1                 covariance of the parameters
    V          = M V_theta M^T                  of the raw-unit coefficients (M: theta -> coefficients, linear)
    u_fit(x)   = sqrt(d(x)^T V_theta d(x))      standard uncertainty of the function's value at reading x
    interval   = celsius ± t(0.975, n - p) sqrt(s^2 + u_fit(x)^2)   95 % for a new observation at x

These are ordinary least squares' formulas (statsmodels' `bse`, `mean_se`, `obs_ci_*`), evaluated at
the parameters gradient descent learned rather than at the least-squares ones; the two differ by
the run's `gap_to_optimum` (s^2 is larger by exactly that relative gap; X, hence everything else
but s, is the same).

The network (`mlp:H`) has no closed form: B bootstrap replicates (`--bootstrap B`), trained at once
by the batched trainer (tasks.batched), give u_fit as the spread of their values at x. Models
linear in their parameters may ask for a bootstrap too, as a cross-check of the formulas above.

- Models linear in their parameters: the residual bootstrap. Each replicate trains on the
  fitted values plus residuals drawn with replacement from the training residuals, each divided by
  sqrt(1 - h_i) (its leverage) and centred, so their spread is the noise's (Davison & Hinkley,
  Bootstrap Methods, 1997, algorithm 6.3). Its u_fit agrees with the formula's to Monte Carlo error.
- The network: the pairs bootstrap (rows drawn with replacement: its residuals have no leverage to
  correct them). Each row is left out of about 37 % of the replicates; their errors on it
  (out-of-bag) estimate the error on a reading not trained on, so s is the out-of-bag root mean
  square error, with n - 1 degrees of freedom. It holds the fit's own spread as well as the noise,
  so the network's intervals err wide rather than narrow.

Residual checks (`residual_checks`): every training row's residual (fitted - true, the calibration's
error there) and its externally studentized residual (the residual over its standard deviation
estimated without that row); rows beyond the Bonferroni-corrected two-sided 5 % critical value of
Student's t with n - p - 1 degrees of freedom are outliers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tasks.calibration import Calibration
    from tasks.models import Model
    from tasks.normalize import Normalizer

COVERAGE = 0.95  # of every interval
TABLE_POINTS = 10  # readings of the correction table, spanning the calibrated range
COVERAGE_FACTOR = 2.0  # k of the certificate's expanded uncertainties of the coefficients
OUTLIER_ALPHA = 0.05  # family-wise: Bonferroni over the training rows
SLICE_ROWS = 1 << 20  # rows per slice of design-matrix work: 10 million rows never sit in memory as one (n, p) float64
BOOTSTRAP_SEED_OFFSET = 0x5EED  # the replicates' generator: seeded by --seed, a stream apart from the training's own


def t_quantile(probability: float, dof: float) -> float:
    """Student's t quantile (scipy: imported here, by the stages that compute, never by `predict`)."""
    from scipy.special import stdtrit

    return float(stdtrit(dof, probability))


def coverage_t(dof: int) -> float | None:
    """t(0.975, dof): the factor of a two-sided 95 % interval; None without degrees of freedom."""
    return t_quantile(0.5 + COVERAGE / 2, dof) if dof > 0 else None


def _slices(n: int, rows: int = SLICE_ROWS):
    return (slice(start, min(start + rows, n)) for start in range(0, n, rows))


def design64(model: Model, x: np.ndarray) -> np.ndarray:
    """The design matrix of normalized readings x, in float64 (numpy: no torch needed)."""
    return model.design(model.features(np.asarray(x, dtype=np.float64)))


def raw_map(model: Model, normalizer: Normalizer) -> np.ndarray:
    """M with raw coefficients = M theta: raw_coefficients is linear in theta, so its columns are
    the coefficients of the unit vectors."""
    eye = np.eye(model.size)
    return np.array([model.raw_coefficients(column, normalizer) for column in eye]).T


def analytic_uncertainty(model: Model, theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict:
    """s, its degrees of freedom, t(0.975) and V_theta of a model linear in its parameters, from the
    learned parameters `theta`, the training rows' normalized readings `x` and °C `y` (float64)."""
    theta = np.asarray(theta, dtype=np.float64)
    p, n = model.size, len(x)
    gram, ssr = np.zeros((p, p)), 0.0
    for part in _slices(n):
        design = design64(model, x[part])
        gram += design.T @ design
        residual = design @ theta - y[part]
        ssr += float(residual @ residual)
    dof = n - p
    inverse = np.linalg.pinv(gram, hermitian=True)
    if dof <= 0:  # as many rows as coefficients: the function is determined, its uncertainty is not
        return {"method": "analytic", "residual_sd": None, "dof": dof, "t95": None, "gram_inverse": inverse, "covariance_theta": None}
    s2 = ssr / dof
    return {"method": "analytic", "residual_sd": math.sqrt(s2), "dof": dof, "t95": coverage_t(dof),
            "gram_inverse": inverse, "covariance_theta": s2 * inverse}


def coefficient_summary(model: Model, uncertainty: dict | None, normalizer: Normalizer) -> dict:
    """What the run's JSON shows of the uncertainty: the raw-unit coefficients' standard
    uncertainties (same order as `coefficients`), covariance and correlation, s and its dof."""
    empty = {"standard_uncertainties": None, "covariance": None, "correlation": None}
    if uncertainty is None:
        return {**empty, "residual_sd": None, "dof": None}
    out = {**empty, "residual_sd": uncertainty["residual_sd"], "dof": uncertainty["dof"], "uncertainty_method": uncertainty["method"]}
    if uncertainty.get("bootstrap"):
        out["bootstrap"] = {k: v for k, v in uncertainty["bootstrap"].items() if k != "thetas"}
    if uncertainty.get("covariance_theta") is None or not model.linear_in_params:
        return out
    mapping = raw_map(model, normalizer)
    covariance = mapping @ uncertainty["covariance_theta"] @ mapping.T
    sd = np.sqrt(np.clip(np.diag(covariance), 0.0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = covariance / np.outer(sd, sd)
    correlation[~np.isfinite(correlation)] = 0.0
    np.fill_diagonal(correlation, 1.0)
    return {**out, "standard_uncertainties": sd.tolist(), "covariance": covariance.tolist(), "correlation": correlation.tolist()}


def fit_uncertainty(model: Model, uncertainty: dict, x: np.ndarray) -> np.ndarray:
    """u_fit at normalized readings x from V_theta: sqrt(d^T V d) row by row, in slices."""
    covariance = uncertainty["covariance_theta"]
    out = np.empty(len(x))
    for part in _slices(len(x)):
        design = design64(model, x[part])
        out[part] = np.sqrt(np.clip(np.einsum("ij,jk,ik->i", design, covariance, design), 0.0, None))
    return out


def bootstrap_spread(model: Model, thetas: np.ndarray, x: np.ndarray, budget: int = 1 << 22) -> np.ndarray:
    """The standard deviation (ddof 1) of the replicates' values at normalized readings x, in slices."""
    thetas = np.asarray(thetas, dtype=np.float64)
    rows = max(1, budget // (len(thetas) * max(1, model.width)))
    out = np.empty(len(x))
    for part in _slices(len(x), rows):
        values = model.forward(thetas, model.features(np.asarray(x[part], dtype=np.float64)))  # (B, rows)
        out[part] = values.std(axis=0, ddof=1)
    return out


def leverages(model: Model, gram_inverse: np.ndarray, x: np.ndarray) -> np.ndarray:
    """h_i = d_i^T (X^T X)^-1 d_i, the diagonal of the hat matrix, in slices."""
    out = np.empty(len(x))
    for part in _slices(len(x)):
        design = design64(model, x[part])
        out[part] = np.einsum("ij,jk,ik->i", design, gram_inverse, design)
    return out


def studentized(residual: np.ndarray, leverage: np.ndarray, dof: int, total: float | None = None) -> np.ndarray:
    """Externally studentized residuals: e_i / (s_(i) sqrt(1 - h_i)), where s_(i)^2 = (SSR -
    e_i^2 / (1 - h_i)) / (dof - 1) is the residual variance of the fit without row i (`total`: the
    SSR of every row, when `residual` is a slice of them). A row the fit passes through by
    construction (h_i = 1) or a fit with no degree of freedom to spare gives NaN."""
    total = float(residual @ residual) if total is None else total
    with np.errstate(invalid="ignore", divide="ignore"):
        one_minus_h = 1.0 - leverage
        deleted = (total - residual * residual / one_minus_h) / (dof - 1)
        t = residual / np.sqrt(deleted * one_minus_h)
    t[~np.isfinite(t) | (one_minus_h <= 1e-12)] = np.nan
    return t


def outlier_limit(rows: int, dof: int) -> float | None:
    """The Bonferroni-corrected two-sided 5 % critical value of Student's t with `dof` degrees of
    freedom over `rows` tests; None when there are too few degrees of freedom."""
    return t_quantile(1.0 - OUTLIER_ALPHA / (2.0 * rows), dof) if dof > 0 and rows > 0 else None


def residual_checks(calibration: Calibration, raw: np.ndarray, y: np.ndarray) -> dict:
    """Every training row's residual (fitted - true, float64) and externally studentized residual
    (float32), and the rows beyond the Bonferroni limit (their positions in `raw`).

    Models linear in their parameters: from the hat matrix (leverages) and s, with n - p - 1
    degrees of freedom. The network: each row's out-of-bag residual (the bootstrap replicates that
    did not see it) over the root mean square of the others', with n - 2.
    """
    uncertainty = calibration.uncertainty or {}
    residual = calibration.predict(raw)
    residual -= y  # fitted - true, in place
    n = len(y)
    if calibration.model.linear_in_params and uncertainty.get("gram_inverse") is not None:
        dof = n - calibration.model.size
        t = np.empty(n, dtype=np.float32)
        total = float(residual @ residual)
        for part in _slices(n):  # leverages and the studentized residuals slice by slice: no n-row temporaries
            h = leverages(calibration.model, uncertainty["gram_inverse"], calibration.normalizer.apply64(raw[part]))
            t[part] = studentized(residual[part], h, dof, total)
        limit_dof = dof - 1
    elif uncertainty.get("oob_residual") is not None and len(uncertainty["oob_residual"]) == n:
        oob = np.asarray(uncertainty["oob_residual"], dtype=np.float64)
        seen = np.isfinite(oob)
        total, count = float(np.sum(oob[seen] ** 2)), int(seen.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            others = (total - np.where(seen, oob * oob, 0.0)) / (count - np.where(seen, 2, 1))
            t = np.where(seen & (others > 0), oob / np.sqrt(others), np.nan).astype(np.float32)
        limit_dof = count - 2
    else:
        return {"residual": residual, "studentized": np.full(n, np.nan, dtype=np.float32), "limit": None,
                "outliers": np.zeros(0, dtype=np.int64)}
    limit = outlier_limit(n, limit_dof)
    outliers = np.flatnonzero(np.abs(np.nan_to_num(t)) > limit) if limit is not None else np.zeros(0, dtype=np.int64)
    return {"residual": residual, "studentized": t, "limit": limit, "outliers": outliers}


def prediction_columns(calibration: Calibration, readings: np.ndarray, celsius: np.ndarray, dtype=np.float64,
                       cross_check: bool = True) -> dict:
    """u_fit, the 95 % interval for a new observation and the extrapolation flag at raw `readings`
    whose calibrated values are `celsius` (NaN where the calibration carries no uncertainty); with
    a bootstrap beside the formula (a cross-check) and `cross_check`, also u_fit_bootstrap. Computed in slices into
    arrays of `dtype`, so 10 million rows need no n-row float64 temporaries."""
    readings = np.asarray(readings, dtype=np.float64).reshape(-1)
    uncertainty = calibration.uncertainty or {}
    model, n = calibration.model, len(readings)
    bootstrap = (uncertainty.get("bootstrap") or {}).get("thetas")
    analytic = uncertainty.get("covariance_theta") is not None
    s, t = uncertainty.get("residual_sd"), uncertainty.get("t95")
    names = ["u_fit", "low", "high"] + (["u_fit_bootstrap"] if cross_check and analytic and bootstrap is not None else [])
    out = {name: np.full(n, np.nan, dtype=dtype) for name in names}
    if analytic or bootstrap is not None:
        for part in _slices(n):
            x = calibration.normalizer.apply64(readings[part])
            u = fit_uncertainty(model, uncertainty, x) if analytic else bootstrap_spread(model, bootstrap, x)
            out["u_fit"][part] = u
            if "u_fit_bootstrap" in out:
                out["u_fit_bootstrap"][part] = bootstrap_spread(model, bootstrap, x)
            if s is not None and t is not None:
                half = t * np.sqrt(s * s + u * u)
                out["low"][part] = celsius[part] - half
                out["high"][part] = celsius[part] + half
    low, high = calibration.range
    out["extrapolated"] = (readings < low) | (readings > high)
    return out


def _number(value) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def prediction_records(calibration: Calibration, readings, engine: str = "torch") -> list[dict]:
    """Each reading as the run's JSON and `thermocal predict` give it: reading, celsius, u_fit,
    interval [low, high] (95 %, for a new observation) and extrapolated (outside `range`)."""
    readings = np.asarray(readings, dtype=np.float64).reshape(-1)
    celsius = calibration.predict(readings, engine=engine)
    columns = prediction_columns(calibration, readings, celsius)
    records = []
    for i, reading in enumerate(readings):
        low, high = _number(columns["low"][i]), _number(columns["high"][i])
        record = {"reading": float(reading), "celsius": float(celsius[i]), "u_fit": _number(columns["u_fit"][i]),
                  "interval": None if low is None else [low, high], "extrapolated": bool(columns["extrapolated"][i])}
        if "u_fit_bootstrap" in columns:
            record["u_fit_bootstrap"] = _number(columns["u_fit_bootstrap"][i])
        records.append(record)
    return records


def expanded(record: dict) -> float | None:
    """U, the half width of a prediction's 95 % interval (°C ± U)."""
    interval = record.get("interval")
    return None if interval is None else (interval[1] - interval[0]) / 2.0


def bootstrap_uncertainty(model: Model, theta: np.ndarray, x: np.ndarray, y: np.ndarray, replicates: int, seed: int,
                          analytic: dict | None, train_options: dict) -> dict:
    """B replicates of the training, trained at once (tasks.batched), from the learned parameters
    `theta`, the training rows' normalized readings `x` and °C `y` (float64).

    With `analytic` (a model linear in its parameters): the residual bootstrap, kept beside the
    formula's values as a cross-check. Without: the pairs bootstrap, whose out-of-bag errors give s.
    `train_options` are train_batched's strategy, lr, epochs, delta, optimizer and stopping: the
    replicates train as the calibration did. Replicates that diverge are left out and counted.
    """
    import torch

    from tasks.batched import train_batched

    n = len(y)
    generator = torch.Generator().manual_seed(seed + BOOTSTRAP_SEED_OFFSET)
    draws = torch.randint(n, (replicates, n), generator=generator)
    features = model.features(torch.from_numpy(np.asarray(x, dtype=np.float64)))
    fitted = model.forward(torch.from_numpy(np.asarray(theta, dtype=np.float64)), features).numpy()
    if analytic is not None:
        h = leverages(model, analytic["gram_inverse"], x)
        with np.errstate(invalid="ignore", divide="ignore"):
            modified = (y - fitted) / np.sqrt(np.clip(1.0 - h, 1e-12, None))  # observed - fitted, leverage-corrected
        modified -= modified.mean()
        targets = torch.from_numpy(fitted[None, :] + modified[draws.numpy()]).float()  # (B, n): fitted + drawn residuals
        weights = torch.ones(replicates, n)
        method = "residual"
    else:
        targets = torch.from_numpy(np.asarray(y, dtype=np.float32))
        weights = torch.zeros(replicates, n).scatter_add_(1, draws, torch.ones(replicates, n))  # how often each row was drawn
        method = "pairs"
    result = train_batched(model, features.float(), targets, weights, seed=seed, **train_options)
    usable = np.array([reason != "diverged" for reason in result.stopped_by])
    thetas = result.params[usable].astype(np.float32)
    out = {"replicates": int(replicates), "used": int(usable.sum()), "method": method, "seed": int(seed), "thetas": thetas}
    if analytic is not None:
        return {**analytic, "bootstrap": out}
    if len(thetas) < 2:
        return {"method": "bootstrap", "residual_sd": None, "dof": n - 1, "t95": None, "bootstrap": out, "oob_residual": None}
    values = model.forward(thetas.astype(np.float64), model.features(np.asarray(x, dtype=np.float64)))  # (B', n)
    left_out = weights.numpy()[usable] == 0
    errors = np.where(left_out, values - y[None, :], 0.0)
    count = left_out.sum()
    per_row = left_out.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        oob_residual = np.where(per_row > 0, errors.sum(axis=0) / per_row, np.nan)  # fitted (out of bag) - true
    s = math.sqrt(float((errors * errors).sum()) / count) if count else None
    return {"method": "bootstrap", "residual_sd": s, "dof": n - 1, "t95": coverage_t(n - 1) if s is not None else None,
            "bootstrap": out, "oob_residual": oob_residual}


def analytic_uncertainties(design: np.ndarray, theta: np.ndarray, y: np.ndarray, rows: np.ndarray) -> dict:
    """analytic_uncertainty for B models at once (a fleet's sensors, tasks.fleet), its fields as
    arrays over the models: each model's design matrix (B, n, p) and °C (B, n) in float64, zero
    in the rows that pad it to n, `rows` (B,) its real row count. Without a degree of freedom
    (rows <= p), residual_sd, t95 and covariance_theta are NaN."""
    from scipy.special import stdtrit

    theta = np.asarray(theta, dtype=np.float64)
    gram = np.matmul(design.transpose(0, 2, 1), design)  # padding rows add 0
    residual = np.matmul(design, theta[:, :, None])[..., 0] - y
    dof = np.asarray(rows) - design.shape[2]
    with np.errstate(invalid="ignore", divide="ignore"):
        s2 = np.where(dof > 0, np.einsum("bn,bn->b", residual, residual) / dof, np.nan)
    inverse = np.linalg.pinv(gram, hermitian=True)
    t95 = np.where(dof > 0, stdtrit(np.maximum(dof, 1), 0.5 + COVERAGE / 2), np.nan)
    return {"method": "analytic", "residual_sd": np.sqrt(s2), "dof": dof, "t95": t95, "gram_inverse": inverse,
            "covariance_theta": s2[:, None, None] * inverse}
