"""Normalization round-trips; the split is disjoint, complete and seeded in any process."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tasks.errors import InvalidInput
from tasks.normalize import fit_normalizer
from tasks.split import rows_needed, split_indices, validation_size

X = np.array([35.7, 55.9, 58.2, 81.9, 56.3, 48.9, 33.9, 21.8, 48.4, 60.4, 68.4])


@pytest.mark.parametrize("method", ["none", "scale", "standard"])
def test_normalization_round_trips(method):
    normalizer = fit_normalizer(X, method, scale=0.1)
    np.testing.assert_allclose(normalizer.invert(normalizer.apply(X)), X, rtol=1e-6)


def test_standard_and_scale_statistics():
    z = fit_normalizer(X, "standard").apply(X)
    assert z.mean() == pytest.approx(0, abs=1e-6) and z.std() == pytest.approx(1, abs=1e-6)
    np.testing.assert_allclose(fit_normalizer(X, "scale", 0.1).apply(X), 0.1 * X, rtol=1e-6)


def test_standard_refuses_constant_readings():
    with pytest.raises(InvalidInput, match="readings that vary"):
        fit_normalizer(np.full(5, 3.0), "standard")


def test_split_is_disjoint_complete_and_sized_as_the_seed():
    train, val = split_indices(11, 0.2, seed=42)
    assert len(val) == 2 and len(train) == 9  # int(0.2 * 11) = 2
    assert set(train).isdisjoint(val)
    assert sorted([*train, *val]) == list(range(11))


def test_split_is_seeded():
    a, b = split_indices(100, 0.3, seed=7), split_indices(100, 0.3, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(split_indices(100, 0.3, seed=8)[0], a[0])


def test_split_is_the_same_in_another_process():
    code = "import json; from tasks.split import split_indices; t, v = split_indices(50, 0.2, 123); print(json.dumps([t.tolist(), v.tolist()]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    train, val = split_indices(50, 0.2, 123)
    assert json.loads(out) == [train.tolist(), val.tolist()]


def test_zero_fraction_trains_on_everything():
    train, val = split_indices(11, 0.0, seed=1)
    assert len(val) == 0 and sorted(train) == list(range(11))


def test_rows_needed():
    assert rows_needed(0.0) == 2
    assert rows_needed(0.2) == 5  # int(0.2 * 5) = 1 held out, 4 to train
    assert rows_needed(0.5) == 3  # 1 held out, 2 to train
    assert validation_size(100, 0.29) == 29  # not 28, despite 0.29 * 100 = 28.999...
