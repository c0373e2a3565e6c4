"""User-level (client-level) DP: DP-FedAvg with fixed or adaptive clipping.

Each sampled client clips its whole update Δ_i to norm C. The server releases

    avg = (Σ_i clip(Δ_i) + N(0, (z_Δ·C)²)) / K

with K = clients_per_round, a fixed denominator so that adding or removing one client
changes the sum by at most C (McMahan et al. 2018). The noise is either added once by
the server (`noise_at = "server"`) or split among the clients (`"clients"`): each adds
N(0, (z_Δ·C)²/K), so the K shares sum to the full variance and, under secure
aggregation, the server never sees an un-noised sum. If only m < K clients contribute,
the realized noise multiplier is z_Δ·sqrt(m/K) and that is what the accountant records.

Adaptive clipping (Andrew et al. 2021): each client also reports whether its update
was within C (a bit b_i), centred: b_i − 1/2 (:func:`clip_indicator`); the server forms
b̃ = (Σ (b_i − 1/2) + N(0, σ_b²)) / K + 1/2 and moves C geometrically toward the target
quantile γ: C ← C·exp(−η_C·(b̃ − γ)). The count query costs privacy too; adding or
removing one client moves its sum by at most 1/2 (the reason for the centring), and
Andrew et al. show the pair is then equivalent to one Gaussian query with noise
multiplier z when z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2), which is what we use: the accountant sees
z, the update gets z_Δ.

Accounting: Opacus's RDP accountant for the sampled Gaussian mechanism, one step per
round, sampling rate q = K/N (clients are sampled uniformly without replacement; the
Poisson-sampling analysis is the standard approximation, as in DP-FedAvg).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from consortia.privacy.dp.accounting import epsilon_for


def update_noise_multiplier(z: float, count_noise: float | None) -> float:
    """z_Δ for the update when the clipped-count query (σ_b) shares the budget z."""
    if count_noise is None:
        return z
    if 2 * count_noise <= z:
        raise ValueError(
            f"user_dp.count_noise = {count_noise} is too small for noise_multiplier = {z}: "
            f"adaptive clipping needs 2·count_noise > noise_multiplier; accepted: "
            f"count_noise > {z / 2:g}")
    return (z ** -2 - (2 * count_noise) ** -2) ** -0.5


# --- the client's side -----------------------------------------------------------------

def clip_indicator(within: bool) -> float:
    """A client's term of the clipped count: b − 1/2 ∈ {−1/2, +1/2} (Andrew et al. 2021;
    TF Privacy's QuantileEstimatorQuery), so one client moves the sum by at most 1/2, the
    sensitivity update_noise_multiplier's (2σ_b)⁻² charges for. b ∈ {0, 1} would move it
    by 1, and the pair would cost more than the z accounted."""
    return float(within) - 0.5


def clip_update(delta: dict[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], bool]:
    """Δ scaled to norm at most `clip`, and whether it was already within it."""
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))
    within = norm <= clip
    factor = 1.0 if within else clip / norm
    return {k: t * factor for k, t in delta.items()}, within


def add_noise_share(delta: dict[str, torch.Tensor], std: float, generator: torch.Generator
                    ) -> dict[str, torch.Tensor]:
    if std <= 0:
        return delta
    return {k: t + std * torch.randn(t.shape, generator=generator, dtype=t.dtype)
            for k, t in delta.items()}


# --- the server's side -----------------------------------------------------------------

@dataclass
class UserLevelDP:
    noise_multiplier: float  # z, the budget-level multiplier the accountant sees
    clip: float  # C, the current clip (moves when adaptive)
    expected_clients: int  # K
    sample_rate: float  # q = K / N
    noise_at: str = "server"
    target_quantile: float | None = None  # γ; None: fixed clipping
    clip_lr: float = 0.2  # η_C
    count_noise: float | None = None  # σ_b; default K / 20 when adaptive
    history: list = field(default_factory=list)  # accountant history

    def __post_init__(self) -> None:
        if self.target_quantile is not None and self.count_noise is None:
            self.count_noise = self.expected_clients / 20  # Andrew et al.'s choice
        self.update_multiplier = update_noise_multiplier(
            self.noise_multiplier, self.count_noise if self.target_quantile is not None else None)

    @property
    def adaptive(self) -> bool:
        return self.target_quantile is not None

    def client_noise_std(self) -> float:
        """Each client's share of the update noise when it is split among the K clients."""
        if self.noise_at != "clients":
            return 0.0
        return self.update_multiplier * self.clip / math.sqrt(self.expected_clients)

    def client_count_noise_std(self) -> float:
        """Each client's share of the clipped-count noise (adaptive clipping, split noise)."""
        if self.noise_at != "clients" or not self.adaptive:
            return 0.0
        return self.count_noise / math.sqrt(self.expected_clients)

    def release(self, update_sum: dict[str, np.ndarray], within_count: float, contributors: int,
                rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The DP average update from the clipped sum; steps the accountant, adapts C.
        `within_count`: Σ clip_indicator(b_i) over the contributors (with their shares
        of the count noise when noise_at = "clients")."""
        k = self.expected_clients
        clip_used = self.clip
        if self.noise_at == "server":
            std = self.update_multiplier * clip_used
            noisy = {n: s + rng.normal(0.0, std, size=s.shape) for n, s in update_sum.items()}
            realized = self.noise_multiplier
        else:  # the shares are already in the sum; fewer contributors carry less noise
            noisy = update_sum
            realized = self.noise_multiplier * math.sqrt(min(contributors, k) / k)
        average = {n: s / k for n, s in noisy.items()}
        if self.history and self.history[-1][:2] == (realized, self.sample_rate):
            # Same mechanism as last round: one entry with more steps, as Opacus keeps it
            # (an RDP evaluation costs per entry).
            self.history[-1] = (realized, self.sample_rate, self.history[-1][2] + 1)
        else:
            self.history.append((realized, self.sample_rate, 1))

        metrics: dict[str, Any] = {"user_clip": clip_used, "user_noise_multiplier": realized}
        if self.adaptive:
            if self.noise_at == "server":
                within_count += rng.normal(0.0, self.count_noise)
            noisy_fraction = within_count / k + 0.5  # the indicators are centred
            self.clip = clip_used * math.exp(-self.clip_lr * (noisy_fraction - self.target_quantile))
            metrics["user_within_clip_fraction"] = noisy_fraction
        return average, metrics

    def epsilon(self, delta: float) -> float:
        return epsilon_for("rdp", self.history, delta)

    def state_dict(self) -> dict[str, Any]:
        """The clip and the accountant's history: all a resume needs."""
        return {"clip": self.clip, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip = float(state["clip"])
        self.history = [tuple(h) for h in state["history"]]
