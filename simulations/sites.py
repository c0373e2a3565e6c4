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


class SimulationSites:
    """Picklable (it travels to Ray actors): builds the Site for a virtual node's context."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path):
        self.cfg = cfg
        self.state_root = Path(out_dir) / "clients"
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
