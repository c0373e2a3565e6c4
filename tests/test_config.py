import re
from pathlib import Path

import numpy as np
import pytest

from consortia.config import (
    ConfigError,
    config_to_dict,
    load_config,
    parse_override,
    validate_config,
)

EXPERIMENTS = Path(__file__).resolve().parents[1] / "simulations" / "experiments"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_every_example_config_validates():
    names = sorted(p.name for p in EXPERIMENTS.glob("*.toml"))
    assert {"digits-dp-smoke.toml", "fmnist-dp.toml", "fmnist-dp-noniid.toml",
            "fmnist-nodp.toml"} <= set(names)
    for path in EXPERIMENTS.glob("*.toml"):
        load_config(path)


def test_fmnist_dp_example_keeps_each_client_within_epsilon_3():
    cfg = load_config(EXPERIMENTS / "fmnist-dp.toml")
    assert cfg.clients == 10 and cfg.partition.kind == "iid"
    assert cfg.privacy.enabled and cfg.privacy.epsilon_budget <= 3 and cfg.privacy.delta == 1e-5
    assert load_config(EXPERIMENTS / "fmnist-dp-noniid.toml").partition.alpha == 0.5
    assert not load_config(EXPERIMENTS / "fmnist-nodp.toml").privacy.enabled


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, 'task = "digits-mlp"\nroundz = 3\n[privacy]\nepsilon_budjet = 2\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "roundz: unknown key" in str(err.value)
    assert "privacy.epsilon_budjet: unknown key" in str(err.value)


def test_wrong_type_and_out_of_range_name_the_value(tmp_path):
    path = write(tmp_path, 'rounds = "many"\nlr = -1\n[privacy]\ndelta = 2.0\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "rounds" in text and "'many'" in text
    assert "lr" in text and "greater than 0" in text
    assert "privacy.delta" in text and "less than 1" in text


@pytest.mark.parametrize("assignment, named", [
    ("clients=true", "clients: Input should be a valid integer (got True)"),
    ('rounds="3"', "rounds: Input should be a valid integer (got '3')"),
    ("privacy.enabled=yes", "privacy.enabled: Input should be a valid boolean (got 'yes')"),
    ("privacy.enabled=1", "privacy.enabled: Input should be a valid boolean (got 1)"),
    ("lr=inf", "lr: Input should be a finite number (got inf)"),
    ("faults.straggler_s=inf", "faults.straggler_s: Input should be a finite number (got inf)"),
    ("privacy.epsilon_budget=inf", "privacy.epsilon_budget: Input should be a finite number"),
])
def test_a_value_of_another_type_or_infinite_is_refused_not_coerced(assignment, named):
    # Lax pydantic ran `clients = true` as 1 client and `privacy.enabled = "yes"` as true.
    with pytest.raises(ConfigError) as err:
        load_config(None, [assignment])
    assert named in str(err.value)


def test_an_int_is_still_a_float():
    cfg = load_config(None, ["lr=1", "privacy.epsilon_budget=8", "secagg.enabled=true",
                             "secagg.threshold=3", "clients_per_round=4"])
    assert (cfg.lr, cfg.privacy.epsilon_budget, cfg.secagg.threshold) == (1.0, 8.0, 3.0)
    assert isinstance(cfg.lr, float)


def test_clients_per_round_cannot_exceed_clients():
    with pytest.raises(ConfigError, match=r"clients_per_round \(5\) must be at most clients \(4\)"):
        load_config(None, ["clients=4", "clients_per_round=5"])


def test_unknown_task_and_partition_kind_list_what_is_accepted():
    with pytest.raises(ConfigError, match="accepted: digits-mlp, fashion-mnist-cnn, "
                                          "reviews-minilm-lora, shakespeare-smollm2-lora"):
        load_config(None, ["task=cifar"])
    with pytest.raises(ConfigError, match="'iid', 'dirichlet' or 'natural'"):
        load_config(None, ["partition.kind=shards"])
    with pytest.raises(ConfigError, match=r"secagg.unmask: Input should be 'cover' or 'all' "
                                          r"\(got 'some'\)"):
        load_config(None, ["secagg.enabled=true", "secagg.unmask=some"])


def test_overrides_are_toml_values_with_dotted_sections(tmp_path):
    path = write(tmp_path, 'rounds = 3\n[privacy]\nenabled = true\n')
    cfg = load_config(path, ["rounds=7", "privacy.enabled=false", "partition.kind=dirichlet",
                             "partition.alpha=0.1", "privacy.noise_multiplier=1.5",
                             "strategy.name=fedavg", "task=digits-mlp"])
    assert cfg.rounds == 7 and cfg.privacy.enabled is False
    assert cfg.partition.kind == "dirichlet" and cfg.partition.alpha == 0.1
    assert cfg.privacy.noise_multiplier == 1.5
    assert config_to_dict(cfg)["partition"] == {"kind": "dirichlet", "alpha": 0.1,
                                                "min_samples": 10}


def test_malformed_override_and_missing_file_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("rounds")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "rounds = = 3"))
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(write(tmp_path, "rounds = 3"), ["rounds.x=1"])


