"""The store writes atomically, verifies hashes before unpickling, and keeps paths inside; settings refuse bad options."""

import json

import joblib
import pytest
from pydantic import ValidationError

from tasks.durable import sha256_file
from tasks.errors import StoreError
from tasks.settings import CalibrationSettings, describe_validation_error
from tasks.store import Store

KEY = "ab" * 32


def _write(store: Store, value=None):
    return store.write_stage("train", KEY, {"train.joblib": lambda p: joblib.dump(value or {"w": 1.0}, p), "note.txt": lambda p: p.write_text("hi")})


def test_stage_is_written_with_hashes_and_loads(tmp_path):
    store = Store(tmp_path)
    ref = _write(store)
    folder = tmp_path / "stages" / "04_train" / KEY
    assert ref["path"] == f"stages/04_train/{KEY}/train.joblib"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["files"]["train.joblib"] == sha256_file(folder / "train.joblib") == ref["sha256"]
    assert store.load(ref) == {"w": 1.0}
    assert store.stage_intact("train", KEY)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_tampered_file_is_never_unpickled(tmp_path):
    store = Store(tmp_path)
    ref = _write(store)
    path = tmp_path / ref["path"]
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    joblib.dump(Evil(), path)
    assert not store.stage_intact("train", KEY)
    with pytest.raises(StoreError, match="differs from the recorded"):
        store.load(ref)
    assert not marker.exists()


def test_missing_file_is_reported(tmp_path):
    store = Store(tmp_path)
    ref = _write(store)
    (tmp_path / ref["path"]).unlink()
    assert not store.stage_intact("train", KEY)
    with pytest.raises(StoreError, match="missing"):
        store.load(ref)


def test_rewriting_a_damaged_stage_replaces_it(tmp_path):
    store = Store(tmp_path)
    ref = _write(store)
    (tmp_path / ref["path"]).write_bytes(b"garbage")
    ref2 = _write(store)
    assert store.load(ref2) == {"w": 1.0}


def test_paths_cannot_escape_the_store(tmp_path):
    store = Store(tmp_path / "store")
    with pytest.raises(StoreError, match="outside the store"):
        store.path("../../etc/passwd")
    with pytest.raises(StoreError, match="malformed run id"):
        store.run_dir("../elsewhere")
    with pytest.raises(StoreError, match="malformed stage key"):
        store.stage_dir("train", "../x")


def test_failed_first_run_leaves_no_folder(tmp_path):
    store = Store(tmp_path / "new")
    with pytest.raises(RuntimeError):
        with store.tidy_on_failure():
            (store.root / ".records").mkdir(parents=True)
            raise RuntimeError("boom")
    assert not store.root.exists()


def test_latest_manifest(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(StoreError, match="no runs"):
        store.manifest()
    store.write_manifest("20260101-000000-00000001", {"run_id": "a", "created": "2026-01-01T00:00:00"})
    store.write_manifest("20260102-000000-00000002", {"run_id": "b", "created": "2026-01-02T00:00:00"})
    assert store.manifest()["run_id"] == "b"
    with pytest.raises(StoreError, match="no run"):
        store.manifest("20990101-000000-00000009")


@pytest.mark.parametrize(
    "options, field",
    [
        ({"lr": 0}, "lr"), ({"lr": -1e-3}, "lr"), ({"epochs": 0}, "epochs"),
        ({"val_fraction": 1.0}, "val_fraction"), ({"val_fraction": -0.1}, "val_fraction"),
        ({"scale": 0}, "scale"), ({"strategy": "magic"}, "strategy"), ({"normalize": "minmax"}, "normalize"),
        ({"optimizer": "nope"}, "optimizer"), ({"lr": float("nan")}, "lr"),
    ],
)
def test_bad_options_are_refused_naming_the_field(options, field):
    with pytest.raises(ValidationError) as error:
        CalibrationSettings(**options)
    assert f"  --{field.replace('_', '-')}:" in describe_validation_error(error.value)


def test_optimizer_names_are_case_insensitive_and_unknown_ones_list_the_choices():
    assert CalibrationSettings(optimizer="AdamW").optimizer == "adamw"
    with pytest.raises(ValidationError) as error:
        CalibrationSettings(optimizer="nope")
    assert "sgd" in str(error.value) and "rmsprop" in str(error.value)


def test_every_setting_is_a_run_serve_and_sweep_option_derived_from_the_model():
    from flows.cli import _parser, _settings

    for command in ("run", "serve", "sweep"):
        extra = ["--cron", "0 * * * *"] if command == "serve" else []
        args = _parser(command).parse_args([command, *extra])
        assert _settings(args) == CalibrationSettings()  # every default reaches the settings unchanged
    parser = _parser("run")
    actions = {a.dest: a for a in parser._subparsers._group_actions[0].choices["run"]._actions}
    # the other commands' parsers are built without the settings (and pydantic)
    assert "lr" not in {a.dest for a in _parser("predict")._subparsers._group_actions[0].choices["run"]._actions}
    for name, field in CalibrationSettings.model_fields.items():
        action = actions[name]
        assert action.option_strings == ["--" + name.replace("_", "-")]
        assert action.default == field.default and action.help.startswith(field.description)
    assert actions["strategy"].choices == ("finite-difference", "analytic", "autograd", "optimizer")
    assert actions["normalize"].choices == ("none", "scale", "standard")
    assert actions["optimizer"].choices is None  # any case: checked by the settings, which list the names
    assert actions["lr"].type is float and actions["epochs"].type is int
    args = parser.parse_args(["run", "--model", "poly:3", "--val-fraction", "0.3", "--lr", "0.2", "--epochs", "7"])
    assert _settings(args) == CalibrationSettings(model="poly:3", val_fraction=0.3, lr=0.2, epochs=7)


def test_the_plot_draws_the_fitted_curve_densely_over_the_calibrated_range(tmp_path):
    import numpy as np
    import pandas as pd

    from tasks.report import plot_calibration

    seen = []

    def curve(xs):
        seen.append(np.asarray(xs))
        return 0.01 * np.asarray(xs) ** 2

    table = pd.DataFrame({"reading": [10.0, 20.0, 30.0, 45.0], "celsius": [1.0, 4.0, 9.0, 20.0],
                          "subset": ["train", "train", "train", "validation"]})
    plot_calibration(tmp_path / "plot.png", table, curve, (10.0, 30.0), np.array([3.0, 2.0]), np.array([4.0, 3.0]))
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    dense = seen[0]
    assert len(dense) >= 100 and dense.min() == 10.0 and dense.max() == 30.0  # the calibrated range, densely
    assert seen[1].min() == 30.0 and seen[1].max() == 45.0  # beyond it (dashed), up to the last reading


def test_buffers_are_written_whole_hashed_and_synced(tmp_path, monkeypatch):
    import hashlib
    import os

    import numpy as np

    from tasks.durable import Written, write_buffers

    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), fsync(fd)))
    column = np.arange(300_000, dtype=np.float64)
    digest = write_buffers(tmp_path / "x.bin", [b"head", column, column[::-1].copy()])
    data = (tmp_path / "x.bin").read_bytes()
    assert data == b"head" + column.tobytes() + column[::-1].tobytes()
    assert isinstance(digest, Written) and digest == hashlib.sha256(data).hexdigest()
    assert synced  # on disk before the hash is handed out
    with pytest.raises(FileExistsError):  # never over a file that exists
        write_buffers(tmp_path / "x.bin", [b"other"])
    assert (tmp_path / "x.bin").read_bytes() == data


