"""`consortia sim run`: a federation of virtual clients on Flower's simulation engine."""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from consortia.config import RunConfig, config_to_dict
from consortia.privacy.storage import atomic_write_json
from consortia.server.workflow import RoundCallback

RUN_FILE = "run.json"


class ResultsDirError(ValueError):
    pass


def prepare_out_dir(cfg: RunConfig, out_dir: Path, resume: bool) -> str:
    """Create the results directory, or check that a resumed run is the same run."""
    run_file = out_dir / RUN_FILE
    if run_file.exists():
        stored = json.loads(run_file.read_text())
        if not resume:
            raise ResultsDirError(
                f"{out_dir} already holds run {stored['run_id']}; pass --resume to continue "
                "it, or choose another --out")
        if stored["config"] != config_to_dict(cfg):
            old, new = stored["config"], config_to_dict(cfg)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ResultsDirError(
                f"--resume with a config that differs from the stored run in: {', '.join(diff)}")
        return stored["run_id"]
    if resume:
        raise ResultsDirError(f"--resume: {out_dir} holds no run to resume")
    run_id = uuid.uuid4().hex[:12]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_file, {"run_id": run_id, "config": config_to_dict(cfg)})
    return run_id


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    if cfg.sim.max_actors is not None:
        cpus = min(cpus, int(cfg.sim.max_actors * cfg.sim.num_cpus_per_client))
    return {
        "client_resources": {"num_cpus": cfg.sim.num_cpus_per_client,
                             "num_gpus": cfg.sim.num_gpus_per_client},
        "init_args": {"num_cpus": max(cpus, 1), "include_dashboard": False,
                      "logging_level": logging.ERROR, "log_to_driver": False},
    }


def run_simulation(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False,
                   on_round: RoundCallback | None = None, verbose: bool = False,
                   client_mods: list | None = None) -> dict[str, Any]:
    """Run the federation described by `cfg`; return its summary (also in out_dir).

    `client_mods` are Flower client mods wrapped around every virtual client (fault
    injection uses them); `on_round` gets each round's metrics row as it is recorded.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import flwr.simulation

    from consortia.client import build_client_app
    from consortia.server.server_app import build_server_app
    from consortia.simulations.faults import configured_mods
    from consortia.simulations.sites import SimulationSites, partitions_for

    out_dir = Path(out_dir)
    partitions_for(cfg)  # a partition that cannot be drawn fails here, before Ray starts
    run_id = prepare_out_dir(cfg, out_dir, resume)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    flwr.simulation.run_simulation(
        server_app=build_server_app(cfg, out_dir, run_id=run_id, resume=resume,
                                    on_round=on_round),
        client_app=build_client_app(SimulationSites(cfg, out_dir),
                                     mods=configured_mods(cfg) + list(client_mods or [])),
        num_supernodes=cfg.clients,
        backend_config=backend_config(cfg),
    )
    summary_path = out_dir / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log")
    return json.loads(summary_path.read_text())
