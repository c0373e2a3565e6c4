"""The consortia ServerApp (Flower Message API): one RoundWorkflow over the grid.

Simulations build it around a config in memory (`build_server_app`); a deployment runs
the module-level app in server/deployed.py, which reads its config from disk.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from consortia.config import RunConfig
from consortia.server.directory import poll_replies_every
from consortia.server.store import RunStore
from consortia.server.workflow import RoundCallback, RoundWorkflow
from consortia.strategies import build_strategy
from consortia.tasks import get_task


def run_federation(grid: Grid, cfg: RunConfig, out_dir: str | Path, *, run_id: str,
                   resume: bool = False, on_round: RoundCallback | None = None,
                   store: RunStore | None = None, kind: str = "simulation") -> None:
    """The run, on whatever grid Flower gives: simulated nodes or deployed SuperNodes
    (`kind` "deployment", as the run store records it)."""
    workflow = RoundWorkflow(cfg, get_task(cfg.task, cfg.task_options()), build_strategy(cfg),
                             Path(out_dir), run_id, on_round, store, kind)
    workflow.run(grid, resume=resume)


def build_server_app(cfg: RunConfig, out_dir: str | Path, *, run_id: str, resume: bool = False,
                     on_round: RoundCallback | None = None,
                     store: RunStore | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        poll_replies_every(grid, cfg.sim.poll_interval_s)
        run_federation(grid, cfg, out_dir, run_id=run_id, resume=resume, on_round=on_round,
                       store=store)

    return app
