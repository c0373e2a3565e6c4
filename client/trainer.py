"""The local trainer: one round of (DP-)SGD on the client's own data.

Read it top to bottom: load the global weights, size the noise, ask the ledger, train,
record the spend, hand back the new weights. With DP on, Opacus does the per-sample
clipping, the noise and the Poisson sampling; the ledger's accountant is the one Opacus
steps, so ε is Opacus's own figure.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, Dataset

from consortia.messages import TrainInstructions, TrainReport
from consortia.privacy.dp import PrivacyLedger, noise_for_budget, round_steps
from consortia.tasks import Task


def stable_seed(*parts: object) -> int:
    # Python's hash() of a str changes with every process; a run must not.
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def round_seed(seeded: bool, *parts: object) -> int:
    """The seed of a round's randomness (Poisson sampling, shuffling, DP noise, rounding).

    Seeded (simulations): from `parts`, so a run is reproducible from its config. Otherwise
    (a real site) from the OS's entropy: `parts` (the run's seed, the round, the client's
    id) are all known to the server, which could then recompute the site's batches and
    subtract its noise.
    """
    return stable_seed(*parts) if seeded else secrets.randbits(63)


def seed_generators(seed: int, device: torch.device) -> None:
    """Seed the generators this round draws from (sampling, shuffling, DP noise).

    torch.manual_seed would also queue seeds for every accelerator backend, recording a
    stack trace for each (about 0.6 ms a call, paid by every client on every round).
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


def local_optimizer(ins: TrainInstructions, params: list[torch.nn.Parameter]
                    ) -> torch.optim.Optimizer:
    """SGD (with momentum), or Adam, which adapters with small gradients train faster with."""
    if ins.optimizer == "adam":
        return torch.optim.Adam(params, lr=ins.lr)
    return torch.optim.SGD(params, lr=ins.lr, momentum=ins.momentum)


def physical_batches(loader, optimizer, max_physical: int | None):
    """The loader's logical batches cut into pieces of at most `max_physical` rows (Opacus's
    BatchMemoryManager: the optimizer steps once per logical batch), so the DP batch size
    does not depend on memory. None: the logical batches as they are."""
    if max_physical is None:
        return nullcontext(loader)
    return BatchMemoryManager(data_loader=loader, max_physical_batch_size=max_physical,
                              optimizer=optimizer)


def empty_batch_gradients(optimizer) -> None:
    """The gradients of an empty Poisson-sampled batch: none per sample, zero in sum.

    Opacus steps on an empty batch as on any other (the noise is added, the accountant
    counts the step: skipping it would tell whether the batch was empty), but its
    per-sample gradients come from a forward pass, and a transformers model cannot run one
    on zero rows (BERT's attention reshape fails). So the model is not run: each parameter
    gets a per-sample gradient of zero rows (hooks mode) and a zero gradient (ghost mode).
    """
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        p.grad = torch.zeros_like(p)


_AUTOCAST_DEVICES = ("cuda", "cpu")
_autocast_saved = threading.local()


def _full_precision_in(module, args):
    """Forward pre-hook: autocast off until the forward hook (torch's own autocast blocks,
    entered here and left there) and floating inputs in fp32."""
    off = [torch.autocast(device_type, enabled=False) for device_type in _AUTOCAST_DEVICES]
    for block in off:
        block.__enter__()
    _autocast_saved.__dict__.setdefault("stack", []).append(off)
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _autocast_back(module, args, output):
    for block in reversed(_autocast_saved.stack.pop()):
        block.__exit__(None, None, None)


