"""The server side's guard: run the consortia ServerApp for our run, and nothing else.

Flower 1.41 serves the Fleet API (SuperNodes), the Control API and the Runtime API on one
HTTPS address, and the open-source SuperLink has no account authentication on the
Control API: whoever can reach the port could submit a run (whose app bundle Flower's
SuperExec would then execute on the server) or register a node key. So
`consortia server start`:

- starts the SuperLink with `--isolation process` and a SuperExec secret (0600): only a
  holder of the secret can acquire the ServerApp task, and only this module holds it;
- acquires ServerApp tasks itself and starts `flwr-serverapp` only for the run it
  submitted (whose bundle names installed consortia modules and nothing else); any
  other run is stopped;
- unregisters any node that is not one of the enrolled keys it registered.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import threading
from pathlib import Path

from consortia.flower_exec import runtime_client, start_process

log = logging.getLogger("consortia.server")
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"


def write_secret(path: Path) -> Path:
    """A fresh SuperExec secret, readable by the operator only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path


class ServerAppLauncher:
    """Acquires ServerApp tasks from the SuperLink; starts flwr-serverapp for ours only."""

    def __init__(self, address: str, ca_cert: Path, secret: bytes, serverapp_exe: str,
                 env: dict[str, str], log_path: Path):
        self.address, self.ca_cert, self.secret = address, ca_cert, secret
        self.serverapp_exe, self.env, self.log_path = serverapp_exe, env, log_path
        self.process: subprocess.Popen | None = None
        self.refused: list[int] = []

    def _client(self):
        from flwr.supercore.interceptors import (
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
        )

        # Failures are exceptions, never the SIGINT of Flower's own invoker (flower_exec).
        return runtime_client(
            self.address, root_certificates=self.ca_cert.read_bytes(),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                          SuperExecAuthHttpInterceptor(master_secret=self.secret,
                                                       protected_methods=frozenset({ACQUIRE_TASK}))])

    def run(self, flower_run: int, stop: threading.Event, poll_s: float = 0.2) -> None:
        """Until `stop`: start the ServerApp of `flower_run` once; refuse every other run."""
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        client = self._client()
        try:
            while not stop.is_set():
                try:
                    res = client.AcquireTask(
                        AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))
                except Exception as err:  # noqa: BLE001 - retried; the SuperLink may be busy
                    # a refusal (an HTTP status, e.g. 401 for the secret) is worth a look
                    refused = isinstance(err, httpx.HTTPStatusError)
                    log.log(logging.WARNING if refused else logging.DEBUG,
                            "AcquireTask failed: %s", err)
                    stop.wait(1.0)
                    continue
                if res.HasField("task") and res.token:
                    if res.task.run_id == flower_run and self.process is None:
                        self.process = start_process(
                            [self.serverapp_exe, "--runtime-api-address", self.address,
                             "--token", res.token, "--root-certificates", str(self.ca_cert),
                             "--parent-pid", str(os.getpid())], self.log_path, self.env)
                    else:
                        log.warning("refused a ServerApp task of run %s: not the consortia run",
                                    res.task.run_id)
                        self.refused.append(res.task.run_id)
                    continue
                stop.wait(poll_s)
        finally:
            client.close()

    def stop(self) -> None:
        from consortia.flower_exec import stop_process

        if self.process is not None:
            stop_process(self.process)
