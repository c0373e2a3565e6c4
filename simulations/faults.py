"""Fault injection for simulations, as Flower client mods wrapped around the ClientApp.

`MalformedUpdates` makes chosen virtual clients send updates the server must reject
(NaN values, wrong shapes, unknown tensor names), to check that a round completes with
the others.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message
from flwr.common.constant import ErrorCode

from consortia.messages import ARRAYS

MALFORMATIONS = ("nan", "shape", "unknown-key")


def checked_kinds(kinds: dict[int, str], accepted: tuple[str, ...], what: str) -> dict[int, str]:
    for partition_id, kind in kinds.items():
        if kind not in accepted:
            raise ValueError(f"client {partition_id}: unknown {what} {kind!r}; "
                             f"accepted: {', '.join(accepted)}")
    return dict(kinds)


class MalformedUpdates:
    """A client mod: clients listed in `kinds` (partition id -> malformation) corrupt replies."""

    def __init__(self, kinds: dict[int, str]):
        self.kinds = checked_kinds(kinds, MALFORMATIONS, "malformation")

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


SECAGG_FAULTS = ("drop-train", "drop-unmask", "truncate-masked", "tamper-shares")


class SecAggFaults:
    """A client mod for secure-aggregation rounds (partition id -> fault).

    `drop-train` fails before the masked update leaves (a dropout at masking),
    `drop-unmask` fails the unmask request (a dropout after its input is in the sum),
    `truncate-masked` sends a masked vector one value short, `tamper-shares` flips a bit
    in the encrypted shares (authentication must fail for the recipients).
    """

    def __init__(self, kinds: dict[int, str]):
        self.kinds = checked_kinds(kinds, SECAGG_FAULTS, "fault")

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        from consortia.messages import MASKED, SECAGG, SECAGG_UNMASK

        kind = self.kinds.get(int(context.node_config["partition-id"]))
        is_unmask = msg.metadata.message_type == SECAGG_UNMASK
        if kind == "drop-unmask" and is_unmask:
            raise ConnectionError("injected dropout before unmasking")
        if kind == "drop-train" and msg.metadata.message_type == "train":
            raise ConnectionError("injected dropout before the masked update")
        reply = call_next(msg, context)
        if reply.has_error() or MASKED not in reply.content.array_records:
            return reply
        if kind == "truncate-masked":
            vector = reply.content[MASKED]["vector"].numpy()[:-1].copy()
            reply.content[MASKED] = ArrayRecord({"vector": Array(vector)})
        elif kind == "tamper-shares":
            from consortia.privacy.secagg import MaskedInput

            header = bytes(reply.content[SECAGG]["masked_input"])
            parsed = MaskedInput.from_bytes(header, vector=reply.content[MASKED]["vector"].numpy())
            tampered = {h: bytes([c[0] ^ 1]) + c[1:] for h, c in parsed.encrypted_shares.items()}
            forged = MaskedInput(parsed.run_id, parsed.round_num, parsed.round_seed,
                                 parsed.node_id, tampered, parsed.masked)
            reply.content[SECAGG]["masked_input"] = forged.to_bytes(include_vector=False)
        return reply


# --- faults from the run's config (`faults.*`) -----------------------------------------

@lru_cache(maxsize=8)  # asked by every virtual client on every call
def byzantine_clients(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """Which partitions attack: round(fraction · N) of them, fixed by the seed."""
    count = round(fraction * num_clients)
    rng = np.random.default_rng([seed, 0xB1])
    return frozenset(int(i) for i in rng.choice(num_clients, size=count, replace=False))


class ByzantineUpdate:
    """Replaces a client's update u = trained − global by an attack (picklable for Ray).

    sign-flip: −scale·u; scale: scale·u; gaussian: N(0, scale²) noise in place of u, fresh
    every round and fixed by (seed, round).
    """

    def __init__(self, kind: str, scale: float, seed: int):
        self.kind, self.scale, self.seed = kind, scale, seed

    def __call__(self, global_weights: dict, trained: dict, server_round: int) -> dict:
        import torch

        round_seed = int(np.random.SeedSequence([self.seed, server_round]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(round_seed)
        out = {}
        for name, new in trained.items():
            old = global_weights[name].to(new.dtype)
            if self.kind == "sign-flip":
                out[name] = old - self.scale * (new - old)
            elif self.kind == "scale":
                out[name] = old + self.scale * (new - old)
            else:
                noise = torch.randn(new.shape, generator=generator, dtype=new.dtype)
                out[name] = old + self.scale * noise
        return out


class DropoutsAndStragglers:
    """A client mod: a sampled client drops a train request with probability `dropout`
    and delays its reply by up to `straggler_s` seconds; both fixed by (seed, round, client).

    A dropped request is answered with an error reply, as Flower answers a ClientApp that
    raised (the server records the client failed with this reason), but without raising:
    Flower's engine logs every exception a ClientApp raises as two ERROR records with
    Ray's whole chained traceback, some 100 lines on the console for each dropout."""

    def __init__(self, dropout: float, straggler_s: float, seed: int):
        self.dropout, self.straggler_s, self.seed = dropout, straggler_s, seed

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        import time

        from consortia.messages import CONFIG, SERVER_ROUND

        if msg.metadata.message_type == "train" and CONFIG in msg.content.config_records:
            server_round = int(msg.content[CONFIG].get(SERVER_ROUND, 0))
            client = int(context.node_config["partition-id"])
            rng = np.random.default_rng([self.seed, server_round, client, 0xD0])
            if rng.random() < self.dropout:
                return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                     reason=f"ConnectionError: injected dropout of client "
                                            f"{client} in round {server_round}"),
                               reply_to=msg)
            if self.straggler_s > 0:
                time.sleep(float(rng.uniform(0, self.straggler_s)))
        return call_next(msg, context)


