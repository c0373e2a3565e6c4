import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from consortia.cli import app
from consortia.tasks.fashion_mnist import DatasetMissingError, resolve_dir

runner = CliRunner()


def test_config_command_prints_the_resolved_config():
    result = runner.invoke(app, ["sim", "config", "simulations/experiments/digits-dp-smoke.toml",
                                 "--set", "rounds=9", "--set", "privacy.delta=1e-6"])
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.stdout)
    assert resolved["rounds"] == 9 and resolved["privacy"]["delta"] == 1e-6
    assert resolved["strategy"]["name"] == "fedavg"


def test_bad_config_exits_2_naming_the_key():
    result = runner.invoke(app, ["sim", "run", "simulations/experiments/digits-dp-smoke.toml",
                                 "--out", "/tmp/never", "--set", "clients_per_round=99"])
    assert result.exit_code == 2
    assert "clients_per_round (99) must be at most clients (4)" in result.output


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    try:
        resolve_dir(str(tmp_path))
    except DatasetMissingError as err:
        assert "apt-get install dataset-fashion-mnist" in str(err)
        assert "data_dir" in str(err) and str(tmp_path) in str(err)
    else:
        raise AssertionError("an empty folder must not pass for Fashion-MNIST")


def test_bench_dp_names_an_unknown_task_and_the_accepted_ones():
    result = runner.invoke(app, ["bench", "dp", "--task", "no-such-task"])
    assert result.exit_code == 2
    assert "unknown task 'no-such-task'" in result.output and "digits-mlp" in result.output


def test_an_error_is_printed_as_it_is_brackets_included():
    # rich would read "[lora]" as markup and print 'mytask': the value the user typed must
    # come back as typed.
    result = runner.invoke(app, ["sim", "config", "simulations/experiments/digits-dp-smoke.toml",
                                 "--set", "task=my[lora]task"])
    assert result.exit_code == 2
    assert "unknown task 'my[lora]task'" in result.output


def test_a_rooms_report_is_printed_as_it_is(capsys):
    from consortia.terminal import say

    say("the SuperNode exited (1); starting it again: [code: 2004] Failed to activate SuperNode.")
    assert "[code: 2004] Failed to activate SuperNode." in capsys.readouterr().err


def test_an_interrupted_run_is_told_the_command_that_continues_it(tmp_path):
    """The same config and --set values (a resume with other values is refused), quoted."""
    import shlex

    from consortia.cli import resume_command

    sets = ["rounds=3", "task=digits-mlp", "run_name=a b"]
    command = resume_command(Path("exp.toml"), tmp_path / "out", sets)
    argv = shlex.split(command)
    assert argv[:6] == ["consortia", "sim", "run", "exp.toml", "--out", str(tmp_path / "out")]
    assert argv[-1] == "--resume"
    given = argv[6:-1]
    assert given[0::2] == ["--set"] * 3 and given[1::2] == sets  # "a b" survives the shell


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("10.0.0.5", False), ("fl.example.org", False)])
def test_the_console_warns_only_for_an_address_other_machines_can_reach(host, loopback):
    from consortia.cli import is_loopback

    assert is_loopback(host) is loopback


@pytest.mark.parametrize("setting, message", [
    ("privacy.delta=0.5", "delta = 0.5 is not below 1/n for client 0's 360 records"),
    ("privacy.noise_multiplier=0.2", "one round costs client 0 ε = 94"),
    ("privacy.noise_multiplier=0", "privacy.noise_multiplier = 0 adds no noise"),
    ("privacy.epsilon_budget=0.0001", "privacy.epsilon_budget = 0.0001 cannot be met by client 0"),
])
def test_privacy_terms_that_protect_nothing_fail_before_the_run_starts(tmp_path, setting, message):
    out = tmp_path / "run"
    result = runner.invoke(app, ["sim", "run", "simulations/experiments/digits-dp-smoke.toml",
                                 "--out", str(out), "--set", "rounds=1", "--set", setting])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and not out.exists()


