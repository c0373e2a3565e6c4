import json
import math
import stat

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from consortia.client.trainer import LocalTrainer
from consortia.messages import TrainInstructions
from consortia.privacy.dp import LedgerMismatchError, PrivacyLedger, epsilon_for, noise_for_budget
from consortia.tasks import get_task

DELTA = 1e-5


def open_ledger(tmp_path, budget=3.0, accountant="rdp"):
    return PrivacyLedger.open(tmp_path, accountant=accountant, delta=DELTA, epsilon_budget=budget)


def independent_rdp_epsilon(sigma, q, steps, delta=DELTA):
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return eps


def spend(ledger, sigma, q, steps, rnd=1):
    accountant = ledger.accountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return ledger.record_spend(accountant, run_id="r", server_round=rnd)


def test_spend_persists_across_a_restart_and_keeps_accumulating(tmp_path):
    ledger = open_ledger(tmp_path)
    first = spend(ledger, 1.5, 0.01, 100)
    reopened = open_ledger(tmp_path)  # a new process reads the same file
    assert reopened.epsilon == pytest.approx(first)
    assert reopened.steps == 100
    second = spend(reopened, 1.5, 0.01, 100, rnd=2)
    assert second > first
    assert second == pytest.approx(independent_rdp_epsilon(1.5, 0.01, 200), rel=1e-9)
    assert open_ledger(tmp_path).history == [(1.5, 0.01, 200)]


def test_ledger_file_is_private_to_the_client(tmp_path):
    spend(open_ledger(tmp_path), 1.0, 0.1, 5)
    mode = stat.S_IMODE((tmp_path / "privacy_ledger.json").stat().st_mode)
    assert mode == 0o600


def test_ledger_refuses_to_mix_deltas_or_accountants(tmp_path):
    spend(open_ledger(tmp_path), 1.0, 0.1, 5)
    with pytest.raises(LedgerMismatchError, match="delta"):
        PrivacyLedger.open(tmp_path, accountant="rdp", delta=1e-6, epsilon_budget=3)
    with pytest.raises(LedgerMismatchError, match="accountant"):
        PrivacyLedger.open(tmp_path, accountant="prv", delta=DELTA, epsilon_budget=3)


def test_check_round_projects_without_spending(tmp_path):
    ledger = open_ledger(tmp_path, budget=1.0)
    decision = ledger.check_round(1.0, 0.1, 50)
    assert not decision.allowed and decision.epsilon_after > 1.0 and decision.epsilon_now == 0
    assert "exceeds the budget" in decision.reason
    assert ledger.steps == 0 and ledger.epsilon == 0.0


def test_noise_for_budget_fits_the_plan():
    sigma = noise_for_budget(3.0, DELTA, 1 / 24, 24 * 15, "rdp")
    acc = RDPAccountant()
    acc.history = [(sigma, 1 / 24, 24 * 15)]
    eps = acc.get_epsilon(DELTA)
    assert 2.98 <= eps <= 3.0
    with pytest.raises(ValueError, match="no noise multiplier fits"):
        noise_for_budget(1e-6, DELTA, 1.0, 10, "rdp")


def test_the_sigma_search_does_not_warn_of_its_own_probes():
    # Opacus's search probes σ up to MAX_SIGMA, where its largest default RDP order is the
    # best one, and warned "Optimal order is the largest alpha" for each such probe (shown
    # on every distributed run's floor); the σ it finds is not such a case.
    import warnings

    noise_for_budget.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sigma = noise_for_budget(3.0, DELTA, 0.0342, 20, "rdp")
        acc = RDPAccountant()
        acc.history = [(sigma, 0.0342, 20)]
        eps = acc.get_epsilon(DELTA)
    assert 2.98 <= eps <= 3.0
    assert not [w for w in caught if "largest alpha" in str(w.message)]


# --- the trainer and the ledger together -------------------------------------------

def instructions(**overrides):
    values = dict(run_id="run", task="digits-mlp", model_activation="tanh", local_epochs=1,
                  batch_size=64, lr=0.1, momentum=0.0, seed=0, dp_enabled=True,
                  max_grad_norm=1.0, noise_multiplier=None, planned_rounds=3)
    values.update(overrides)
    return TrainInstructions(**values)


def trainer(tmp_path, budget=3.0, n=600):
    task = get_task("digits-mlp")
    data = torch.utils.data.Subset(task.load_data(None).train, range(n))
    return LocalTrainer("7", task, data, open_ledger(tmp_path, budget), torch.device("cpu"))