def test_planned_participation_rounds_up():
    cfg = load_config(None, ["rounds=10", "clients=10", "clients_per_round=3"])
    assert cfg.planned_rounds_per_client == 3


def test_the_simulation_poll_interval_is_a_positive_number_of_seconds():
    assert load_config(None, ["sim.poll_interval_s=0.05"]).sim.poll_interval_s == 0.05
    for bad in ("0", "-0.1", "2"):
        with pytest.raises(ConfigError, match="sim.poll_interval_s"):
            load_config(None, [f"sim.poll_interval_s={bad}"])


def test_the_poll_interval_applies_to_a_grid_that_has_one_and_leaves_others_alone():
    from types import SimpleNamespace

    from consortia.server.directory import poll_replies_every

    simulated, deployed = SimpleNamespace(pull_interval=0.1), SimpleNamespace()
    poll_replies_every(simulated, 0.02)
    poll_replies_every(deployed, 0.02)
    assert simulated.pull_interval == 0.02 and not hasattr(deployed, "pull_interval")
    # The setting means something only while Flower's simulation grid has the attribute.
    from consortia.simulations.bench_sim import flower_default_poll_interval

    assert flower_default_poll_interval() == 0.1


@pytest.mark.parametrize(("sets", "message"), [
    # 4 clients a round: k = 2 neighbours, so 3 share holders per client.
    (["secagg.threshold=1"], "secagg.threshold = 1: a count must lie in [2, 3]"),
    (["secagg.threshold=7"], "secagg.threshold = 7: a count must lie in [2, 3]"),
    (["secagg.threshold=5", "secagg.neighbours=3"], "must lie in [2, 4]"),
])
def test_a_secagg_threshold_no_client_can_meet_fails_at_start(sets, message):
    base = ["clients=4", "clients_per_round=4", "secagg.enabled=true"]
    with pytest.raises(ConfigError) as err:
        load_config(None, base + sets)
    assert message in str(err.value)
    for fine in (["secagg.threshold=2"], ["secagg.threshold=3"], ["secagg.threshold=0.5"]):
        load_config(None, base + fine)


def _round_begins(participants: int, k: int, t: int) -> None:
    """Set up a secure round of `participants` with k and t as the server would."""
    from consortia.privacy.secagg import ClientSecAggSession, ServerSecAggSession

    clients = [ClientSecAggSession(node_id=i, run_id=1) for i in range(1, participants + 1)]
    server = ServerSecAggSession(run_id=1)
    server.collect_advertisements({c.node_id: c.advertise_keys() for c in clients})
    server.begin_round(1, [c.node_id for c in clients], vector_length=1,
                       num_neighbours=k, threshold=t)


