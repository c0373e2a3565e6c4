"""Distributed DP under secure aggregation: the mechanism, its accounting, its guards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from consortia.config import ConfigError, load_config
from consortia.privacy.dp import PrivacyLedger
from consortia.privacy.dp.distributed import (
    NoiseShare,
    choose_scale,
    conditional_round,
    from_ring,
    gaussian_equivalent,
    model_step,
    noisy_integer_sum,
    rounding_bound,
    skellam,
    skellam_rdp,
    to_ring,
)
from consortia.privacy.secagg import ClientSecAggSession, RoundSetup, ServerSecAggSession, UnmaskRequest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "simulations" / "experiments"
SMOKE = EXPERIMENTS / "digits-dp-smoke.toml"


# --- the integer encoding -------------------------------------------------------------

def test_conditional_rounding_keeps_every_example_within_the_bound_and_is_unbiased():
    rng = np.random.default_rng(0)
    d, c = 400, 64.0
    x = rng.normal(size=(300, d))
    x *= c / np.linalg.norm(x, axis=1, keepdims=True)  # every row at the clip exactly
    bound = rounding_bound(c, d, beta=0.2)  # a tight bound, so rows are resampled
    rounded = conditional_round(x, bound, rng)
    assert np.all(rounded == np.round(rounded))
    assert np.all(np.linalg.norm(rounded.astype(np.float64), axis=1) <= bound)
    assert np.all(np.abs(rounded - x) < 1)  # each value is the floor or the ceiling
    # Unbiased up to the conditioning: the mean rounding error is far below one unit.
    assert abs(float(np.mean(rounded - x))) < 0.01


def test_the_ring_round_trip_keeps_negative_sums():
    rng = np.random.default_rng(1)
    parts = [rng.integers(-2**28, 2**28, size=1000) for _ in range(5)]
    ring_sum = np.zeros(1000, dtype=np.uint32)
    for p in parts:
        ring_sum += to_ring(p)  # uint32 arithmetic wraps modulo 2**32, as secagg sums
    np.testing.assert_array_equal(from_ring(ring_sum), np.sum(parts, axis=0))


def test_skellam_shares_sum_to_the_summed_variance():
    rng = np.random.default_rng(2)
    mu, shares, d = 5e6, 7, 50_000
    total = sum(skellam(mu, d, rng) for _ in range(shares))
    assert np.var(total) == pytest.approx(2 * mu * shares, rel=0.03)
    assert abs(np.mean(total)) < 4 * math.sqrt(2 * mu * shares / d)


def test_scale_leaves_room_for_the_batch_and_refuses_an_oversized_one():
    gamma = choose_scale(0.1, 2050, 1.93, math.sqrt(10 / 9))
    share = NoiseShare(1.93, 0.1, gamma, 9, 26_010)
    worst = (2 * 2050 + 64) * share.l2 + 12 * 1.93 * share.l2 * math.sqrt(10 / 9)
    assert worst < 2**31 and gamma * 0.1 == 2**16
    with pytest.raises(ValueError, match="expected batch of 5000000 records"):
        choose_scale(1.0, 5_000_000, 1.0, 1.0)


# --- the accounting ---------------------------------------------------------------------

def test_the_charged_gaussian_dominates_the_skellam_rdp_and_is_sigma_at_our_scale():
    share = NoiseShare(1.93, 0.1, choose_scale(0.1, 2050, 1.93, 1.05), 9, 26_010)
    for shares in (9, 1):
        mu = shares * share.mu
        sigma_hat = share.charged_multiplier(shares)
        for alpha in RDPAccountant.DEFAULT_ALPHAS:
            assert skellam_rdp(alpha, share.l1, share.l2, mu) <= alpha / (2 * sigma_hat**2)
        # The Skellam correction is negligible: σ̂ is σ·√(shares/t) to 1e-9.
        assert sigma_hat == pytest.approx(1.93 * math.sqrt(shares / 9), rel=1e-9)
        assert sigma_hat < 1.93 * math.sqrt(shares / 9)


def independent_sigma_hat(sigma: float, clip: float, scale: float, t: int, d: int, shares: int,
                          floor: float | None = None) -> float:
    """σ̂ from the formulas as published, written out again here (not the module's code):
    a sum of one share at `sigma` and shares − 1 at `floor` (default: `sigma`)."""
    floor = sigma if floor is None else floor
    c = scale * clip
    l2 = min(math.sqrt(c * c + d / 4 + math.sqrt(2 * 0.5) * (c + math.sqrt(d) / 2)), c + math.sqrt(d))
    l1 = min(l2 * l2, math.sqrt(d) * l2)
    mu = (sigma**2 + (shares - 1) * floor**2) * l2 * l2 / (2 * t)
    # Agarwal et al. 2021, Thm 3.5, bounded for α ≥ 1 by α·(Δ₂²/(4μ) + (2Δ₂² + 6Δ₁)/(16μ²))
    return (2 * (l2 * l2 / (4 * mu) + (2 * l2 * l2 + 6 * l1) / (16 * mu * mu))) ** -0.5


def test_ledger_epsilon_equals_opacus_and_dp_accounting_for_the_sampled_gaussian(tmp_path):
    dp_accounting = pytest.importorskip("dp_accounting")
    sigma, clip, t, d, q, rounds = 1.4, 0.5, 4, 5000, 0.02, 300
    scale = choose_scale(clip, 400, sigma, 1.0)
    share = NoiseShare(sigma, clip, scale, t, d)
    ledger = PrivacyLedger.open(tmp_path, accountant="rdp", delta=1e-5, epsilon_budget=100)
    for r in range(1, rounds + 1):
        ledger.spend_share((share.charged_multiplier(t), q, 1), (share.charged_multiplier(1), q, 1),
                           run_id="r", server_round=r)
    for shares, got in ((t, ledger.epsilon), (1, ledger.epsilon_if_secagg_fails)):
        sigma_hat = independent_sigma_hat(sigma, clip, scale, t, d, shares)
        opacus = RDPAccountant()
        opacus.history = [(sigma_hat, q, rounds)]
        assert got == pytest.approx(opacus.get_epsilon(delta=1e-5), rel=1e-9)
        google = dp_accounting.rdp.RdpAccountant()
        google.compose(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(sigma_hat)), rounds)
        assert got == pytest.approx(google.get_epsilon(1e-5), rel=0.01)
    assert ledger.epsilon_if_secagg_fails > ledger.epsilon


def test_a_share_is_spent_when_it_leaves_and_a_held_one_of_an_old_ledger_counts(tmp_path):
    # The server can reveal a sum holding a client's share with t answers of others, so
    # the spend cannot wait for this client's unmask answer: both accounts spend at once.
    ledger = PrivacyLedger.open(tmp_path / "a", accountant="rdp", delta=1e-5, epsilon_budget=3)
    ledger.spend_share((1.5, 0.1, 1), (0.5, 0.1, 1), run_id="r", server_round=1)
    reopened = PrivacyLedger.open(tmp_path / "a", accountant="rdp", delta=1e-5, epsilon_budget=3)
    assert reopened.history == [(1.5, 0.1, 1)] and reopened.epsilon > 0
    assert reopened.epsilon_if_secagg_fails > reopened.epsilon
    assert reopened.events[-1]["decision"] == "trained"
    # A ledger written by the version that held the spend until unmasking: what it held
    # counts on opening, once.
    old = tmp_path / "old"
    PrivacyLedger.open(old, accountant="rdp", delta=1e-5, epsilon_budget=3).save()
    data = json.loads((old / "privacy_ledger.json").read_text())
    data["pending"] = {"run": "r", "run_key": 7, "round": 4, "entry": [1.5, 0.1, 1]}
    (old / "privacy_ledger.json").write_text(json.dumps(data))
    counted = PrivacyLedger.open(old, accountant="rdp", delta=1e-5, epsilon_budget=3)
    assert counted.history == [(1.5, 0.1, 1)] and counted.events[-1]["round"] == 4
    again = PrivacyLedger.open(old, accountant="rdp", delta=1e-5, epsilon_budget=3)
    assert again.history == [(1.5, 0.1, 1)]
    # A share that version released ("abandoned") may have been revealed all the same: it
    # counts once, at the least noise the client's own shares had (more ε, never less).
    released = tmp_path / "released"
    ledger = PrivacyLedger.open(released, accountant="rdp", delta=1e-5, epsilon_budget=3)
    ledger._fallback = {**ledger._fallback, "history": [[0.6, 0.03, 2], [0.5, 0.04, 1]]}
    ledger.events = [{"time": 0, "run": "r", "round": 4, "decision": "abandoned", "steps": 0,
                      "epsilon": 0.0}]
    ledger.save()
    counted = PrivacyLedger.open(released, accountant="rdp", delta=1e-5, epsilon_budget=3)
    assert counted.history == [(0.5, 0.04, 1)] and counted.events[-1]["round"] == 4
    assert PrivacyLedger.open(released, accountant="rdp", delta=1e-5,
                              epsilon_budget=3).history == [(0.5, 0.04, 1)]


# --- the noise survives secure aggregation and dropouts -------------------------------------

def secure_noise_sum(n: int, t: int, drop: set[int], share: NoiseShare, seed: int) -> np.ndarray:
    """Clients with no records send their noise share alone through the real protocol."""
    clients = {node: ClientSecAggSession(node_id=node, run_id=5) for node in range(1, n + 1)}
    server = ServerSecAggSession(run_id=5)
    server.collect_advertisements({i: c.advertise_keys().to_bytes() for i, c in clients.items()})
    setup = server.begin_round(1, list(clients), vector_length=share.dimension,
                               num_neighbours=n - 1, threshold=t)
    setup = RoundSetup.from_bytes(setup.to_bytes())
    empty = np.zeros((0, share.dimension), dtype=np.float32)
    masked = {i: c.share_keys_and_mask_input(
        setup, to_ring(noisy_integer_sum(empty, share, np.random.default_rng([seed, i])))).to_bytes()
        for i, c in clients.items() if i not in drop}
    requests = server.collect_masked_inputs(masked)
    responses = {i: clients[i].unmask(UnmaskRequest.from_bytes(r.to_bytes())).to_bytes()
                 for i, r in requests.items()}
    return from_ring(server.finish_round(responses).total)


@pytest.mark.parametrize(("n", "t", "drop"), [(5, 5, set()), (6, 4, set()), (6, 4, {2, 5})])
def test_unmasked_noise_has_the_target_variance_also_after_dropouts(n, t, drop):
    share = NoiseShare(1.2, 1.0, 2.0**10, t, 40_000)
    total = secure_noise_sum(n, t, drop, share, seed=n + len(drop))
    survivors = n - len(drop)
    target = (share.noise_multiplier * share.l2) ** 2  # what t shares carry
    # 40,000 coordinates: the sample variance's relative std is √(2/40000) = 0.7 %.
    assert np.var(total) == pytest.approx(target * survivors / t, rel=0.035)
    assert np.var(total) >= target * 0.965  # never below the target, whoever survives


def test_the_server_step_divides_by_the_expected_batch():
    step = model_step({"w": np.array([2.0**10 * 300, -(2.0**10) * 30])}, 2.0**10, 150.0, 0.5)
    np.testing.assert_allclose(step["w"], [-1.0, 0.1])


# --- guards -----------------------------------------------------------------------------

def test_distributed_without_secure_aggregation_fails_at_start_naming_both():
    with pytest.raises(ConfigError, match='privacy.mode = "distributed" needs secagg.enabled'):
        load_config(SMOKE, ["privacy.mode=distributed"])
    with pytest.raises(ConfigError, match="needs privacy.enabled = true"):
        load_config(SMOKE, ["privacy.mode=distributed", "privacy.enabled=false",
                            "secagg.enabled=true"])
    with pytest.raises(ConfigError, match="user_dp.enabled"):
        load_config(SMOKE, ["privacy.mode=distributed", "secagg.enabled=true",
                            "user_dp.enabled=true"])
    with pytest.raises(ConfigError, match="privacy.mode"):
        load_config(SMOKE, ["privacy.mode=central"])
    cfg = load_config(EXPERIMENTS / "fmnist-dp-distributed.toml")
    assert cfg.privacy.mode == "distributed" and cfg.secagg.threshold == 9


def test_gaussian_equivalent_is_below_the_plain_ratio():
    # Guards the direction of the correction: a smaller σ̂ charges more ε, never less.
    assert gaussian_equivalent(1e6, 2e3, 1e3) < math.sqrt(2 * 1e6) / 1e3


# --- in a real Flower simulation --------------------------------------------------------

class DropInRound:
    """A client mod: the given partitions drop their train request in one round."""

    def __init__(self, partitions: set[int], server_round: int):
        self.partitions, self.server_round = partitions, server_round

    def __call__(self, msg, context, call_next):
        if (msg.metadata.message_type == "train"
                and int(msg.content["config"]["server-round"]) == self.server_round
                and int(context.node_config["partition-id"]) in self.partitions):
            raise ConnectionError("injected dropout")
        return call_next(msg, context)


@pytest.mark.slow
def test_a_round_below_the_threshold_changes_nothing_and_spends_nothing(tmp_path):
    from consortia.server.checkpoint import CheckpointStore
    from consortia.server.results import read_jsonl
    from consortia.simulations.runner import run_simulation

    cfg = load_config(SMOKE, ["secagg.enabled=true", "privacy.mode=distributed",
                              "secagg.neighbours=3", "secagg.threshold=3", "rounds=4",
                              "batch_size=64", "lr=2", "privacy.epsilon_budget=4"])
    summary = run_simulation(cfg, tmp_path, client_mods=[DropInRound({0, 1}, 2)])
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["secagg_status"] for r in rows] == ["ok", "aborted", "ok", "ok"]
    # No secagg_bits: the clients never quantize with secagg.bits (the rows said 30).
    assert all("secagg_bits" not in r and r["secagg_threshold"] == 3 for r in rows)
    assert rows[-1]["accuracy"] > 0.5  # 10 classes: chance is 0.1
    chain = CheckpointStore(tmp_path / "checkpoints").all()
    w1, w2 = chain[1].load_weights(), chain[2].load_weights()
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)  # round 2 added nothing

    clients = {c["id"]: c for c in summary["clients"]}
    for cid in "0123":
        ledger = PrivacyLedger.open(tmp_path / "clients" / cid, accountant="rdp", delta=1e-5,
                                    epsilon_budget=4)
        # Every share sent is spent, in both accounts: 2 and 3 also sent one in round 2,
        # which was never unmasked (they could not know it would not be).
        sent = 4 if cid in "23" else 3
        assert ledger.steps == sent
        assert sum(h[2] for h in ledger._fallback["history"]) == sent
        assert clients[cid]["epsilon"] == pytest.approx(ledger.epsilon)
        assert clients[cid]["epsilon_if_secagg_fails"] == pytest.approx(
            ledger.epsilon_if_secagg_fails)
        # The ledger charges exactly the sampled Gaussian at σ̂ (Opacus, recomputed).
        # Its share, and t − 1 others at the round's floor (each client adds at least that).
        sigma, q = clients[cid]["noise_multiplier"], clients[cid]["sample_rate"]
        floor = clients[cid]["noise_floor"]
        assert 0 < floor <= sigma
        sigma_hat = independent_sigma_hat(sigma, 1.0, 2.0**16, 3, 4810, 3, floor)
        opacus = RDPAccountant()
        opacus.history = [(sigma_hat, q, sent)]
        assert ledger.epsilon == pytest.approx(opacus.get_epsilon(delta=1e-5), rel=1e-9)
        assert ledger.epsilon <= 4
    participation = read_jsonl(tmp_path / "participation.jsonl")
    abandoned = [p for p in participation if p["round"] == 2 and p["client_id"] in "23"]
    assert len(abandoned) == 2
    assert all("round abandoned" in p["reason"] and p["epsilon"] > 0 for p in abandoned)


@pytest.mark.slow
def test_the_fast_fashion_mnist_variant_learns_within_its_budget(tmp_path):
    from consortia.server.results import read_jsonl
    from consortia.simulations.runner import run_simulation

    summary = run_simulation(load_config(EXPERIMENTS / "fmnist-dp-distributed-fast.toml"), tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows if "accuracy" in r] == [4, 8]  # eval_every = 4
    assert all(r["secagg_status"] == "ok" for r in rows)
    # t = 3 of 4: a full round carries √(4/3) times the target noise std.
    assert all(r["dp_noise_std_ratio"] == pytest.approx((4 / 3) ** 0.5) for r in rows)
    assert summary["final_accuracy"] > 0.35  # 10 classes: chance is 0.1
    for c in summary["clients"]:
        assert c["privacy_mode"] == "distributed" and c["steps"] == 8
        assert 0 < c["epsilon"] <= 8.0 < c["epsilon_if_secagg_fails"]
    assert (tmp_path / "report.html").read_text().count("epsilon_if_secagg_fails") == 1


@pytest.mark.slow
def test_a_runs_reported_epsilons_are_reproduced_by_an_independent_accountant(tmp_path):
    """summary.json's ε and ε_if_secagg_fails of each client, recomputed from what the run
    records (each round's σᵢ, σ_floor and t, the config's γ, the model's d) with the
    published formulas (independent_sigma_hat) and Google's dp-accounting."""
    dp_accounting = pytest.importorskip("dp_accounting")
    from consortia.server.results import read_jsonl
    from consortia.server.workflow import distributed_scale
    from consortia.simulations.runner import run_simulation
    from consortia.tasks import get_task

    cfg = load_config(EXPERIMENTS / "fmnist-dp-distributed-fast.toml",
                      ["rounds=2", "eval_every=2", "train_examples=2000", "test_examples=200"])
    summary = run_simulation(cfg, tmp_path)
    thresholds = {r["round"]: r["secagg_threshold"] for r in read_jsonl(tmp_path / "metrics.jsonl")}
    sent = [p for p in read_jsonl(tmp_path / "participation.jsonl") if p["status"] == "trained"]
    model = get_task(cfg.task).build_model(cfg.model.activation)
    d = sum(v.numel() for v in model.state_dict().values())
    scale, clip, delta = distributed_scale(cfg), cfg.privacy.max_grad_norm, cfg.privacy.delta
    assert len(summary["clients"]) == 4
    for c in summary["clients"]:
        mine = [p for p in sent if p["client_id"] == c["id"]]
        assert len(mine) == c["steps"] == 2
        for shares, reported in ((None, c["epsilon"]), (1, c["epsilon_if_secagg_fails"])):
            google = dp_accounting.rdp.RdpAccountant()
            for p in mine:
                t = thresholds[p["round"]]
                sigma_hat = independent_sigma_hat(p["noise_multiplier"], clip, scale, t, d,
                                                  shares or t, p["noise_floor"])
                google.compose(dp_accounting.PoissonSampledDpEvent(
                    p["sample_rate"], dp_accounting.GaussianDpEvent(sigma_hat)))
            assert reported == pytest.approx(google.get_epsilon(delta), rel=1e-3)
        assert c["epsilon"] <= c["epsilon_budget"]


# --- the client's round -----------------------------------------------------------------

def client_step(tmp_path, cap=None, budget=3.0, **overrides):
    import torch

    from consortia.client.distributed import DistributedStep
    from consortia.messages import TrainInstructions
    from consortia.tasks import TASKS

    task = TASKS["digits-mlp"]
    ledger = PrivacyLedger.open(tmp_path, accountant="rdp", delta=1e-5, epsilon_budget=budget)
    step = DistributedStep("7", task, task.load_data(None).train, ledger, torch.device("cpu"),
                           max_epsilon_if_secagg_fails=cap, seeded_noise=True)
    torch.manual_seed(0)
    model = task.build_model("tanh")
    ins = TrainInstructions(**{
        "run_id": "ab", "task": task.name, "model_activation": "tanh", "local_epochs": 1,
        "batch_size": 64, "lr": 1.0, "momentum": 0.0, "seed": 0, "dp_enabled": True,
        "max_grad_norm": 1.0, "planned_rounds": 10, "privacy_mode": "distributed", **overrides})
    names = sorted(model.state_dict())
    return step, model, ins, names, ledger


def test_clients_that_add_different_noise_each_charge_no_less_than_the_worst_sum(tmp_path):
    """Sites of different sizes and budgets size different shares. A revealed sum holds a
    client's share and at least t − 1 others: charged as if those were the least any
    client of the round adds, its ledger ε is never below the ε of the thinnest sum that
    could hold its share (computed here from the σ the clients actually used)."""
    from torch.utils.data import Subset

    from consortia.privacy.dp import noise_for_budget

    t, sizes, budgets = 3, (90, 200, 400, 600), (3.0, 1.0, 8.0, 3.0)
    full = client_step(tmp_path / "x")[0].dataset
    # The round's floor, as the server sizes it: its budget at the highest sampling rate.
    floor = noise_for_budget(3.0, 1e-5, 64 / min(sizes), 10, "rdp")
    used = []
    for i, (n, budget) in enumerate(zip(sizes, budgets, strict=True)):
        step, model, ins, names, ledger = client_step(tmp_path / str(i), budget=budget)
        step.dataset = Subset(full, range(n))
        report, vector = step.run(model, ins, 1, names=names, scale=2.0**10, threshold=t,
                                  floor=floor)
        assert report.status == "trained" and report.noise_multiplier >= floor
        used.append((report.noise_multiplier, report.sample_rate, ledger))
    sigmas = sorted(u[0] for u in used)
    assert sigmas[-1] > sigmas[0] * 1.5  # the budget-1 site adds much more than the others
    d = sum(int(np.prod(p.shape)) for p in model.state_dict().values())
    for i, (sigma, q, ledger) in enumerate(used):
        others = sorted(u[0] for j, u in enumerate(used) if j != i)[: t - 1]
        c = 2.0**10 * 1.0
        l2 = min(math.sqrt(c * c + d / 4 + math.sqrt(2 * 0.5) * (c + math.sqrt(d) / 2)),
                 c + math.sqrt(d))
        l1 = min(l2 * l2, math.sqrt(d) * l2)
        mu = (sigma**2 + sum(o**2 for o in others)) * l2 * l2 / (2 * t)
        thinnest = (2 * (l2 * l2 / (4 * mu) + (2 * l2 * l2 + 6 * l1) / (16 * mu * mu))) ** -0.5
        opacus = RDPAccountant()
        opacus.history = [(thinnest, q, 1)]
        assert ledger.epsilon >= opacus.get_epsilon(delta=1e-5) * (1 - 1e-9), i
        # and the planned 10 rounds fit its own budget, the last by a hair at most.
        charged, rate, _ = ledger.history[0]
        assert ledger.check_round(charged, rate, 9).epsilon_after <= budgets[i]


def test_per_example_gradients_are_the_gradients_of_each_record(tmp_path):
    import torch

    step, model, ins, names, _ = client_step(tmp_path)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    grads = step._per_example_gradients(model, 0.05, names, shapes, seed=3)
    assert grads.shape[1] == sum(int(np.prod(s)) for s in shapes.values()) and len(grads) > 20
    # The same Poisson draw, one record at a time with plain autograd.
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    first = next(iter(UniformWithReplacementSampler(
        num_samples=len(step.dataset), sample_rate=0.05,
        generator=torch.Generator().manual_seed(3))))[0]
    x, y = step.dataset[int(first)]
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x[None]), y[None]).backward()
    params = dict(model.named_parameters())
    expected = np.concatenate([params[n].grad.numpy().ravel() for n in names])
    np.testing.assert_allclose(grads[0], expected, rtol=1e-4, atol=1e-6)


