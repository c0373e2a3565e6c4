"""`consortia bench secagg`: the cost of a secure round, ours against Flower's SecAgg+.

One process, one Flower simulation (Ray backend), N virtual clients that do no training,
and a benchmark ServerApp that runs three kinds of round in alternation, R times each:

- ``plain``: Flower's Message API FedAvg (``flwr.serverapp.strategy``): configure_train,
  the train exchange as ``server/workflow.py`` runs it without secure aggregation (each
  reply inspected by ``server/validation.py``, ``plain_exchange``), aggregate_train.
  Clients reply as ``client/client_app.py`` does without secure aggregation: a
  TrainReport "trained" and the new weights.
- ``secagg``: consortia's ``SecureAggregator.run_round`` on the same FedAvg messages, its
  weighted sum turned into one aggregate reply and passed to ``aggregate_train``, as
  ``server/workflow.py`` does. Clients answer as ``client/client_app.py`` does under
  secure aggregation: the TrainReport, and the update masked by ``SecAggClient.mask_update``.

  In both, a client's "new" weights are the old ones plus a fixed small random delta
  instead of a training result, so the two differ only in how the update travels; both
  aggregates are checked against the old weights plus that delta.
  The key advertisement (once per run) is timed apart, as ``secagg_setup_s``.
- ``flower_secaggplus``: Flower's ``SecAggPlusWorkflow(num_shares=7,
  reconstruction_threshold=4)`` on its legacy path (``LegacyContext`` with the legacy
  FedAvg), one round per call, exactly the fit step ``DefaultWorkflow`` runs each round
  (its evaluation steps are no-ops here: no evaluate_fn, fraction_evaluate = 0). Clients
  run Flower's ``secaggplus_mod`` around a legacy NumPyClient whose fit returns the
  parameters unchanged.

All three kinds share one ClientApp: a mod hands a train message to ``secaggplus_mod``
only when it carries Flower's SecAgg+ configs record (``secaggplus_mod`` itself passes
through only non-train messages), and the train handler tells the legacy fit request
(``fitins.*`` records), our secure request (ConfigRecord "secagg") and a plain one apart.

Times are wall-clock seconds per round (``time.perf_counter``), medians over R rounds,
after one untimed round of each kind (``warmup_s`` for the plain one, which starts Ray's
actors; ``first_round_s`` for the two secure kinds).
``secagg_client_cpu_ms`` is the CPU each of our clients spent on its masked reply,
measured in its actor with ``time.thread_time`` (so time the actor waited for a core
is not in it): median and max over all secure replies.
``secagg_unmask_asked`` is how many clients each of our unmask exchanges asked (median),
and ``secagg_unmask_client_cpu_ms`` the CPU each spent answering, measured the same way:
with both, the unmask exchange's seconds split into the clients' work and the engine's
cost per message.
``secagg_client_stream_codes``: the codes our clients drew their mask streams with
(masks.stream_code, reported by each masked reply); ``stream_code`` names one for every
process of the benchmark (``--stream-code``), else each process chooses the fastest.
The grid polls for replies every ``pull_interval`` seconds (0.01 here by default; a run
polls at ``sim.poll_interval_s``, 0.02 by default; None keeps Flower's 0.1) for all three
kinds alike: it is one grid. Likewise one engine: it hands messages to the clients as
``dispatch`` says (a run's ``sim.dispatch``; prompt by default, simulations/dispatch.py).
"""

from __future__ import annotations

import logging
import os
import resource
import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from consortia.client.secure_aggregation import SecAggClient
from consortia.config import load_config
from consortia.messages import (
    ARRAYS,
    CONFIG,
    NUM_EXAMPLES,
    SECAGG,
    SECAGG_UNMASK,
    SecAggInstructions,
    TrainInstructions,
    TrainReport,
    decode_array,
    record_of,
    torch_to_arrays,
)
from consortia.privacy.secagg import masks
from consortia.server.aggregates import aggregate_reply
from consortia.server.directory import poll_replies_every
from consortia.server.workflow import plain_exchange
from consortia.simulations.dispatch import check_dispatch, prompt_dispatch

