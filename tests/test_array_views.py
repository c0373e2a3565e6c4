"""Reading and writing ArrayRecord tensors without extra copies (consortia.messages)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array

from consortia.messages import array_values, vector_array
from consortia.server.directory import shorten_pull_interval


@pytest.mark.parametrize("values", [
    np.arange(1_000_003, dtype=np.uint32),
    np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32),
    np.zeros((0,), dtype=np.float64),
    np.array(2.5),
    np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)),
])
def test_array_values_reads_what_numpy_reads(values):
    array = Array(values)
    view = array_values(array)
    expected = array.numpy()
    assert view.dtype == expected.dtype and view.shape == expected.shape
    assert np.array_equal(view, expected)


def test_array_values_is_a_read_only_view_on_the_bytes():
    array = Array(np.arange(10, dtype=np.float32))
    view = array_values(array)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0] = 1.0


@pytest.mark.parametrize("dtype", [np.uint32, np.float32, np.float64])
def test_vector_array_holds_exactly_what_array_of_the_ndarray_holds(dtype):
    vector = np.arange(100_001).astype(dtype)
    ours, flowers = vector_array(vector), Array(vector)
    assert ours.data == flowers.data
    assert (ours.dtype, tuple(ours.shape), ours.stype) == (flowers.dtype, tuple(flowers.shape),
                                                           flowers.stype)
    assert np.array_equal(ours.numpy(), vector)


def test_shorten_pull_interval_only_shortens_a_public_pull_interval():
    class Grid:
        pull_interval = 0.1

    grid = Grid()
    shorten_pull_interval(grid, 0.01)
    assert grid.pull_interval == 0.01
    shorten_pull_interval(grid, 0.05)  # never lengthens it
    assert grid.pull_interval == 0.01
    other = object()
    shorten_pull_interval(other, 0.01)  # a grid without one is left alone
    assert not hasattr(other, "pull_interval")