@contextmanager
def trainable_layers_in_fp32(model: torch.nn.Module) -> Iterator[None]:
    """Within this block, every module holding trainable parameters (a pretrained model's
    LoRA adapters and head) computes in fp32, even inside a task's bf16 autocast.

    DP clips each example's gradient to C using a norm Opacus computes from the layer's
    activations and output gradients: ghost clipping (the LoRA tasks' mode) computes it in
    their dtype, so under bf16 autocast (the GPU path) the norm is off by a fraction of a
    percent, and a clipped gradient can pass C; the training audit, imitating the GPU
    path on the CPU, measured up to 1.0055 C on the reviews task, an ε above what the
    ledger records. In fp32 the trainable layers' per-example gradients, their norms and
    their sum are fp32 computations (the frozen base still runs in bf16: its rounding only
    changes the function being differentiated, not the bound). The layers are small, so
    this costs little of bf16's speed."""
    handles = fp32_trainable_layers_hooks(model)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def fp32_trainable_layers_hooks(model: torch.nn.Module) -> list:
    """The hooks of :func:`trainable_layers_in_fp32`, put on `model` for good (a caller
    that discards the model, as bench dp does); their handles remove them."""
    handles = []
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(_full_precision_in))
            handles.append(module.register_forward_hook(_autocast_back))
    return handles


