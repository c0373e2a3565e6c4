import re
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
    flipped = ByzantineUpdate("sign-flip", 4.0, seed=0)(old, new, 1)["w"]
    assert torch.allclose(flipped, torch.tensor([-4.0, 8.0, -2.0]))
    scaled = ByzantineUpdate("scale", 10.0, seed=0)(old, new, 1)["w"]
    assert torch.allclose(scaled, torch.tensor([10.0, -20.0, 5.0]))
    gaussian = ByzantineUpdate("gaussian", 2.0, seed=0)
    zeros = {"w": torch.zeros(100_000)}
    noise = gaussian(zeros, zeros, 1)["w"]
    assert abs(float(noise.std()) - 2.0) < 0.05
    # Fresh noise every round (the same noise each round would be a constant bias, an
    # attack of another kind), reproducible for a given seed and round.
    again, round_2 = gaussian(zeros, zeros, 1)["w"], gaussian(zeros, zeros, 2)["w"]
    assert torch.equal(noise, again)
    assert abs(float(torch.corrcoef(torch.stack([noise, round_2]))[0, 1])) < 0.02
    other_seed = ByzantineUpdate("gaussian", 2.0, seed=1)(zeros, zeros, 1)["w"]
    assert not torch.equal(noise, other_seed)


def test_fault_config_is_validated():
    with pytest.raises(ConfigError, match="faults.byzantine_kind"):
        load_config(None, ["faults.byzantine_kind=label-flip"])
    with pytest.raises(ConfigError, match="faults.dropout"):
        load_config(None, ["faults.dropout=1.5"])


@pytest.mark.usefixtures("task_identity")
def test_an_injected_dropout_is_an_error_reply_not_a_raised_exception():
    # Raised, it reached Flower's engine, which logs each ClientApp exception as two ERROR
    # records holding Ray's whole chained traceback: about 100 console lines per dropout.
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from consortia.messages import CONFIG, SERVER_ROUND
    from consortia.server.validation import report_outcome
    from consortia.simulations.faults import DropoutsAndStragglers

    request = Message(RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: 2})}), dst_node_id=103,
                      message_type="train")
    context = Context(run_id=1, node_id=103, state=RecordDict(), run_config={},
                      node_config={"partition-id": 3, "num-partitions": 4})
    trained = []

    def call_next(msg, ctx):
        trained.append(msg)
        return Message(RecordDict(), reply_to=msg)

    reply = DropoutsAndStragglers(dropout=0.999999, straggler_s=0.0, seed=0)(
        request, context, call_next)
    assert not trained and reply.has_error()
    outcome = report_outcome(reply)
    assert (outcome.status, outcome.reason) == (
        "failed", "client error: ConnectionError: injected dropout of client 3 in round 2")
    kept = DropoutsAndStragglers(dropout=0.0, straggler_s=0.0, seed=0)(request, context, call_next)
    assert len(trained) == 1 and not kept.has_error()


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
    # The summary names the attackers, as the sites drew them from the seed.
    attackers = sorted(str(i) for i in byzantine_clients(8, 0.25, seed=0))
    assert len(attackers) == 2
    assert fedavg["byzantine_clients"] == median["byzantine_clients"] == attackers
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
    # ... and by the exception it raised, on one line, not Ray's whole traceback.
    reasons = {p["reason"] for p in participation if p["status"] == "failed"}
    assert all(r.startswith("client error: ConnectionError: injected dropout of client ")
               and "\n" not in r for r in reasons), reasons


@pytest.mark.parametrize("n, k, t", [(6, 2, 2), (6, 4, 3), (7, 4, 2), (8, 3, 3)])
def test_the_abort_rule_is_the_secure_aggregation_servers_on_every_dropout_pattern(n, k, t):
    # Every pattern of clients dropping before masking, through the real protocol: the
    # server aborts exactly when secagg_aborts says it does.
    import itertools

    from consortia.privacy.secagg import (
        ClientSecAggSession,
        SecAggAbort,
        ServerSecAggSession,
        encode,
        max_bits,
    )
    from consortia.privacy.secagg.round_plan import RoundPlan
    from consortia.simulations.faults import secagg_aborts

    clients = {node: ClientSecAggSession(node_id=node, run_id=7) for node in range(n)}
    server = ServerSecAggSession(run_id=7)
    server.collect_advertisements({v: c.advertise_keys() for v, c in clients.items()})
    vector = encode(np.zeros(3), clip=1.0, bits=max_bits(n), num_clients=n)
    outcomes = []
    for round_num, alive in enumerate(itertools.product([True, False], repeat=n), start=1):
        setup = server.begin_round(round_num, list(clients), vector_length=3,
                                   num_neighbours=k, threshold=t)
        try:
            requests = server.collect_masked_inputs(
                {v: c.share_keys_and_mask_input(setup, vector)
                 for v, c in clients.items() if alive[v]})
            server.finish_round({v: clients[v].unmask(r) for v, r in requests.items()})
            aborted = False
        except SecAggAbort:
            aborted = True
        predicted = secagg_aborts(RoundPlan.from_setup(setup).graph, t, np.array([alive]))[0]
        assert predicted == aborted, (alive, aborted)
        outcomes.append(aborted)
    assert any(outcomes) and not all(outcomes)  # both kinds of pattern were met


