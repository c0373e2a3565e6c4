"""The client's task loop survives a SuperNode that forgot its task (it was restarted).

After the server crashes, each partner's SuperNode is refused by the new SuperLink, ends,
and `consortia client join` starts it again; a task that was running meanwhile holds a
token the new SuperNode does not know, and every call with it gets 401. Flower's own
retry invoker and task heartbeat answer that with SIGINT to their process, which here
is the partner's whole client. A fake SuperNode Runtime API (protobuf over HTTP, as
Flower's) plays the restarted SuperNode.
"""

from __future__ import annotations

import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from flwr.proto.runtime_pb2 import AcquireTaskResponse, SendTaskHeartbeatResponse
from flwr.proto.task_pb2 import Task

from consortia.flower_exec import free_port, runtime_client

STALE = "token-of-a-task-the-supernode-forgot"


class FakeSuperNode:
    """Hands out `tasks` tasks with a token it then refuses (401), as a SuperNode started
    again does; `busy` first answers to any call are 503."""

    def __init__(self, tasks: int = 0, busy: int = 0):
        self.tasks, self.busy = tasks, busy
        self.calls: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("content-length", 0)))
                fake.calls.append(self.path)
                status, body = fake.answer(self.path)
                self.send_response(status)
                self.send_header("content-type", "application/protobuf")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # a port of its own
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str) -> tuple[int, bytes]:
        if self.busy:
            self.busy -= 1
            return 503, b""
        if path.endswith("/acquire-task"):
            if self.tasks:
                self.tasks -= 1
                return 200, AcquireTaskResponse(task=Task(task_id=7, run_id=1),
                                                token=STALE).SerializeToString()
            return 200, AcquireTaskResponse().SerializeToString()
        return 401, b'{"detail": "Authentication failed."}'

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sigint():
    """Record SIGINT instead of raising KeyboardInterrupt: Flower's invoker sends it."""
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(time.monotonic()))
    yield received
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def supernode():
    made = []

    def make(**kw) -> FakeSuperNode:
        made.append(FakeSuperNode(**kw))
        return made[-1]

    yield make
    for node in made:
        node.close()


def never_called(**_):
    raise AssertionError("the ClientApp ran a task whose input could not be pulled")


def test_a_task_the_supernode_forgot_fails_and_signals_nothing(supernode, sigint):
    from flwr.common.constant import SubStatus

    from consortia.client.runtime import run_task

    node = supernode()
    assert run_task(node.address, STALE, never_called) == SubStatus.FAILED
    assert sigint == []
    # it pulled the input, was refused, and still told the SuperNode the task failed
    assert (node.calls.index("/v1/runtime/pull-task-input")
            < node.calls.index("/v1/runtime/push-task-output"))


def test_the_client_loop_goes_on_after_a_task_the_supernode_forgot(supernode, sigint):
    from consortia.client.runtime import serve_client_app

    node = supernode(tasks=1)
    stop = threading.Event()
    loop = threading.Thread(target=serve_client_app,
                            args=(node.address, never_called, stop, 0.05))
    loop.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            # asking for new tasks after the forgotten one failed: the loop went on
            after = node.calls[node.calls.index("/v1/runtime/push-task-output") + 1:] \
                if "/v1/runtime/push-task-output" in node.calls else []
            if after.count("/v1/runtime/acquire-task") >= 2:
                break
            time.sleep(0.05)
        assert after.count("/v1/runtime/acquire-task") >= 2, node.calls
    finally:
        stop.set()
        loop.join(timeout=10)
    assert not loop.is_alive()
    assert sigint == []


def test_runtime_calls_retry_a_busy_supernode_then_succeed(supernode):
    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    node = supernode(busy=2)
    client = runtime_client(node.address, [])
    try:
        res = client.AcquireTask(AcquireTaskRequest())
    finally:
        client.close()
    assert not res.HasField("task")
    assert node.calls == ["/v1/runtime/acquire-task"] * 3  # two 503s, then the answer


def test_runtime_calls_to_an_absent_supernode_give_up_after_max_time():
    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    client = runtime_client(f"127.0.0.1:{free_port()}", [], max_time=1.0)
    started = time.monotonic()
    try:
        with pytest.raises(httpx.TransportError):
            client.AcquireTask(AcquireTaskRequest())
    finally:
        client.close()
    assert time.monotonic() - started < 20  # bounded (backoff waits up to 5 s past max_time)


