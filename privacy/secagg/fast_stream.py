"""Our VAES code for the mask streams (``_aesctr.c``), loaded with ctypes.

The library is built at install (setup.py, an optional extension: without a C compiler,
or off x86-64, the install goes on without it) and used only when all of these hold,
else masks.py draws every stream with OpenSSL:

1. the library is there and loads;
2. the CPU has AVX2, AES-NI and VAES (asked of the CPU, by the library);
3. its output equals OpenSSL's AES-256-CTR stream for a fresh random key, with several
   keys, signs, a partial tile and an offset start (:func:`_self_test`), in this
   process, before its first use.

ctypes releases the GIL for the call, so the server's threads (masks.add_masks,
``workers``) draw in parallel as they do with OpenSSL.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_MODULE = f"{__package__}._aesctr"
_lib: ctypes.CDLL | None = None
_reason: str | None = None  # why it is not used, once looked at


def _load() -> None:
    global _lib, _reason
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or not spec.origin:
        _reason = ("not built (no C compiler at install, or not x86-64): "
                   "reinstall with one to build it")
        return
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as err:
        _reason = f"{spec.origin} does not load ({err})"
        return
    lib.consortia_aesctr_supported.restype = ctypes.c_int
    lib.consortia_aesctr_supported.argtypes = []
    lib.consortia_aesctr_apply.restype = ctypes.c_int
    lib.consortia_aesctr_apply.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p,
                                           ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64]
    lib.consortia_encode.restype = ctypes.c_int
    lib.consortia_encode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                     ctypes.c_size_t, ctypes.c_char_p, ctypes.c_double,
                                     ctypes.c_double, ctypes.c_double]
    if not lib.consortia_aesctr_supported():
        _reason = "this CPU lacks AVX2, AES-NI or VAES"
        return
    _lib = lib
    if not _self_test():
        _lib = None
        _reason = "its stream differed from OpenSSL's on this machine (not used)"


def available() -> bool:
    """Whether our code can draw the streams in this process."""
    if _lib is None and _reason is None:
        _load()
    return _lib is not None


def unavailable_reason() -> str:
    """Why :func:`available` is False (empty when it is True)."""
    return "" if available() else str(_reason)


def apply(acc: np.ndarray, keyed_signs: Sequence[tuple[bytes, int]], *,
          first_block: int = 0) -> None:
    """``acc (op)= stream(key)[4 * first_block : 4 * first_block + acc.size]`` for each
    (key, sign) in order: op is += for sign 1, -= for -1, = for 0; uint32, so modulo
    2**32. Keys are 32 bytes; the caller (masks.py) checks them and the stream's length."""
    if not available():
        raise RuntimeError(f"the VAES stream code is not available: {_reason}")
    if acc.dtype != np.uint32 or acc.ndim != 1 or not acc.flags.c_contiguous:
        raise ValueError(f"the stream goes into a contiguous 1-D uint32 array, got {acc.dtype} "
                         f"{acc.shape}{'' if acc.flags.c_contiguous else ' (not contiguous)'}")
    if not acc.flags.writeable:
        raise ValueError("the stream goes into a writeable array")
    if not keyed_signs or acc.size == 0:
        return
    for i, (key, sign) in enumerate(keyed_signs):
        if len(key) != 32 or sign not in (-1, 0, 1):
            raise ValueError(f"stream {i}: a key of {len(key)} bytes and sign {sign!r}; "
                             "accepted: each key 32 bytes, each sign -1, 0 or 1")
    keys = b"".join(key for key, _ in keyed_signs)
    signs = (ctypes.c_int8 * len(keyed_signs))(*(sign for _, sign in keyed_signs))
    status = _lib.consortia_aesctr_apply(acc.ctypes.data, acc.size, keys, signs,
                                         len(keyed_signs), first_block)
    if status == -2:
        raise MemoryError(f"no memory for the round keys of {len(keyed_signs)} streams")
    if status != 0:
        raise ValueError(f"{len(keyed_signs)} streams of {acc.size} words from block "
                         f"{first_block}: beyond what one key's stream allows (2**32 - 2 "
                         "blocks) or more than 256 keys in one call")


def encode(out: np.ndarray, x: np.ndarray, key: bytes, *, scale: float, shift: float,
           top: float) -> None:
    """quantize.encode's loop in one pass: ``out = trunc(clamp(x * scale + u, 0, top))``
    in float64, u = w * 2**-32 + shift for the int32 words w of ``key``'s stream (see
    quantize.py). ``x``: contiguous 1-D float32 or float64; ``out``: uint32 of its size;
    ``top`` below 2**31."""
    if not available():
        raise RuntimeError(f"the VAES stream code is not available: {_reason}")
    if x.dtype not in (np.float32, np.float64) or x.ndim != 1 or not x.flags.c_contiguous:
        raise ValueError(f"encode reads a contiguous 1-D float32 or float64 array, got "
                         f"{x.dtype} {x.shape}")
    if out.dtype != np.uint32 or out.shape != x.shape or not out.flags.c_contiguous \
            or not out.flags.writeable:
        raise ValueError(f"encode writes a writeable contiguous uint32 array of shape {x.shape}")
    if len(key) != 32:
        raise ValueError(f"the rounding's key has {len(key)} bytes, expected 32")
    if _lib.consortia_encode(out.ctypes.data, x.ctypes.data, int(x.dtype == np.float64),
                             x.size, key, scale, shift, top) != 0:
        raise ValueError(f"encode of {x.size} values with top level {top}: top must be in "
                         "[0, 2**31) and the values at most 2**34 - 8")


def openssl_stream(key: bytes, words: int, first_block: int = 0) -> np.ndarray:
    """The same stream from OpenSSL's CTR code: what ours must equal."""
    counter = bytes(12) + (2 + first_block).to_bytes(4, "big")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * words)), dtype="<u4")


def _self_test() -> bool:
    # Three keys with every sign, 1000 words (15 whole tiles of 64 and a partial one)
    # from block 5, on top of random contents.
    rng = np.random.default_rng()
    keyed_signs = [(os.urandom(32), sign) for sign in (1, -1, 0, 1)]
    start = rng.integers(0, 2**32, size=1000, dtype=np.uint32)
    expected = start.copy()
    for key, sign in keyed_signs:
        stream = openssl_stream(key, start.size, first_block=5)
        expected = expected + stream if sign == 1 else (
            expected - stream if sign == -1 else stream.copy())
    got = start.copy()
    apply(got, keyed_signs, first_block=5)
    return bool(np.array_equal(got, expected))
