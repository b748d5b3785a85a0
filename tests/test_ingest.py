"""The readings schema accepts the shipped data and rejects each bad case with a message naming it."""

from pathlib import Path

import pandas as pd
import pytest

from tasks.errors import InvalidInput
from tasks.ingest import load_readings
from tasks.split import rows_needed
from tests.conftest import SHIPPED_DATA


def _load(path: Path, val_fraction: float = 0.2, reading="reading", celsius="celsius"):
    return load_readings(path, reading, celsius, rows_needed(val_fraction))


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "readings.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


GOOD_ROWS = "1.0,2.0\n2.0,3.0\n3.0,4.5\n4.0,5.0\n5.0,6.5\n"


def test_shipped_data_is_valid():
    table = _load(SHIPPED_DATA)
    assert list(table.columns) == ["reading", "celsius"] and len(table) == 11
    assert table.dtypes.tolist() == ["float64", "float64"]
    assert table["reading"].iloc[0] == 35.7 and table["celsius"].iloc[-1] == 21.0


@pytest.mark.parametrize(
    "body, expected",
    [
        ("reading,celsius\n1.0,abc\n" + GOOD_ROWS, ["line 2", "'celsius'", "'abc' is not a number"]),
        ("reading,celsius\n1.0,\n" + GOOD_ROWS, ["line 2", "'celsius'", "missing value"]),
        ("reading,celsius\nNaN,1.0\n" + GOOD_ROWS, ["line 2", "'reading'", "missing value"]),
        ("reading,celsius\ninf,1.0\n" + GOOD_ROWS, ["line 2", "'reading'", "inf is not finite"]),
        ("reading,celsius\n" + GOOD_ROWS + "7.0,-300\n", ["line 7", "'celsius'", "below absolute zero"]),
        ("reading,temp\n" + GOOD_ROWS, ["column 'celsius' is missing", "'temp'"]),
        ("reading;celsius\n1;2\n", ["column 'reading' is missing", "separated by ';'"]),
        ("reading,celsius\n", ["0 row(s)", "at least 5"]),
        ("reading,celsius\n1,2\n2,3\n", ["2 row(s)", "at least 5"]),
        ("reading,celsius\n" + GOOD_ROWS[:24] + "reading,celsius\n" + GOOD_ROWS, ["line 5", "the header line appears again"]),
        ("reading,celsius\n" + "3.0,1.0\n" * 6, ["column 'reading' is the same", "two different readings"]),
    ],
    ids=["non-numeric", "blank", "nan", "inf", "below-absolute-zero", "misnamed-column", "semicolons",
         "header-only", "too-few-rows", "repeated-header", "constant-readings"],
)
def test_bad_files_are_refused_with_a_message_naming_the_problem(tmp_path, body, expected):
    with pytest.raises(InvalidInput) as error:
        _load(_write(tmp_path, body))
    message = str(error.value)
    assert str(tmp_path / "readings.csv") in message
    for part in expected:
        assert part in message


def test_every_failure_is_listed_at_once(tmp_path):
    path = _write(tmp_path, "reading,celsius\nx,1\n2,\n3,-500\n" + GOOD_ROWS)
    message = str(pytest.raises(InvalidInput, _load, path).value)
    assert "3 problem(s)" in message
    assert message.index("line 2") < message.index("line 3") < message.index("line 4")


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p / "missing.csv", "no such file"),
        (lambda p: p, "is a directory"),
        (lambda p: _write(p, ""), "empty"),
        (lambda p: _write(p, "reading,celsius\n1,2\n".encode() + b"\xff\xfe,3\n"), "not UTF-8"),
    ],
    ids=["missing-file", "directory", "empty-file", "not-utf8"],
)
def test_unreadable_files(tmp_path, make, expected):
    with pytest.raises(InvalidInput, match=expected):
        _load(make(tmp_path))


def test_no_validation_split_needs_two_rows(tmp_path):
    path = _write(tmp_path, "reading,celsius\n1,2\n2,3\n")
    assert len(_load(path, val_fraction=0.0)) == 2


def test_custom_column_names_and_extra_columns(tmp_path):
    path = _write(tmp_path, "when,t_u,t_c\n" + "".join(f"2026-01-0{i},{i}.0,{2 * i}.0\n" for i in range(1, 7)))
    table = _load(path, reading="t_u", celsius="t_c")
    assert list(table.columns) == ["reading", "celsius"]
    pd.testing.assert_series_equal(table["celsius"], 2 * table["reading"], check_names=False)


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    path = _write(tmp_path, "reading,celsius\n1,2\n\n2,3\n3,4\n4,5\n5,oops\n")
    message = str(pytest.raises(InvalidInput, _load, path).value)
    assert "line 7" in message