PARAM_NAME = "w"
DELTA_SCALE = 1e-3  # the fake update: L2 norm about 1e-3 * sqrt(D), under the clip (10)
DELTA_SEED = 1234
FLOWER_NUM_SHARES = 7
FLOWER_THRESHOLD = 4
REPLY_TIMEOUT_S = 600.0
# Sanity bound on |aggregate - expected| (weights ~ N(0, 0.1^2)): a round further off than
# this did not aggregate what was sent. Flower's default quantization (whole parameters,
# clip 8, 2**22 levels, weights folded in) is off by ~1e-3; ours by ~1e-7.
GROSS_ERROR = 0.05
WARMUP = "bench-warmup"  # in the untimed first round's config: clients draw their delta then
# 4 Ray actors on 2 cores: a client spends much of its turn in Ray's (de)serialization
# and message passing rather than arithmetic, so two actors per core keep both cores
# busy while one actor waits; more actors would only add memory (each is a Python
# process with torch loaded, a few hundred MB) and context switches.
DEFAULT_CPUS_PER_CLIENT = 0.5

# A record the bench's secure replies carry (the server reads only its own records): the
# CPU the client spent on its masked reply, measured inside the actor.
CLIENT_CPU = "bench.client_cpu"
UNMASK_CPU = "bench.unmask_cpu"  # likewise, on our unmask answers

_delta_cache: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}


