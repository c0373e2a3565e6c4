"""What both sides derive from a round's public setup: graph, share points, keys.

Key schedule (all HKDF-SHA256, labels in :mod:`labels`, context = run, round, the
round's public seed and the nodes named):

* pairwise seed  s_ij = HKDF(X25519(s_i, s_j^PK), LABEL_PAIRWISE_MASK, ctx(min, max))
* self-mask key        HKDF(b_i, LABEL_SELF_MASK, ctx(i))
* share key      k_i->j = HKDF(X25519(c_i, c_j^PK), LABEL_SHARE_ENCRYPTION, ctx(i, j))

The long-term X25519 keys never leave the client and their shared secrets are never
revealed: only round-bound HKDF outputs are secret-shared, and HKDF is one-way, so
recovering a dropped client's pairwise seeds for one round says nothing about its seeds
in any other round (or in a retry of the same round, which gets a fresh public seed).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .aead import NONCE_LEN, TAG_LEN
from .errors import SecAggProtocolError
from .graph import Graph, neighbour_graph
from .kdf import hkdf_sha256
from .key_agreement import PUBLIC_KEY_LEN, X25519KeyPair
from .labels import (
    LABEL_PAIRWISE_MASK,
    LABEL_SELF_MASK,
    LABEL_SHARE_AD,
    LABEL_SHARE_ENCRYPTION,
    context,
)
from .messages import ROUND_SEED_LEN, ParticipantKeys, RoundSetup
from .shamir import SHARE_LEN


@dataclass(frozen=True)
class RoundPlan:
    """The public facts of one round, derived identically by the server and clients."""

    setup: RoundSetup
    graph: Graph
    keys: dict[int, ParticipantKeys]
    share_point: dict[int, int]  # Shamir x-coordinate of each participant (1-based rank)

    @classmethod
    def from_setup(cls, setup: RoundSetup) -> RoundPlan:
        # Both stages of a round need the plan (and its graph costs an AES stream and a
        # sort): it is kept for the next call with the same setup. Never mutated.
        return _plan_of(setup)

    @classmethod
    def _derive(cls, setup: RoundSetup) -> RoundPlan:
        ids = sorted(setup.participant_ids())
        n = len(ids)
        if n < 2:
            raise SecAggProtocolError(f"RoundSetup: {n} participants, at least 2 needed")
        if len(setup.round_seed) != ROUND_SEED_LEN:
            raise SecAggProtocolError(f"RoundSetup: round seed must be {ROUND_SEED_LEN} bytes")
        if setup.vector_length < 1:
            raise SecAggProtocolError("RoundSetup: vector_length must be at least 1")
        for p in setup.participants:
            if (
                len(p.encryption_public_key) != PUBLIC_KEY_LEN
                or len(p.masking_public_key) != PUBLIC_KEY_LEN
            ):
                raise SecAggProtocolError(
                    "RoundSetup: public key of wrong length", node_id=p.node_id
                )
        try:
            graph = neighbour_graph(ids, num_neighbours=setup.num_neighbours, seed=setup.round_seed)
        except ValueError as exc:
            raise SecAggProtocolError(f"RoundSetup: {exc}") from exc
        fewest_holders = 1 + min(len(v) for v in graph.values())
        # t = 1 would let any single holder (or the client's own share) reveal a secret.
        if not 2 <= setup.threshold <= fewest_holders:
            raise SecAggProtocolError(
                f"RoundSetup: threshold {setup.threshold} must be in [2, {fewest_holders}] "
                f"(share holders per client with k={setup.num_neighbours}, n={n})"
            )
        return cls(
            setup=setup,
            graph=graph,
            keys={p.node_id: p for p in setup.participants},
            share_point={node: rank + 1 for rank, node in enumerate(ids)},
        )

    @property
    def threshold(self) -> int:
        return self.setup.threshold

    def holders(self, owner: int) -> tuple[int, ...]:
        """Who holds shares of ``owner``'s secrets: ``owner`` and its neighbours."""
        return tuple(sorted((owner, *self.graph[owner])))

    def bundle_len(self, owner: int) -> int:
        """Plaintext bytes of one holder's shares: b_owner, then one per neighbour seed."""
        return SHARE_LEN * (1 + len(self.graph[owner]))

    def sealed_len(self, owner: int) -> int:
        return NONCE_LEN + self.bundle_len(owner) + TAG_LEN

    def _context(self, *nodes: int) -> bytes:
        s = self.setup
        return context(run_id=s.run_id, round_num=s.round_num, round_seed=s.round_seed, nodes=nodes)

    def pairwise_seed(self, own: X25519KeyPair, own_id: int, peer_id: int) -> bytes:
        shared = own.agree(self.keys[peer_id].masking_public_key, peer_id=peer_id)
        lo, hi = sorted((own_id, peer_id))
        return hkdf_sha256(shared, label=LABEL_PAIRWISE_MASK, context=self._context(lo, hi))

    def self_mask_key(self, seed: bytes, owner: int) -> bytes:
        return hkdf_sha256(seed, label=LABEL_SELF_MASK, context=self._context(owner))

    def share_key(self, own: X25519KeyPair, sender: int, recipient: int, peer_id: int) -> bytes:
        """Key for ``sender``'s shares to ``recipient``; ``peer_id`` is the other end."""
        shared = own.agree(self.keys[peer_id].encryption_public_key, peer_id=peer_id)
        return hkdf_sha256(
            shared, label=LABEL_SHARE_ENCRYPTION, context=self._context(sender, recipient)
        )

    def share_associated_data(self, sender: int, recipient: int) -> bytes:
        return LABEL_SHARE_AD + b"\x00" + self._context(sender, recipient)


@functools.lru_cache(maxsize=8)
def _plan_of(setup: RoundSetup) -> RoundPlan:
    return RoundPlan._derive(setup)


def pairwise_sign(owner: int, peer: int) -> int:
    """+1 if ``owner`` adds the pair's mask, -1 if it subtracts it: the pair cancels."""
    return 1 if owner < peer else -1