def test_the_abort_rate_estimate_is_within_its_stated_margin_of_the_exact_rate():
    import itertools

    from consortia.privacy.secagg.graph import neighbour_graph
    from consortia.simulations.faults import abort_draws, secagg_abort_rate, secagg_aborts

    n, k, t, p = 10, 4, 3, 0.3
    patterns = np.array(list(itertools.product([True, False], repeat=n)))
    weights = np.prod(np.where(patterns, 1 - p, p), axis=1)
    graph = neighbour_graph(range(n), num_neighbours=k, seed=bytes(32))
    exact = float(weights @ secagg_aborts(graph, t, patterns))
    draws = abort_draws(n)
    estimate = secagg_abort_rate(n, k, t, p, draws)
    assert abs(estimate - exact) <= 3 * (exact * (1 - exact) / draws) ** 0.5  # as it says
    assert 0.3 < exact < 0.45  # a third of the rounds abort: worth a warning


def test_a_dropout_rate_that_aborts_secure_rounds_is_warned_of_at_start(caplog):
    from consortia.simulations.runner import start_checks

    secagg = ["secagg.enabled=true", "privacy.enabled=false"]
    start_checks(load_config(SMOKE, [*secagg, "faults.dropout=0.3"]))
    # 4 clients a round on a ring (k = 2, t = 2): a round aborts when fewer than 2 send
    # their masked input (0.3^4 + 4 · 0.7 · 0.3^3) or the 2 that do sit opposite each
    # other (2 · 0.7^2 · 0.3^2): 16.3 % of rounds.
    said = re.search(r"faults.dropout = 0.3 under secure aggregation \(4 clients a round, "
                     r"k = 2 neighbours, threshold t = 2\): about (\d+)% of rounds \(±(\d+)%",
                     caplog.text)
    assert said and abs(int(said[1]) - 16.3) <= int(said[2]) + 0.5, caplog.text
    caplog.clear()
    for quiet in (["faults.dropout=0.02", *secagg], ["faults.dropout=0.3", "privacy.enabled=false"]):
        start_checks(load_config(SMOKE, quiet))
    assert "faults.dropout" not in caplog.text


def test_a_byzantine_fraction_that_rounds_to_no_client_fails_at_start():
    """faults.byzantine_fraction = 0.1 of 4 clients drew no attacker: an attack run with
    nobody attacking, and summary.json's byzantine_clients empty."""
    with pytest.raises(ConfigError, match=r"faults.byzantine_fraction = 0.1 of clients = 4 is "
                                          r"0.4 clients, which rounds to none.*accepted: 0 "
                                          r"\(no attack\), or above 0.125 "
                                          r"\(round\(fraction · clients\) >= 1; 0.25 is one client\)"):
        load_config(None, ["faults.byzantine_fraction=0.1", "strategy.name=median"])
    with pytest.raises(ConfigError, match="rounds to none"):  # 0.5 rounds to 0 (half to even)
        load_config(None, ["faults.byzantine_fraction=0.125", "strategy.name=median"])
    # What the message accepts is what runs: just above 0.5 / clients is one attacker.
    for fraction, attackers in ((0.13, 1), (0.25, 1), (0.6, 2)):
        cfg = load_config(None, [f"faults.byzantine_fraction={fraction}", "strategy.name=median"])
        assert len(byzantine_clients(cfg.clients, cfg.faults.byzantine_fraction,
                                     cfg.seed)) == attackers


def test_attackers_under_distributed_dp_fail_at_start():
    """Under distributed DP a client sends a noisy gradient sum, which no attack transforms:
    sim run fmnist-dp-distributed-fast.toml --set faults.byzantine_fraction=0.3 ran with
    summary.json naming an attacker that never attacked."""
    distributed = Path(__file__).resolve().parents[1] / "simulations" / "experiments" / \
        "fmnist-dp-distributed-fast.toml"
    with pytest.raises(ConfigError, match=r"faults.byzantine_fraction = 0.3 with privacy.mode = "
                                          r"'distributed'.*accepted: faults.byzantine_fraction "
                                          r"= 0, or privacy.mode = 'local'"):
        load_config(distributed, ["faults.byzantine_fraction=0.3"])
    assert load_config(distributed, ["faults.byzantine_fraction=0.3", "privacy.mode=local"])
