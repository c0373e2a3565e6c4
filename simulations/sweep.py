"""`consortia sim sweep`: every combination of a grid of config values, one run each.

Cells run one after another (each is a full federation on Flower's simulation engine);
a cell whose run completed all its rounds is skipped, so an interrupted (or stopped)
sweep resumes where it stopped. `sweep.csv` has one row per cell: the varied keys, final accuracy, largest
client ε, user-level ε (if any), wall time, and the rounds completed of the rounds planned.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consortia.config import ConfigError, RunConfig, load_config, parse_override

SWEEP_FILE = "sweep.csv"


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """`key=v1,v2` per spec; values stay text and are read as TOML by the config loader."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"--grid expects key=v1,v2,..., got {spec!r}")
        key, values = spec.split("=", 1)
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not items:
            raise ConfigError(f"--grid {key}: no values given")
        key = key.strip()
        if key in grid:
            raise ConfigError(f"--grid {key} given twice")
        # The same value twice, however written (0.1 and 1e-1 are one value, read as TOML
        # as --set reads it): the same run twice, or one run reported twice in sweep.csv.
        seen: dict[tuple, str] = {}
        for item in items:
            value = parse_override(f"v={item}")[1]
            same = (isinstance(value, bool), value if isinstance(value, (int, float, bool, str))
                    else repr(value))
            if same in seen:
                also = "" if seen[same] == item else f" (as {seen[same]})"
                raise ConfigError(f"--grid {key}={values}: {item} given twice{also}; accepted: "
                                  "each value once")
            seen[same] = item
        grid[key] = items
    return grid


def check_grid(grid: dict[str, list[str]], overrides: list[str]) -> None:
    """A --set of a key the grid varies would be replaced in every cell (set in vain), and
    two cells whose folders have one name would be one run reported twice."""
    for assignment in overrides:
        key = ".".join(parse_override(assignment)[0])
        if key in grid:
            raise ConfigError(f"--set {assignment} and --grid {key}: every cell takes its "
                              f"value of {key} from the grid, so the --set changes nothing; "
                              "remove one of them")
    folders: dict[str, dict[str, str]] = {}
    for assignments in cells(grid):
        name = cell_name(assignments)
        if name in folders:
            def said(a: dict[str, str]) -> str:
                return ", ".join(f"{k}={v}" for k, v in a.items())
            raise ConfigError(f"sweep cells {said(folders[name])} and {said(assignments)} "
                              f"would share the folder {name!r} (characters other than "
                              "letters, digits and _.=- become '-'); give values whose "
                              "folder names differ")
        folders[name] = assignments


# File systems take names of up to 255 bytes: a longer cell name (many --grid keys, long
# values) keeps its start and ends with a digest of the whole, so cells stay apart.
MAX_CELL_NAME = 200


def cell_name(assignments: dict[str, str]) -> str:
    text = "__".join(f"{k}={v}" for k, v in assignments.items())
    name = re.sub(r"[^A-Za-z0-9_.=-]+", "-", text)
    if len(name) <= MAX_CELL_NAME:
        return name
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"{name[:MAX_CELL_NAME - 18]}__{digest}"


