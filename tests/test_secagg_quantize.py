"""Update encoding for secure aggregation: clipping, stochastic rounding, no wrap-around."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consortia.privacy.secagg import fast_stream, masks
from consortia.privacy.secagg.quantize import (
    check_no_wrap,
    clip_l2,
    decode_sum,
    encode,
    max_bits,
    quantization_error_bound,
    step_size,
)


@pytest.mark.parametrize(("n", "bits"), [(1, 32), (2, 31), (10, 28), (30, 27), (100, 25)])
def test_max_bits_is_the_largest_width_whose_sum_cannot_wrap(n, bits):
    assert max_bits(n) == bits
    assert n * (2**bits - 1) <= 2**32 - 1 < n * (2 ** (bits + 1) - 1)


def test_a_width_that_could_wrap_is_refused_naming_bits_n_and_clip():
    with pytest.raises(ValueError, match=r"bits=29 with n=10 clients \(clip=0.5\)"):
        check_no_wrap(clip=0.5, bits=29, num_clients=10)
    with pytest.raises(ValueError, match="bits=29"):
        encode(np.zeros(3), clip=0.5, bits=29, num_clients=10)
    with pytest.raises(ValueError, match="clip"):
        encode(np.zeros(3), clip=0.0, bits=8, num_clients=10)


def test_worst_case_inputs_at_the_largest_width_sum_without_wrapping():
    n, clip = 30, 2.0
    bits = max_bits(n)
    update = np.array([clip, -clip / 1e9, 0.0])  # norm == clip: the top level is reachable
    encodings = [encode(update, clip=clip, bits=bits, num_clients=n) for _ in range(n)]
    total = np.zeros(3, dtype=np.uint32)
    for e in encodings:
        total += e
    decoded = decode_sum(total, clip=clip, bits=bits, num_summed=n)
    expected = n * clip_l2(update, clip)
    assert np.all(
        np.abs(decoded - expected) < quantization_error_bound(clip=clip, bits=bits, num_summed=n)
    )


@pytest.mark.parametrize("n", [1, 2, 30])  # 32 bits (a uint32 cast), 31 and 27 (int32)
def test_the_extremes_encode_to_the_first_and_last_level_at_every_width(n):
    bits, clip = max_bits(n), 1.0
    top = 2**bits - 1
    for value, level in ((clip, top), (-clip, 0)):
        encoded = encode(np.full(1, value), clip=clip, bits=bits, num_clients=n,
                         rng=np.random.default_rng(0))
        assert encoded.dtype == np.uint32 and int(encoded[0]) == level
    # In between, a random update's levels all lie in [0, 2**bits - 1] and round to
    # within one level of their exact value.
    update = np.random.default_rng(1).uniform(-clip, clip, 5000) / 100
    encoded = encode(update, clip=clip, bits=bits, num_clients=n, rng=np.random.default_rng(2))
    exact = (clip_l2(update, clip) + clip) / step_size(clip, bits)
    assert encoded.max() <= top
    assert np.all(np.abs(encoded.astype(np.float64) - exact) < 1.0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    size=st.integers(1, 50),
    clip=st.floats(1e-3, 1e3),
    bits_below_max=st.integers(0, 20),
    scale=st.floats(1e-4, 1e4),
    seed=st.integers(0, 2**32 - 1),
)
def test_decoded_sum_is_within_n_steps_of_the_clipped_sum(
    n, size, clip, bits_below_max, scale, seed
):
    bits = max(1, max_bits(n) - bits_below_max)
    rng = np.random.default_rng(seed)
    updates = [rng.normal(0.0, scale, size=size) for _ in range(n)]
    total = np.zeros(size, dtype=np.uint32)
    for u in updates:
        total += encode(u, clip=clip, bits=bits, num_clients=n, rng=rng)
    decoded = decode_sum(total, clip=clip, bits=bits, num_summed=n)
    expected = np.sum([clip_l2(u, clip) for u in updates], axis=0)
    bound = quantization_error_bound(clip=clip, bits=bits, num_summed=n)
    assert bound == pytest.approx(n * 2 * clip / (2**bits - 1))
    # float64 decoding adds rounding of relative size 1e-16 on values up to n * clip.
    assert np.max(np.abs(decoded - expected)) <= bound + 1e-12 * n * clip


def test_stochastic_rounding_is_unbiased():
    clip, bits, value = 1.0, 4, 0.123456  # coarse grid: step 0.133, value between levels
    rng = np.random.default_rng(7)
    codes = [
        encode(np.array([value]), clip=clip, bits=bits, num_clients=1, rng=rng)[0]
        for _ in range(2000)
    ]
    decoded = np.array(codes) * step_size(clip, bits) - clip
    assert set(np.round(decoded, 6)) == {0.066667, 0.2}  # the two neighbouring levels
    # Each draw is within one step of the value, so 5 sigma of the mean is about 0.007.
    assert abs(decoded.mean() - value) < 0.01


def test_float32_updates_near_the_clip_are_encoded_within_one_level():
    # 27 bits: levels 1.5e-7 apart at values near 10, where float32 itself is 1e-6 apart;
    # the scaling must happen in float64 or the code lands several levels off.
    clip, bits = 10.0, 27
    step = step_size(clip, bits)
    rng = np.random.default_rng(3)
    for value in np.float32([9.999999, -9.999999, 7.123457, -3.3333333, 9.5]):
        code = encode(np.array([value]), clip=clip, bits=bits, num_clients=30, rng=rng)
        decoded = decode_sum(code, clip=clip, bits=bits, num_summed=1)[0]
        assert abs(decoded - float(value)) < step * (1 + 1e-9), value


def test_encode_writes_into_a_given_buffer_and_is_reproducible_from_the_generator():
    update = np.random.default_rng(4).normal(0.0, 0.01, size=70_001).astype(np.float32)
    out = np.zeros(update.size, dtype=np.uint32)
    result = encode(update, clip=1.0, bits=27, num_clients=30, rng=np.random.default_rng(9),
                    out=out)
    assert result is out and out.any()
    again = encode(update, clip=1.0, bits=27, num_clients=30, rng=np.random.default_rng(9))
    assert np.array_equal(again, out)
    other = encode(update, clip=1.0, bits=27, num_clients=30, rng=np.random.default_rng(10))
    assert not np.array_equal(other, out)  # another seed, other roundings
    with pytest.raises(ValueError, match="out must be uint32"):
        encode(update, clip=1.0, bits=27, num_clients=30, out=np.zeros(10, dtype=np.uint32))


def test_weights_scale_each_clipped_update_and_nans_are_refused():
    clip, bits, n = 1.0, max_bits(2), 2
    a, b = np.array([0.3, -0.2]), np.array([-0.1, 0.4])
    total = encode(a, clip=clip, bits=bits, num_clients=n, weight=0.25) + encode(
        b, clip=clip, bits=bits, num_clients=n, weight=1.0
    )
    decoded = decode_sum(total, clip=clip, bits=bits, num_summed=n)
    assert np.allclose(
        decoded, 0.25 * a + b, atol=quantization_error_bound(clip=clip, bits=bits, num_summed=n)
    )
    with pytest.raises(ValueError, match="weight"):
        encode(a, clip=clip, bits=bits, num_clients=n, weight=1.5)
    with pytest.raises(ValueError, match="NaN"):
        encode(np.array([np.nan]), clip=clip, bits=bits, num_clients=n)


@pytest.fixture(params=["ctr", pytest.param("vaes", marks=pytest.mark.skipif(
    not fast_stream.available(), reason="our VAES code is not available here"))])
def stream_code(request):
    """Each code that can draw the streams here: OpenSSL's (encode's torch loop) and ours
    (encode's one C pass)."""
    kept = masks._chosen_code
    masks.stream_code(request.param)
    yield request.param
    masks._chosen_code = kept


@pytest.mark.parametrize(("n", "size", "dtype"), [(30, 300_001, np.float32), (1, 1000, np.float64),
                                                  (100, 5, np.float64), (10, 1_003, np.float32),
                                                  (2, 64, np.float64), (7, 0, np.float32)])
def test_encoding_is_exactly_the_floor_of_the_scaled_update_plus_the_streams_uniform(
        n, size, dtype, stream_code):
    """Bit for bit, the documented formula in plain float64 numpy: floor(x * scale +
    offset + u), u = w * 2**-32 + 1/2 for the stream's int32 words w, clamped to the top
    level. Several chunks and a partial one; 32-bit levels (n = 1) as well; whichever
    code draws the stream (so OpenSSL's and ours give the same encoding)."""
    from consortia.privacy.secagg.masks import keystream

    clip, bits = 2.0, max_bits(n)
    update = np.random.default_rng(size).normal(0.0, 0.5, size=size).astype(dtype)
    encoded = encode(update, clip=clip, bits=bits, num_clients=n, weight=0.75,
                     rng=np.random.default_rng(11))
    step, top = step_size(clip, bits), 2**bits - 1
    norm = float(np.linalg.norm(update))
    scale = 0.75 * (clip / norm if norm > clip else 1.0) / step
    words = np.frombuffer(keystream(np.random.default_rng(11).bytes(32)).update(
        bytes(4 * size)), dtype=np.int32)
    u = words * 2.0**-32 + (clip / step + 0.5)
    expected = np.floor(np.minimum(update.astype(np.float64) * scale + u, top))
    assert np.array_equal(encoded, expected.astype(np.uint32))
