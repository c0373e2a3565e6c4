"""Opacus accountants, created by name, and the noise multiplier for a planned budget."""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import Any

import numpy as np
from opacus.accountants import IAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")


def new_accountant(kind: str, state: dict[str, Any] | None = None) -> IAccountant:
    if kind not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {kind!r}; accepted: {', '.join(ACCOUNTANTS)}")
    accountant = create_accountant(mechanism=kind)
    if state:
        # JSON turns the history's tuples into lists; Opacus compares them as tuples.
        history = [tuple(entry) for entry in state["history"]]
        accountant.load_state_dict({"history": history, "mechanism": state["mechanism"]})
    return accountant


def accountant_state(accountant: IAccountant) -> dict[str, Any]:
    state = accountant.state_dict()
    return {"history": [list(entry) for entry in state["history"]], "mechanism": state["mechanism"]}


@lru_cache(maxsize=4096)
def _rdp_one_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    # Opacus's compute_rdp(q, σ, steps) is this vector times `steps`; a client's ledger
    # re-evaluates the same (σ, q) every round, and each evaluation costs ~0.1 s.
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                      orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp.setflags(write=False)
    return rdp


def epsilon_of(accountant: IAccountant, delta: float) -> float:
    if not accountant.history:
        return 0.0
    if isinstance(accountant, RDPAccountant):
        # Exactly RDPAccountant.get_epsilon (same functions, orders and sum), with the
        # per-step RDP of each (σ, q) cached.
        rdp = sum([_rdp_one_step(q, sigma) * steps for sigma, q, steps in accountant.history])
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    return float(accountant.get_epsilon(delta=delta))


def epsilon_for(kind: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """ε of a history of (noise_multiplier, sample_rate, steps) entries."""
    accountant = new_accountant(kind)
    accountant.history = [tuple(h) for h in history]
    return epsilon_of(accountant, delta)


@lru_cache(maxsize=256)  # a pure function; each call runs ~15 accountant evaluations
def noise_for_budget(
    epsilon_budget: float, delta: float, sample_rate: float, steps: int, kind: str = "rdp"
) -> float:
    """The smallest σ (within Opacus's search tolerance) such that `steps` steps at
    `sample_rate` stay within `epsilon_budget` at `delta`."""
    try:
        # Opacus's search tries σ up to its MAX_SIGMA; at such σ the best RDP order is the
        # largest of the default orders, and Opacus warns for each such probe. The probes
        # are not the answer (the ε the ledger reports for the σ found uses the same orders).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            sigma = get_noise_multiplier(target_epsilon=epsilon_budget, target_delta=delta,
                                         sample_rate=sample_rate, steps=steps, accountant=kind,
                                         epsilon_tolerance=0.005)
        return float(sigma)
    except ValueError as err:
        raise ValueError(
            f"no noise multiplier fits epsilon_budget={epsilon_budget} at delta={delta} over "
            f"{steps} steps at sample rate {sample_rate:.4g}: {err}"
        ) from None


def round_steps(records: int, batch_size: int, local_epochs: int, mode: str
                ) -> tuple[float, int]:
    """(sampling rate, DP steps) of one round for a holder of `records` records: the one
    rule the trainers (client/trainer.py, client/distributed.py) and the start checks use."""
    if mode == "distributed":  # one step per round at q = B/n
        return min(1.0, batch_size / records), 1
    # Opacus's Poisson loader samples at 1/ceil(n/B) and takes int(1 / that rate) steps an
    # epoch: one fewer where the division rounds down (93 batches: 92 steps), and
    # make_private's accountant then charges rate 1/len(loader) = 1/92, more than the loader
    # samples at. The ledger holds what that accountant charges, so this is the rule.
    per_epoch = int(1 / (1.0 / math.ceil(records / batch_size)))
    return 1.0 / per_epoch, per_epoch * local_epochs
