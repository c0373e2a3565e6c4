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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from consortia.config import RunConfig, config_to_dict
from consortia.messages import ARRAYS, METRICS, NUM_EXAMPLES, TrainInstructions
from consortia.server.checkpoint import CheckpointStore
from consortia.server.results import RunRecorder
from consortia.server.secure_aggregation import SecureAggregator
from consortia.server.validation import ReplyOutcome, inspect_train_reply
from consortia.tasks import Task

log = logging.getLogger("consortia.server")

RoundCallback = Callable[[dict[str, Any]], None]


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in arrays.items()}


def numpy_to_arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})


def server_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class RoundWorkflow:
    cfg: RunConfig
    task: Task
    strategy: Strategy
    out_dir: Path
    run_id: str
    on_round: RoundCallback | None = None
    checkpoints: CheckpointStore = field(init=False)
    recorder: RunRecorder = field(init=False)

    def __post_init__(self) -> None:
        self.checkpoints = CheckpointStore(self.out_dir / "checkpoints")
        self.recorder = RunRecorder(self.out_dir)
        self.test_set = self.task.load_data(self.cfg.data_dir).test
        self.device = server_device()
        self.secure = (SecureAggregator(self.cfg, self.run_id, self.cfg.sim.reply_timeout_s)
                       if self.cfg.secagg.enabled else None)

    def instructions(self) -> TrainInstructions:
        cfg = self.cfg
        return TrainInstructions(
            run_id=self.run_id, task=cfg.task, model_activation=cfg.model.activation,
            local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
            momentum=cfg.momentum, seed=cfg.seed, dp_enabled=cfg.privacy.enabled,
            max_grad_norm=cfg.privacy.max_grad_norm,
            noise_multiplier=cfg.privacy.noise_multiplier,
            planned_rounds=cfg.planned_rounds_per_client)

    def initial_model(self) -> ArrayRecord:
        torch.manual_seed(self.cfg.seed)
        model = self.task.build_model(self.cfg.model.activation)
        return ArrayRecord(model.state_dict())

    def evaluate(self, arrays: ArrayRecord) -> dict[str, float]:
        model = self.task.build_model(self.cfg.model.activation)
        model.load_state_dict(arrays.to_torch_state_dict())
        return self.task.evaluate(model.to(self.device), self.test_set, self.device)

    def start_state(self, resume: bool) -> tuple[int, ArrayRecord]:
        """Round 0 is the initial model; resuming continues from the latest checkpoint."""
        latest = self.checkpoints.latest() if resume else None
        if latest is not None:
            self.recorder.restore(latest.round)
            log.info("resuming after round %d (checkpoint %s)", latest.round, latest.sha256[:12])
            return latest.round, numpy_to_arrays(latest.load_weights())
        arrays = self.initial_model()
        self.checkpoints.save(0, arrays_to_numpy(arrays), self.evaluate(arrays))
        self.recorder.restore(0)
        return 0, arrays

    def run(self, grid: Grid, resume: bool = False) -> None:
        start_round, arrays = self.start_state(resume)
        config = self.instructions().to_config_record()
        for server_round in range(start_round + 1, self.cfg.rounds + 1):
            arrays = self.run_round(grid, server_round, arrays, config)
        self.recorder.write_summary(
            task=self.cfg.task, rounds=self.cfg.rounds,
            delta=self.cfg.privacy.delta if self.cfg.privacy.enabled else None,
            config=config_to_dict(self.cfg), extra={"run_id": self.run_id})

    def run_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, config) -> ArrayRecord:
        started = time.monotonic()
        # Flower's strategies sample with the `random` module: seed it per round so the
        # same config and seed sample the same way.
        random.seed(f"{self.cfg.seed}/{server_round}")
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if self.secure is not None:
            outcomes, aggregate, round_metrics = self.secure_round(grid, server_round, messages,
                                                                   arrays)
        else:
            outcomes, aggregate, round_metrics = self.plain_round(grid, messages, arrays)

        train_metrics = None
        if aggregate:
            aggregated, train_metrics = self.strategy.aggregate_train(server_round, aggregate)
            if aggregated is not None:
                arrays = aggregated
        else:
            log.warning("round %d: no update to aggregate; the global model stays as it was",
                        server_round)

        metrics = {**self.evaluate(arrays), **round_metrics}
        if train_metrics is not None and "train_loss" in train_metrics:
            metrics["train_loss"] = float(train_metrics["train_loss"])
        checkpoint = self.checkpoints.save(server_round, arrays_to_numpy(arrays), metrics)
        row = self.recorder.record_round(server_round, metrics, outcomes,
                                         time.monotonic() - started, checkpoint.sha256)
        if self.on_round is not None:
            self.on_round(row)
        return arrays

    def plain_round(self, grid: Grid, messages: list[Message], arrays: ArrayRecord
                    ) -> tuple[list[ReplyOutcome], list[Message], dict[str, Any]]:
        """Updates in the clear: each is inspected, the valid ones go to the strategy."""
        replies = list(grid.send_and_receive(messages, timeout=self.cfg.sim.reply_timeout_s))
        outcomes = [inspect_train_reply(reply, arrays) for reply in replies]
        answered = {o.node_id for o in outcomes}
        outcomes += [ReplyOutcome(m.metadata.dst_node_id, "failed", "no reply before the timeout")
                     for m in messages if m.metadata.dst_node_id not in answered]
        return outcomes, [o.message for o in outcomes if o.status == "trained"], {}

    def secure_round(self, grid: Grid, server_round: int, messages: list[Message],
                     arrays: ArrayRecord) -> tuple[list[ReplyOutcome], list[Message], dict[str, Any]]:
        """Only the masked sum is seen; the strategy gets it as one aggregate reply."""
        result = self.secure.run_round(grid, server_round, messages, arrays)
        if result.arrays is None:
            return result.outcomes, [], result.metrics
        aggregate = Message(content=RecordDict({
            ARRAYS: result.arrays,
            METRICS: MetricRecord({NUM_EXAMPLES: result.num_examples})}),
            dst_node_id=0, message_type="train")
        return result.outcomes, [aggregate], result.metrics
