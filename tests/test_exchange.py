"""The server's exchanges: replies handed over as they arrive, each on its own node."""

from __future__ import annotations

import time
import uuid

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from consortia.server import directory
from consortia.server.directory import exchange, exchange_as_replied

pytestmark = pytest.mark.usefixtures("task_identity")

SUPERLINK = 1


class ScriptedGrid:
    """Flower's grid contract (push_messages sets each message's id and returns the ids;
    pull_messages returns the replies in for the ids asked, once each), with each node's
    reply arriving at a scripted pull: `script[node] = (pull number, from_superlink)`.
    Nodes not in the script never answer; nodes in `unpushable` are not pushed (None)."""

    def __init__(self, script, unpushable=(), pull_interval: float | None = 0.0):
        self.script, self.unpushable = script, set(unpushable)
        if pull_interval is not None:
            self.pull_interval = pull_interval
        self.pulls, self.asked = 0, []
        self.out: dict[str, Message] = {}

    def push_messages(self, messages):
        ids = []
        for m in messages:
            if m.metadata.dst_node_id in self.unpushable:
                ids.append(None)
                continue
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.out[m.metadata.message_id] = m
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        self.asked.append(set(message_ids))
        replies = []
        for i in list(message_ids):
            m = self.out[i]
            when, from_superlink = self.script.get(m.metadata.dst_node_id, (None, False))
            if when is None or when > self.pulls:
                continue
            del self.out[i]
            if from_superlink:  # as a SuperLink answers for a node that stopped heartbeating
                reply = Message(Error(code=0, reason="node offline"), reply_to=m)
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK
            else:
                reply = Message(RecordDict({"r": ConfigRecord({"node": m.metadata.dst_node_id})}),
                                reply_to=m)
            replies.append(reply)
        return replies


def requests(nodes):
    return [Message(RecordDict({"q": ConfigRecord()}), dst_node_id=n, message_type="query")
            for n in nodes]


def test_replies_come_batch_by_batch_as_they_arrive_each_on_its_node():
    grid = ScriptedGrid({10: (1, False), 11: (3, False), 12: (3, True), 13: (5, False)})
    batches = list(exchange_as_replied(grid, requests([10, 11, 12, 13]), timeout=10))
    assert [sorted(r.metadata.src_node_id for r in b) for b in batches] == [[10], [11, 12], [13]]
    assert grid.pulls == 5  # it stopped at the last reply
    # Each pull asks only for the replies still out.
    assert [len(a) for a in grid.asked] == [4, 3, 3, 1, 1]
    offline = next(r for b in batches for r in b if r.has_error())
    assert offline.metadata.src_node_id == 12  # the SuperLink's answer, on the node it is for


def test_exchange_returns_every_reply_once_the_exchange_is_over():
    grid = ScriptedGrid({20: (2, False), 21: (1, False)})
    replies = exchange(grid, requests([20, 21]), timeout=10)
    assert sorted(r.content["r"]["node"] for r in replies) == [20, 21]


def test_a_node_that_never_answers_ends_the_exchange_at_the_timeout():
    grid = ScriptedGrid({30: (1, False)}, pull_interval=0.01)
    started = time.monotonic()
    batches = list(exchange_as_replied(grid, requests([30, 31]), timeout=0.3))
    elapsed = time.monotonic() - started
    assert [[r.metadata.src_node_id for r in b] for b in batches] == [[30]]
    assert 0.3 <= elapsed < 2.0


def test_a_message_that_could_not_be_pushed_is_not_waited_for():
    grid = ScriptedGrid({40: (1, False)}, unpushable={41})
    started = time.monotonic()
    batches = list(exchange_as_replied(grid, requests([40, 41]), timeout=60))
    assert time.monotonic() - started < 5 and len(batches) == 1
    assert grid.asked == [{next(iter(grid.asked[0]))}]  # only the pushed one was asked for


@pytest.mark.parametrize(("interval", "expected"),
                         [(0.02, 0.02), (None, directory.DEPLOYED_PULL_PAUSE_S)])
def test_it_pauses_between_looks_as_the_grid_would(monkeypatch, interval, expected):
    """A simulation grid's own pull_interval; a deployment's grid, Flower's 3 s."""
    pauses = []
    monkeypatch.setattr(directory.time, "sleep", pauses.append)
    grid = ScriptedGrid({50: (3, False)}, pull_interval=interval)
    assert len(list(exchange_as_replied(grid, requests([50]), timeout=None))) == 1
    assert pauses == [expected, expected]