def _fixed_delta(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The same small random update every round, drawn once per client process."""
    key = (name, shape)
    if key not in _delta_cache:
        rng = np.random.default_rng(DELTA_SEED)
        _delta_cache[key] = (rng.standard_normal(shape) * DELTA_SCALE).astype(np.float32)
    return _delta_cache[key]


# --- the clients ---------------------------------------------------------------------
class _EchoClient(NumPyClient):
    """Flower's legacy client API: fit returns the parameters unchanged, 1 example."""

    def fit(self, parameters, config):
        return parameters, 1, {}


def _legacy_fit(msg: Message, context: Context) -> Message:
    # The innermost step of a legacy ClientApp(client_fn=...): fitins -> fit -> fitres.
    from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype

    return handle_legacy_message_from_msgtype(lambda _ctx: _EchoClient().to_client(), msg, context)


def _secaggplus_for_its_own_messages(msg: Message, context: Context, call_next) -> Message:
    """Flower's secaggplus_mod, applied only to train messages of Flower's SecAgg+ protocol.

    secaggplus_mod passes through only non-train messages; it would fail on a train
    request without its configs record (ours and the plain ones).
    """
    if (msg.metadata.message_type == MessageType.TRAIN
            and RECORD_KEY_CONFIGS in msg.content.config_records):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


client_app = ClientApp(mods=[_secaggplus_for_its_own_messages])


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    content = msg.content
    if any(name.startswith("fitins.") for name in content.array_records):
        return _legacy_fit(msg, context)  # Flower's SecAgg+, masked by secaggplus_mod
    old = content[ARRAYS]
    secagg = SecAggInstructions.from_content(content)
    if WARMUP in content.config_records.get(CONFIG, {}):  # untimed: draw the fixed delta now
        for name, array in old.items():
            _fixed_delta(name, tuple(array.shape))
    # "Training", the same for plain and ours: the new weights are the old plus the fixed
    # delta. Then each replies as client_app.py does after training.
    new = {}
    for name, array in old.items():
        values = decode_array(array, copy=False)
        new[name] = torch.from_numpy(values + _fixed_delta(name, values.shape))
    report = TrainReport(client_id=str(context.node_id), status="trained", num_examples=1)
    if secagg is None:  # plain FedAvg: the new weights
        return Message(report.to_content(torch_to_arrays(new)), reply_to=msg)
    # Ours: the update masked.
    _, ins = TrainInstructions.from_content(content)
    started = time.thread_time()  # this actor thread's CPU, whatever else shares the cores
    content = SecAggClient(context).masked_content(report, secagg, old, new, ins.seed)
    content[CLIENT_CPU] = MetricRecord({"ms": (time.thread_time() - started) * 1000,
                                        # which code drew its streams (index in masks.STREAM_CODES)
                                        "stream_code": masks.STREAM_CODES.index(masks.stream_code())})
    return Message(content, reply_to=msg)


@client_app.train("secagg_advertise")
def _advertise(msg: Message, context: Context) -> Message:
    run_id = str(msg.content[CONFIG]["run_id"])
    return Message(SecAggClient(context).advertise(run_id, 1), reply_to=msg)


@client_app.train("secagg_unmask")
def _unmask(msg: Message, context: Context) -> Message:
    started = time.thread_time()
    content = SecAggClient(context).unmask(msg.content[SECAGG]["unmask_request"])
    content[UNMASK_CPU] = MetricRecord({"ms": (time.thread_time() - started) * 1000})
    return Message(content, reply_to=msg)


# --- the server ----------------------------------------------------------------------
@dataclass
class _Pushed:
    """One exchange pushed through _TimedGrid: its type, when, the CPU by process group
    then (with cpu_split), and how many replies are still out."""

    kind: str
    started: float
    cpu: dict[str, float] | None
    left: int  # replies still out


class _TimedGrid:
    """The Grid, with the seconds each exchange took (from its push to its last reply),
    by message type. Flower's SecAgg+ goes through send_and_receive, ours and plain
    through push_messages and pull_messages (server/directory.py): both are timed."""

    def __init__(self, grid, cpu_split: bool = False):
        self._grid = grid
        # Per exchange: CPU seconds by process group (`_cpu_by_group`), when cpu_split. Read
        # from /proc before the push and after the last reply, so it adds a few ms to the
        # round (outside the exchange's time); the headline runs leave it off.
        self.cpu_split = cpu_split
        self.exchange_cpu: list[tuple[str, dict[str, float]]] = []
        self.exchanges: list[tuple[str, float]] = []
        self.client_cpu_ms: list[float] = []  # ours: each masked reply's CPU in its actor
        self.unmask_cpu_ms: list[float] = []  # ours: each unmask answer's CPU in its actor
        self.client_stream_codes: set[str] = set()  # ours: the codes the clients drew with
        self.unmask_asked: list[int] = []  # ours: each unmask exchange's message count
        self._open: dict[str, _Pushed] = {}  # message id -> its exchange

    def push_messages(self, messages):
        messages = list(messages)
        cpu = _cpu_by_group() if self.cpu_split else None
        started = time.perf_counter()
        ids = list(self._grid.push_messages(messages))
        waiting = {i for i in ids if i is not None}
        pushed = _Pushed(messages[0].metadata.message_type if messages else "", started, cpu,
                         len(waiting))
        if pushed.kind == SECAGG_UNMASK:
            self.unmask_asked.append(len(messages))
        self._open.update(dict.fromkeys(waiting, pushed))
        return ids

    def pull_messages(self, message_ids):
        replies = list(self._grid.pull_messages(message_ids))
        now = time.perf_counter()
        for reply in replies:
            pushed = self._open.pop(reply.metadata.reply_to_message_id, None)
            if pushed is None:
                continue
            pushed.left -= 1
            if pushed.left == 0:  # the exchange's last reply
                self.exchanges.append((pushed.kind, now - pushed.started))
                if pushed.cpu is not None:
                    after = _cpu_by_group()
                    self.exchange_cpu.append(
                        (pushed.kind, {g: after[g] - pushed.cpu[g] for g in after}))
        self._record_cpu(replies)
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else ""
        started = time.perf_counter()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.exchanges.append((kind, time.perf_counter() - started))
        self._record_cpu(replies)
        return replies

    def _record_cpu(self, replies) -> None:
        for name, into in ((CLIENT_CPU, self.client_cpu_ms), (UNMASK_CPU, self.unmask_cpu_ms)):
            cpu = [None if r.has_error() else record_of(r.content, name, MetricRecord)
                   for r in replies]
            into.extend(float(record["ms"]) for record in cpu if record is not None)
            self.client_stream_codes.update(masks.STREAM_CODES[int(record["stream_code"])]
                                            for record in cpu
                                            if record is not None and "stream_code" in record)

    def __getattr__(self, name):
        return getattr(self._grid, name)


# Our round's exchanges by message type, and the phase each is reported under.
_OUR_EXCHANGES = {MessageType.TRAIN: "secagg_train_exchange",
                  SECAGG_UNMASK: "secagg_unmask_exchange"}


class _Rounds:
    """The three round kinds, set up once inside the ServerApp."""

    def __init__(self, grid, context: Context, cfg, clients: int, params: int,
                 cpu_split: bool = False):
        from flwr.common import ndarrays_to_parameters
        from flwr.compat.common import recorddict_compat as compat
        from flwr.server import LegacyContext, ServerConfig
        from flwr.server.client_manager import SimpleClientManager
        from flwr.server.compat.grid_client_proxy import GridClientProxy
        from flwr.server.strategy import FedAvg as LegacyFedAvg
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.serverapp.strategy import FedAvg

        from consortia.server.secure_aggregation import SecureAggregator

        self.grid = _TimedGrid(grid, cpu_split)
        # Per timed round of ours and plain, when cpu_split: each exchange's CPU by group.
        self.exchange_cpu: dict[str, list[dict[str, float]]] = {
            "plain_exchange": [], "secagg_train_exchange": [], "secagg_unmask_exchange": []}
        self.clients = clients
        # Per timed round of ours and plain: seconds in each exchange, and the rest.
        self.phases: dict[str, list[float]] = {
            "plain_exchange": [], "plain_other": [],
            "secagg_train_exchange": [], "secagg_unmask_exchange": [], "secagg_other": [],
            "flower_exchanges": [], "flower_other": []}
        self.errors = {"plain": 0.0, "secagg": 0.0, "flower_secaggplus": 0.0}  # max |aggregate - expected|
        rng = np.random.default_rng(0)
        self.weights = (rng.standard_normal(params) * 0.1).astype(np.float32)
        self.arrays = ArrayRecord({PARAM_NAME: Array(self.weights)})

        # (a) plain and (b) ours: the Message API FedAvg, every node every round.
        self.strategy = FedAvg(fraction_train=1.0, min_train_nodes=clients,
                               min_available_nodes=clients, fraction_evaluate=0.0,
                               min_evaluate_nodes=0, weighted_by_key=NUM_EXAMPLES)
        self.run_id = uuid.uuid4().hex[:12]
        self.secure = SecureAggregator(cfg, self.run_id, REPLY_TIMEOUT_S)
        self.instructions = TrainInstructions(
            run_id=self.run_id, task=cfg.task, model_activation=cfg.model.activation,
            local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
            momentum=cfg.momentum, seed=cfg.seed, dp_enabled=False,
            max_grad_norm=cfg.privacy.max_grad_norm, noise_multiplier=None,
            planned_rounds=cfg.planned_rounds_per_client)

        # (c) Flower's SecAgg+ on the legacy path.
        node_ids = sorted(grid.get_node_ids())
        while len(node_ids) < clients:  # the simulation registers nodes as it starts
            time.sleep(0.1)
            node_ids = sorted(grid.get_node_ids())
        self.node_ids = node_ids
        manager = SimpleClientManager()
        for n in node_ids:
            manager.register(GridClientProxy(node_id=n, grid=grid, run_id=grid.run.run_id))
        initial = ndarrays_to_parameters([self.weights])
        legacy_strategy = LegacyFedAvg(fraction_fit=1.0, fraction_evaluate=0.0,
                                       min_fit_clients=clients, min_evaluate_clients=0,
                                       min_available_clients=clients, initial_parameters=initial)
        self.legacy = LegacyContext(context, config=ServerConfig(num_rounds=1),
                                    strategy=legacy_strategy, client_manager=manager)
        self.legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            initial, keep_input=True)
        self.legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord()
        self._configs_key, self._params_key = MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        self.workflow = SecAggPlusWorkflow(num_shares=FLOWER_NUM_SHARES,
                                           reconstruction_threshold=FLOWER_THRESHOLD,
                                           timeout=REPLY_TIMEOUT_S)

    def setup_secagg(self) -> float:
        started = time.perf_counter()
        failed = self.secure.register(self.grid, self.node_ids)
        elapsed = time.perf_counter() - started
        if failed:
            raise RuntimeError(f"secure aggregation key advertisement failed: {failed}")
        return elapsed

    def plain(self, server_round: int, config: ConfigRecord | None = None) -> float:
        self.grid.exchanges.clear()
        self.grid.exchange_cpu.clear()
        started = time.perf_counter()
        messages = list(self.strategy.configure_train(server_round, self.arrays,
                                                      config or ConfigRecord(), self.grid))
        _, accepted = plain_exchange(self.grid, messages, self.arrays, REPLY_TIMEOUT_S)
        aggregated, _ = self.strategy.aggregate_train(server_round, accepted)
        elapsed = time.perf_counter() - started
        if aggregated is None or len(accepted) != self.clients:
            raise RuntimeError(f"plain round {server_round}: {len(accepted)} valid replies, "
                               "no aggregate")
        self._check("plain", server_round, aggregated[PARAM_NAME].numpy())
        exchange = sum(t for _, t in self.grid.exchanges)
        self.phases["plain_exchange"].append(exchange)
        self.phases["plain_other"].append(elapsed - exchange)
        self.exchange_cpu["plain_exchange"] += [cpu for _, cpu in self.grid.exchange_cpu]
        return elapsed

    def forget_records(self) -> None:
        """Drop what the untimed first rounds recorded (phases, clients' CPU)."""
        for values in (*self.phases.values(), *self.exchange_cpu.values()):
            values.clear()
        self.grid.client_cpu_ms.clear()
        self.grid.unmask_cpu_ms.clear()
        self.grid.unmask_asked.clear()

    def ours(self, server_round: int) -> float:
        self.grid.exchanges.clear()
        self.grid.exchange_cpu.clear()
        started = time.perf_counter()
        messages = list(self.strategy.configure_train(
            server_round, self.arrays, self.instructions.to_config_record(), self.grid))
        result = self.secure.run_round(self.grid, server_round, messages, self.arrays)
        summed = result.summed
        if summed is None:
            raise RuntimeError(f"secure round {server_round} abandoned: {result.metrics}")
        # As server/workflow.py does: the weighted sum becomes one aggregate reply.
        average = {name: total / summed.weight for name, total in summed.total.items()}
        aggregate = aggregate_reply(self.arrays, average, summed.num_examples)
        aggregated, _ = self.strategy.aggregate_train(server_round, [aggregate])
        elapsed = time.perf_counter() - started
        seconds = dict.fromkeys(_OUR_EXCHANGES.values(), 0.0)
        for kind, t in self.grid.exchanges:
            if kind in _OUR_EXCHANGES:
                seconds[_OUR_EXCHANGES[kind]] += t
        for phase, t in seconds.items():
            self.phases[phase].append(t)
        self.phases["secagg_other"].append(elapsed - sum(seconds.values()))
        for kind, cpu in self.grid.exchange_cpu:
            if kind in _OUR_EXCHANGES:
                self.exchange_cpu[_OUR_EXCHANGES[kind]].append(cpu)
        self._check("secagg", server_round, aggregated[PARAM_NAME].numpy())
        return elapsed

    def _check(self, kind: str, server_round: int, average: np.ndarray) -> None:
        """Untimed: every client sent the old weights plus the fixed delta, so the average
        is that; a round further off than GROSS_ERROR did not aggregate what was sent."""
        error = float(np.abs(average - (self.weights
                                        + _fixed_delta(PARAM_NAME, self.weights.shape))).max())
        self.errors[kind] = max(self.errors[kind], error)
        if error > GROSS_ERROR:
            raise RuntimeError(f"{kind} round {server_round}: aggregate off by {error}")

    def flower(self, server_round: int) -> float:
        from flwr.common import parameters_to_ndarrays
        from flwr.compat.common import recorddict_compat as compat
        from flwr.server.workflow.constant import Key

        before = self.legacy.state.array_records[self._params_key]
        self.legacy.state.config_records[self._configs_key][Key.CURRENT_ROUND] = server_round
        self.grid.exchanges.clear()
        started = time.perf_counter()
        self.workflow(self.grid, self.legacy)
        elapsed = time.perf_counter() - started
        exchanges = sum(t for _, t in self.grid.exchanges)  # setup, share keys, collect, unmask
        self.phases["flower_exchanges"].append(exchanges)
        self.phases["flower_other"].append(elapsed - exchanges)
        after = self.legacy.state.array_records[self._params_key]
        if after is before:
            raise RuntimeError(f"Flower SecAgg+ round {server_round} produced no aggregate")
        # Untimed check: the clients echoed the weights, so the average is the weights.
        (values,) = parameters_to_ndarrays(compat.arrayrecord_to_parameters(after, True))
        error = float(np.abs(values - self.weights).max())
        self.errors["flower_secaggplus"] = max(self.errors["flower_secaggplus"], error)
        if error > GROSS_ERROR:
            raise RuntimeError(f"Flower SecAgg+ round {server_round}: aggregate off by {error}")
        return elapsed


