"""Fleets: load_fleet reads a CSV of many sensors' readings into codes and floats, refusing bad ids
with every line named; synth --sensors writes such a file from hidden calibrations it can report."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks import fleet_ingest, synth
from tasks.errors import InvalidInput
from tasks.fleet_ingest import load_fleet
from tasks.ingest import MAX_SENSOR_ID, check_header
from tasks.synth import SENSORS_PER_BROKEN, write_fleet, write_synthetic

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str, name: str = "fleet.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _load(path: Path, **options):
    return load_fleet(path, "reading", "celsius", "sensor", **options)


def _raw(path: Path) -> pd.DataFrame:
    """The file as plain pandas reads it, ids as text."""
    return pd.read_csv(path, dtype={"sensor": str})


# load_fleet


@pytest.fixture(params=[None, 7], ids=["one-chunk", "chunks-of-7-rows"])
def chunk_rows(request, monkeypatch):
    """load_fleet's default chunk, or chunks of 7 rows: sensors and problems straddle chunks."""
    if request.param is not None:
        monkeypatch.setattr(fleet_ingest, "CHUNK_ROWS", request.param)


@pytest.mark.usefixtures("chunk_rows")
def test_a_synthetic_fleet_round_trips(tmp_path):
    path = tmp_path / "fleet.csv"
    write_fleet(path, sensors=30, rows=3000, seed=4)
    table, sensors = _load(path)
    raw = _raw(path)
    assert list(table.columns) == ["reading", "celsius", "sensor"]
    assert table.dtypes.tolist() == ["float64", "float64", "int32"] and len(table) == 3000
    assert sensors.tolist() == sorted(raw["sensor"].unique()) and len(sensors) == 30
    assert all(isinstance(s, str) for s in sensors)
    assert (sensors[table["sensor"]] == raw["sensor"].to_numpy()).all()
    np.testing.assert_array_equal(table["reading"], raw["reading"])
    np.testing.assert_array_equal(table["celsius"], raw["celsius"])


def test_codes_follow_sorted_ids_whatever_the_row_order(tmp_path):
    lines = ["b,1,2", "a,2,3", "c,3,4", "a,4,5", "b,5,6"]
    forward, sensors = _load(_write(tmp_path, "sensor,reading,celsius\n" + "\n".join(lines) + "\n", "a.csv"))
    backward, again = _load(_write(tmp_path, "sensor,reading,celsius\n" + "\n".join(lines[::-1]) + "\n", "b.csv"))
    assert sensors.tolist() == again.tolist() == ["a", "b", "c"]
    assert forward["sensor"].tolist() == [1, 0, 2, 0, 1] and backward["sensor"].tolist() == [1, 0, 2, 0, 1][::-1]


def test_ids_are_text_compared_without_surrounding_spaces(tmp_path):
    path = _write(tmp_path, "sensor,reading,celsius\n007,1,2\n7,2,3\n0070,3,4\n 007 ,4,5\n")
    table, sensors = _load(path)
    assert sensors.tolist() == ["007", "0070", "7"]  # dtype='category' would give the numbers 7 and 70
    assert table["sensor"].tolist() == [0, 2, 1, 0]
    _, sensors = _load(_write(tmp_path, "sensor,reading,celsius\nTrue,1,2\nFALSE,2,3\n", "booleans.csv"))
    assert sensors.tolist() == ["FALSE", "True"]


@pytest.mark.usefixtures("chunk_rows")
def test_every_bad_id_and_cell_is_listed_with_its_line(tmp_path):
    longest, too_long = "x" * MAX_SENSOR_ID, "y" * (MAX_SENSOR_ID + 1)
    path = _write(tmp_path, f"sensor,reading,celsius\ns1,1,2\n,2,3\n{too_long},3,4\n{longest},4,5\n   ,5,6\ns2,abc,7\nNA,7,8\n")
    message = str(pytest.raises(InvalidInput, _load, path).value)
    assert str(path) in message and "5 problem(s)" in message
    expected = [
        "line 3 (row 2), column 'sensor': missing sensor id (blank or NaN)",
        f"line 4 (row 3), column 'sensor': sensor id '{too_long}' has 65 characters; at most 64",
        "line 6 (row 5), column 'sensor': missing sensor id (blank or NaN)",
        "line 7 (row 6), column 'reading': 'abc' is not a number",
        "line 8 (row 7), column 'sensor': missing sensor id (blank or NaN)",
    ]
    assert [line.removeprefix("  - ") for line in message.splitlines()[1:]] == expected  # file order; the 64-char id passes


