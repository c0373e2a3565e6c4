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

import httpx

from consortia.flower_exec import FlowerExecutableMissing
from consortia.privacy.certs import CertsError, enrolled_keys
from consortia.privacy.display import epsilon_text
from consortia.privacy.storage import atomic_write_json
from consortia.server.checkpoint import CheckpointStore
from consortia.server.deploy_config import load_server_config
from consortia.server.results import METRICS_FILE, SUMMARY_FILE
from consortia.server.run_dir import (
    CHECKPOINTS_DIR,
    RUN_FILE,
    ResultsDirError,
    prepare_out_dir,
    record_finished_run,
    run_finished,
)
from consortia.server.store import (
    STORE_FILE,
    RunStore,
    StoreError,
    default_store_url,
    mark_interrupted,
)
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
    cfg, srv = deployment.run, deployment.server
    link = SuperLink(srv.certs, srv.host, srv.port, srv.out / "superlink")
    # Before the results directory is touched: a busy port costs nothing. Before the
    # certificates: a host that is not this machine's is the mistake to name, not that
    # server.pem does not name it.
    link.check_port_free()
    deployment.check_files()
    check_test_set(cfg)
    # A store that cannot be opened (unreachable, damaged) fails here, before the SuperLink;
    # the results directory's own is checked only once a run made it.
    store_url = cfg.store.url or (default_store_url(srv.out)
                                  if (srv.out / STORE_FILE).is_file() else None)
    if store_url:
        try:
            RunStore(store_url).close()
        except StoreError as err:
            raise DeploymentError(str(err)) from None
    try:
        keys = enrolled_keys(srv.certs)
        run_id = prepare_out_dir(cfg, srv.out, resume, kind="deployment")
    except (CertsError, ResultsDirError) as err:
        raise DeploymentError(str(err)) from None
    if resume and run_finished(cfg, srv.out):  # no SuperLink, no round
        log(f"run {run_id} already completed all {cfg.rounds} rounds: nothing to run "
            f"(results in {srv.out})")
        # but a store that lost the run (its damaged file moved aside) is given it again
        store = RunStore(cfg.store.url or default_store_url(srv.out))
        try:
            if record_finished_run(store, cfg, srv.out, run_id, kind="deployment"):
                log(f"recorded run {run_id} again in the run store {store.display_url}")
        finally:
            store.close()
        return json.loads((srv.out / SUMMARY_FILE).read_text())
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())

    launcher = None
    try:
        try:
            link.start(srv.start_timeout_s)
        except FlowerExecutableMissing as err:
            raise DeploymentError(str(err)) from None
        try:
            nodes = link.register_nodes(keys)
            flower_run = link.submit(config_path, resume)
        except httpx.HTTPError as err:  # the Control API refused, or went away
            raise DeploymentError(f"the SuperLink at {link.address} did not take the run: "
                                  f"{err}; see {link.log_path}") from None
    except (DeploymentError, KeyboardInterrupt) as err:
        link.stop()
        if not resume:  # no run began: the same config may start it again (logs stay)
            (srv.out / RUN_FILE).unlink(missing_ok=True)
        if isinstance(err, KeyboardInterrupt):  # Ctrl-C while the SuperLink started
            again = f"consortia server start --config {config_path}{' --resume' * resume}"
            log(f"stopped before the run began (no round ran); start it with: {again}")
            sys.exit(130)
        raise
    try:
        atomic_write_json(srv.out / DEPLOYMENT_FILE, {
            "run_id": run_id, "flower_run_id": flower_run, "superlink": link.address,
            "nodes": {name: str(node) for name, node in nodes.items()}, "resumed": resume,
            "started_at": time.time()})
        log(f"run {run_id}{' (resumed)' if resume else ''} on https://{link.address}: "
            f"{len(nodes)} enrolled nodes; results in {srv.out}; SuperLink log "
            f"{link.log_path}")
        launcher = link.launcher()
        threading.Thread(target=launcher.run, args=(flower_run, stop), daemon=True).start()
        status = wait_for_run(link, flower_run, nodes, stop, srv.out, log, needed=cfg.clients,
                              after_round=rounds_said_before(srv.out) if resume else 0)
    except KeyboardInterrupt:
        status = None
    finally:
        stop.set()
        if launcher is not None:
            launcher.stop()
        link.stop()
    if status is None:
        resume = f"consortia server start --config {config_path} --resume"
        mark_interrupted(cfg.store.url or default_store_url(srv.out), run_id, resume)
        log(f"stopped; continue with: {resume}")
        sys.exit(130)
    sub_status, details = status
    if sub_status != "completed":
        raise DeploymentError(f"the run ended {sub_status}: {details or 'no details'}; see "
                              f"{link.log_path} and the run store")
    return json.loads((srv.out / SUMMARY_FILE).read_text())