def configured_mods(cfg) -> list:
    """The client mods that `faults.*` asks for (none when all are off)."""
    f = cfg.faults
    if f.dropout > 0 or f.straggler_s > 0:
        return [DropoutsAndStragglers(f.dropout, f.straggler_s, cfg.seed)]
    return []


# --- dropouts under secure aggregation ---------------------------------------------------

def secagg_aborts(graph: dict[int, tuple[int, ...]], t: int, alive: np.ndarray) -> np.ndarray:
    """Per row of `alive` (patterns x nodes in sorted order: who sent its masked input),
    whether the server aborts the secure sum when the others dropped before masking and
    every survivor answers the unmask request. The rules of privacy/secagg/server.py:
    fewer than t survivors, or their neighbour graph split (_check_enough), or a
    survivor with fewer than t surviving share holders, itself and its neighbours, for
    its self-mask and its seeds with the dropped (_check_share_count)."""
    nodes = sorted(graph)
    index = {v: i for i, v in enumerate(nodes)}
    adjacency = np.zeros((len(nodes), len(nodes)), dtype=np.float32)
    for v, neighbours in graph.items():
        adjacency[index[v], [index[u] for u in neighbours]] = 1
    alive = np.asarray(alive, dtype=bool)
    up = alive.astype(np.float32)
    holders = up @ adjacency + up
    short = (alive & (holders < t)).any(axis=1)
    # Connected: spread from each pattern's first survivor along surviving edges.
    reach = np.zeros_like(up)
    reach[np.arange(len(up)), alive.argmax(axis=1)] = 1
    reach *= up
    while True:
        grown = np.minimum(up, (reach @ adjacency + reach) > 0)
        if np.array_equal(grown, reach):
            break
        reach = grown
    split = (reach != up).any(axis=1)
    return (alive.sum(axis=1) < t) | split | short


WARN_RATE = 0.05  # one round in 20 or more lost: worth saying before the run


def abort_draws(n: int) -> int:
    """Dropout patterns to draw for rounds of n: 4,000 (the rate then within ±2.4 points,
    three standard errors), fewer for large n (the check is n² per pattern), 200 at least."""
    return int(min(4000, max(200, 4e8 // n**2)))


def secagg_abort_rate(n: int, k: int, t: int, dropout: float, draws: int) -> float:
    """The share of rounds of `n` participants (k neighbours, threshold t) whose secure
    sum aborts when each drops its train request with probability `dropout`, as
    DropoutsAndStragglers does: estimated over `draws` patterns (fixed seed). Every
    round's graph is the same ring up to its order, so one graph stands for all."""
    from consortia.privacy.secagg.graph import neighbour_graph

    graph = neighbour_graph(range(n), num_neighbours=k, seed=bytes(32))
    alive = np.random.default_rng(0).random((draws, n)) >= dropout
    return float(secagg_aborts(graph, t, alive).mean())


def dropout_abort_warning(cfg) -> str | None:
    """A warning when faults.dropout under secure aggregation aborts WARN_RATE of rounds
    or more (an aborted round's update is lost); None otherwise."""
    if not (cfg.secagg.enabled and cfg.faults.dropout > 0):
        return None
    from consortia.server.secure_aggregation import protocol_parameters

    n = cfg.clients_per_round
    k, t, _ = protocol_parameters(cfg, n)
    draws = abort_draws(n)
    rate = secagg_abort_rate(n, k, t, cfg.faults.dropout, draws)
    if rate < WARN_RATE:
        return None
    margin = 3 * (rate * (1 - rate) / draws) ** 0.5  # three standard errors
    return (f"faults.dropout = {cfg.faults.dropout} under secure aggregation ({n} clients a "
            f"round, k = {k} neighbours, threshold t = {t}): about {rate:.0%} of rounds "
            f"(±{margin:.0%}, from {draws} draws of the dropouts) abort and lose their "
            f"update, {rate * cfg.rounds:.1f} of the run's {cfg.rounds} on average "
            "(simulations/faults.py secagg_abort_rate gives the rate for other k and t)")
