"""The data contract: reading the CSV of paired readings and validating it with pandera."""

from __future__ import annotations

import csv
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa

from tasks.errors import UNREADABLE, InvalidInput, unreadable

ABSOLUTE_ZERO_C = -273.15
READING, CELSIUS, SENSOR = "reading", "celsius", "sensor"  # the names every later stage uses
MAX_SENSOR_ID = 64  # characters of a sensor id, after stripping the spaces around it


def _numeric(series: pd.Series) -> pd.Series:
    # checks also run on a column whose float coercion failed; judge only its numeric cells there
    if pd.api.types.is_float_dtype(series):
        return series  # no copy: on 10 million rows each copy costs about 0.1 s in page faults
    return pd.to_numeric(series, errors="coerce")


def _all_within(series: pd.Series, low: float) -> bool:
    """True when a float64 column's values are all finite and at least `low`, judged by its minimum
    and maximum (NaN makes them NaN): two reductions and no temporary array (on 10 million rows
    about 8 ms, where the element-wise check's boolean arrays took about 18 ms). False means only
    that the element-wise check must tell."""
    if series.dtype != np.float64 or series.empty:
        return False
    values = series.to_numpy()
    lowest, highest = values.min(), values.max()
    return bool(np.isfinite(lowest) and np.isfinite(highest) and lowest >= low)


def readings_schema(reading_column: str, celsius_column: str) -> pa.DataFrameSchema:
    """Row by row: two numeric, finite, complete columns; celsius at or above absolute zero. Each
    check answers True for the whole column when its minimum and maximum show every row passes,
    and row by row otherwise, so that failures name their rows."""
    finite = pa.Check(lambda s: _all_within(s, -np.inf) or ~np.isinf(_numeric(s)), name="finite")
    return pa.DataFrameSchema(
        {
            reading_column: pa.Column(float, checks=[finite], coerce=True, nullable=False),
            celsius_column: pa.Column(
                float,
                checks=[
                    finite,
                    pa.Check(
                        # NaN is judged by not_nullable
                        lambda s: _all_within(s, ABSOLUTE_ZERO_C) or ~(_numeric(s) < ABSOLUTE_ZERO_C),
                        name="at_or_above_absolute_zero",
                    ),
                ],
                coerce=True,
                nullable=False,
            ),
        },
        strict=False,  # extra columns (a timestamp, a note) are allowed and ignored
        name="readings",
    )


def _varies(column: pd.Series) -> bool:
    values = column.to_numpy()  # NaN is ruled out already; pandas' reductions, which skip it, cost several times more
    return len(values) < 2 or values.min() < values.max()


def table_schema(min_rows: int) -> pa.DataFrameSchema:
    """The whole table: enough rows for the split asked, and readings that vary."""
    return pa.DataFrameSchema(
        checks=[
            pa.Check(lambda df: len(df) >= min_rows, name="enough_rows"),
            # a line through readings that are all equal is not determined
            pa.Check(lambda df: _varies(df[READING]), name="distinct_readings"),
        ],
        name="readings table",
    )


def _first_undecodable(path: Path) -> tuple[int, int]:
    """(line, byte offset) of the first bytes that are not UTF-8."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return data[: error.start].count(b"\n") + 1, error.start
    return 1, 0


def _first_ragged_line(path: Path, sep: str = ",") -> tuple[int, int, int] | None:
    """(line, fields, header fields) of the first line whose field count differs from the header's."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = csv.reader(handle, delimiter=sep)
        header = len(next(rows, []))
        for number, row in enumerate(rows, start=2):
            if row and len(row) != header:
                return number, len(row), header
    return None


def _ragged(path: Path, sep: str = ",") -> InvalidInput:
    found = _first_ragged_line(path, sep)
    if found is None:
        return InvalidInput(f"{path}: not a readable CSV (rows and header disagree on the number of fields)")
    line, fields, header = found
    hint = ("check for a stray comma, or decimal commas: a file written as 0,5 with ';' between fields "
            "needs --sep ';' --decimal ','") if sep == "," else f"check for a stray {sep!r} (the field separator, --sep)"
    return InvalidInput(f"{path}: line {line} has {fields} fields but the header has {header}; {hint}")


def _separator_hint(found: list, sep: str) -> str:
    """What to say when the header reads as one column: the separator it seems to use."""
    if len(found) != 1:
        return ""
    header = str(found[0])
    for candidate, name in ((";", "';'"), ("\t", "tab"), ("|", "'|'"), (",", "','")):
        if candidate != sep and candidate in header:
            decimal = " (and --decimal ',' if its numbers are written 0,5)" if candidate == ";" else ""
            return f"; the file looks separated by {name}: give --sep {name}{decimal}"
    return ""


