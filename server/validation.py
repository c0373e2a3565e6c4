"""Inspect each train reply before the strategy sees it.

A reply that is an error, is refused, or carries a malformed update (unknown or missing
tensors, wrong shapes or dtypes, NaN or infinity, a bad example count) is kept out of
the aggregate with a logged reason; the round goes on with the rest.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from consortia.messages import (
    ARRAYS,
    METRICS,
    NUM_EXAMPLES,
    MessageSchemaError,
    TrainReport,
    decode_array,
    record_of,
)
from consortia.server.directory import NO_REPLY

log = logging.getLogger("consortia.server")

OUTCOMES = ("trained", "refused-budget", "refused-policy", "rejected", "failed")


@dataclass(frozen=True)
class ReplyOutcome:
    node_id: int
    status: str  # one of OUTCOMES
    reason: str = ""
    report: TrainReport | None = None
    message: Message | None = None  # kept only for replies that go into the aggregate
    # The client's id from the node directory (server/directory.py): in a deployment the
    # name the node's key was enrolled under, which the report's own client_id cannot change.
    known_as: str = ""

    @property
    def client_id(self) -> str:
        if self.known_as:
            return self.known_as
        return self.report.client_id if self.report is not None else f"node-{self.node_id}"


def update_problem(arrays: ArrayRecord | None, reference: ArrayRecord) -> str | None:
    """Why an update cannot be aggregated with `reference`'s layout, or None if it can."""
    if arrays is None:
        return "no ArrayRecord 'arrays' in a reply that says it trained"
    if set(arrays.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))
        unknown = sorted(set(arrays.keys()) - set(reference.keys()))
        return f"tensor names differ from the global model (missing {missing}, unknown {unknown})"
    for name, ref in reference.items():
        try:
            value = decode_array(arrays[name], copy=False)  # only read
        except Exception as err:  # a corrupt buffer must not end the round
            return f"tensor {name!r} cannot be decoded: {err}"
        if tuple(value.shape) != tuple(ref.shape):
            return f"tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if str(value.dtype) != ref.dtype:  # Array keeps dtype and shape: no decoding
            return f"tensor {name!r} has dtype {value.dtype}, expected {ref.dtype}"
        if not np.isfinite(value).all():
            return f"tensor {name!r} holds NaN or infinite values"
    return None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# "ConnectionError: injected dropout …", "flwr.clientapp.client_app.ClientAppException: …"
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning): \S")
REASON_MAX_CHARS = 500


def client_error_reason(reason: str) -> str:
    """A failed client's error as one line for participation.jsonl, the store and the
    console: Flower's simulation hands over Ray's whole chained traceback (dozens of
    lines, colour codes included); what matters is the exception the client raised, the
    first exception line in the chain. Colour codes are dropped; at most
    REASON_MAX_CHARS characters are kept. The whole text goes to the server's log."""
    text = _ANSI.sub("", reason).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        raised = [line for line in lines if _EXCEPTION_LINE.match(line)]
        text = raised[0] if raised else lines[-1]
    return text if len(text) <= REASON_MAX_CHARS else text[: REASON_MAX_CHARS - 1] + "…"


def report_outcome(reply: Message) -> ReplyOutcome:
    """What a train reply says about itself: failed, malformed, refused, or trained (whose
    update the caller still has to check: in the clear or masked)."""
    node_id = reply.metadata.src_node_id
    if reply.has_error():
        reason = reply.error.reason
        if reason.startswith(NO_REPLY):  # the exchange's own words (directory.expired_reason)
            outcome = ReplyOutcome(node_id, "failed", reason)
            log.warning("round reply from node %s failed: %s", node_id, reason)
            return outcome
        outcome = ReplyOutcome(node_id, "failed", f"client error: {client_error_reason(reason)}")
        log.warning("round reply from node %s failed: %s", node_id, outcome.reason)
        if outcome.reason != f"client error: {reason}":
            log.debug("node %s's whole error: %s", node_id, reason)
        return outcome
    try:
        report = TrainReport.from_content(reply.content)
    except MessageSchemaError as err:
        outcome = ReplyOutcome(node_id, "rejected", f"malformed report: {err}")
        log.warning("rejected reply from node %s: %s", node_id, outcome.reason)
        return outcome
    return ReplyOutcome(node_id, report.status, report.reason, report)


def inspect_train_reply(reply: Message, reference: ArrayRecord) -> ReplyOutcome:
    outcome = report_outcome(reply)
    if outcome.status != "trained":
        return outcome
    node_id, report = outcome.node_id, outcome.report

    content = reply.content
    problem = update_problem(record_of(content, ARRAYS, ArrayRecord), reference)
    metrics = record_of(content, METRICS, MetricRecord)
    kinds = [type(record) for record in content.values()]
    if problem is None and (metrics is None or kinds.count(ArrayRecord) != 1
                            or kinds.count(MetricRecord) != 1):
        problem = "a trained reply needs exactly one ArrayRecord and one MetricRecord"
    if problem is None:
        count = metrics.get(NUM_EXAMPLES)
        if not isinstance(count, int) or count <= 0 or count != report.num_examples:
            problem = f"bad {NUM_EXAMPLES} {count!r}: a positive int equal to the report's"
    if problem is not None:
        log.warning("rejected update from client %s (node %s): %s",
                    report.client_id, node_id, problem)
        return ReplyOutcome(node_id, "rejected", problem, report)
    return ReplyOutcome(node_id, "trained", "", report, reply)
