"""The store as a real simulation writes it, a stop on a running one, and the page in Chromium.

Slow: each test runs a Flower simulation (digits, CPU). The browser tests drive Debian's
/usr/bin/chromium through /usr/bin/chromedriver (Selenium; no browser download) and are
skipped where those are missing (`make test` installs them when run as root).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from consortia.config import load_config
from consortia.server.checkpoint import CheckpointStore
from consortia.server.results import read_jsonl
from consortia.server.store import RunStore
from consortia.simulations.runner import run_simulation

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "simulations" / "experiments" / "digits-dp-smoke.toml"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--window-size=1280,2200"]
SIM_TIMEOUT_S = 420
ROUNDS = 100  # long enough that a stop always comes before the end


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    summary = run_simulation(load_config(SMOKE), out)
    return out, summary


def open_run_page(browser, console_for, store: RunStore, run_id: str) -> None:
    """Serve `store`, sign in with the printed URL's token, and open the run's page."""
    base, secret = console_for(store)
    browser.get(f"{base}/?token={secret}")
    browser.get(f"{base}/#/runs/{run_id}")


def wait_for(condition, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the simulation exited ({proc.returncode}) while waiting for {what}:\n"
                        f"{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def start_long_simulation(out: Path) -> tuple[subprocess.Popen, RunStore, str]:
    """`consortia sim run` of many rounds in a subprocess; returns once its run is in the store."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "consortia.cli", "sim", "run", str(SMOKE), "--out", str(out),
         "--set", f"rounds={ROUNDS}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    wait_for(lambda: (out / "store.db").is_file(), 120, "the store file", proc)
    store = RunStore(out / "store.db")
    runs = wait_for(lambda: store.list_runs(), 120, "the run to start", proc)
    return proc, store, runs[0]["run_id"]


def assert_stopped_after_the_current_round(store: RunStore, run_id: str, out: Path) -> int:
    run = store.get_run(run_id)
    done = run["rounds_completed"]
    assert run["status"] == "stopped" and 1 <= done < run["rounds_total"] == ROUNDS
    # The round in progress when the stop came finishes; no round after it starts.
    after = [r["round"] for r in store.rounds(run_id) if r["recorded_at"] > run["stop_requested_at"]]
    assert after in ([], [done])
    assert [r["round"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, done + 1))
    latest = CheckpointStore(out / "checkpoints").latest()  # re-hashes the weights
    assert latest is not None and latest.round == done
    assert store.checkpoints(run_id)[-1]["sha256"] == latest.sha256
    assert json.loads((out / "summary.json").read_text())["rounds_completed"] == done
    events = [e["event"] for e in reversed(store.audit_log(run_id))]
    assert events.index("stop-requested") < events.index("run-stopped") == len(events) - 1
    return done


def test_store_reads_back_the_simulation_exactly(finished_run):
    out, summary = finished_run
    store = RunStore(out / "store.db")
    (run,) = store.list_runs()
    run_id = run["run_id"]
    assert run_id == json.loads((out / "run.json").read_text())["run_id"]
    assert run["status"] == "completed" and run["rounds_completed"] == run["rounds_total"] == 3
    assert store.metrics_rows(run_id) == read_jsonl(out / "metrics.jsonl")
    assert store.participation_rows(run_id) == read_jsonl(out / "participation.jsonl")
    assert len(store.participation_rows(run_id)) == 12
    checkpoints = CheckpointStore(out / "checkpoints").all()
    assert [(c["round"], c["sha256"], c["parent_sha256"]) for c in store.checkpoints(run_id)] == \
        [(c.round, c.sha256, c.parent_sha256) for c in checkpoints]
    # summary.json's per-client view can be rendered from the store.
    clients = {c["client_id"]: c for c in store.clients(run_id)}
    for c in summary["clients"]:
        assert clients[c["id"]]["epsilon"] == c["epsilon"]
        assert clients[c["id"]]["rounds_joined"] == len(c["rounds_participated"])
    store.close()


def test_runs_stop_ends_a_running_simulation_after_the_current_round(tmp_path):
    out = tmp_path / "long"
    proc, store, run_id = start_long_simulation(out)
    try:
        wait_for(lambda: store.get_run(run_id)["rounds_completed"] >= 1, SIM_TIMEOUT_S,
                 "round 1", proc)
        stop = subprocess.run([sys.executable, "-m", "consortia.cli", "runs", "stop", run_id,
                               "--store", str(out), "--json"], capture_output=True, text=True)
        assert stop.returncode == 0, stop.stderr
        assert proc.wait(timeout=SIM_TIMEOUT_S) == 0, proc.stdout.read()
        assert_stopped_after_the_current_round(store, run_id, out)
    finally:
        if proc.poll() is None:
            proc.kill()
        store.close()


# --- the page in headless Chromium ---------------------------------------------------------

@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def console_for(tmp_path):
    """Start the console (uvicorn, a free local port) over a store; yields its base URL + token."""
    import uvicorn

    from consortia.server.console import ConsoleToken, create_app

    servers = []

    def start(store: RunStore) -> tuple[str, str]:
        token = ConsoleToken(tmp_path / "console-token")
        secret = token.rotate()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(store, token), host="127.0.0.1",
                                               port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        wait_for(lambda: server.started, 30, "the console to start")
        return f"http://127.0.0.1:{port}", secret

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


