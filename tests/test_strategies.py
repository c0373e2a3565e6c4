"""Each rule on small hand-checked inputs, through the strategies our config builds."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from consortia.client.trainer import LocalTrainer
from consortia.config import ConfigError, load_config
from consortia.messages import TrainInstructions
from consortia.strategies import build_strategy
from consortia.tasks import get_task

pytestmark = pytest.mark.usefixtures("task_identity")


class FakeGrid:
    def __init__(self, n):
        self.nodes = list(range(1, n + 1))

    def get_node_ids(self):
        return self.nodes


def strategy(name, n, *params):
    cfg = load_config(None, [f"clients={n}", f"clients_per_round={n}",
                             f"strategy.name={name}", *params])
    return build_strategy(cfg)


def replies(values, weights=None):
    weights = weights or [1] * len(values)
    return [Message(content=RecordDict({
        "arrays": ArrayRecord({"w": Array(np.asarray(v, dtype=np.float32))}),
        "metrics": MetricRecord({"num-examples": w})}), dst_node_id=i + 1, message_type="train")
        for i, (v, w) in enumerate(zip(values, weights, strict=True))]


def aggregate(rule, current, values, weights=None, server_round=1, sampled=None):
    """The rule's new model (None: it kept the old), `sampled` clients asked (default:
    those that replied)."""
    arrays = ArrayRecord({"w": Array(np.asarray(current, dtype=np.float32))})
    list(rule.configure_train(server_round, arrays, ConfigRecord(),
                              FakeGrid(sampled or len(values))))
    out, _ = rule.aggregate_train(server_round, replies(values, weights))
    return None if out is None else out["w"].numpy()


def test_fedavg_is_the_example_weighted_mean():
    out = aggregate(strategy("fedavg", 3), [0, 0], [[1, 2], [3, 4], [5, 6]], [1, 1, 2])
    assert np.allclose(out, [(1 + 3 + 10) / 4, (2 + 4 + 12) / 4])


def test_fedavgm_applies_server_momentum_to_the_pseudo_gradient():
    rule = strategy("fedavgm", 2, "strategy.server_lr=1.0", "strategy.server_momentum=0.5")
    first = aggregate(rule, [0.0], [[1.0], [1.0]], server_round=1)
    assert np.allclose(first, [1.0])  # momentum buffer = 1
    second = aggregate(rule, first, [[2.0], [2.0]], server_round=2)
    assert np.allclose(second, [1.0 + (0.5 * 1.0 + 1.0)])  # buffer = 0.5·1 + 1


def test_fedadam_first_step_matches_the_formula():
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    rule = strategy("fedadam", 2, f"strategy.server_lr={eta}", f"strategy.beta_1={b1}",
                    f"strategy.beta_2={b2}", f"strategy.tau={tau}")
    out = aggregate(rule, [0.0, 0.0], [[1.0, -2.0], [1.0, -2.0]])
    delta = np.array([1.0, -2.0])
    m, v = (1 - b1) * delta, (1 - b2) * delta**2
    # Flower's FedAdam bias-corrects eta with exponent server_round + 1 (here 2).
    eta_t = eta * np.sqrt(1 - b2**2) / (1 - b1**2)
    assert np.allclose(out, eta_t * m / (np.sqrt(v) + tau), rtol=1e-5)


def test_median_and_trimmed_mean_by_hand():
    values = [[1.0], [2.0], [3.0], [4.0], [100.0]]
    assert np.allclose(aggregate(strategy("median", 5), [0.0], values), [3.0])
    trimmed = strategy("trimmed-mean", 5, "strategy.beta=0.2")
    assert np.allclose(aggregate(trimmed, [0.0], values), [3.0])  # mean of 2, 3, 4


@pytest.mark.parametrize("name, params", [
    ("krum", ["strategy.num_malicious=1"]),
    ("multikrum", ["strategy.num_malicious=1", "strategy.num_selected=3"]),
    ("median", []),
    ("trimmed-mean", ["strategy.beta=0.2"]),
    ("bulyan", ["strategy.num_malicious=1"]),
])
def test_robust_rules_ignore_an_outlier_that_moves_fedavg(name, params):
    honest = [[1.0 + 0.01 * i, 1.0 - 0.01 * i] for i in range(6)]
    values = honest + [[1000.0, -1000.0]]
    fedavg = aggregate(strategy("fedavg", 7), [0, 0], values)
    robust = aggregate(strategy(name, 7, *params), [0, 0], values)
    assert np.abs(fedavg - 1).max() > 100
    assert np.abs(robust - 1).max() < 0.1


@pytest.mark.parametrize("name, params, honest, attackers", [
    # f = 2 and 7 sampled (7 >= 2f + 3), but 2 dropped: Flower's Krum scores each of the 5
    # on max(1, n - f - 2) = 1 neighbour, so two colluding attackers score 0 and win.
    ("krum", ["strategy.num_malicious=2"], 3, 2),
    ("multikrum", ["strategy.num_malicious=2", "strategy.num_selected=3"], 3, 2),
    # beta = 0.2 of 5 sampled cuts one from each end; of 4 replies int(0.8) = 0: the mean.
    ("trimmed-mean", ["strategy.beta=0.2"], 3, 1),
])
def test_robust_rules_keep_the_model_when_too_few_updates_arrive(name, params, honest,
                                                                 attackers, caplog):
    sampled = 7 if "krum" in name else 5
    values = [[1.0 + 0.01 * i, 1.0 - 0.01 * i] for i in range(honest)]
    values += [[1000.0, -1000.0]] * attackers
    rule = strategy(name, sampled, *params)
    assert np.abs(aggregate(rule, [0, 0], values + [[1.0, 1.0]] * (sampled - len(values)))
                  - 1).max() < 0.1  # all replied: the attackers are kept out
    with caplog.at_level("WARNING", logger="consortia.server"):
        assert aggregate(strategy(name, sampled, *params), [0, 0], values,
                         sampled=sampled) is None
    assert f"{len(values)} valid update(s), {name} needs at least" in caplog.text


@pytest.mark.parametrize("name, params", [
    ("krum", ["strategy.num_malicious=1"]),
    ("multikrum", ["strategy.num_malicious=1", "strategy.num_selected=3"]),
    ("bulyan", ["strategy.num_malicious=1"]),
])
def test_krum_scores_a_float16_model_exactly(name, params):
    """A float16 model whose squared norm passes float16's 65504: Flower's distances
    (‖a‖² + ‖b‖² − 2a·b in float16) were all NaN and its Krum kept the first reply, here
    the attacker's."""
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 100_000).astype(np.float16)
    honest = [(base + rng.normal(0, 0.01, base.size)).astype(np.float16) for _ in range(6)]
    attacker = (base - 10 * (honest[0] - base)).astype(np.float16)  # sign-flip, s = 10
    rule = strategy(name, 7, *params)
    current = ArrayRecord({"w": Array(base)})
    list(rule.configure_train(1, current, ConfigRecord(), FakeGrid(7)))
    msgs = [Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(v)}),
                                        "metrics": MetricRecord({"num-examples": 1})}),
                    dst_node_id=i + 1, message_type="train")
            for i, v in enumerate([attacker, *honest])]
    out, _ = rule.aggregate_train(1, msgs)
    moved = np.abs(out["w"].numpy().astype(np.float64) - base).max()
    assert moved < 0.1  # an honest update moves a weight by ~0.04 at most, the attack ~0.4


