"""Masks: uint32 vectors expanded from a 256-bit key by AES-256 in counter mode.

The whole 256-bit key drives the stream (unlike a generator seeded with 32 bits folded
out of it, where two keys that fold alike give one mask). Each key expands exactly one
vector, so the counter can start anywhere fixed. Expansion encrypts a reused block of
zeros into a reused buffer with ``update_into`` and adds it chunk by chunk, which keeps
the working set in cache; several masks go into one vector in one pass (:func:`add_masks`).

The stream is AES-256-CTR from counter block 0^96 || 2. Three codes give it, and which is
faster depends on the CPU, so the first stream a process draws times them on 256 KiB and
keeps the fastest (:func:`stream_code`); the stream is the same whichever draws it:
- OpenSSL's CTR code, ``modes.CTR`` from that counter block;
- OpenSSL's AES-GCM encryptor, never finalized: GCM encrypts in counter mode (the counter
  block is the 96-bit IV, here zero, and a 32-bit block counter from 2), so its ciphertext
  of zeros is exactly that keystream. The tag is never computed or used;
- ``vaes``: our own loop over the CPU's 256-bit VAES instructions (``_aesctr.c``, built
  at install where a C compiler is found, used only where the CPU has VAES and only after
  its output matched OpenSSL's in this process: :mod:`.fast_stream`). On the reference
  machine (VAES, no AVX-512) OpenSSL draws one block per AES instruction; ours draws two,
  and adds the masks into the vector in the same pass (docs/secagg.md, Primitives).
GCM's code was 1.6 to 1.7x faster than CTR's on one reference machine and 2.8x slower on
another (docs/secagg.md, Cost; docs/results.md, session 10). Within :data:`MAX_STREAM_BYTES`
the 32-bit counter never wraps, so the codes agree over every stream we draw
(tests/test_secagg_primitives.py).
"""

from __future__ import annotations

import os
import timeit
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from . import fast_stream
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
_OPENSSL_CODES = {
    "gcm": lambda: modes.GCM(_ZERO_IV),
    "ctr": lambda: modes.CTR(_FIRST_COUNTER_BLOCK),
}
FAST_CODE = "vaes"  # ours (fast_stream), where it is built and the CPU has VAES
_chosen_code: str | None = None


# Every code's name, in a fixed order (the benchmark reports a code by its index here).
STREAM_CODES = (*sorted(_OPENSSL_CODES), FAST_CODE)


def _available_codes() -> list[str]:
    return [c for c in STREAM_CODES if c != FAST_CODE or fast_stream.available()]


def _checked_code(code: str, accepted: list[str]) -> str:
    if code not in accepted:
        why = ""
        if code == FAST_CODE:
            why = f" ({FAST_CODE} here: {fast_stream.unavailable_reason()})"
        raise ValueError(f"stream code {code!r} is not one of {accepted}{why}")
    return code


# Names the code instead of timing (a partner who wants OpenSSL's code only sets "ctr";
# the benchmark's --stream-code sets it for its clients).
STREAM_CODE_ENV = "CONSORTIA_SECAGG_STREAM_CODE"


def stream_code(code: str | None = None) -> str:
    """The code that draws the streams in this process: ``"gcm"`` or ``"ctr"`` (OpenSSL's)
    or ``"vaes"`` (ours, where available).

    Chosen on first use: the one named by the environment variable
    ``CONSORTIA_SECAGG_STREAM_CODE`` when set, else the fastest at adding two masks into
    256 KiB (best of five tries each, a few ms in all, once per process); ``code`` sets
    it instead (the benchmark and the tests)."""
    global _chosen_code
    if code is not None:
        _chosen_code = _checked_code(code, _available_codes())
    if _chosen_code is None:
        named = os.environ.get(STREAM_CODE_ENV, "").strip()
        if named:
            check_stream_code_env()
            _chosen_code = named
        else:
            _chosen_code = min(_available_codes(), key=_best_add_s)
    return _chosen_code


