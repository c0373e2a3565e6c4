"""The protocol's messages, each with a compact binary form.

Every message is a frozen dataclass with ``to_bytes`` / ``from_bytes``; the bytes fit a
Flower ``ConfigRecord`` value. The masked vector of :class:`MaskedInput` can instead
travel in an ``ArrayRecord``: ``to_bytes(include_vector=False)`` and
``from_bytes(header, vector=...)``.

Layout: a 4-byte magic ``CSA`` + version, a 1-byte message type, then fixed-width
big-endian fields; variable-length parts carry their length. Parsing checks every
length and rejects trailing bytes, raising :class:`SecAggProtocolError`.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field

import numpy as np

from .errors import SecAggProtocolError
from .key_agreement import PUBLIC_KEY_LEN
from .labels import PROTOCOL_VERSION
from .shamir import SHARE_LEN

ROUND_SEED_LEN = 32
_MAGIC = b"CSA" + bytes([PROTOCOL_VERSION])

_ADVERTISE_KEYS = 1
_ROUND_SETUP = 2
_MASKED_INPUT = 3
_UNMASK_REQUEST = 4
_UNMASK_RESPONSE = 5


class _Writer:
    def __init__(self, kind: int) -> None:
        self._parts = [_MAGIC, bytes([kind])]

    def u16(self, v: int) -> _Writer:
        self._parts.append(struct.pack(">H", v))
        return self

    def u64(self, v: int) -> _Writer:
        self._parts.append(struct.pack(">Q", v))
        return self

    def fixed(self, data: bytes) -> _Writer:
        self._parts.append(data)
        return self

    def blob(self, data: bytes) -> _Writer:
        self._parts.append(struct.pack(">I", len(data)))
        self._parts.append(data)
        return self

    def done(self) -> bytes:
        return b"".join(self._parts)


class _Reader:
    def __init__(self, data: bytes, kind: int, name: str) -> None:
        self._data = memoryview(data).cast("B")
        self._pos = 0
        self._name = name
        if self.fixed(4) != _MAGIC:
            raise SecAggProtocolError(f"{name}: not a consortia secagg v{PROTOCOL_VERSION} message")
        if self.fixed(1)[0] != kind:
            raise SecAggProtocolError(f"{name}: wrong message type")

    def fixed(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise SecAggProtocolError(
                f"{self._name}: truncated ({len(self._data)} bytes, needed {self._pos + n})"
            )
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return out

    def u16(self) -> int:
        return struct.unpack(">H", self.fixed(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.fixed(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.fixed(8))[0]

    def blob(self) -> bytes:
        return self.fixed(self.u32())

    def rest_view(self) -> memoryview:
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out

    def end(self) -> None:
        if self._pos != len(self._data):
            raise SecAggProtocolError(
                f"{self._name}: {len(self._data) - self._pos} unexpected trailing bytes"
            )


def _write_id_blobs(w: _Writer, items: dict[int, bytes]) -> None:
    w.u64(len(items))
    for node_id in sorted(items):
        w.u64(node_id).blob(items[node_id])


def _read_id_blobs(r: _Reader, what: str) -> dict[int, bytes]:
    count = r.u64()
    items: dict[int, bytes] = {}
    for _ in range(count):
        node_id = r.u64()
        if node_id in items:
            raise SecAggProtocolError(f"{what}: node {node_id} appears twice")
        items[node_id] = r.blob()
    return items


@dataclass(frozen=True)
class ParticipantKeys:
    """A participant's two long-term X25519 public keys."""

    node_id: int
    encryption_public_key: bytes  # c_i^PK in Bonawitz et al.: encrypts shares
    masking_public_key: bytes  # s_i^PK: pairwise mask agreement


