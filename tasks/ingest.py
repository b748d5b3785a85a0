"""The data contract: reading the CSV of paired readings and validating it with pandera."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa

from tasks.errors import InvalidInput
from tasks.split import rows_needed

ABSOLUTE_ZERO_C = -273.15
READING, CELSIUS = "reading", "celsius"  # the names every later stage uses


def _numeric(series: pd.Series) -> pd.Series:
    # checks also run on a column whose float coercion failed; judge only its numeric cells there
    return pd.to_numeric(series, errors="coerce")


def readings_schema(reading_column: str, celsius_column: str, min_rows: int) -> pa.DataFrameSchema:
    """Two numeric, finite, complete columns; celsius at or above absolute zero; at least `min_rows` rows."""
    finite = pa.Check(lambda s: ~np.isinf(_numeric(s)), name="finite")
    return pa.DataFrameSchema(
        {
            reading_column: pa.Column(float, checks=[finite], coerce=True, nullable=False),
            celsius_column: pa.Column(
                float,
                checks=[
                    finite,
                    pa.Check(
                        lambda s: _numeric(s).fillna(0.0) >= ABSOLUTE_ZERO_C,
                        name="at_or_above_absolute_zero",
                    ),
                ],
                coerce=True,
                nullable=False,
            ),
        },
        checks=[
            pa.Check(lambda df: len(df) >= min_rows, name="enough_rows"),
            # a line through readings that are all equal is not determined
            pa.Check(lambda df: len(df) < 2 or _numeric(df[reading_column]).nunique() >= 2, name="distinct_readings"),
        ],
        strict=False,  # extra columns (a timestamp, a note) are allowed and ignored
        name="readings",
    )


def _line_of_byte(path: Path, offset: int) -> int:
    with open(path, "rb") as handle:
        return handle.read(offset).count(b"\n") + 1


def _first_undecodable(path: Path) -> tuple[int, int]:
    """(line, byte offset) of the first bytes that are not UTF-8."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return data[: error.start].count(b"\n") + 1, error.start
    return 1, 0


def _first_ragged_line(path: Path) -> tuple[int, int, int] | None:
    """(line, fields, header fields) of the first line whose field count differs from the header's."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = csv.reader(handle)
        header = len(next(rows, []))
        for number, row in enumerate(rows, start=2):
            if row and len(row) != header:
                return number, len(row), header
    return None


def _ragged(path: Path) -> InvalidInput:
    found = _first_ragged_line(path)
    if found is None:
        return InvalidInput(f"{path}: not a readable CSV (rows and header disagree on the number of fields)")
    line, fields, header = found
    return InvalidInput(
        f"{path}: line {line} has {fields} fields but the header has {header}; "
        "check for a stray comma, or decimal commas (write 0.5, not 0,5)"
    )


def read_csv(path: Path) -> pd.DataFrame:
    """The file as a frame; index i is the data row on line i + 2 (blank lines dropped, index kept)."""
    try:
        with warnings.catch_warnings():
            # pandas otherwise drops a first row's extra field with only a warning, or turns the
            # first column into the index: either silently changes the data
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(path, skip_blank_lines=False, skipinitialspace=True, encoding="utf-8-sig", index_col=False)
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InvalidInput(f"{path}: is a directory, not a CSV file") from None
    except PermissionError:
        raise InvalidInput(f"{path}: permission denied") from None
    except pd.errors.EmptyDataError:
        raise InvalidInput(f"{path}: the file is empty; expected a header line and rows of readings") from None
    except UnicodeDecodeError:
        line, offset = _first_undecodable(path)
        raise InvalidInput(f"{path}: line {line} (byte {offset}) is not UTF-8 text; save the file as UTF-8 CSV") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning):
        raise _ragged(path) from None
    return frame.dropna(how="all")


def _describe_failures(path: Path, failures: pd.DataFrame, frame: pd.DataFrame, columns: tuple[str, str], min_rows: int) -> list[str]:
    lines: list[tuple[float, str]] = []
    coerce_failed = set(failures.loc[failures["check"].astype(str).str.startswith("coerce_dtype"), "column"])
    repeated_headers = set()
    for row in failures.itertuples(index=False):
        check, column, value, index = str(row.check), row.column, row.failure_case, row.index
        if check.startswith("dtype(") and column in coerce_failed:
            continue  # the same cells as the coercion failure
        where = f"line {int(index) + 2} (row {int(index) + 1})" if index is not None and not pd.isna(index) else ""
        if check == "column_in_dataframe":
            found = ", ".join(repr(c) for c in frame.columns)
            hint = ""
            if len(frame.columns) == 1 and (";" in str(frame.columns[0]) or "\t" in str(frame.columns[0])):
                hint = "; the file looks separated by ';' or tabs: use commas"
            lines.append((-1, f"column {value!r} is missing (columns found: {found}){hint}"))
        elif check == "enough_rows":
            lines.append((-1, f"{len(frame)} row(s) of readings; at least {min_rows} needed (2 to train, 1 to validate when --val-fraction > 0)"))
        elif check == "distinct_readings":
            lines.append((-1, f"every value in column {columns[0]!r} is the same; a calibration needs at least two different readings"))
        elif check.startswith("coerce_dtype") and value == column:
            if index not in repeated_headers:
                repeated_headers.add(index)
                lines.append((index, f"{where}: the header line appears again"))
        elif check.startswith("coerce_dtype"):
            lines.append((index, f"{where}, column {column!r}: {value!r} is not a number"))
        elif check == "not_nullable":
            lines.append((index, f"{where}, column {column!r}: missing value (blank or NaN)"))
        elif check == "finite":
            lines.append((index, f"{where}, column {column!r}: {value} is not finite"))
        elif check == "at_or_above_absolute_zero":
            lines.append((index, f"{where}, column {column!r}: {value} °C is below absolute zero ({ABSOLUTE_ZERO_C})"))
        else:
            lines.append((index if where else -1, f"{where or 'table'}, column {column!r}: {value!r} fails {check}"))
    lines.sort(key=lambda item: item[0])
    return [text for _, text in lines]


def validate_readings(frame: pd.DataFrame, path: Path, reading_column: str, celsius_column: str, min_rows: int) -> pd.DataFrame:
    """The frame as two float64 columns `reading` and `celsius`, or InvalidInput listing every failure."""
    schema = readings_schema(reading_column, celsius_column, min_rows)
    try:
        valid = schema.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as error:
        problems = _describe_failures(path, error.failure_cases, frame, (reading_column, celsius_column), min_rows)
        listing = "\n".join(f"  - {p}" for p in problems)
        raise InvalidInput(f"{path}: {len(problems)} problem(s) in the readings:\n{listing}") from None
    return pd.DataFrame(
        {READING: valid[reading_column].to_numpy(np.float64), CELSIUS: valid[celsius_column].to_numpy(np.float64)}
    )


def load_readings(path: Path, reading_column: str, celsius_column: str, val_fraction: float) -> pd.DataFrame:
    """Read and validate the readings file, with enough rows for a split of `val_fraction`."""
    frame = read_csv(path)
    return validate_readings(frame, path, reading_column, celsius_column, rows_needed(val_fraction))