def test_columns_file_is_numpys_own_npy_and_loads_as_the_table(tmp_path):
    import numpy as np

    from tasks.staging import columns_file

    reading, celsius = np.linspace(20, 90, 1001), np.linspace(-5, 40, 1001)
    np.save(tmp_path / "numpy.npy", np.asfortranarray(np.stack([reading, celsius], axis=1)))
    store = Store(tmp_path / "store")
    ref = store.write_stage("ingest", KEY, {"ingest.npy": columns_file([reading, celsius])})
    assert (store.root / ref["path"]).read_bytes() == (tmp_path / "numpy.npy").read_bytes()
    assert ref["sha256"] == sha256_file(tmp_path / "numpy.npy")
    loaded = store.load(ref)
    np.testing.assert_array_equal(loaded[:, 0], reading)
    np.testing.assert_array_equal(loaded[:, 1], celsius)
    with pytest.raises(ValueError, match="equally long"):
        columns_file([reading, celsius[:-1]])


def test_a_stage_written_beside_a_failing_check_is_never_installed(tmp_path):
    import numpy as np

    from tasks.staging import columns_file

    store = Store(tmp_path)

    def check():
        raise ValueError("row 3 is bad")

    with pytest.raises(ValueError, match="row 3 is bad"):
        with store.stage_folder("ingest", KEY) as folder:
            folder.write("ingest.npy", columns_file([np.ones(10), np.zeros(10)]), beside_it=check)
            folder.install()
    assert not store.stage_intact("ingest", KEY)
    assert list(tmp_path.iterdir()) == []  # not even a temporary folder, nor the folders made for it

    def failing_writer(path):
        path.write_bytes(b"part")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with store.stage_folder("ingest", KEY) as folder:
            folder.write("ingest.npy", failing_writer, beside_it=lambda: "checked")
            folder.install()
    assert list(tmp_path.iterdir()) == []

    with store.stage_folder("ingest", KEY) as folder:
        assert folder.write("ingest.npy", columns_file([np.ones(10), np.arange(10.0)]), beside_it=lambda: "checked") == "checked"
        folder.write("note.txt", lambda path: path.write_text("hi"))
        ref = folder.install({"rows": 10})
    assert ref["summary"] == {"rows": 10} and ref["path"].endswith("ingest.npy") and set(ref["files"]) == {"ingest.npy", "note.txt"}
    np.testing.assert_array_equal(store.load(ref)[:, 1], np.arange(10.0))
    assert store.stage_intact("ingest", KEY)

    other = "cd" * 32  # a failure beside an installed stage leaves that stage's folders as they are
    with pytest.raises(ValueError, match="row 3 is bad"):
        with store.stage_folder("ingest", other) as folder:
            folder.write("ingest.npy", columns_file([np.ones(10), np.zeros(10)]), beside_it=check)
    assert [p.name for p in (tmp_path / "stages" / "01_ingest").iterdir()] == [KEY]
