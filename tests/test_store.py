"""The run store: what a writer records is what readers get back, and a stop request sticks."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from consortia.config import ConfigError, load_config
from consortia.server.results import RunRecorder, read_jsonl
from consortia.server.store import (
    RunNotRunning,
    RunStore,
    StoreError,
    UnknownRun,
    default_store_url,
    resolve_store_url,
)
from consortia.server.validation import ReplyOutcome

BIG_NODE_ID = 17049052442106870626  # Flower node ids are unsigned 64-bit


def row(r, acc=0.5, **extra):
    return {"round": r, "loss": 2.0 - r / 10, "accuracy": acc, "clients_sampled": 2,
            "clients_trained": 1, "clients_refused": 0, "clients_rejected": 1, "clients_failed": 0,
            "epsilon_max": 0.1 * r, "epsilon_mean": 0.1 * r, "duration_s": 1.25,
            "checkpoint_sha256": f"{r:064x}", **extra}


def part(r, client, status="trained", reason="", eps=None, budget=3.0, node=BIG_NODE_ID):
    return {"round": r, "client_id": client, "node_id": node, "status": status, "reason": reason,
            "epsilon": eps, "epsilon_budget": budget, "steps": 12 * r, "num_examples": 300}


@pytest.fixture
def store(tmp_path):
    s = RunStore(tmp_path / "store.db")
    s.start_run("run1", task="digits-mlp", rounds_total=3, config={"rounds": 3}, out_dir=tmp_path)
    yield s
    s.close()


def test_sqlite_store_is_in_wal_mode(store):
    assert store.journal_mode() == "wal"


def test_rounds_and_participation_read_back_exactly(store):
    rows = [row(1, 0.25), row(2, 0.5 + 1e-17, secagg_status="ok", secagg_dropped=1)]
    parts = [[part(1, "0", eps=0.5), part(1, "1", "rejected", "tensor 'w' holds NaN")],
             [part(2, "0", eps=0.75), part(2, "1", "refused-budget", "would pass 3.0", eps=2.9)]]
    for r, p in zip(rows, parts, strict=True):
        store.record_round("run1", r, p)
    assert store.metrics_rows("run1") == rows
    assert store.participation_rows("run1") == parts[0] + parts[1]
    assert store.participation_rows("run1", 2) == parts[1]
    assert store.participation_rows("run1")[0]["node_id"] == BIG_NODE_ID
    typed = store.rounds("run1")
    assert [r["secagg_status"] for r in typed] == [None, "ok"]
    assert typed[1]["secagg_dropped"] == 1 and typed[0]["clients_rejected"] == 1
    assert store.get_run("run1")["rounds_completed"] == 2


def test_client_table_joins_rounds_last_seen_and_latest_epsilon(store):
    store.record_round("run1", row(1), [part(1, "0", eps=0.5), part(1, "10", eps=0.4)])
    store.record_round("run1", row(2), [part(2, "0", eps=0.9), part(2, "10", "failed", "timeout")])
    clients = {c["client_id"]: c for c in store.clients("run1")}
    assert [c["client_id"] for c in store.clients("run1")] == ["0", "10"]  # natural order
    assert clients["0"]["rounds_joined"] == 2 and clients["0"]["epsilon"] == 0.9
    assert clients["10"] == {**clients["10"], "status": "failed", "reason": "timeout",
                             "rounds_joined": 1, "last_seen_round": 2, "epsilon": 0.4,
                             "epsilon_budget": 3.0}


def test_client_table_carries_the_distributed_dp_fallback_epsilon(store):
    store.record_round("run1", row(1), [{**part(1, "0", eps=0.5), "epsilon_if_secagg_fails": 4.0},
                                        part(1, "1", eps=0.4)])
    store.record_round("run1", row(2), [{**part(2, "0", eps=0.7), "epsilon_if_secagg_fails": 5.5}])
    clients = {c["client_id"]: c for c in store.clients("run1")}
    assert clients["0"]["epsilon_if_secagg_fails"] == 5.5 and clients["0"]["epsilon"] == 0.7
    assert clients["1"]["epsilon_if_secagg_fails"] is None  # local DP: one guarantee


def test_each_clients_epsilon_is_shown_with_its_own_delta(store, tmp_path):
    """A partner's site.toml sets its own δ: the run's privacy.delta is not every ε's. The
    client table, `runs show` and report.html showed ε without δ, under the run's δ alone
    (a site at δ 1e-3 read ε 0.45 beside one at 1e-5 with 1.2, for the same σ, q, steps)."""
    from typer.testing import CliRunner

    from consortia.cli import app
    from consortia.messages import TrainReport
    from consortia.simulations.report import write_report

    recorder = RunRecorder(tmp_path, store, "run1")
    recorder.restore(0)
    reports = [TrainReport(client_id=name, status="trained", num_examples=500, dp_enabled=True,
                           accountant="rdp", delta=delta, epsilon=eps, epsilon_budget=3.0,
                           noise_multiplier=1.1, sample_rate=0.1, steps=10)
               for name, delta, eps in (("site-a", 1e-5, 1.2), ("site-b", 1e-3, 0.45))]
    recorder.record_round(1, {"accuracy": 0.5, "loss": 1.0},
                          [ReplyOutcome(i + 1, "trained", "", r) for i, r in enumerate(reports)],
                          0.1, "0" * 64)
    recorder.write_summary(task="digits-mlp", rounds=1, delta=1e-5, config={})
    assert [(c["client_id"], c["delta"]) for c in store.clients("run1")] \
        == [("site-a", 1e-5), ("site-b", 1e-3)]
    shown = CliRunner().invoke(app, ["runs", "show", "run1", "--store", str(tmp_path / "store.db")],
                               env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert [line.split("│")[5:7] for line in shown.output.splitlines() if "site-" in line] \
        == [[" 1.200 ", " 1e-05 "], [" 0.450 ", " 0.001 "]]
    html = write_report(tmp_path).read_text()
    assert "<th>epsilon</th><th>delta</th>" in html
    assert "<td>site-b</td><td>0.450</td><td>0.001</td>" in html  # rounded up at 3 places


def test_an_exported_models_manifest_states_each_epsilons_delta_and_the_user_level_one(tmp_path):
    """consortia export's manifest gave one δ (the run's) beside every client's ε, and no
    user-level ε at all, though summary.json has both."""
    from consortia.messages import TrainReport
    from consortia.server.export import privacy_terms

    recorder = RunRecorder(tmp_path)
    recorder.restore(0)
    reports = [TrainReport(client_id=name, status="trained", num_examples=500, dp_enabled=True,
                           accountant="rdp", delta=delta, epsilon=eps, epsilon_budget=3.0)
               for name, delta, eps in (("site-a", 1e-5, 1.2), ("site-b", 1e-3, 0.45))]
    recorder.record_round(1, {"accuracy": 0.5, "loss": 1.0},
                          [ReplyOutcome(i + 1, "trained", "", r) for i, r in enumerate(reports)],
                          0.1, "0" * 64)
    summary = recorder.write_summary(task="digits-mlp", rounds=1, delta=1e-5, config={},
                                     extra={"user_epsilon": 4.2})
    assert privacy_terms(True, summary) == {
        "dp": True, "delta": 1e-5, "epsilon_per_client": {"site-a": 1.2, "site-b": 0.45},
        "delta_per_client": {"site-a": 1e-5, "site-b": 1e-3}, "user_epsilon": 4.2}


def test_client_table_reads_reports_holding_nan_or_infinity(store):
    """A diverging client reports train_loss NaN or Infinity (Python's json writes them,
    as participation.jsonl has them); SQLite's json_extract called such a report malformed
    and failed the whole client table (the console's /clients 500, `runs show` a traceback)."""
    store.record_round("run1", row(1), [
        {**part(1, "0", eps=0.5), "train_loss": float("inf"), "epsilon_if_secagg_fails": 4.0},
        {**part(1, "1", "rejected", "tensor 'w' holds NaN or infinite values", eps=0.4),
         "train_loss": float("nan")},
        {**part(1, "2", eps=0.3), "epsilon_if_secagg_fails": 2.5}])
    clients = {c["client_id"]: c for c in store.clients("run1")}
    assert [(c, clients[c]["epsilon"], clients[c]["epsilon_if_secagg_fails"]) for c in clients] \
        == [("0", 0.5, 4.0), ("1", 0.4, None), ("2", 0.3, 2.5)]
    assert clients["1"]["status"] == "rejected"


def test_protocol_and_operator_events_go_to_the_audit_log(store):
    store.record_round("run1", row(1, secagg_status="aborted", secagg_reason="too few survivors"),
                       [part(1, "1", "rejected", "tensor 'w' holds NaN")])
    store.request_stop("run1", actor="cli:alice")
    store.request_stop("run1", actor="console")  # a second request changes nothing
    events = [(e["event"], e["actor"], e["kind"]) for e in store.audit_log("run1")]
    assert events == [("stop-requested", "cli:alice", "operator"),
                      ("secagg-aborted", "server", "protocol"),
                      ("update-rejected", "server", "protocol"),
                      ("run-started", "server", "protocol")]
    assert "holds NaN" in store.audit_log("run1")[2]["detail"]
    assert store.get_run("run1")["stop_requested_by"] == "cli:alice"


def test_stop_request_is_seen_by_the_writer_and_cleared_on_resume(store):
    assert not store.stop_requested("run1")
    store.request_stop("run1", actor="console")
    assert store.stop_requested("run1")
    store.finish_run("run1", "stopped")
    with pytest.raises(RunNotRunning, match="stopped"):
        store.request_stop("run1", actor="console")
    store.start_run("run1", task="digits-mlp", rounds_total=3, config={"rounds": 3})
    assert not store.stop_requested("run1") and store.get_run("run1")["status"] == "running"
    assert store.audit_log("run1")[0]["event"] == "run-resumed"


def test_unknown_run_and_prefixes(store):
    store.start_run("run2", task="digits-mlp", rounds_total=1, config={})
    store.start_run("other", task="digits-mlp", rounds_total=1, config={})
    assert store.resolve_run("oth") == "other"
    with pytest.raises(UnknownRun, match="matches 2 runs"):
        store.resolve_run("run")
    for read in (store.get_run, store.rounds, store.clients, store.checkpoints, store.audit_log):
        with pytest.raises(UnknownRun, match="nope"):
            read("nope")
    with pytest.raises(UnknownRun):
        store.record_round("nope", row(1), [])


def test_an_empty_run_id_is_no_run_even_in_a_store_of_one(store):
    # Every id starts with "": `runs stop ""` would have stopped the only run.
    store.start_run("only", task="digits-mlp", rounds_total=1, config={})
    with pytest.raises(UnknownRun, match="no run id given; accepted: a run id or a unique"):
        store.resolve_run("")


def test_recorder_mirrors_into_the_store_and_a_resume_truncates_both(tmp_path, store):
    from consortia.messages import TrainReport

    recorder = RunRecorder(tmp_path, store, "run1")
    recorder.restore(0)
    for r in (1, 2, 3):
        report = TrainReport(client_id="0", status="trained", num_examples=10, epsilon=0.1 * r,
                             epsilon_budget=1.0, steps=r)
        recorder.record_round(r, {"accuracy": 0.1 * r, "loss": 1.0}, [ReplyOutcome(7, "trained",
                                                                                    "", report)],
                              0.5, f"{r:064x}")
    assert store.metrics_rows("run1") == read_jsonl(tmp_path / "metrics.jsonl")
    assert store.participation_rows("run1") == read_jsonl(tmp_path / "participation.jsonl")
    store.record_checkpoint("run1", 3, "c" * 64, "b" * 64, tmp_path / "round-00003.safetensors")
    RunRecorder(tmp_path, store, "run1").restore(2)  # a resume from round 2's checkpoint
    assert [r["round"] for r in store.metrics_rows("run1")] == [1, 2]
    assert store.metrics_rows("run1") == read_jsonl(tmp_path / "metrics.jsonl")
    assert store.participation_rows("run1") == read_jsonl(tmp_path / "participation.jsonl")
    assert store.checkpoints("run1") == []  # round 3's checkpoint is gone with the round
    # Files lost (or cut short) since: the store, which keeps each row verbatim, rebuilds them.
    kept_metrics, kept_participation = store.metrics_rows("run1"), store.participation_rows("run1")
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "participation.jsonl").write_text("")
    RunRecorder(tmp_path, store, "run1").restore(2)
    assert read_jsonl(tmp_path / "metrics.jsonl") == kept_metrics
    assert read_jsonl(tmp_path / "participation.jsonl") == kept_participation


