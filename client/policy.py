"""A site's policy: what it accepts to train, and its local audit log of every request.

The policy binds whatever the server asks: a request outside it is refused with a typed
reply (TrainReport status "refused-policy", recorded by the server like a budget
refusal) and nothing is trained. Every train request, accepted or not, is written to
the site's audit log (JSON lines: time, run, round, what was asked, what was decided),
on the site's own disk; the server never sees the log.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from consortia.messages import TrainInstructions

AUDIT_LOG = "audit.jsonl"


class SitePolicy(BaseModel):
    """The [policy] section of site.toml."""

    # Strict TOML types and finite numbers, as the rest of site.toml (site_config._Section):
    # `epsilon_budget = inf` would be no budget at all, `require_dp = "no"` a string.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    tasks: list[str] = Field(min_length=1, description="task names this site trains")
    base_model_sha256: list[str] = Field(
        default_factory=list,
        description="SHA-256 of the base (round-0) models this site accepts; empty: any")
    epsilon_budget: float = Field(gt=0, description="this site's ε budget, across all rounds")
    delta: float = Field(gt=0, lt=1)
    accountant: Literal["rdp", "prv"] = "rdp"
    min_noise_multiplier: float = Field(
        0.0, ge=0, description="the smallest DP-SGD noise multiplier σ this site accepts")
    max_rounds: int | None = Field(
        None, ge=1, description="the most rounds this site trains in one run; unset: no limit")
    require_dp: bool = Field(True, description="refuse any request without DP")
    require_secagg: bool = Field(False, description="refuse any request without secure aggregation")
    max_epsilon_if_secagg_fails: float | None = Field(
        None, gt=0, description="distributed DP: the most ε this site accepts from its own "
        "noise shares alone, should secure aggregation fail; unset: no cap")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str]) -> list[str]:
        from consortia.tasks import TASKS  # late: tasks import torch

        unknown = [t for t in value if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; accepted: {', '.join(sorted(TASKS))}")
        return value

    @field_validator("base_model_sha256")
    @classmethod
    def _hex_digests(cls, value: list[str]) -> list[str]:
        bad = [h for h in value if len(h) != 64 or any(c not in "0123456789abcdef" for c in h)]
        if bad:
            raise ValueError(f"{bad} are not SHA-256 digests; accepted: 64 lowercase hex digits")
        return value

    @model_validator(mode="after")
    def _dp_terms(self) -> SitePolicy:
        if self.min_noise_multiplier > 0 and not self.require_dp:
            raise ValueError("min_noise_multiplier > 0 needs require_dp = true: a request "
                             "without DP would bypass it")
        return self

    def refusal(self, ins: TrainInstructions, *, secagg: bool, noise_multiplier: float | None,
                rounds_trained: int) -> str | None:
        """Why this request is outside the policy, or None when it is within it.

        `noise_multiplier` is the σ this round would train with (the server's, or the one
        the client derives from its budget); `rounds_trained` counts this run's rounds the
        site has already trained (from its audit log).
        """
        if ins.task not in self.tasks:
            return f"task {ins.task!r} is not in this site's policy (accepted: {self.tasks})"
        if self.base_model_sha256 and ins.base_model_sha256 not in self.base_model_sha256:
            return (f"base model {ins.base_model_sha256 or '(not stated)'} is not one this "
                    "site's policy accepts")
        if self.require_dp and not ins.dp_enabled:
            return "this site's policy requires differential privacy and the request has it off"
        if self.require_secagg and not secagg:
            return "this site's policy requires secure aggregation and the request has it off"
        if ins.dp_enabled and noise_multiplier is not None \
                and noise_multiplier < self.min_noise_multiplier:
            return (f"noise multiplier {noise_multiplier:.4g} is below this site's minimum "
                    f"{self.min_noise_multiplier:.4g}")
        return self.max_rounds_refusal(ins.run_id, rounds_trained)

    def max_rounds_refusal(self, run_id: str, rounds_trained: int) -> str | None:
        """Why a site that has trained `rounds_trained` rounds of `run_id` trains no more of
        it (max_rounds), or None."""
        if self.max_rounds is not None and rounds_trained >= self.max_rounds:
            return (f"this site has trained {rounds_trained} rounds of run {run_id}, its "
                    f"policy's maximum (max_rounds = {self.max_rounds})")
        return None


def asked(ins: TrainInstructions, server_round: int, secagg: bool) -> dict[str, Any]:
    """What a request asked, as the audit log records it."""
    return {"task": ins.task, "base_model_sha256": ins.base_model_sha256,
            "dp": ins.dp_enabled, "noise_multiplier": ins.noise_multiplier,
            "max_grad_norm": ins.max_grad_norm, "local_epochs": ins.local_epochs,
            "batch_size": ins.batch_size, "planned_rounds": ins.planned_rounds,
            "secagg": secagg, "user_dp_clip": ins.user_clip, "server_round": server_round}


class AuditLog:
    """The site's audit log: one JSON line per train request, appended and fsynced."""

    def __init__(self, state_dir: str | Path):
        self.path = Path(state_dir) / AUDIT_LOG

    def record(self, *, run: str, server_round: int, asked: dict[str, Any],
               decision: str, reason: str = "", **extra: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = {"time": time.time(), "run": run, "round": server_round, "asked": asked,
                "decision": decision, "reason": reason, **extra}
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+b") as f:
            # A line a crash cut short stays on its own line: this one is not glued to it.
            cut = f.seek(0, os.SEEK_END) > 0 and os.pread(fd, 1, f.tell() - 1) != b"\n"
            f.write((b"\n" if cut else b"") + json.dumps(line, sort_keys=True).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def _lines(self) -> list[tuple[int, dict[str, Any] | None]]:
        """(line number from 1, its entry, or None where it cannot be read)."""
        if not self.path.exists():
            return []
        read = []
        for number, text in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if text.strip():
                try:
                    entry = json.loads(text)
                except json.JSONDecodeError:
                    entry = None
                read.append((number, entry if isinstance(entry, dict) else None))
        return read

    def entries(self) -> list[dict[str, Any]]:
        """The log's entries, oldest first. A line a crash cut short is left out: it is
        written before the request's answer leaves, so that answer never left."""
        return [entry for _, entry in self._lines() if entry is not None]

    def damaged_lines(self) -> list[int]:
        """Line numbers (from 1) that cannot be read: cut short by a crash, or edited."""
        return [number for number, entry in self._lines() if entry is None]

    def rounds_trained(self, run: str) -> int:
        """Distinct rounds of `run` this site trained (a round retried after a server
        restart counts once)."""
        return len({e["round"] for e in self.entries()
                    if e["run"] == run and e["decision"] == "trained"})
