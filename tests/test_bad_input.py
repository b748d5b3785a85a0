"""Every file of tests/corpus and every bad option through the real entry point: exit 2, one message
naming what is wrong and where, no traceback, and the store exactly as it was."""

import json
from pathlib import Path

import pytest

from tests.test_flow import run, run_json, snapshot

CORPUS = Path(__file__).parent / "corpus"

# file -> what the message must say (besides the file's path)
FILES = {
    "does-not-exist.csv": ["no such file"],
    "a-directory": ["is a directory"],
    "empty.csv": ["the file is empty"],
    "header-only.csv": ["0 row(s) of readings", "at least 5"],
    "missing-column.csv": ["column 'celsius' is missing", "columns found: 'reading'"],
    "misnamed-column.csv": ["column 'celsius' is missing", "'temperature'"],
    "non-numeric.csv": ["line 3 (row 2)", "column 'celsius'", "'fourteen' is not a number"],
    "blank-cell.csv": ["line 3 (row 2)", "column 'celsius'", "missing value"],
    "nan.csv": ["line 3 (row 2)", "column 'reading'", "missing value"],
    "inf.csv": ["line 4 (row 3)", "column 'reading'", "inf is not finite"],
    "below-absolute-zero.csv": ["line 4 (row 3)", "column 'celsius'", "-300.0 °C is below absolute zero"],
    "repeated-header.csv": ["line 4 (row 3)", "the header line appears again"],
    "latin1.csv": ["line 4", "not UTF-8"],
    "utf16.csv": ["line 1", "not UTF-8"],
    "semicolons.csv": ["column 'reading' is missing", "separated by ';': give --sep ';'"],
    "too-few-rows.csv": ["3 row(s) of readings", "at least 5"],
    "constant-readings.csv": ["column 'reading' is the same", "two different readings"],
    "ragged-row.csv": ["line 3 has 3 fields but the header has 2"],
    "decimal-comma.csv": ["line 2 has 3 fields", "decimal commas", "--sep ';' --decimal ','"],
}

OPTIONS = {
    "zero-lr": (["--lr", "0"], ["--lr:", "greater than 0"]),
    "negative-lr": (["--lr", "-0.01"], ["--lr:", "greater than 0"]),
    "zero-epochs": (["--epochs", "0"], ["--epochs:", "greater than 0"]),
    "val-fraction-1": (["--val-fraction", "1"], ["--val-fraction:", "less than 1"]),
    "val-fraction-negative": (["--val-fraction", "-0.1"], ["--val-fraction:", "greater than or equal to 0"]),
    "scale-0": (["--scale", "0"], ["--scale:", "must not be 0"]),
    "unknown-optimizer": (["--strategy", "optimizer", "--optimizer", "adamx"], ["--optimizer:", "'adam'", "'sgd'"]),
    "nan-lr": (["--lr", "nan"], ["--lr:"]),
    "sep-digit": (["--sep", "1"], ["--sep:", "one character", "(got '1')"]),
    "sep-equals-decimal": (["--decimal", ","], ["--sep and --decimal are both ','"]),
    "bootstrap-1": (["--bootstrap", "1"], ["--bootstrap:", "at least 2"]),
}


def test_the_corpus_is_complete():
    assert {p.name for p in CORPUS.iterdir()} == set(FILES) - {"does-not-exist.csv"}


@pytest.fixture(scope="module")
def used_store(tmp_path_factory, prefect_server):
    """A store that already holds a good run, so 'unchanged' is a real claim."""
    import shutil

    from tests.conftest import SHIPPED_DATA

    folder = tmp_path_factory.mktemp("used")
    shutil.copy(SHIPPED_DATA, folder / "readings.csv")
    return folder / "store", folder / "readings.csv"


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("name", sorted(FILES))
@pytest.mark.parametrize("which", ["new-store", "used-store"])
def test_bad_file(capsys, tmp_path, used_store, name, which):
    store = tmp_path / "store" if which == "new-store" else used_store[0]
    if which == "used-store" and not store.exists():
        run_json(capsys, store, used_store[1])
    before = snapshot(store)
    data = CORPUS / name
    code, out, err = run(capsys, "run", "--store", str(store), "--data", str(data))
    assert (code, out) == (2, ""), err
    assert f"thermocal: error: {data}" in err
    for part in FILES[name]:
        assert part in err
    assert "Traceback" not in err
    assert snapshot(store) == before


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_bad_option(capsys, tmp_path, name):
    args, expected = OPTIONS[name]
    code, out, err = run(capsys, "run", "--store", str(tmp_path / "store"), *args)
    assert (code, out) == (2, "")
    for part in expected:
        assert part in err
    assert "Traceback" not in err and not (tmp_path / "store").exists()


@pytest.mark.parametrize("args, expected", [
    (["run", "--strategy", "magic"], ["--strategy", "invalid choice", "'analytic'"]),
    (["run", "--normalize", "minmax"], ["--normalize", "invalid choice", "'standard'"]),
    (["run", "--lr", "fast"], ["--lr", "invalid float value"]),
])
def test_malformed_options_are_refused_by_the_parser(capsys, args, expected):
    code, out, err = run(capsys, *args)
    assert code == 2 and out == "" and err.startswith("thermocal: error: argument ")
    for part in expected:
        assert part in err
    code, out, err = run(capsys, *args, "--json")  # said the same way to tools
    assert code == 2 and json.loads(out) == {"error": err.removeprefix("thermocal: error: ").strip(), "exit_code": 2}


@pytest.mark.parametrize("run_id", ["../../etc", "20260101-000000-zzzzzzzz", "/tmp/x"])
def test_run_ids_cannot_leave_the_store(capsys, tmp_path, run_id):
    code, out, err = run(capsys, "predict", "45", "--run", run_id, "--store", str(tmp_path))
    assert code == 2 and "malformed run id" in err and "Traceback" not in err
