import dataclasses

import pytest
from torch import nn

from consortia.simulations import bench
from consortia.simulations.bench import bench_dp
from consortia.tasks import get_task

MS_KEYS = ("nonprivate_ms", "hooks_ms", "ghost_ms")


def test_bench_dp_reports_positive_step_times_and_ratios_that_match_them():
    report = bench_dp(task="digits-mlp", batch_size=64, steps=2, repeats=1)

    assert report["errors"] == {}
    for key in ("task", "device", "batch_size", "steps", "params", "torch_threads",
                *MS_KEYS, "hooks_over_nonprivate", "ghost_over_nonprivate"):
        assert key in report, key
    assert report["task"] == "digits-mlp"
    assert report["params"] == 64 * 64 + 64 + 64 * 10 + 10
    for key in MS_KEYS:
        assert isinstance(report[key], float) and report[key] > 0, (key, report[key])
    for mode in ("hooks", "ghost"):
        quotient = report[f"{mode}_ms"] / report["nonprivate_ms"]
        assert report[f"{mode}_over_nonprivate"] == pytest.approx(quotient, abs=0.005)
    # GPU memory is measured only where a step ran on a GPU.
    on_gpu = report["device"] == "cuda"
    assert (report["gpu_name"] is not None) is on_gpu
    for mode in ("nonprivate", "hooks", "ghost"):
        peak = report[f"{mode}_step_peak_mb"]
        assert (isinstance(peak, float) and peak >= 0) if on_gpu else (peak is None), (mode, peak)


def test_bench_dp_reports_a_mode_opacus_rejects_as_null_with_its_error(monkeypatch):
    # BatchNorm mixes samples within a batch, so Opacus refuses it in both private modes.
    def build_model(activation_name: str = "tanh") -> nn.Module:
        return nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 10))

    task = dataclasses.replace(get_task("digits-mlp"), build_model=build_model)
    monkeypatch.setattr(bench, "get_task", lambda name: task)

    report = bench_dp(task="digits-mlp", batch_size=64, steps=1, repeats=1)

    assert report["nonprivate_ms"] > 0
    assert report["hooks_ms"] is None and report["ghost_ms"] is None
    assert report["hooks_over_nonprivate"] is None and report["ghost_over_nonprivate"] is None
    assert set(report["errors"]) == {"hooks", "ghost"}
    assert all(message for message in report["errors"].values())