def test_the_client_refuses_beyond_its_budget_or_its_cap_on_the_fallback_epsilon(tmp_path):
    step, model, ins, names, ledger = client_step(tmp_path / "a", cap=0.5)
    report, vector = step.run(model, ins, 1, names=names, scale=2.0**10, threshold=4, floor=0.8)
    assert vector is None and report.status == "refused-policy"
    assert "above this site's cap 0.5000" in report.reason
    assert ledger.epsilon_if_secagg_fails is None and ledger.epsilon == 0.0

    step, model, ins, names, ledger = client_step(tmp_path / "b", noise_multiplier=0.3, budget=1.0)
    report, vector = step.run(model, ins, 1, names=names, scale=2.0**10, threshold=4, floor=0.8)
    assert vector is None and report.status == "refused-budget"
    assert ledger.events[-1]["decision"] == "refused-budget"

    step, model, ins, names, ledger = client_step(tmp_path / "c")
    report, vector = step.run(model, ins, 1, names=names, scale=2.0**10, threshold=4, floor=0.8)
    assert report.status == "trained" and vector.dtype == np.uint32
    assert ledger.steps == 1 and report.epsilon == ledger.epsilon > 0  # spent before it left
    assert report.noise_floor == 0.8 and report.noise_multiplier >= 0.8