def test_trimmed_mean_that_would_cut_nothing_fails_at_start():
    with pytest.raises(ConfigError, match=r"trimmed-mean with strategy.beta = 0.2 cuts "
                                          r"int\(0.2 \* 4\) = 0 updates"):
        load_config(None, ["strategy.name=trimmed-mean"])  # beta 0.2 (Flower's), K = 4
    load_config(None, ["strategy.name=trimmed-mean", "strategy.beta=0.25"])
    load_config(None, ["strategy.name=trimmed-mean", "strategy.beta=0"])  # the mean, asked


def test_fedprox_sends_mu_and_the_client_pulls_toward_the_global_model(tmp_path):
    rule = strategy("fedprox", 2, "strategy.mu=0.5")
    arrays = ArrayRecord({"w": Array(np.zeros(1, np.float32))})
    config = ConfigRecord({"run_id": "r", "task": "digits-mlp", "model_activation": "tanh",
                           "local_epochs": 2, "batch_size": 32, "lr": 0.5, "momentum": 0.0,
                           "seed": 0, "dp_enabled": False, "max_grad_norm": 1.0,
                           "planned_rounds": 1})
    (msg, _) = rule.configure_train(1, arrays, config, FakeGrid(2))
    _, ins = TrainInstructions.from_content(msg.content)
    assert ins.proximal_mu == 0.5

    task = get_task("digits-mlp")
    data = task.load_data(None).train
    torch.manual_seed(0)
    start = task.build_model("tanh")

    def distance(mu):
        model = task.build_model("tanh")
        model.load_state_dict(start.state_dict())
        t = LocalTrainer("0", task, data, None, torch.device("cpu"), seeded=True)
        _, weights = t.train(model, ins.model_copy(update={"proximal_mu": mu}), 1)
        return sum(float((weights[k] - v).norm() ** 2) for k, v in start.state_dict().items())

    assert distance(0.5) < 0.8 * distance(0.0)


