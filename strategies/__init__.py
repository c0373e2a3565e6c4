"""Aggregation rules, selected by `strategy.name`.

Thin adapters over `flwr.serverapp.strategy`: Flower has every rule offered here, so
each is imported and configured, not copied. Server optimizers (FedAvgM, FedAdam,
FedYogi, FedAdagrad) work on the aggregated update, so they stay compatible with secure
aggregation; the robust rules look at each update and are refused with it. Krum,
multi-Krum and trimmed-mean are Flower's with one guard added: a round with fewer valid
updates than the rule needs keeps the global model (as Flower's Bulyan does); Krum,
multi-Krum and Bulyan score updates with exact float64 distances (krum_distances).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from inspect import signature
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
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
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from consortia.messages import ARRAYS, CONFIG, NUM_EXAMPLES

log = logging.getLogger("consortia.server")


def trimmed_mean_needs(beta: float) -> int:
    """The fewest updates from which trimmed-mean (Flower's: int(beta * n) cut from each
    end) cuts one; beta = 0 is the plain mean, asked for."""
    if beta <= 0:
        return 1
    # ceil(1 / beta), stepped past a product that float rounding leaves just below 1 (a
    # count, not a loop from 1: strategy.beta may be as small as the user likes).
    n = max(1, math.ceil(1 / beta))
    while int(beta * n) < 1:
        n += 1
    return n


class _NeedsEnoughReplies:
    """A robust rule given fewer updates than its guarantee needs (clients dropped or were
    rejected this round) keeps the global model for the round, with a warning, as
    Flower's Bulyan does: Flower's Krum would score each update on fewer neighbours (two
    colluding attackers out of f = 2 then win with 5 replies), and its trimmed mean would
    cut nothing and be the plain mean."""

    rule = ""  # strategy.name
    # A subclass (or a mixin after this one, _ExactKrum) defines replies_needed() ->
    # (the fewest valid updates, why), which aggregate_train asks.

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        got = sum(not reply.has_error() for reply in replies)
        needed, why = self.replies_needed()
        if got < needed:
            log.warning("round %d: %d valid update(s), %s needs at least %d (%s): the global "
                        "model stays as it was this round", server_round, got, self.rule,
                        needed, why)
            return None, None
        return super().aggregate_train(server_round, replies)


def krum_distances(records: list[ArrayRecord]) -> np.ndarray:
    """Squared L2 distances between the updates, in float64 and pair by pair.

    Flower's compute_distances takes ‖a‖² + ‖b‖² − 2a·b in the weights' own dtype: for a
    float16 model the squared norms overflow to inf and every distance is NaN (its Krum
    then keeps the first reply, attacker or not), and in float32 the difference of large
    norms loses the small distances between close updates."""
    flat = [np.concatenate([a.ravel() for a in record.to_numpy_ndarrays()]).astype(np.float64)
            for record in records]
    n = len(flat)
    distances = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            distances[i, j] = distances[j, i] = float(np.sum((flat[i] - flat[j]) ** 2))
    return distances


def select_multikrum(contents: list[RecordDict], num_malicious_nodes: int,
                     num_nodes_to_select: int) -> list[RecordDict]:
    """Flower's select_multikrum (Blanchard et al. 2017: each update's score is the sum of
    its squared distances to its n − f − 2 nearest others; the lowest scores are kept)
    with exact distances (krum_distances); ties go to the earlier reply (client order)."""
    key = list(contents[0].array_records.keys())[0]
    distances = krum_distances([content[key] for content in contents])
    n = len(contents)
    closest = max(1, n - num_malicious_nodes - 2)
    scores = [np.sort(np.delete(distances[i], i))[:closest].sum() for i in range(n)]
    best = np.argsort(scores, kind="stable")[:num_nodes_to_select]
    return [contents[i] for i in best]


class _ExactKrum:
    """Flower's MultiKrum.aggregate_train with select_multikrum above; Krum's guarantee
    needs 2f + 3 updates."""

    def replies_needed(self) -> tuple[int, str]:
        f = self.num_malicious_nodes
        return 2 * f + 3, f"2f + 3 with num_malicious f = {f}"

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        selected = select_multikrum([msg.content for msg in valid], self.num_malicious_nodes,
                                    self.num_nodes_to_select)
        return (aggregate_arrayrecords(selected, self.weighted_by_key),
                self.train_metrics_aggr_fn(selected, self.weighted_by_key))


class GuardedKrum(_NeedsEnoughReplies, _ExactKrum, Krum):
    rule = "krum"


class GuardedMultiKrum(_NeedsEnoughReplies, _ExactKrum, MultiKrum):
    rule = "multikrum"


class ExactBulyan(Bulyan):
    """Flower's Bulyan, its Multi-Krum selection with exact distances."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Set here, not through __init__'s selection_rule: the class keeps Flower's
        # signature, whose defaults configuration.md states.
        self.selection_rule = select_multikrum
        return super().aggregate_train(server_round, replies)


class GuardedTrimmedAvg(_NeedsEnoughReplies, FedTrimmedAvg):
    rule = "trimmed-mean"

    def replies_needed(self) -> tuple[int, str]:
        return (trimmed_mean_needs(self.beta),
                f"to cut int(beta * n) >= 1 from each end with beta = {self.beta}")


# name -> (Flower class, {our parameter: Flower's argument})
RULES: dict[str, tuple[type[Strategy], dict[str, str]]] = {
    "fedavg": (FedAvg, {}),
    "fedavgm": (FedAvgM, {"server_lr": "server_learning_rate", "server_momentum": "server_momentum"}),
    "fedprox": (FedProx, {"mu": "proximal_mu"}),
    "fedadam": (FedAdam, {"server_lr": "eta", "beta_1": "beta_1", "beta_2": "beta_2", "tau": "tau"}),
    "fedyogi": (FedYogi, {"server_lr": "eta", "beta_1": "beta_1", "beta_2": "beta_2", "tau": "tau"}),
    "fedadagrad": (FedAdagrad, {"server_lr": "eta", "tau": "tau"}),
    "krum": (GuardedKrum, {"num_malicious": "num_malicious_nodes"}),
    "multikrum": (GuardedMultiKrum, {"num_malicious": "num_malicious_nodes",
                              "num_selected": "num_nodes_to_select"}),
    "median": (FedMedian, {}),
    "trimmed-mean": (GuardedTrimmedAvg, {"beta": "beta"}),
    "bulyan": (ExactBulyan, {"num_malicious": "num_malicious_nodes"}),
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
    beta = params.get("beta", signature(FedTrimmedAvg).parameters["beta"].default)  # Flower's
    if name == "trimmed-mean" and n < trimmed_mean_needs(beta):
        raise ValueError(f"trimmed-mean with strategy.beta = {beta} cuts int({beta} * {n}) = 0 "
                         f"updates from each end of clients_per_round = {n}: it would be the "
                         f"plain mean; needs clients_per_round >= {trimmed_mean_needs(beta)} "
                         f"or strategy.beta >= 1/{n} (or 0, for the mean)")
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
