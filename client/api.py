"""The partner's Python API: the same as `consortia client join`, from your own code.

    from consortia.client import join_federation, site_status

    join_federation("site.toml", dataset=my_torch_dataset)   # blocks until stopped
    print(site_status("site.toml"))                          # ε spent, budget, audit log

Bring your own model by registering a Task (a model factory, a data loader, train and
evaluation steps; see consortia.tasks.Task) under a name the consortium agrees on, on the
server too (server.toml `task_modules`). Bring your own data as any torch Dataset of
(features, label) pairs, or let site.toml's [data] section read a CSV, Parquet file or
folder (client/data.py).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from consortia.client.join import JoinError, join
from consortia.client.policy import AuditLog
from consortia.client.site_config import SiteConfig, load_site_config
from consortia.privacy.dp import PrivacyLedger
from consortia.tasks import Task, register_task


def join_federation(config: str | Path | SiteConfig, *, dataset: Dataset | None = None,
                    task: Task | None = None, stop: threading.Event | None = None,
                    log_fn=print) -> None:
    """Join as the site described by `config` until `stop` is set (or SIGTERM / Ctrl-C).

    `dataset` replaces site.toml's [data] section; `task` registers your own model recipe
    (its name must be the site's `task` and one the server runs).
    """
    if task is not None:
        register_task(task)  # before the config is read: site.task may name it
    cfg = config if isinstance(config, SiteConfig) else load_site_config(config)
    if task is not None and task.name != cfg.site.task:  # else the site's task would train
        raise JoinError(f"join_federation(task=...): your task is named {task.name!r}, but "
                        f"site.task is {cfg.site.task!r}, the task this site trains; accepted: "
                        f"a task named as site.task (or site.task = {task.name!r}, listed in "
                        "policy.tasks)")
    join(cfg, dataset=dataset, log_fn=log_fn, stop=stop)


def site_status(config: str | Path | SiteConfig) -> dict[str, Any]:
    """What this site has spent and decided: its ledger's ε against its budget, and its
    audit log (one entry per train request, newest last)."""
    cfg = config if isinstance(config, SiteConfig) else load_site_config(config)
    p = cfg.policy
    # A state_dir not there yet is a site that never joined (ε 0); one that is a file, or
    # lies under a file, is a wrong setting, not an empty ledger.
    state = cfg.site.state_dir
    there = next((d for d in (state, *state.parents) if d.exists()), None)
    if there is not None and not there.is_dir():
        from consortia.config import ConfigError

        raise ConfigError(f"site.state_dir: {state} cannot be this site's state directory "
                          f"({there} is a file); accepted: the directory client join keeps "
                          "the ledger and audit log in")
    ledger = PrivacyLedger.open(cfg.site.state_dir, accountant=p.accountant, delta=p.delta,
                                epsilon_budget=p.epsilon_budget)
    audit = AuditLog(cfg.site.state_dir)
    return {"site": cfg.site.name, "epsilon": ledger.epsilon, "epsilon_budget": p.epsilon_budget,
            # Distributed DP's second guarantee (this site's own noise shares alone), which
            # [policy] max_epsilon_if_secagg_fails caps; None when the site never took part.
            "epsilon_if_secagg_fails": ledger.epsilon_if_secagg_fails,
            "max_epsilon_if_secagg_fails": p.max_epsilon_if_secagg_fails,
            "delta": p.delta, "accountant": p.accountant, "steps": ledger.steps,
            "ledger_events": ledger.events, "audit": audit.entries(),
            "audit_damaged_lines": audit.damaged_lines()}