def check_stream_code_env() -> None:
    """Raise ValueError, naming the variable, the value and the codes accepted here, when
    ``CONSORTIA_SECAGG_STREAM_CODE`` names a code this machine cannot draw with: at start
    (``sim run``, ``client join``) rather than at a client's first masked round."""
    named = os.environ.get(STREAM_CODE_ENV, "").strip()
    if named:
        try:
            _checked_code(named, _available_codes())
        except ValueError as err:
            raise ValueError(f"{STREAM_CODE_ENV}: {err}; unset it to choose the fastest") from None


def _best_add_s(code: str) -> float:
    """Seconds to add two masks into 256 KiB through ``code``, best of five: what a client
    and the server do with the streams (a single stream's draw is closer between codes,
    so noisier to choose by)."""
    acc = np.zeros(_CHUNK_BYTES // 4, dtype=np.uint32)
    keyed_signs = [(bytes(MASK_KEY_LEN), 1), (bytes(MASK_KEY_LEN - 1) + b"\x01", -1)]
    return min(timeit.repeat(lambda: _add_masks(acc, keyed_signs, code), number=1, repeat=5))


def keystream(key: bytes, *, code: str | None = None):
    """An OpenSSL encryptor keyed by the 32-byte ``key`` whose ``update`` /
    ``update_into`` of zero bytes is the key's pseudorandom stream: AES-256-CTR from
    counter block 2 (see the module's docstring), at most :data:`MAX_STREAM_BYTES`.
    Every stream the protocol draws (masks, the neighbour graph's order, the rounding's
    uniforms) is this one; each key drives exactly one stream. ``code`` picks OpenSSL's
    code for it, ``"gcm"`` or ``"ctr"`` (the stream is the same); by default, the one
    this process draws with (:func:`stream_code`), or CTR's when that is ours. The bulk
    draws (:func:`add_masks`, :class:`WordStream`) go through ours where it was chosen."""
    _check_key(key)
    if code is None:
        code = stream_code()
        code = code if code in _OPENSSL_CODES else "ctr"
    mode = _OPENSSL_CODES[_checked_code(code, sorted(_OPENSSL_CODES))]
    return Cipher(algorithms.AES(key), mode()).encryptor()


class WordStream:
    """The 32-bit words of one key's stream, drawn in order into the caller's buffers
    (the rounding's uniforms in quantize.py), through the code this process chose."""

    def __init__(self, key: bytes) -> None:
        _check_key(key)
        self._fast = stream_code() == FAST_CODE
        self._key = key
        self._encryptor = None if self._fast else keystream(key)
        self._next_block = 0
        self._ended = False

    def draw_into(self, out: np.ndarray, count: int) -> None:
        """Write the stream's next ``count`` words into ``out[:count]``. ``out``: a 1-D
        contiguous buffer of 4-byte values with room for 4 more (OpenSSL's
        ``update_into`` wants a block of room beyond what it writes). Every draw but the
        last must be a whole number of blocks (a multiple of 4 words)."""
        if out.ndim != 1 or out.itemsize != 4 or not out.flags.c_contiguous:
            raise ValueError("WordStream draws into a contiguous 1-D buffer of 4-byte values")
        if out.size < count + 4:
            raise ValueError(f"a draw of {count} words needs a buffer of {count + 4}, "
                             f"got {out.size}")
        if 4 * count > len(ZEROS):
            raise ValueError(f"a draw is at most {len(ZEROS) // 4} words, got {count}")
        if self._ended:
            raise ValueError("this stream's last draw was not a whole number of blocks")
        self._ended = count % 4 != 0
        if self._fast:
            fast_stream.apply(out[:count].view(np.uint32), [(self._key, 0)],
                              first_block=self._next_block)
            self._next_block += count // 4
        else:
            self._encryptor.update_into(ZEROS[: 4 * count], memoryview(out).cast("B"))


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


def _add_masks(acc: np.ndarray, keyed_signs: Sequence[tuple[bytes, int]],
               code: str | None = None) -> None:
    """The masks added through ``code`` (by default the one this process draws with)."""
    code = code if code is not None else stream_code()
    if code == FAST_CODE:
        # Ours draws each tile of every stream while the vector's tile is in cache.
        fast_stream.apply(acc, keyed_signs)
        return
    streams = [(keystream(key, code=code), np.add if sign == 1 else np.subtract) for key, sign in keyed_signs]
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
