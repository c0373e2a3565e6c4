"""End-to-end federations on Flower's simulation engine (Ray), digits task, CPU."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from opacus.accountants import RDPAccountant

from consortia.config import load_config
from consortia.server.checkpoint import CheckpointStore
from consortia.server.results import read_jsonl
from consortia.simulations.faults import MalformedUpdates
from consortia.simulations.runner import ResultsDirError, run_simulation

pytestmark = pytest.mark.slow
SMOKE = Path(__file__).resolve().parents[1] / "simulations" / "experiments" / "digits-dp-smoke.toml"
METRIC_KEYS = {"round", "accuracy", "loss", "clients_trained", "clients_refused", "epsilon_max",
               "epsilon_mean", "duration_s"}
CLIENT_KEYS = {"id", "epsilon", "noise_multiplier", "sample_rate", "steps", "accountant",
               "rounds_participated", "refused_rounds"}


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    cfg = load_config(SMOKE)
    return cfg, out, run_simulation(cfg, out)


def test_dp_federation_learns_and_writes_its_results(smoke_run):
    cfg, out, summary = smoke_run
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(METRIC_KEYS <= r.keys() for r in rows)
    initial = CheckpointStore(out / "checkpoints").all()[0].manifest["metrics"]["accuracy"]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] > initial
    assert rows[-1]["accuracy"] > 0.5
    assert all(r["clients_trained"] == 4 and r["clients_refused"] == 0 for r in rows)
    assert summary["task"] == "digits-mlp" and summary["rounds"] == 3
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert summary["delta"] == 1e-5
    assert summary["config"]["privacy"]["epsilon_budget"] == 3.0
    assert len(summary["clients"]) == 4
    for client in summary["clients"]:
        assert CLIENT_KEYS <= client.keys()
        assert client["rounds_participated"] == [1, 2, 3] and client["refused_rounds"] == []
        assert 0 < client["epsilon"] <= 3.0


def test_summary_epsilon_is_reproduced_by_independent_accountants(smoke_run):
    _, _, summary = smoke_run
    for c in summary["clients"]:
        opacus = RDPAccountant()
        opacus.history = [(c["noise_multiplier"], c["sample_rate"], c["steps"])]
        assert c["epsilon"] == pytest.approx(opacus.get_epsilon(1e-5), rel=1e-9)
        google = rdp.RdpAccountant()
        google.compose(dp_event.PoissonSampledDpEvent(
            c["sample_rate"], dp_event.GaussianDpEvent(c["noise_multiplier"])), c["steps"])
        assert c["epsilon"] == pytest.approx(google.get_epsilon(1e-5), rel=0.01)


def test_checkpoints_form_a_hash_chain(smoke_run):
    _, out, _ = smoke_run
    chain = CheckpointStore(out / "checkpoints").all()
    assert [c.round for c in chain] == [0, 1, 2, 3]
    assert chain[0].parent_sha256 is None
    assert all(b.parent_sha256 == a.sha256 for a, b in zip(chain, chain[1:], strict=False))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["checkpoint_sha256"] for r in rows] == [c.sha256 for c in chain[1:]]


def test_same_results_dir_needs_resume(smoke_run):
    cfg, out, _ = smoke_run
    with pytest.raises(ResultsDirError, match="--resume"):
        run_simulation(cfg, out)


def test_a_resume_that_would_lose_history_is_refused_and_a_finished_run_is_left_alone(
        smoke_run, tmp_path):
    import shutil

    cfg, out, summary = smoke_run
    # A finished run: nothing to run, nothing rewritten.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert run_simulation(cfg, out, resume=True) == summary
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before

    def copy(name):
        shutil.copytree(out, tmp_path / name)
        return tmp_path / name

    # Without its checkpoints a resume would start again from round 0.
    gone = copy("no-checkpoints")
    shutil.rmtree(gone / "checkpoints")
    with pytest.raises(ResultsDirError, match="no checkpoint in .* verifies .none there"):
        run_simulation(cfg, gone, resume=True)
    # Without the clients' ledgers, or with one older than the run, ε would restart.
    gone = copy("no-ledgers")
    shutil.rmtree(gone / "clients")
    with pytest.raises(ResultsDirError, match="client 0 spent .* ledger .* is missing"):
        run_simulation(cfg, gone, resume=True)
    older = copy("older-ledger")
    ledger = json.loads((older / "clients" / "1" / "privacy_ledger.json").read_text())
    ledger["accountant_state"]["history"][-1][2] -= 1
    (older / "clients" / "1" / "privacy_ledger.json").write_text(json.dumps(ledger))
    with pytest.raises(ResultsDirError, match="client 1's ledger .* holds .* steps, the run's"):
        run_simulation(cfg, older, resume=True)


def test_a_results_directory_removed_under_a_running_run_stops_it(tmp_path):
    # A directory deleted mid-run would be made anew, its clients' ledgers fresh: the run
    # stops at the next round instead, and says why.
    def remove_after_round_one(row):
        if row["round"] == 1:
            (tmp_path / "run.json").unlink()

    cfg = load_config(SMOKE, ["rounds=3"])
    with pytest.raises(ResultsDirError, match="run.json is gone .*stopping before round 2"):
        run_simulation(cfg, tmp_path, on_round=remove_after_round_one)
    assert [r["round"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


def test_checkpoints_that_do_not_verify_are_named_and_passed_over(tmp_path):
    from consortia.server.checkpoint import CheckpointStore

    store = CheckpointStore(tmp_path)
    for r in range(3):
        store.save(r, {"w": np.full(2, r, np.float32)}, {})
    (tmp_path / "round-00002.safetensors").write_bytes(b"cut")
    (tmp_path / "round-00001.json").write_text('{"round": 1, "sha')
    reader = CheckpointStore(tmp_path)
    assert reader.latest().round == 0
    assert any("round-00001.json: manifest unreadable" in p for p in reader.problems)
    assert any("round 2: weights round-00002.safetensors do not match their hash" in p
               for p in reader.problems)


def test_resume_after_a_crash_continues_with_the_next_round(tmp_path):
    cfg = load_config(SMOKE, ["rounds=3"])

    def crash_after_round_2(row):
        if row["round"] == 2:
            raise Crash("server killed after round 2")

    with pytest.raises(Crash):
        run_simulation(cfg, tmp_path, on_round=crash_after_round_2)
    assert [r["round"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "summary.json").exists()

    seen = []
    summary = run_simulation(cfg, tmp_path, resume=True, on_round=lambda r: seen.append(r["round"]))
    assert seen == [3]  # the next round, not round 1
    assert [r["round"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    chain = CheckpointStore(tmp_path / "checkpoints").all()
    assert chain[3].parent_sha256 == chain[2].sha256
    for client in summary["clients"]:  # ledgers carried on, not reset
        assert client["rounds_participated"] == [1, 2, 3]
        ledger = json.loads((tmp_path / "clients" / client["id"] / "privacy_ledger.json").read_text())
        assert sum(e["steps"] for e in ledger["events"]) == client["steps"]
        assert [e["round"] for e in ledger["events"]] == [1, 2, 3]

    with pytest.raises(ResultsDirError, match="differs from the stored run in: rounds"):
        run_simulation(load_config(SMOKE, ["rounds=5"]), tmp_path, resume=True)
    # Each differing key is named with both values, a nested one by its dotted key.
    with pytest.raises(ResultsDirError,
                       match=r"in: privacy.delta \(1e-05 stored, 1e-06 now\); a resumed run"):
        run_simulation(load_config(SMOKE, ["privacy.delta=1e-6"]), tmp_path, resume=True)


def test_malformed_updates_are_rejected_and_budgets_enforced(tmp_path):
    # Clients 0 and 1 send a NaN and a wrongly shaped update; the others' budget fits two
    # rounds of σ = 1 but not three, so they refuse round 3.
    n_train, batch = 1437 // 4, 32
    steps = math.ceil(n_train / batch)
    acc = RDPAccountant()
    acc.history = [(1.0, 1 / steps, 2 * steps)]
    two_rounds = acc.get_epsilon(1e-5)
    acc.history = [(1.0, 1 / steps, 3 * steps)]
    budget = (two_rounds + acc.get_epsilon(1e-5)) / 2

    cfg = load_config(SMOKE, ["privacy.noise_multiplier=1.0", f"privacy.epsilon_budget={budget}"])
    summary = run_simulation(cfg, tmp_path,
                             client_mods=[MalformedUpdates({0: "nan", 1: "shape"})])
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["clients_rejected"] for r in rows] == [2, 2, 0]
    assert [r["clients_trained"] for r in rows] == [2, 2, 0]
    assert [r["clients_refused"] for r in rows] == [0, 0, 4]
    assert rows[1]["accuracy"] > rows[0]["accuracy"] * 0.9  # the round went on without them
    assert rows[2]["accuracy"] == rows[1]["accuracy"]  # nothing to aggregate: model unchanged
    reasons = {p["client_id"]: p["reason"] for p in read_jsonl(tmp_path / "participation.jsonl")
               if p["round"] == 1}
    assert "NaN" in reasons["0"] and "shape" in reasons["1"]
    for client in summary["clients"]:
        assert client["refused_rounds"] == [3]
        assert client["epsilon"] <= budget


def test_cli_sim_run_writes_results_and_says_where(tmp_path):
    from typer.testing import CliRunner

    from consortia.cli import app

    out = tmp_path / "cli-run"
    result = CliRunner().invoke(app, ["sim", "run", str(SMOKE), "--out", str(out),
                                      "--set", "rounds=1", "--set", "privacy.enabled=false"])
    assert result.exit_code == 0, result.output
    assert f"results: {out.resolve()}" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["delta"] is None
    assert all(c["epsilon"] is None for c in summary["clients"])


@pytest.mark.slow
def test_a_run_stopped_between_evaluations_evaluates_the_model_it_leaves(tmp_path, monkeypatch):
    """eval_every = 4 and a stop asked as round 2 of 4 begins: round 2 becomes the last and
    is evaluated, so summary.json reports the accuracy of the model the run leaves."""
    from consortia.server.store import RunStore
    from consortia.server.workflow import RoundWorkflow

    out = tmp_path / "run"
    instructions = RoundWorkflow.instructions

    def stop_as_round_2_begins(self):
        # run_rounds asks for a round's instructions as the round begins.
        if len(read_jsonl(out / "metrics.jsonl")) == 1:
            store = RunStore(out / "store.db")
            (run,) = store.list_runs()
            store.request_stop(run["run_id"], actor="test")
        return instructions(self)

    monkeypatch.setattr(RoundWorkflow, "instructions", stop_as_round_2_begins)
    summary = run_simulation(load_config(SMOKE, ["rounds=4", "eval_every=4"]), out)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2] and summary["rounds_completed"] == 2
    assert "accuracy" not in rows[0] and 0.0 <= rows[1]["accuracy"] <= 1.0
    assert summary["final_accuracy"] == rows[1]["accuracy"]
