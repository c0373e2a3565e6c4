"""X25519 key pairs whose private half never shows up in a repr or a log line."""

from __future__ import annotations

import threading
from collections import OrderedDict

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from .errors import SecAggProtocolError

PUBLIC_KEY_LEN = 32

# Long-term keys agree on the same secret every round (each round's keys are HKDF
# outputs of it), so this process remembers the last agreements: keyed by (own public
# key, peer public key), it saves a client about 20 X25519 operations (0.5 ms) a round.
# The secrets stay in the memory of the process that holds the private keys anyway,
# and never reach a log, a message or a file.
AGREED_CACHE_SIZE = 1 << 14
_agreed: OrderedDict[tuple[bytes, bytes], bytes] = OrderedDict()
_agreed_lock = threading.Lock()


class X25519KeyPair:
    """A long-term X25519 key pair; ``agree`` gives the raw 32-byte shared secret."""

    __slots__ = ("_private", "public_bytes")

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private
        self.public_bytes: bytes = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> X25519KeyPair:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> X25519KeyPair:
        return cls(X25519PrivateKey.from_private_bytes(data))

    def private_bytes(self) -> bytes:
        """Raw private key, for the client's own state store only."""
        return self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def agree(self, peer_public: bytes, *, peer_id: int | None = None) -> bytes:
        """X25519(own private, peer public). Rejects malformed and low-order peer keys."""
        if len(peer_public) != PUBLIC_KEY_LEN:
            raise SecAggProtocolError(
                f"X25519 public key has {len(peer_public)} bytes, expected {PUBLIC_KEY_LEN}",
                node_id=peer_id,
            )
        pair = (self.public_bytes, bytes(peer_public))
        with _agreed_lock:
            shared = _agreed.get(pair)
            if shared is not None:
                _agreed.move_to_end(pair)
                return shared
        try:
            # cryptography raises ValueError when the result is all zeros (low-order point).
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:
            raise SecAggProtocolError(f"invalid X25519 public key: {exc}", node_id=peer_id) from exc
        with _agreed_lock:
            _agreed[pair] = shared
            if len(_agreed) > AGREED_CACHE_SIZE:
                _agreed.popitem(last=False)
        return shared

    def __repr__(self) -> str:
        return f"X25519KeyPair(public={self.public_bytes.hex()[:16]}..., private=<hidden>)"