def test_a_fixed_sigma_that_carries_a_client_only_part_of_the_way_is_warned_of(caplog):
    from opacus.accountants import RDPAccountant

    from consortia.config import load_config
    from consortia.simulations.runner import start_checks

    smoke = "simulations/experiments/digits-dp-smoke.toml"
    start_checks(load_config(smoke, ["clients=6", "clients_per_round=6", "rounds=7",
                                     "partition.kind=dirichlet", "partition.alpha=0.5",
                                     "privacy.noise_multiplier=1.6"]))
    said = " ".join(caplog.text.split())
    # The smallest client (3 steps a round at rate 1/3) fits 1 round of its 7 at σ = 1.6,
    # as Opacus's own accountant counts it: 1 round within ε = 3, 2 rounds beyond.
    assert "fits privacy.epsilon_budget = 3 for only 1 of client " in said, said
    assert "7 planned rounds (3 steps at rate 0.333 each): from its round 2 on it refuses" in said
    for rounds, within in ((1, True), (2, False)):
        accountant = RDPAccountant()
        accountant.history = [(1.6, 1 / 3, 3 * rounds)]
        assert (accountant.get_epsilon(1e-5) <= 3.0) is within
    caplog.clear()
    start_checks(load_config(smoke, ["privacy.noise_multiplier=5"]))  # 3 rounds fit: quiet
    assert "planned rounds" not in caplog.text


def test_settings_other_settings_make_inert_are_said_at_start(caplog):
    """partition.alpha with partition.kind = 'iid', or an attack kind with no attacker, ran
    silently as if they counted (researcher audit); they are said at start, not refused (a
    sweep may vary what makes them count)."""
    from consortia.config import load_config
    from consortia.simulations.runner import start_checks

    smoke = "simulations/experiments/digits-dp-smoke.toml"
    start_checks(load_config(smoke, ["partition.alpha=0.1", "faults.byzantine_kind=gaussian"]))
    said = " ".join(caplog.text.split())
    assert ("set but changing nothing in this run: partition.alpha = 0.1 (only partition.kind "
            "= 'dirichlet' uses it; here 'iid'); faults.byzantine_kind = 'gaussian' (no client "
            "attacks: faults.byzantine_fraction = 0)") in said, said
    caplog.clear()
    start_checks(load_config(smoke, ["partition.kind=dirichlet", "partition.alpha=0.1",
                                     "faults.byzantine_fraction=0.25",
                                     "faults.byzantine_kind=gaussian"]))
    assert "changing nothing" not in caplog.text


def test_a_model_opacus_cannot_make_private_fails_before_the_run_starts(tmp_path):
    import dataclasses

    import torch

    from consortia.tasks import TASKS, get_task, register_task

    digits = get_task("digits-mlp")
    register_task(dataclasses.replace(digits, name="bn-digits", build_model=(
        lambda activation="tanh": torch.nn.Sequential(
            torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 10)))))
    try:
        out = tmp_path / "run"
        result = runner.invoke(app, ["sim", "run", "simulations/experiments/digits-dp-smoke.toml",
                                     "--out", str(out), "--set", "task=bn-digits"])
    finally:
        del TASKS["bn-digits"]
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "task 'bn-digits''s model cannot be trained with DP" in flat and "BatchNorm" in flat
    assert not out.exists()


def test_a_usage_error_is_labelled_error_like_every_other_error():
    # Typer frames a missing option in its own panel; it says "error" as fail() does.
    result = runner.invoke(app, ["sim", "run", "simulations/experiments/digits-dp-smoke.toml"],
                           terminal_width=80)
    assert result.exit_code == 2
    assert "─ error ─" in result.output and "Missing option '--out'" in result.output
    assert "Error" not in result.output
    result = runner.invoke(app, ["sim", "run", "missing.toml", "--out", "/tmp/never"])
    assert result.output.startswith("error: config file not found: missing.toml")


def test_a_resume_with_another_config_suggests_only_what_exists(tmp_path):
    from consortia.config import load_config
    from consortia.server.run_dir import ResultsDirError, prepare_out_dir

    smoke = "simulations/experiments/digits-dp-smoke.toml"
    prepare_out_dir(load_config(smoke), tmp_path, resume=False)
    with pytest.raises(ResultsDirError) as err:
        prepare_out_dir(load_config(smoke, ["rounds=5"]), tmp_path, resume=True)
    message = str(err.value)
    assert "in: rounds (3 stored, 5 now)" in message
    assert f'resume it with the config it was started with (the "config" in {tmp_path}' in message
    # No option starts a run from another run's weights, so the message must not offer it.
    assert "weights" not in message and "a new model, in another results directory" in message


