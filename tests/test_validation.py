import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from consortia.messages import TrainReport
from consortia.server.validation import inspect_train_reply

pytestmark = pytest.mark.usefixtures("task_identity")

REFERENCE = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)),
                         "b": Array(np.zeros(3, np.float32))})


def reply(arrays=None, report=None, metrics=None, extra=None):
    request = Message(content=RecordDict({"arrays": REFERENCE}), dst_node_id=5,
                      message_type="train")
    report = report or TrainReport(client_id="3", status="trained", num_examples=10)
    content = report.to_content(arrays)
    if metrics is not None:
        content["metrics"] = metrics
    for key, record in (extra or {}).items():
        content[key] = record
    return Message(content=content, reply_to=request)


def arrays(**override):
    values = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    values.update(override)
    return ArrayRecord({k: Array(v) for k, v in values.items()})


def test_a_well_formed_update_is_accepted():
    outcome = inspect_train_reply(reply(arrays()), REFERENCE)
    assert outcome.status == "trained" and outcome.client_id == "3" and outcome.message


@pytest.mark.parametrize("bad, reason", [
    (dict(w=np.ones((3, 2), np.float32)), "has shape (3, 2), expected (2, 3)"),
    (dict(b=np.array([1, np.nan, 1], np.float32)), "NaN or infinite"),
    (dict(b=np.array([1, np.inf, 1], np.float32)), "NaN or infinite"),
    (dict(b=np.ones(3, np.float64)), "dtype float64, expected float32"),
    (dict(extra=np.ones(1, np.float32)), "unknown ['extra']"),
])
def test_malformed_updates_are_rejected_with_the_reason(bad, reason, caplog):
    outcome = inspect_train_reply(reply(arrays(**bad)), REFERENCE)
    assert outcome.status == "rejected" and reason in outcome.reason
    assert outcome.message is None
    assert reason in caplog.text  # logged for the operator


def test_missing_tensor_missing_arrays_and_bad_counts_are_rejected(caplog):
    only_w = ArrayRecord({"w": Array(np.ones((2, 3), np.float32))})
    assert "missing ['b']" in inspect_train_reply(reply(only_w), REFERENCE).reason
    no_arrays = reply(None)
    assert inspect_train_reply(no_arrays, REFERENCE).status == "rejected"
    lying = reply(arrays(), metrics=MetricRecord({"num-examples": 999}))
    assert "num-examples" in inspect_train_reply(lying, REFERENCE).reason
    negative = reply(arrays(), metrics=MetricRecord({"num-examples": -1}))
    assert inspect_train_reply(negative, REFERENCE).status == "rejected"
    two_arrays = reply(arrays(), extra={"more": arrays()})
    assert "exactly one ArrayRecord" in inspect_train_reply(two_arrays, REFERENCE).reason


def test_a_report_that_does_not_parse_is_rejected():
    request = Message(content=RecordDict(), dst_node_id=5, message_type="train")
    bad = Message(content=RecordDict({"report": ConfigRecord({"status": "bogus"})}),
                  reply_to=request)
    outcome = inspect_train_reply(bad, REFERENCE)
    assert outcome.status == "rejected" and "malformed report" in outcome.reason


def test_refusals_pass_through_with_their_reason():
    refusal = TrainReport(client_id="4", status="refused-budget", reason="over budget")
    outcome = inspect_train_reply(reply(None, report=refusal), REFERENCE)
    assert outcome.status == "refused-budget" and outcome.reason == "over budget"


# What Flower's Ray simulation hands over when a ClientApp raises (participation.jsonl of
# `sim run digits-dp-smoke.toml --set rounds=2 --set faults.dropout=0.5`, shortened).
RAY_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor"
    ".run()\x1b[39m (pid=11828, ip=192.0.2.2, actor_id=66)\n"
    "  File \"/x/flwr/clientapp/client_app.py\", line 161, in __call__\n"
    "    return self._registered_funcs[full_name](message, context)\n"
    "  File \"/x/simulations/faults.py\", line 146, in __call__\n"
    "    raise ConnectionError(f\"injected dropout of client {client} in round {server_round}\")\n"
    "ConnectionError: injected dropout of client 0 in round 1\n\n"
    "The above exception was the direct cause of the following exception:\n\n"
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=11828, ip=192.0.2.2)\n"
    "flwr.clientapp.client_app.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: injected dropout of client 0 in round 1'>"
)


def failed_reply(reason):
    from flwr.app import Error
    request = Message(content=RecordDict({"arrays": REFERENCE}), dst_node_id=5,
                      message_type="train")
    return Message(Error(code=0, reason=reason), reply_to=request)


def test_a_failed_client_is_recorded_by_the_exception_it_raised_not_rays_traceback():
    outcome = inspect_train_reply(failed_reply(RAY_REASON), REFERENCE)
    assert outcome.status == "failed"
    assert outcome.reason == ("client error: ConnectionError: injected dropout of client 0 "
                              "in round 1")


def test_a_one_line_client_error_is_kept_and_a_long_one_cut():
    short = "<class 'ValueError'>:<'bad batch'>"
    assert inspect_train_reply(failed_reply(short), REFERENCE).reason == f"client error: {short}"
    reason = inspect_train_reply(failed_reply("x" * 5000), REFERENCE).reason
    assert reason.startswith("client error: xxx") and len(reason) <= 520 and "\n" not in reason
    no_exception_line = "\x1b[31mcrashed\nsegfault in worker\x1b[0m"
    assert (inspect_train_reply(failed_reply(no_exception_line), REFERENCE).reason
            == "client error: segfault in worker")
