"""Aggregation rules, selected by `strategy.name`.

Thin adapters over `flwr.serverapp.strategy`: Flower has every rule offered here, so
each is imported and configured, not copied. Server optimizers (FedAvgM, FedAdam,
FedYogi, FedAdagrad) work on the aggregated update, so they stay compatible with secure
aggregation; the robust rules look at each update and are refused with it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from consortia.messages import ARRAYS, CONFIG, NUM_EXAMPLES

# name -> (Flower class, {our parameter: Flower's argument})
RULES: dict[str, tuple[type[Strategy], dict[str, str]]] = {
    "fedavg": (FedAvg, {}),
    "fedavgm": (FedAvgM, {"server_lr": "server_learning_rate", "server_momentum": "server_momentum"}),
    "fedprox": (FedProx, {"mu": "proximal_mu"}),
    "fedadam": (FedAdam, {"server_lr": "eta", "beta_1": "beta_1", "beta_2": "beta_2", "tau": "tau"}),
    "fedyogi": (FedYogi, {"server_lr": "eta", "beta_1": "beta_1", "beta_2": "beta_2", "tau": "tau"}),
    "fedadagrad": (FedAdagrad, {"server_lr": "eta", "tau": "tau"}),
    "krum": (Krum, {"num_malicious": "num_malicious_nodes"}),
    "multikrum": (MultiKrum, {"num_malicious": "num_malicious_nodes",
                              "num_selected": "num_nodes_to_select"}),
    "median": (FedMedian, {}),
    "trimmed-mean": (FedTrimmedAvg, {"beta": "beta"}),
    "bulyan": (Bulyan, {"num_malicious": "num_malicious_nodes"}),
}

# Rules that look at each client's update; secure aggregation gives only the sum.
NEEDS_INDIVIDUAL_UPDATES = frozenset({"krum", "multikrum", "median", "trimmed-mean", "bulyan"})


def check_strategy(name: str, params: dict[str, Any], clients_per_round: int) -> None:
    """Fail at start on a parameter the rule does not take or a count it cannot work with."""
    if name not in RULES:
        raise ValueError(f"unknown strategy {name!r}; accepted: {', '.join(RULES)}")
    accepted = RULES[name][1]
    for key in params:
        if key not in accepted:
            takes = ", ".join(f"strategy.{k}" for k in accepted) or "no parameters"
            raise ValueError(f"strategy.{key} does not apply to {name!r} (it takes {takes})")
    f = params.get("num_malicious", 0)
    n = clients_per_round
    if name in ("krum", "multikrum") and n < 2 * f + 3:
        raise ValueError(f"{name} with strategy.num_malicious = {f} needs clients_per_round >= "
                         f"2f + 3 = {2 * f + 3}, got {n}")
    if name == "bulyan" and n < 4 * f + 3:
        raise ValueError(f"bulyan with strategy.num_malicious = {f} needs clients_per_round >= "
                         f"4f + 3 = {4 * f + 3}, got {n}")
    if name == "multikrum" and params.get("num_selected", 1) > n:
        raise ValueError(f"strategy.num_selected = {params['num_selected']} exceeds "
                         f"clients_per_round = {n}")


def build_strategy(cfg) -> Strategy:
    """The configured rule, sampling `clients_per_round` of `clients` for training.

    Evaluation runs on the server's held-out set, so federated evaluation is off.
    """
    name, params = cfg.strategy.name, cfg.strategy.parameters()
    check_strategy(name, params, cfg.clients_per_round)
    cls, mapping = RULES[name]
    kwargs = {mapping[k]: v for k, v in params.items()}
    return cls(
        fraction_train=cfg.clients_per_round / cfg.clients,
        min_train_nodes=cfg.clients_per_round,
        min_available_nodes=cfg.clients,
        fraction_evaluate=0.0,
        min_evaluate_nodes=0,
        weighted_by_key=NUM_EXAMPLES,
        arrayrecord_key=ARRAYS,
        configrecord_key=CONFIG,
        **kwargs,
    )


# A server optimizer's state, which a checkpoint keeps so that a resumed run goes on as
# the run would have: FedAvgM's momentum (a list in the order of the model's tensors),
# FedAdam's, FedYogi's and FedAdagrad's moments (by tensor name). By "<slot>/<name>".
MOMENTS = ("m_t", "v_t")


def optimizer_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The rule's state that a resume needs ({} for a rule that keeps none)."""
    state: dict[str, np.ndarray] = {}
    if isinstance(strategy, FedAvgM) and strategy.momentum_vector is not None:
        names = list(strategy.current_arrays.keys())
        state |= {f"momentum_vector/{name}": np.asarray(value)
                  for name, value in zip(names, strategy.momentum_vector, strict=True)}
    if isinstance(strategy, FedOpt):
        for slot in MOMENTS:
            state |= {f"{slot}/{name}": np.asarray(value)
                      for name, value in (getattr(strategy, slot, None) or {}).items()}
    return state


def load_optimizer_state(strategy: Strategy, state: dict[str, np.ndarray],
                         names: list[str]) -> None:
    """Give the rule back the state `optimizer_state` took; `names`: the model's tensors in
    the order the run holds them (FedAvgM's momentum is a list in that order)."""
    def slot_of(slot: str) -> dict[str, np.ndarray]:
        return {key.split("/", 1)[1]: value for key, value in state.items()
                if key.startswith(f"{slot}/")}

    momentum = slot_of("momentum_vector")
    if isinstance(strategy, FedAvgM) and momentum:
        strategy.momentum_vector = [momentum[name] for name in names]
    if isinstance(strategy, FedOpt):
        for slot in MOMENTS:
            if moments := slot_of(slot):
                setattr(strategy, slot, moments)
