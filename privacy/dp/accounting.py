"""Opacus accountants, created by name, and the noise multiplier for a planned budget."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from opacus.accountants import IAccountant, create_accountant
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


def epsilon_of(accountant: IAccountant, delta: float) -> float:
    if not accountant.history:
        return 0.0
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
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon_budget,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=kind,
                epsilon_tolerance=0.005,
            )
        )
    except ValueError as err:
        raise ValueError(
            f"no noise multiplier fits epsilon_budget={epsilon_budget} at delta={delta} over "
            f"{steps} steps at sample rate {sample_rate:.4g}: {err}"
        ) from None
