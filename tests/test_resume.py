"""Resuming a run that a crash cut off: what the process left on disk between two writes."""

import json
from pathlib import Path

import numpy as np
import pytest

from consortia.config import load_config
from consortia.server.checkpoint import CheckpointStore
from consortia.server.results import RunRecorder, read_jsonl
from consortia.server.run_dir import ResultsDirError, prepare_out_dir, run_finished
from consortia.server.store import RunStore
from consortia.server.validation import ReplyOutcome

SMOKE = Path(__file__).resolve().parents[1] / "simulations" / "experiments" / "digits-dp-smoke.toml"


def workflow(cfg, out, run_id, store):
    from consortia.server.workflow import RoundWorkflow
    from consortia.strategies import build_strategy
    from consortia.tasks import get_task

    return RoundWorkflow(cfg, get_task(cfg.task, cfg.task_options()), build_strategy(cfg), out,
                         run_id, store=store)


def checkpoint_round(flow, server_round, arrays):
    from consortia.server.workflow import arrays_to_numpy

    ckpt = flow.checkpoints.save(server_round, arrays_to_numpy(arrays), {"accuracy": 0.5},
                                 flow.state())
    flow.record_checkpoint(ckpt)
    return ckpt


def test_a_round_checkpointed_but_not_recorded_runs_again(tmp_path):
    """SIGKILL between a round's checkpoint and its rows (metrics.jsonl, participation.jsonl,
    the store): the resume continued after that checkpoint, so the round was never on
    record (sim run digits-dp-smoke, killed in RunRecorder.record_round of round 2, then
    --resume: metrics.jsonl rounds [1, 3], store rounds [1, 3], summary rounds_completed 2
    of a completed run). The round runs again, after the checkpoint before it."""
    cfg = load_config(SMOKE, ["rounds=3", "privacy.enabled=false"])
    out = tmp_path / "run"
    run_id = prepare_out_dir(cfg, out, resume=False)
    store = RunStore(out / "store.db")
    store.start_run(run_id, task=cfg.task, rounds_total=cfg.rounds, config={})
    first = workflow(cfg, out, run_id, store)
    _, arrays = first.start_state(resume=False)
    one = checkpoint_round(first, 1, arrays)
    first.recorder.record_round(1, {"accuracy": 0.5}, [ReplyOutcome(1, "trained", "")], 1.0,
                                one.sha256)
    checkpoint_round(first, 2, arrays)  # ... and the process is killed here

    resumed = workflow(cfg, out, run_id, store)
    start, _ = resumed.start_state(resume=True)
    assert start == 1
    assert [r["round"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    assert [c["round"] for c in store.checkpoints(run_id)] == [0, 1]
    assert any(e["event"] == "resume-passed-over-checkpoints"
               and "round 2: checkpoint round-00002.safetensors was written but the round "
                   "was not recorded" in e["detail"] for e in store.audit_log(run_id))
    # Round 2 again: its checkpoint replaces the one left behind, chained to round 1's.
    again = checkpoint_round(resumed, 2, arrays)
    assert again.parent_sha256 == one.sha256
    store.close()


def test_a_checkpoint_is_chained_to_the_round_before_it_not_a_newer_one(tmp_path):
    store = CheckpointStore(tmp_path)
    for r in range(3):
        store.save(r, {"w": np.full(2, r, np.float32)}, {})
    one = CheckpointStore(tmp_path).latest(before=2)
    assert one.round == 1
    assert CheckpointStore(tmp_path).save(2, {"w": np.zeros(2, np.float32)}, {}).parent_sha256 \
        == one.sha256


def test_a_run_killed_after_its_last_checkpoint_is_not_taken_for_finished(tmp_path):
    """A run stopped after round 1 (runs stop) writes its summary; resumed, and killed
    after round 3's checkpoint before its summary, it was taken for finished: --resume
    said 'already completed all 3 rounds: nothing to run', leaving summary.json at round
    1 (rounds_completed 1, round 1's accuracy) and the store's run 'running'."""
    cfg = load_config(SMOKE, ["rounds=3"])
    prepare_out_dir(cfg, tmp_path, resume=False)
    checkpoints = CheckpointStore(tmp_path / "checkpoints")
    for r in range(4):
        checkpoints.save(r, {"w": np.zeros(2, np.float32)}, {})
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"rounds": 3, "rounds_completed": 1}))
    assert not run_finished(cfg, tmp_path)
    summary.write_text(json.dumps({"rounds": 3, "rounds_completed": 3}))
    assert run_finished(cfg, tmp_path)


