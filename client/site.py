"""A site: who this client is, the task and data it serves, where its state lives."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from consortia.client.policy import AuditLog, SitePolicy
from consortia.privacy.dp import PrivacyLedger
from consortia.privacy.dp.ledger import held
from consortia.tasks import Task


@dataclass(frozen=True)
class SitePrivacy:
    """The site's own privacy terms: they bind whatever the server asks."""

    epsilon_budget: float
    delta: float
    accountant: str = "rdp"
    require_dp: bool = True
    # Distributed DP: the most ε this site accepts should secure aggregation fail (its
    # own noise shares alone); None: no cap beyond epsilon_budget on the first guarantee.
    max_epsilon_if_secagg_fails: float | None = None


@dataclass
class Site:
    client_id: str
    task: Task
    dataset: Dataset
    state_dir: Path
    privacy: SitePrivacy | None
    device: torch.device
    # A transformation of the trained weights before they leave, given (global, trained,
    # round). Simulations use it to play Byzantine clients; a real site leaves it unset.
    tamper_update: Callable[[dict, dict, int], dict] | None = None
    # A deployed site's policy and audit log (client/policy.py); simulations leave them unset.
    policy: SitePolicy | None = None
    audit: AuditLog | None = None
    # Where a deployed site keeps its secure-aggregation session (None: the node's context).
    secagg_state: Path | None = None
    # Draw the rounds' randomness (sampling, DP noise) from seeds the run's config gives
    # (simulations: reproducible runs). A real site leaves it False: the server knows those
    # seeds, and could recompute the batches and subtract the noise (trainer.round_seed).
    seeded_noise: bool = False
    # The model a request's weights are loaded into, by activation: None builds a fresh
    # one for every request. A simulation passes its actor process's instance, shared by
    # the virtual clients that process serves (simulations/sites.py).
    models: Callable[[str], torch.nn.Module] | None = None

    def model(self, activation: str) -> torch.nn.Module:
        """The task's model for one request, before the request's weights are loaded."""
        if self.models is not None:
            return self.models(activation)
        return self.task.build_model(activation)

    def open_ledger(self) -> PrivacyLedger | None:
        if self.privacy is None:
            return None
        return PrivacyLedger.open(self.state_dir, accountant=self.privacy.accountant,
                                  delta=self.privacy.delta,
                                  epsilon_budget=self.privacy.epsilon_budget)

    def ledger_held(self, dp_enabled: bool) -> AbstractContextManager[None]:
        """Held around a DP request, from reading the ledger to spending it (ledger.held)."""
        if self.privacy is None or not dp_enabled:
            return nullcontext()
        return held(self.state_dir)

    def policy_refusal(self, task: str, dp_enabled: bool) -> str | None:
        """Why this site will not run the request, or None when it will."""
        if task != self.task.name:
            return f"task {task!r} is not the task this site serves ({self.task.name!r})"
        if self.privacy is not None and self.privacy.require_dp and not dp_enabled:
            return "this site trains only with differential privacy and the request has it off"
        if dp_enabled and self.privacy is None:
            return "the request asks for DP but this site has no privacy terms (budget, delta)"
        return None
