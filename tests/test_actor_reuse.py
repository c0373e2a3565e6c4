"""What an actor process shares between the virtual clients it serves, and what it must not.

Ray runs many virtual clients in one actor process, one call at a time; the ClientApp,
the task's data and the model instance are built once per process (simulations/
shipping.py, simulations/sites.py). A client's reply must not depend on which client the
process served before, and the tensors must travel exactly as Flower encodes them.
"""

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from ray import cloudpickle

from consortia.client import build_client_app
from consortia.config import load_config
from consortia.messages import (
    ARRAYS,
    TrainInstructions,
    TrainReport,
    arrays_to_torch,
    decode_array,
    encode_array,
    torch_to_arrays,
)
from consortia.simulations.shipping import ShippedOnce
from consortia.simulations.sites import SimulationSites
from consortia.tasks import get_task

SMOKE = Path(__file__).resolve().parents[1] / "simulations" / "experiments" / "digits-dp-smoke.toml"

LAYOUTS = [
    np.random.default_rng(0).random((64, 65)).astype(np.float32),
    np.asfortranarray(np.random.default_rng(1).random((3, 4))),
    np.random.default_rng(2).random((5, 6))[:, ::2],  # not contiguous
    np.array(3.5),
    np.arange(10, dtype=np.int64),
    np.zeros((0, 3), np.float16),
    np.array([True, False]),
    np.random.default_rng(3).random((2, 3, 4)).astype(">f4"),
]


@pytest.mark.parametrize("value", LAYOUTS, ids=lambda v: f"{v.dtype.str}{v.shape}")
def test_tensors_encode_and_decode_exactly_as_flower_does(value):
    for _ in range(2):  # the first time numpy reads (writes) the header, then it is reused
        ours, flowers = encode_array(value), Array(value)
        assert ours.data == flowers.data
        assert (ours.dtype, ours.shape, ours.stype) == (flowers.dtype, flowers.shape, flowers.stype)
        decoded, expected = decode_array(flowers), flowers.numpy()
        assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
        assert np.array_equal(decoded, expected) and decoded.flags.writeable
        assert decoded.flags.f_contiguous == expected.flags.f_contiguous


def test_a_tensor_whose_data_does_not_fit_its_header_fails_as_numpy_fails():
    good = Array(LAYOUTS[0])
    decode_array(good)  # its header is now known
    truncated = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-4])
    with pytest.raises(ValueError, match="expected 16640 bytes"):
        decode_array(truncated)


def test_torch_state_dicts_round_trip():
    weights = get_task("digits-mlp").travelling_weights(get_task("digits-mlp").build_model())
    back = arrays_to_torch(torch_to_arrays(weights))
    assert list(back) == list(weights)
    assert all(back[k].equal(weights[k]) for k in weights)
    flowers = ArrayRecord(weights)
    assert all(torch_to_arrays(weights)[k].data == flowers[k].data for k in weights)


def test_a_shipped_client_app_is_unpickled_once_per_process():
    cfg = load_config(SMOKE)
    shipped = ShippedOnce(build_client_app(SimulationSites(cfg, "unused")))
    first, second = (pickle.loads(cloudpickle.dumps(shipped)) for _ in range(2))
    assert first is second
    assert not isinstance(first, ShippedOnce)  # the app itself, not the wrapper


def train_request(cfg, arrays: ArrayRecord, server_round: int) -> Message:
    ins = TrainInstructions(
        run_id="0f" * 8, task=cfg.task, model_activation=cfg.model.activation,
        local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
        momentum=cfg.momentum, seed=cfg.seed, dp_enabled=cfg.privacy.enabled,
        max_grad_norm=cfg.privacy.max_grad_norm, noise_multiplier=cfg.privacy.noise_multiplier,
        planned_rounds=cfg.planned_rounds_per_client)
    config = ins.to_config_record()
    config["server-round"] = server_round
    return Message(RecordDict({ARRAYS: arrays, "config": config}), dst_node_id=10,
                   message_type="train")


def context(partition: int, clients: int) -> Context:
    return Context(run_id=1, node_id=100 + partition, state=RecordDict(), run_config={},
                   node_config={"partition-id": partition, "num-partitions": clients})


@pytest.mark.usefixtures("task_identity")
def test_a_clients_update_does_not_depend_on_the_client_its_process_served_before(tmp_path):
    cfg = load_config(SMOKE, ["clients=6"])
    task = get_task(cfg.task, cfg.task_options())
    start = ArrayRecord(task.travelling_weights(task.build_model(cfg.model.activation)))

    def fresh_model(sites):  # the site as a process that builds a model for every call
        return lambda ctx: dataclasses.replace(sites(ctx), models=None)

    fresh = build_client_app(fresh_model(SimulationSites(cfg, tmp_path / "fresh")))
    reused = build_client_app(SimulationSites(cfg, tmp_path / "reused"))
    # The shared model first trains client 5 (from other weights) and keeps its gradients.
    other = ArrayRecord({k: Array(decode_array(a) + 0.5) for k, a in start.items()})
    assert TrainReport.from_content(
        reused(train_request(cfg, other, 1), context(5, 6)).content).status == "trained"

    replies = [app(train_request(cfg, start, 1), context(3, 6)) for app in (fresh, reused)]
    reports = [TrainReport.from_content(r.content) for r in replies]
    assert reports[0].status == "trained" and reports[0].epsilon > 0
    assert reports[0] == reports[1]
    updates = [{k: decode_array(a) for k, a in r.content[ARRAYS].items()} for r in replies]
    assert updates[0].keys() == updates[1].keys()
    assert all(np.array_equal(updates[0][k], updates[1][k]) for k in updates[0])
    assert not all(np.array_equal(updates[0][k], decode_array(start[k])) for k in updates[0])
