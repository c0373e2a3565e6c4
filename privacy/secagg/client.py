"""The client side of the protocol: one method per stage.

Stage 0, once per run:  :meth:`ClientSecAggSession.advertise_keys`
Stage 1, every round:   :meth:`ClientSecAggSession.share_keys_and_mask_input` (the reply
                        rides on the train reply)
Stage 2, every round:   :meth:`ClientSecAggSession.unmask`

Between rounds the session keeps its two long-term key pairs and what it needs to answer
the current round's unmask request once; :meth:`to_state_bytes` lets a ClientApp keep
that in its node state.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from . import aead, shamir
from .errors import SecAggProtocolError
from .graph import is_connected
from .key_agreement import X25519KeyPair
from .masks import add_masks
from .messages import (
    AdvertiseKeys,
    MaskedInput,
    ParticipantKeys,
    RoundSetup,
    UnmaskRequest,
    UnmaskResponse,
)
from .round_plan import RoundPlan, pairwise_sign
from .shamir import SHARE_LEN

_STATE_MAGIC_V1 = b"CSAclient1"  # still read
_STATE_MAGIC = b"CSAclient2"


class ClientSecAggSession:
    """One client's secure-aggregation state for one run.

    Security rules it enforces (the server cannot talk it out of them):

    * a round is masked at most once per (round, round seed), and never for a round
      older than the last one, so pairwise seeds are never reused;
    * an unmask request is answered at most once per masked round, and only for the
      round it masked;
    * in that answer it reveals shares of b_j only for survivors j, and shares of
      pairwise seeds only for pairs (survivor, dropped): never both kinds for one client;
    * it refuses to unmask when the survivors' neighbour graph is split, since the server
      would then learn partial sums.
    """

    def __init__(
        self,
        *,
        node_id: int,
        run_id: int,
        encryption_keys: X25519KeyPair | None = None,
        masking_keys: X25519KeyPair | None = None,
    ) -> None:
        self.node_id = node_id
        self.run_id = run_id
        self._encryption_keys = encryption_keys or X25519KeyPair.generate()
        self._masking_keys = masking_keys or X25519KeyPair.generate()
        self._last_round: int | None = None
        self._last_round_seed: bytes = b""
        self._pending: RoundSetup | None = None  # masked, unmask request not yet answered

    def __repr__(self) -> str:
        return (
            f"ClientSecAggSession(node_id={self.node_id}, run_id={self.run_id}, "
            f"last_round={self._last_round}, keys=<hidden>)"
        )

    @property
    def public_keys(self) -> ParticipantKeys:
        return ParticipantKeys(
            self.node_id, self._encryption_keys.public_bytes, self._masking_keys.public_bytes
        )

    # Stage 0 (AdvertiseKeys in Bonawitz et al.) ------------------------------------------

    def advertise_keys(self) -> AdvertiseKeys:
        """The long-term public keys, sent once per run."""
        return AdvertiseKeys(self.run_id, self.public_keys)

    # Stage 1 (ShareKeys + MaskedInputCollection, merged) ---------------------------------

    def share_keys_and_mask_input(self, setup: RoundSetup, encoded: np.ndarray, *,
                                  consume: bool = False) -> MaskedInput:
        """Mask ``encoded`` (uint32, from :func:`quantize.encode`) and share the secrets.

        Draws a fresh self-mask seed b_i, derives one pairwise seed per neighbour, splits
        each into Shamir shares for the share holders (itself and its neighbours), seals
        each holder's shares with AES-GCM, and masks the input.
        """
        self._check_setup(setup)
        encoded = np.asarray(encoded)
        if encoded.dtype != np.uint32 or encoded.ndim != 1:
            raise ValueError(
                f"encoded update must be 1-D uint32, got {encoded.dtype} {encoded.shape}"
            )
        if len(encoded) != setup.vector_length:
            raise ValueError(
                f"encoded update has {len(encoded)} values, the round expects {setup.vector_length}"
            )
        plan = RoundPlan.from_setup(setup)
        me = self.node_id
        neighbours = plan.graph[me]
        holders = plan.holders(me)
        points = [plan.share_point[h] for h in holders]

        self_mask_seed = os.urandom(shamir.SECRET_LEN)
        pair_seeds = {j: plan.pairwise_seed(self._masking_keys, me, j) for j in neighbours}

        per_secret = [shamir.split(self_mask_seed, threshold=plan.threshold, xs=points)]
        per_secret += [
            shamir.split(pair_seeds[j], threshold=plan.threshold, xs=points) for j in neighbours
        ]
        encrypted = {}
        for h in holders:
            bundle = b"".join(shares[plan.share_point[h]] for shares in per_secret)
            key = plan.share_key(self._encryption_keys, me, h, h)
            encrypted[h] = aead.seal(key, bundle, plan.share_associated_data(me, h))

        # consume=True masks the caller's buffer in place (it must not use it afterwards):
        # one 4-bytes-per-parameter copy less per client and round.
        masked = encoded if consume else encoded.copy()
        add_masks(masked, [(plan.self_mask_key(self_mask_seed, me), 1)]
                  + [(pair_seeds[j], pairwise_sign(me, j)) for j in neighbours])

        self._last_round = setup.round_num
        self._last_round_seed = setup.round_seed
        self._pending = setup
        return MaskedInput(self.run_id, setup.round_num, setup.round_seed, me, encrypted, masked)

    def _check_setup(self, setup: RoundSetup) -> None:
        if setup.run_id != self.run_id:
            raise SecAggProtocolError(f"RoundSetup is for run {setup.run_id}, not {self.run_id}")
        if self._last_round is not None and (
            setup.round_num < self._last_round
            or (setup.round_num == self._last_round and setup.round_seed == self._last_round_seed)
        ):
            raise SecAggProtocolError(
                f"RoundSetup for round {setup.round_num} replayed (last masked round "
                f"{self._last_round}); a retried round needs a fresh round seed"
            )
        mine = {p.node_id: p for p in setup.participants}.get(self.node_id)
        if mine is None:
            raise SecAggProtocolError(f"RoundSetup does not list this client ({self.node_id})")
        if mine != self.public_keys:
            raise SecAggProtocolError(
                "RoundSetup lists public keys for this client that are not its own"
            )

    # Stage 2 (Unmasking) --------------------------------------------------------------------

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal the shares the server needs to remove the masks, and nothing more."""
        setup = self._pending
        if setup is None or request.run_id != self.run_id:
            raise SecAggProtocolError(
                f"UnmaskRequest for run {request.run_id} round {request.round_num}: no masked "
                "input awaits unmasking (never masked, or already answered)"
            )
        if request.round_num != setup.round_num or request.round_seed != setup.round_seed:
            raise SecAggProtocolError(
                f"UnmaskRequest is for round {request.round_num}, this client masked round "
                f"{setup.round_num} (or the round seed differs)"
            )
        plan = RoundPlan.from_setup(setup)
        participants = set(plan.graph)
        survivors = set(request.survivors)
        if len(survivors) != len(request.survivors):
            raise SecAggProtocolError("UnmaskRequest lists a survivor twice")
        unknown = survivors - participants
        if unknown:
            raise SecAggProtocolError(f"UnmaskRequest names non-participants {sorted(unknown)}")
        if self.node_id not in survivors:
            raise SecAggProtocolError("UnmaskRequest does not count this client as a survivor")
        if len(survivors) < plan.threshold:
            raise SecAggProtocolError(
                f"UnmaskRequest has {len(survivors)} survivors, below threshold {plan.threshold}"
            )
        if not is_connected(survivors, plan.graph):
            raise SecAggProtocolError(
                "survivors' neighbour graph is split: unmasking would reveal partial sums"
            )
        dropped = participants - survivors

        self_mask_shares: dict[int, bytes] = {}
        pairwise_shares: dict[tuple[int, int], bytes] = {}
        for sender, sealed in request.encrypted_shares.items():
            if sender not in survivors:
                # A dropped client sent no shares in this protocol; a "share" from one is
                # forged, and revealing b of a dropped client would unmask its input.
                raise SecAggProtocolError(
                    "shares from a client that is not a survivor", node_id=sender
                )
            if self.node_id not in plan.holders(sender):
                raise SecAggProtocolError(
                    "shares from a client this one holds none for", node_id=sender
                )
            if len(sealed) != plan.sealed_len(sender):
                raise SecAggProtocolError(
                    f"share ciphertext has {len(sealed)} bytes, expected {plan.sealed_len(sender)}",
                    node_id=sender,
                )
            key = plan.share_key(self._encryption_keys, sender, self.node_id, sender)
            bundle = aead.open_sealed(
                key, sealed, plan.share_associated_data(sender, self.node_id), sender=sender
            )
            self_mask_shares[sender] = bundle[:SHARE_LEN]
            for i, d in enumerate(plan.graph[sender], start=1):
                if d in dropped:
                    pairwise_shares[(sender, d)] = bundle[i * SHARE_LEN : (i + 1) * SHARE_LEN]

        self._pending = None  # one answer per round, whatever comes next
        return UnmaskResponse(
            self.run_id,
            setup.round_num,
            setup.round_seed,
            self.node_id,
            self_mask_shares,
            pairwise_shares,
        )

    # State for a ClientApp's node state ---------------------------------------------------

    def to_state_bytes(self) -> bytes:
        """Everything the session needs to continue, private keys (and the agreements
        they remember) included: keep it local."""
        pending = self._pending.to_bytes() if self._pending is not None else b""
        last = -1 if self._last_round is None else self._last_round
        parts = [_STATE_MAGIC, struct.pack(">QQq", self.node_id, self.run_id, last)]
        for keys in (self._encryption_keys, self._masking_keys):
            agreed = keys.agreements()
            parts += [keys.private_bytes(), keys.public_bytes, struct.pack(">H", len(agreed))]
            parts += [peer + secret for peer, secret in agreed.items()]
        parts += [struct.pack(">B", len(self._last_round_seed)), self._last_round_seed, pending]
        return b"".join(parts)

    @classmethod
    def from_state_bytes(cls, data: bytes) -> ClientSecAggSession:
        if not data.startswith((_STATE_MAGIC, _STATE_MAGIC_V1)):
            raise ValueError("not a ClientSecAggSession state")
        try:
            if data.startswith(_STATE_MAGIC_V1):
                return cls._from_state_bytes_v1(data)
            return cls._from_state_bytes_v2(data)
        except (struct.error, IndexError, ValueError, SecAggProtocolError) as err:
            raise ValueError(f"ClientSecAggSession state of {len(data)} bytes is truncated or "
                             f"corrupt ({err}); the client's state file (or node state) "
                             "must be restored or removed, which starts new keys") from err

    @classmethod
    def _from_state_bytes_v2(cls, data: bytes) -> ClientSecAggSession:
        pos = len(_STATE_MAGIC)
        node_id, run_id, last = struct.unpack_from(">QQq", data, pos)
        pos += 24
        pairs = []
        for _ in range(2):
            private, public = data[pos : pos + 32], data[pos + 32 : pos + 64]
            (count,) = struct.unpack_from(">H", data, pos + 64)
            pos += 66
            agreed = {data[i : i + 32]: data[i + 32 : i + 64]
                      for i in range(pos, pos + 64 * count, 64)}
            pos += 64 * count
            pairs.append(X25519KeyPair.from_private_bytes(private, public_bytes=public,
                                                          agreed=agreed))
        return cls._with_round_state(data, pos, node_id, run_id, last, *pairs)

    @classmethod
    def _from_state_bytes_v1(cls, data: bytes) -> ClientSecAggSession:
        """A state written before the key pairs kept their public halves and agreements."""
        pos = len(_STATE_MAGIC_V1)
        node_id, run_id, last = struct.unpack_from(">QQq", data, pos)
        pos += 24
        enc = X25519KeyPair.from_private_bytes(data[pos : pos + 32])
        mask = X25519KeyPair.from_private_bytes(data[pos + 32 : pos + 64])
        return cls._with_round_state(data, pos + 64, node_id, run_id, last, enc, mask)

    @classmethod
    def _with_round_state(cls, data: bytes, pos: int, node_id: int, run_id: int, last: int,
                          enc: X25519KeyPair, mask: X25519KeyPair) -> ClientSecAggSession:
        seed_len = data[pos]
        seed = data[pos + 1 : pos + 1 + seed_len]
        pos += 1 + seed_len
        session = cls(node_id=node_id, run_id=run_id, encryption_keys=enc, masking_keys=mask)
        session._last_round = None if last < 0 else last
        session._last_round_seed = seed
        session._pending = RoundSetup.from_bytes(data[pos:]) if pos < len(data) else None
        return session