class Proximal:
    """FedProx's term (mu/2)·||w − w_global||², applied as its own gradient step.

    Under DP, Opacus replaces each gradient with the noisy mean of clipped per-sample
    gradients, so a term added to the loss would be silently dropped; the proximal
    term does not touch the data, so it is applied after the private step instead, at
    no privacy cost: w ← w − lr·mu·(w − w_global).
    """

    def __init__(self, model: torch.nn.Module, mu: float, lr: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.anchor = [p.detach().clone() for p in self.params]
        self.rate = lr * mu

    @torch.no_grad()
    def step(self) -> None:
        for p, p0 in zip(self.params, self.anchor, strict=True):
            p.sub_(self.rate * (p - p0))


@dataclass
class LocalTrainer:
    client_id: str
    task: Task
    dataset: Dataset
    ledger: PrivacyLedger | None  # None: this client trains without DP
    device: torch.device
    seeded: bool = False  # round_seed: a simulation's reproducible randomness

    def noise_multiplier(self, ins: TrainInstructions) -> float:
        """σ as instructed, or the smallest σ that fits the client's planned participation."""
        if ins.noise_multiplier is not None:
            return ins.noise_multiplier
        rate, steps = round_steps(len(self.dataset), ins.batch_size, ins.local_epochs, "local")
        return noise_for_budget(self.ledger.epsilon_budget, self.ledger.delta, rate,
                                steps * ins.planned_rounds, self.ledger.accountant_kind)

    def round_cost(self, ins: TrainInstructions) -> tuple[float, float, int]:
        """(σ, sampling rate, steps) one round at `ins` charges this client's ledger: what
        Opacus's accountant records in train (round_steps: rate 1/len(loader), len(loader)
        × epochs steps)."""
        rate, steps = round_steps(len(self.dataset), ins.batch_size, ins.local_epochs, "local")
        return self.noise_multiplier(ins), rate, steps

    def budget_refusal(self, ins: TrainInstructions) -> TrainReport | None:
        """The refusal a round at `ins` would get from the ledger now, or None if it fits."""
        sigma, rate, steps = self.round_cost(ins)
        decision = self.ledger.check_round(sigma, rate, steps)
        if decision.allowed:
            return None
        return self._report("refused-budget", dp=True, reason=decision.reason, sigma=sigma,
                            rate=rate, can_train_again=False)

    def train(self, model: torch.nn.Module, ins: TrainInstructions, server_round: int
              ) -> tuple[TrainReport, dict[str, torch.Tensor] | None]:
        seed_generators(round_seed(self.seeded, ins.seed, server_round, self.client_id),
                        self.device)
        model.to(self.device).train()
        # Only the trainable parameters (all of them, or a pretrained model's adapters and
        # head) are optimised, and so only they are clipped, noised and accounted.
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = local_optimizer(ins, trainable)
        loader = DataLoader(self.dataset, batch_size=ins.batch_size, shuffle=True)
        anchor = Proximal(model, ins.proximal_mu, ins.lr) if ins.proximal_mu > 0 else None
        criterion = self.task.criterion()
        if not ins.dp_enabled:
            loss = self._sgd(model, optimizer, loader, criterion, ins.local_epochs, anchor)
            report = self._report("trained", dp=False, num_examples=len(self.dataset),
                                  train_loss=loss)
            return report, self.task.travelling_weights(model)

        if self.ledger is None:
            raise ValueError("DP requested but this client has no privacy ledger")
        sigma = self.noise_multiplier(ins)
        mode = ins.grad_sample_mode
        engine = PrivacyEngine(accountant=self.ledger.accountant_kind)
        engine.accountant = self.ledger.accountant()  # continue from the ledger's history
        private = dict(module=model, optimizer=optimizer, data_loader=loader,
                       noise_multiplier=sigma, max_grad_norm=ins.max_grad_norm,
                       poisson_sampling=True, grad_sample_mode=mode)
        if mode == "ghost":  # the wrapped criterion's backward runs ghost clipping's two passes
            dp_model, optimizer, criterion, loader = engine.make_private(criterion=criterion,
                                                                         **private)
        else:
            dp_model, optimizer, loader = engine.make_private(**private)
        # What make_private's accountant hook records per step: rate 1/len(loader), which
        # is not the loader's own sample_rate where len(loader) = int(1/rate) rounds down.
        rate = 1 / len(loader)
        try:
            decision = self.ledger.check_round(sigma, rate, len(loader) * ins.local_epochs)
            if not decision.allowed:
                self.ledger.record_refusal(decision, run_id=ins.run_id, server_round=server_round)
                return self._report("refused-budget", dp=True, reason=decision.reason,
                                    sigma=sigma, rate=rate, can_train_again=False), None
            with trainable_layers_in_fp32(model):
                loss = self._sgd(dp_model, optimizer, loader, criterion, ins.local_epochs,
                                 anchor, ins.physical_batch_size)
        finally:
            dp_model._close()  # remove Opacus's hooks: the module may be trained again
        # Written atomically before the reply (and so the update) leaves this client.
        self.ledger.record_spend(engine.accountant, run_id=ins.run_id, server_round=server_round)
        again = self.budget_refusal(ins) is None  # one more such round (max_rounds aside)
        # The training loss is computed on the private records without noise: under DP it
        # stays on the client (only the DP-protected update and the accounting leave).
        del loss
        report = self._report("trained", dp=True, sigma=sigma, rate=rate,
                              num_examples=len(self.dataset), can_train_again=again)
        report = report.model_copy(update={"grad_sample_mode": mode})
        return report, self.task.travelling_weights(model)

    def _sgd(self, model, optimizer, loader, criterion, epochs: int, anchor: Proximal | None,
             physical_batch_size: int | None = None) -> float:
        loss_sum, batches = 0.0, 0
        for _ in range(epochs):
            with physical_batches(loader, optimizer, physical_batch_size) as pieces:
                for batch in pieces:
                    optimizer.zero_grad(set_to_none=True)
                    loss = None
                    if len(batch[0]) == 0:  # a Poisson batch may be empty (DP only)
                        empty_batch_gradients(optimizer)
                    else:
                        loss = self.task.train_step(model, batch, self.device, criterion)
                        loss.backward()
                    optimizer.step()
                    # Under virtual batches the optimizer steps once per logical batch.
                    if anchor is not None and not getattr(optimizer, "_is_last_step_skipped", False):
                        anchor.step()
                    if loss is not None:
                        loss_sum, batches = loss_sum + loss.item(), batches + 1
        return loss_sum / max(batches, 1)

    def _report(self, status: str, *, dp: bool, reason: str = "", sigma: float | None = None,
                rate: float | None = None, num_examples: int = 0,
                train_loss: float | None = None, can_train_again: bool | None = None
                ) -> TrainReport:
        ledger = self.ledger if dp else None
        return TrainReport(
            client_id=self.client_id, status=status, reason=reason, num_examples=num_examples,
            train_loss=train_loss, dp_enabled=dp,
            accountant=ledger.accountant_kind if ledger else "",
            delta=ledger.delta if ledger else None,
            epsilon=ledger.epsilon if ledger else None,
            epsilon_budget=ledger.epsilon_budget if ledger else None,
            noise_multiplier=sigma, sample_rate=rate, steps=ledger.steps if ledger else 0,
            can_train_again=can_train_again)
