"""Starting and stopping Flower's own executables (SuperLink, SuperNode) as processes.

Shared by `consortia server start` and `consortia client join`. Flower's executables are
looked up in the Python environment consortia runs in (the bin folder of
`sys.executable` first, then PATH), and every child starts in its own process group so
that stopping it stops what it started (Flower's SuperExec and app processes) too.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


class FlowerExecutableMissing(RuntimeError):
    pass


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """The environment for Flower's processes: this env's bin folder first on PATH (the
    SuperLink starts `flower-superexec`, which starts `flwr-serverapp`, by name), a
    private FLWR_HOME (installed app bundles, CLI state) and telemetry off."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.update(extra)
    return env


def require_executables(names: list[str], env: dict[str, str]) -> dict[str, str]:
    found = {name: shutil.which(name, path=env["PATH"]) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise FlowerExecutableMissing(
            f"Flower's executables {missing} are not installed next to {sys.executable} nor on "
            "PATH; install consortia (which brings flwr) into this environment")
    return {name: str(path) for name, path in found.items()}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


PR_SET_PDEATHSIG = 1
# Loaded here, in the parent: between fork and exec the child only calls prctl (no import,
# no lock another thread might hold).
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the thread that started it
    ends (the consortia process, or the thread that supervises it, dies)."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_process(argv: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start argv with its output appended to log_path.

    The child stays in our process group: whoever stops `consortia server start` or
    `consortia client join` as a group (a terminal's Ctrl-C, a service manager, a test)
    stops Flower's processes with it. On Linux it also gets SIGTERM if its parent dies
    alone (even by SIGKILL), so no SuperLink or SuperNode outlives the consortia process
    that started it. Flower's SuperExec and app processes watch their parent likewise.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process, SIGKILL it if it has not gone after `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None,
             log_path: Path | None = None, interval: float = 0.2):
    """Poll predicate() until it returns a truthy value; fail after `timeout` seconds or
    as soon as `proc` exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with code {proc.returncode}"
                               + (f"; see {log_path}" if log_path else ""))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s"
                               + (f"; see {log_path}" if log_path else ""))
        time.sleep(interval)


RUNTIME_RETRY_S = 30.0  # how long a Runtime API call retries a SuperLink or SuperNode that is away
RETRYABLE_HTTP = frozenset({502, 503, 504})  # as Flower's invoker: the server is busy or restarting


def runtime_client(address: str, interceptors: list, root_certificates: bytes | None = None,
                   max_time: float | None = RUNTIME_RETRY_S, stop: threading.Event | None = None):
    """A client of a Flower Runtime API (the SuperLink's or a SuperNode's) whose failures
    are exceptions raised to the caller, never signals.

    Flower pairs its RuntimeHttpClient with `make_simple_http_retry_invoker`, written for
    Flower's own one-task processes (flwr-clientapp, flwr-serverapp): on a 401 it sends
    SIGINT to the process it runs in, so that the task's process ends. consortia runs
    tasks inside `consortia client join` and acquires ServerApp tasks inside
    `consortia server start`, where that signal would end the whole client or server: a
    SuperNode started again after the server crashed no longer knows the token of the
    task it was running and answers 401, and the partner's client would leave the
    federation. So this invoker retries what Flower's retries (transport errors; 502, 503,
    504), for at most `max_time` seconds, and raises everything else, a 401 included.

    Once `stop` is set it retries no more: a client or server being stopped gives up a
    call to a SuperNode or SuperLink that is away (stopping too) at once, instead of
    retrying it for up to `max_time` seconds before it can end.
    """
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential
    from flwr.supercore.runtime import RuntimeHttpClient

    def give_up(err: Exception) -> bool:
        return (stop is not None and stop.is_set()) or (
            isinstance(err, httpx.HTTPStatusError)
            and err.response.status_code not in RETRYABLE_HTTP)

    invoker = RetryInvoker(wait_gen_factory=lambda: exponential(max_delay=5),
                           recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
                           max_tries=None, max_time=max_time, should_giveup=give_up,
                           wait_function=time.sleep if stop is None else stop.wait)
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=root_certificates is None,
        root_certificates=root_certificates, interceptors=interceptors, retry_invoker=invoker)