def test_trained_round_records_opacus_steps_and_epsilon(tmp_path):
    t = trainer(tmp_path)
    model = t.task.build_model("tanh")
    report, weights = t.train(model, instructions(), server_round=1)
    assert report.status == "trained" and weights is not None
    steps_per_epoch = math.ceil(600 / 64)
    assert report.steps == steps_per_epoch
    assert report.sample_rate == pytest.approx(1 / steps_per_epoch)
    # σ was derived so that the planned 3 rounds fit the budget exactly once spent.
    planned = RDPAccountant()
    planned.history = [(report.noise_multiplier, report.sample_rate, 3 * steps_per_epoch)]
    assert 2.95 <= planned.get_epsilon(DELTA) <= 3.0
    assert report.epsilon == pytest.approx(
        independent_rdp_epsilon(report.noise_multiplier, report.sample_rate, report.steps))
    stored = json.loads((tmp_path / "privacy_ledger.json").read_text())
    assert stored["events"][-1]["decision"] == "trained"


def test_client_refuses_at_the_budget_and_records_no_spend(tmp_path):
    t = trainer(tmp_path)
    model = t.task.build_model("tanh")
    statuses = [t.train(model, instructions(), server_round=r)[0].status for r in range(1, 6)]
    # Three planned rounds fit; the fourth would pass ε = 3 and is refused.
    assert statuses == ["trained"] * 3 + ["refused-budget"] * 2
    ledger = open_ledger(tmp_path)
    assert ledger.epsilon <= 3.0
    assert ledger.steps == 3 * math.ceil(600 / 64)
    decisions = [e["decision"] for e in ledger.events]
    assert decisions == ["trained"] * 3 + ["refused-budget"] * 2
    assert all(e["steps"] == 0 for e in ledger.events if e["decision"] == "refused-budget")


def test_refusal_returns_no_weights_and_trains_nothing(tmp_path):
    t = trainer(tmp_path, budget=0.01)
    model = t.task.build_model("tanh")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report, weights = t.train(model, instructions(noise_multiplier=0.5), server_round=1)
    assert report.status == "refused-budget" and weights is None
    assert "exceeds the budget" in report.reason
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert open_ledger(tmp_path).steps == 0


def test_non_private_training_spends_nothing(tmp_path):
    task = get_task("digits-mlp")
    t = LocalTrainer("1", task, task.load_data(None).train, None, torch.device("cpu"))
    report, weights = t.train(task.build_model("tanh"), instructions(dp_enabled=False), 1)
    assert report.status == "trained" and report.epsilon is None and not report.dp_enabled
    assert not (tmp_path / "privacy_ledger.json").exists()


def test_prv_accountant_ledger_matches_opacus_prv(tmp_path):
    from opacus.accountants import PRVAccountant

    ledger = open_ledger(tmp_path, accountant="prv")
    eps = spend(ledger, 1.2, 0.02, 200)
    reference = PRVAccountant()
    reference.history = [(1.2, 0.02, 200)]
    assert eps == pytest.approx(reference.get_epsilon(DELTA), rel=1e-6)
    assert open_ledger(tmp_path, accountant="prv").epsilon == pytest.approx(eps, rel=1e-6)
    # PRV is tighter than RDP for the same history.
    assert eps < independent_rdp_epsilon(1.2, 0.02, 200)
    # An independent numerical accountant (Google's privacy loss distributions) agrees
    # within 1 % (1.2735 against 1.2635: PRV reports the upper end of its error bound).
    from dp_accounting import dp_event, pld

    google = pld.PLDAccountant()
    google.compose(dp_event.PoissonSampledDpEvent(0.02, dp_event.GaussianDpEvent(1.2)), 200)
    assert eps == pytest.approx(google.get_epsilon(DELTA), rel=0.01)


def test_a_real_sites_sample_and_noise_are_not_the_servers_to_recompute(tmp_path):
    """Every part of a simulation's seed (the run's seed, the round, the client id) is
    known to the server. A real site (seeded=False) draws its batches and DP noise from the
    OS instead: the same request twice gives different noise; a simulation's, the same."""
    task = get_task("digits-mlp")
    data = torch.utils.data.Subset(task.load_data(None).train, range(300))

    def round_weights(folder, seeded):
        torch.manual_seed(0)
        model = task.build_model("tanh")
        trainer = LocalTrainer("7", task, data, open_ledger(tmp_path / folder, 50.0),
                               torch.device("cpu"),
                               seeded=seeded)
        _, weights = trainer.train(model, instructions(noise_multiplier=1.0), server_round=1)
        return weights

    same = round_weights("s1", True), round_weights("s2", True)
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])
    real = round_weights("r1", False), round_weights("r2", False)
    assert not any(torch.equal(real[0][k], real[1][k]) for k in real[0])


