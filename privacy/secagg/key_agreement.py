"""X25519 key pairs whose private half never shows up in a repr or a log line."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

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
# outputs of it), so a key pair remembers its last agreements, by peer public key: it
# saves a client up to 2k + 1 X25519 operations (about 40 µs each) a round. The client
# keeps them in its own state with its private keys (client.py), so they follow it from
# process to process, as a simulated client moves between workers; they never reach a
# log, a message or anyone else's file.
AGREEMENTS_KEPT = 128


class X25519KeyPair:
    """A long-term X25519 key pair; ``agree`` gives the raw 32-byte shared secret."""

    __slots__ = ("_agreed", "_private", "public_bytes")

    def __init__(self, private: X25519PrivateKey, *, public_bytes: bytes | None = None,
                 agreed: Mapping[bytes, bytes] | None = None) -> None:
        self._private = private
        # The owner's own state may carry the public half, which saves deriving it.
        self.public_bytes: bytes = (public_bytes if public_bytes is not None else
                                    private.public_key().public_bytes(Encoding.Raw,
                                                                      PublicFormat.Raw))
        self._agreed: OrderedDict[bytes, bytes] = OrderedDict(agreed or {})

    @classmethod
    def generate(cls) -> X25519KeyPair:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes, *, public_bytes: bytes | None = None,
                           agreed: Mapping[bytes, bytes] | None = None) -> X25519KeyPair:
        return cls(X25519PrivateKey.from_private_bytes(data), public_bytes=public_bytes,
                   agreed=agreed)

    def private_bytes(self) -> bytes:
        """Raw private key, for the client's own state store only."""
        return self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def agreements(self) -> dict[bytes, bytes]:
        """The agreements it remembers (peer public key -> secret), oldest first: for the
        client's own state store only."""
        return dict(self._agreed)

    def agree(self, peer_public: bytes, *, peer_id: int | None = None) -> bytes:
        """X25519(own private, peer public). Rejects malformed and low-order peer keys."""
        if len(peer_public) != PUBLIC_KEY_LEN:
            raise SecAggProtocolError(
                f"X25519 public key has {len(peer_public)} bytes, expected {PUBLIC_KEY_LEN}",
                node_id=peer_id,
            )
        peer_public = bytes(peer_public)
        shared = self._agreed.get(peer_public)
        if shared is not None:
            self._agreed.move_to_end(peer_public)
            return shared
        try:
            # cryptography raises ValueError when the result is all zeros (low-order point).
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:
            raise SecAggProtocolError(f"invalid X25519 public key: {exc}", node_id=peer_id) from exc
        self._agreed[peer_public] = shared
        if len(self._agreed) > AGREEMENTS_KEPT:
            self._agreed.popitem(last=False)
        return shared

    def __repr__(self) -> str:
        return f"X25519KeyPair(public={self.public_bytes.hex()[:16]}..., private=<hidden>)"