def test_a_missing_sensor_column_is_named_with_the_columns_found(tmp_path):
    path = _write(tmp_path, "id,reading,celsius\ns1,1,2\n")
    for refuse in (lambda: _load(path), lambda: check_header(path, "reading", "celsius", sensor_column="sensor")):
        message = str(pytest.raises(InvalidInput, refuse).value)
        assert "column 'sensor' is missing (columns found: 'id', 'reading', 'celsius')" in message and "--sensor-column" in message
    assert check_header(path, "reading", "celsius") == ["id", "reading", "celsius"]  # no sensor column asked for


def test_an_empty_fleet_is_refused(tmp_path):
    assert "0 row(s) of readings" in str(pytest.raises(InvalidInput, _load, _write(tmp_path, "sensor,reading,celsius\n")).value)


def test_european_fleet_exports_read_identically(tmp_path):
    path = tmp_path / "fleet.csv"
    write_fleet(path, sensors=12, rows=600, seed=2)
    text = path.read_text()
    european = _write(tmp_path, text.replace(",", ";").replace(".", ","), "european.csv")
    table, sensors = _load(path)
    same, again = _load(european, sep=";", decimal=",")
    pd.testing.assert_frame_equal(table, same)
    assert sensors.tolist() == again.tolist()
    # decimal commas without --decimal: each cell named, with the option to give
    message = str(pytest.raises(InvalidInput, _load, european, sep=";").value)
    assert "(a decimal comma: give --decimal ',')" in message


# synth --sensors


def test_a_fleet_matches_its_hidden_calibrations(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "CHUNK", 997)  # sensors straddle chunks: their clocks and weather carry over
    path, truth_path = tmp_path / "fleet.csv", tmp_path / "truth.csv"
    written = write_fleet(path, sensors=40, rows=24_000, seed=3, truth=truth_path)
    raw = _raw(path)
    truth = pd.read_csv(truth_path, dtype={"sensor": str}, keep_default_na=False).set_index("sensor")
    assert list(raw.columns) == ["sensor", "reading", "celsius"] and len(raw) == written["rows"] == 24_000
    assert raw["sensor"].nunique() == written["sensors"] == len(truth) == 40 and written["broken"] == []
    assert list(truth.columns) == ["slope", "intercept", "noise_celsius", "broken"] and (truth["broken"] == "").all()
    counts = raw.groupby("sensor").size()
    assert counts.min() > 300 and counts.max() < 1000 and counts.std() > 50  # ragged, around 600 each
    for sensor, rows in raw.groupby("sensor"):
        hidden = truth.loc[sensor]
        x, y = rows["reading"].to_numpy(), rows["celsius"].to_numpy()
        slope, intercept = np.polyfit(x, y, 1)
        # the least-squares standard errors the sensor's own noise implies; 5 of them is a generous bound
        sxx = ((x - x.mean()) ** 2).sum()
        assert abs(slope - hidden["slope"]) < 5 * hidden["noise_celsius"] / np.sqrt(sxx)
        assert abs(intercept - hidden["intercept"]) < 5 * hidden["noise_celsius"] * np.sqrt(1 / len(x) + x.mean() ** 2 / sxx)
        residual = y - (slope * x + intercept)
        assert residual.std() == pytest.approx(hidden["noise_celsius"], rel=0.15)


def test_a_few_sensors_are_broken(tmp_path):
    path, truth_path = tmp_path / "fleet.csv", tmp_path / "truth.csv"
    written = write_fleet(path, sensors=2 * SENSORS_PER_BROKEN, rows=12_000, seed=5, truth=truth_path)
    truth = pd.read_csv(truth_path, dtype={"sensor": str}, keep_default_na=False)
    broken = truth[truth["broken"] != ""]
    assert len(broken) / len(truth) <= 0.0005 and sorted(broken["broken"]) == ["single_row", "stuck"]
    assert written["broken"] == [{"sensor": s, "reason": r} for s, r in zip(broken["sensor"], broken["broken"])]
    table, sensors = _load(path)  # broken sensors are data, not a bad file
    assert len(sensors) == 2 * SENSORS_PER_BROKEN and len(table) == 12_000
    rows = pd.DataFrame({"sensor": sensors[table["sensor"]], "reading": table["reading"]}).groupby("sensor")["reading"]
    stuck, single = (broken.loc[broken["broken"] == kind, "sensor"].item() for kind in ("stuck", "single_row"))
    constant = rows.size().index[(rows.size() > 1) & (rows.nunique() == 1)]
    assert constant.tolist() == [stuck] and rows.size()[single] == 1


