"""The run store's tables (SQLAlchemy 2 declarative models).

Typed columns hold what the console sorts, filters and draws; `metrics` and `report`
hold the exact row written to metrics.jsonl / participation.jsonl, so the files can be
rendered from the store and a test can compare them byte for byte. Times are UNIX
seconds (float). Node ids are strings: Flower's are unsigned 64-bit, beyond SQLite's
signed INTEGER.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

RUN_STATUSES = ("running", "completed", "stopped", "failed")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # simulation | deployment
    task: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # one of RUN_STATUSES
    rounds_total: Mapped[int] = mapped_column(Integer)
    rounds_completed: Mapped[int] = mapped_column(Integer, default=0)
    out_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    config: Mapped[dict[str, Any]]
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    stop_requested_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    stop_requested_by: Mapped[str | None] = mapped_column(String(128), nullable=True)


class Round(Base):
    __tablename__ = "rounds"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    clients_sampled: Mapped[int] = mapped_column(Integer, default=0)
    clients_trained: Mapped[int] = mapped_column(Integer, default=0)
    clients_refused: Mapped[int] = mapped_column(Integer, default=0)
    clients_rejected: Mapped[int] = mapped_column(Integer, default=0)
    clients_failed: Mapped[int] = mapped_column(Integer, default=0)
    epsilon_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    epsilon_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    user_epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)
    secagg_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    secagg_dropped: Mapped[int | None] = mapped_column(Integer, nullable=True)
    secagg_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    recorded_at: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]]  # the metrics.jsonl row, exactly


class Participation(Base):
    __tablename__ = "participation"
    __table_args__ = (Index("ix_participation_run_round", "run_id", "round"),
                      Index("ix_participation_run_client", "run_id", "client_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    round: Mapped[int] = mapped_column(Integer)
    client_id: Mapped[str] = mapped_column(String(128))
    node_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # trained | refused-budget | refused-policy | rejected | failed (a dropout is `failed`)
    status: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text, default="")
    epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)
    epsilon_budget: Mapped[float | None] = mapped_column(Float, nullable=True)
    noise_multiplier: Mapped[float | None] = mapped_column(Float, nullable=True)
    sample_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    num_examples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    report: Mapped[dict[str, Any]]  # the participation.jsonl row, exactly


class CheckpointRecord(Base):
    __tablename__ = "checkpoints"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    parent_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    path: Mapped[str | None] = mapped_column(Text, nullable=True)  # the weights file
    created_at: Mapped[float] = mapped_column(Float)


class AuditEvent(Base):
    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_run", "run_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    at: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(16))  # operator | protocol
    actor: Mapped[str] = mapped_column(String(128))
    event: Mapped[str] = mapped_column(String(64))
    round: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")