def test_a_client_whose_cap_stops_its_next_round_says_so_in_its_reply(tmp_path):
    """A secure round leaves out a client whose reply said it cannot train again; one that
    its cap on the fallback ε stops must say so too, or it refuses inside the next masked
    round as a dropout (and may abort it for the others, who paid ε)."""
    ask = dict(scale=2.0**10, threshold=4, floor=0.8)
    step, model, ins, names, ledger = client_step(tmp_path / "uncapped")
    fallback = []
    for r in (1, 2):
        step.run(model, ins, r, names=names, **ask)
        fallback.append(ledger.epsilon_if_secagg_fails)
    step, model, ins, names, ledger = client_step(tmp_path / "capped", cap=sum(fallback) / 2)
    report, _ = step.run(model, ins, 1, names=names, **ask)
    assert report.status == "trained" and report.can_train_again is False
    report, vector = step.run(model, ins, 2, names=names, **ask)
    assert vector is None and report.status == "refused-policy"  # as it said


def test_a_real_sites_poisson_sample_and_noise_are_drawn_afresh(tmp_path):
    """The server knows every part of a simulation's seed; a real site (seeded_noise
    False) must not let it recompute which records were sampled, nor the noise."""
    from consortia.client.trainer import stable_seed

    vectors, samplers = [], []
    for name, seeded in (("a", True), ("b", True), ("c", False), ("d", False)):
        step, model, ins, names, _ = client_step(tmp_path / name)
        step.seeded_noise = seeded
        draw = step._per_example_gradients
        step._per_example_gradients = lambda *a, draw=draw: (samplers.append(a[-1]), draw(*a))[1]
        _, vector = step.run(model, ins, 1, names=names, scale=2.0**10, threshold=4, floor=0.8)
        vectors.append(vector)
    known = stable_seed(0, 1, "7", "distributed-dp")  # what the server can compute
    assert samplers[:2] == [known, known] and np.array_equal(vectors[0], vectors[1])
    assert known not in samplers[2:] and samplers[2] != samplers[3]
    assert not np.array_equal(vectors[2], vectors[3])


