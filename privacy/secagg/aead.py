"""AES-256-GCM for the secret shares that travel through the server.

The server relays shares between clients; AES-GCM keeps them confidential from it and
makes any change to them, or any attempt to deliver them in another run, round or to
another recipient (bound in the associated data), fail authentication.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import SecAggProtocolError

NONCE_LEN = 12
TAG_LEN = 16


def seal(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """Encrypt; returns ``nonce || ciphertext || tag``.

    Each key encrypts one message (it is derived per sender, recipient and round), so a
    random nonce is more than enough; it is kept so that a key reused by mistake is
    still safe.
    """
    nonce = os.urandom(NONCE_LEN)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(
    key: bytes, sealed: bytes, associated_data: bytes, *, sender: int | None = None
) -> bytes:
    """Decrypt and authenticate; a forged, altered or misdirected ciphertext raises."""
    if len(sealed) < NONCE_LEN + TAG_LEN:
        raise SecAggProtocolError(
            f"share ciphertext has {len(sealed)} bytes, fewer than {NONCE_LEN + TAG_LEN}",
            node_id=sender,
        )
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_LEN], sealed[NONCE_LEN:], associated_data)
    except InvalidTag as exc:
        raise SecAggProtocolError(
            "share ciphertext failed authentication (altered, or not for this run, round "
            "and recipient)",
            node_id=sender,
        ) from exc
