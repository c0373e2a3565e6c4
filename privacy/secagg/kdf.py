"""HKDF-SHA256 (RFC 5869) with an explicit purpose label and context."""

from __future__ import annotations

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_LEN = 32


def hkdf_sha256(ikm: bytes, *, label: bytes, context: bytes, length: int = KEY_LEN) -> bytes:
    """Derive ``length`` bytes from ``ikm`` for the purpose ``label`` in ``context``.

    ``info`` is ``label || 0x00 || context``; the labels contain no zero byte, so the
    split between label and context is unambiguous. No salt: the inputs are X25519
    shared secrets or uniformly random seeds, for which RFC 5869 allows an empty salt.
    """
    if not ikm:
        raise ValueError("hkdf_sha256: input keying material is empty")
    return HKDF(
        algorithm=SHA256(), length=length, salt=None, info=label + b"\x00" + context
    ).derive(ikm)
