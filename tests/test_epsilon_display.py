"""A shown ε is never below the one accounted: every place that shows one to people rounds
it up (privacy/display.py epsilon_text; the web console's fmt.eps). Rounded to the nearest,
the report showed a client's ε if secure aggregation fails of 19.0307 as 19.03 and the
console 2.9984 as 2.998."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from consortia.privacy.display import epsilon_text

CONSOLE_JS = Path(__file__).resolve().parents[1] / "server" / "console" / "static" / "console.js"

# (ε accounted, shown at 3 places): above a shown value by a hair, exactly one, a float
# just below its decimal (0.7 is 0.69999...), and one just above (0.1 + 0.2).
CASES = [(2.9984, "2.999"), (19.030682310378804, "19.031"), (7.999642432194647, "8.000"),
         (0.5, "0.500"), (0.7, "0.700"), (0.1 + 0.2, "0.301"), (3.0, "3.000"),
         # a float a hair above its decimal that reads back as it: the decimal, as the
         # console shows it (strictly rounding the float's exact value up gave 0.451)
         (0.45, "0.450"), (1.2, "1.200")]


@pytest.mark.parametrize("epsilon, shown", CASES)
def test_epsilon_text_rounds_up_and_never_below(epsilon, shown):
    assert epsilon_text(epsilon) == shown
    assert float(shown) >= epsilon


def test_the_report_shows_each_clients_epsilons_rounded_up(tmp_path):
    from consortia.simulations.report import write_report

    rows = [{"round": 1, "accuracy": 0.5, "loss": 1.0, "clients_trained": 1,
             "clients_sampled": 1, "epsilon_max": 2.9984, "user_epsilon": 1.23441}]
    part = [{"round": 1, "client_id": "0", "status": "trained", "dp_enabled": True,
             "epsilon": 2.9984, "epsilon_budget": 3.0}]
    client = {"id": "0", "epsilon": 2.9984, "delta": 1e-5, "epsilon_budget": 3.0,
              "epsilon_if_secagg_fails": 19.030682310378804}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "participation.jsonl").write_text("".join(json.dumps(p) + "\n" for p in part))
    (tmp_path / "summary.json").write_text(json.dumps(
        {"run_id": "r", "user_epsilon": 1.23441, "clients": [client]}))
    page = write_report(tmp_path).read_text()
    assert "<td>2.999</td>" in page and "<td>19.031</td>" in page and "<td>1.235</td>" in page
    assert "2.998" not in page and "19.03<" not in page and "1.234<" not in page


def test_server_start_says_the_largest_epsilon_rounded_up(tmp_path, monkeypatch):
    from deploy_harness import server_start_lines

    row = {"round": 1, "clients_trained": 2, "clients_sampled": 2, "epsilon_max": 2.9984}
    _, said = server_start_lines(monkeypatch, tmp_path, [row], {"site-a": 11})
    assert "round 1: trained 2/2, ε max 2.999" in said


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run console.js's fmt")
def test_the_web_console_shows_epsilon_rounded_up_as_python_does():
    source = CONSOLE_JS.read_text()
    start = source.index("const fmt = {")
    end = source.index("};", start) + 2
    values = [epsilon for epsilon, _ in CASES]
    script = (source[start:end] + f"\nconsole.log(JSON.stringify({json.dumps(values)}"
              ".map((v) => fmt.eps(v)).concat([fmt.eps(null)])));")
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [shown for _, shown in CASES] + ["–"]


def test_a_refusal_never_shows_the_projected_epsilon_at_the_budget():
    """To the nearest, a round projected at 3.00004 'exceeds the budget 3.0000' read as
    3.0000, and the ε spent so far could show below what the ledger holds."""
    from consortia.privacy.dp import BudgetDecision

    reason = BudgetDecision(False, 2.99996, 3.00004, 3.0).reason
    assert reason == ("projected epsilon after this round 3.0001 exceeds the budget 3.0000 "
                      "(spent so far 3.0000)")