class StubClient:
    def __init__(self, outcome):
        self.outcome = outcome

    def SendTaskHeartbeat(self, _req):  # noqa: N802 - Flower's name
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return SendTaskHeartbeatResponse(success=self.outcome)


def status_error(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1/v1/runtime/send-task-heartbeat")
    return httpx.HTTPStatusError("refused", request=request,
                                 response=httpx.Response(code, request=request))


@pytest.mark.parametrize(("outcome", "returns", "gone"), [
    (True, True, False),                                  # the task is alive
    (False, True, True),                                  # the SuperNode says it is not
    (status_error(401), True, True),                      # a SuperNode that never knew it
    (status_error(503), False, False),                    # busy: HeartbeatSender retries
    (httpx.ConnectError("refused"), False, False),        # away: HeartbeatSender retries
])
def test_the_task_heartbeat_marks_a_forgotten_task_and_signals_nothing(outcome, returns, gone,
                                                                       sigint):
    from consortia.client.runtime import task_heartbeat

    flag = threading.Event()
    assert task_heartbeat(StubClient(outcome), flag)() is returns
    assert flag.is_set() is gone
    assert sigint == []


# What flower-supernode logs when the SuperLink refuses it (ANSI colours as it writes them).
REFUSED_LOG = """\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode
INFO:     Uvicorn running on http://127.0.0.1:42105 (Press CTRL+C to quit)
\x1b[91mERROR \x1b[0m:     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[code: 2004] Failed to activate SuperNode.
The SuperNode could not establish a connection to the SuperLink.
"""


# What it logs when the server's certificate does not verify against site.ca_cert.
UNTRUSTED_LOG = """\x1b[91mERROR \x1b[0m:     SSL/TLS handshake error detected.
\x1b[91mERROR \x1b[0m:     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer \
certificate (_ssl.c:1006)
The SuperNode could not establish a connection to the SuperLink.
For more information, visit: <https://flower.ai/docs/framework/1.41/en/ref-exit-codes/305.html>
"""


@pytest.mark.parametrize(("log", "reason"), [
    (REFUSED_LOG, "[code: 2004] Failed to activate SuperNode."),
    (UNTRUSTED_LOG, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get "
                    "local issuer certificate (_ssl.c:1006)"),
    ("\x1b[91mERROR \x1b[0m:     SSL handshake failed: CERTIFICATE_VERIFY_FAILED\n",
     "SSL handshake failed: CERTIFICATE_VERIFY_FAILED"),
    ("\x1b[92mINFO \x1b[0m:      SuperNode ID: 7\n", ""),  # killed: it said nothing
])
def test_the_partner_is_told_why_the_supernode_ended(log, reason):
    from consortia.client.join import exit_reason

    assert exit_reason(log) == reason


def site_config(tmp_path):
    from consortia.client.site_config import site_config_from_dict

    return site_config_from_dict({
        "site": {"name": "site-a", "superlink": "fl.example.org:9093", "ca_cert": "keys/ca.pem",
                 "node_key": "keys/node.key", "state_dir": "state", "task": "digits-mlp"},
        "data": {"kind": "partition", "index": 0, "count": 2},
        "policy": {"tasks": ["digits-mlp"], "epsilon_budget": 3.0, "delta": 1e-5}},
        tmp_path, "site.toml")


def test_the_partner_is_told_what_to_do_about_a_refusal_or_an_untrusted_server(tmp_path):
    from consortia.client.join import exit_reason, what_to_do

    cfg = site_config(tmp_path)
    refused = what_to_do(exit_reason(REFUSED_LOG), cfg)
    assert "refused this node's key" in refused and "consortia certs enroll" in refused
    assert str(tmp_path / "keys" / "node.pub") in refused  # the file to send
    untrusted = what_to_do(exit_reason(UNTRUSTED_LOG), cfg)
    assert f"site.ca_cert ({tmp_path / 'keys' / 'ca.pem'})" in untrusted
    assert "fl.example.org:9093" in untrusted
    assert what_to_do("", cfg) == ""  # killed: nothing to advise


@pytest.mark.parametrize(("tries_s", "notes"), [
    (2.0, ["unreachable", "connected"]),  # the server came up late: told, then told again
    (0.0, []),  # connected at once: nothing said
])
def test_the_partner_is_told_while_the_server_does_not_answer(tmp_path, monkeypatch, tries_s,
                                                             notes):
    import os
    import sys

    from consortia.client import join

    monkeypatch.setattr(join, "UNREACHABLE_NOTE_S", 0.5)
    # A stand-in for flower-supernode: it fails to connect for `tries_s`, then connects.
    script = (f"import time; print('WARNING : {join.UNREACHABLE}, retrying', flush=True); "
              f"time.sleep({tries_s}); print('INFO : {join.CONNECTED} after 2 tries', "
              "flush=True); time.sleep(60)")
    node = object.__new__(join.SuperNodeProcess)
    node.log_path, node.env, node.process = tmp_path / "supernode.log", dict(os.environ), None
    node.argv = [sys.executable, "-c", script]
    stop, heard = threading.Event(), []
    supervisor = threading.Thread(target=node.supervise,
                                  args=(stop, lambda code, why: heard.append(code), heard.append))
    supervisor.start()
    try:
        deadline = time.monotonic() + tries_s + 3.0
        while time.monotonic() < deadline and len(heard) < len(notes) + 1:
            time.sleep(0.1)
    finally:
        stop.set()
        supervisor.join(timeout=10)
        node.stop()
    assert heard == notes


def test_join_gives_sigterm_back_to_the_callers_handler_when_it_returns(tmp_path, monkeypatch):
    import signal as signals

    from consortia.client import join as joining

    cfg = site_config(tmp_path)
    from consortia.privacy.certs import generate_node_key, init_consortium

    init_consortium(tmp_path / "keys", ["127.0.0.1"])  # ca.pem
    generate_node_key(tmp_path / "keys")  # node.key

    class NoSuperNode:  # the SuperNode and the task loop are not what this test is about
        log_path = tmp_path / "supernode.log"

        def __init__(self, *args):
            pass

        def supervise(self, stop, on_restart, on_note):
            stop.wait()

        def stop(self):
            pass

    monkeypatch.setattr(joining, "SuperNodeProcess", NoSuperNode)
    monkeypatch.setattr(joining, "serve_client_app", lambda *args, **kwargs: None)
    mine = []
    before = signals.signal(signals.SIGTERM, lambda *_: mine.append("caller"))
    try:
        joining.join(cfg, log_fn=lambda line: None)
        signals.raise_signal(signals.SIGTERM)  # the caller's own handler answers again
        assert mine == ["caller"]
    finally:
        signals.signal(signals.SIGTERM, before)


def test_join_refuses_a_stream_code_this_machine_cannot_draw_before_it_starts(tmp_path,
                                                                            monkeypatch):
    from consortia.client import join as joining
    from consortia.privacy.certs import generate_node_key, init_consortium

    cfg = site_config(tmp_path)
    init_consortium(tmp_path / "keys", ["127.0.0.1"])
    generate_node_key(tmp_path / "keys")
    monkeypatch.setenv("CONSORTIA_SECAGG_STREAM_CODE", "aes-ni")
    monkeypatch.setattr(joining, "build_site", lambda *a: pytest.fail("went on past the check"))
    with pytest.raises(joining.JoinError, match=r"CONSORTIA_SECAGG_STREAM_CODE: stream code "
                       r"'aes-ni' is not one of \['ctr', 'gcm'.*unset it to choose the fastest"):
        joining.join(cfg, log_fn=lambda line: None)


def test_a_stopped_client_loop_does_not_retry_a_supernode_that_went_away(supernode):
    """`client join` stopped (SIGTERM) while its SuperNode does not answer (it stops with
    the client, or cannot reach the server yet): the loop's call in flight gives up at
    once instead of retrying for RUNTIME_RETRY_S (30 s) before the client can end."""
    from consortia.client.runtime import serve_client_app

    node = supernode(busy=10**6)  # a SuperNode that never answers but 503
    stop = threading.Event()
    loop = threading.Thread(target=serve_client_app, args=(node.address, never_called, stop))
    loop.start()
    try:
        deadline = time.monotonic() + 30
        while len(node.calls) < 2 and time.monotonic() < deadline:  # retrying inside a call
            time.sleep(0.05)
        stop.set()
        asked = len(node.calls)
    finally:
        stop.set()
        loop.join(timeout=60)
    assert not loop.is_alive()
    assert len(node.calls) - asked <= 1, node.calls  # the old invoker asked again for 30 s


def test_a_runtime_call_gives_up_once_stop_is_set(supernode):
    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    node = supernode(busy=10**6)
    stop = threading.Event()
    stop.set()
    client = runtime_client(node.address, [], stop=stop)
    try:
        with pytest.raises(httpx.HTTPStatusError):
            client.AcquireTask(AcquireTaskRequest())
    finally:
        client.close()
    assert node.calls == ["/v1/runtime/acquire-task"]  # asked once, not retried
