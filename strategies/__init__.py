"""Aggregation rules, selected by `strategy.name`.

Thin adapters over `flwr.serverapp.strategy`: where Flower has the rule we import and
configure it; we write our own only where it has none.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, Strategy

from consortia.config import RunConfig
from consortia.messages import ARRAYS, CONFIG, NUM_EXAMPLES

# Rules that look at each client's update; secure aggregation gives only the sum.
NEEDS_INDIVIDUAL_UPDATES = frozenset({"krum", "multikrum", "median", "trimmed-mean", "bulyan"})


def build_strategy(cfg: RunConfig) -> Strategy:
    """The configured strategy, sampling `clients_per_round` of `clients` for training.

    Evaluation runs on the server's held-out set, so federated evaluation is off.
    """
    common = dict(
        fraction_train=cfg.clients_per_round / cfg.clients,
        min_train_nodes=cfg.clients_per_round,
        min_available_nodes=cfg.clients,
        fraction_evaluate=0.0,
        min_evaluate_nodes=0,
        weighted_by_key=NUM_EXAMPLES,
        arrayrecord_key=ARRAYS,
        configrecord_key=CONFIG,
    )
    if cfg.strategy.name == "fedavg":
        return FedAvg(**common)
    raise ValueError(f"unknown strategy {cfg.strategy.name!r}; accepted: fedavg")
