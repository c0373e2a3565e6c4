"""Masks: uint32 vectors expanded from a 256-bit key by AES-256 in counter mode.

The whole 256-bit key drives the stream (unlike a generator seeded with 32 bits folded
out of it, where two keys that fold alike give one mask). Each key expands exactly one
vector, so the counter can start anywhere fixed. Expansion encrypts a reused block of
zeros into a reused buffer with ``update_into`` and adds it chunk by chunk, which keeps
the working set in cache; several masks go into one vector in one pass (:func:`add_masks`).

The stream is AES-256-CTR from counter block 0^96 || 2. OpenSSL has two codes that give
it, and which is faster depends on the CPU, so the first stream a process draws times both
on 256 KiB and keeps the faster (:func:`stream_code`); the stream is the same either way:
- its CTR code, ``modes.CTR`` from that counter block;
- its AES-GCM encryptor, never finalized: GCM encrypts in counter mode (the counter block
  is the 96-bit IV, here zero, and a 32-bit block counter from 2), so its ciphertext of
  zeros is exactly that keystream. The tag is never computed or used.
GCM's code was 1.6 to 1.7x faster than CTR's on one reference machine and 2.8x slower on
another (docs/secagg.md, Cost; docs/results.md, session 10). Within :data:`MAX_STREAM_BYTES`
GCM's 32-bit counter never wraps, so the two agree over every stream we draw
(tests/test_secagg_primitives.py).
"""

from __future__ import annotations

import timeit
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .scratch import scratch

MASK_KEY_LEN = 32
_CHUNK_BYTES = 1 << 18  # 256 KiB: measured fastest (7.4 GB/s) on the reference machine
_ZERO_IV = bytes(12)  # GCM's 96-bit IV: counter blocks 0^96 || 2, 3, ...
# GCM counts blocks with 32 bits: one stream is at most 2**32 - 2 blocks (OpenSSL refuses
# more), 2**34 - 8 uint32 values, 64 GiB.
MAX_STREAM_BYTES = (2**32 - 2) * 16
# The plaintext every keystream draw encrypts (here and in quantize.py): sliced as a
# memoryview, so a short last chunk is not a copy.
ZEROS = memoryview(bytes(1 << 19))


def _check_key(key: bytes) -> None:
    if len(key) != MASK_KEY_LEN:
        raise ValueError(f"mask key has {len(key)} bytes, expected {MASK_KEY_LEN}")


_FIRST_COUNTER_BLOCK = _ZERO_IV + (2).to_bytes(4, "big")
_STREAM_CODES = {
    "gcm": lambda: modes.GCM(_ZERO_IV),
    "ctr": lambda: modes.CTR(_FIRST_COUNTER_BLOCK),
}
_chosen_code: str | None = None


def _checked_code(code: str) -> str:
    if code not in _STREAM_CODES:
        raise ValueError(f"stream code {code!r} is not one of {sorted(_STREAM_CODES)}")
    return code


def stream_code(code: str | None = None) -> str:
    """OpenSSL's code that draws the streams in this process, ``"gcm"`` or ``"ctr"``.

    Chosen on first use by timing both (best of five draws of 256 KiB each: 2.7 to 3.8 ms
    in all, once per process, in three runs while other work ran); ``code`` sets it
    instead (the benchmark and the tests)."""
    global _chosen_code
    if code is not None:
        _chosen_code = _checked_code(code)
    if _chosen_code is None:
        out, zeros = bytearray(_CHUNK_BYTES + 16), ZEROS[:_CHUNK_BYTES]

        def best_draw_s(name: str) -> float:
            encryptor = keystream(bytes(MASK_KEY_LEN), code=name)
            return min(timeit.repeat(lambda: encryptor.update_into(zeros, out), number=1, repeat=5))

        _chosen_code = min(_STREAM_CODES, key=best_draw_s)
    return _chosen_code


