"""The prompt dispatcher (simulations/dispatch.py) in Flower's real simulation engine."""

import os
import threading

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce import vce_api
from flwr.serverapp import Grid, ServerApp

from consortia.simulations import dispatch
from consortia.simulations.dispatch import prompt_dispatch, supported


def _apps(seen_dir: str, nodes: int, found: dict):
    client_app = ClientApp()

    @client_app.query()
    def echo(msg: Message, context: Context) -> Message:
        # One file per message id, created exclusively: a message handed out twice fails.
        with open(os.path.join(seen_dir, msg.metadata.message_id), "x"):
            pass
        value = msg.content["c"]["value"]
        return Message(RecordDict({"c": ConfigRecord({"value": value, "node": context.node_id})}),
                       reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        ids = sorted(grid.get_node_ids())
        while len(ids) < nodes:
            threading.Event().wait(0.05)
            ids = sorted(grid.get_node_ids())
        state = getattr(grid, "state", None)
        # Exchange 1: one message per node; exchange 2: three messages each to two nodes.
        plans = [[(n, i) for i, n in enumerate(ids)],
                 [(n, 100 + 10 * j + i) for j, n in enumerate(ids[:2]) for i in range(3)]]
        for plan in plans:
            messages = [Message(RecordDict({"c": ConfigRecord({"value": v})}), dst_node_id=n,
                                message_type="query") for n, v in plan]
            replies = list(grid.send_and_receive(messages, timeout=60))
            found.setdefault("errors", []).extend(r.error.reason for r in replies if r.has_error())
            found.setdefault("replies", []).extend(
                (r.content["c"]["node"], r.content["c"]["value"]) for r in replies if not r.has_error())
            found.setdefault("sent", []).extend(plan)
        found["wrapped"] = hasattr(getattr(state, "store_message_ins", None), "__wrapped__")
        found["supported"] = state is not None and supported(state)

    return server_app, client_app


def _simulate(tmp_path, enabled: bool) -> dict:
    import flwr.simulation

    found: dict = {}
    seen = tmp_path / "seen"
    seen.mkdir()
    server_app, client_app = _apps(str(seen), 4, found)
    flower_loop = vce_api.add_messages_to_queue
    with prompt_dispatch(enabled) as in_place:
        found["in_place"] = in_place
        flwr.simulation.run_simulation(
            server_app=server_app, client_app=client_app, num_supernodes=4,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"num_cpus": 2, "include_dashboard": False}})
    found["restored"] = vce_api.add_messages_to_queue is flower_loop
    found["seen"] = sorted(p.name for p in seen.iterdir())
    return found


@pytest.mark.slow
@pytest.mark.parametrize("enabled", [True, False], ids=["prompt", "flower"])
def test_every_message_reaches_its_node_once_and_flowers_loop_is_restored(tmp_path, enabled):
    found = _simulate(tmp_path, enabled)
    assert found["errors"] == []
    assert sorted(found["replies"]) == sorted(found["sent"])  # each reply from its own node
    assert len(found["seen"]) == len(found["sent"]) == 10  # no message handled twice
    assert found["supported"]  # the simulation's link state is one the dispatcher reads
    assert found["in_place"] is enabled and found["wrapped"] is enabled
    assert found["restored"]


def test_a_link_state_it_cannot_read_is_left_to_flowers_loop():
    calls = []
    stop = threading.Event()

    def flower_loop(state, queue, nodes_mapping, f_stop):
        calls.append((state, nodes_mapping))

    state = object()  # no message store, no lock: not Flower's in-memory state
    dispatch._dispatch(state, None, {1: 0}, stop, flower_loop=flower_loop)
    assert calls == [(state, {1: 0})]
    assert not supported(state)


def test_a_link_state_that_fails_to_read_hands_over_to_flowers_loop(caplog):
    calls = []

    class Changed:  # has what the dispatcher looks for, but reading it fails
        lock = threading.RLock()
        message_ins_store: dict = {}

        def _check_stored_messages(self, ids):
            raise AttributeError("no such field")

        def store_message_ins(self, message):
            return None

    def flower_loop(state, queue, nodes_mapping, f_stop):
        calls.append(state)

    state = Changed()
    with caplog.at_level("ERROR", logger="consortia.simulations"):
        dispatch._dispatch(state, None, {1: 0}, threading.Event(), flower_loop=flower_loop)
    assert calls == [state]
    assert "Flower's loop takes over" in caplog.text