def test_a_request_lives_only_as_long_as_its_exchange_waits():
    """Flower keeps an undelivered request 12 h by default: a node back after its round
    gave up would still get it (and a partner train, and spend, for nothing)."""
    old = requests([60])[0]
    old.metadata.__dict__["_created_at"] -= 5.0  # made 5 s before the exchange began
    fresh = requests([61])[0]
    grid = ScriptedGrid({60: (1, False), 61: (1, False)})
    list(exchange_as_replied(grid, [old, fresh], timeout=30))
    # Expiry is created_at + ttl: 30 s after the push for both.
    assert old.metadata.ttl == pytest.approx(35.0, abs=1.0)
    assert fresh.metadata.ttl == pytest.approx(30.0, abs=1.0)
    unlimited = requests([62])[0]
    list(exchange_as_replied(ScriptedGrid({62: (1, False)}), [unlimited], timeout=None))
    assert unlimited.metadata.ttl == 43200  # no timeout: Flower's own


class ExpiringGrid(ScriptedGrid):
    """Node 70's request expires unanswered: the link state answers for it with Flower's
    own error message (what InMemoryGrid and the SuperLink return once a request's time to
    live has run out); node 71's reply is a client's error."""

    def pull_messages(self, message_ids):
        from flwr.server.superlink.linkstate.utils import (
            create_message_error_unavailable_ins_message,
        )

        replies = []
        for i in list(message_ids):
            m = self.out.pop(i)
            if m.metadata.dst_node_id == 70:
                replies.append(create_message_error_unavailable_ins_message(i, m.metadata.run_id))
            else:
                replies.append(Message(Error(code=0, reason="ValueError: bad batch"), reply_to=m))
        return replies


def test_a_request_that_expired_unanswered_is_called_a_missed_timeout_not_a_client_error(caplog):
    """Flower's answer for an expired request is a paragraph on TTLs, SuperNodes removed
    from the federation and messages that never existed; the round's records said
    'client error: Error: Message Unavailable - ...' for a client that was only slow."""
    from consortia.server.validation import report_outcome

    replies = {r.metadata.src_node_id: r for r in exchange(ExpiringGrid({}), requests([70, 71]),
                                                           timeout=4)}
    assert replies[70].error.reason == "no reply before the timeout (4 s, sim.reply_timeout_s)"
    assert replies[71].error.reason == "ValueError: bad batch"  # a client's own error: as sent
    expired, failed = report_outcome(replies[70]), report_outcome(replies[71])
    assert (expired.status, expired.reason) == (
        "failed", "no reply before the timeout (4 s, sim.reply_timeout_s)")
    assert failed.reason == "client error: ValueError: bad batch"
    assert "Message Unavailable" not in caplog.text


class IdentifyingGrid(ScriptedGrid):
    """Every node answers identify with the name in its own site config (`says`); the
    SuperLink knows the nodes registered from enrolled keys by their enrolled name."""

    def __init__(self, says: dict[int, str], enrolled: dict[int, str]):
        super().__init__({node: (1, False) for node in says})
        self.says, self.enrolled = says, enrolled

    def get_nodes(self):
        from flwr.proto.node_pb2 import NodeInfo

        return [NodeInfo(node_id=n, name=self.enrolled.get(n, "")) for n in self.says]

    def pull_messages(self, message_ids):
        asked = {i: self.out[i] for i in message_ids}
        return [Message(RecordDict({"identity": ConfigRecord(
                    {"client_id": self.says[r.metadata.src_node_id]})}),
                        reply_to=asked[r.metadata.reply_to_message_id])
                for r in super().pull_messages(message_ids)]


def test_a_deployed_node_is_its_enrolled_name_not_the_name_it_reports(caplog):
    grid = IdentifyingGrid(says={70: "hospital-x", 71: "site-c"},
                           enrolled={70: "site-b", 71: "site-c"})
    nodes = directory.NodeDirectory(timeout=10)
    nodes.identify(grid, [70, 71])
    assert nodes.client_of == {70: "site-b", 71: "site-c"}
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "'hospital-x'" in warning and "'site-b'" in warning


def test_a_simulated_node_with_no_enrolled_name_is_the_id_it_reports():
    nodes = directory.NodeDirectory(timeout=10)
    nodes.identify(IdentifyingGrid(says={80: "3"}, enrolled={}), [80])
    assert nodes.client_of == {80: "3"}


def test_a_reply_is_recorded_under_the_directory_name_whatever_its_report_says():
    from consortia.messages import TrainReport
    from consortia.server.validation import ReplyOutcome

    report = TrainReport(client_id="hospital-x", status="trained", num_examples=5)
    assert ReplyOutcome(70, "trained", report=report, known_as="site-b").client_id == "site-b"
    assert ReplyOutcome(70, "trained", report=report).client_id == "hospital-x"
