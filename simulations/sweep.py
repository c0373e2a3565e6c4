"""`consortia sim sweep`: every combination of a grid of config values, one run each.

Cells run one after another (each is a full federation on Flower's simulation engine);
a cell whose summary.json exists is skipped, so an interrupted sweep resumes where it
stopped. `sweep.csv` has one row per cell: the varied keys, final accuracy, largest
client ε, user-level ε (if any) and wall time.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consortia.config import ConfigError, load_config

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
        if key in grid:
            raise ConfigError(f"--grid {key} given twice")
        grid[key.strip()] = items
    return grid


def cell_name(assignments: dict[str, str]) -> str:
    text = "__".join(f"{k}={v}" for k, v in assignments.items())
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text)


def cells(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def sweep_row(assignments: dict[str, str], summary: dict[str, Any]) -> dict[str, Any]:
    epsilons = [c["epsilon"] for c in summary.get("clients", []) if c.get("epsilon") is not None]
    return {**assignments, "final_accuracy": summary.get("final_accuracy"),
            "epsilon_max": max(epsilons) if epsilons else None,
            "user_epsilon": summary.get("user_epsilon"), "duration_s": summary.get("wall_s")}


def run_sweep(config: str | Path, grid_specs: list[str], out_dir: str | Path,
              overrides: list[str] | None = None,
              on_cell: Callable[[int, int, str, bool], None] | None = None) -> Path:
    """Run (or skip, when done) every cell; write and return `out_dir/sweep.csv`."""
    from consortia.simulations.runner import run_simulation

    grid = parse_grid(grid_specs)
    out_dir = Path(out_dir)
    todo = cells(grid)
    # Every cell's config is validated before the first one runs.
    configs = [load_config(config, list(overrides or []) + [f"{k}={v}" for k, v in a.items()])
               for a in todo]
    rows = []
    for i, (assignments, cfg) in enumerate(zip(todo, configs, strict=True)):
        cell_dir = out_dir / cell_name(assignments)
        summary_path = cell_dir / "summary.json"
        done = summary_path.exists()
        if on_cell is not None:
            on_cell(i, len(todo), cell_dir.name, done)
        if done:
            summary = json.loads(summary_path.read_text())
        else:
            resume = (cell_dir / "run.json").exists()  # a cell cut short continues
            summary = run_simulation(cfg, cell_dir, resume=resume)
        rows.append({"cell": cell_dir.name, **sweep_row(assignments, summary)})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SWEEP_FILE
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
