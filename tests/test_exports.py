"""Logger and spreadsheet exports as they come: ';' between fields and ',' as the decimal mark, on
the real entry point, give the same calibration as the comma-separated file."""

import pandas as pd
import pytest

from tests.test_flow import run, run_json

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_a_european_export_calibrates_like_the_csv(capsys, tmp_path, readings_csv):
    european = tmp_path / "export.csv"
    table = pd.read_csv(readings_csv)
    european.write_text("reading;celsius\n" + "".join(f"{r};{c}\n".replace(".", ",") for r, c in table.itertuples(index=False)))
    expected = run_json(capsys, tmp_path / "store", readings_csv, "--predict", "45")
    result = run_json(capsys, tmp_path / "store", european, "--sep", ";", "--decimal", ",", "--predict", "45")
    assert result["calibration"] == expected["calibration"] and result["predictions"] == expected["predictions"]

    code, out, err = run(capsys, "run", "--store", str(tmp_path / "store"), "--data", str(european))
    assert code == 2 and "give --sep ';'" in err and "Traceback" not in err
    code, out, err = run(capsys, "run", "--store", str(tmp_path / "store"), "--data", str(european), "--sep", ";")
    assert code == 2 and "'35,7' is not a number (a decimal comma: give --decimal ',')" in err
