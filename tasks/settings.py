"""Typed settings: one model, validated before anything runs, shown as the flow's parameters."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from tasks.strategies import optimizer_names

Strategy = Literal["finite-difference", "analytic", "autograd", "optimizer"]
Normalization = Literal["none", "scale", "standard"]

# torch.optim's optimizers by lowercase name; the CLI and the API accept any case
OptimizerName = Annotated[Literal[tuple(optimizer_names())], BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)]

STRATEGIES: tuple[str, ...] = Strategy.__args__
NORMALIZATIONS: tuple[str, ...] = Normalization.__args__


# With z-scored readings the Hessian of the MSE is about 2·I, so lr 0.5 is nearly a Newton step;
# the seed's x0.1 readings need its 1e-2; raw readings diverge above about 2e-4.
AUTO_LR = {"standard": 0.5, "scale": 1e-2, "none": 1e-4}
AUTO_TOL = 1e-6  # a converged float32 loss jitters by about 1e-7 (finite differences): stop above that
MAX_EPOCHS = 5000


class CalibrationSettings(BaseModel):
    """Every option of a calibration run; each stage keys its cache on the fields it reads."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # ingest: the CSV's column names for the instrument's reading and the true temperature
    reading_column: str = Field("reading", min_length=1, description="CSV column of the instrument's readings")
    celsius_column: str = Field("celsius", min_length=1, description="CSV column of the true temperatures in °C")
    # normalize: z-score by default, which makes the loss well conditioned;
    # "scale" with 0.1 is the seed's own choice (t_un = 0.1 * t_u)
    normalize: Normalization = Field("standard", description="none; scale (x × scale); standard (z-score)")
    scale: float = Field(0.1, description="factor of normalize=scale; not 0")
    # split: the seed holds out int(0.2 * n) rows; 0 trains on every row and skips validation
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="share of rows held out for validation, in [0, 1)")
    seed: int = Field(42, description="seed of the train/validation split")
    # train: the seed's hand-derived gradient, learning rate and epoch count
    strategy: Strategy = Field("analytic", description="how the gradient is computed")
    optimizer: OptimizerName = Field("sgd", description="torch.optim optimizer, used by strategy=optimizer")
    lr: float | None = Field(None, gt=0.0, description="learning rate; empty: 0.5 with standard, 0.01 with scale, 1e-4 with none")
    epochs: int | None = Field(None, gt=0, description=f"epochs to train; empty: until the loss settles (tol), at most {MAX_EPOCHS}")
    tol: float | None = Field(
        None, ge=0.0, description="stop when the training loss stays within this relative band for `patience` epochs; "
        f"0: never; empty: {AUTO_TOL:g} without epochs, 0 with them",
    )
    patience: int = Field(10, gt=0, description="epochs the loss must stay within tol")
    val_patience: int = Field(0, ge=0, description="stop when the validation loss has not improved for N epochs, keeping its best; 0: never")
    batch_size: int | None = Field(None, gt=0, description="rows per mini-batch step; empty: full batch")
    # the loss is quadratic in (w, b), so central differences are exact for any delta
    delta: float = Field(0.1, gt=0.0, description="finite-difference step")
    log_every: int = Field(500, gt=0, description="log epochs 1-3, then every N")

    @field_validator("scale", "lr", "delta", "tol")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("scale")
    @classmethod
    def _nonzero_scale(cls, value: float) -> float:
        if value == 0:
            raise ValueError("must not be 0 (it would erase every reading)")
        return value

    @property
    def learning_rate(self) -> float:
        """The learning rate to use: --lr, or the one suited to the normalization."""
        return self.lr if self.lr is not None else AUTO_LR[self.normalize]

    @property
    def max_epochs(self) -> int:
        return self.epochs if self.epochs is not None else MAX_EPOCHS

    @property
    def stopping_tol(self) -> float:
        """--tol; by default on when epochs are not given, off (the seed's fixed epochs) when they are."""
        if self.tol is not None:
            return self.tol
        return AUTO_TOL if self.epochs is None else 0.0

    @model_validator(mode="after")
    def _columns_differ(self) -> CalibrationSettings:
        if self.reading_column == self.celsius_column:
            raise ValueError("reading_column and celsius_column must name different columns")
        return self


def sweep_grid(settings: CalibrationSettings, strategies, lrs, normalizations) -> list[CalibrationSettings]:
    """Every (normalization, strategy, lr) combination, the other settings as given, each validated."""
    return [
        CalibrationSettings.model_validate({**settings.model_dump(), "normalize": n, "strategy": st, "lr": lr})
        for n in normalizations for st in strategies for lr in lrs
    ]


def describe_validation_error(error) -> str:
    """One line per invalid field of a pydantic ValidationError, naming the field."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "settings"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {field}: {message} (got {item.get('input')!r})")
    return "invalid options:\n" + "\n".join(lines)
