"""The run store (SQLAlchemy): runs, rounds, participation, ε, checkpoints, audit log."""

from consortia.server.store.store import (
    LOST_AFTER_S,
    STORE_FILE,
    AmbiguousRun,
    Heartbeat,
    RunNotRunning,
    RunStore,
    StoreError,
    UnknownRun,
    default_store_url,
    mark_interrupted,
    resolve_store_url,
)

__all__ = ["LOST_AFTER_S", "STORE_FILE", "AmbiguousRun", "Heartbeat", "RunNotRunning", "RunStore",
           "StoreError", "UnknownRun", "default_store_url", "mark_interrupted", "resolve_store_url"]
