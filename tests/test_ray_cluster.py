"""A simulation attached to a Ray cluster of two nodes on 127.0.0.1 runs on both."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from consortia.config import load_config
from consortia.simulations.runner import run_simulation

pytestmark = pytest.mark.slow
SMOKE = Path(__file__).resolve().parents[1] / "simulations" / "experiments" / "digits-dp-smoke.toml"
RAY = str(Path(sys.executable).with_name("ray"))


class RecordRayNode:
    """A client mod that notes which Ray node ran each train call (picklable)."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, msg, context, call_next):
        import ray

        node = ray.get_runtime_context().get_node_id()
        Path(self.folder, f"{os.getpid()}-{node}").touch()
        return call_next(msg, context)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_node_cluster():
    """A head and a worker node, each with 1 CPU, started and stopped by this test alone.

    `ray start --block` keeps each node's processes under one foreground process; the test
    ends them by process group. (`ray stop` would stop every Ray node on the machine.)
    """
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are limited
    common = ["--block", "--disable-usage-stats", "--num-cpus=1", "--num-gpus=0",
              "--node-ip-address=127.0.0.1"]
    head = [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
            f"--temp-dir={temp}", *common]
    worker = [RAY, "start", f"--address=127.0.0.1:{port}", *common]
    nodes = []
    try:
        nodes.append(subprocess.Popen(head, start_new_session=True, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        wait_for_port(port, 120)
        nodes.append(subprocess.Popen(worker, start_new_session=True, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        wait_for_nodes(f"127.0.0.1:{port}", 2, 120)
        yield f"127.0.0.1:{port}"
    finally:
        for node in reversed(nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.5)
    raise TimeoutError(f"Ray head did not open port {port} in {timeout} s")


def wait_for_nodes(address: str, count: int, timeout: float) -> None:
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", code, address], capture_output=True,
                             text=True, timeout=120)
        if out.stdout.strip().isdigit() and int(out.stdout.strip()) >= count:
            return
        time.sleep(1)
    raise TimeoutError(f"{count} Ray nodes did not join {address} in {timeout} s")


def test_simulation_spreads_over_a_two_node_cluster(two_node_cluster, tmp_path):
    seen = tmp_path / "seen"
    seen.mkdir()
    cfg = load_config(SMOKE, ["rounds=2", "privacy.enabled=false", "sim.num_cpus_per_client=1",
                              f'sim.ray_address="{two_node_cluster}"'])
    summary = run_simulation(cfg, tmp_path / "run", client_mods=[RecordRayNode(str(seen))])
    assert summary["rounds_completed"] == 2
    nodes = {p.name.split("-", 1)[1] for p in seen.iterdir()}
    assert len(nodes) == 2, f"actors ran on {len(nodes)} Ray node(s)"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_accuracy"] > 0.2
