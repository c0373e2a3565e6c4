"""The same config and seed give the same metrics.jsonl (timings aside), on CPU."""

import json
from pathlib import Path

import pytest

from consortia.config import load_config
from consortia.server.results import read_jsonl
from consortia.simulations.runner import run_simulation

pytestmark = pytest.mark.slow
SMOKE = Path(__file__).resolve().parents[1] / "simulations" / "experiments" / "digits-dp-smoke.toml"
TIMINGS = {"duration_s"}


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    # Sampling 3 of 6 clients: which clients are sampled must not depend on Flower's
    # random node ids, and the aggregate must not depend on the order replies arrive in.
    cfg = load_config(SMOKE, ["clients=6", "clients_per_round=3", "rounds=3"])
    runs = []
    for name in ("a", "b"):
        run_simulation(cfg, tmp_path / name)
        rows = read_jsonl(tmp_path / name / "metrics.jsonl")
        runs.append([{k: v for k, v in r.items() if k not in TIMINGS} for r in rows])
    assert runs[0] == runs[1]
    sampled = [sorted(p["client_id"] for p in read_jsonl(tmp_path / n / "participation.jsonl")
                      if p["round"] == 1) for n in ("a", "b")]
    assert sampled[0] == sampled[1] and len(sampled[0]) == 3
    summaries = [json.loads((tmp_path / n / "summary.json").read_text()) for n in ("a", "b")]
    assert [c["epsilon"] for c in summaries[0]["clients"]] == \
        [c["epsilon"] for c in summaries[1]["clients"]]
