"""The client's privacy ledger: its ε spend across every round it joins, on its own disk.

The ledger persists the Opacus accountant's `state_dict` (its history of
(noise_multiplier, sample_rate, steps)), not a re-derived formula, so ε is always what
Opacus computes from the full history, across runs and process restarts. Every write is
atomic, and the spend is written before the update leaves the client. A request's read,
check and spend happen under :func:`held`, an exclusive lock on the state directory, so
two processes serving one site (two federations, or a second `client join`) cannot both
spend from the same starting balance and keep only one spend.
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opacus.accountants import IAccountant

from consortia.privacy.display import epsilon_text
from consortia.privacy.dp.accounting import accountant_state, epsilon_for, epsilon_of, new_accountant
from consortia.privacy.storage import atomic_write_json

LEDGER_FILE = "privacy_ledger.json"
LOCK_FILE = "privacy_ledger.lock"
FORMAT_VERSION = 1
log = logging.getLogger(__name__)


@contextmanager
def held(state_dir: str | Path) -> Iterator[None]:
    """Hold the ledger in `state_dir` for one request, from its read to its spend.

    An exclusive ``flock`` on a lock file beside the ledger (the OS drops it if the process
    dies). A second process serving the same site waits here, and then reads the spend
    the first one wrote: the ledger's atomic writes alone would let both start from the
    same balance, and the later write would drop the earlier spend."""
    path = Path(state_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("the privacy ledger in %s is in use by another request of this site "
                        "(another process); waiting for it", state_dir)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
        # Rounded up: to the nearest, 3.00004 "exceeds the budget 3.0000" read as 3.0000.
        return (
            f"projected epsilon after this round {epsilon_text(self.epsilon_after, 4)} {verdict} "
            f"the budget {self.epsilon_budget:.4f} (spent so far "
            f"{epsilon_text(self.epsilon_now, 4)})"
        )


def _merged(history: list, entry: tuple[float, float, int]) -> list:
    """`history` with `entry` added; a repeat of the last (σ, q) adds steps, as Opacus does
    (ε is evaluated per entry, so a run of one-step rounds stays one entry)."""
    history = [list(h) for h in history]
    if history and tuple(history[-1][:2]) == tuple(entry[:2]):
        history[-1][2] += entry[2]
    else:
        history.append(list(entry))
    return history


class PrivacyLedger:
    """A client's ε, on its own disk.

    Distributed DP (privacy/dp/distributed.py) keeps two accounts: `epsilon`, against
    the server and everyone else while secure aggregation holds (the noise of ≥ t shares),
    and `epsilon_if_secagg_fails`, from this client's own noise share alone. Both are
    spent when the masked share leaves (`spend_share`).
    """

    def __init__(self, path: Path, accountant: str, delta: float, epsilon_budget: float,
                 state: dict[str, Any] | None = None, events: list[dict[str, Any]] | None = None,
                 fallback: dict[str, Any] | None = None, pending: dict[str, Any] | None = None):
        self.path = path
        self.accountant_kind = accountant
        self.delta = delta
        self.epsilon_budget = epsilon_budget
        self._state = state or accountant_state(new_accountant(accountant))
        self.events: list[dict[str, Any]] = events or []
        # Distributed DP: the own-share account.
        self._fallback = fallback or accountant_state(new_accountant(accountant))
        if pending:
            self._count_pending(pending)
        self._count_abandoned()

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
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise LedgerMismatchError(
                f"{path} cannot be read ({err}): it holds this client's privacy spend, so the "
                "client trains nothing until it is restored from a copy") from None
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            version = data.get("version") if isinstance(data, dict) else None
            raise LedgerMismatchError(f"{path}: unknown ledger format {version!r}")
        if data["accountant"] != accountant or data["delta"] != delta:
            raise LedgerMismatchError(
                f"{path} was kept with accountant={data['accountant']!r}, delta={data['delta']}; "
                f"this run asks for accountant={accountant!r}, delta={delta}. "
                "Use the ledger's settings or a new state directory."
            )
        return cls(path, accountant, delta, epsilon_budget, data["accountant_state"], data["events"],
                   data.get("fallback_state"), data.get("pending"))

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
    def epsilon_if_secagg_fails(self) -> float | None:
        """ε from this client's own noise shares alone (distributed DP); None otherwise."""
        history = self._fallback["history"]
        if not history:
            return None
        return epsilon_for(self.accountant_kind, [tuple(h) for h in history], self.delta)

    def fallback_after(self, entry: tuple[float, float, int]) -> float:
        """What `epsilon_if_secagg_fails` would be after one more own-share `entry`."""
        history = _merged(self._fallback["history"], entry)
        return epsilon_for(self.accountant_kind, [tuple(h) for h in history], self.delta)

    @property
    def steps(self) -> int:
        return sum(int(h[2]) for h in self._state["history"])

    def check_round(self, noise_multiplier: float, sample_rate: float, steps: int) -> BudgetDecision:
        """What ε would be after `steps` more DP-SGD steps, and whether that fits the budget.
        The history projected is the one the spend leaves (Opacus's accountant, like
        `_merged`, folds a repeat of the last (σ, q) into its entry: PRV's ε of the two
        histories differs in the last digits, enough to pass a budget met exactly)."""
        projected = self.accountant()
        projected.history = [tuple(h) for h in _merged(
            self._state["history"], (noise_multiplier, sample_rate, steps))]
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

    def spend_share(self, entry: tuple[float, float, int], own_entry: tuple[float, float, int],
                    *, run_id: str, server_round: int) -> None:
        """Distributed DP, before the masked share leaves: spend both accounts. `entry`
        is the sum's (≥ t shares, secure aggregation holding), `own_entry` this share's
        alone (should secure aggregation fail). Both are spent now, not when the sum is
        unmasked: the server needs only t answers, not this client's, to reveal a sum
        that holds its share; a round abandoned before unmasking is spent all the same."""
        self._fallback = {**self._fallback,
                          "history": _merged(self._fallback["history"], own_entry)}
        self._charge(entry, run_id, server_round,
                     epsilon_if_secagg_fails=self.epsilon_if_secagg_fails)
        self.save()

    def _charge(self, entry: tuple[float, float, int], run: str, server_round: int,
                **said: Any) -> None:
        """Add `entry` to the main account, with its "trained" event (saved by the caller)."""
        self._state = {**self._state, "history": _merged(self._state["history"], entry)}
        self.events.append({"time": time.time(), "run": run, "round": server_round,
                            "decision": "trained", "steps": int(entry[2]),
                            "epsilon": self.epsilon, **said})

    def _count_pending(self, pending: dict[str, Any]) -> None:
        """A ledger written by an earlier version held a sent share's spend until its
        unmasking: the share may have been revealed without this client, so it counts."""
        self._charge(tuple(pending["entry"]), pending["run"], pending["round"],
                     note="a share sent before this version, counted as spent")
        self.save()

    def _count_abandoned(self) -> None:
        """An earlier version released a sent share whose round it saw no unmask request
        for ("abandoned"); the server may have revealed it without this client. What the
        sum's entry was is not in the event, so it is charged as this client's own share
        alone (the least noise it had, at the highest rate): more ε than the sum's, never
        less. Each such event is counted once."""
        owed = [e for e in self.events if e.get("decision") == "abandoned" and not e.get("counted")]
        own = self._fallback["history"]
        if not owed or not own:
            return
        entry = (min(h[0] for h in own), max(h[1] for h in own), 1)
        for e in owed:
            e["counted"] = True
            self._charge(entry, e["run"], e["round"], note="a share an earlier version "
                         "released, counted as spent at its own-share noise")
        self.save()

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
            "fallback_state": self._fallback,
        }, mode=0o600)
