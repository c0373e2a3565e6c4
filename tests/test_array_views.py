"""Reading and writing ArrayRecord tensors without extra copies (consortia.messages)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array

from consortia.messages import decode_array, encode_array


@pytest.mark.parametrize("values", [
    np.arange(1_000_003, dtype=np.uint32),
    np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32),
    np.zeros((0,), dtype=np.float64),
    np.array(2.5),
    np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)),
])
def test_a_view_reads_what_numpy_reads(values):
    array = Array(values)
    for _ in range(2):  # the first read parses the header, the second reuses it
        view = decode_array(array, copy=False)
        expected = array.numpy()
        assert view.dtype == expected.dtype and view.shape == expected.shape
        assert np.array_equal(view, expected)


def test_a_view_is_read_only_on_the_bytes():
    array = Array(np.arange(10, dtype=np.float32))
    decode_array(array)  # the header is known from here on
    view = decode_array(array, copy=False)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0] = 1.0


@pytest.mark.parametrize("dtype", [np.uint32, np.float32, np.float64])
def test_a_large_vector_is_encoded_exactly_as_array_of_the_ndarray(dtype):
    vector = np.arange(100_001).astype(dtype)
    ours, flowers = encode_array(vector), Array(vector)
    assert ours.data == flowers.data
    assert (ours.dtype, tuple(ours.shape), ours.stype) == (flowers.dtype, tuple(flowers.shape),
                                                           flowers.stype)
    assert np.array_equal(ours.numpy(), vector)

