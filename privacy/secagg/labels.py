"""Domain-separation labels for every key the protocol derives.

Every HKDF call names its purpose with one of these constants and binds the run, the
round and the nodes involved in ``info``, so a key derived for one purpose, run, round or
pair of nodes is never equal to a key for another (up to HKDF's security).
"""

from __future__ import annotations

import struct

PROTOCOL_VERSION = 1

#: Seed of the mask shared by two neighbours in one round (from their X25519 mask keys).
LABEL_PAIRWISE_MASK = b"consortia/secagg/v1/pairwise-mask"
#: AES-256 key of a client's self mask, derived from its per-round seed b_i.
LABEL_SELF_MASK = b"consortia/secagg/v1/self-mask"
#: AES-GCM key that encrypts one sender's shares for one recipient in one round.
LABEL_SHARE_ENCRYPTION = b"consortia/secagg/v1/share-encryption"
#: AES key of the stream that orders the participants on the neighbour ring.
LABEL_NEIGHBOUR_GRAPH = b"consortia/secagg/v1/neighbour-graph"
#: Associated data of a share ciphertext (authenticated, not encrypted).
LABEL_SHARE_AD = b"consortia/secagg/v1/share-ad"


def context(
    *, run_id: int, round_num: int, round_seed: bytes = b"", nodes: tuple[int, ...] = ()
) -> bytes:
    """Serialise (version, run, round, round seed, nodes...) injectively.

    Integers are fixed-width big-endian and the variable parts carry their length, so two
    different contexts never give the same bytes (a plain string join would not promise
    that). ``round_seed`` is the server's fresh public nonce for the round: a round that
    is retried under the same number still gets keys of its own.
    """
    return (
        struct.pack(">BQQB", PROTOCOL_VERSION, run_id, round_num, len(round_seed))
        + round_seed
        + struct.pack(f">B{len(nodes)}Q", len(nodes), *nodes)
    )