def test_a_resume_continues_the_servers_user_dp_noise_where_the_run_left_it(tmp_path):
    """Under user_dp (noise_at = server) the server draws each round's noise from one
    generator seeded at start; a resume seeded it again, so its rounds got the noise of
    the run's first rounds: sim run digits-dp-smoke --set rounds=4 --set user_dp.enabled=true
    --set privacy.enabled=false, SIGKILLed as round 3 was recorded, then --resume: round 3's
    accuracy 0.2089, final 0.3315; the same run uninterrupted 0.2730, 0.2173. The noise of
    a tensor also depends on the order the tensors are drawn in, which a checkpoint's
    safetensors file does not keep ('2.weight', '0.weight', ...): resumed, the weights come
    back in the model's order."""
    cfg = load_config(SMOKE, ["rounds=3", "privacy.enabled=false", "user_dp.enabled=true"])
    out = tmp_path / "run"
    run_id = prepare_out_dir(cfg, out, resume=False)
    first = workflow(cfg, out, run_id, None)
    _, arrays = first.start_state(resume=False)
    first.rng.normal(size=3)  # round 1's noise, drawn tensor by tensor in the model's order
    one = checkpoint_round(first, 1, arrays)
    first.recorder.record_round(1, {"accuracy": 0.5}, [ReplyOutcome(1, "trained", "")], 1.0,
                                one.sha256)
    uninterrupted = first.rng.normal(size=3)  # round 2's

    resumed = workflow(cfg, out, run_id, None)
    start, resumed_arrays = resumed.start_state(resume=True)
    assert start == 1 and list(resumed_arrays) == list(arrays)
    assert np.array_equal(resumed.rng.normal(size=3), uninterrupted)


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path):
    """Killed while Ray started (run.json written, round 0's checkpoint not yet), a run could
    be neither resumed nor started again in its directory: --resume said 'no checkpoint in
    .../checkpoints verifies (none there); ... restore checkpoints/ from a copy, or start a
    new run in another results directory', and sim run without it 'already holds run ...;
    pass --resume'; Ctrl-C there printed that --resume command. No round began, so nothing
    is lost: the resume starts the run. A run that recorded a round still refuses."""
    cfg = load_config(SMOKE, ["rounds=2", "privacy.enabled=false"])
    out = tmp_path / "run"
    run_id = prepare_out_dir(cfg, out, resume=False)  # ... and the process is killed here
    assert prepare_out_dir(cfg, out, resume=True) == run_id
    (out / "checkpoints").mkdir()  # or as it wrote round 0's weights, before their manifest
    (out / "checkpoints" / "round-00000.safetensors").write_bytes(b"cut")
    assert prepare_out_dir(cfg, out, resume=True) == run_id
    start, _ = workflow(cfg, out, run_id, None).start_state(resume=True)
    assert start == 0 and CheckpointStore(out / "checkpoints").latest().round == 0

    gone = tmp_path / "checkpoints-lost"
    prepare_out_dir(cfg, gone, resume=False)
    (gone / "metrics.jsonl").write_text('{"round": 1}\n')
    with pytest.raises(ResultsDirError, match="no checkpoint in .* verifies .none there"):
        prepare_out_dir(cfg, gone, resume=True)
    with pytest.raises(ResultsDirError, match="no checkpoint in .* verifies .none there"):
        workflow(cfg, gone, "r", None).start_state(resume=True)