def test_strategy_parameters_are_validated_at_start():
    with pytest.raises(ConfigError, match="strategy.mu does not apply to 'fedavg'"):
        load_config(None, ["strategy.mu=0.1"])
    with pytest.raises(ConfigError, match=r"strategy.beta: Input should be less than 0.5"):
        load_config(None, ["strategy.name=trimmed-mean", "strategy.beta=0.5"])
    with pytest.raises(ConfigError, match=r"bulyan .* needs clients_per_round >= 4f \+ 3 = 7"):
        load_config(None, ["strategy.name=bulyan", "strategy.num_malicious=1"])
    with pytest.raises(ConfigError, match="accepted|Input should be"):
        load_config(None, ["strategy.name=fedsgd"])
    for rule in ("krum", "median", "trimmed-mean", "bulyan", "multikrum"):
        with pytest.raises(ConfigError, match=f"strategy.name = '{rule}'.*secure aggregation"):
            load_config(None, ["clients=8", "clients_per_round=8", f"strategy.name={rule}",
                               "secagg.enabled=true"])


@pytest.mark.parametrize("name, params", [
    ("fedavg", []), ("fedavgm", ["strategy.server_momentum=0.9"]),
    ("fedadam", ["strategy.server_lr=0.1"]), ("fedyogi", []), ("fedadagrad", []),
    ("fedprox", ["strategy.mu=0.1"]),
])
def test_server_rules_give_the_same_model_from_the_secure_sum_as_from_each_update(name, params):
    """Under secure aggregation the rule gets one reply carrying global + mean update."""
    from consortia.server.aggregates import UpdateSum, aggregate_reply

    current = ArrayRecord({"w": Array(np.asarray([0.5, -0.5], dtype=np.float32))})
    values, weights = [[1.0, 2.0], [3.0, -1.0], [0.0, 0.5]], [10, 20, 30]
    individual = strategy(name, 3, *params)
    list(individual.configure_train(1, current, ConfigRecord(), FakeGrid(3)))
    expected, _ = individual.aggregate_train(1, replies(values, weights))

    summed = UpdateSum.of_replies(replies(values, weights), current, weighted=True)
    mean = {k: t / summed.weight for k, t in summed.total.items()}
    secure = strategy(name, 3, *params)
    list(secure.configure_train(1, current, ConfigRecord(), FakeGrid(3)))
    got, _ = secure.aggregate_train(1, [aggregate_reply(current, mean, summed.num_examples)])
    assert np.allclose(got["w"].numpy(), expected["w"].numpy(), atol=1e-6)


def test_the_global_model_keeps_its_dtypes_whatever_the_rule_returns():
    from consortia.server.aggregates import match_dtypes

    current = ArrayRecord({"w": Array(np.asarray([0.5, -0.5], dtype=np.float32))})
    rule = strategy("fedadam", 2, "strategy.server_lr=0.01")
    list(rule.configure_train(1, current, ConfigRecord(), FakeGrid(2)))
    out, _ = rule.aggregate_train(1, replies([[1.0, 2.0], [3.0, 4.0]]))
    fixed = match_dtypes(out, current)
    assert fixed["w"].numpy().dtype == np.float32
    assert np.allclose(fixed["w"].numpy(), out["w"].numpy())


@pytest.mark.slow
def test_fedadam_keeps_training_after_the_first_round(tmp_path):
    from pathlib import Path

    from consortia.server.results import read_jsonl
    from consortia.simulations.runner import run_simulation

    smoke = Path(__file__).resolve().parents[1] / "simulations" / "experiments" / "digits-dp-smoke.toml"
    cfg = load_config(smoke, ["rounds=3", "privacy.enabled=false", "strategy.name=fedadam",
                              "strategy.server_lr=0.05"])
    run_simulation(cfg, tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["clients_trained"] for r in rows] == [4, 4, 4]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
