"""The client's privacy ledger: its ε spend across every round it joins, on its own disk.

The ledger persists the Opacus accountant's `state_dict` (its history of
(noise_multiplier, sample_rate, steps)), not a re-derived formula, so ε is always what
Opacus computes from the full history, across runs and process restarts. Every write is
atomic, and the spend is written before the update leaves the client.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opacus.accountants import IAccountant

from consortia.privacy.dp.accounting import accountant_state, epsilon_of, new_accountant
from consortia.privacy.storage import atomic_write_json

LEDGER_FILE = "privacy_ledger.json"
FORMAT_VERSION = 1


class LedgerMismatchError(ValueError):
    pass


@dataclass(frozen=True)
class BudgetDecision:
    allowed: bool
    epsilon_now: float
    epsilon_after: float
    epsilon_budget: float

    @property
    def reason(self) -> str:
        verdict = "within" if self.allowed else "exceeds"
        return (
            f"projected epsilon after this round {self.epsilon_after:.4f} {verdict} the budget "
            f"{self.epsilon_budget:.4f} (spent so far {self.epsilon_now:.4f})"
        )


class PrivacyLedger:
    def __init__(self, path: Path, accountant: str, delta: float, epsilon_budget: float,
                 state: dict[str, Any] | None = None, events: list[dict[str, Any]] | None = None):
        self.path = path
        self.accountant_kind = accountant
        self.delta = delta
        self.epsilon_budget = epsilon_budget
        self._state = state or accountant_state(new_accountant(accountant))
        self.events: list[dict[str, Any]] = events or []

    @classmethod
    def open(cls, state_dir: str | Path, *, accountant: str, delta: float,
             epsilon_budget: float) -> PrivacyLedger:
        """Load the ledger in `state_dir`, or start an empty one there.

        The accountant kind and δ are fixed for a ledger's life: ε values under different
        δ do not add up, so a mismatch is an error rather than a silent restart.
        """
        path = Path(state_dir) / LEDGER_FILE
        if not path.exists():
            return cls(path, accountant, delta, epsilon_budget)
        data = json.loads(path.read_text())
        if data.get("version") != FORMAT_VERSION:
            raise LedgerMismatchError(f"{path}: unknown ledger format {data.get('version')!r}")
        if data["accountant"] != accountant or data["delta"] != delta:
            raise LedgerMismatchError(
                f"{path} was kept with accountant={data['accountant']!r}, delta={data['delta']}; "
                f"this run asks for accountant={accountant!r}, delta={delta}. "
                "Use the ledger's settings or a new state directory."
            )
        return cls(path, accountant, delta, epsilon_budget, data["accountant_state"], data["events"])

    # -- reading -----------------------------------------------------------------------
    def accountant(self) -> IAccountant:
        """A fresh Opacus accountant holding this ledger's history."""
        return new_accountant(self.accountant_kind, self._state)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [tuple(h) for h in self._state["history"]]

    @property
    def epsilon(self) -> float:
        key = tuple(self.history)
        if getattr(self, "_epsilon_key", None) != key:  # an RDP evaluation costs ~0.1 s
            self._epsilon_key, self._epsilon = key, epsilon_of(self.accountant(), self.delta)
        return self._epsilon

    @property
    def steps(self) -> int:
        return sum(int(h[2]) for h in self._state["history"])

    def check_round(self, noise_multiplier: float, sample_rate: float, steps: int) -> BudgetDecision:
        """What ε would be after `steps` more DP-SGD steps, and whether that fits the budget."""
        projected = self.accountant()
        projected.history.append((noise_multiplier, sample_rate, steps))
        after = epsilon_of(projected, self.delta)
        return BudgetDecision(after <= self.epsilon_budget, self.epsilon, after, self.epsilon_budget)

    # -- writing -----------------------------------------------------------------------
    def record_spend(self, accountant: IAccountant, *, run_id: str, server_round: int) -> float:
        """Adopt the accountant's state after training and write it before anything is sent."""
        steps_before = self.steps
        self._state = accountant_state(accountant)
        epsilon = self.epsilon
        self.events.append({"time": time.time(), "run": run_id, "round": server_round,
                            "decision": "trained", "steps": self.steps - steps_before,
                            "epsilon": epsilon})
        self.save()
        return epsilon

    def record_refusal(self, decision: BudgetDecision, *, run_id: str, server_round: int) -> None:
        self.events.append({"time": time.time(), "run": run_id, "round": server_round,
                            "decision": "refused-budget", "steps": 0,
                            "epsilon": decision.epsilon_now,
                            "epsilon_projected": decision.epsilon_after})
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, {
            "version": FORMAT_VERSION,
            "accountant": self.accountant_kind,
            "delta": self.delta,
            "epsilon_budget": self.epsilon_budget,
            "accountant_state": self._state,
            "events": self.events,
        }, mode=0o600)