def test_a_rounds_cost_is_what_opacus_charges_when_its_loader_takes_a_step_fewer(tmp_path):
    # 93 records in batches of 1: Opacus's Poisson loader samples at 1/93 but takes
    # int(1 / (1/93)) = 92 steps an epoch, and make_private's accountant charges 1/len(loader)
    # = 1/92. The projection, the σ search and the report must be that charge: a check of
    # 92 steps at 1/93 let the ledger pass its budget, and summary.json's (σ, q, steps) gave
    # another ε than the one reported.
    task = get_task("digits-mlp")
    data = torch.utils.data.Subset(task.load_data(None).train, range(93))
    ins = instructions(batch_size=1, noise_multiplier=1.0, planned_rounds=1)

    def client(name, budget):
        return LocalTrainer("7", task, data, open_ledger(tmp_path / name, budget),
                            torch.device("cpu"))

    sigma, rate, steps = client("probe", 3.0).round_cost(ins)
    cost = epsilon_for("rdp", [(sigma, rate, steps)], DELTA)

    report, weights = client("below", cost * (1 - 1e-6)).train(task.build_model("tanh"), ins, 1)
    assert report.status == "refused-budget" and weights is None
    assert open_ledger(tmp_path / "below").steps == 0

    report, weights = client("at", cost).train(task.build_model("tanh"), ins, 1)
    assert report.status == "trained" and weights is not None
    ledger = open_ledger(tmp_path / "at", cost)
    assert ledger.history == [(sigma, rate, steps)]  # the projection is what was spent
    assert ledger.epsilon <= ledger.epsilon_budget
    reference = RDPAccountant()
    reference.history = [(report.noise_multiplier, report.sample_rate, report.steps)]
    assert report.epsilon == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)


def test_a_prv_round_allowed_at_the_exact_budget_does_not_pass_it(tmp_path):
    # Opacus's accountant folds a repeat of the last (σ, q) into its entry; the projection
    # must be that history too: PRV's ε of [(σ, q, a), (σ, q, b)] and of [(σ, q, a + b)]
    # differ in the 12th digit, and a budget between them was allowed and then passed.
    spend(open_ledger(tmp_path / "probe", accountant="prv"), 1.0, 0.01, 100)
    after = open_ledger(tmp_path / "probe", accountant="prv").check_round(1.0, 0.01, 100)
    spend(open_ledger(tmp_path, accountant="prv"), 1.0, 0.01, 100)
    ledger = open_ledger(tmp_path, budget=after.epsilon_after, accountant="prv")
    assert ledger.check_round(1.0, 0.01, 100).allowed
    spend(ledger, 1.0, 0.01, 100, rnd=2)
    assert open_ledger(tmp_path, accountant="prv").epsilon <= after.epsilon_after


def test_client_status_states_both_guarantees_of_a_distributed_dp_site(tmp_path):
    # The site's own view showed only ε; the ε its own noise shares give (which its
    # policy caps) was only in --json's ledger events.
    from deploy_harness import site_toml
    from typer.testing import CliRunner

    from consortia.cli import app
    from consortia.privacy.display import epsilon_text

    config = site_toml(tmp_path, **{"delta = 1e-5": "delta = 1e-5\nmax_epsilon_if_secagg_fails = 10.0"})
    ledger = open_ledger(tmp_path / "state")
    for r in range(1, 21):
        ledger.spend_share((1.5, 0.05, 1), (0.75, 0.05, 1), run_id="r", server_round=r)
    result = CliRunner().invoke(app, ["client", "status", "--config", str(config)])
    assert result.exit_code == 0, result.output
    # Both shown rounded up at 4 places (epsilon_text): never below what is accounted.
    assert f"site-a: ε {epsilon_text(ledger.epsilon, 4)} of 3.0" in result.output
    fallback = epsilon_for("rdp", [(0.75, 0.05, 20)], DELTA)
    assert f"ε if secure aggregation fails {epsilon_text(fallback, 4)} of cap 10.0" in result.output


def test_round_steps_is_what_opacus_charges_for_any_size_and_batch():
    # round_steps (the σ search, the budget checks, the start checks) against what
    # make_private's accountant hook records: rate 1/len(loader), len(loader) steps an epoch.
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    from consortia.privacy.dp import round_steps

    for batch in (1, 2, 3, 7, 32):
        for n in range(1, 400):
            records = TensorDataset(torch.zeros(n, 1))
            loader = DPDataLoader.from_data_loader(DataLoader(records, batch_size=batch))
            assert round_steps(n, batch, 2, "local") == (1 / len(loader), 2 * len(loader)), (n, batch)
