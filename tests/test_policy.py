"""Site policy and audit log: a request outside the policy is refused with a typed reply
(nothing trained, no ε spent) and every request leaves a line in the site's audit log."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict

from consortia.client import build_client_app
from consortia.client.policy import AuditLog, SitePolicy
from consortia.client.site import Site, SitePrivacy
from consortia.messages import TrainInstructions, TrainReport
from consortia.tasks import get_task

pytestmark = pytest.mark.usefixtures("task_identity")

TASK = get_task("digits-mlp")
BASE = "ab" * 32


def instructions(**override):
    values = dict(run_id="0123456789ab", task="digits-mlp", model_activation="tanh",
                  local_epochs=1, batch_size=64, lr=0.1, momentum=0.0, seed=0, dp_enabled=True,
                  max_grad_norm=1.0, noise_multiplier=1.2, planned_rounds=2,
                  base_model_sha256=BASE)
    values.update(override)
    return TrainInstructions(**values)


def policy(**override):
    values = dict(tasks=["digits-mlp"], base_model_sha256=[BASE], epsilon_budget=5.0,
                  delta=1e-5, min_noise_multiplier=1.0, max_rounds=2)
    values.update(override)
    return SitePolicy(**values)


def site(tmp_path, pol):
    data = TASK.load_data(None).train
    dataset = torch.utils.data.Subset(data, list(range(200)))
    return Site(client_id="site-a", task=TASK, dataset=dataset, state_dir=tmp_path,
                privacy=SitePrivacy(pol.epsilon_budget, pol.delta, pol.accountant),
                device=torch.device("cpu"), policy=pol, audit=AuditLog(tmp_path))


def ask(app, ins, server_round=1):
    torch.manual_seed(0)
    content = RecordDict({"arrays": ArrayRecord(TASK.build_model("tanh").state_dict())})
    config = ins.to_config_record()
    config["server-round"] = server_round
    content["config"] = config
    msg = Message(content=content, dst_node_id=5, message_type="train")
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    return TrainReport.from_content(app(msg, ctx).content)


@pytest.mark.parametrize("override, reason", [
    (dict(task="fashion-mnist-cnn"), "task 'fashion-mnist-cnn' is not in this site's policy"),
    (dict(base_model_sha256="cd" * 32), "base model cdcd"),
    (dict(base_model_sha256=None), "base model (not stated)"),
    (dict(noise_multiplier=0.5), "noise multiplier 0.5 is below this site's minimum 1"),
    (dict(dp_enabled=False), "policy requires differential privacy"),
])
def test_a_request_outside_the_policy_is_refused_logged_and_costs_nothing(tmp_path, override,
                                                                          reason):
    s = site(tmp_path, policy())
    report = ask(build_client_app(lambda ctx: s), instructions(**override))
    assert report.status == "refused-policy" and reason in report.reason
    [entry] = AuditLog(tmp_path).entries()
    assert entry["decision"] == "refused-policy" and reason in entry["reason"]
    assert entry["run"] == "0123456789ab" and entry["round"] == 1
    assert entry["asked"]["task"] == override.get("task", "digits-mlp")
    ledger = s.open_ledger()
    assert ledger.steps == 0 and ledger.epsilon == 0


def test_a_request_within_the_policy_trains_and_the_log_says_so(tmp_path):
    s = site(tmp_path, policy())
    report = ask(build_client_app(lambda ctx: s), instructions())
    assert report.status == "trained" and report.epsilon > 0
    [entry] = AuditLog(tmp_path).entries()
    assert entry["decision"] == "trained" and entry["epsilon"] == pytest.approx(report.epsilon)
    assert entry["asked"]["noise_multiplier"] == 1.2 and entry["asked"]["secagg"] is False


def test_max_rounds_stops_the_site_after_that_many_rounds_of_a_run(tmp_path):
    s = site(tmp_path, policy(max_rounds=1))
    app = build_client_app(lambda ctx: s)
    assert ask(app, instructions(), 1).status == "trained"
    second = ask(app, instructions(), 2)
    assert second.status == "refused-policy" and "max_rounds = 1" in second.reason
    assert ask(app, instructions(run_id="ffffffffffff"), 1).status == "trained"  # another run
    assert [e["decision"] for e in AuditLog(tmp_path).entries()] == [
        "trained", "refused-policy", "trained"]


def test_an_audit_line_cut_short_by_a_crash_does_not_stop_the_site(tmp_path):
    """A crash while a line was appended leaves it cut short. Every later train request
    then failed (JSONDecodeError: the max_rounds check reads the log), its failure line was
    appended onto the cut one and was lost with it, and client status was a traceback."""
    s = site(tmp_path, policy(max_rounds=1))
    log = AuditLog(tmp_path)
    log.path.write_text('{"time": 1, "run": "0123456789ab", "round": 1, "decis')
    assert ask(build_client_app(lambda ctx: s), instructions()).status == "trained"
    assert [e["decision"] for e in log.entries()] == ["trained"]
    assert log.damaged_lines() == [1]
    lines = log.path.read_text().splitlines()
    assert lines[0].endswith('"decis') and json.loads(lines[1])["decision"] == "trained"
    second = ask(build_client_app(lambda ctx: s), instructions(), 2)  # counted: 1 trained
    assert second.status == "refused-policy" and "max_rounds = 1" in second.reason


def test_a_site_says_when_its_max_rounds_stops_its_next_round(tmp_path):
    """A secure round leaves out a client that said it cannot train again; a site its
    policy's max_rounds stops must say so too, or it refuses inside the next masked round
    as a dropout (and may abort it for the others, who paid ε). A resumed run's key
    advertisement says it as well."""
    from consortia.messages import SECAGG, SECAGG_ADVERTISE

    s = site(tmp_path, policy(max_rounds=2, epsilon_budget=50.0))  # the budget pays for more
    app = build_client_app(lambda ctx: s)
    assert ask(app, instructions(), 1).can_train_again is True
    last = ask(app, instructions(), 2)
    assert last.status == "trained" and last.can_train_again is False
    assert last.reason == ("next round: this site has trained 2 rounds of run 0123456789ab, "
                           "its policy's maximum (max_rounds = 2)")
    msg = Message(content=RecordDict({"config": instructions().to_config_record()}),
                  dst_node_id=5, message_type=SECAGG_ADVERTISE)
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    content = app(msg, ctx).content
    assert content[SECAGG]["can_train"] is False
    assert TrainReport.from_content(content).status == "refused-policy"
    assert ask(app, instructions(), 3).status == "refused-policy"  # as it said


def test_the_server_records_a_client_left_out_for_its_policy_as_that_refusal():
    from consortia.server.secure_aggregation import SecureAggregator

    agg = SecureAggregator.__new__(SecureAggregator)  # only its record of who cannot train
    last = TrainReport(client_id="a", status="trained", reason="next round: max_rounds = 2",
                       dp_enabled=True, epsilon=1.5, epsilon_budget=5.0, can_train_again=False)
    ledger = last.model_copy(update={"reason": ""})
    agg.cannot_pay = {1: agg._cannot("its round 2 reply", last),
                      2: agg._cannot("its round 2 reply", ledger)}
    policy_out, budget_out = agg._not_asked(1), agg._not_asked(2)
    assert (policy_out.status, policy_out.reason) == (
        "refused-policy", "not asked: its round 2 reply said it cannot train another round: "
                          "next round: max_rounds = 2")
    assert (budget_out.status, budget_out.reason) == (
        "refused-budget", "not asked: its round 2 reply said its privacy ledger cannot pay "
                          "for another round")
    assert policy_out.report.epsilon == budget_out.report.epsilon == 1.5


def test_a_derived_noise_multiplier_is_checked_against_the_minimum(tmp_path):
    # No σ from the server: the site derives the smallest that fits its budget (here a
    # generous budget gives a small σ), and the policy's minimum still binds.
    s = site(tmp_path, policy(epsilon_budget=50.0, min_noise_multiplier=2.0))
    report = ask(build_client_app(lambda ctx: s), instructions(noise_multiplier=None))
    assert report.status == "refused-policy" and "below this site's minimum 2" in report.reason


def test_secagg_can_be_required(tmp_path):
    s = site(tmp_path, policy(require_secagg=True))
    report = ask(build_client_app(lambda ctx: s), instructions())
    assert report.status == "refused-policy" and "secure aggregation" in report.reason


@pytest.mark.parametrize("override, message", [
    (dict(tasks=["cifar"]), "unknown task(s) ['cifar']"),
    (dict(base_model_sha256=["xyz"]), "not SHA-256 digests"),
    (dict(delta=2.0), "less than 1"),
    (dict(require_dp=False, min_noise_multiplier=1.0), "needs require_dp = true"),
    (dict(max_epsilon_if_secagg_fails=0), "greater than 0"),
])
def test_a_bad_policy_fails_naming_the_value(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        policy(**override)


def test_a_request_whose_training_fails_is_logged_as_failed(tmp_path):
    """The server sees Flower's error reply; the site's audit log has the line too."""
    s = site(tmp_path, policy())
    labels = torch.full((20,), 12)  # beyond digits-mlp's 10 classes: the loss refuses
    s.dataset = torch.utils.data.TensorDataset(torch.zeros(20, 64), labels)
    app = build_client_app(lambda ctx: s)
    with pytest.raises(Exception, match="out of bounds"):
        ask(app, instructions())
    [entry] = AuditLog(tmp_path).entries()
    assert entry["decision"] == "failed" and "IndexError" in entry["reason"]
    assert entry["run"] == "0123456789ab" and entry["asked"]["task"] == "digits-mlp"


def test_a_damaged_ledger_refuses_with_a_short_reason_and_is_kept_as_it_is(tmp_path):
    s = site(tmp_path, policy())
    (tmp_path / "privacy_ledger.json").write_text('{"version": 1, "accountant": "rd')
    report = ask(build_client_app(lambda ctx: s), instructions())
    assert report.status == "refused-policy"
    assert "privacy_ledger.json cannot be read" in report.reason and "restored" in report.reason
    assert len(report.reason) < 400 and "Traceback" not in report.reason
    assert (tmp_path / "privacy_ledger.json").read_text() == '{"version": 1, "accountant": "rd'
    [entry] = AuditLog(tmp_path).entries()
    assert entry["decision"] == "refused-policy"


def test_two_requests_of_one_site_at_once_both_spend(tmp_path, monkeypatch):
    # Two processes serving one site's state directory (say, two federations) each read the
    # ledger, train and spend. The first is held up after its read; without the lock, the
    # second would read the same empty balance and the last write would keep one spend.
    import fcntl
    import threading
    import time

    from consortia.privacy.dp.ledger import held

    first, second = site(tmp_path, policy(max_rounds=5)), site(tmp_path, policy(max_rounds=5))
    opened = threading.Event()
    slow_open = first.open_ledger

    def open_then_wait():
        ledger = slow_open()
        opened.set()
        time.sleep(0.5)
        return ledger

    monkeypatch.setattr(first, "open_ledger", open_then_wait)
    reports = {}
    runs = [threading.Thread(target=lambda: reports.__setitem__(
        "first", ask(build_client_app(lambda ctx: first), instructions())))]
    runs[0].start()
    assert opened.wait(30)
    with pytest.raises(BlockingIOError):  # the first request holds the ledger
        with open(tmp_path / "privacy_ledger.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    runs.append(threading.Thread(target=lambda: reports.__setitem__(
        "second", ask(build_client_app(lambda ctx: second), instructions(run_id="ffffffffffff")))))
    runs[1].start()
    for run in runs:
        run.join(60)
    assert reports["first"].status == reports["second"].status == "trained"
    ledger = second.open_ledger()
    one_round = reports["first"].steps
    assert one_round > 0 and ledger.steps == 2 * one_round
    assert [e["decision"] for e in ledger.events] == ["trained", "trained"]
    assert reports["second"].steps == ledger.steps  # the second read the first's spend
    assert ledger.epsilon == pytest.approx(reports["second"].epsilon)
    assert reports["second"].epsilon > reports["first"].epsilon
    with held(tmp_path):  # released after both
        pass


def test_joining_says_what_the_ledger_holds_and_a_ledger_under_other_terms_fails(tmp_path):
    from consortia.client.join import JoinError, ledger_line
    from consortia.privacy.display import epsilon_text

    s = site(tmp_path, policy())
    assert ledger_line(s) == "privacy ledger: ε 0.000 of 5 spent (δ = 1e-05)"
    report = ask(build_client_app(lambda ctx: s), instructions())
    assert f"ε {epsilon_text(report.epsilon)} of 5 spent" in ledger_line(s)
    # The partner lowered its budget below what it has spent: told at join.
    lowered = site(tmp_path, policy(epsilon_budget=report.epsilon / 2))
    assert ledger_line(lowered).startswith("warning: this site's privacy budget is spent (ε ")
    assert "it will refuse every DP request" in ledger_line(lowered)
    # site.toml's δ changed since the ledger was kept: every DP request would be refused.
    with pytest.raises(JoinError, match=r"privacy ledger: .* was kept with accountant='rdp', "
                                        r"delta=1e-05; this run asks for .*delta=1e-06"):
        ledger_line(site(tmp_path, policy(delta=1e-6)))


def test_a_client_says_whether_its_ledger_can_pay_for_another_round(tmp_path):
    # Advertising its keys (the request carries the run's train instructions) and in each
    # DP train reply, a client says whether one more such round fits its budget: the
    # server leaves one that cannot out of the next secure round's masking graph.
    from consortia.messages import REPORT, SECAGG, SECAGG_ADVERTISE, TrainReport

    one_round = instructions(noise_multiplier=1.2)
    s = site(tmp_path, policy(max_rounds=None))
    first = ask(build_client_app(lambda ctx: s), one_round)
    from opacus.accountants import RDPAccountant

    two = RDPAccountant()
    two.history = [(1.2, first.sample_rate, 2 * first.steps)]
    budget = (first.epsilon + two.get_epsilon(1e-5)) / 2  # one round fits, two do not
    s = site(tmp_path / "b", policy(max_rounds=None, epsilon_budget=budget))
    app = build_client_app(lambda ctx: s)

    def advertised():
        content = RecordDict({"config": one_round.to_config_record()})
        msg = Message(content=content, dst_node_id=5, message_type=SECAGG_ADVERTISE)
        ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
        return app(msg, ctx).content

    assert advertised()[SECAGG].get("can_train") is True and REPORT not in advertised()
    report = ask(app, one_round)
    assert report.status == "trained" and report.can_train_again is False
    content = advertised()
    assert content[SECAGG].get("can_train") is False
    # With the bit, the refusal a train request would get: the server records its ε (a
    # resumed run's first rounds had none for such a client).
    said = TrainReport.from_content(content)
    assert (said.status, said.epsilon, said.epsilon_budget) == ("refused-budget",
                                                                report.epsilon, budget)
    refused = ask(app, one_round, 2)
    assert refused.status == "refused-budget" and refused.can_train_again is False
    # Each answer to an advertisement is in the site's own audit log, beside the requests.
    log = [(e["decision"], e.get("can_train")) for e in AuditLog(tmp_path / "b").entries()]
    assert log == [("advertised", True), ("advertised", True), ("trained", None),
                   ("advertised", False), ("refused-budget", None)]
