"""`consortia bench sim`: what our runner costs per client and round, against bare Flower.

Both federations run in this process on Flower's simulation engine with the same number
of virtual clients, clients sampled per round and rounds, and no training:

* ours: `run_simulation` with `local_epochs = 0` (clients build their site, check the
  request and reply with the model unchanged; the server inspects every reply,
  aggregates, evaluates on the test set, checkpoints and records the round, run store
  included);
* Flower: a ServerApp running Flower's FedAvg (`configure_train`, `send_and_receive`,
  `aggregate_train`) against a ClientApp that echoes the model.

The figure is the median round time divided by the clients per round; the first round
(Ray's actors starting) is left out of both. Each server looks for replies every so often
(Flower's grid `pull_interval`): ours at `sim.poll_interval_s`, bare Flower at Flower's
default unless `flower_poll_interval_s` says otherwise; the JSON states both, and the
1-minute load average before and after (other work on the machine slows both sides).
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from consortia.config import ConfigError, load_config
from consortia.server.results import read_jsonl
from consortia.simulations.dispatch import check_dispatch, prompt_dispatch
from consortia.tasks import get_task

TASK = "digits-mlp"


def flower_default_poll_interval() -> float:
    """The seconds Flower's simulation grid waits between looks for replies, by default."""
    from flwr.superlink.grid import InMemoryGrid

    return inspect.signature(InMemoryGrid).parameters["pull_interval"].default


def _flower_apps(per_round: int, clients: int, rounds: int, times: list[float],
                 poll_interval_s: float | None = None):
    client_app = ClientApp()

    @client_app.train()
    def echo(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"arrays": msg.content["arrays"],
                                   "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if poll_interval_s is not None:  # else Flower's own default
            grid.pull_interval = poll_interval_s
        strategy = FedAvg(fraction_train=per_round / clients, min_train_nodes=per_round,
                          min_available_nodes=clients, fraction_evaluate=0.0)
        arrays = ArrayRecord(get_task(TASK).build_model("tanh").state_dict())
        for server_round in range(1, rounds + 1):
            started = time.perf_counter()
            messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
            replies = grid.send_and_receive(messages, timeout=600)
            new, _ = strategy.aggregate_train(server_round, replies)
            arrays = new or arrays
            times.append(time.perf_counter() - started)

    return server_app, client_app


def bench_sim(clients: int = 1000, per_round: int = 100, rounds: int = 4,
              cpus_per_client: float = 1.0, poll_interval_s: float | None = None,
              flower_poll_interval_s: float | None = None, dispatch: str | None = None,
              flower_dispatch: str = "flower") -> dict[str, Any]:
    """`poll_interval_s`: ours (`sim.poll_interval_s`; None: the config's default);
    `flower_poll_interval_s`: the bare Flower server's (None: Flower's default).
    `dispatch`: ours (`sim.dispatch`; None: the config's default, prompt);
    `flower_dispatch`: the bare Flower simulation's, Flower's own loop unless "prompt"."""
    import flwr.simulation

    from consortia.simulations.runner import run_simulation

    # Validated before either federation starts: bad sizes fail here, not in a Flower loop
    # that waits for nodes that will never come.
    cfg = load_config(None, [f"task={TASK}", f"clients={clients}", f"clients_per_round={per_round}",
                             f"rounds={rounds}", "local_epochs=0", "privacy.enabled=false",
                             f"sim.num_cpus_per_client={cpus_per_client}"]
                      + ([] if poll_interval_s is None else [f"sim.poll_interval_s={poll_interval_s}"])
                      + ([] if dispatch is None else [f"sim.dispatch={dispatch}"]))
    if rounds < 2:
        raise ConfigError(f"bench sim needs rounds >= 2 (the first is left out), got {rounds}")
    if flower_poll_interval_s is not None and not 0 < flower_poll_interval_s <= 1:
        raise ConfigError(f"flower_poll_interval_s must be in (0, 1] seconds (as "
                          f"sim.poll_interval_s), got {flower_poll_interval_s}")
    check_dispatch(flower_dispatch, "flower_dispatch")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    backend = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
               "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                             "logging_level": logging.ERROR, "log_to_driver": False}}

    load_before = os.getloadavg()[0]  # the machine's other work shows in both figures
    flower_times: list[float] = []
    server_app, client_app = _flower_apps(per_round, clients, rounds, flower_times,
                                          flower_poll_interval_s)
    random.seed(0)
    with prompt_dispatch(flower_dispatch == "prompt"):
        flwr.simulation.run_simulation(server_app=server_app, client_app=client_app,
                                       num_supernodes=clients, backend_config=backend)

    with tempfile.TemporaryDirectory(prefix="consortia-bench-sim-") as out:
        run_simulation(cfg, out)
        ours_times = [r["duration_s"] for r in read_jsonl(Path(out) / "metrics.jsonl")]

    ours = statistics.median(ours_times[1:]) / per_round * 1000
    flower = statistics.median(flower_times[1:]) / per_round * 1000
    return {
        "clients": clients, "per_round": per_round, "rounds": rounds,
        "params": sum(p.numel() for p in get_task(TASK).build_model("tanh").parameters()),
        "ours_ms_per_client": round(ours, 3), "flower_ms_per_client": round(flower, 3),
        "ours_over_flower": round(ours / flower, 3),
        "ours_poll_interval_s": cfg.sim.poll_interval_s,
        "flower_poll_interval_s": (flower_default_poll_interval() if flower_poll_interval_s is None
                                   else flower_poll_interval_s),
        "ours_dispatch": cfg.sim.dispatch, "flower_dispatch": flower_dispatch,
        "ours_round_s": [round(t, 3) for t in ours_times],
        "flower_round_s": [round(t, 3) for t in flower_times],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
