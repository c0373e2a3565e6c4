"""Masks: uint32 vectors expanded from a 256-bit key by AES-256 in counter mode.

The whole 256-bit key drives the stream (unlike a generator seeded with 32 bits folded
out of it, where two keys that fold alike give one mask). Each key expands exactly one
vector, so the counter can start anywhere fixed. Expansion encrypts a reused block of
zeros into a reused buffer with ``update_into`` and adds it chunk by chunk, which keeps
the working set in cache; several masks go into one vector in one pass (:func:`add_masks`).

The counter-mode stream is drawn through OpenSSL's AES-GCM encryptor, never finalized:
GCM encrypts in counter mode (the counter block is the 96-bit IV, here zero, and a 32-bit
block counter from 2), so its ciphertext of zeros is exactly the AES-256-CTR keystream
from counter block 2, and OpenSSL's GCM code is the one built for the CPU's vector AES
instructions (faster than its CTR code on the reference machine: docs/secagg.md, Cost).
The tag is never computed or used. A tested property (tests/test_secagg_primitives.py):
the stream equals ``modes.CTR`` from that counter block.
"""

from __future__ import annotations

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


def keystream(key: bytes):
    """An encryptor keyed by the 32-byte ``key`` whose ``update`` / ``update_into`` of
    zero bytes is the key's pseudorandom stream: AES-256-CTR from counter block 2 (see the
    module's docstring), at most :data:`MAX_STREAM_BYTES`. Every stream the protocol draws
    (masks, the neighbour graph's order, the rounding's uniforms) comes from here; each
    key drives exactly one stream."""
    _check_key(key)
    return Cipher(algorithms.AES(key), modes.GCM(_ZERO_IV)).encryptor()


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
