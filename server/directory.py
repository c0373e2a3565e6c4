"""Which client is behind each Flower node, and a stable order of nodes for sampling.

Flower's node ids are random for every run (and every SuperNode registration), and the
Grid lists them as a set, so a strategy that samples `random.sample(nodes, k)` picks
different clients from run to run even with a seeded `random`. Once per node and run the
server asks for the client's own id (one `query.identify` exchange for new nodes); the
strategy then sees the nodes ordered by client id, so the same seed samples the same
clients, and the console can name the site behind a node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from consortia.messages import IDENTIFY

log = logging.getLogger("consortia.server")

# Identify queries go out this many at a time. Flower's simulation engine looks for each
# node's messages by scanning every queued message (its in-memory link state), so one
# query to each of 1,000 nodes at once costs 1,000 × 1,000 checks per scan, rescanned
# until the replies are collected. Measured with 1,000 clients on a quiet 2-core
# machine: a first round (Ray's and the actors' start included) of 31 s asking all at
# once, 24 to 26 s in batches of 100.
IDENTIFY_BATCH = 100


def poll_replies_every(grid: Grid, seconds: float) -> None:
    """A simulation's grid (Flower's InMemoryGrid) sleeps its public `pull_interval`, 0.1 s
    by default, between looks for replies, so every exchange waits up to that long after
    its last reply (a plain round has one exchange, a secure round two); polling an
    in-memory state more often costs little. A deployment's grid has no such setting and
    is left as it is."""
    if isinstance(getattr(grid, "pull_interval", None), (int, float)):
        grid.pull_interval = seconds


def exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """grid.send_and_receive, with every reply attributed to the node it was sent to.

    In a deployment the SuperLink itself answers for a node that stopped heartbeating:
    an error reply whose source is the SuperLink (node 1), not the node. Matching the
    reply to its request keeps that failure on the node it belongs to.
    """
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    for reply in replies:
        node = sent.get(reply.metadata.reply_to_message_id)
        if node is not None and reply.metadata.src_node_id != node:
            reply.metadata.__dict__["_src_node_id"] = node
    return replies


def natural_key(client_id: str) -> tuple:
    return (0, int(client_id), "") if client_id.isdigit() else (1, 0, client_id)


class NodeDirectory:
    def __init__(self, timeout: float):
        self.timeout = timeout
        self.client_of: dict[int, str] = {}

    def identify(self, grid: Grid, node_ids: Iterable[int]) -> None:
        new = [n for n in node_ids if n not in self.client_of]
        deadline = time.monotonic() + self.timeout  # one timeout for all the batches
        for start in range(0, len(new), IDENTIFY_BATCH):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("%d nodes not identified before the timeout; asked again next "
                            "round", len(new) - start)
                return
            self._identify(grid, new[start:start + IDENTIFY_BATCH], left)

    def _identify(self, grid: Grid, nodes: list[int], timeout: float) -> None:
        requests = [Message(RecordDict({"identify": ConfigRecord()}), dst_node_id=n,
                            message_type=IDENTIFY) for n in nodes]
        for reply in exchange(grid, requests, timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s did not say which client it is: %s", node,
                            reply.error.reason)
                continue
            try:
                self.client_of[node] = str(reply.content["identity"]["client_id"])
            except (KeyError, TypeError) as err:
                log.warning("node %s sent a malformed identity: %r", node, err)

    def ordered(self, grid: Grid) -> OrderedGrid:
        return OrderedGrid(grid, self)


class OrderedGrid:
    """The Grid as the strategy sees it: nodes listed in client-id order (known first)."""

    def __init__(self, grid: Grid, directory: NodeDirectory):
        self._grid, self._directory = grid, directory

    def get_node_ids(self) -> list[int]:
        nodes = list(self._grid.get_node_ids())
        self._directory.identify(self._grid, nodes)
        known = {n: self._directory.client_of[n] for n in nodes if n in self._directory.client_of}
        return (sorted(known, key=lambda n: natural_key(known[n]))
                + sorted(n for n in nodes if n not in known))

    def __getattr__(self, name):  # everything else is the real Grid's
        return getattr(self._grid, name)
