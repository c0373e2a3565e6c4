"""The client's side of secure aggregation, on a Flower node.

The protocol lives in `privacy/secagg/`; this glue keeps the client's session (its
long-term private keys included) in the node's own `context.state`, which never leaves
the client, turns the trained weights into a clipped, weighted, quantized update
(new − old) and masks it. The server receives the masked vector only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from consortia.client.trainer import stable_seed
from consortia.messages import (
    MASKED,
    REPORT,
    SECAGG,
    SecAggInstructions,
    TrainReport,
    decode_array,
    encode_array,
    secagg_run_id,
    update_vector_order,
)
from consortia.privacy.secagg import ClientSecAggSession, RoundSetup, UnmaskRequest, encode
from consortia.privacy.secagg.scratch import scratch
from consortia.privacy.storage import atomic_write_bytes

STATE_KEY = "consortia.secagg"


class SecAggClient:
    """`state_file`: keep the session in this file (0600, on the site's disk) rather than
    in the node's context, so that a site whose SuperNode restarts keeps its keys."""

    def __init__(self, context: Context, state_file: Path | None = None):
        self.context = context
        self.state_file = state_file

    def _stored(self) -> bytes | None:
        if self.state_file is not None:
            return self.state_file.read_bytes() if self.state_file.exists() else None
        record = self.context.state.config_records.get(STATE_KEY)
        return None if record is None else record["session"]

    def _load(self, run_id: int) -> ClientSecAggSession:
        stored = self._stored()
        if stored is not None:
            session = ClientSecAggSession.from_state_bytes(stored)
            if session.run_id == run_id and session.node_id == self.context.node_id:
                return session
        # A new run (or a first contact): fresh long-term keys for this run.
        return ClientSecAggSession(node_id=self.context.node_id, run_id=run_id)

    def _save(self, session: ClientSecAggSession) -> None:
        if self.state_file is not None:
            atomic_write_bytes(self.state_file, session.to_state_bytes(), mode=0o600)
            return
        self.context.state[STATE_KEY] = ConfigRecord({"session": session.to_state_bytes()})

    def advertise(self, run_id: str, num_examples: int, can_train: bool | None = None,
                  refusal: TrainReport | None = None) -> RecordDict:
        """The keys (and dataset size) for the run; `can_train`, when known, whether this
        client's ledger can pay for a round of the run (TrainReport.can_train_again), and
        `refusal`, the budget refusal (with the ledger's ε) a train request would get."""
        session = self._load(secagg_run_id(run_id))
        self._save(session)
        record = ConfigRecord({"advertise": session.advertise_keys().to_bytes(),
                               "num_examples": num_examples})
        if can_train is not None:
            record["can_train"] = can_train
        content = RecordDict({SECAGG: record})
        if refusal is not None:
            content[REPORT] = refusal.to_config_record()
        return content

    def mask_update(self, ins: SecAggInstructions, old: ArrayRecord,
                    new: dict[str, torch.Tensor], num_examples: int, seed: int,
                    indicator: float | None = None, client_id: str = ""
                    ) -> tuple[ArrayRecord, ConfigRecord]:
        setup = RoundSetup.from_bytes(ins.setup)
        names = update_vector_order(old.keys())
        olds = [decode_array(old[name], copy=False) for name in names]  # views: no copy of the model
        news = [new[name].numpy() for name in names]
        size = sum(o.size for o in olds) + int(ins.unweighted)
        # The update (new − old) in this thread's reused buffer, tensor by tensor.
        update = scratch("update", size, np.result_type(*olds, *news))
        offset = 0
        for o, n in zip(olds, news, strict=True):
            np.subtract(n.reshape(-1), o.reshape(-1), out=update[offset:offset + o.size])
            offset += o.size
        if ins.unweighted:
            update[offset] = 0.0 if indicator is None else indicator
        weight = 1.0 if ins.unweighted else min(1.0, num_examples / ins.weight_scale)
        # Stochastic rounding seeded by (run seed, round, client): the same config gives the
        # same sum in every run (node ids change from run to run; the client's id does not).
        rng = np.random.default_rng(stable_seed(seed, setup.round_num, client_id))
        encoded = encode(update, clip=ins.clip, bits=ins.bits, num_clients=len(setup.participants),
                         weight=weight, rng=rng, out=scratch("encoded", size, np.uint32))
        return self.mask_vector(ins, encoded)

    def mask_vector(self, ins: SecAggInstructions, encoded: np.ndarray
                    ) -> tuple[ArrayRecord, ConfigRecord]:
        """Mask a vector already in the ring (uint32), in place: its shares go with it."""
        setup = RoundSetup.from_bytes(ins.setup)
        session = self._load(setup.run_id)
        masked = session.share_keys_and_mask_input(setup, encoded, consume=True)
        self._save(session)
        return (ArrayRecord({"vector": encode_array(masked.masked)}),
                ConfigRecord({"masked_input": masked.to_bytes(include_vector=False)}))

    def masked_content(self, report: TrainReport, ins: SecAggInstructions, old: ArrayRecord,
                       new: dict[str, torch.Tensor], seed: int, indicator: float | None = None
                       ) -> RecordDict:
        """The train reply's content under secure aggregation: the report in the clear,
        the update only masked."""
        vector, header = self.mask_update(ins, old, new, report.num_examples, seed, indicator,
                                          report.client_id)
        return self.content(report, vector, header)

    @staticmethod
    def content(report: TrainReport, vector: ArrayRecord, header: ConfigRecord) -> RecordDict:
        content = report.to_content()
        content[MASKED], content[SECAGG] = vector, header
        return content

    def unmask(self, request_bytes: bytes) -> RecordDict:
        """Answer an unmask request. (Under distributed DP the ledger spent before the
        share left: the server can reveal a sum holding it without this answer.)"""
        request = UnmaskRequest.from_bytes(request_bytes)
        session = self._load(request.run_id)
        response = session.unmask(request)
        self._save(session)
        return RecordDict({SECAGG: ConfigRecord({"unmask": response.to_bytes()})})


__all__ = ["SecAggClient"]
