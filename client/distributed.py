"""Distributed DP on the client: one DP-SGD step's clipped gradient sum with a noise share.

The mechanism and its analysis are in privacy/dp/distributed.py. This is the client's
round: size σ (as instructed or from the budget, never below the round's floor), ask the
ledger, Poisson-sample the records (Opacus's sampler), compute per-example gradients
(Opacus's GradSampleModule), round and sum them with a Skellam share, and spend before
the share leaves.
Only secure aggregation ever carries the result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import Dataset, default_collate

from consortia.client.trainer import round_seed, seed_generators
from consortia.messages import TrainInstructions, TrainReport
from consortia.privacy.display import epsilon_text
from consortia.privacy.dp import PrivacyLedger, noise_for_budget, round_steps
from consortia.privacy.dp.distributed import NoiseShare, noisy_integer_sum, to_ring
from consortia.tasks import Task


@dataclass
class DistributedStep:
    client_id: str
    task: Task
    dataset: Dataset
    ledger: PrivacyLedger
    device: torch.device
    # Site policy: the most ε_if_secagg_fails this site accepts (None: no cap).
    max_epsilon_if_secagg_fails: float | None = None
    # Simulations draw the round's sample and noise from a seed for reproducible runs; a
    # real site must not (round_seed), and draws them from OS entropy.
    seeded_noise: bool = False

    def sample_rate(self, batch_size: int) -> float:
        """q = expected batch / records: the rate the sampler uses and the ledger records."""
        return round_steps(len(self.dataset), batch_size, 1, "distributed")[0]

    def target(self, ins: TrainInstructions) -> float:
        """The σ of the sum that fits this client's budget over the planned rounds."""
        return noise_for_budget(self.ledger.epsilon_budget, self.ledger.delta,
                                self.sample_rate(ins.batch_size), ins.planned_rounds,
                                self.ledger.accountant_kind)

    def noise_share(self, ins: TrainInstructions, share: NoiseShare) -> NoiseShare:
        """This client's share: σ as instructed, or sized so that the charged σ̂ fits the
        planned rounds (the last planned round is then not refused by a hair); never below
        the round's floor, which is all it counts on from the others (`share` carries it)."""
        if ins.noise_multiplier is not None:
            return replace(share, noise_multiplier=max(ins.noise_multiplier,
                                                       share.floor_multiplier))
        return share.sized_for(self.target(ins))

    def sum_sigma(self, ins: TrainInstructions, floor: float, threshold: int) -> float:
        """σ of the thinnest sum that may hold this client's share (its share and t − 1 at
        the floor), the noise that protects it, before the Skellam correction."""
        if ins.noise_multiplier is None:  # the share is topped up to the target
            return max(floor, self.target(ins))
        own = max(ins.noise_multiplier, floor)
        return ((own * own + (threshold - 1) * floor * floor) / threshold) ** 0.5

    def run(self, model: torch.nn.Module, ins: TrainInstructions, server_round: int, *,
            names: list[str], scale: float, threshold: int, floor: float
            ) -> tuple[TrainReport, np.ndarray | None]:
        """The report and the uint32 vector to mask (None when this client refuses).
        `floor`: the round's σ_floor, the least every client of the round adds."""
        rate = self.sample_rate(ins.batch_size)
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        dimension = sum(int(np.prod(shapes[name])) for name in names)
        share = self.noise_share(ins, NoiseShare(
            floor, ins.max_grad_norm, scale, threshold, dimension, floor_multiplier=floor))
        entry = (share.charged_multiplier(threshold), rate, 1)
        own = (share.charged_multiplier(1), rate, 1)

        decision = self.ledger.check_round(*entry)
        if not decision.allowed:
            self.ledger.record_refusal(decision, run_id=ins.run_id, server_round=server_round)
            return self._report("refused-budget", decision.reason, share, rate,
                                can_train_again=False), None
        cap = self.max_epsilon_if_secagg_fails
        if cap is not None and (after := self.ledger.fallback_after(own)) > cap:
            reason = (f"epsilon if secure aggregation fails would reach {epsilon_text(after, 4)}, above this "
                      f"site's cap {cap:.4f} (threshold t = {threshold} makes each share "
                      f"carry 1/{threshold} of the noise variance)")
            return self._report("refused-policy", reason, share, rate), None

        # The Poisson sample, the rounding and the noise: none of it from a seed the server
        # knows (round_seed), or it could recompute the batch and subtract the noise.
        seed = round_seed(self.seeded_noise, ins.seed, server_round, self.client_id,
                          "distributed-dp")
        seed_generators(seed, self.device)
        per_example = self._per_example_gradients(model, rate, names, shapes, seed)
        rng = np.random.default_rng(seed)
        vector = to_ring(noisy_integer_sum(per_example, share, rng))
        # Both accounts are spent before the share leaves: once it has, the server may
        # reveal a sum holding it without this client's help (t answers of others suffice).
        self.ledger.spend_share(entry, own, run_id=ins.run_id, server_round=server_round)
        # The next round's share is sized the same way (its floor and t as this round's);
        # the site's cap on the fallback ε stops it as surely as the budget does.
        again = self.ledger.check_round(*entry).allowed and \
            (cap is None or self.ledger.fallback_after(own) <= cap)
        report = self._report("trained", "", share, rate, can_train_again=again)
        return report, vector

    def _per_example_gradients(self, model: torch.nn.Module, rate: float, names: list[str],
                               shapes: dict[str, tuple], seed: int) -> np.ndarray:
        """examples × d: each sampled record's gradient, flattened in `names` order."""
        sampler = UniformWithReplacementSampler(
            num_samples=len(self.dataset), sample_rate=rate,
            generator=torch.Generator().manual_seed(seed))
        indices = next(iter(sampler))  # one Poisson draw: each record with probability q
        columns = [int(np.prod(shapes[name])) for name in names]
        if len(indices) == 0:
            return np.zeros((0, sum(columns)), dtype=np.float32)
        batch = default_collate([self.dataset[int(i)] for i in indices])
        model.to(self.device).train()
        gsm = GradSampleModule(model, loss_reduction="mean")  # grad_sample undoes the mean
        try:
            model.zero_grad(set_to_none=True)
            self.task.train_step(gsm, batch, self.device).backward()
            params = dict(model.named_parameters())
            blocks = []
            for name, width in zip(names, columns, strict=True):
                p = params.get(name)
                if p is None or not p.requires_grad:  # a buffer: nothing to learn
                    blocks.append(np.zeros((len(indices), width), dtype=np.float32))
                else:
                    blocks.append(p.grad_sample.detach().reshape(len(indices), -1)
                                  .float().cpu().numpy())
        finally:
            gsm._close()
        return np.concatenate(blocks, axis=1)

    def _report(self, status: str, reason: str, share: NoiseShare, rate: float,
                can_train_again: bool | None = None) -> TrainReport:
        return TrainReport(
            client_id=self.client_id, status=status, reason=reason,
            num_examples=len(self.dataset), dp_enabled=True, privacy_mode="distributed",
            accountant=self.ledger.accountant_kind, delta=self.ledger.delta,
            epsilon=self.ledger.epsilon, epsilon_budget=self.ledger.epsilon_budget,
            epsilon_if_secagg_fails=self.ledger.epsilon_if_secagg_fails,
            noise_multiplier=share.noise_multiplier, noise_floor=share.floor_multiplier,
            sample_rate=rate, steps=self.ledger.steps, can_train_again=can_train_again)
