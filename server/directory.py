"""Which client is behind each Flower node, and a stable order of nodes for sampling.

Flower's node ids are random for every run (and every SuperNode registration), and the
Grid lists them as a set, so a strategy that samples `random.sample(nodes, k)` picks
different clients from run to run even with a seeded `random`. Once per node and run the
server asks for the client's own id (one `query.identify` exchange for new nodes); the
strategy then sees the nodes ordered by client id, so the same seed samples the same
clients, and the console can name the site behind a node.

In a deployment a node is the partner whose key it authenticated with: the SuperLink
holds the name that key was enrolled under (`consortia certs enroll NAME`, registered by
server/superlink.py), and that name is the node's client id. What the node says it is
comes from its own site.toml; a different name is logged, not trusted. Simulated nodes
have no enrolled name: their client id is what they say.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator

from flwr.app import ConfigRecord, Error, Message, RecordDict
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


# What the link state answers for a request whose time to live (the exchange's timeout,
# below) ran out before its node replied, or whose reply expired unread: Flower's whole
# paragraph about TTLs, removed SuperNodes and messages that never existed, which reads as
# a client's failure. exchange_as_replied says what happened instead.
try:
    from flwr.server.superlink.linkstate.utils import (
        MESSAGE_UNAVAILABLE_ERROR_REASON,
        REPLY_MESSAGE_UNAVAILABLE_ERROR_REASON,
    )
    _EXPIRED_REASONS = frozenset({MESSAGE_UNAVAILABLE_ERROR_REASON,
                                  REPLY_MESSAGE_UNAVAILABLE_ERROR_REASON})
except ImportError:  # pragma: no cover - a Flower that moved them: its words pass through
    _EXPIRED_REASONS = frozenset()


# Why a node that never answered an exchange failed (its request expired, or the exchange
# ended first): the start of every such reason, which callers test for.
NO_REPLY = "no reply before the timeout"


def expired_reason(timeout: float) -> str:
    return f"{NO_REPLY} ({timeout:g} s, sim.reply_timeout_s)"


def _say_expired(reply: Message, timeout: float | None) -> None:
    if timeout is not None and reply.has_error() and reply.error.reason in _EXPIRED_REASONS:
        reply.error = Error(code=reply.error.code, reason=expired_reason(timeout))


# A deployment's grid (Flower's HttpGrid) has no `pull_interval`: its own send_and_receive
# sleeps 3 s between looks for replies (flwr 1.41), and `exchange_as_replied` keeps that.
DEPLOYED_PULL_PAUSE_S = 3.0


def exchange_as_replied(grid: Grid, messages: list[Message], timeout: float | None
                        ) -> Iterator[list[Message]]:
    """Push `messages`, then yield their replies as they arrive: one batch per look, each
    reply attributed to the node it was sent to. Ends when every message has its reply, or
    at the timeout (None: no limit).

    The same pushes, pulls and pauses as Flower's `grid.send_and_receive` (which returns
    only once the last reply is in), so the caller can work on the replies it has while
    the others are out: the server checks and sums the updates that have come in, and
    removes the masks it has rebuilt, instead of idling until the slowest client answers.

    In a deployment the SuperLink itself answers for a node that stopped heartbeating:
    an error reply whose source is the SuperLink (node 1), not the node. Matching the
    reply to its request keeps that failure on the node it belongs to. The link state's
    answer for a request that expired unanswered says so (:func:`expired_reason`).
    """
    messages = list(messages)
    if timeout is not None:
        # Each request lives only as long as this exchange waits for it (Flower's default is
        # 12 h): the SuperLink drops one not yet delivered when the exchange gives up, so a
        # node that comes back later does not act on it. A partner would otherwise train for
        # a round that is over and spend privacy budget on an update nobody reads.
        now = time.time()
        for m in messages:
            m.metadata.ttl = min(m.metadata.ttl, now - m.metadata.created_at + timeout)
    # Flower sets each message's id as it pushes it; None stands for one it could not push
    # (which then has no reply, as a node that never answered).
    waiting = {i for i in grid.push_messages(messages) if i is not None}
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    del messages
    pause = getattr(grid, "pull_interval", None)
    pause = pause if isinstance(pause, (int, float)) else DEPLOYED_PULL_PAUSE_S
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    while waiting:
        replies = list(grid.pull_messages(waiting))
        for reply in replies:
            waiting.discard(reply.metadata.reply_to_message_id)
            node = sent.get(reply.metadata.reply_to_message_id)
            if node is not None and reply.metadata.src_node_id != node:
                reply.metadata.__dict__["_src_node_id"] = node
            _say_expired(reply, timeout)
        if replies:
            yield replies
        if not waiting or time.monotonic() >= deadline:
            return
        time.sleep(pause)


def exchange(grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
    """Every reply `exchange_as_replied` gets, once the exchange is over."""
    return [reply for batch in exchange_as_replied(grid, messages, timeout) for reply in batch]


def natural_key(client_id: str) -> tuple:
    return (0, int(client_id), "") if client_id.isdigit() else (1, 0, client_id)


class NodeDirectory:
    def __init__(self, timeout: float):
        self.timeout = timeout
        self.client_of: dict[int, str] = {}

    def identify(self, grid: Grid, node_ids: Iterable[int]) -> None:
        new = [n for n in node_ids if n not in self.client_of]
        if not new:
            return
        enrolled = {info.node_id: info.name for info in grid.get_nodes() if info.name}
        deadline = time.monotonic() + self.timeout  # one timeout for all the batches
        for start in range(0, len(new), IDENTIFY_BATCH):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("%d nodes not identified before the timeout; asked again next "
                            "round", len(new) - start)
                return
            self._identify(grid, new[start:start + IDENTIFY_BATCH], enrolled, left)

    def _identify(self, grid: Grid, nodes: list[int], enrolled: dict[int, str],
                  timeout: float) -> None:
        requests = [Message(RecordDict({"identify": ConfigRecord()}), dst_node_id=n,
                            message_type=IDENTIFY) for n in nodes]
        for reply in exchange(grid, requests, timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s did not say which client it is: %s", node,
                            reply.error.reason)
                continue
            try:
                said = str(reply.content["identity"]["client_id"])
            except (KeyError, TypeError) as err:
                log.warning("node %s sent a malformed identity: %r", node, err)
                continue
            if node in enrolled and said != enrolled[node]:
                log.warning("node %s calls itself %r (its site.name), but its key was enrolled "
                            "as %r; recorded under the enrolled name", node, said, enrolled[node])
            self.client_of[node] = said
        # An enrolled name holds whatever the node said, or if it said nothing.
        self.client_of.update((n, enrolled[n]) for n in nodes if n in enrolled)

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
