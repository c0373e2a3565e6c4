"""A deployed federation on 127.0.0.1 for tests: certificates, configs and real processes.

Every process is started by the test (`consortia server start`, `consortia client join`,
`flower-supernode`) in its own session and stopped by it: SIGKILL to a whole process tree
plays a crash, and `close()` ends everything that is left. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from consortia.flower_exec import flower_env, free_port
from consortia.privacy.certs import enroll_node, generate_node_key, init_consortium

CONSORTIA = [sys.executable, "-m", "consortia.cli"]

# A site.toml for tests of a partner's config: site_toml writes it, with `replace`'s
# substitutions, into tmp_path.
SITE = """
[site]
name = "site-a"
superlink = "127.0.0.1:9093"
ca_cert = "ca.pem"
node_key = "node.key"
state_dir = "state"
task = "{task}"
{extra}

[data]
kind = "partition"
index = 0
count = 3

[policy]
tasks = ["{task}"]
epsilon_budget = 3.0
delta = 1e-5
"""


def site_toml(tmp_path, task="digits-mlp", extra="", **replace):
    text = SITE.format(task=task, extra=extra)
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def server_start_lines(monkeypatch, out: Path, rows: list[dict], nodes: dict[str, int]
                       ) -> tuple[tuple[str, str], list[str]]:
    """What `server start` prints while it waits for a run (deploy.wait_for_run) whose
    metrics.jsonl holds `rows` and whose SuperLink says the run finished: the run's
    status, and the lines said."""
    import threading

    from consortia.server import deploy

    class FinishedLink:
        process, log_path = None, "superlink.log"

        def guard(self, flower_run, nodes):
            return dict.fromkeys(nodes, "online")

        def run_status(self, run_id):
            return "finished", "completed", ""

    monkeypatch.setattr(deploy, "POLL_S", 0.001)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    said: list[str] = []
    status = deploy.wait_for_run(FinishedLink(), 7, nodes, threading.Event(), out, said.append)
    return status, said


def resign(consortium: Path, name: str, not_before, not_after) -> None:
    """Sign `consortium`/`name` (ca.pem or server.pem) again with the CA's key, with
    another validity period: an expired or not yet valid certificate, as time makes them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    cert = x509.load_pem_x509_certificate((consortium / name).read_bytes())
    ca = x509.load_pem_x509_certificate((consortium / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((consortium / "ca.key").read_bytes(), None)
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(ca.subject)
               .public_key(cert.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after))
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    signed = builder.sign(key, hashes.SHA384())
    (consortium / name).write_bytes(signed.public_bytes(serialization.Encoding.PEM))
RUN_TIMEOUT_S = 240.0


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children(p)
    return tree


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything it started (a crash of that machine's processes)."""
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def wait_until(predicate, timeout: float, what: str, logs: list[Path] = (),
               running: subprocess.Popen | None = None):
    """Poll predicate until truthy; fail after `timeout` s, or once `running` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if running is not None and running.poll() is not None:
            what = f"{what} (the process exited with {running.returncode})"
            break
        time.sleep(0.5)
    tails = "\n".join(f"--- {p}\n{tail(p)}" for p in logs if p.exists())
    raise AssertionError(f"{what}: not within {timeout:.0f} s\n{tails}")


# The server polls the Control API every second: lines that would fill a log's tail.
POLLING = re.compile(r"ListRuns|ListNodes|list-runs|list-nodes")


def tail(log: Path, chars: int = 3000) -> str:
    """The end of a log, without the server's Control API polling."""
    lines = [line for line in log.read_text(errors="replace").splitlines()
             if not POLLING.search(line)]
    return "\n".join(lines)[-chars:]


def jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Federation:
    def __init__(self, root: Path, sites: list[str], rounds: int = 2, **run: object):
        self.root = root
        self.certs = init_consortium(root / "consortium", ["127.0.0.1", "localhost"])
        for name in sites:
            enroll_node(self.certs, name)
        self.port = free_port()
        self.out = root / "results"
        self.procs: list[subprocess.Popen] = []
        self.server: subprocess.Popen | None = None
        self.clients: dict[str, subprocess.Popen] = {}
        run_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in run.items())
        (root / "server.toml").write_text(f"""
[server]
host = "127.0.0.1"
port = {self.port}
certs = "consortium"
out = "results"

[run]
task = "digits-mlp"
rounds = {rounds}
clients = {len(sites)}
clients_per_round = {len(sites)}
batch_size = 64
lr = 0.1
{run_lines}

[run.privacy]
epsilon_budget = 20.0
noise_multiplier = 1.0

[run.secagg]
enabled = true

[run.sim]
reply_timeout_s = 30
""")

    def write_site(self, name: str, index: int, count: int, data: dict | None = None,
                   **policy: object) -> Path:
        terms = {"tasks": ["digits-mlp"], "epsilon_budget": 20.0, "delta": 1e-5,
                 "min_noise_multiplier": 0.5, **policy}
        lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in terms.items())
        data = data or {"kind": "partition", "index": index, "count": count}
        data_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in data.items())
        path = self.root / f"{name}.toml"
        path.write_text(f"""
[site]
name = "{name}"
superlink = "127.0.0.1:{self.port}"
ca_cert = "consortium/nodes/{name}/ca.pem"
node_key = "consortium/nodes/{name}/node.key"
state_dir = "state/{name}"
task = "digits-mlp"

[data]
{data_lines}

[policy]
{lines}
""")
        return path

    def state(self, name: str) -> Path:
        return self.root / "state" / name

    def _start(self, argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=self.root,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_server(self, resume: bool = False) -> subprocess.Popen:
        argv = CONSORTIA + ["server", "start", "--config", "server.toml"]
        self.server = self._start(argv + (["--resume"] if resume else []),
                                  self.root / "server.out")
        return self.server

    def join(self, name: str) -> subprocess.Popen:
        self.clients[name] = self._start(CONSORTIA + ["client", "join", "--config",
                                                      f"{name}.toml"],
                                         self.root / f"{name}.out")
        return self.clients[name]

    def join_python(self, name: str, script: str) -> subprocess.Popen:
        """A client started through the partner's Python API (a script of its own)."""
        self.clients[name] = self._start([sys.executable, "-c", script],
                                         self.root / f"{name}.out")
        return self.clients[name]

    def plain_supernode(self, name: str, key: Path, ca: Path) -> Path:
        """A bare flower-supernode (no consortia ClientApp behind it): for nodes the
        SuperLink must turn away."""
        log = self.root / f"{name}.supernode.log"
        env = flower_env(self.root / f"{name}-flwr")
        argv = [str(Path(sys.executable).parent / "flower-supernode"), "--superlink",
                f"127.0.0.1:{self.port}", "--root-certificates", str(ca),
                "--auth-supernode-private-key", str(key), "--isolation", "process",
                "--host", "127.0.0.1", "--port", str(free_port())]
        with open(log, "ab") as f:
            self.procs.append(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                               env=env, start_new_session=True))
        return log

    def supernode_pid(self, name: str) -> int:
        """The pid of the flower-supernode that `consortia client join` runs for `name`."""
        [pid] = [p for p in process_tree(self.clients[name].pid)
                 if b"flower-supernode" in cmdline(p)]
        return pid

    def stranger_key(self, name: str) -> Path:
        private, _ = generate_node_key(self.root / name)
        return private

    def logs(self) -> list[Path]:
        """Every log a failed wait shows the tail of: the server's, the SuperLink's, the
        ServerApp's, and each client's with its SuperNode's."""
        return [self.root / "server.out", self.out / "superlink" / "superlink.log",
                self.out / "superlink" / "serverapp.log",
                *[log for n in self.clients
                  for log in (self.root / f"{n}.out", self.state(n) / "supernode.log")]]

    def metrics(self) -> list[dict]:
        return jsonl(self.out / "metrics.jsonl")

    def wait_rounds(self, n: int, timeout: float = RUN_TIMEOUT_S) -> list[dict]:
        return wait_until(lambda: len(self.metrics()) >= n and self.metrics(), timeout,
                          f"{n} rounds recorded", self.logs(), self.server)

    def wait_server_exit(self, timeout: float = RUN_TIMEOUT_S) -> int:
        wait_until(lambda: self.server.poll() is not None, timeout, "the server to finish",
                   self.logs())
        return self.server.returncode

    def ledger(self, name: str) -> dict:
        return json.loads((self.state(name) / "privacy_ledger.json").read_text())

    def audit(self, name: str) -> list[dict]:
        return jsonl(self.state(name) / "audit.jsonl")

    def close(self) -> None:
        """SIGTERM every process the test started and all they started; SIGKILL whatever
        is left after 15 s."""
        pids = [pid for proc in self.procs if proc.poll() is None for pid in process_tree(proc.pid)]
        commands = [cmdline(pid) for pid in pids]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pid, cmd in zip(pids, commands, strict=True):
            if cmd and cmdline(pid) == cmd:  # still the process we started, not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            proc.wait(timeout=10)