DECIMAL_COMMA = re.compile(r"[+-]?\d+,\d+([eE][+-]?\d+)?")  # 0,5 or -12,25: a number written with a decimal comma
MAX_LISTED = 50  # problems listed in one message; the rest are counted


@contextmanager
def _parsing(path: Path, sep: str):
    """Every way pd.read_csv finds a file unreadable, within the block, turned into a message naming it."""
    try:
        with warnings.catch_warnings():
            # pandas otherwise drops a first row's extra field with only a warning, or turns the
            # first column into the index: either silently changes the data
            warnings.simplefilter("error", pd.errors.ParserWarning)
            yield
    except UNREADABLE as error:
        raise unreadable(path, error) from None
    except pd.errors.EmptyDataError:
        raise InvalidInput(f"{path}: the file is empty; expected a header line and rows of readings") from None
    except UnicodeDecodeError:
        line, offset = _first_undecodable(path)
        raise InvalidInput(f"{path}: line {line} (byte {offset}) is not UTF-8 text; save the file as UTF-8 CSV") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning):
        raise _ragged(path, sep) from None


def _read(path: Path, sep: str = ",", decimal: str = ".", **options) -> pd.DataFrame:
    """pd.read_csv, with a message naming the file when it cannot be read.

    One pass with pandas' defaults is the fastest read (blank lines skipped, spaces around
    numbers allowed); its parser buffers peak at about 2.6x the parsed table.
    """
    with _parsing(path, sep):
        return pd.read_csv(path, encoding="utf-8-sig", index_col=False, sep=sep, decimal=decimal, **options)


def file_lines(path: Path, rows: set[int]) -> dict[int, int]:
    """The file line of each data row asked (pandas skips blank lines, so row + 2 may be wrong)."""
    lines, row = {}, -1
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        next(handle, None)  # the header
        for number, text in enumerate(handle, start=2):
            if text.strip():
                row += 1
                if row in rows:
                    lines[row] = number
                    if len(lines) == len(rows):
                        break
    return lines


def lines_of_rows(data: str | Path, rows) -> dict[int, int]:
    """file_lines for a validation that names rows: {} when none are asked or the file moved since
    it was ingested (the caller then says row + 2, right unless the file holds blank lines)."""
    rows = {int(r) for r in rows}
    if not rows:
        return {}
    try:
        return file_lines(Path(data), rows)
    except OSError:
        return {}


def _describe_failures(
    failures: pd.DataFrame, found: list, reading_column: str, min_rows: int, rows: int, path: Path | None = None,
    sep: str = ",", decimal: str = ".",
) -> list[str]:
    """One line per failure, in file order: where (line, row, column), the value, the rule."""
    lines: list[tuple[float, str]] = []
    indices = {int(i) for i in failures["index"] if i is not None and not pd.isna(i)}
    lines_of = file_lines(path, indices) if path is not None and indices else {}
    coerce_failed = set(failures.loc[failures["check"].astype(str).str.startswith("coerce_dtype"), "column"])
    repeated_headers = set()
    for row in failures.itertuples(index=False):
        check, column, value, index = str(row.check), row.column, row.failure_case, row.index
        if check.startswith("dtype(") and column in coerce_failed:
            continue  # the same cells as the coercion failure
        if index is not None and not pd.isna(index):
            index = int(index)
            where = f"line {lines_of.get(index, index + 2)} (row {index + 1})"
        else:
            where = ""
        if check == "column_in_dataframe":
            hint = _separator_hint(found, sep)
            if hint:
                pass
            elif len(found) >= 2 and not any("--reading-column" in text for _, text in lines):
                hint = "; name the file's own columns with --reading-column and --celsius-column"
            lines.append((-1, f"column {value!r} is missing (columns found: {', '.join(repr(c) for c in found)}){hint}"))
        elif check == "enough_rows":
            lines.append((-1, f"{rows} row(s) of readings; at least {min_rows} needed (2 to train, 1 to validate when --val-fraction > 0)"))
        elif check == "distinct_readings":
            lines.append((-1, f"every value in column {reading_column!r} is the same; a calibration needs at least two different readings"))
        elif check.startswith("coerce_dtype") and value == column:
            if index not in repeated_headers:
                repeated_headers.add(index)
                lines.append((index, f"{where}: the header line appears again"))
        elif check.startswith("coerce_dtype"):
            comma = decimal == "." and isinstance(value, str) and DECIMAL_COMMA.fullmatch(value.strip())
            hint = " (a decimal comma: give --decimal ',')" if comma else ""
            lines.append((index, f"{where}, column {column!r}: {value!r} is not a number{hint}"))
        elif check == "not_nullable":
            lines.append((index, f"{where}, column {column!r}: missing value (blank or NaN)"))
        elif check == "finite":
            lines.append((index, f"{where}, column {column!r}: {value} is not finite"))
        elif check == "at_or_above_absolute_zero":
            lines.append((index, f"{where}, column {column!r}: {value} °C is below absolute zero ({ABSOLUTE_ZERO_C})"))
        elif check == "sensor_id_present":
            lines.append((index, f"{where}, column {column!r}: missing sensor id (blank or NaN)"))
        elif check == "sensor_id_length":
            shown = value if len(value) <= MAX_SENSOR_ID + 16 else value[:MAX_SENSOR_ID] + "…"
            lines.append((index, f"{where}, column {column!r}: sensor id {shown!r} has {len(value)} characters; at most {MAX_SENSOR_ID}"))
        else:
            lines.append((index if where else -1, f"{where or 'table'}, column {column!r}: {value!r} fails {check}"))
    lines.sort(key=lambda item: item[0])
    return [text for _, text in lines]


