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