def cells(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def sweep_row(assignments: dict[str, str], summary: dict[str, Any]) -> dict[str, Any]:
    epsilons = [c["epsilon"] for c in summary.get("clients", []) if c.get("epsilon") is not None]
    return {**assignments, "final_accuracy": summary.get("final_accuracy"),
            "epsilon_max": max(epsilons) if epsilons else None,
            "user_epsilon": summary.get("user_epsilon"), "duration_s": summary.get("wall_s"),
            # A cell stopped in this sweep (runs stop, the console) is resumed only by the
            # next one: its row says how far it got.
            "rounds_completed": summary.get("rounds_completed"),
            "rounds_total": summary.get("rounds")}


def unfinished_row(assignments: dict[str, str], cfg: RunConfig, cell_dir: Path
                   ) -> dict[str, Any]:
    """The sweep.csv row of a cell that stopped without its summary: no result, the rounds
    its metrics.jsonl records."""
    from consortia.server.results import METRICS_FILE, read_jsonl

    metrics = cell_dir / METRICS_FILE
    done = len(read_jsonl(metrics)) if metrics.is_file() else 0
    return sweep_row(assignments, {"rounds_completed": done, "rounds": cfg.rounds})


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def cell_error(assignments: dict[str, str], err: Exception | str, ran: bool) -> ConfigError:
    """`err` (its message names the value and what is accepted) said of the cell it is in."""
    where = ", ".join(f"{k}={v}" for k, v in assignments.items())
    after = ("finished cells are kept: run the same command to go on from this one" if ran
             else "no cell has run")
    return ConfigError(f"sweep cell {where}: {err}\n({after})")


def stored_config_differences(cfg: RunConfig, cell_dir: Path) -> str | None:
    """How `cfg` differs from the run already in `cell_dir` (its run.json), or None when
    there is none or it is the same: a finished cell would otherwise be skipped and its
    old results reported as this sweep's, and a cell cut short would be refused only when
    its turn came, after the cells before it had run."""
    from consortia.server.run_dir import RUN_FILE, config_differences

    run_file = cell_dir / RUN_FILE
    if not run_file.is_file():
        return None
    try:
        diff = config_differences(cfg, json.loads(run_file.read_text())["config"], str(run_file))
    except (ValueError, KeyError, TypeError) as err:
        return f"{run_file} cannot be read as a run's config ({err})"
    if diff is None:
        return None
    return (f"{cell_dir} already holds a run of another config, which differs in: {diff}; "
            "run the sweep with the config and --set values it was started with, or give "
            "another --out")


def finished(cfg: RunConfig, cell_dir: Path) -> bool:
    """The cell's run completed all its rounds (its summary written)."""
    from consortia.server.run_dir import RUN_FILE, run_finished

    return (cell_dir / RUN_FILE).is_file() and run_finished(cfg, cell_dir)


def run_sweep(config: str | Path, grid_specs: list[str], out_dir: str | Path,
              overrides: list[str] | None = None,
              on_cell: Callable[[int, int, str, bool], None] | None = None) -> Path:
    """Run (or skip, when done) every cell; write and return `out_dir/sweep.csv`."""
    from consortia.simulations import runner

    grid = parse_grid(grid_specs)
    check_grid(grid, list(overrides or []))
    out_dir = Path(out_dir)
    todo = cells(grid)
    # Every cell to run passes the config schema and sim run's start checks before the
    # first one runs: a cell that cannot start must not wait for the cells before it.
    configs = []
    for assignments in todo:
        try:
            cfg = load_config(config, list(overrides or []) + [f"{k}={v}" for k, v in assignments.items()])
            differs = stored_config_differences(cfg, out_dir / cell_name(assignments))
            if differs is not None:
                raise ConfigError(differs)
            if not finished(cfg, out_dir / cell_name(assignments)):
                runner.start_checks(cfg)
        except runner.RUN_ERRORS as err:
            raise cell_error(assignments, err, ran=False) from None
        configs.append(cfg)
    rows: list[dict[str, Any]] = []
    path = out_dir / SWEEP_FILE
    for i, (assignments, cfg) in enumerate(zip(todo, configs, strict=True)):
        cell_dir = out_dir / cell_name(assignments)
        summary_path = cell_dir / "summary.json"
        # A cell stopped early (`runs stop`, the console) has its summary but not all its
        # rounds: it resumes, rather than giving its partial result as the cell's.
        done = finished(cfg, cell_dir)
        if on_cell is not None:
            on_cell(i, len(todo), cell_dir.name, done)
        if done:
            summary = json.loads(summary_path.read_text())
        else:
            resume = (cell_dir / "run.json").exists()  # a cell cut short continues
            try:
                summary = runner.run_simulation(cfg, cell_dir, resume=resume, checked=True)
            except BaseException as err:
                # A cell that fails (or is interrupted) stops the sweep: sweep.csv still
                # has the cells before it, and this one with the rounds it completed.
                write_rows(path, rows + [{"cell": cell_dir.name,
                                          **unfinished_row(assignments, cfg, cell_dir)}])
                if isinstance(err, runner.RUN_ERRORS):
                    raise cell_error(assignments, err, ran=True) from None
                if isinstance(err, Exception):  # a bug: its traceback, saying which cell
                    err.add_note(str(cell_error(assignments, "failed", ran=True)))
                raise
        rows.append({"cell": cell_dir.name, **sweep_row(assignments, summary)})
    write_rows(path, rows)
    return path