def base_model_sha256(config_path: str | Path) -> str:
    """The SHA-256 of the run's round-0 checkpoint (the base model), as the server will
    state it in every request: partners list it in their policy's base_model_sha256."""
    import hashlib

    import torch
    from flwr.app import ArrayRecord

    from consortia.server.checkpoint import weights_bytes
    from consortia.server.workflow import arrays_to_numpy
    from consortia.tasks import get_task

    cfg = load_server_config(config_path).run
    task = get_task(cfg.task, cfg.task_options())
    torch.manual_seed(cfg.seed)  # as RoundWorkflow.initial_model
    model = task.build_model(cfg.model.activation)
    weights = arrays_to_numpy(ArrayRecord(task.travelling_weights(model)))
    return hashlib.sha256(weights_bytes(weights)).hexdigest()


def check_test_set(cfg) -> None:
    """The server evaluates the global model on its task's test set (RoundWorkflow): one it
    cannot load fails here, naming run.task and run.data_dir, before the SuperLink starts
    or the results directory is made (else the ServerApp failed after both)."""
    from consortia.tasks import get_task

    try:
        get_task(cfg.task, cfg.task_options()).load_data(cfg.data_dir)
    except Exception as err:  # an own task's loader may raise anything: named, not hidden
        where = f"run.data_dir = {str(cfg.data_dir)!r}" if cfg.data_dir else "run.data_dir unset"
        raise DeploymentError(f"run.task = {cfg.task!r} ({where}): the server's test set "
                              f"cannot be loaded: {type(err).__name__}: {err}") from None


def rounds_said_before(out: Path) -> int:
    """The rounds a resumed run continues after, which were said before: up to its latest
    verified checkpoint, and only those on record (a round checkpointed but not recorded,
    the server killed between the two, runs again, RoundWorkflow.start_state)."""
    latest = CheckpointStore(out / CHECKPOINTS_DIR).latest()
    if latest is None:
        return 0
    return min(latest.round, max((r["round"] for r in read_rows(out / METRICS_FILE)), default=0))


def wait_for_run(link: SuperLink, flower_run: int, nodes: dict[str, int],
                 stop: threading.Event, out: Path, log: Callable[[str], None],
                 needed: int = 0, after_round: int = 0) -> tuple[str, str] | None:
    """(sub_status, details) once the run has finished; None if stopped first. Meanwhile
    keep the SuperLink to our run and our nodes, and report each round as it is recorded
    and each enrolled node as it comes online or goes offline. Rounds start only with
    `needed` nodes online (run.clients): while fewer are, say whom the run waits for.
    Rounds up to `after_round` (a resumed run's checkpoint) are not said again."""
    names = {node: name for name, node in nodes.items()}
    said_round, statuses = after_round, {node: "registered" for node in names}
    missing_said: list[str] = []
    while not stop.wait(POLL_S):
        if link.process is not None and link.process.poll() is not None:
            raise DeploymentError(f"the SuperLink exited ({link.process.returncode}); see "
                                  f"{link.log_path}")
        for node, status in sorted(link.guard(flower_run, set(names)).items()):
            if status != statuses[node]:
                log(f"{names[node]}: {status}")
                statuses[node] = status
        online = sum(status == "online" for status in statuses.values())
        missing = sorted(names[n] for n, status in statuses.items() if status != "online")
        if online < needed and missing != missing_said:
            log(f"waiting: {online} of run.clients = {needed} partners online; not online: "
                f"{', '.join(missing)}")
        missing_said = missing if online < needed else []
        for row in read_rows(out / METRICS_FILE):
            if row["round"] <= said_round:
                continue
            # A round between evaluations (eval_every) has no accuracy in its row.
            evaluated = (f"accuracy {row['accuracy']:.4f}, " if row.get("accuracy") is not None
                         else "")
            log(f"round {row['round']}: {evaluated}trained "
                f"{row['clients_trained']}/{row['clients_sampled']}"
                + (f", ε max {epsilon_text(row['epsilon_max'])}" if row.get("epsilon_max") else ""))
            said_round = row["round"]
        status, sub_status, details = link.run_status(flower_run)
        if status == "finished":
            return sub_status, details
    return None


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being appended
            break
    return rows
