"""Virtual sites for a simulation: client i holds partition i of the task's training set.

A virtual client costs only its partition's indices and its ledger file between rounds:
the Site is rebuilt on each call from cached data, and the optimizer lives only for the
duration of one train call. What every virtual client of an actor process would build
alike is built once per process: the task's data and partitions, the Byzantine draw, and
the model instance each call loads the global weights into (every tensor that training
changes travels and is overwritten from the message; the rest are the task's frozen
pretrained weights, which a client checks by hash on every call).
"""

from __future__ import annotations

import sys
from functools import lru_cache, partial
from pathlib import Path

import cloudpickle
import numpy as np
import torch
from flwr.app import Context
from torch.utils.data import Subset

from consortia.client.site import Site, SitePrivacy
from consortia.config import RunConfig
from consortia.privacy.dp import PrivacyLedger
from consortia.privacy.dp.ledger import LEDGER_FILE
from consortia.server.directory import natural_key
from consortia.server.results import PARTICIPATION_FILE, read_jsonl
from consortia.server.run_dir import ResultsDirError
from consortia.simulations.faults import ByzantineUpdate, byzantine_clients
from consortia.simulations.partition import partition
from consortia.tasks import (
    BUILT_IN,
    TASKS,
    Task,
    TaskOptions,
    default_device,
    get_task,
    register_task,
)


@lru_cache(maxsize=4)
def partitions(task: str, options: TaskOptions, data_dir: str | None, clients: int, kind: str,
               alpha: float, seed: int, min_samples: int) -> tuple[np.ndarray, ...]:
    data = get_task(task, options).load_data(data_dir)
    if kind == "natural":
        return natural_clients(data.natural_clients, clients, seed)
    return tuple(partition(data.train_labels, clients, kind, alpha, seed, min_samples))


def natural_clients(found: tuple[np.ndarray, ...], clients: int, seed: int
                    ) -> tuple[np.ndarray, ...]:
    """`clients` of the data's own clients, drawn by the seed (all of them, in a seeded order)."""
    if clients > len(found):
        raise ValueError(f"clients = {clients}, but the task's data has {len(found)} natural "
                         f"clients; accepted: 1 ... {len(found)}")
    order = np.random.default_rng(seed).permutation(len(found))[:clients]
    return tuple(found[i] for i in order)


@lru_cache(maxsize=4)
def _built_model(task: str, options: TaskOptions, activation: str) -> torch.nn.Module:
    return get_task(task, options).build_model(activation)


def process_model(task: str, options: TaskOptions, activation: str) -> torch.nn.Module:
    """This process's instance of the task's model (see the module's docstring). Ray runs
    one call at a time in an actor, so no two clients use it at once."""
    model = _built_model(task, options, activation)
    model.zero_grad(set_to_none=True)  # no gradient of the previous client's call remains
    return model


def partitions_for(cfg: RunConfig) -> tuple[np.ndarray, ...]:
    p = cfg.partition
    return partitions(cfg.task, cfg.task_options(), cfg.data_dir, cfg.clients, p.kind, p.alpha,
                      cfg.seed, p.min_samples)


def pickle_module_by_value(task: Task) -> None:
    """Have cloudpickle (what ships the ClientApp to the actors) copy the code of the
    module that defines `task`'s model rather than name it for import."""
    build = task.build_model
    while isinstance(build, partial):
        build = build.func
    module = sys.modules.get(getattr(build, "__module__", None) or "")
    if module is not None and module.__name__ != "__main__":  # __main__ goes by value anyway
        cloudpickle.register_pickle_by_value(module)


CLIENTS_DIR = "clients"  # in the results directory: one state folder per virtual client


def check_ledgers_kept(cfg: RunConfig, out_dir: Path) -> None:
    """Before a resume: every virtual client that spent (its rows in participation.jsonl)
    still has a ledger holding at least that spend. A ledger missing, or older than the
    run's record of it, would restart or lower that client's ε."""
    recorded: dict[str, int] = {}  # client -> the most steps a row of it reports
    for row in read_jsonl(out_dir / PARTICIPATION_FILE):
        if row.get("dp_enabled") and row.get("steps"):
            recorded[row["client_id"]] = max(recorded.get(row["client_id"], 0), row["steps"])
    for client, steps in sorted(recorded.items(), key=lambda kv: natural_key(kv[0])):
        folder = out_dir / CLIENTS_DIR / client
        if not (folder / LEDGER_FILE).is_file():
            raise ResultsDirError(
                f"--resume: client {client} spent {steps} DP steps by the run's records, but "
                f"its ledger {folder / LEDGER_FILE} is missing: its ε would start again from "
                "0; restore the clients/ folder from a copy, or start a new --out")
        p = cfg.privacy
        kept = PrivacyLedger.open(folder, accountant=p.accountant, delta=p.delta,
                                  epsilon_budget=p.epsilon_budget).steps
        if kept < steps:
            raise ResultsDirError(
                f"--resume: client {client}'s ledger {folder / LEDGER_FILE} holds {kept} DP "
                f"steps, the run's records {steps}: it is older than the run; restore the "
                "clients/ folder from a copy, or start a new --out")


class SimulationSites:
    """Picklable (it travels to Ray actors): builds the Site for a virtual node's context."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path):
        self.cfg = cfg
        self.state_root = Path(out_dir) / CLIENTS_DIR
        # The task travels with us: one the caller registered (register_task) in this
        # process is unknown to a Ray actor's registry until registered there, and its
        # module may not be importable there (a script, a notebook): its code goes along.
        self.task = TASKS[cfg.task]
        if cfg.task not in BUILT_IN:
            pickle_module_by_value(self.task)

    def __call__(self, context: Context) -> Site:
        cfg = self.cfg
        if cfg.task not in TASKS:
            register_task(self.task)
        torch.set_num_threads(max(1, int(cfg.sim.num_cpus_per_client)))
        partition_id = int(context.node_config["partition-id"])
        task = get_task(cfg.task, cfg.task_options())
        indices = partitions_for(cfg)[partition_id]
        privacy = None
        if cfg.privacy.enabled:
            privacy = SitePrivacy(epsilon_budget=cfg.privacy.epsilon_budget,
                                  delta=cfg.privacy.delta, accountant=cfg.privacy.accountant)
        attack = None
        if partition_id in byzantine_clients(cfg.clients, cfg.faults.byzantine_fraction, cfg.seed):
            attack = ByzantineUpdate(cfg.faults.byzantine_kind, cfg.faults.byzantine_scale,
                                     seed=cfg.seed + partition_id)
        return Site(
            client_id=str(partition_id), task=task,
            dataset=Subset(task.load_data(cfg.data_dir).train, indices.tolist()),
            state_dir=self.state_root / str(partition_id), privacy=privacy,
            device=default_device(), tamper_update=attack,
            seeded_noise=True,  # a simulation is reproducible from its seed
            models=partial(process_model, cfg.task, cfg.task_options()))
