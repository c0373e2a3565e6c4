"""Fault injection for simulations, as Flower client mods wrapped around the ClientApp.

`MalformedUpdates` makes chosen virtual clients send updates the server must reject
(NaN values, wrong shapes, unknown tensor names), to check that a round completes with
the others.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message

from consortia.messages import ARRAYS

MALFORMATIONS = ("nan", "shape", "unknown-key")


class MalformedUpdates:
    """A client mod: clients listed in `kinds` (partition id -> malformation) corrupt replies."""

    def __init__(self, kinds: dict[int, str]):
        for partition_id, kind in kinds.items():
            if kind not in MALFORMATIONS:
                raise ValueError(f"client {partition_id}: unknown malformation {kind!r}; "
                                 f"accepted: {', '.join(MALFORMATIONS)}")
        self.kinds = dict(kinds)

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        kind = self.kinds.get(int(context.node_config["partition-id"]))
        if kind is None or reply.has_error() or ARRAYS not in reply.content.array_records:
            return reply
        arrays = {k: v.numpy().copy() for k, v in reply.content[ARRAYS].items()}
        first = next(iter(arrays))
        if kind == "nan":
            arrays[first].flat[0] = np.nan
        elif kind == "shape":
            arrays[first] = np.zeros((3, 3), dtype=arrays[first].dtype)
        else:
            arrays["injected.weight"] = np.zeros(1, dtype=np.float32)
        reply.content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return reply
