"""The consortia ServerApp (Flower Message API): one RoundWorkflow over the grid."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from consortia.config import RunConfig
from consortia.server.store import RunStore
from consortia.server.workflow import RoundCallback, RoundWorkflow
from consortia.strategies import build_strategy
from consortia.tasks import get_task


def build_server_app(cfg: RunConfig, out_dir: str | Path, *, run_id: str, resume: bool = False,
                     on_round: RoundCallback | None = None,
                     store: RunStore | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        task = get_task(cfg.task, cfg.task_options())
        workflow = RoundWorkflow(cfg, task, build_strategy(cfg), Path(out_dir), run_id, on_round,
                                 store)
        workflow.run(grid, resume=resume)

    return app
