"""Typed settings: one model, validated before anything runs, shown as the flow's parameters."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from tasks.specs import SPEC_PATTERN, VALID_FORMS, canonical_spec, default_lr

Strategy = Literal["finite-difference", "analytic", "autograd", "optimizer"]
Normalization = Literal["none", "scale", "standard"]

# torch.optim's optimizers by lowercase name (the CLI and the API accept any case), written out so
# that options can be checked and `--help` shown without importing torch (2.5 s); a test holds the
# list equal to what torch.optim offers (tasks.strategies.optimizer_names)
OPTIMIZERS = ("adadelta", "adafactor", "adagrad", "adam", "adamax", "adamw", "asgd", "lbfgs", "nadam", "radam", "rmsprop", "rprop", "sgd")
OptimizerName = Annotated[Literal[OPTIMIZERS], BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)]

# a model family and its size: linear, poly:K, mlp:H (tasks.models); written as the user likes
# ("Poly:3 "), kept in its canonical form; the JSON schema's pattern lets the server refuse a bad one
ModelSpec = Annotated[str, Field(pattern=SPEC_PATTERN), BeforeValidator(lambda v: canonical_spec(v) if isinstance(v, str) else v)]

def _separator(value):
    """'tab' and a typed backslash-t mean a tab; anything else is taken as written."""
    if isinstance(value, str) and value.strip().lower() in ("tab", "\\t"):
        return "\t"
    return value


def _one_separator(value: str) -> str:
    if len(value) != 1 or value.isalnum() or value in '".+-':
        raise ValueError(f"must be one character that cannot be part of a number or a quoted field, such as ',', ';' or tab (got {value!r})")
    return value


Separator = Annotated[str, AfterValidator(_one_separator), BeforeValidator(_separator)]

STRATEGIES: tuple[str, ...] = Strategy.__args__
NORMALIZATIONS: tuple[str, ...] = Normalization.__args__

AUTO_TOL = 1e-6  # a converged float32 loss jitters by about 1e-7 (finite differences): stop above that
MAX_EPOCHS = 5000
NETWORK_BOOTSTRAP = 100  # replicates for the network's uncertainty when --bootstrap is not given
MAX_BOOTSTRAP = 10_000
DEFAULT_PARTITION, MAX_PARTITION = 1000, 100_000


class CalibrationSettings(BaseModel):
    """Every option of a calibration run; each stage keys its cache on the fields it reads.

    This model is the one source of the run options: `thermocal run/serve/sweep` derive each flag
    (`--val-fraction` from `val_fraction`), its type, choices, default and help from the fields
    below; the flows take it as a typed parameter, so the Prefect UI's form and API offer and check
    the same fields. A field's description is its help text; the CLI adds "(default: ...)" unless
    the description explains an empty default itself.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # ingest: the CSV's column names for the instrument's reading and the true temperature, and how
    # its fields and numbers are written (European logger and spreadsheet exports: ';' and ',')
    reading_column: str = Field("reading", min_length=1, description="column of instrument readings")
    celsius_column: str = Field("celsius", min_length=1, description="column of true °C")
    sep: Separator = Field(",", description="field separator of the CSV: one character, e.g. ';' (European exports) or tab")
    decimal: Literal[".", ","] = Field(".", description="decimal mark of the CSV's numbers: '.' or ','")
    # the model family: the seed's line by default
    model: ModelSpec = Field("linear", description=f"model to fit: {VALID_FORMS}")
    # normalize: z-score by default, which makes the loss well conditioned;
    # "scale" with 0.1 is the seed's own choice (t_un = 0.1 * t_u)
    normalize: Normalization = Field("standard", description="input normalization")
    scale: float = Field(0.1, description="factor for --normalize scale")
    # split: the seed holds out int(0.2 * n) rows; 0 trains on every row and skips validation
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="share held out for validation, in [0, 1); 0 trains on all rows")
    seed: int = Field(42, description="seed of the split (and of the network's initial parameters and mini-batch order)")
    # train: the seed's hand-derived gradient, learning rate and epoch count
    strategy: Strategy = Field("analytic", description="how the gradient is computed")
    optimizer: OptimizerName = Field("sgd", description="torch.optim optimizer for --strategy optimizer, any case")
    lr: float | None = Field(
        None, gt=0.0, description="learning rate (default: by model and normalization: linear 0.5 with --normalize standard, "
        "0.01 with scale, 1e-4 with none; poly 0.5 with any; mlp 0.01 with standard, 1e-3 with scale, 1e-5 with none)",
    )
    epochs: int | None = Field(None, gt=0, description=f"train exactly this many epochs (default: until the loss settles, at most {MAX_EPOCHS})")
    tol: float | None = Field(
        None, ge=0.0, description="stop once the training loss stays within this relative band for --patience epochs; "
        f"0: never (default: {AUTO_TOL:g} without --epochs, 0 with it)",
    )
    patience: int = Field(10, gt=0, description="epochs of --tol")
    val_patience: int = Field(0, ge=0, description="stop when the validation loss has not improved for N epochs, keeping its best parameters; 0: never")
    batch_size: int | None = Field(None, gt=0, description="rows per mini-batch step (default: the whole training set)")
    # the line's and the polynomials' losses are quadratic, so central differences are exact for any delta
    delta: float = Field(0.1, gt=0.0, description="step of --strategy finite-difference")
    log_every: int = Field(500, gt=0, description="log epochs 1-3, then every N")
    # uncertainty (tasks.uncertainty): the network's comes from a bootstrap; the other models' from
    # the least-squares formulas, with a bootstrap beside them on request as a cross-check
    bootstrap: int | None = Field(
        None, ge=0, le=MAX_BOOTSTRAP, description="bootstrap replicates, trained at once, for the uncertainty "
        f"(default: {NETWORK_BOOTSTRAP} for mlp, 0 otherwise; with linear or poly a cross-check of the formulas)",
    )
    drop_outliers: bool = Field(False, description="refit without the training rows flagged as outliers, and record which")
    # fleets (tasks.fleet): one calibration per sensor, sensors trained a partition at a time
    sensor_column: str | None = Field(None, min_length=1, description="column of sensor ids: one calibration per sensor "
                                      "(default: none, the whole file is one sensor)")
    partition_size: int = Field(DEFAULT_PARTITION, ge=1, le=MAX_PARTITION,
                                description="with --sensor-column: at most this many sensors train together, cached as one partition")
    # drift: each sensor's calibration against its previous run's (or --baseline's)
    drift_threshold: float = Field(0.5, ge=0.0, description="°C: a calibration that moved more than this over its range is reported as drifted")
    baseline: str | None = Field(None, pattern=r"^\d{8}-\d{6}-[0-9a-f]{8}$", description="run id to compare calibrations with "
                                 "(default: the previous run of the same data file in the store)")

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
        """The learning rate to use: --lr, or the one suited to the model and the normalization."""
        return self.lr if self.lr is not None else default_lr(self.model, self.normalize)

    @property
    def max_epochs(self) -> int:
        return self.epochs if self.epochs is not None else MAX_EPOCHS

    @property
    def stopping_tol(self) -> float:
        """--tol; by default on when epochs are not given, off (the seed's fixed epochs) when they are."""
        if self.tol is not None:
            return self.tol
        return AUTO_TOL if self.epochs is None else 0.0

    @property
    def bootstrap_replicates(self) -> int:
        """--bootstrap; by default NETWORK_BOOTSTRAP for the network (it has no closed form), 0 otherwise."""
        if self.bootstrap is not None:
            return self.bootstrap
        return NETWORK_BOOTSTRAP if self.model.startswith("mlp") and self.sensor_column is None else 0

    @field_validator("bootstrap")
    @classmethod
    def _enough_replicates(cls, value: int | None) -> int | None:
        if value == 1:
            raise ValueError("must be 0 (no bootstrap) or at least 2 (a spread needs two replicates)")
        return value

    @model_validator(mode="after")
    def _columns_differ(self) -> CalibrationSettings:
        if self.reading_column == self.celsius_column:
            raise ValueError("reading_column and celsius_column must name different columns")
        if self.sensor_column is not None and self.sensor_column in (self.reading_column, self.celsius_column):
            raise ValueError(f"--sensor-column {self.sensor_column!r} must name a column of its own, not the readings or °C")
        if self.sep == self.decimal:
            raise ValueError(f"--sep and --decimal are both {self.sep!r}: a European export separates fields by ';' "
                             "(--sep ';' --decimal ',')")
        return self

    @model_validator(mode="after")
    def _batchable(self) -> CalibrationSettings:
        if self.bootstrap_replicates and self.strategy == "optimizer" and self.optimizer == "lbfgs":
            raise ValueError(f"--optimizer lbfgs cannot train bootstrap replicates at once (its line search couples them); "
                             f"{self.model} would use {self.bootstrap_replicates}: give --bootstrap 0, or another optimizer")
        if self.bootstrap_replicates and self.batch_size is not None:
            raise ValueError(f"--batch-size trains one model at a time; {self.model} would train {self.bootstrap_replicates} "
                             "bootstrap replicates at once: give --bootstrap 0, or no --batch-size")
        return self

    @model_validator(mode="after")
    def _fleet(self) -> CalibrationSettings:
        """A fleet trains its sensors at once (tasks.batched): full batches, no bootstrap, no line search."""
        if self.sensor_column is None:
            return self
        refused = [(self.batch_size is not None, "--batch-size"), (bool(self.bootstrap), "--bootstrap"),
                   (self.drop_outliers, "--drop-outliers"),
                   (self.strategy == "optimizer" and self.optimizer == "lbfgs", "--optimizer lbfgs")]
        named = [flag for refused_, flag in refused if refused_]
        if named:
            raise ValueError(f"{', '.join(named)} cannot be used with --sensor-column: a fleet trains all its sensors at once, "
                             "full-batch, without a bootstrap or outlier refit (and LBFGS's line search would couple them)")
        return self


def sweep_grid(settings: CalibrationSettings, strategies, lrs, normalizations, models=None) -> list[CalibrationSettings]:
    """Every (model, normalization, strategy, lr) combination, the other settings as given, each validated."""
    return [
        CalibrationSettings.model_validate({**settings.model_dump(), "model": m, "normalize": n, "strategy": st, "lr": lr})
        for m in (models or [settings.model]) for n in normalizations for st in strategies for lr in lrs
    ]


def describe_validation_error(error) -> str:
    """One line per invalid option of a pydantic ValidationError, named as on the command line
    (`--val-fraction`), with the value given unless the message already quotes it."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "settings"
        flag = "--" + field.replace("_", "-") if field in CalibrationSettings.model_fields else field
        message = item["msg"].removeprefix("Value error, ")
        given = repr(item.get("input"))
        whole = not item["loc"]  # a rule over several options: its message names them, the input is every setting
        lines.append(f"  {flag}: {message}" + ("" if whole or given in message else f" (got {given})"))
    return "invalid options:\n" + "\n".join(lines)
