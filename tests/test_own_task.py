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


@pytest.mark.parametrize("which, row", [("training", 300), ("test", 150)])
def test_an_own_tasks_label_its_model_has_no_class_for_fails_the_simulation_at_start(which, row):
    """A registered task whose load_data holds a label beyond its model's classes: a
    training row made every client holding it fail its rounds mid-run ("Target 4 is out of
    bounds"), a test row stopped the run at the server's first evaluation with that
    IndexError. Now start_checks says which set, which record and what is accepted."""
    import torch
    from torch.utils.data import TensorDataset

    from consortia.simulations.runner import start_checks
    from consortia.tasks import TaskData

    def load(data_dir):
        gen = torch.Generator().manual_seed(0)
        train = TensorDataset(torch.randn(400, 10, generator=gen), torch.randint(0, 3, (400,), generator=gen))
        test = TensorDataset(torch.randn(200, 10, generator=gen), torch.randint(0, 3, (200,), generator=gen))
        (train if which == "training" else test).tensors[1][row] = 4
        return TaskData(train=train, test=test)

    register_task(dataclasses.replace(get_task("digits-mlp"), name="three-class-mlp", load_data=load,
                                      build_model=lambda activation="tanh": torch.nn.Linear(10, 3)))
    try:
        cfg = load_config(SMOKE, ["task=three-class-mlp", "clients=2", "clients_per_round=2"])
        with pytest.raises(ValueError) as err:
            start_checks(cfg)
    finally:
        del TASKS["three-class-mlp"]
    assert str(err.value) == (
        f"task 'three-class-mlp': its {which} set (load_data) does not fit its model: labels "
        "must lie in [0, 2] (task 'three-class-mlp' has 3 classes); found 0 to 4: 1 record "
        f"(counted from 0): record {row}: 4")