@dataclass(frozen=True)
class AdvertiseKeys:
    """Stage 0, client -> server, once per run: the client's long-term public keys."""

    run_id: int
    keys: ParticipantKeys

    def to_bytes(self) -> bytes:
        k = self.keys
        return (
            _Writer(_ADVERTISE_KEYS)
            .u64(self.run_id)
            .u64(k.node_id)
            .fixed(k.encryption_public_key)
            .fixed(k.masking_public_key)
            .done()
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> AdvertiseKeys:
        r = _Reader(data, _ADVERTISE_KEYS, "AdvertiseKeys")
        run_id, node_id = r.u64(), r.u64()
        keys = ParticipantKeys(node_id, r.fixed(PUBLIC_KEY_LEN), r.fixed(PUBLIC_KEY_LEN))
        r.end()
        return cls(run_id, keys)


@dataclass(frozen=True)
class RoundSetup:
    """Stage 1 request, server -> each participant, riding on the train request.

    Carries everything a client needs to mask: the participants and their public keys,
    the round's public seed (neighbour graph and key separation), k and t, and the
    length of the vector to mask.
    """

    run_id: int
    round_num: int
    round_seed: bytes
    num_neighbours: int
    threshold: int
    vector_length: int
    participants: tuple[ParticipantKeys, ...]
    # The bytes it was read from, if it was: written back as they are (a client stores
    # its pending setup with its state every round). Not an init field, so a copy made
    # with dataclasses.replace is serialized afresh.
    _raw: bytes | None = field(default=None, init=False, compare=False, repr=False)

    def participant_ids(self) -> list[int]:
        return [p.node_id for p in self.participants]

    def to_bytes(self) -> bytes:
        if self._raw is not None:
            return self._raw
        w = (
            _Writer(_ROUND_SETUP)
            .u64(self.run_id)
            .u64(self.round_num)
            .fixed(self.round_seed)
            .u16(self.num_neighbours)
            .u16(self.threshold)
            .u64(self.vector_length)
            .u64(len(self.participants))
        )
        for p in self.participants:
            w.u64(p.node_id).fixed(p.encryption_public_key).fixed(p.masking_public_key)
        return w.done()

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundSetup:
        # A client reads the same setup several times a round (train request, its state,
        # the unmask); it is immutable, so a parse is kept for the next read.
        return _round_setup_from_bytes(bytes(data))

    @classmethod
    def _parse(cls, data: bytes) -> RoundSetup:
        r = _Reader(data, _ROUND_SETUP, "RoundSetup")
        run_id, round_num, seed = r.u64(), r.u64(), r.fixed(ROUND_SEED_LEN)
        k, t, length, count = r.u16(), r.u16(), r.u64(), r.u64()
        participants = []
        for _ in range(count):
            participants.append(
                ParticipantKeys(r.u64(), r.fixed(PUBLIC_KEY_LEN), r.fixed(PUBLIC_KEY_LEN))
            )
        r.end()
        ids = [p.node_id for p in participants]
        if len(set(ids)) != len(ids):
            raise SecAggProtocolError("RoundSetup: a participant is listed twice")
        setup = cls(run_id, round_num, seed, k, t, length, tuple(participants))
        object.__setattr__(setup, "_raw", data)
        return setup


@functools.lru_cache(maxsize=8)
def _round_setup_from_bytes(data: bytes) -> RoundSetup:
    return RoundSetup._parse(data)


@dataclass(frozen=True)
class MaskedInput:
    """Stage 1 reply, client -> server, riding on the train reply.

    ``masked`` is y_i = x_i + PRG(b_i) + sum_j +-PRG(s_ij) modulo 2**32;
    ``encrypted_shares`` maps each share holder (the client's neighbours and the client
    itself) to the AES-GCM ciphertext of its shares of b_i and of the pairwise seeds.
    """

    run_id: int
    round_num: int
    round_seed: bytes
    node_id: int
    encrypted_shares: dict[int, bytes]
    masked: np.ndarray = field(repr=False)

    def to_bytes(self, *, include_vector: bool = True) -> bytes:
        w = (
            _Writer(_MASKED_INPUT)
            .u64(self.run_id)
            .u64(self.round_num)
            .fixed(self.round_seed)
            .u64(self.node_id)
        )
        _write_id_blobs(w, self.encrypted_shares)
        if include_vector:
            w.u64(len(self.masked)).fixed(self.masked.astype("<u4", copy=False).tobytes())
        return w.done()

    @classmethod
    def from_bytes(cls, data: bytes, *, vector: np.ndarray | None = None) -> MaskedInput:
        """Parse; pass ``vector`` when the bytes were made with ``include_vector=False``."""
        r = _Reader(data, _MASKED_INPUT, "MaskedInput")
        run_id, round_num, seed, node_id = r.u64(), r.u64(), r.fixed(ROUND_SEED_LEN), r.u64()
        shares = _read_id_blobs(r, "MaskedInput shares")
        if vector is None:
            length = r.u64()
            raw = r.rest_view()
            if len(raw) != 4 * length:
                raise SecAggProtocolError(
                    f"MaskedInput: vector of {length} values needs {4 * length} bytes, "
                    f"got {len(raw)}",
                    node_id=node_id,
                )
            masked = np.frombuffer(raw, dtype="<u4").astype(np.uint32, copy=False)
        else:
            r.end()
            masked = np.asarray(vector)
            if masked.dtype != np.uint32 or masked.ndim != 1:
                raise SecAggProtocolError(
                    f"MaskedInput: vector must be 1-D uint32, got {masked.dtype} "
                    f"with shape {masked.shape}",
                    node_id=node_id,
                )
        return cls(run_id, round_num, seed, node_id, shares, masked)


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 2 request, server -> each surviving client.

    ``survivors`` is U1, the clients whose masked input the server summed (the others of
    the round are dropped); ``encrypted_shares`` maps each survivor that chose this
    client as a share holder to the ciphertext it addressed to it.
    """

    run_id: int
    round_num: int
    round_seed: bytes
    survivors: tuple[int, ...]
    encrypted_shares: dict[int, bytes]

    def to_bytes(self) -> bytes:
        w = _Writer(_UNMASK_REQUEST).u64(self.run_id).u64(self.round_num).fixed(self.round_seed)
        w.u64(len(self.survivors))
        for node_id in self.survivors:
            w.u64(node_id)
        _write_id_blobs(w, self.encrypted_shares)
        return w.done()

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        r = _Reader(data, _UNMASK_REQUEST, "UnmaskRequest")
        run_id, round_num, seed = r.u64(), r.u64(), r.fixed(ROUND_SEED_LEN)
        survivors = tuple(r.u64() for _ in range(r.u64()))
        shares = _read_id_blobs(r, "UnmaskRequest shares")
        r.end()
        return cls(run_id, round_num, seed, survivors, shares)


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 2 reply, surviving client -> server.

    ``self_mask_shares[j]``: this client's share of b_j, for survivors j;
    ``pairwise_shares[(j, d)]``: its share of the seed j shares with a dropped d.
    Never both kinds for the same client: b only for survivors, pairs only with dropped.
    """

    run_id: int
    round_num: int
    round_seed: bytes
    node_id: int
    self_mask_shares: dict[int, bytes]
    pairwise_shares: dict[tuple[int, int], bytes]

    def to_bytes(self) -> bytes:
        w = (
            _Writer(_UNMASK_RESPONSE)
            .u64(self.run_id)
            .u64(self.round_num)
            .fixed(self.round_seed)
            .u64(self.node_id)
            .u64(len(self.self_mask_shares))
        )
        for owner in sorted(self.self_mask_shares):
            w.u64(owner).fixed(self.self_mask_shares[owner])
        w.u64(len(self.pairwise_shares))
        for owner, dropped in sorted(self.pairwise_shares):
            w.u64(owner).u64(dropped).fixed(self.pairwise_shares[(owner, dropped)])
        return w.done()

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskResponse:
        r = _Reader(data, _UNMASK_RESPONSE, "UnmaskResponse")
        run_id, round_num, seed, node_id = r.u64(), r.u64(), r.fixed(ROUND_SEED_LEN), r.u64()
        self_mask: dict[int, bytes] = {}
        for _ in range(r.u64()):
            owner = r.u64()
            if owner in self_mask:
                raise SecAggProtocolError(f"UnmaskResponse: owner {owner} twice", node_id=node_id)
            self_mask[owner] = r.fixed(SHARE_LEN)
        pairwise: dict[tuple[int, int], bytes] = {}
        for _ in range(r.u64()):
            pair = (r.u64(), r.u64())
            if pair in pairwise:
                raise SecAggProtocolError(f"UnmaskResponse: pair {pair} twice", node_id=node_id)
            pairwise[pair] = r.fixed(SHARE_LEN)
        r.end()
        return cls(run_id, round_num, seed, node_id, self_mask, pairwise)