class _Proc(NamedTuple):
    parent: int
    name: str
    cpu_s: float  # user + system so far


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def _descendants() -> dict[int, _Proc]:
    """This process's descendants (Ray's processes), from one read of /proc."""
    procs: dict[int, _Proc] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                fields = stat.rsplit(")", 1)[1].split()
                procs[int(entry)] = _Proc(int(fields[1]), stat[stat.index("(") + 1:stat.rindex(")")],
                                          (int(fields[11]) + int(fields[12])) * _TICK_S)
            except (OSError, IndexError, ValueError):
                continue
    found: dict[int, _Proc] = {}
    frontier = {os.getpid()}
    while frontier:
        frontier = {p for p, proc in procs.items() if proc.parent in frontier} - set(found)
        found.update({p: procs[p] for p in frontier})
    return found


def _descendant_peak_rss_mb() -> float:
    """Sum of the peak RSS (VmHWM) of this process's descendants (Ray's processes)."""
    total_kb = 0
    for pid in _descendants():
        try:
            with open(f"/proc/{pid}/status") as f:
                total_kb += next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
        except (OSError, ValueError):
            continue
    return total_kb / 1024


def _cpu_by_group() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process ("server": the ServerApp,
    Flower's engine and Ray's driver), by the Ray actors that run the ClientApp
    ("clients") and by Ray's other processes ("ray": raylet, GCS, ...). Linux only."""
    own = os.times()
    groups = {"server": own.user + own.system, "clients": 0.0, "ray": 0.0}
    for proc in _descendants().values():
        groups["clients" if proc.name.startswith("ray::ClientApp") else "ray"] += proc.cpu_s
    return groups