def test_a_finished_run_killed_before_its_report_gets_it_on_resume(tmp_path, monkeypatch):
    """Killed after summary.json, before report.html (simulations.report.write_report), a
    run had no report for good: --resume said 'already completed all 3 rounds: nothing to
    run' and wrote none. A finished run's resume now writes a report that is missing or
    older than the summary, and leaves a current one alone."""
    from consortia.simulations import report, runner

    cfg = load_config(SMOKE, ["rounds=1", "privacy.enabled=false"])
    out = tmp_path / "run"
    prepare_out_dir(cfg, out, resume=False)
    checkpoints = CheckpointStore(out / "checkpoints")
    for r in range(2):
        checkpoints.save(r, {"w": np.zeros(2, np.float32)}, {})
    (out / "summary.json").write_text(json.dumps({"rounds": 1, "rounds_completed": 1}))
    written = []
    monkeypatch.setattr(report, "write_report", lambda run_dir: written.append(run_dir))
    monkeypatch.setattr(runner, "start_checks", lambda cfg: None)
    assert runner.run_simulation(cfg, out, resume=True)["rounds_completed"] == 1
    assert written == [out]
    (out / "report.html").write_text("<html></html>")
    written.clear()
    runner.run_simulation(cfg, out, resume=True)
    assert written == []


def test_a_resumed_deployment_says_the_round_it_runs_again(tmp_path):
    """server start --resume said no round up to the latest checkpoint again; a round
    checkpointed but not recorded (the server killed between the two) runs again, and its
    line ('round 2: ...') was not said when it was recorded this time."""
    from consortia.server.deploy import rounds_said_before

    assert rounds_said_before(tmp_path) == 0
    checkpoints = CheckpointStore(tmp_path / "checkpoints")
    for r in range(3):
        checkpoints.save(r, {"w": np.zeros(2, np.float32)}, {})
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n')
    assert rounds_said_before(tmp_path) == 1
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n')
    assert rounds_said_before(tmp_path) == 2


def test_a_participation_file_with_an_unreadable_line_is_rebuilt_from_the_store(tmp_path):
    """read_jsonl ends a file at its first unreadable line (a crash cuts only the last);
    one in the middle of participation.jsonl made a resume keep the rows before it and
    then replace the store's copy, whole, with them: the digits smoke run stopped before
    round 3, its participation.jsonl's 2nd line damaged, --resume -> participation.jsonl
    and the store 5 rows of 12 (1 of round 1, none of round 2), summary.json
    rounds_participated [] for clients 0-2. The store's rows are taken instead."""
    store = RunStore(tmp_path / "store.db")
    store.start_run("run1", task="digits-mlp", rounds_total=3, config={})
    recorder = RunRecorder(tmp_path, store, "run1")
    recorder.restore(0)
    for r in (1, 2):
        recorder.record_round(r, {"accuracy": 0.5}, [ReplyOutcome(n, "trained", "")
                                                     for n in (1, 2)], 1.0, f"{r:064x}")
    kept = read_jsonl(tmp_path / "participation.jsonl")
    lines = (tmp_path / "participation.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"
    (tmp_path / "participation.jsonl").write_text("".join(lines))
    RunRecorder(tmp_path, store, "run1").restore(2)
    assert read_jsonl(tmp_path / "participation.jsonl") == kept
    assert store.participation_rows("run1") == kept
    store.close()


@pytest.mark.parametrize("rule", [["strategy.name=fedavgm", "strategy.server_momentum=0.9"],
                                  ["strategy.name=fedadam"]])
def test_a_resumed_server_optimizer_goes_on_as_the_run_would(tmp_path, rule, task_identity):
    """FedAvgM's momentum and FedAdam's moments lived only in the strategy object: a resume
    began them again from zero, and the run went another way (sim run digits-dp-smoke
    --set rounds=4 --set privacy.enabled=false --set strategy.name=fedavgm --set
    strategy.server_momentum=0.9, SIGKILLed after round 2's metrics row, then --resume:
    accuracy 0.8551, 0.8830 in rounds 3 and 4; uninterrupted 0.8329, 0.8747). The
    checkpoint keeps them (round-N.state.safetensors, named with its hash)."""
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy.fedopt import FedOpt

    from consortia.server.aggregates import aggregate_reply, match_dtypes
    from consortia.server.workflow import arrays_to_numpy
    from consortia.strategies import build_strategy, load_optimizer_state, optimizer_state

    cfg = load_config(SMOKE, ["privacy.enabled=false", *rule])
    rng = np.random.default_rng(0)
    start = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)),
                         "b": Array(np.ones(3, np.float32))})
    updates = [{k: rng.normal(size=a.numpy().shape) for k, a in start.items()} for _ in range(3)]

    def aggregate(strategy, arrays, server_round):
        if isinstance(strategy, FedOpt):  # what configure_train does
            strategy.current_arrays = {k: a.numpy() for k, a in arrays.items()}
        elif strategy.current_arrays is None:
            strategy.current_arrays = arrays
        reply = aggregate_reply(arrays, updates[server_round - 1], 10)
        return match_dtypes(strategy.aggregate_train(server_round, [reply])[0], arrays)

    def weights(arrays):
        return arrays_to_numpy(arrays)

    run = build_strategy(cfg)
    uninterrupted = start
    for r in (1, 2, 3):
        uninterrupted = aggregate(run, uninterrupted, r)

    first = build_strategy(cfg)
    arrays = start
    checkpoints = CheckpointStore(tmp_path)
    for r in (1, 2):
        arrays = aggregate(first, arrays, r)
        checkpoints.save(r, weights(arrays), {}, None, optimizer_state(first))
    latest = CheckpointStore(tmp_path).latest()
    resumed = build_strategy(cfg)
    load_optimizer_state(resumed, latest.load_state_arrays(), list(start))
    saved = latest.load_weights()
    arrays = ArrayRecord({k: Array(saved[k]) for k in start})
    after = weights(aggregate(resumed, arrays, 3))
    assert all(np.array_equal(after[k], v) for k, v in weights(uninterrupted).items())

    # A checkpoint whose optimizer state does not verify is passed over, as its weights'.
    (tmp_path / "round-00002.state.safetensors").write_bytes(b"cut")
    reader = CheckpointStore(tmp_path)
    assert reader.latest().round == 1
    assert reader.problems == ["round 2: state round-00002.state.safetensors does not match "
                               "its hash"]


