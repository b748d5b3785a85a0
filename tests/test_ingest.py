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
        ("reading;celsius\n1;2\n", ["column 'reading' is missing", "separated by ';': give --sep ';'"]),
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


EUROPEAN = "reading;celsius;note\n35,7;0,5;a\n55,9;14,0;b\n58,2;15,0;\n81,9;28,0;c\n56,3;11,0;d\n48,9;8,0;e\n"


def test_european_exports_read_with_sep_and_decimal(tmp_path):
    from tasks.ingest import load_readings

    path = _write(tmp_path, EUROPEAN)
    table = load_readings(path, "reading", "celsius", 5, sep=";", decimal=",")
    assert table["reading"].tolist() == [35.7, 55.9, 58.2, 81.9, 56.3, 48.9]
    assert table["celsius"].tolist() == [0.5, 14.0, 15.0, 28.0, 11.0, 8.0]
    tabbed = _write(tmp_path, EUROPEAN.replace(";", "\t"))
    assert load_readings(tabbed, "reading", "celsius", 5, sep="\t", decimal=",").equals(table)


def test_messages_name_sep_and_decimal(tmp_path):
    from tasks.ingest import load_readings

    path = _write(tmp_path, EUROPEAN)
    # fields split right but numbers still with decimal commas: every cell named, and the option
    message = str(pytest.raises(InvalidInput, load_readings, path, "reading", "celsius", 5, sep=";").value)
    assert "line 2 (row 1), column 'reading': '35,7' is not a number (a decimal comma: give --decimal ',')" in message
    assert "12 problem(s)" in message
    # neither option: the header reads as one column
    message = str(pytest.raises(InvalidInput, load_readings, path, "reading", "celsius", 5).value)
    assert "separated by ';': give --sep ';' (and --decimal ',' if its numbers are written 0,5)" in message
    tabbed = _write(tmp_path, "reading\tcelsius\n1\t2\n")
    assert "give --sep tab" in str(pytest.raises(InvalidInput, load_readings, tabbed, "reading", "celsius", 1).value)


@pytest.mark.parametrize(
    "body, early",
    [
        ("reading,celsius\n" + GOOD_ROWS, True),  # both parsed as float64: written while the schemas are checked
        ("reading,celsius\n1,2\n2,3\n3,4\n4,5\n5,7\n", False),  # integers: written from the validated (float64) table
        ("reading,celsius,note\n1.5,2,a\n2.5,3,b\n3.5,4,c\n4.5,5,d\n5.5,7,e\n", False),
    ],
)
def test_the_columns_written_early_are_the_validated_table(tmp_path, body, early):
    import numpy as np

    from tasks.ingest import parsed_floats, read_readings, validate_readings

    path = _write(tmp_path, body)
    frame, found = read_readings(path, "reading", "celsius")
    columns = parsed_floats(frame, "reading", "celsius")
    table = validate_readings(frame, found, path, "reading", "celsius", 5)
    assert (columns is not None) == early
    expected = pd.read_csv(path)[["reading", "celsius"]].to_numpy(np.float64)
    np.testing.assert_array_equal(table.to_numpy(), expected)
    if early:
        np.testing.assert_array_equal(np.stack(columns, axis=1), expected)
        assert all(np.shares_memory(c, frame[name].to_numpy()) for c, name in zip(columns, ["reading", "celsius"]))  # no copy


@pytest.mark.parametrize("bad, message", [("inf", "inf is not finite"), ("-inf", "-inf is not finite"), ("-273.16", "below absolute zero")])
@pytest.mark.parametrize("where", [0, 4])
def test_a_single_bad_row_is_named_wherever_it_is(tmp_path, bad, message, where):
    """The checks answer for the whole column from its minimum and maximum; one bad value anywhere
    sends them back to row-by-row, which names it."""
    rows = GOOD_ROWS.splitlines()
    column = "reading" if "inf" in bad else "celsius"
    rows[where] = f"{bad},2.0" if column == "reading" else f"1.0,{bad}"
    path = _write(tmp_path, "reading,celsius\n" + "\n".join(rows) + "\n")
    error = str(pytest.raises(InvalidInput, _load, path).value)
    assert f"line {where + 2} (row {where + 1}), column '{column}'" in error and message in error
    assert "1 problem(s)" in error
