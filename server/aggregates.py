"""A round's summed update, and the single aggregate reply the strategy receives.

Secure aggregation and user-level DP both produce a sum of client updates rather than
individual replies. Turning that sum into one reply carrying `global + average update`
lets Flower's strategies aggregate it unchanged: FedAvg returns it as is, and the server
optimizers (FedAvgM, FedAdam, ...) take their pseudo-gradient from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from consortia.messages import ARRAYS, METRICS, NUM_EXAMPLES


@dataclass
class UpdateSum:
    total: dict[str, np.ndarray]  # Σ w_i·Δ_i, float64
    weight: float  # Σ w_i
    contributors: int
    num_examples: int
    indicator: float = 0.0  # user-level DP: Σ of the clients' clipping indicators
    expected_batch: float = 0.0  # distributed DP: Σ qᵢ·nᵢ over the contributors

    @classmethod
    def of_replies(cls, replies: list[Message], reference: ArrayRecord, weighted: bool
                   ) -> UpdateSum:
        """Σ over plain replies of (their weights − the reference), weighted by examples or not."""
        total = {name: np.zeros(a.numpy().shape) for name, a in reference.items()}
        weight, examples = 0.0, 0
        for reply in replies:
            n = int(reply.content[METRICS][NUM_EXAMPLES])
            w = float(n) if weighted else 1.0
            for name, array in reply.content[ARRAYS].items():
                total[name] += w * (array.numpy().astype(np.float64)
                                    - reference[name].numpy().astype(np.float64))
            weight, examples = weight + w, examples + n
        return cls(total, weight, len(replies), examples)


def aggregate_reply(reference: ArrayRecord, average_update: dict[str, np.ndarray],
                    num_examples: int) -> Message:
    """One reply carrying `reference + average_update`, in the reference's dtypes."""
    arrays = ArrayRecord({
        name: Array((a.numpy() + average_update[name]).astype(a.numpy().dtype))
        for name, a in reference.items()})
    return Message(content=RecordDict({ARRAYS: arrays,
                                       METRICS: MetricRecord({NUM_EXAMPLES: max(num_examples, 1)})}),
                   dst_node_id=0, message_type="train")


def match_dtypes(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """`arrays` in the reference's dtypes.

    Flower's FedAdam multiplies the model by a float64 NumPy scalar, which under NumPy 2
    promotes float32 tensors to float64; the clients' next updates (float32) would then no
    longer match the global model, and every one would be rejected.
    """
    out = {}
    for name, array in arrays.items():
        value, dtype = array.numpy(), reference[name].numpy().dtype
        out[name] = array if value.dtype == dtype else Array(value.astype(dtype))
    return ArrayRecord(out)
