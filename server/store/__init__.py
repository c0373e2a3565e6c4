"""The run store (SQLAlchemy): runs, rounds, participation, ε, checkpoints, audit log."""

from consortia.server.store.store import (
    STORE_FILE,
    RunNotRunning,
    RunStore,
    StoreError,
    UnknownRun,
    default_store_url,
    resolve_store_url,
)

__all__ = ["STORE_FILE", "RunNotRunning", "RunStore", "StoreError", "UnknownRun",
           "default_store_url", "resolve_store_url"]
