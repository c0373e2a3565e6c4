"""Encode float updates as uint32 vectors whose sum over n clients cannot wrap.

Encoding of one client's update x (float vector) with parameters ``clip`` and ``bits``:

1. clip: ``x <- x * min(1, clip / ||x||_2)``, so every coordinate lies in [-clip, clip];
2. weight (optional, in [0, 1]): ``x <- w * x``, still within [-clip, clip];
3. shift and scale: ``q = (x + clip) / step`` with ``step = 2 * clip / (2**bits - 1)``,
   so q lies in [0, 2**bits - 1];
4. stochastic rounding: ``floor(q + u)`` with u uniform in [0, 1) (in steps of 2**-32,
   from an AES-CTR stream keyed from the caller's generator), which is unbiased and off
   by less than 1. Unbiased up to float64's resolution near 2**bits, where q + u is
   computed: its expectation is q within 2**(bits - 52) of a level (2**-25 at 27 bits).

The sum of n encodings is at most ``n * (2**bits - 1)``; we require that to be at most
``2**32 - 1`` so the masked sum modulo 2**32 equals the true integer sum. The largest
such ``bits`` is :func:`max_bits` (28 for n=10, 27 for n=30, 25 for n=100).

Decoding a sum S of m encodings: ``step * S - m * clip``.

Error bound: each client's rounding error is below ``step`` in every coordinate, so the
decoded sum differs from the sum of the clipped (and weighted) updates by less than
``m * step`` per coordinate (:func:`quantization_error_bound`), and by zero on average.
Clipping itself is not an error of the encoding: it is the sensitivity bound DP needs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import fast_stream
from .masks import FAST_CODE, ZEROS, WordStream, stream_code
from .scratch import scratch

_MODULUS_MAX = 2**32 - 1


# The clips accepted: wide enough for any update, narrow enough that the step, the levels
# clip / step and the decoded sum step * S - m * clip stay finite normal floats (at 1e308
# the step overflowed and the sum decoded to NaN; at 1e-320 the step was zero).
CLIP_RANGE = (1e-100, 1e100)


def _check(clip: float, bits: int) -> None:
    if not (math.isfinite(clip) and CLIP_RANGE[0] <= clip <= CLIP_RANGE[1]):
        raise ValueError(f"clip must lie in [{CLIP_RANGE[0]:g}, {CLIP_RANGE[1]:g}], got {clip}")
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")


def max_bits(num_clients: int) -> int:
    """Largest ``bits`` whose sum over ``num_clients`` encodings cannot wrap modulo 2**32."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    return (_MODULUS_MAX // num_clients + 1).bit_length() - 1


def step_size(clip: float, bits: int) -> float:
    """Width of one quantization level: ``2 * clip / (2**bits - 1)``."""
    _check(clip, bits)
    return 2.0 * clip / (2**bits - 1)


def check_no_wrap(*, clip: float, bits: int, num_clients: int) -> None:
    """Raise ValueError if the sum of ``num_clients`` encodings could wrap modulo 2**32."""
    _check(clip, bits)
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if num_clients * (2**bits - 1) > _MODULUS_MAX:
        raise ValueError(
            f"bits={bits} with n={num_clients} clients (clip={clip}) could wrap: "
            f"{num_clients} * (2**{bits} - 1) > 2**32 - 1; use bits <= {max_bits(num_clients)}"
        )


def quantization_error_bound(*, clip: float, bits: int, num_summed: int) -> float:
    """Per-coordinate bound on |decoded sum - sum of clipped updates|: ``m * step``."""
    return num_summed * step_size(clip, bits)


def clip_l2(update: np.ndarray, clip: float) -> np.ndarray:
    """``update`` scaled down, if needed, to L2 norm ``clip`` (float64 copy)."""
    x = np.array(update, dtype=np.float64).ravel()  # always a copy
    norm = float(np.linalg.norm(x))
    if not math.isfinite(norm):  # one pass instead of isfinite over the whole vector
        raise ValueError("update contains NaN or infinite values")
    if norm > clip:
        x *= clip / norm
    return x


# Values encoded per step (a float64 working chunk of 1 MiB): torch's cost per call is
# spread over that many values, and the stream's words for them fit in masks.ZEROS.
_ENCODE_CHUNK = 1 << 17
assert 4 * _ENCODE_CHUNK <= len(ZEROS)