def keystream(key: bytes, *, code: str | None = None):
    """An encryptor keyed by the 32-byte ``key`` whose ``update`` / ``update_into`` of
    zero bytes is the key's pseudorandom stream: AES-256-CTR from counter block 2 (see the
    module's docstring), at most :data:`MAX_STREAM_BYTES`. Every stream the protocol draws
    (masks, the neighbour graph's order, the rounding's uniforms) comes from here; each
    key drives exactly one stream. ``code`` picks OpenSSL's code for this stream (the
    stream is the same); by default, the faster here (:func:`stream_code`)."""
    _check_key(key)
    mode = _STREAM_CODES[_checked_code(code) if code is not None else stream_code()]
    return Cipher(algorithms.AES(key), mode()).encryptor()


def expand_mask(key: bytes, length: int) -> np.ndarray:
    """The mask of ``length`` uint32 values for ``key`` (a fresh array)."""
    out = np.zeros(length, dtype=np.uint32)
    add_mask(out, key, sign=1)
    return out


def add_mask(acc: np.ndarray, key: bytes, *, sign: int) -> None:
    """``acc += sign * mask(key)`` modulo 2**32, in place; ``sign`` is +1 or -1."""
    add_masks(acc, [(key, sign)])


def add_masks(acc: np.ndarray, keyed_signs: Sequence[tuple[bytes, int]], *,
              workers: int = 1) -> None:
    """``acc += Σ sign * mask(key)`` modulo 2**32, in place, for each (key, sign).

    One pass over ``acc``: each chunk of it takes every mask while it is in cache, rather
    than one pass over the whole vector per mask (a client adds k + 1 masks, the server
    removes one self mask per survivor).

    ``workers`` > 1 splits the masks among that many threads (the server's removal of
    every survivor's self mask, when the clients are done and the cores are free):
    OpenSSL and numpy release the GIL while they work. Each thread but the first sums
    its masks into a buffer of its own, added into ``acc`` at the end.
    """
    if acc.dtype != np.uint32 or acc.ndim != 1 or not acc.flags.c_contiguous:
        raise ValueError("add_mask needs a contiguous 1-D uint32 array")
    for key, sign in keyed_signs:
        _check_key(key)
        if sign not in (1, -1):
            raise ValueError(f"sign must be +1 or -1, got {sign}")
    if not keyed_signs or acc.size == 0:
        return
    if acc.nbytes > MAX_STREAM_BYTES:
        raise ValueError(f"a mask of {acc.size} values is longer than one key's stream allows; "
                         f"accepted: at most {MAX_STREAM_BYTES // 4} values")
    workers = max(1, min(workers, len(keyed_signs) // _MIN_MASKS_PER_WORKER))
    if workers == 1:
        _add_masks(acc, keyed_signs)
        return
    groups = [keyed_signs[i::workers] for i in range(workers)]
    partial = [acc] + [np.zeros_like(acc) for _ in groups[1:]]
    with ThreadPoolExecutor(workers) as pool:
        for done in [pool.submit(_add_masks, a, g) for a, g in zip(partial, groups, strict=True)]:
            done.result()
    for extra in partial[1:]:
        np.add(acc, extra, out=acc)


# Below this many masks per thread, a thread's own buffer and the final additions cost
# about what the split saves.
_MIN_MASKS_PER_WORKER = 4


def _add_masks(acc: np.ndarray, keyed_signs: Sequence[tuple[bytes, int]]) -> None:
    streams = [(keystream(key), np.add if sign == 1 else np.subtract) for key, sign in keyed_signs]
    total = acc.nbytes
    # update_into wants room for one block (4 words) more than it writes.
    view = scratch("masks.stream", min(_CHUNK_BYTES, total) // 4 + 4, np.uint32)
    into = memoryview(view).cast("B")
    acc_bytes = acc.view(np.uint8)
    for start in range(0, total, _CHUNK_BYTES):
        size = min(_CHUNK_BYTES, total - start)
        zeros = ZEROS[:size]
        words = size // 4
        chunk = acc_bytes[start : start + size].view(np.uint32)
        for encryptor, op in streams:
            encryptor.update_into(zeros, into)
            # uint32 arithmetic in numpy wraps modulo 2**32, which is the group we mask in.
            op(chunk, view[:words], out=chunk)
