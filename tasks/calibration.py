"""A trained calibration as data: the model's spec, its named parameters, its fitted constants, the
normalization of the readings, the calibrated range and its uncertainty (tasks.uncertainty). What
the train stage persists, and all that validation, inference, the report and `thermocal predict` need."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.models import Model, load_model
from tasks.normalize import Normalizer

PREDICT_BUDGET = 1 << 22  # numbers per slice of readings (rows x parameters)
TABLE_POINTS = 10  # readings at which a calibration without a formula (the network) is tabulated


@dataclass(frozen=True)
class Calibration:
    model: Model  # fitted: its constants (the polynomial basis) taken from the training rows
    theta: np.ndarray  # every parameter packed, float32 as trained
    normalizer: Normalizer
    range: tuple[float, float]  # lowest and highest training reading (raw units)
    # s, dof, t(0.975), the parameters' covariance and/or bootstrap replicates (tasks.uncertainty);
    # None for calibrations persisted before uncertainties existed
    uncertainty: dict | None = None

    @classmethod
    def from_record(cls, record: dict) -> Calibration:
        model = load_model(record["spec"], record["buffers"])
        return cls(model, model.pack(record["parameters"]), Normalizer(**record["normalizer"]), tuple(record["range"]),
                   record.get("uncertainty"))

    def to_record(self) -> dict:
        """Plain data (names -> numpy arrays), as a state_dict and a config hold a model."""
        return {
            "spec": self.model.spec,
            "parameters": self.model.unpack(self.theta),
            "buffers": self.model.buffers(),
            "normalizer": self.normalizer.to_dict(),
            "range": [float(v) for v in self.range],
            "uncertainty": self.uncertainty,
        }

    def features(self, readings):
        """What the model reads for raw readings, in float64 (a numpy array)."""
        return self.model.features(self.normalizer.apply64(np.asarray(readings, dtype=np.float64).reshape(-1)))

    def predict(self, readings, engine: str = "torch") -> np.ndarray:
        """°C for raw readings in float64, in slices of readings, so a network's hidden layer on 10
        million rows never sits in memory at once.

        engine "torch": the seed's inference, calc_forward with gradients off (the stages);
        "numpy": the same forward pass on numpy arrays, for commands that answer without importing
        torch (`thermocal predict`); the two agree to float64 rounding (tests/test_fast_commands.py).
        """
        readings = np.asarray(readings, dtype=np.float64).reshape(-1)
        rows = max(1, PREDICT_BUDGET // self.model.size)
        slices = [readings[start : start + rows] for start in range(0, len(readings), rows)]
        if engine == "numpy":
            theta = self.theta.astype(np.float64)
            parts = [self.model.forward(theta, self.features(part)) for part in slices]
        else:
            import torch

            from tasks.model import calc_forward

            theta = torch.from_numpy(self.theta.astype(np.float64))
            parts = [calc_forward(self.model, theta, torch.from_numpy(self.features(part)), None, is_train=False)[0].numpy()
                     for part in slices]
        return np.concatenate(parts) if parts else np.zeros(0)

    @property
    def coefficients(self) -> list[float] | None:
        """°C = sum(c_i × reading^i), ascending powers of the raw reading; None for the network."""
        return self.model.raw_coefficients(self.theta.astype(np.float64), self.normalizer)

    def table(self, points: int = TABLE_POINTS) -> list[dict]:
        """°C at `points` readings spanning the calibrated range."""
        readings = np.linspace(self.range[0], self.range[1], points)
        return [{"reading": float(r), "celsius": float(c)} for r, c in zip(readings, self.predict(readings))]

    def summary(self) -> dict:
        """The calibration as the user reads it: kind, raw-unit coefficients (slope and intercept
        for the line), range; for the network, which has no formula, a table across the range."""
        from tasks.uncertainty import coefficient_summary

        coefficients = self.coefficients
        out = {"kind": self.model.kind, "coefficients": coefficients, "range": [float(v) for v in self.range],
               **coefficient_summary(self.model, self.uncertainty, self.normalizer)}
        if self.model.kind == "linear":
            out = {"slope": coefficients[1], "intercept": coefficients[0], **out}
        if coefficients is None:
            out["table"] = self.table()
        return out

    def predictions(self, readings, engine: str = "torch") -> list[dict]:
        """Each reading's °C with its uncertainty: reading, celsius, u_fit, interval, extrapolated."""
        from tasks.uncertainty import prediction_records

        return prediction_records(self, readings, engine)