def test_an_odd_k_on_an_odd_ring_has_k_share_holders_at_start_and_in_every_round():
    # k = 3 among 7: a ring gives each client 2 neighbours (graph.neighbour_graph), so 3
    # share holders; t = 4 passed the start check and stopped the run at round 1 with
    # "RoundSetup: threshold 4 must be in [2, 3]".
    from consortia.privacy.secagg.graph import neighbour_graph, share_holders
    from consortia.server.secure_aggregation import protocol_parameters

    for n in range(3, 13):
        for k in range(2, n):
            graph = neighbour_graph(range(n), num_neighbours=k, seed=bytes(32))
            assert share_holders(n, k) == 1 + min(map(len, graph.values())), (n, k)
    base = ["clients=7", "clients_per_round=7", "secagg.enabled=true", "secagg.neighbours=3"]
    with pytest.raises(ConfigError, match=r"secagg.threshold = 4: a count must lie in \[2, 3\]"):
        load_config(None, base + ["secagg.threshold=4"])
    for extra in ([], ["secagg.threshold=3"], ["secagg.threshold=0.99"]):
        k, t, _ = protocol_parameters(load_config(None, base + extra), 7)
        _round_begins(7, k, t)
    # A round with fewer participants than clients_per_round (clients left out for their
    # budget) can be an odd ring though clients_per_round is even: t = 4 fits 6, not 5.
    cfg = load_config(None, ["clients=6", "clients_per_round=6", "secagg.enabled=true",
                             "secagg.neighbours=3", "secagg.threshold=4"])
    for participants in (6, 5):
        k, t, _ = protocol_parameters(cfg, participants)
        _round_begins(participants, k, t)

def test_a_ray_address_must_be_host_and_port_and_must_answer():
    from consortia.simulations.runner import check_ray_head

    with pytest.raises(ConfigError, match="sim.ray_address: expected host:port"):
        load_config(None, ["sim.ray_address=notanaddress"])
    cfg = load_config(None, ["sim.ray_address=127.0.0.1:9"])  # the discard port: nobody there
    with pytest.raises(ValueError, match="no Ray cluster answers there"):
        check_ray_head(cfg.sim.ray_address)


def test_client_resources_this_machine_cannot_offer_fail_at_start(monkeypatch):
    """sim.num_gpus_per_client > 0 without a GPU (or more CPUs per client than Ray gets)
    left Flower's actor pool empty: a thousand lines of tracebacks, then a run that never
    ended."""
    import torch

    from consortia.simulations import runner

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runner, "check_model_fits", lambda cfg: pytest.fail("went past"))
    for sets, named in ((["sim.num_gpus_per_client=0.5"], "num_gpus_per_client = 0 "
                                                          r"\(no GPU here\)"),
                        (["sim.num_cpus_per_client=4"], "num_cpus_per_client ≤ 2"),
                        (["sim.num_gpus_per_client=1", "sim.num_cpus_per_client=3"],
                         "has 2 CPUs and 0 GPUs")):
        with pytest.raises(ValueError, match=named):
            runner.start_checks(load_config(None, sets))
    runner.check_local_resources(load_config(None, ["sim.num_cpus_per_client=2"]))
    # Ray takes whole CPUs: one actor of 1.5 CPUs was given 1 (rounded down) and fit none.
    one = load_config(None, ["sim.max_actors=1", "sim.num_cpus_per_client=1.5"])
    assert runner.backend_config(one)["init_args"]["num_cpus"] == 2
    runner.check_local_resources(one)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    runner.check_local_resources(load_config(None, ["sim.num_gpus_per_client=0.25"]))
    with pytest.raises(ValueError, match="num_gpus_per_client ≤ 1"):
        runner.check_local_resources(load_config(None, ["sim.num_gpus_per_client=2"]))


def test_an_unknown_key_is_answered_with_the_keys_accepted_there():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.lora_target_modules=['q']", "roundz=3"])
    text = " ".join(str(err.value).split())
    assert "model.lora_target_modules: unknown key; accepted here: activation, lora_alpha, " \
           "lora_rank, max_length" in text
    assert "roundz: unknown key (did you mean 'rounds'?)" in text


@pytest.mark.parametrize("task, sets, named", [
    ("digits-mlp", ["model.lora_rank=4"], "model.lora_rank = 4"),
    ("fashion-mnist-cnn", ["model.max_length=32"], "model.max_length = 32"),
    ("reviews-minilm-lora", ["model.activation='relu'"], "model.activation = 'relu'"),
])
def test_a_model_key_the_task_is_not_built_with_fails_at_start(task, sets, named):
    with pytest.raises(ConfigError, match=rf"{named} does not apply to task '{task}'"):
        load_config(None, [f"task='{task}'", *sets])
    # The same keys at their defaults (as a stored run's full config holds them) pass, and
    # so do the keys the task is built with.
    stored = config_to_dict(load_config(None, [f"task='{task}'"]))
    assert set(stored["model"]) >= {"activation", "lora_rank", "max_length"}
    assert config_to_dict(validate_config(stored)) == stored
    load_config(None, [f"task='{task}'", "model.activation='relu'" if task != "reviews-minilm-lora"
                       else "model.lora_rank=4"])


