"""The SecAgg+ neighbour graph: a Harary graph on a randomly ordered ring.

Bell et al. (2020) replace the complete graph of Bonawitz et al. (2017) with a random
k-regular graph, k = O(log n), so each client masks with, and shares its secrets among,
only k neighbours. We place the participants on a ring in an order drawn from a public
per-round seed and join each to the k/2 nearest on either side (the Harary graph
H(k, n)). Everyone derives the same graph from (seed, participants, k), so it needs no
message of its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .kdf import hkdf_sha256
from .labels import LABEL_NEIGHBOUR_GRAPH
from .masks import keystream

Graph = dict[int, tuple[int, ...]]


def default_num_neighbours(num_participants: int) -> int:
    """k: the even number at or above log2(n), at most n - 1 (then the graph is complete)."""
    if num_participants < 2:
        raise ValueError(
            f"secure aggregation needs at least 2 participants, got {num_participants}"
        )
    k = 2 * math.ceil(math.log2(num_participants) / 2)
    return min(max(k, 2), num_participants - 1)


def num_neighbours(num_participants: int, requested: int | None = None) -> int:
    """k for a round of `num_participants`: the requested k (secagg.neighbours) or the
    default, at most n - 1."""
    k = requested if requested is not None else default_num_neighbours(num_participants)
    return min(k, num_participants - 1)


def share_holders(num_participants: int, num_neighbours: int) -> int:
    """The share holders each client has in :func:`neighbour_graph`'s graph, itself and
    its neighbours: k + 1, but k when k and n are both odd (each then gets k - 1
    neighbours). The most a round's threshold t can be."""
    k = num_neighbours
    return k if k % 2 == 1 and num_participants % 2 == 1 else k + 1


def default_threshold(num_neighbours: int) -> int:
    """t: a strict majority of the k + 1 share holders (the client and its k neighbours)."""
    return (num_neighbours + 1) // 2 + 1


def neighbour_graph(participants: Sequence[int], *, num_neighbours: int, seed: bytes) -> Graph:
    """Each participant's neighbours (sorted), from the public ``seed``.

    Every node gets exactly ``num_neighbours`` neighbours, except when both k and n are
    odd: then each gets k - 1 (a ring cannot give every node an odd degree).
    """
    nodes = sorted(participants)
    n = len(nodes)
    if len(set(nodes)) != n:
        raise ValueError("participants contain duplicates")
    if not 1 <= num_neighbours <= n - 1:
        raise ValueError(f"num_neighbours {num_neighbours} must be in [1, {n - 1}] for n={n}")
    if num_neighbours < 2 and n > 2:
        raise ValueError(f"num_neighbours must be at least 2 for n={n}: one leaves the graph split")
    if num_neighbours == n - 1:
        return {v: tuple(u for u in nodes if u != v) for v in nodes}
    # Random ring order from an AES-CTR stream keyed by the seed: uniform 64-bit sort keys
    # (ties, probability ~n^2/2^64, are broken by node id so the order is still shared).
    key = hkdf_sha256(seed, label=LABEL_NEIGHBOUR_GRAPH, context=n.to_bytes(8, "big"))
    stream = keystream(key).update(bytes(8 * n))
    sort_keys = np.frombuffer(stream, dtype=">u8")
    ring = [nodes[i] for i in np.lexsort((np.arange(n), sort_keys))]
    half = num_neighbours // 2
    neighbours: dict[int, set[int]] = {v: set() for v in nodes}
    for pos, v in enumerate(ring):
        for step in range(1, half + 1):
            u = ring[(pos + step) % n]
            neighbours[v].add(u)
            neighbours[u].add(v)
        if num_neighbours % 2 == 1 and n % 2 == 0:
            # Odd k: also join the diametrically opposite node, as in H(k, n) for even n.
            u = ring[(pos + n // 2) % n]
            neighbours[v].add(u)
            neighbours[u].add(v)
    return {v: tuple(sorted(neighbours[v])) for v in nodes}


def is_connected(nodes: Iterable[int], graph: Mapping[int, Sequence[int]]) -> bool:
    """Whether the subgraph of ``graph`` induced on ``nodes`` is connected.

    When the survivors' subgraph splits, the pairwise masks cancel within each piece, so
    unmasking would reveal each piece's sum and not only the total: the protocol aborts.
    """
    members = set(nodes)
    if not members:
        return False
    start = next(iter(members))
    seen = {start}
    frontier = [start]
    while frontier:
        v = frontier.pop()
        for u in graph[v]:
            if u in members and u not in seen:
                seen.add(u)
                frontier.append(u)
    return seen == members