def test_the_same_seed_writes_the_same_bytes(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_fleet(tmp_path / f"{name}.csv", sensors=20, rows=2000, seed=seed, truth=tmp_path / f"{name}-truth.csv")
    written = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert written["a.csv"] == written["b.csv"] != written["c.csv"]
    assert written["a-truth.csv"] == written["b-truth.csv"] != written["c-truth.csv"]


def test_rows_are_formatted_with_two_decimals():
    values = np.array([0.0, -0.004, 0.005, -1.5, 123456.789, 9.995, -99.999, 10.0, -0.01, 1e6, 3.14159])
    names = np.frombuffer(b"s0s1", np.uint8).reshape(2, 2)
    text = synth._fleet_csv(names, np.arange(len(values)) % 2, values, -values)
    lines = text.decode().splitlines()
    assert lines[:2] == ["s0,0.00,0.00", "s1,0.00,0.00"]  # -0.004 is 0.00, not -0.00
    assert lines[4] == "s0,123456.79,-123456.79"
    parsed = np.array([line.split(",")[1:] for line in lines], dtype=float)
    np.testing.assert_array_equal(parsed[:, 0], np.rint(values * 100) / 100)
    np.testing.assert_array_equal(parsed[:, 1], np.rint(-values * 100) / 100)


# the command line, in a fresh process


def _synth(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows", "synth", *args], check=False, capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_synth_sensors_command(tmp_path):
    out, truth = tmp_path / "fleet.csv", tmp_path / "truth.csv"
    done = _synth("--sensors", "50", "--rows", "2000", "--out", str(out), "--truth", str(truth), "--seed", "9", "--json")
    assert done.returncode == 0, done.stderr
    written = json.loads(done.stdout)
    assert written == {"path": str(out), "rows": 2000, "sensors": 50, "seed": 9, "truth": str(truth), "broken": [],
                       "dropouts_kept_out": written["dropouts_kept_out"]}
    assert len(_raw(out)) == 2000 and len(pd.read_csv(truth)) == 50
    human = _synth("--sensors", "50", "--rows", "2000", "--out", str(tmp_path / "again.csv"), "--seed", "9")
    assert human.returncode == 0 and "2000 readings of 50 sensors" in human.stdout
    assert (tmp_path / "again.csv").read_bytes() == out.read_bytes()


def test_synth_without_sensors_is_unchanged(tmp_path):
    done = _synth("--rows", "500", "--out", str(tmp_path / "one.csv"), "--seed", "4")
    assert done.returncode == 0, done.stderr
    write_synthetic(tmp_path / "direct.csv", 500, seed=4)
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "direct.csv").read_bytes()


@pytest.mark.parametrize("args, expected", [
    (["--sensors", "0", "--rows", "10"], "--sensors must be at least 1 (got 0)"),
    (["--sensors", "20", "--rows", "10"], "--rows must be at least --sensors"),
    (["--rows", "10", "--truth", "TRUTH"], "--truth needs --sensors"),
    (["--sensors", "2", "--rows", "10", "--truth", "OUT"], "--truth and --out both name"),
    (["--sensors", "2", "--rows", "10", "--truth", "DIR"], "is a directory; --truth names the CSV file to write"),
], ids=["no-sensors", "fewer-rows-than-sensors", "truth-without-sensors", "truth-is-out", "truth-is-a-directory"])
def test_bad_synth_values_write_nothing(tmp_path, args, expected):
    out = tmp_path / "fleet.csv"
    paths = {"TRUTH": str(tmp_path / "truth.csv"), "OUT": str(out), "DIR": str(tmp_path)}
    done = _synth(*[paths.get(arg, arg) for arg in args], "--out", str(out))
    assert (done.returncode, done.stdout) == (2, "")
    assert expected in done.stderr and "Traceback" not in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == []
