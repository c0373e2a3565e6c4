"""`consortia sim run`: a federation of virtual clients on Flower's simulation engine."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from consortia.config import RunConfig, inert_settings_warning, split_host_port
from consortia.privacy.dp.preflight import (
    check_budget_reachable,
    check_delta,
    check_dp_model,
    check_first_round,
    partial_fit_warning,
)
from consortia.privacy.storage import atomic_write_json
from consortia.server.run_dir import (
    RUN_FILE,
    ResultsDirError,
    prepare_out_dir,
    record_finished_run,
    run_finished,
)
from consortia.server.store import RunStore, default_store_url
from consortia.server.workflow import RoundCallback

log = logging.getLogger("consortia.simulations")

__all__ = ["RUN_ERRORS", "RUN_FILE", "ResultsDirError", "backend_config", "prepare_out_dir",
           "run_simulation", "SimulationFailed", "start_checks"]

class SimulationFailed(RuntimeError):
    """The federation ended without its summary: what went wrong is in Flower's log."""


# What a run refuses to start (or continue) with: a config, data, model or results
# directory it cannot use. The message names the value and what is accepted, so callers
# print it, not a traceback (ConfigError and ResultsDirError are ValueErrors).
RUN_ERRORS = (ValueError, FileNotFoundError, ImportError, SimulationFailed)


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    if cfg.sim.max_actors is not None:
        # Ray takes whole CPUs: rounded down, 1 actor of 1.5 CPUs would get 1 and fit none.
        cpus = min(cpus, math.ceil(cfg.sim.max_actors * cfg.sim.num_cpus_per_client))
    init_args: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if cfg.sim.ray_address:
        # An existing cluster brings its own resources: Flower sizes the actor pool from
        # what the cluster offers and `client_resources` (fractional GPUs included).
        init_args["address"] = cfg.sim.ray_address
    else:
        init_args |= {"num_cpus": max(cpus, 1), "include_dashboard": False}
    return {
        "client_resources": {"num_cpus": cfg.sim.num_cpus_per_client,
                             "num_gpus": cfg.sim.num_gpus_per_client},
        "init_args": init_args,
    }


def check_local_resources(cfg: RunConfig) -> None:
    """Ray started here must offer one virtual client's resources, or Flower's actor pool
    is empty: it logs a traceback per thread and the run never ends. Counted as Flower
    counts them (ray_actor.pool_size_from_resources), from the CPUs backend_config gives
    Ray and the GPUs torch sees (Ray finds the same ones)."""
    import torch

    cpus = backend_config(cfg)["init_args"]["num_cpus"]
    gpus = torch.cuda.device_count()
    per_cpu, per_gpu = cfg.sim.num_cpus_per_client, cfg.sim.num_gpus_per_client
    actors = int(cpus / per_cpu)
    if per_gpu > 0:
        actors = min(actors, int(gpus / per_gpu))
    if actors >= 1:
        return
    capped = (f" (sim.max_actors = {cfg.sim.max_actors} × num_cpus_per_client)"
              if cpus < (os.cpu_count() or 1) else "")
    raise ValueError(
        f"sim.num_cpus_per_client = {per_cpu:g}, sim.num_gpus_per_client = {per_gpu:g}: Ray on "
        f"this machine has {cpus} CPU{'s' if cpus != 1 else ''}{capped} and {gpus} GPU"
        f"{'s' if gpus != 1 else ''}, not enough for one virtual client; accepted: "
        f"num_cpus_per_client ≤ {cpus}, num_gpus_per_client "
        + (f"≤ {gpus}" if gpus else "= 0 (no GPU here)")
        + ", or sim.ray_address for a Ray cluster that has them")


# Ray hides the GPUs from an actor that asks for none (CUDA_VISIBLE_DEVICES="") unless this
# is 0. A local simulation sets it to 0 (run_simulation) unless the environment says
# otherwise, so its virtual clients see the machine's GPUs with sim.num_gpus_per_client = 0.
RAY_GPU_ENV = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"


def unused_gpu_warning(cfg: RunConfig) -> str | None:
    """A GPU here that the virtual clients will not see: only when this environment sets
    RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO to hide the GPUs from actors that ask for none (with
    sim.num_gpus_per_client = 0 they would train on the CPU while the server evaluates on
    the GPU). By default a local simulation leaves them visible (RAY_GPU_ENV)."""
    import torch

    gpus = torch.cuda.device_count()
    if cfg.sim.ray_address or gpus == 0 or cfg.sim.num_gpus_per_client > 0:
        return None
    if os.environ.get(RAY_GPU_ENV, "0").lower() not in ("1", "true"):
        return None  # the actors keep CUDA_VISIBLE_DEVICES: they train on the GPU
    return (f"this machine has {gpus} GPU{'s' if gpus != 1 else ''}, but "
            f"{RAY_GPU_ENV}={os.environ[RAY_GPU_ENV]} in this environment makes Ray hide them "
            "from the virtual clients, which ask for none (sim.num_gpus_per_client = 0): they "
            "will train on the CPU; unset it, or set sim.num_gpus_per_client (1, or 0.25 for "
            "four clients per GPU) to train on the GPU")


RAY_CONNECT_TIMEOUT_S = 5.0


def check_ray_head(address: str) -> None:
    """Fail at start if nothing answers at the Ray cluster's address: Ray itself would try
    to reach it for minutes, and not always give up on SIGTERM."""
    host, port = split_host_port(address)
    try:
        socket.create_connection((host, port), RAY_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ValueError(f"sim.ray_address = {address!r}: no Ray cluster answers there "
                         f"({err.strerror or err}); start one with `ray start --head --port "
                         f"{port}`, or leave sim.ray_address unset to run on this machine"
                         ) from None


def check_model_fits(cfg: RunConfig) -> int:
    """Build the task's model once: a missing model package, or a train message over gRPC's
    limit, fails here with its own error (and a model converted on first use is cached
    before the virtual clients need it). Returns the bytes of one update."""
    from flwr.app import ArrayRecord

    from consortia.messages import check_message_size
    from consortia.tasks import BUILT_IN, get_task

    task = get_task(cfg.task, cfg.task_options())
    model = task.build_model(cfg.model.activation)
    if cfg.privacy.enabled:  # and one Opacus cannot make private
        check_dp_model(model, f"task {cfg.task!r}")
    if cfg.task not in BUILT_IN:  # an own task's records, as client join checks a site's
        check_own_task_records(task, model, cfg.data_dir)
    return check_message_size(ArrayRecord(task.travelling_weights(model)), f"task {cfg.task!r}")


def check_own_task_records(task, model, data_dir: str | None) -> None:
    """A registered task's training and test sets must fit its model (every label within
    its classes, a batch its model and loss take): else a client fails its rounds mid-run,
    or the server's evaluation stops the run, with the loss's words only."""
    from consortia.client.data import DataError, check_records

    data = task.load_data(data_dir)
    for which, records in (("training", data.train), ("test", data.test)):
        try:
            check_records(records, task, model)
        except DataError as err:
            raise ValueError(f"task {task.name!r}: its {which} set (load_data) does not fit "
                             f"its model: {err}") from None


def check_privacy_terms(cfg: RunConfig, sizes: list[int]) -> None:
    """Per virtual client (its partition's records): δ below 1/n; with an explicit σ one
    round within the budget (and a warning when not all planned rounds are), without one
    a σ that fits the planned rounds at all (privacy/dp/preflight.py)."""
    p = cfg.privacy
    if not p.enabled:
        return
    checked = set()  # clients of one size sample alike: one check each
    shortfalls = []  # (records, warning) of the sizes a fixed σ cannot carry to the end
    for i, n in enumerate(sizes):
        check_delta(p.delta, n, f"client {i}")
        if n in checked:
            continue
        checked.add(n)
        terms = dict(records=n, batch_size=cfg.batch_size, local_epochs=cfg.local_epochs,
                     mode=p.mode, epsilon_budget=p.epsilon_budget, delta=p.delta,
                     accountant=p.accountant, who=f"client {i}")
        if p.noise_multiplier is not None:
            check_first_round(noise_multiplier=p.noise_multiplier, **terms)
            short = partial_fit_warning(noise_multiplier=p.noise_multiplier,
                                        rounds=cfg.planned_rounds_per_client, **terms)
            if short is not None:
                shortfalls.append((n, short))
        else:
            check_budget_reachable(rounds=cfg.planned_rounds_per_client, **terms)
    if shortfalls:  # one warning: the smallest client runs out first
        short_sizes = {size for size, _ in shortfalls}
        behind = sum(size in short_sizes for size in sizes)
        short = min(shortfalls)[1]
        log.warning("%s (%d of the %d clients cannot pay for all their planned rounds)",
                    short, behind, len(sizes))


def start_checks(cfg: RunConfig) -> None:
    """What `cfg` must pass before Ray starts, beyond the schema: a partition that can be
    drawn, privacy terms that mean something for its clients' record counts, a Ray head
    that answers, a model that builds and whose messages gRPC accepts. `sim run` runs
    them, and `sim sweep` for every cell before the first one runs."""
    from consortia.simulations.faults import dropout_abort_warning
    from consortia.simulations.sites import partitions_for

    check_privacy_terms(cfg, [len(p) for p in partitions_for(cfg)])
    if cfg.sim.ray_address:
        check_ray_head(cfg.sim.ray_address)
    else:
        check_local_resources(cfg)
    check_model_fits(cfg)
    if cfg.secagg.enabled:
        from consortia.privacy.secagg.masks import check_stream_code_env

        check_stream_code_env()  # the clients' environment is this one
    # Choices an experiment may make: said, not refused.
    for warning in (dropout_abort_warning(cfg), inert_settings_warning(cfg),
                    unused_gpu_warning(cfg)):
        if warning is not None:
            log.warning(warning)


@contextmanager
def callers_sigterm_kept():
    """ray.init replaces the process's SIGTERM handler with sys.exit, which leaves Flower's
    threads waiting on actors that are gone (the process hangs). A caller that installed
    its own (sim run: record the run stopped, print the resume command) keeps it: Ray has
    no option for this, so its private helper is bypassed while the simulation runs."""
    import ray._private.utils as ray_utils

    ours = signal.getsignal(signal.SIGTERM)
    replace = getattr(ray_utils, "set_sigterm_handler", None)
    if not callable(ours) or replace is None:  # no handler of the caller's to keep
        yield
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = replace


def resume_checks(cfg: RunConfig, out_dir: Path) -> bool:
    """Before a resume, beyond prepare_out_dir's: the virtual clients' ledgers (they live in
    the results directory) hold what the run records; True when the run already finished."""
    from consortia.simulations.sites import check_ledgers_kept

    check_ledgers_kept(cfg, out_dir)
    return run_finished(cfg, out_dir)


def write_report_if_behind(out_dir: Path) -> None:
    """A finished run whose report.html is missing, or older than its summary.json (the
    process killed between the two): write it, from the results files."""
    from consortia.simulations.report import REPORT_FILE, write_report

    report, summary = out_dir / REPORT_FILE, out_dir / "summary.json"
    if not report.is_file() or report.stat().st_mtime_ns < summary.stat().st_mtime_ns:
        write_report(out_dir)


def run_simulation(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False,
                   on_round: RoundCallback | None = None, verbose: bool = False,
                   client_mods: list | None = None, store: RunStore | None = None,
                   on_status: Callable[[str], None] | None = None,
                   checked: bool = False) -> dict[str, Any]:
    """Run the federation described by `cfg`; return its summary (also in out_dir).

    `client_mods` are Flower client mods wrapped around every virtual client (fault
    injection uses them); like the ClientApp, an actor process reuses them for all the
    clients it serves (simulations/shipping.py), so they must keep no per-client state.
    `on_round` gets each round's metrics row as it is recorded; `on_status` a line when the
    checks are done and Ray starts.
    The run is recorded in `store` if given (the caller closes it), else in the store that
    `cfg.store.url` names (default: store.db in out_dir). `checked`: the caller has run
    start_checks(cfg) already (a sweep, for every cell before the first).
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Leaves the GPUs visible to actors that ask for none (Ray would set CUDA_VISIBLE_DEVICES
    # to "" for them): with sim.num_gpus_per_client = 0 every local client trains on cuda:0.
    # It also silences Ray's notice that this default is to change.
    os.environ.setdefault(RAY_GPU_ENV, "0")
    # Ray's driver would answer SIGTERM with a C++ stack dump and an abort (exit 134): the
    # caller's own handler (sim run records the run stopped and prints the resume command).
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    import flwr.simulation

    from consortia.client import build_client_app
    from consortia.server.server_app import build_server_app
    from consortia.simulations.dispatch import prompt_dispatch
    from consortia.simulations.faults import configured_mods
    from consortia.simulations.shipping import ShippedOnce
    from consortia.simulations.sites import SimulationSites

    started = time.monotonic()
    out_dir = Path(out_dir)
    if not checked:
        start_checks(cfg)
    # A store that cannot be opened fails here, before the results directory or Ray.
    own_store = store is None
    if store is None and cfg.store.url:
        store = RunStore(cfg.store.url)
    try:
        run_id = prepare_out_dir(cfg, out_dir, resume)
        finished = resume and resume_checks(cfg, out_dir)
    except BaseException:
        if own_store and store is not None:
            store.close()
        raise
    if finished:
        # Nothing to run; but a store that lost the run (its damaged file moved aside, as
        # the store's error says to) is given it again, from the results files.
        try:
            store = store or RunStore(default_store_url(out_dir))
            recorded = record_finished_run(store, cfg, out_dir, run_id)
        finally:
            if own_store and store is not None:
                store.close()
        if on_status is not None:
            on_status(f"already completed all {cfg.rounds} rounds: nothing to run"
                      + (f"; recorded it again in the run store {store.display_url}"
                         if recorded else ""))
        write_report_if_behind(out_dir)
        return json.loads((out_dir / "summary.json").read_text())
    store = store or RunStore(default_store_url(out_dir))
    if not verbose:
        # Flower warns that run_simulation is deprecated and that federated evaluation is
        # off (we evaluate on the server): both expected; our own log keeps its warnings.
        logging.getLogger("flwr").setLevel(logging.ERROR)
    if on_status is not None:
        on_status("starting Ray...")
    try:
        with prompt_dispatch(cfg.sim.dispatch == "prompt"), callers_sigterm_kept():
            flwr.simulation.run_simulation(
                server_app=build_server_app(cfg, out_dir, run_id=run_id, resume=resume,
                                            on_round=on_round, store=store),
                client_app=ShippedOnce(build_client_app(
                    SimulationSites(cfg, out_dir),
                    mods=configured_mods(cfg) + list(client_mods or []))),
                num_supernodes=cfg.clients,
                backend_config=backend_config(cfg),
            )
    finally:
        if own_store:
            store.close()
    summary_path = out_dir / "summary.json"
    if not summary_path.exists():
        raise SimulationFailed(f"the simulation ended without writing {summary_path}; see the log")
    summary = json.loads(summary_path.read_text())
    summary["wall_s"] = round(time.monotonic() - started, 2)  # this process, Ray's start included
    atomic_write_json(summary_path, summary)
    from consortia.simulations.report import write_report

    write_report(out_dir)
    return summary