def test_a_reader_does_not_block_the_writer(store, tmp_path):
    # An open read transaction (WAL snapshot) must not delay a write.
    reader = sqlite3.connect(tmp_path / "store.db")
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM rounds").fetchall()
    started = time.perf_counter()
    store.record_round("run1", row(1), [part(1, "0", eps=0.1)])
    assert time.perf_counter() - started < 1.0
    reader.rollback()
    reader.close()


def test_two_writers_queue_rather_than_fail(tmp_path, store):
    other = RunStore(tmp_path / "store.db")
    errors = []

    def write(s, first):
        try:
            for r in range(first, first + 20):
                s.record_round("run1", row(r), [part(r, "0", eps=0.1)])
        except Exception as err:  # pragma: no cover - the failure being tested for
            errors.append(err)

    threads = [threading.Thread(target=write, args=(s, first))
               for s, first in ((store, 1), (other, 101))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(store.metrics_rows("run1")) == 40
    other.close()


def test_config_store_url_is_validated_and_names_the_value(tmp_path):
    cfg = load_config(None, [f"store.url=sqlite:///{tmp_path}/runs.db"])
    assert cfg.store.url == f"sqlite:///{tmp_path}/runs.db"
    assert load_config(None).store.url is None
    with pytest.raises(ConfigError, match="store.url.*'mysql'.*accepted"):
        load_config(None, ["store.url=mysql://db/runs"])


def test_bad_store_urls_name_the_value(tmp_path):
    with pytest.raises(StoreError, match="'oracle://x/y'.*accepted"):
        RunStore("oracle://x/y")
    with pytest.raises(StoreError, match="/no/such/dir"):
        RunStore("sqlite:////no/such/dir/store.db")
    with pytest.raises(StoreError, match=r"u:\*\*\*@.*psycopg|cannot open store"):
        RunStore("postgresql://u:secret@127.0.0.1:1/db")
    assert resolve_store_url(tmp_path) == f"sqlite:///{tmp_path.resolve()}/store.db"


def test_store_never_shows_a_database_password(tmp_path):
    s = RunStore(tmp_path / "s.db")
    s.start_run("r", task="digits-mlp", rounds_total=1,
                config={"store": {"url": "postgresql://op:hunter2@db/runs"}})
    assert "hunter2" not in json.dumps(s.get_run("r"))
    s.close()


def test_a_running_run_whose_process_stops_beating_reads_lost(store, monkeypatch):
    from consortia.server.store import LOST_AFTER_S, Heartbeat
    from consortia.server.store import store as store_module

    assert store.get_run("run1")["status"] == "running"
    # The heartbeat touches the row while its block runs, and only then.
    before = store.get_run("run1")["updated_at"]
    with Heartbeat(store, "run1", interval=0.05):
        time.sleep(0.3)
    touched = store.get_run("run1")["updated_at"]
    assert touched > before
    time.sleep(0.2)
    assert store.get_run("run1")["updated_at"] == touched
    # LOST_AFTER_S later (the reader's clock), the run reads lost, in every view.
    later = touched + LOST_AFTER_S + 1
    monkeypatch.setattr(store_module.time, "time", lambda: later)
    assert store.get_run("run1")["status"] == "lost"
    assert [r["status"] for r in store.list_runs()] == ["lost"]
    with pytest.raises(RunNotRunning, match="lost, not running .*killed.*--resume"):
        store.request_stop("run1", actor="console")
    # A beat (the process was only stalled) or a resume makes it running again.
    store.heartbeat("run1")
    assert store.get_run("run1")["status"] == "running"
    store.finish_run("run1", "completed")
    monkeypatch.setattr(store_module.time, "time", lambda: later + 10 * LOST_AFTER_S)
    assert store.get_run("run1")["status"] == "completed"  # a finished run is never lost


SMOKE = Path(__file__).resolve().parents[1] / "simulations" / "experiments" / "digits-dp-smoke.toml"


def sim_run_until_a_round(out, rounds, log):
    """`consortia sim run` in a process of its own (its own session), once its first round
    is in the store; its output goes to `log`."""
    proc = subprocess.Popen([sys.executable, "-m", "consortia.cli", "sim", "run", str(SMOKE),
                             "--out", str(out), "--set", f"rounds={rounds}"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if (out / "store.db").exists():
            runs = RunStore(out / "store.db", create=False).list_runs()
            if runs and runs[0]["rounds_completed"] >= 1:
                return proc
        if proc.poll() is not None:
            raise AssertionError(f"the simulation ended first: {log.read_text()}")
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("no round recorded within 240 s")


@pytest.mark.slow
def test_a_simulation_killed_with_sigkill_reads_lost_not_running(tmp_path, monkeypatch):
    from consortia.server.store import LOST_AFTER_S
    from consortia.server.store import store as store_module

    out = tmp_path / "run"
    proc = sim_run_until_a_round(out, 50, tmp_path / "log")
    os.killpg(proc.pid, signal.SIGKILL)  # nothing in the process can record this
    proc.wait()
    reader = RunStore(out / "store.db", create=False)
    [run] = reader.list_runs()
    assert run["status"] == "running"  # just killed: within the heartbeat's margin
    later = run["updated_at"] + LOST_AFTER_S + 1
    monkeypatch.setattr(store_module.time, "time", lambda: later)
    assert reader.get_run(run["run_id"])["status"] == "lost"
    reader.close()


@pytest.mark.slow
def test_sim_run_stopped_by_sigterm_is_recorded_stopped_with_its_resume_command(tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    proc = sim_run_until_a_round(out, 500, log)
    try:
        proc.send_signal(signal.SIGTERM)  # to the main process only, as `timeout` does
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = " ".join(log.read_text().split())
    assert proc.returncode == 130, output
    assert f"continue with: consortia sim run {SMOKE} --out {out} --set rounds=500 --resume" \
        in output
    [run] = RunStore(out / "store.db", create=False).list_runs()
    assert run["status"] == "stopped" and 1 <= run["rounds_completed"] < 500
    assert "Traceback" not in output


@pytest.mark.parametrize("name", ["q?1", "p%41", "h#1", "at@host", "a b"])
def test_a_results_directory_named_with_url_characters_keeps_its_store(tmp_path, name):
    """'results/q?1' became sqlite:///.../q?1/store.db: the store went to a file 'q' beside
    it (where every 'q?N' run would share it), and 'p%41' failed naming a folder 'pA'."""
    out = tmp_path / name
    out.mkdir()
    store = RunStore(default_store_url(out))
    store.start_run("run1", task="digits-mlp", rounds_total=1, config={})
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    assert (out / "store.db").is_file()
    for given in (out, out / "store.db"):  # what an operator passes to --store
        reader = RunStore(given, create=False)
        assert [r["run_id"] for r in reader.list_runs()] == ["run1"]
        reader.close()


def test_a_resume_keeps_when_each_kept_round_was_recorded(store):
    """replace_rounds (every resume) stamped every kept round with the resume's time: the
    console's 'last seen' of every client, and the rounds' order against a stop request,
    then read as if all had been recorded at the resume."""
    store.record_round("run1", row(1), [part(1, "0", eps=0.5)])
    store.record_round("run1", row(2), [part(2, "0", eps=0.7)])
    store.record_round("run1", row(3), [part(3, "0", eps=0.9)])
    before = {r["round"]: r["recorded_at"] for r in store.rounds("run1")}
    seen = store.clients("run1")[0]["last_seen_at"]
    store.replace_rounds("run1", 3, [row(1), row(2), row(3)],
                         [part(1, "0", eps=0.5), part(2, "0", eps=0.7), part(3, "0", eps=0.9)])
    assert {r["round"]: r["recorded_at"] for r in store.rounds("run1")} == before
    assert store.clients("run1")[0]["last_seen_at"] == seen == before[3]
    store.replace_rounds("run1", 2, [row(1), row(2)], [part(1, "0", eps=0.5),
                                                       part(2, "0", eps=0.7)])
    assert {r["round"]: r["recorded_at"] for r in store.rounds("run1")} == \
        {1: before[1], 2: before[2]}


def test_a_resume_records_where_the_results_directory_is_now(store, tmp_path):
    """A results directory moved, then resumed (--out NEW --resume): the run kept the old
    out_dir in the store (digits sim moved /tmp/opaudit/r8 -> r8m, resumed: out_dir r8)."""
    store.finish_run("run1", "stopped")
    store.start_run("run1", task="digits-mlp", rounds_total=3, config={"rounds": 3},
                    out_dir=tmp_path / "moved")
    assert store.get_run("run1")["out_dir"] == str(tmp_path / "moved")


def damaged_store(path: Path) -> Path:
    """A store file whose schema (page 1) reads but whose tables do not: every later page
    overwritten, as a disk error or a partial copy leaves one."""
    store = RunStore(path)
    store.start_run("run1", task="digits-mlp", rounds_total=2, config={})
    store.record_round("run1", row(1), [{"round": 1, "client_id": "0", "status": "trained",
                                         "epsilon": 1.0, "epsilon_budget": 3.0}])
    store.close()
    data = path.read_bytes()
    path.write_bytes(data[:4096] + b"\xff" * (len(data) - 4096))
    return path


def test_a_damaged_store_file_is_refused_at_a_writers_open_naming_it_and_what_to_do(tmp_path):
    """A run resumed on a store.db damaged past its first page opened it, started Ray,
    and failed in the ServerApp with 1,624 lines of traceback ending in SQLAlchemy's
    'database disk image is malformed'. The writer's open now runs SQLite's quick_check:
    the run fails before it starts, naming the file and the way out (move it aside,
    --resume records the run in a new one)."""
    path = damaged_store(tmp_path / "store.db")
    with pytest.raises(StoreError) as caught:
        RunStore(path)
    message = str(caught.value)
    assert "quick_check" in message and f"mv {path} {path}.damaged" in message
    assert "--resume" in message
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"\x13" * 5000)  # not a database at all
    for create in (True, False):
        with pytest.raises(StoreError, match=f"not a database; the store file {garbage} is "
                                             "damaged: move it aside"):
            RunStore(garbage, create=create)


def test_a_finished_runs_resume_records_it_in_a_store_that_lost_it(tmp_path, monkeypatch):
    """The way out of a damaged store: move it aside and --resume. An unfinished run is
    recorded again as it resumes; a finished one was not ('already completed all 1 rounds:
    nothing to run', no store.db made), so `consortia runs` and the console had nothing of
    it for good. Its resume now records it from its results directory, once."""
    from consortia.server.checkpoint import CheckpointStore
    from consortia.server.run_dir import prepare_out_dir
    from consortia.simulations import report, runner

    smoke = Path(__file__).resolve().parents[1] / "simulations" / "experiments" / \
        "digits-dp-smoke.toml"
    cfg = load_config(smoke, ["rounds=1"])
    out = tmp_path / "run"
    run_id = prepare_out_dir(cfg, out, resume=False)
    import numpy as np

    checkpoints = [CheckpointStore(out / "checkpoints").save(r, {"w": np.zeros(2, np.float32)}, {})
                   for r in range(2)]
    metrics = [row(1, epsilon_max=1.5, secagg_status="ok", secagg_participants=2)]
    participation = [{"round": 1, "client_id": str(i), "status": "trained", "reason": "",
                      "epsilon": 1.5, "epsilon_budget": 3.0, "delta": 1e-5} for i in range(2)]
    for name, rows in (("metrics.jsonl", metrics), ("participation.jsonl", participation)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "summary.json").write_text(json.dumps({"rounds": 1, "rounds_completed": 1}))
    monkeypatch.setattr(report, "write_report", lambda run_dir: None)
    monkeypatch.setattr(runner, "start_checks", lambda cfg: None)
    said: list[str] = []
    runner.run_simulation(cfg, out, resume=True, on_status=said.append)
    assert "nothing to run; recorded it again in the run store" in said[-1]
    store = RunStore(out, create=False)
    run = store.get_run(run_id)
    assert (run["status"], run["rounds_completed"], run["rounds_total"]) == ("completed", 1, 1)
    assert store.metrics_rows(run_id) == metrics
    assert store.participation_rows(run_id) == participation
    assert [(c["client_id"], c["epsilon"], c["delta"]) for c in store.clients(run_id)] == \
        [("0", 1.5, 1e-5), ("1", 1.5, 1e-5)]
    assert [c["sha256"] for c in store.checkpoints(run_id)] == [c.sha256 for c in checkpoints]
    assert all(c["available"] for c in store.checkpoints(run_id))
    events = [e["event"] for e in store.audit_log(run_id)]
    assert "run-recorded-from-files" in events
    said.clear()
    runner.run_simulation(cfg, out, resume=True, on_status=said.append)  # it has it: left alone
    assert said[-1].endswith("nothing to run")
    assert [e["event"] for e in store.audit_log(run_id)] == events
    store.close()