def _refused(path: Path, problems: list[str]) -> InvalidInput:
    listing = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
    more = f"\n  … and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return InvalidInput(f"{path}: {len(problems)} problem(s) in the readings:\n{listing}{more}")


def _failures(schema: pa.DataFrameSchema, frame: pd.DataFrame) -> pd.DataFrame | None:
    try:
        schema.validate(frame, lazy=True, inplace=True)  # no copy of a frame that may be gigabytes
    except pa.errors.SchemaErrors as error:
        return error.failure_cases
    return None


def check_header(
    path: Path, reading_column: str, celsius_column: str, sep: str = ",", decimal: str = ".", sensor_column: str | None = None,
) -> list[str]:
    """The file's column names, or InvalidInput when it cannot be read or lacks a column asked for
    (cheap: the header line only, so a command can say so before starting anything)."""
    found = list(_read(path, sep, decimal, nrows=0).columns)
    problems = []
    if reading_column not in found or celsius_column not in found:
        failures = _failures(readings_schema(reading_column, celsius_column), pd.DataFrame(columns=found))  # names every missing column
        problems = _describe_failures(failures, found, reading_column, 0, 0, sep=sep, decimal=decimal)
    if sensor_column is not None and sensor_column not in found:
        hint = _separator_hint(found, sep) or "; name the file's sensor-id column with --sensor-column"
        problems.append(f"column {sensor_column!r} is missing (columns found: {', '.join(repr(c) for c in found)}){hint}")
    if problems:
        raise _refused(path, problems)
    return found


def read_readings(path: Path, reading_column: str, celsius_column: str, sep: str = ",", decimal: str = ".") -> tuple[pd.DataFrame, list]:
    """The file as pandas parses it (only the two columns when it has others) and its header's
    column names; InvalidInput when it cannot be read or lacks a column asked for."""
    found = check_header(path, reading_column, celsius_column, sep, decimal)
    # usecols skips extra columns but doubles parse time: only ask for it when there are extra columns
    frame = _read(path, sep, decimal, usecols=[reading_column, celsius_column]) if len(found) > 2 else _read(path, sep, decimal)
    return frame, found


def parsed_floats(frame: pd.DataFrame, reading_column: str, celsius_column: str) -> list[np.ndarray] | None:
    """The two columns as the ingested table will hold them, when that is known before validation:
    both parsed as float64, which the schema then leaves as they are. None otherwise."""
    columns = [frame[reading_column], frame[celsius_column]]
    return [column.to_numpy() for column in columns] if all(column.dtype == np.float64 for column in columns) else None


def validate_readings(frame: pd.DataFrame, found: list, path: Path, reading_column: str, celsius_column: str, min_rows: int,
                      sep: str = ",", decimal: str = ".") -> pd.DataFrame:
    """The parsed file held to the readings schema, then the table schema: the readings as float64
    columns `reading` and `celsius`, or InvalidInput listing every problem. The frame pandas
    returned is validated and kept as it is (no copy)."""
    failures = _failures(readings_schema(reading_column, celsius_column), frame)
    if failures is not None:
        raise _refused(path, _describe_failures(failures, found, reading_column, min_rows, len(frame), path, sep, decimal))
    table = frame.rename(columns={reading_column: READING, celsius_column: CELSIUS})[[READING, CELSIUS]].astype(np.float64)
    if (failures := _failures(table_schema(min_rows), table)) is not None:
        raise _refused(path, _describe_failures(failures, found, reading_column, min_rows, len(table)))
    return table


def load_readings(path: Path, reading_column: str, celsius_column: str, min_rows: int, sep: str = ",", decimal: str = ".") -> pd.DataFrame:
    """The file's readings as float64 columns `reading` and `celsius`, or InvalidInput listing every
    problem (read_readings, then validate_readings); peak memory is pandas' own parse of the columns."""
    frame, found = read_readings(path, reading_column, celsius_column, sep, decimal)
    return validate_readings(frame, found, path, reading_column, celsius_column, min_rows, sep, decimal)
