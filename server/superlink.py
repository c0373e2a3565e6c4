"""Flower's SuperLink as a process, with TLS and node authentication on, and its Control API.

The SuperLink serves the Fleet API (SuperNodes), the Control API (this module) and the
Runtime API on one HTTPS address. It is started with `--enable-supernode-auth`: only
nodes whose public keys were registered through the Control API may connect, and we
register exactly the keys in the consortium's enrolled/ folder at every start. It runs
no app itself (`--isolation process`): server/runtime.py starts `flwr-serverapp` for the
run we submitted, without runtime dependency installation: the ServerApp comes from the
installed consortia.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from consortia.flower_exec import (
    flower_env,
    require_executables,
    start_process,
    stop_process,
    wait_for,
)
from consortia.privacy.certs import CA_CERT, SERVER_CERT, SERVER_KEY
from consortia.server.deploy_config import local_host
from consortia.server.runtime import ServerAppLauncher, write_secret

SERVER_APP_REF = "consortia.server.deployed:app"
CLIENT_APP_REF = "consortia.client.deployed:app"


class DeploymentError(RuntimeError):
    """The deployment could not start or went wrong; the message says what and where."""


def app_bundle_files(config_path: Path, resume: bool) -> dict[str, bytes]:
    """The Flower app bundle (FAB) a run is submitted with: a pyproject.toml and no code.

    Its components name modules of the installed consortia package; its config tells the
    ServerApp which server.toml to read. SuperNodes started by `consortia client join`
    never install or import a bundle: they run the ClientApp their site installed.
    """
    pyproject = f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "consortia-run"
version = "1.0.0"
description = "A consortia federation: the ServerApp and ClientApp come from the installed package"
dependencies = []

[tool.flwr.app]
publisher = "consortia"

[tool.flwr.app.components]
serverapp = "{SERVER_APP_REF}"
clientapp = "{CLIENT_APP_REF}"

[tool.flwr.app.config]
server-config = "{config_path.resolve().as_posix()}"
resume = {"true" if resume else "false"}
'''
    return {"pyproject.toml": pyproject.encode()}


@dataclass
class SuperLink:
    certs: Path
    host: str
    port: int
    work_dir: Path  # logs and FLWR_HOME live here
    process: subprocess.Popen | None = field(default=None, init=False)
    serverapp_exe: str = field(default="", init=False)

    @property
    def address(self) -> str:
        host = local_host(self.host)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "superlink.log"

    def env(self) -> dict[str, str]:
        # Poll for new ServerApp tasks every 0.2 s rather than Flower's default 1 s.
        return flower_env(self.work_dir / "flwr-home", FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2")

    @property
    def secret_path(self) -> Path:
        return self.work_dir / "superexec.secret"

    def check_port_free(self) -> None:
        """Fail, naming the address, if something already listens on our port. Without
        this a second server on a busy port would find the first one's Control API ready
        and register its nodes there, while its own SuperLink failed to bind."""
        host = self.host or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR as servers set it: a port left in TIME_WAIT is free to take, one
            # with a listener is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, self.port))
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise DeploymentError(
                        f"server.port {self.port} on {host} is not free ({err.strerror}): "
                        "another server or program listens there; stop it or choose another "
                        "server.port") from None
                raise DeploymentError(  # an unknown name, an address of another machine
                    f"server.host {host!r}: cannot listen there ({err.strerror or err}); "
                    "accepted: an address of this machine, or 0.0.0.0 for all") from None

    def start(self, timeout: float) -> None:
        """Start the SuperLink (after check_port_free: a busy port is the caller's to
        report before it prepares anything) and wait for its Control API."""
        env = self.env()
        exe = require_executables(["flower-superlink", "flwr-serverapp"], env)
        self.serverapp_exe = exe["flwr-serverapp"]
        # Process isolation: the SuperLink runs no app itself; ServerApp tasks go only to
        # the holder of the SuperExec secret (server/runtime.py).
        write_secret(self.secret_path)
        argv = [exe["flower-superlink"],
                "--ssl-ca-certfile", str(self.certs / CA_CERT),
                "--ssl-certfile", str(self.certs / SERVER_CERT),
                "--ssl-keyfile", str(self.certs / SERVER_KEY),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--isolation", "process",
                "--superexec-auth-secret-file", str(self.secret_path),
                "--host", self.host, "--port", str(self.port)]
        self.process = start_process(argv, self.log_path, env)
        try:
            wait_for(self._control_reachable, timeout, "the SuperLink's Control API",
                     self.process, self.log_path, interval=0.3)
        except TimeoutError:
            self.stop()
            raise DeploymentError(
                f"the SuperLink's Control API did not answer within server.start_timeout_s = "
                f"{timeout:g} s; raise it on a slow machine, or see {self.log_path}") from None
        except RuntimeError as err:
            self.stop()
            raise DeploymentError(str(err)) from None
        if self.process.poll() is not None:  # a Control API answered, but not ours
            code = self.process.returncode
            self.stop()
            raise DeploymentError(f"the SuperLink exited ({code}) while another server answered "
                                  f"at {self.address}; see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def control(self):
        """A Control API client over TLS, verifying the SuperLink against the consortium CA."""
        from flwr.cli.typing import SuperLinkConnection
        from flwr.cli.utils import init_http_client_from_connection

        connection = SuperLinkConnection(name="consortia", address=self.address,
                                         root_certificates=str(self.certs / CA_CERT))
        saved = os.environ.get("FLWR_HOME")
        os.environ["FLWR_HOME"] = str(self.work_dir / "flwr-home")  # the CLI's own state
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # Flower's CLI names the connection
                return init_http_client_from_connection(connection)
        finally:
            if saved is None:
                os.environ.pop("FLWR_HOME", None)
            else:
                os.environ["FLWR_HOME"] = saved

    def _control_reachable(self) -> bool:
        from flwr.proto.control_pb2 import ListRunsRequest

        try:
            client = self.control()
            try:
                client.ListRuns(ListRunsRequest())
            finally:
                client.close()
        except Exception:  # noqa: BLE001 - not up yet: connection refused, TLS not ready
            return False
        return True

    def register_nodes(self, keys: dict[str, bytes]) -> dict[str, int]:
        """Register each enrolled node's public key (OpenSSH line); returns name -> node id."""
        from cryptography.hazmat.primitives.serialization import load_ssh_public_key
        from flwr.proto.control_pb2 import RegisterNodeRequest
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        client = self.control()
        try:
            ids = {}
            for name, line in keys.items():
                key = public_key_to_bytes(load_ssh_public_key(line))
                ids[name] = client.RegisterNode(RegisterNodeRequest(public_key=key, name=name)).node_id
            return ids
        finally:
            client.close()

    def submit(self, config_path: Path, resume: bool) -> int:
        """Start a Flower run of the consortia app; returns Flower's run id."""
        from flwr.cli.build import build_fab_from_disk
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        with tempfile.TemporaryDirectory() as tmp:
            for name, data in app_bundle_files(config_path, resume).items():
                (Path(tmp) / name).write_bytes(data)
            fab_bytes = build_fab_from_disk(Path(tmp))
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        client = self.control()
        try:
            res = client.StartRun(StartRunRequest(fab=fab_to_proto(fab),
                                                  override_config=user_config_to_proto({}),
                                                  federation=""))
        finally:
            client.close()
        if not res.HasField("run_id"):
            raise DeploymentError(f"the SuperLink did not start the run; see {self.log_path}")
        return res.run_id

    def launcher(self) -> ServerAppLauncher:
        return ServerAppLauncher(self.address, self.certs / CA_CERT, self.secret_path.read_bytes(),
                                 self.serverapp_exe, self.env(), self.work_dir / "serverapp.log")

    def guard(self, flower_run: int, nodes: set[int]) -> dict[int, str]:
        """Stop runs other than ours and unregister nodes other than the enrolled ones:
        the open-source Control API does not authenticate who asks (server/runtime.py).
        Returns the enrolled nodes' statuses (registered, online, offline)."""
        from flwr.proto.control_pb2 import (
            ListNodesRequest,
            ListRunsRequest,
            StopRunRequest,
            UnregisterNodeRequest,
        )

        client = self.control()
        try:
            for run_id, run in client.ListRuns(ListRunsRequest()).run_dict.items():
                if run_id != flower_run and run.status.status != "finished":
                    client.StopRun(StopRunRequest(run_id=run_id))
            statuses = {}
            for info in client.ListNodes(ListNodesRequest()).nodes_info:
                if info.node_id in nodes:
                    statuses[info.node_id] = info.status
                elif info.status != "unregistered":
                    client.UnregisterNode(UnregisterNodeRequest(node_id=info.node_id))
        finally:
            client.close()
        return statuses

    def run_status(self, run_id: int) -> tuple[str, str, str]:
        """(status, sub_status, details) of a Flower run."""
        from flwr.proto.control_pb2 import ListRunsRequest

        client = self.control()
        try:
            run = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id]
        finally:
            client.close()
        return run.status.status, run.status.sub_status, run.status.details
