"""A researcher's own task, registered in their process, runs in a simulation."""

import dataclasses
import json
from pathlib import Path

import pytest

from consortia.config import load_config
from consortia.simulations.runner import run_simulation
from consortia.tasks import TASKS, get_task, register_task

SMOKE = Path(__file__).resolve().parents[1] / "simulations" / "experiments" / "digits-dp-smoke.toml"


@pytest.mark.slow
def test_a_task_registered_in_the_callers_process_trains_in_the_ray_actors(tmp_path):
    digits = get_task("digits-mlp")

    def build_model(activation_name: str = "tanh"):  # defined here, not in an installed module
        return digits.build_model(activation_name)

    register_task(dataclasses.replace(digits, name="ward-risk-mlp", build_model=build_model))
    try:
        cfg = load_config(SMOKE, ["task=ward-risk-mlp", "rounds=1", "privacy.enabled=false"])
        run_simulation(cfg, tmp_path / "run")
    finally:
        del TASKS["ward-risk-mlp"]
    [row] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    # Every sampled client trained: the actors knew the task (before, each failed with
    # "unknown task 'ward-risk-mlp'" and the run went on with none).
    assert row["clients_trained"] == cfg.clients_per_round and row["clients_failed"] == 0