@pytest.mark.parametrize("sets, named", [
    (["secagg.threshold=3"], "secagg.threshold = 3.0 has no effect while secagg.enabled = false"),
    (["secagg.neighbours=3", "secagg.clip=5"],
     "secagg.neighbours = 3, secagg.clip = 5.0 have no effect while secagg.enabled = false"),
    (["secagg.bits=8"], "secagg.bits = 8 has no effect"),
    (['user_dp.noise_at="clients"'],
     "user_dp.noise_at = 'clients' has no effect while user_dp.enabled = false"),
    (["user_dp.clip=0.5"], "user_dp.clip = 0.5 has no effect while user_dp.enabled = false"),
])
def test_a_key_of_a_feature_that_is_off_fails_at_start(sets, named):
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    assert named in str(err.value)
    section = named.split(".")[0]
    assert f"set {section}.enabled = true to use it" in str(err.value)
    # With the feature on the same keys are taken; with it off, a stored run's full config
    # (every key at its default) still validates.
    extra = ["secagg.enabled=true"] if section == "user_dp" and "clients" in sets[0] else []
    load_config(None, [f"{section}.enabled=true", *extra, *sets])
    stored = config_to_dict(load_config(None, []))
    assert {"clip", "unmask"} <= set(stored["secagg"]) and "noise_at" in stored["user_dp"]
    assert config_to_dict(validate_config(stored)) == stored


def test_momentum_under_adam_and_local_training_keys_under_distributed_dp_are_said_at_start():
    """Set, they changed nothing and the run said nothing: Adam takes no momentum, and
    distributed DP's clients send a gradient sum that the server steps with."""
    from consortia.config import inert_settings_warning

    said = inert_settings_warning(load_config(EXPERIMENTS / "fmnist-nodp.toml",
                                              ["optimizer='adam'"]))
    assert said == ("set but changing nothing in this run: momentum = 0.9 (optimizer = 'adam' "
                    "does not use it)")
    said = inert_settings_warning(load_config(EXPERIMENTS / "fmnist-dp-distributed-fast.toml",
                                              ["local_epochs=3", "momentum=0.9"]))
    assert "local_epochs = 3 (privacy.mode = 'distributed'" in said
    assert "momentum = 0.9 (privacy.mode = 'distributed'" in said
    # Its clients put their noisy sums on the ring at scale γ: secagg.clip and secagg.bits
    # quantize nothing (the run said nothing and metrics.jsonl recorded the bits).
    said = inert_settings_warning(load_config(EXPERIMENTS / "fmnist-dp-distributed-fast.toml",
                                              ["secagg.bits=10", "secagg.clip=3"]))
    assert "secagg.bits = 10 (privacy.mode = 'distributed'" in said
    assert "secagg.clip = 3.0 (privacy.mode = 'distributed'" in said
    # Nor are bits that would let an encoded sum wrap refused there (nothing is encoded);
    # under local DP they are.
    said = inert_settings_warning(load_config(EXPERIMENTS / "fmnist-dp-distributed-fast.toml",
                                              ["secagg.bits=31"]))
    assert "secagg.bits = 31 (privacy.mode = 'distributed'" in said
    with pytest.raises(ConfigError, match=r"secagg.bits = 31 lets the sum of 10 clients wrap"):
        load_config(EXPERIMENTS / "fmnist-dp.toml", ["secagg.bits=31"])
    assert inert_settings_warning(load_config(EXPERIMENTS / "fmnist-dp-distributed-fast.toml")) is None
    assert inert_settings_warning(load_config(EXPERIMENTS / "fmnist-nodp.toml",
                                              ["optimizer='adam'", "momentum=0.0"])) is None


