from pathlib import Path

import numpy as np
import pytest
import torch

from consortia.config import ConfigError, load_config
from consortia.server.results import read_jsonl
from consortia.simulations.faults import ByzantineUpdate, byzantine_clients
from consortia.simulations.runner import run_simulation

SMOKE = Path(__file__).resolve().parents[1] / "simulations" / "experiments" / "digits-dp-smoke.toml"


def test_byzantine_clients_are_fixed_by_the_seed():
    chosen = byzantine_clients(20, 0.2, seed=3)
    assert len(chosen) == 4 and chosen == byzantine_clients(20, 0.2, seed=3)
    assert chosen != byzantine_clients(20, 0.2, seed=4)
    assert byzantine_clients(20, 0.0, seed=3) == frozenset()


def test_attacks_transform_the_update_as_documented():
    old = {"w": torch.zeros(3)}
    new = {"w": torch.tensor([1.0, -2.0, 0.5])}
    flipped = ByzantineUpdate("sign-flip", 4.0, seed=0)(old, new)["w"]
    assert torch.allclose(flipped, torch.tensor([-4.0, 8.0, -2.0]))
    scaled = ByzantineUpdate("scale", 10.0, seed=0)(old, new)["w"]
    assert torch.allclose(scaled, torch.tensor([10.0, -20.0, 5.0]))
    noise = ByzantineUpdate("gaussian", 2.0, seed=0)({"w": torch.zeros(100_000)},
                                                     {"w": torch.zeros(100_000)})["w"]
    assert abs(float(noise.std()) - 2.0) < 0.05


def test_fault_config_is_validated():
    with pytest.raises(ConfigError, match="faults.byzantine_kind"):
        load_config(None, ["faults.byzantine_kind=label-flip"])
    with pytest.raises(ConfigError, match="faults.dropout"):
        load_config(None, ["faults.dropout=1.5"])


@pytest.mark.slow
def test_sign_flippers_wreck_fedavg_but_not_the_median(tmp_path):
    common = ["clients=8", "clients_per_round=8", "rounds=3", "privacy.enabled=false",
              "faults.byzantine_fraction=0.25", "faults.byzantine_kind=sign-flip",
              "faults.byzantine_scale=5"]
    fedavg = run_simulation(load_config(SMOKE, common), tmp_path / "fedavg")
    median = run_simulation(load_config(SMOKE, common + ["strategy.name=median",
                                                         "faults.dropout=0.2"]),
                            tmp_path / "median")
    assert median["final_accuracy"] > fedavg["final_accuracy"] + 0.2
    rows = read_jsonl(tmp_path / "median" / "metrics.jsonl")
    failed = [r["clients_failed"] for r in rows]
    assert sum(failed) > 0  # dropouts happened and the rounds completed without them
    assert all(r["clients_trained"] + r["clients_failed"] == 8 for r in rows)
    assert np.isfinite([r["accuracy"] for r in rows]).all()
    # A client whose request failed is named as it identified itself, not by its node id.
    participation = read_jsonl(tmp_path / "median" / "participation.jsonl")
    clients = {p["client_id"] for p in participation if p["status"] == "trained"}
    failed_ids = {p["client_id"] for p in participation if p["status"] == "failed"}
    assert failed_ids and failed_ids <= clients, failed_ids