def encode(
    update: np.ndarray,
    *,
    clip: float,
    bits: int,
    num_clients: int,
    weight: float = 1.0,
    rng: np.random.Generator | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Clip, weight, shift and stochastically round ``update`` into a uint32 vector.

    ``num_clients`` is the most encodings that will be summed (the round's participants);
    ``weight`` in [0, 1] lets the server recover a weighted sum, e.g. examples / max.
    ``out``: a 1-D uint32 array of the update's size to write into (a reused buffer);
    the result is ``out`` then, else a new array.
    """
    check_no_wrap(clip=clip, bits=bits, num_clients=num_clients)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    rng = rng if rng is not None else np.random.default_rng()
    step = step_size(clip, bits)
    x = np.asarray(update).ravel()
    size = x.size
    if out is None:
        out = np.empty(size, dtype=np.uint32)
    elif out.dtype != np.uint32 or out.shape != (size,):
        raise ValueError(f"out must be uint32 of shape ({size},), got {out.dtype} {out.shape}")
    norm = float(np.linalg.norm(x))
    if not math.isfinite(norm):  # one pass instead of isfinite over the whole vector
        raise ValueError("update contains NaN or infinite values")
    factor = weight * (clip / norm if norm > clip else 1.0)
    # Clipping, weighting and scaling fold into one multiply; q = x * scale + offset.
    scale, offset, top = factor / step, clip / step, float(2**bits - 1)
    narrow = top < 2**31
    if narrow and x.dtype in (np.float32, np.float64) and stream_code() == FAST_CODE:
        # Our VAES code (masks.py): stream, arithmetic and rounding in one pass, the same
        # formula below bit for bit (tests/test_secagg_quantize.py).
        fast_stream.encode(out, np.ascontiguousarray(x), rng.bytes(32), scale=scale,
                           shift=offset + 0.5, top=top)
        return out
    # Chunk by chunk through one float64 buffer (this runs once per client per round over
    # the whole model): no full-size temporaries. The arithmetic is torch's: its kernels
    # cast and add a scaled operand in one call, four calls a chunk where numpy takes
    # six; about as fast on one thread, faster on more (docs/secagg.md, Cost).
    chunk = min(_ENCODE_CHUNK, size) or 1
    q = torch.from_numpy(scratch("encode.q", chunk, np.float64))
    xs = torch.from_numpy(x)  # ravel gave a contiguous vector
    # The rounding's uniforms: 32-bit words of an AES-256-CTR stream keyed by 32 bytes
    # drawn from `rng` (reproducible from its seed like rng.random, and several times
    # faster to draw: 4 bytes a value at the speed of the masks).
    stream = WordStream(rng.bytes(32))
    # A block of room more than a draw writes (WordStream.draw_into).
    words_buffer = scratch("encode.words", chunk + 4, np.int32)
    # The stream's words read as int32: w * 2**-32 is uniform on [-1/2, 1/2) in steps of
    # 2**-32, so w * 2**-32 + 1/2 is the uniform u on [0, 1).
    words = torch.from_numpy(words_buffer)
    # offset + 1/2 as a 0-dim float64 tensor: added to the int32 words, the sum is float64.
    shift = torch.tensor(offset + 0.5, dtype=torch.float64)
    # Levels below 2**31 are written through an int32 view of `out` (the same bits as
    # uint32 for them); 32-bit levels (a single client) go through int64.
    target = torch.from_numpy(out.view(np.int32)) if narrow else None
    for start in range(0, size, chunk):
        stop = min(start + chunk, size)
        n = stop - start
        qc = q[:n]
        stream.draw_into(words_buffer, n)
        torch.add(shift, words[:n], alpha=2.0**-32, out=qc)  # u + offset
        # float64: the product in float64 even when the update is float32 (in float32,
        # q near 2**bits would be off by several levels).
        qc.add_(xs[start:stop], alpha=scale)
        # Float rounding at exactly +-clip can step outside [0, 2**bits - 1]; clamp
        # (changes nothing else). Then the cast truncates, which for values in
        # [0, 2**bits - 1] is the floor.
        qc.clamp_(0.0, top)
        if narrow:
            target[start:stop].copy_(qc)
        else:
            np.copyto(out[start:stop], qc.to(torch.int64).numpy(), casting="unsafe")
    return out


def decode_sum(total: np.ndarray, *, clip: float, bits: int, num_summed: int) -> np.ndarray:
    """The float64 sum of ``num_summed`` clipped updates from the sum of their encodings."""
    check_no_wrap(clip=clip, bits=bits, num_clients=max(num_summed, 1))
    total = np.asarray(total)
    if total.dtype != np.uint32:
        raise ValueError(f"encoded sum must be uint32, got {total.dtype}")
    return total.astype(np.float64) * step_size(clip, bits) - num_summed * clip