def test_a_table_given_with_set_merges_into_the_files_section():
    """--set 'privacy={enabled=true}' replaced the file's whole [privacy]: max_grad_norm 0.1
    (fmnist-dp.toml) became the schema's 1.0, without a word."""
    cfg = load_config(EXPERIMENTS / "fmnist-dp.toml", ["privacy={enabled=true, delta=1e-6}"])
    assert cfg.privacy.max_grad_norm == 0.1 and cfg.privacy.delta == 1e-6
    assert cfg.strategy.server_momentum == 0.5
    cfg = load_config(EXPERIMENTS / "fmnist-dp.toml", ["strategy={server_lr=0.5}"])
    assert (cfg.strategy.name, cfg.strategy.server_momentum, cfg.strategy.server_lr) == (
        "fedavgm", 0.5, 0.5)


def test_a_gpu_the_virtual_clients_will_not_see_is_said_at_start(monkeypatch):
    # Ray sets CUDA_VISIBLE_DEVICES="" for an actor that asks for no GPU unless
    # RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0, which run_simulation sets by default (a Ray actor
    # started here saw CUDA_VISIBLE_DEVICES '' with it unset or 1, '0' with it 0): so with
    # the default sim.num_gpus_per_client = 0 the clients see the GPU, and only an
    # environment that sets it to 1 hides it from them, which start_checks says.
    import torch

    from consortia.simulations import runner

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(runner, "check_model_fits", lambda cfg: None)
    warned = []
    monkeypatch.setattr(runner.log, "warning", lambda msg, *args: warned.append(msg % args))
    monkeypatch.delenv(runner.RAY_GPU_ENV, raising=False)
    runner.start_checks(load_config(None, ["task=digits-mlp"]))
    assert not [w for w in warned if "GPU" in w], warned  # the clients will see it
    monkeypatch.setenv(runner.RAY_GPU_ENV, "1")
    runner.start_checks(load_config(None, ["task=digits-mlp"]))
    assert [w for w in warned if "1 GPU" in w and "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1" in w
            and "sim.num_gpus_per_client" in w], warned
    assert runner.unused_gpu_warning(load_config(None, ["sim.num_gpus_per_client=0.25"])) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert runner.unused_gpu_warning(load_config(None, [])) is None


@pytest.mark.parametrize("clip", ["1e308", "1e-320"])
def test_a_secagg_clip_the_quantization_cannot_hold_fails_at_start(clip):
    # Both passed the start check: at 1e308 the step overflowed and every round's sum
    # decoded to NaN (loss nan, secagg_error_bound Infinity); at 1e-320 the step was 0 and
    # every client failed with 'ZeroDivisionError: float division by zero'.
    from consortia.privacy.secagg import decode_sum, quantization_error_bound

    base = ["clients=4", "clients_per_round=4", "secagg.enabled=true"]
    given = re.escape(repr(float(clip)))
    with pytest.raises(ConfigError, match=rf"secagg.clip = {given}: accepted 1e-100 to 1e\+100"):
        load_config(None, base + [f"secagg.clip={clip}"])
    with pytest.raises(ValueError, match=r"clip must lie in \[1e-100, 1e\+100\]"):
        quantization_error_bound(clip=float(clip), bits=28, num_summed=4)
    for fine in ("1e-100", "1e100"):
        cfg = load_config(None, base + [f"secagg.clip={fine}"])
        bound = quantization_error_bound(clip=cfg.secagg.clip, bits=28, num_summed=4)
        total = decode_sum(np.full(3, 2**29, np.uint32), clip=cfg.secagg.clip, bits=28,
                           num_summed=4)
        assert 0 < bound < float("inf") and np.isfinite(total).all()


@pytest.mark.parametrize("feature", ["secagg.enabled=true", "user_dp.enabled=true"])
def test_a_rule_that_needs_each_update_is_refused_naming_the_rules_accepted(feature):
    # The secure-aggregation refusal named the rule and secagg but not what it accepts.
    from consortia.strategies import NEEDS_INDIVIDUAL_UPDATES

    for rule in sorted(NEEDS_INDIVIDUAL_UPDATES):
        with pytest.raises(ConfigError) as err:
            load_config(None, [feature, f"strategy.name={rule}", "clients=20",
                               "clients_per_round=20"])
        message = " ".join(str(err.value).split())
        assert f"strategy.name = '{rule}'" in message and feature.split("=")[0] in message
        accepted = message.split("accepted: ")[1].split(", ")
        assert accepted == ["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad"]
        for fine in accepted:  # each one named is accepted with the feature
            load_config(None, [feature, f"strategy.name={fine}", "clients=20",
                               "clients_per_round=20"])