def test_the_sums_noise_and_the_policys_sigma_count_each_clients_actual_share(tmp_path):
    """Shares above the floor add noise: the round's noise ratio counts them, and a site's
    minimum σ is checked against the thinnest sum its share can be in, not the σ the
    server states."""
    from consortia.client.client_app import planned_sigma
    from consortia.client.trainer import LocalTrainer
    from consortia.messages import SecAggInstructions, TrainReport
    from consortia.server.secure_aggregation import noise_std_ratio

    at = [TrainReport(client_id=str(i), status="trained", noise_multiplier=s)
          for i, s in enumerate((0.8, 0.8, 0.8, 2.0))]
    assert noise_std_ratio(at, 3, 0.8) == pytest.approx(((3 * 0.64 + 4.0) / 3) ** 0.5 / 0.8)
    assert noise_std_ratio(at[:3], 3, 0.8) == pytest.approx(1.0)

    step, model, ins, names, ledger = client_step(tmp_path, noise_multiplier=5.0)
    trainer = LocalTrainer("7", step.task, step.dataset, ledger, step.device)
    server = ServerSecAggSession(run_id=1)
    sessions = {n: ClientSecAggSession(node_id=n, run_id=1) for n in range(1, 6)}
    server.collect_advertisements({n: s.advertise_keys() for n, s in sessions.items()})
    setup = server.begin_round(1, list(sessions), vector_length=10, num_neighbours=4,
                               threshold=4)
    secagg = SecAggInstructions(setup=setup.to_bytes(), clip=1.0, bits=20, weight_scale=1,
                                dp_scale=2.0**10, dp_noise_floor=0.8)
    assert planned_sigma(trainer, ins, secagg) == pytest.approx(((25 + 3 * 0.64) / 4) ** 0.5)
    # A floor that is not a number is refused with the rest of the instructions.
    with pytest.raises(ValueError):
        SecAggInstructions(setup=b"", clip=1.0, bits=20, weight_scale=1, dp_scale=2.0**10,
                           dp_noise_floor=float("inf"))


def test_fedprox_mu_under_distributed_dp_is_said_at_start(tmp_path):
    """FedProx's mu is a term of local training's loss; distributed DP's clients train
    nothing locally (one DP step per round, on the server), yet a run with
    strategy.name = 'fedprox', mu = 0.5 said nothing and its mu changed nothing."""
    from consortia.config import inert_settings_warning

    text = (EXPERIMENTS / "fmnist-dp-distributed-fast.toml").read_text()
    text = "\n".join(line for line in text.splitlines()
                     if not line.startswith(("name = ", "server_lr", "server_momentum")))
    config = tmp_path / "prox.toml"
    config.write_text(text.replace("[strategy]", '[strategy]\nname = "fedprox"\nmu = 0.5'))
    said = inert_settings_warning(load_config(config))
    assert said is not None and "strategy.mu = 0.5 (privacy.mode = 'distributed'" in said
    assert inert_settings_warning(load_config(config, ["strategy.mu=0.0"])) is None
    # Under local DP the same mu shapes each client's training: nothing to say.
    assert inert_settings_warning(load_config(config, ["privacy.mode='local'"])) is None
