"""`consortia server start`: the SuperLink, the enrolled nodes, and the consortia run on them.

In order: read and check server.toml (a bad config fails here), prepare the results
directory (a new run, or the same run with --resume), start the SuperLink with TLS and
node authentication, register every enrolled node's key, submit the run, and wait for it
to end. The ServerApp (server/deployed.py) runs in Flower's `flwr-serverapp` process and
writes checkpoints, metrics and the run store exactly as a simulation does; --resume
continues from the latest checkpoint. SIGTERM or Ctrl-C stops the SuperLink; the run can
then be resumed.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consortia.flower_exec import FlowerExecutableMissing
from consortia.privacy.certs import CertsError, enrolled_keys
from consortia.privacy.storage import atomic_write_json
from consortia.server.deploy_config import load_server_config
from consortia.server.results import SUMMARY_FILE
from consortia.server.run_dir import ResultsDirError, prepare_out_dir
from consortia.server.store import RunStore
from consortia.server.superlink import DeploymentError, SuperLink

DEPLOYMENT_FILE = "deployment.json"
POLL_S = 1.0

__all__ = ["DeploymentError", "serve"]


def serve(config_path: str | Path, *, resume: bool = False,
          log: Callable[[str], None] = print, overrides: list[str] | None = None,
          stop: threading.Event | None = None) -> dict[str, Any]:
    """Run the federation configured in server.toml; return its summary."""
    config_path = Path(config_path)
    deployment = load_server_config(config_path, overrides)
    deployment.check_files()
    cfg, srv = deployment.run, deployment.server
    if cfg.store.url:
        RunStore(cfg.store.url).close()  # a store that cannot be opened fails here
    try:
        keys = enrolled_keys(srv.certs)
        run_id = prepare_out_dir(cfg, srv.out, resume)
    except (CertsError, ResultsDirError) as err:
        raise DeploymentError(str(err)) from None
    if len(keys) < cfg.clients:
        log(f"warning: {len(keys)} nodes enrolled, the run waits for run.clients = {cfg.clients}")
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())

    link = SuperLink(srv.certs, srv.host, srv.port, srv.out / "superlink")
    try:
        link.start(srv.start_timeout_s)
    except FlowerExecutableMissing as err:
        raise DeploymentError(str(err)) from None
    try:
        nodes = link.register_nodes(keys)
        flower_run = link.submit(config_path, resume)
        atomic_write_json(srv.out / DEPLOYMENT_FILE, {
            "run_id": run_id, "flower_run_id": flower_run, "superlink": link.address,
            "nodes": {name: str(node) for name, node in nodes.items()}, "resumed": resume,
            "started_at": time.time()})
        log(f"run {run_id}{' (resumed)' if resume else ''} on https://{link.address}: "
            f"{len(nodes)} enrolled nodes; results in {srv.out}; SuperLink log "
            f"{link.log_path}")
        status = wait_for_run(link, flower_run, stop)
    except KeyboardInterrupt:
        stop.set()
        status = None
    finally:
        link.stop()
    if status is None:
        log(f"stopped; continue with: consortia server start --config {config_path} --resume")
        sys.exit(130)
    sub_status, details = status
    if sub_status != "completed":
        raise DeploymentError(f"the run ended {sub_status}: {details or 'no details'}; see "
                              f"{link.log_path} and the run store")
    return json.loads((srv.out / SUMMARY_FILE).read_text())


def wait_for_run(link: SuperLink, flower_run: int, stop: threading.Event
                 ) -> tuple[str, str] | None:
    """(sub_status, details) once the run has finished; None if stopped first."""
    while not stop.wait(POLL_S):
        if link.process is not None and link.process.poll() is not None:
            raise DeploymentError(f"the SuperLink exited ({link.process.returncode}); see "
                                  f"{link.log_path}")
        status, sub_status, details = link.run_status(flower_run)
        if status == "finished":
            return sub_status, details
    return None