def test_a_broken_checkpoint_chain_is_refused_on_resume_naming_the_link(tmp_path):
    """A manifest whose parent hash is not the previous round's checkpoint (edited, or from
    another run) resumed silently (crash audit): the chain the manifests record was never
    read back."""
    cfg = load_config(SMOKE, ["rounds=3", "privacy.enabled=false"])
    out = tmp_path / "run"
    run_id = prepare_out_dir(cfg, out, resume=False)
    first = workflow(cfg, out, run_id, None)
    _, arrays = first.start_state(resume=False)
    for r in (1, 2):
        ckpt = checkpoint_round(first, r, arrays)
        first.recorder.record_round(r, {"accuracy": 0.5}, [ReplyOutcome(1, "trained", "")], 1.0,
                                    ckpt.sha256)
    store = CheckpointStore(out / "checkpoints")
    assert store.chain_break(store.latest()) is None
    assert workflow(cfg, out, run_id, None).start_state(resume=True)[0] == 2

    manifest_path = out / "checkpoints" / "round-00002.json"
    manifest = json.loads(manifest_path.read_text())
    one = manifest["parent_sha256"]
    manifest["parent_sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ResultsDirError, match=rf"do not form one chain \(round-00002.json names "
                                              rf"parent 0000000000000000\.\.\., but round 1's "
                                              rf"checkpoint is {one[:16]}\.\.\.\).*restore "
                                              r"checkpoints/ from a copy"):
        workflow(cfg, out, run_id, None).start_state(resume=True)
    # A round whose manifest is gone leaves its link unchecked: nothing contradicts it.
    manifest["parent_sha256"] = one
    manifest_path.write_text(json.dumps(manifest))
    (out / "checkpoints" / "round-00001.json").unlink()
    assert store.chain_break(store.latest()) is None
    round_zero = out / "checkpoints" / "round-00000.json"
    zero = json.loads(round_zero.read_text())
    round_zero.write_text(json.dumps({**zero, "parent_sha256": one}))
    assert "round 0 is the initial model" in store.chain_break(store.latest())
