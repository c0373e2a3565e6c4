"""Run the installed consortia ClientApp for a SuperNode, never code the server sends.

Flower's deployment engine lets the server push an app bundle (FAB: a pyproject.toml and
Python files) to every SuperNode; in its default `subprocess` isolation the SuperNode's
SuperExec starts `flwr-clientapp`, which installs that bundle and imports the ClientApp
it names — code chosen by the server runs on the partner's machine. Flower's own guard
is signature checking (`--trusted-entities`): it verifies who signed a bundle, and still
runs it.

`consortia client join` starts the SuperNode with `--isolation process` instead, so the
SuperNode runs nothing itself, and this loop takes its place: it acquires each task from
the SuperNode's Runtime API (bound to 127.0.0.1), pulls the message and context, and
hands them to the ClientApp object built from the installed package. The bundle that
travels with the task is never written to disk, installed or imported; its hash is logged
and written to the audit log of the site, so a partner can see which bundle the server
named. Tasks run one at a time, in this process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from flwr.app import Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp

from consortia.flower_exec import RETRYABLE_HTTP, runtime_client

log = logging.getLogger("consortia.client")


def _runtime_client(address: str, token: str | None, stop: threading.Event | None = None):
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor

    component = "SuperExec" if token is None else "flwr-clientapp"
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    # fails by exception, never by signal; gives up at once once `stop` is set
    return runtime_client(address, interceptors, stop=stop)


def task_heartbeat(client, gone: threading.Event) -> Callable[[], bool]:
    """The task's heartbeat, for Flower's HeartbeatSender.

    Flower's own (`make_task_heartbeat_fn_http`) raises SIGINT in its process when the
    SuperNode says the task is no longer valid: right for flwr-clientapp, whose process
    is the task, wrong here, where it would end `consortia client join`. This one sets
    `gone` instead; the task runs to its end and its reply is refused.
    """
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:
        if gone.is_set():
            return True
        try:
            valid = client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success
        except httpx.TransportError:
            return False  # the SuperNode is away: HeartbeatSender tries again
        except httpx.HTTPStatusError as err:
            if err.response.status_code in RETRYABLE_HTTP:
                return False
            valid = False  # 401: the SuperNode (started again) does not know this task
        if not valid:
            log.warning("the SuperNode no longer knows this task (it was restarted or the "
                        "run was stopped); its reply will not be delivered")
            gone.set()
        return True

    return beat


def run_task(address: str, token: str, client_app: ClientApp,
             on_bundle: Callable[[str, str], None] | None = None,
             stop: threading.Event | None = None) -> str:
    """Run one task with the installed ClientApp; returns Flower's sub-status. A task the
    SuperNode no longer knows (it was restarted meanwhile) fails: its input cannot be
    pulled or its reply cannot be pushed (httpx.HTTPStatusError, 401). Once `stop` is set,
    a SuperNode that does not answer (it is being stopped) is not waited for."""
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    client = _runtime_client(address, token, stop)
    heartbeat = HeartbeatSender(task_heartbeat(client, threading.Event()))
    heartbeat.start()
    message = context = reply = None
    sub_status, details = SubStatus.FAILED, "the ClientApp raised an exception"
    try:
        try:
            message, context, run, fab = pull_task_input(client)
            # The bundle is read for its hash only: it is never installed or imported.
            log.info("run %s: task %s (app bundle %s named by the server; not executed)",
                     run.run_id, message.metadata.message_type, fab.hash_str[:12])
            if on_bundle is not None:
                on_bundle(str(run.run_id), fab.hash_str)
            reply = client_app(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as err:  # noqa: BLE001 - the server gets an error reply, not silence
            details = f"{type(err).__name__}: {err}"
            if message is None:
                log.warning("could not pull the task's input: %s", details)
            else:
                log.exception("the ClientApp failed")
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                                reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            finally:
                push_task_output(client=client, context=context, sub_status=sub_status,
                                 details=details)
    finally:
        if heartbeat.is_running:  # not if its thread died of an unforeseen error
            heartbeat.stop()
        client.close()
    return sub_status


def serve_client_app(address: str, client_app: ClientApp, stop: threading.Event,
                     poll_s: float = 0.2,
                     on_bundle: Callable[[str, str], None] | None = None) -> None:
    """Acquire and run ClientApp tasks from the SuperNode at `address` until `stop` is set."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    # A call in flight when `stop` is set (the SuperNode stopping with it) is not retried:
    # the client ends at once rather than after RUNTIME_RETRY_S.
    acquirer = _runtime_client(address, None, stop)
    try:
        while not stop.is_set():
            try:
                res = acquirer.AcquireTask(
                    AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except Exception as err:  # noqa: BLE001 - the SuperNode may be (re)starting
                log.debug("SuperNode Runtime API not reachable: %s", err)
                stop.wait(1.0)
                continue
            if res.HasField("task") and res.token:
                started = time.monotonic()
                try:
                    status = run_task(address, res.token, client_app, on_bundle, stop)
                except Exception as err:  # noqa: BLE001 - e.g. the SuperNode went away mid-task
                    log.warning("task %s could not be completed: %s", res.task.task_id, err)
                    continue
                log.info("task %s %s in %.2f s", res.task.task_id, status,
                         time.monotonic() - started)
                continue
            stop.wait(poll_s)
    finally:
        acquirer.close()
