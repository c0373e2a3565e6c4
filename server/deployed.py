"""The ServerApp a deployed run executes (`consortia.server.deployed:app`).

`consortia server start` submits a Flower app bundle whose components name this module;
Flower's `flwr-serverapp` process loads it from the installed consortia package. The
bundle's config says which server.toml to read and whether to resume; the run's id and
results directory were prepared by `consortia server start` before the run was submitted.
"""

from __future__ import annotations

import json

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from consortia.server.deploy_config import load_server_config
from consortia.server.run_dir import RUN_FILE
from consortia.server.server_app import run_federation
from consortia.server.store import RunStore, default_store_url

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deployment = load_server_config(str(context.run_config["server-config"]))
    cfg, out = deployment.run, deployment.server.out
    run_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    store = RunStore(cfg.store.url or default_store_url(out))
    try:
        run_federation(grid, cfg, out, run_id=run_id, resume=bool(context.run_config["resume"]),
                       store=store, kind="deployment")
    finally:
        store.close()