def test_an_interrupted_sweep_exits_saying_how_to_continue_and_records_its_cell_stopped(
        tmp_path, monkeypatch):
    """SIGTERM or Ctrl-C in `sim sweep` left Flower's threads waiting on Ray actors that
    were gone: tracebacks, a process that never ended, and a run left 'running'."""
    import shlex

    import consortia.simulations.sweep as sweep
    from consortia.config import config_to_dict, load_config

    smoke = "simulations/experiments/digits-dp-smoke.toml"
    recorded = []

    def interrupted(config, grid, out, overrides, on_cell):
        on_cell(0, 2, "seed=0", True)
        on_cell(1, 2, "seed=1", False)
        cell = out / "seed=1"
        cell.mkdir(parents=True)
        cfg = load_config(smoke, ["seed=1", "rounds=2"])
        (cell / "run.json").write_text(json.dumps({"run_id": "r1", "config": config_to_dict(cfg)}))
        raise KeyboardInterrupt

    class Exited(Exception):
        pass

    def exit_(code):
        raise Exited(code)

    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    monkeypatch.setattr("consortia.cli.record_stopped",
                        lambda cfg, out, resume_with: recorded.append((cfg.seed, out, resume_with)))
    monkeypatch.setattr("consortia.cli.os._exit", exit_)
    result = runner.invoke(app, ["sim", "sweep", smoke, "--out", str(tmp_path), "--grid",
                                 "seed=0,1", "--set", "rounds=2"])
    assert isinstance(result.exception, Exited) and result.exception.args == (130,)
    said = " ".join(result.output.split())
    again = said.split("continue with: ")[1]
    assert shlex.split(again) == ["consortia", "sim", "sweep", smoke, "--out", str(tmp_path),
                                  "--grid", "seed=0,1", "--set", "rounds=2"]
    assert [(seed, out) for seed, out, _ in recorded] == [(1, tmp_path / "seed=1")]
    assert recorded[0][2] == again


def test_a_run_stopped_between_evaluations_is_not_said_to_have_completed_no_round(
        tmp_path, monkeypatch):
    """eval_every = 4, stopped after round 2 of 6 (runs stop): summary.json has no final
    accuracy, and sim run said 'no round completed' of a run with 2 rounds done."""
    import consortia.simulations.runner as sim_runner

    monkeypatch.setattr(sim_runner, "run_simulation", lambda cfg, out, **kwargs: {
        "final_accuracy": None, "rounds": 6, "rounds_completed": 2})
    result = runner.invoke(app, ["sim", "run", "simulations/experiments/digits-dp-smoke.toml",
                                 "--out", str(tmp_path), "--set", "rounds=6",
                                 "--set", "eval_every=4"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "no round completed" not in said
    assert ("final accuracy not measured: the run ended after round 2 of 6, before its next "
            "evaluation (eval_every = 4)") in said


@pytest.mark.parametrize("done", [3, 6])
def test_a_run_stopped_by_a_stop_request_says_so_and_how_to_continue(tmp_path, monkeypatch,
                                                                       done):
    """quickstart.md: `consortia runs stop` (or the console's button) stops a run after its
    round, and `--resume` continues it. sim run's own terminal said only 'final accuracy'
    of a run stopped at round 3 of 6, as of a finished one; Ctrl-C printed the command."""
    import consortia.simulations.runner as sim_runner

    monkeypatch.setattr(sim_runner, "run_simulation", lambda cfg, out, **kwargs: {
        "final_accuracy": 0.5, "rounds": 6, "rounds_completed": done})
    result = runner.invoke(app, ["sim", "run", "simulations/experiments/digits-dp-smoke.toml",
                                 "--out", str(tmp_path), "--set", "rounds=6"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    resume = (f"consortia sim run simulations/experiments/digits-dp-smoke.toml --out {tmp_path} "
              "--set rounds=6 --resume")
    if done < 6:
        assert f"stopped after round 3 of 6 (a stop request); continue with: {resume}" in said
    else:
        assert "stopped after" not in said
