"""`consortia bench console`: the run page's API latency while a simulation writes.

Three processes, as in a deployment: this one runs a digits simulation that records
into a SQLite run store (the writer); a `consortia console` subprocess serves that store;
a readers subprocess runs N threads, each loading the run page's API calls (run, rounds,
clients, checkpoints, audit) again and again with a short think time. Reported: p50/p95
latency per call and overall, and the longest time one write transaction of the writer
took, waiting for the lock included (WAL: readers should never make it wait).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SMOKE = Path(__file__).resolve().parent / "experiments" / "digits-dp-smoke.toml"
TOKEN_ENV = "CONSORTIA_BENCH_TOKEN"  # not on the command line, where `ps` would show it
PAGE_CALLS = ("run", "rounds", "clients", "checkpoints", "audit")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "max_ms": None}
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else ordered * 99
    return {"n": len(ordered), "p50_ms": round(q[49] * 1000, 2), "p95_ms": round(q[94] * 1000, 2),
            "max_ms": round(ordered[-1] * 1000, 2)}


def run_readers(base: str, token: str, readers: int, think_s: float, stop_file: Path,
                timeout_s: float = 900) -> dict[str, Any]:
    """N threads polling the run page's API until `stop_file` exists; latencies per call."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=base, headers=headers, timeout=30) as probe:
        run_id = None
        while run_id is None and time.monotonic() < deadline and not stop_file.exists():
            try:
                runs = probe.get("/api/runs").json()
                run_id = runs[0]["run_id"] if runs else None
            except httpx.HTTPError:
                pass
            if run_id is None:
                time.sleep(0.2)
    if run_id is None:
        return {"error": "no run appeared in the store"}
    paths = {"run": f"/api/runs/{run_id}", "rounds": f"/api/runs/{run_id}/rounds",
             "clients": f"/api/runs/{run_id}/clients",
             "checkpoints": f"/api/runs/{run_id}/checkpoints",
             "audit": f"/api/runs/{run_id}/audit"}
    latencies: dict[str, list[float]] = {name: [] for name in PAGE_CALLS}
    errors: list[str] = []
    lock = threading.Lock()

    def reader() -> None:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            while not stop_file.exists() and time.monotonic() < deadline:
                for name, path in paths.items():
                    started = time.perf_counter()
                    try:
                        response = client.get(path)
                        ok = response.status_code == 200
                    except httpx.HTTPError as err:
                        ok, response = False, err
                    elapsed = time.perf_counter() - started
                    with lock:
                        if ok:
                            latencies[name].append(elapsed)
                        else:
                            errors.append(f"{name}: {response}")
                time.sleep(think_s)

    started = time.monotonic()
    threads = [threading.Thread(target=reader, daemon=True) for _ in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    every = [v for values in latencies.values() for v in values]
    return {"run_id": run_id, "seconds": round(elapsed, 1),
            "requests_per_s": round(len(every) / elapsed, 1) if elapsed else None,
            "errors": len(errors), "first_errors": errors[:3],
            "all": _percentiles(every), "per_call": {k: _percentiles(v) for k, v in latencies.items()}}


def bench_console(readers: int = 20, rounds: int = 6, clients: int = 4,
                  think_s: float = 0.25) -> dict[str, Any]:
    from consortia.config import load_config
    from consortia.server.console.auth import ConsoleToken
    from consortia.server.store import RunStore
    from consortia.simulations.runner import run_simulation

    work = Path(tempfile.mkdtemp(prefix="consortia-bench-console-"))
    out = work / "run"
    out.mkdir()
    store = RunStore(out / "store.db")  # the writer's own connection pool, timed per write
    token_file = work / "console-token"
    token = ConsoleToken(token_file).rotate()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    console = subprocess.Popen(
        [sys.executable, "-m", "consortia.cli", "console", "--store", str(out), "--port", str(port),
         "--token-file", str(token_file)], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    stop_file = work / "stop"
    reader_proc = subprocess.Popen(
        [sys.executable, "-m", "consortia.simulations.bench_console", "--base", base,
         "--readers", str(readers), "--think-s", str(think_s), "--stop-file", str(stop_file)],
        env={**env, TOKEN_ENV: token}, stdout=subprocess.PIPE, text=True)
    try:
        cfg = load_config(SMOKE, [f"rounds={rounds}", f"clients={clients}",
                                  f"clients_per_round={clients}"])
        started = time.monotonic()
        summary = run_simulation(cfg, out, store=store)
        sim_s = time.monotonic() - started
        stop_file.touch()
        reader_out, _ = reader_proc.communicate(timeout=120)
        read = json.loads(reader_out)
    finally:
        stop_file.touch()
        for proc in (reader_proc, console):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
        store.close()
    return {
        "bench": "console", "readers": readers, "think_s": think_s, "rounds": rounds,
        "clients": clients, "cpus": os.cpu_count(), "store": "sqlite (WAL)",
        "simulation_s": round(sim_s, 1), "rounds_completed": summary["rounds_completed"],
        "api_latency_ms": read.get("all"), "per_call": read.get("per_call"),
        "requests_per_s": read.get("requests_per_s"), "reader_errors": read.get("errors"),
        "writer": {"transactions": store.write_count,
                   "longest_block_ms": round(store.longest_write_s * 1000, 2)},
        "writer_blocked_over_1s": store.longest_write_s > 1.0,
    }


def _main() -> None:
    parser = argparse.ArgumentParser(description="the readers of `consortia bench console`")
    parser.add_argument("--base", required=True)
    parser.add_argument("--readers", type=int, default=20)
    parser.add_argument("--think-s", type=float, default=0.25)
    parser.add_argument("--stop-file", type=Path, required=True)
    args = parser.parse_args()
    print(json.dumps(run_readers(args.base, os.environ[TOKEN_ENV], args.readers, args.think_s,
                                 args.stop_file)))


if __name__ == "__main__":
    _main()
