import pytest

from consortia.config import ConfigError, load_config
from consortia.simulations.bench_sim import bench_sim


def test_no_training_rounds_need_dp_off():
    with pytest.raises(ConfigError, match="local_epochs = 0"):
        load_config(None, ["local_epochs=0"])


def test_a_bad_flower_poll_interval_fails_before_any_simulation_starts():
    with pytest.raises(ConfigError, match=r"flower_poll_interval_s must be in \(0, 1\].*-1"):
        bench_sim(clients=10, per_round=2, rounds=2, flower_poll_interval_s=-1)


@pytest.mark.slow
def test_bench_sim_times_both_runners_and_reports_their_ratio():
    result = bench_sim(clients=6, per_round=3, rounds=2)
    assert len(result["ours_round_s"]) == 2 and len(result["flower_round_s"]) == 2
    assert result["ours_ms_per_client"] > 0 and result["flower_ms_per_client"] > 0
    expected = result["ours_ms_per_client"] / result["flower_ms_per_client"]
    assert result["ours_over_flower"] == pytest.approx(expected, rel=0.01)
    assert result["peak_rss_mb"] > 0


def test_a_bad_flower_dispatch_fails_before_any_simulation_starts():
    with pytest.raises(ConfigError, match="flower_dispatch must be prompt or flower.*'fast'"):
        bench_sim(clients=10, per_round=2, rounds=2, flower_dispatch="fast")


def test_a_bad_dispatch_for_ours_fails_naming_the_value_and_the_choices():
    with pytest.raises(ConfigError, match=r"sim\.dispatch.*prompt.*flower"):
        bench_sim(clients=10, per_round=2, rounds=2, dispatch="fast")