def save_screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    if os.environ.get("CONSORTIA_SCREENSHOT_DIR"):  # for a person who wants to look
        shutil.copy(path, Path(os.environ["CONSORTIA_SCREENSHOT_DIR"]) / name)
    return path


def test_browser_shows_a_finished_run(finished_run, browser, console_for, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    out, summary = finished_run
    store = RunStore(out / "store.db")
    run_id = store.list_runs()[0]["run_id"]
    base, secret = console_for(store)
    wait = WebDriverWait(browser, 90)

    browser.get(f"{base}/?token={secret}")  # the printed URL: cookie, then the runs list
    link = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#runs-table a")))
    assert browser.current_url == f"{base}/"
    assert "completed" in browser.find_element(By.ID, "runs-table").text
    assert link.text == run_id
    link.click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#accuracy-chart circle")) == 3)
    rows = browser.find_elements(By.CSS_SELECTOR, "#client-table tbody tr")
    assert len(rows) == len(summary["clients"]) == 4
    assert all("trained" in r.text for r in rows)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#loss-chart circle")) == 3
    assert len(browser.find_elements(By.CSS_SELECTOR, "#checkpoint-table tbody tr")) == 4
    assert browser.find_element(By.ID, "progress-label").text == "round 3 of 3"
    assert not browser.find_element(By.ID, "stop-button").is_displayed()
    assert "run-completed" in browser.find_element(By.ID, "audit-table").text
    save_screenshot(browser, tmp_path, "console-finished-run.png")
    store.close()


def test_browser_stop_button_stops_a_running_simulation(browser, console_for, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    out = tmp_path / "long"
    proc, store, run_id = start_long_simulation(out)
    try:
        open_run_page(browser, console_for, store, run_id)
        WebDriverWait(browser, SIM_TIMEOUT_S).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#accuracy-chart circle")) >= 1)
        button = WebDriverWait(browser, 90).until(ec.element_to_be_clickable((By.ID, "stop-button")))
        button.click()
        WebDriverWait(browser, 90).until(ec.visibility_of_element_located((By.ID, "stop-note")))
        assert store.get_run(run_id)["stop_requested_by"] == "console"
        assert proc.wait(timeout=SIM_TIMEOUT_S) == 0, proc.stdout.read()
        done = assert_stopped_after_the_current_round(store, run_id, out)
        WebDriverWait(browser, 90).until(  # the page follows without a reload
            lambda d: d.find_element(By.ID, "run-status").text == "stopped")
        assert browser.find_element(By.ID, "progress-label").text == f"round {done} of {ROUNDS}"
        assert "stop-requested" in browser.find_element(By.ID, "audit-table").text
        save_screenshot(browser, tmp_path, "console-stopped-run.png")
    finally:
        if proc.poll() is None:
            proc.kill()
        store.close()


def test_browser_does_not_call_a_run_that_completed_after_a_stop_request_stopped(
        browser, console_for, tmp_path):
    """A stop asked during the last round: the run completes (the server checks between
    rounds); the page said 'Stopped on request of console after round 2.' under 'completed'."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    store = RunStore(tmp_path / "store.db")
    store.start_run("done1", task="digits-mlp", rounds_total=2, config={})
    store.record_round("done1", {"round": 1, "accuracy": 0.5, "loss": 1.0}, [])
    store.request_stop("done1", actor="console")
    store.record_round("done1", {"round": 2, "accuracy": 0.6, "loss": 0.9}, [])
    store.finish_run("done1", "completed")
    open_run_page(browser, console_for, store, "done1")
    WebDriverWait(browser, 90).until(
        lambda d: d.find_element(By.ID, "run-status").text == "completed")
    note = browser.find_element(By.ID, "stop-note").text
    assert "Stop requested by console" in note and "completed after round 2" in note
    assert "Stopped" not in note
    store.close()


def test_browser_names_a_run_address_that_is_not_percent_encoded(browser, console_for, tmp_path):
    """#/runs/%E0%A4%A threw URIError in the page's router: a blank page, 'connecting…'."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    store = RunStore(tmp_path / "store.db")
    open_run_page(browser, console_for, store, "%E0%A4%A")
    error = WebDriverWait(browser, 90).until(
        lambda d: d.find_element(By.ID, "error").text or None)
    assert "404" in error and "%E0%A4%A" in error
    store.close()


def test_browser_tiles_show_the_latest_evaluated_accuracy_between_evaluations(
        browser, console_for, tmp_path):
    """With eval_every > 1 a running run's last round has no accuracy: the tiles said '–'
    for accuracy and loss in every round between evaluations."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    store = RunStore(tmp_path / "store.db")
    store.start_run("ev", task="digits-mlp", rounds_total=8, config={})
    store.record_round("ev", {"round": 1}, [])
    store.record_round("ev", {"round": 2, "accuracy": 0.625, "loss": 1.5}, [])
    store.record_round("ev", {"round": 3}, [])
    open_run_page(browser, console_for, store, "ev")
    tiles = WebDriverWait(browser, 90).until(
        lambda d: d.find_element(By.ID, "tiles").text or None)
    assert "0.6250" in tiles and "accuracy (round 2)" in tiles
    assert "1.5000" in tiles and "loss (round 2)" in tiles
    store.close()
