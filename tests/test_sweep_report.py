import csv
import re
from pathlib import Path

import pytest

from consortia.config import ConfigError
from consortia.simulations.report import write_comparison
from consortia.simulations.sweep import cells, parse_grid, run_sweep

SMOKE = Path(__file__).resolve().parents[1] / "simulations" / "experiments" / "digits-dp-smoke.toml"


def test_grid_parsing_and_cells():
    grid = parse_grid(["lr=0.1,0.2", "partition.kind=iid,dirichlet"])
    assert cells(grid) == [
        {"lr": "0.1", "partition.kind": "iid"}, {"lr": "0.1", "partition.kind": "dirichlet"},
        {"lr": "0.2", "partition.kind": "iid"}, {"lr": "0.2", "partition.kind": "dirichlet"}]
    with pytest.raises(ConfigError, match="key=v1,v2"):
        parse_grid(["lr"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["lr=1", "lr=2"])


@pytest.mark.parametrize("grid, sets, named", [
    # The same cell twice: it ran once and sweep.csv had two rows of it.
    (["seed=0,1,0"], [], r"--grid seed=0,1,0: 0 given twice"),
    # ... however written: two folders, one value, the same run twice.
    (["lr=0.1,1e-1"], [], r"--grid lr=0.1,1e-1: 1e-1 given twice \(as 0.1\)"),
    # The --set was replaced in every cell, silently.
    (["lr=0.1,0.2"], ["lr=0.5"], r"--set lr=0.5 and --grid lr: .*changes nothing"),
    # Two values whose folders have one name: one run, reported as both.
    (["data_dir=a b,a-b"], [], r"sweep cells data_dir=a b and data_dir=a-b would share the "
                               r"folder 'data_dir=a-b'"),
])
def test_a_grid_whose_cells_repeat_or_override_a_set_is_refused(tmp_path, monkeypatch, grid,
                                                                 sets, named):
    import consortia.simulations.runner as runner

    monkeypatch.setattr(runner, "run_simulation", lambda *a, **k: pytest.fail("ran a cell"))
    monkeypatch.setattr(runner, "start_checks", lambda cfg: None)
    with pytest.raises(ConfigError, match=named):
        run_sweep(SMOKE, grid, tmp_path, ["rounds=1", *sets])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("grid, named", [
    (["clients_per_round=2,9"], r"sweep cell clients_per_round=9: .*clients_per_round \(9\)"),
    # sim run's start checks, not only the schema: a σ too small for one round under the
    # budget, a δ at or above 1/n for a client's n records.
    (["privacy.noise_multiplier=2.0,0.5"], r"sweep cell privacy.noise_multiplier=0.5: "
                                           r"privacy.noise_multiplier = 0.5: .*accepted: σ ≥"),
    (["privacy.delta=1e-5,0.01"], r"sweep cell privacy.delta=0.01: delta = 0.01 is not below 1/n .*accepted"),
])
def test_a_bad_cell_fails_before_any_cell_runs(tmp_path, monkeypatch, grid, named):
    import consortia.simulations.runner as runner

    monkeypatch.setattr(runner, "run_simulation", lambda *a, **k: pytest.fail("ran a cell"))
    with pytest.raises(ConfigError, match="(?s)" + named) as err:
        run_sweep(SMOKE, grid, tmp_path, ["rounds=1"])
    assert "no cell has run" in str(err.value)
    assert not any(tmp_path.iterdir())


def test_the_sweep_command_names_a_cell_that_cannot_start_or_fails_without_a_traceback(
        tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import consortia.simulations.runner as runner
    from consortia.cli import app

    def sweep():
        return CliRunner().invoke(app, ["sim", "sweep", str(SMOKE), "--out", str(tmp_path),
                                        "--set", "rounds=1", "--grid", "privacy.delta=1e-5,0.01"])

    result = sweep()
    assert result.exit_code == 2 and result.exception is not None
    assert "error: sweep cell privacy.delta=0.01:" in result.output
    assert "Traceback" not in result.output

    def fails(cfg, out_dir, **kwargs):
        raise runner.SimulationFailed(f"the simulation ended without writing {out_dir}")

    monkeypatch.setattr(runner, "run_simulation", fails)
    monkeypatch.setattr(runner, "start_checks", lambda cfg: None)
    result = sweep()
    assert result.exit_code == 2
    assert "error: sweep cell privacy.delta=1e-5: the simulation ended" in result.output
    assert "run the same command" in result.output


def test_a_cell_that_fails_leaves_sweep_csv_with_the_cells_before_it_and_how_far_it_got(
        tmp_path, monkeypatch):
    # sweep.csv was written only after the last cell: a failure at cell 3 of 3 left none,
    # the finished cells' results only in their folders.
    import json

    import consortia.simulations.runner as runner

    def run(cfg, out_dir, **kwargs):
        out_dir.mkdir(parents=True)
        (out_dir / "metrics.jsonl").write_text(json.dumps({"round": 1, "accuracy": 0.5}) + "\n")
        if cfg.lr == 0.3:
            raise runner.SimulationFailed(f"the simulation ended without writing {out_dir}")
        summary = {"rounds": 2, "rounds_completed": 2, "final_accuracy": cfg.lr,
                   "clients": [{"id": "0", "epsilon": 1.5}], "wall_s": 3.0}
        (out_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(runner, "run_simulation", run)
    monkeypatch.setattr(runner, "start_checks", lambda cfg: None)
    with pytest.raises(ConfigError, match="sweep cell lr=0.3: the simulation ended"):
        run_sweep(SMOKE, ["lr=0.1,0.2,0.3"], tmp_path, ["rounds=2"])
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [(r["cell"], r["final_accuracy"], r["epsilon_max"], r["rounds_completed"],
             r["rounds_total"]) for r in rows] == [
        ("lr=0.1", "0.1", "1.5", "2", "2"), ("lr=0.2", "0.2", "1.5", "2", "2"),
        ("lr=0.3", "", "", "1", "2")]


def test_a_cell_whose_folder_name_would_pass_the_file_systems_limit_gets_a_shorter_one(
        tmp_path, monkeypatch):
    # Many --grid keys, or a long value, made a folder name over 255 bytes: the sweep
    # stopped at start with OSError 'File name too long' and a traceback.
    import json

    import consortia.simulations.runner as runner
    from consortia.simulations.sweep import cell_name

    def run(cfg, out_dir, **kwargs):
        out_dir.mkdir(parents=True)
        summary = {"rounds": 1, "rounds_completed": 1, "final_accuracy": 0.5, "clients": []}
        (out_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(runner, "run_simulation", run)
    monkeypatch.setattr(runner, "start_checks", lambda cfg: None)
    long_a, long_b = "/data/" + "a" * 300, "/data/" + "a" * 299 + "b"
    path = run_sweep(SMOKE, [f"data_dir={long_a},{long_b}"], tmp_path, ["rounds=1"])
    rows = list(csv.DictReader(path.open()))
    assert [r["data_dir"] for r in rows] == [long_a, long_b]
    names = [r["cell"] for r in rows]
    assert len(set(names)) == 2 and all(len(n.encode()) <= 255 for n in names)
    assert all((tmp_path / n).is_dir() for n in names)
    assert cell_name({"lr": "0.1"}) == "lr=0.1"  # short names as they were


@pytest.mark.slow
def test_sweep_runs_each_cell_once_writes_csv_reports_and_compares(tmp_path, monkeypatch):
    seen = []
    path = run_sweep(SMOKE, ["lr=0.05,0.3"], tmp_path, ["rounds=2", "privacy.enabled=false"],
                     on_cell=lambda i, n, name, done: seen.append(done))
    assert seen == [False, False]
    rows = list(csv.DictReader(path.open()))
    assert [r["lr"] for r in rows] == ["0.05", "0.3"]
    assert all(0 < float(r["final_accuracy"]) <= 1 and float(r["duration_s"]) > 0 for r in rows)
    assert rows[0]["epsilon_max"] == ""  # no DP in these cells
    assert all(r["rounds_completed"] == r["rounds_total"] == "2" for r in rows)

    # Each run wrote a self-contained report with its plots and its client table.
    for cell in ("lr=0.05", "lr=0.3"):
        report = (tmp_path / cell / "report.html").read_text()
        assert report.count("data:image/png;base64,") >= 2
        assert "src='http" not in report and "<script" not in report  # opens offline
        assert len(re.findall(r"<tr><td>\d+</td>", report)) >= 4  # 4 clients (and 2 rounds)

    # A second sweep finds every cell done and runs nothing.
    import consortia.simulations.runner as runner

    monkeypatch.setattr(runner, "run_simulation", lambda *a, **k: pytest.fail("re-ran a cell"))
    seen.clear()
    run_sweep(SMOKE, ["lr=0.05,0.3"], tmp_path, ["rounds=2", "privacy.enabled=false"],
              on_cell=lambda i, n, name, done: seen.append(done))
    assert seen == [True, True]

    page = write_comparison([tmp_path / "lr=0.05", tmp_path / "lr=0.3"], tmp_path / "cmp.html")
    html = page.read_text()
    assert "lr=0.05" in html and "lr=0.3" in html and "data:image/png;base64," in html
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        write_comparison([tmp_path], tmp_path / "x.html")

    # As docs/simulations.md runs it: `sim compare results/sweep/*`, which names sweep.csv too.
    from typer.testing import CliRunner

    from consortia.cli import app

    everything = [str(p) for p in sorted(tmp_path.iterdir()) if p.suffix != ".html"]
    assert str(path) in everything
    result = CliRunner().invoke(app, ["sim", "compare", *everything, "--out",
                                      str(tmp_path / "all.html")])
    assert result.exit_code == 0, result.output
    assert "left out" in result.output and "sweep.csv" in result.output
    assert "lr=0.3" in (tmp_path / "all.html").read_text()


def test_a_sweep_into_cells_of_another_config_is_refused_before_any_cell_runs(
        tmp_path, monkeypatch):
    """A finished cell was skipped whatever the config (its old results went into
    sweep.csv as the new sweep's); a cell cut short was refused only at its turn."""
    import json

    import consortia.simulations.runner as runner
    import consortia.simulations.sweep as sweep
    from consortia.config import config_to_dict, load_config

    monkeypatch.setattr(runner, "run_simulation", lambda *a, **k: pytest.fail("ran a cell"))
    monkeypatch.setattr(runner, "start_checks", lambda cfg: None)
    monkeypatch.setattr(sweep, "finished", lambda cfg, cell: (cell / "summary.json").exists())
    for seed, finished in ((0, True), (1, False)):
        cell = tmp_path / f"seed={seed}"
        cell.mkdir()
        cfg = load_config(SMOKE, ["rounds=1", f"seed={seed}"])
        (cell / "run.json").write_text(json.dumps({"run_id": f"r{seed}",
                                                   "config": config_to_dict(cfg)}))
        if finished:
            (cell / "summary.json").write_text(json.dumps({"final_accuracy": 0.5,
                                                           "clients": []}))
    with pytest.raises(ConfigError, match=r"sweep cell seed=0: .*differs in: "
                                          r"privacy.epsilon_budget \(3.0 stored, 8.0 now\), "
                                          r"rounds \(1 stored, 2 now\)") as err:
        run_sweep(SMOKE, ["seed=0,1"], tmp_path, ["rounds=2", "privacy.epsilon_budget=8"])
    assert "no cell has run" in str(err.value)
    # The cell cut short is refused before the first cell runs too.
    with pytest.raises(ConfigError, match=r"sweep cell seed=1: .*rounds \(1 stored, 2 now\)"):
        run_sweep(SMOKE, ["seed=1"], tmp_path, ["rounds=2"])
    # The config the cells were started with: the finished one is skipped, as before.
    seen = []

    def runs(cfg, out, **kwargs):
        return {"final_accuracy": 0.6, "clients": []}

    monkeypatch.setattr(runner, "run_simulation", runs)
    run_sweep(SMOKE, ["seed=0,1"], tmp_path, ["rounds=1"],
              on_cell=lambda i, n, name, done: seen.append(done))
    assert seen == [True, False]


def test_the_report_plots_user_level_epsilon_when_the_clients_run_without_dp(tmp_path):
    """user_dp.enabled with privacy.enabled = false: no client reports an ε, and the
    report's ε plot (the only one with the model's user-level ε) was left out."""
    import json

    from consortia.simulations.report import run_figures, write_report

    rows = [{"round": r, "accuracy": 0.5, "loss": 1.0, "user_epsilon": 1.5 * r,
             "clients_trained": 2, "clients_sampled": 2, "epsilon_max": None} for r in (1, 2)]
    part = [{"round": r, "client_id": str(c), "status": "trained", "dp_enabled": False,
             "epsilon": None} for r in (1, 2) for c in (0, 1)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "participation.jsonl").write_text("".join(json.dumps(p) + "\n" for p in part))
    (tmp_path / "summary.json").write_text(json.dumps({"run_id": "r", "user_epsilon": 3.0}))
    assert "epsilon" in run_figures(rows, part)
    assert "alt='epsilon'" in write_report(tmp_path).read_text()
    # Rows without it (a round with nothing released) leave a gap, not an error.
    rows[0].pop("user_epsilon")
    assert "epsilon" in run_figures(rows, part)


def test_a_cell_stopped_before_its_last_round_is_resumed_not_reported_as_done(
        tmp_path, monkeypatch):
    """`runs stop` (or the console) on a sweep's cell writes its summary after round 2 of
    6: the sweep skipped it as done, and sweep.csv gave its partial result as the cell's."""
    import json

    import numpy as np

    import consortia.simulations.runner as runner
    from consortia.config import config_to_dict, load_config
    from consortia.server.checkpoint import CheckpointStore

    cell = tmp_path / "seed=0"
    cfg = load_config(SMOKE, ["rounds=3", "seed=0"])
    (cell / "checkpoints").mkdir(parents=True)
    (cell / "run.json").write_text(json.dumps({"run_id": "r0", "config": config_to_dict(cfg)}))
    store = CheckpointStore(cell / "checkpoints")
    for r in range(3):
        store.save(r, {"w": np.zeros(2, dtype=np.float32)}, {"accuracy": 0.1 * r}, {})
    (cell / "summary.json").write_text(json.dumps({"final_accuracy": 0.2, "rounds": 3,
                                                   "rounds_completed": 2, "clients": []}))
    resumed = []

    def runs(cfg, out, resume, **kwargs):
        resumed.append((out.name, resume))
        return {"final_accuracy": 0.3, "clients": []}

    monkeypatch.setattr(runner, "run_simulation", runs)
    monkeypatch.setattr(runner, "start_checks", lambda cfg: None)
    seen = []
    path = run_sweep(SMOKE, ["seed=0"], tmp_path, ["rounds=3"],
                     on_cell=lambda i, n, name, done: seen.append(done))
    assert seen == [False] and resumed == [("seed=0", True)]
    assert next(csv.DictReader(path.open()))["final_accuracy"] == "0.3"
    # Its last round checkpointed and its summary written after it: done, skipped.
    store.save(3, {"w": np.zeros(2, dtype=np.float32)}, {"accuracy": 0.3}, {})
    (cell / "summary.json").write_text(json.dumps({"final_accuracy": 0.3, "rounds": 3,
                                                   "rounds_completed": 3, "clients": []}))
    monkeypatch.setattr(runner, "run_simulation", lambda *a, **k: pytest.fail("re-ran a cell"))
    seen.clear()
    run_sweep(SMOKE, ["seed=0"], tmp_path, ["rounds=3"],
              on_cell=lambda i, n, name, done: seen.append(done))
    assert seen == [True]


def test_a_sweep_row_says_how_far_a_stopped_cell_got():
    """A cell stopped during the sweep (runs stop) gave its partial accuracy in sweep.csv
    like a finished cell's; the row now has the rounds completed of the rounds planned."""
    from consortia.simulations.sweep import sweep_row

    row = sweep_row({"seed": "0"}, {"final_accuracy": 0.52, "rounds": 6, "rounds_completed": 2,
                                    "clients": [{"epsilon": 1.9}, {"epsilon": 1.2}]})
    assert row == {"seed": "0", "final_accuracy": 0.52, "epsilon_max": 1.9,
                   "user_epsilon": None, "duration_s": None, "rounds_completed": 2,
                   "rounds_total": 6}


def test_a_report_says_which_rows_a_damaged_line_hides(tmp_path):
    """read_jsonl ends a file at its first line that does not parse: a 5-round run whose
    metrics.jsonl had line 2 damaged got a report of '1 of 5' rounds, without a word of
    why (`consortia sim report`, the report of a finished run's resume), and `sim compare`
    a row of 1 round for it. The pages, `sim report` and `sim compare` now name the file
    and the line."""
    import json

    from typer.testing import CliRunner

    from consortia.cli import app as cli

    rows = [{"round": r, "accuracy": 0.5, "loss": 1.0, "clients_trained": 1,
             "clients_sampled": 1} for r in range(1, 6)]
    lines = [json.dumps(r) + "\n" for r in rows]
    lines[1] = lines[1][:20] + "\n"
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    (tmp_path / "participation.jsonl").write_text("".join(
        json.dumps({"round": r, "client_id": "0", "status": "trained"}) + "\n" for r in range(1, 6)))
    (tmp_path / "summary.json").write_text(json.dumps({"run_id": "r", "rounds": 5}))
    result = CliRunner().invoke(cli, ["sim", "report", str(tmp_path)])
    flat = " ".join(result.output.split())
    said = (f"{tmp_path / 'metrics.jsonl'}: line 2 of 5 cannot be read, so this report shows "
            "only the 1 row(s) before it")
    assert result.exit_code == 0 and f"warning: {said}" in flat
    assert said in (tmp_path / "report.html").read_text()
    compared = CliRunner().invoke(cli, ["sim", "compare", str(tmp_path), "--out",
                                        str(tmp_path / "cmp.html")])
    assert compared.exit_code == 0 and f"warning: {said}" in " ".join(compared.output.split())
    assert said in (tmp_path / "cmp.html").read_text()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(cli, ["sim", "report", str(tmp_path)])
    assert "warning" not in result.output
    assert "class='warn'" not in (tmp_path / "report.html").read_text()


def test_an_abandoned_secure_round_is_drawn_as_all_its_participants(tmp_path, monkeypatch):
    """The secure-aggregation plot drew an abandoned round as a bar of its dropped clients
    (4 and 3 for the 5-participant rounds 2 and 4 of a digits run at faults.dropout 0.6),
    beside completed rounds' bars of all 5: every participant's update is lost."""
    from matplotlib.axes import Axes

    from consortia.simulations.report import run_figures

    drawn = []
    bar = Axes.bar
    monkeypatch.setattr(Axes, "bar", lambda self, x, height, *a, **kw: (
        drawn.append((kw.get("label"), list(x), list(height))), bar(self, x, height, *a, **kw))[1])
    rows = [{"round": 1, "secagg_status": "ok", "secagg_participants": 5, "secagg_dropped": 2},
            {"round": 2, "secagg_status": "aborted", "secagg_participants": 5,
             "secagg_dropped": 4},
            {"round": 3, "secagg_status": "aborted", "secagg_dropped": 2}]  # an older row
    run_figures(rows, [{"round": 1, "client_id": "0", "status": "trained"}])
    assert ("round abandoned", [2, 3], [5, 2]) in drawn
    assert ("in the secure sum", [1], [3]) in drawn