def _median_and_max(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 2), "max": round(max(values), 2)}


BENCH_PULL_INTERVAL_S = 0.01  # the grid's polling for every kind alike (--pull-interval)


def bench_secagg(clients: int, params: int, rounds: int = 3,
                 cpus_per_client: float = DEFAULT_CPUS_PER_CLIENT,
                 pull_interval: float | None = BENCH_PULL_INTERVAL_S,
                 dispatch: str = "prompt", unmask: str = "cover",
                 cpu_split: bool = False, stream_code: str | None = None) -> dict[str, Any]:
    """Seconds per round (medians over `rounds`): plain FedAvg, ours, Flower's SecAgg+.

    `pull_interval`: seconds between the grid's polls for replies, for every kind alike
    (a run's `sim.poll_interval_s`); None keeps Flower's default (0.1 s).
    `dispatch`: the engine's, for every kind alike (a run's `sim.dispatch`): prompt or flower.
    `unmask`: ours, whom the unmask request goes to (a run's `secagg.unmask`): cover or all.
    `cpu_split`: also report each exchange's CPU seconds by process (`exchange_cpu_s`:
    the server's process, the client actors, Ray's other processes; Linux's /proc). The
    readings add a few ms to each round, so leave it off for the headline figures.
    `stream_code`: the code every process draws our mask streams with (gcm, ctr: OpenSSL's;
    vaes: ours), through ``CONSORTIA_SECAGG_STREAM_CODE``; None lets each choose the
    fastest (masks.stream_code).
    """
    if clients < 4 or params < 1 or rounds < 1:
        raise ValueError(f"need clients >= 4 (Flower's threshold is {FLOWER_THRESHOLD}), "
                         f"params >= 1, rounds >= 1; got {clients}, {params}, {rounds}")
    if not 0 < cpus_per_client:
        raise ValueError(f"cpus_per_client must be positive, got {cpus_per_client}")
    if pull_interval is not None and not 0 < pull_interval <= 1:
        raise ValueError(f"pull_interval must be in (0, 1] seconds, or None for Flower's "
                         f"default; got {pull_interval}")
    check_dispatch(dispatch, "dispatch")
    if cpu_split and not os.path.isfile("/proc/self/stat"):
        raise ValueError("cpu_split reads each process's CPU from Linux's /proc, which this "
                         "system does not have; run without --cpu-split")
    masks.check_stream_code_env()
    if stream_code is not None:
        masks.stream_code(stream_code)  # this process's (the server's); a wrong one fails here
        os.environ[masks.STREAM_CODE_ENV] = stream_code  # the actors inherit it (left set)
    # Ours as a run with these settings would be configured (a bad value fails here).
    cfg = load_config(None, ["secagg.enabled=true", f"clients={clients}",
                             f"clients_per_round={clients}", "privacy.enabled=false",
                             f"secagg.unmask={unmask}"])
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import flwr.simulation
    from flwr.serverapp import ServerApp

    times: dict[str, list[float]] = {"plain": [], "secagg": [], "flower_secaggplus": []}
    extra: dict[str, Any] = {}
    failure: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context: Context) -> None:
        try:
            # The same grid, so the same polling, for all three kinds.
            if pull_interval is not None:
                poll_replies_every(grid, pull_interval)
            extra["grid_pull_interval_s"] = getattr(grid, "pull_interval", None)
            kinds = _Rounds(grid, context, cfg, clients, params, cpu_split)
            # Ray starts its actors and loads the ClientApp on first use: an untimed
            # plain round takes that cost (and the clients draw their fixed delta then),
            # so it lands in no kind's figure.
            extra["warmup_s"] = kinds.plain(0, ConfigRecord({WARMUP: True}))
            extra["secagg_setup_s"] = kinds.setup_secagg()
            # Each kind's first round in an actor also pays once for what later rounds
            # reuse (code paths run for the first time, working buffers): one untimed
            # round of each kind, so the medians are the cost per round of a long run.
            extra["first_round_s"] = {"secagg": kinds.ours(1),
                                      "flower_secaggplus": kinds.flower(1)}
            kinds.forget_records()
            for r in range(2, rounds + 2):
                times["plain"].append(kinds.plain(r))
                times["secagg"].append(kinds.ours(r))
                times["flower_secaggplus"].append(kinds.flower(r))
            extra["max_abs_error"] = kinds.errors
            extra["client_cpu_ms"] = kinds.grid.client_cpu_ms
            extra["client_stream_codes"] = sorted(kinds.grid.client_stream_codes)
            extra["unmask_cpu_ms"] = kinds.grid.unmask_cpu_ms
            extra["unmask_asked"] = kinds.grid.unmask_asked
            extra["phases"] = kinds.phases
            extra["exchange_cpu"] = kinds.exchange_cpu
            extra["ray_peak_rss_mb"] = _descendant_peak_rss_mb()
        except BaseException as err:  # surfaced after the simulation ends
            failure.append(err)
            raise

    cores = os.cpu_count() or 1
    backend = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
               "init_args": {"num_cpus": cores, "include_dashboard": False,
                             "logging_level": logging.ERROR, "log_to_driver": False}}
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)
    started = time.perf_counter()
    try:
        with prompt_dispatch(dispatch == "prompt") as prompted:
            flwr.simulation.run_simulation(server_app=server_app, client_app=client_app,
                                           num_supernodes=clients, backend_config=backend)
    finally:
        flwr_logger.setLevel(level)
    wall = time.perf_counter() - started
    if failure:
        raise RuntimeError(f"the benchmark ServerApp failed: {failure[0]!r}") from failure[0]
    if any(len(v) != rounds for v in times.values()):
        raise RuntimeError(f"the simulation ended early: {times}")

    medians = {k: round(statistics.median(v), 4) for k, v in times.items()}
    return {
        "clients": clients, "params": params, "rounds": rounds,
        "plain_s": medians["plain"], "secagg_s": medians["secagg"],
        "flower_secaggplus_s": medians["flower_secaggplus"],
        "secagg_over_plain": round(medians["secagg"] / medians["plain"], 3),
        "flower_over_ours": round(medians["flower_secaggplus"] / medians["secagg"], 3),
        "secagg_setup_s": round(extra["secagg_setup_s"], 4),
        "warmup_s": round(extra["warmup_s"], 2),
        "first_round_s": {k: round(v, 4) for k, v in extra["first_round_s"].items()},
        "rounds_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "phases_s": {k: round(statistics.median(v), 4) for k, v in extra["phases"].items()},
        # With cpu_split: per exchange kind, the median CPU seconds of each process group.
        "exchange_cpu_s": ({phase: {g: round(statistics.median(c[g] for c in cpus), 3)
                                    for g in ("server", "clients", "ray")}
                            for phase, cpus in extra["exchange_cpu"].items() if cpus}
                           if cpu_split else None),
        "max_abs_error": {k: float(f"{v:.3g}") for k, v in extra["max_abs_error"].items()},
        # Ours: CPU per masked reply inside the actors (thread_time), median and max.
        "secagg_client_cpu_ms": _median_and_max(extra["client_cpu_ms"]),
        # Ours: clients asked per unmask exchange (median), and each answer's CPU likewise.
        "secagg_unmask_asked": (statistics.median(extra["unmask_asked"])
                                if extra["unmask_asked"] else None),
        "secagg_unmask_client_cpu_ms": _median_and_max(extra["unmask_cpu_ms"]),
        "flower_num_shares": FLOWER_NUM_SHARES, "flower_threshold": FLOWER_THRESHOLD,
        "flower_separate_simulation": False,
        "grid_pull_interval_s": extra.get("grid_pull_interval_s"),
        "dispatch": "prompt" if prompted else "flower", "unmask": unmask,
        # Ours: the code(s) the clients drew their mask streams with (masks.stream_code).
        "secagg_client_stream_codes": extra["client_stream_codes"],
        "cpus_per_client": cpus_per_client, "ray_actors": int(cores // cpus_per_client),
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "ray_peak_rss_mb": round(extra.get("ray_peak_rss_mb", 0.0), 1),
    }
