"""A run's results directory: metrics.jsonl, participation.jsonl and summary.json.

metrics.jsonl has one object per round; participation.jsonl one per (round, client)
with what the client did and reported; summary.json is rendered from both, so anyone
can recompute each client's ε from (noise_multiplier, sample_rate, steps) with an
independent accountant. Lines are appended after the round's checkpoint is written; on
resume, rows past the checkpoint are dropped, so the files always match the weights (and
a checkpoint whose round has no row, the process killed between the two, is passed over:
its round runs again).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consortia.privacy.storage import atomic_write_bytes, atomic_write_json
from consortia.server.directory import natural_key
from consortia.server.validation import OUTCOMES, ReplyOutcome

if TYPE_CHECKING:
    from consortia.server.store import RunStore

METRICS_FILE = "metrics.jsonl"
PARTICIPATION_FILE = "participation.jsonl"
SUMMARY_FILE = "summary.json"
# Where summary.json lists the rounds of each outcome, per client.
ROUNDS_FIELD = {"trained": "rounds_participated", "refused-budget": "refused_rounds",
                "refused-policy": "refused_rounds", "rejected": "rejected_rounds",
                "failed": "failed_rounds"}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash ends the file
    return rows


class RunRecorder:
    """Writes the results files; with a run store (`store`, `run_id`) mirrors each row into it."""

    def __init__(self, out_dir: str | Path, store: RunStore | None = None,
                 run_id: str | None = None):
        if store is not None and run_id is None:
            raise ValueError("RunRecorder: a store needs the run_id to record under")
        self.out_dir = Path(out_dir)
        self.metrics_path = self.out_dir / METRICS_FILE
        self.participation_path = self.out_dir / PARTICIPATION_FILE
        self.rows: list[dict[str, Any]] = []
        self.participation: list[dict[str, Any]] = []
        # Each client's latest reported ε, kept as rounds are recorded (clients() would
        # re-read every round's participation to find it).
        self.epsilon: dict[str, float] = {}
        self.store = store
        self.run_id = run_id

    def _note_epsilons(self, participation: list[dict[str, Any]]) -> None:
        for p in participation:
            if p.get("epsilon") is not None:
                self.epsilon[p["client_id"]] = p["epsilon"]

    def _kept(self, last_round: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The metrics and participation rows recorded up to `last_round`: the files', or
        the run store's when the files lost rows (deleted, cut short, a line unreadable:
        read_jsonl ends a file there)."""
        rows = [r for r in read_jsonl(self.metrics_path) if r["round"] <= last_round]
        participation = [p for p in read_jsonl(self.participation_path)
                         if p["round"] <= last_round]
        if self.store is not None and last_round > 0:
            stored = [r for r in self.store.metrics_rows(self.run_id) if r["round"] <= last_round]
            stored_participation = [p for p in self.store.participation_rows(self.run_id)
                                    if p["round"] <= last_round]
            if len(stored) > len(rows) or (len(stored) == len(rows)
                                           and len(stored_participation) > len(participation)):
                rows, participation = stored, stored_participation
        return rows, participation

    def recorded_through(self, last_round: int) -> int:
        """The last round up to `last_round` whose metrics row was recorded (0 if none). A
        round's checkpoint is written before its rows: a process killed between the two
        leaves a checkpoint newer than this."""
        return max((r["round"] for r in self._kept(last_round)[0]), default=0)

    def restore(self, last_round: int) -> None:
        """Keep what was recorded up to `last_round` (the checkpoint being resumed). A file
        that lost rows (deleted, cut short) is rebuilt from the run store, which keeps
        each row verbatim."""
        self.rows, self.participation = self._kept(last_round)
        self.epsilon = {}
        self._note_epsilons(self.participation)
        self._rewrite(self.metrics_path, self.rows)
        self._rewrite(self.participation_path, self.participation)
        if self.store is not None:  # the store mirrors the files
            self.store.replace_rounds(self.run_id, last_round, self.rows, self.participation)

    @staticmethod
    def _rewrite(path: Path, rows: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write_bytes(path, text.encode())

    @staticmethod
    def _append(path: Path, rows: list[dict[str, Any]]) -> None:
        with path.open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def clients(self) -> dict[str, dict[str, Any]]:
        """Per client, the latest report and its participation, from participation.jsonl."""
        clients: dict[str, dict[str, Any]] = {}
        for p in self.participation:
            c = clients.setdefault(p["client_id"], {
                "id": p["client_id"], "epsilon": None, "epsilon_if_secagg_fails": None,
                "epsilon_budget": None, "delta": None,
                "noise_multiplier": None, "noise_floor": None, "sample_rate": None, "steps": 0,
                "accountant": None,
                "rounds_participated": [], "refused_rounds": [], "rejected_rounds": [],
                "failed_rounds": []})
            c[ROUNDS_FIELD[p["status"]]].append(p["round"])
            for field in ("epsilon", "epsilon_if_secagg_fails", "epsilon_budget", "delta",
                          "noise_multiplier", "noise_floor", "sample_rate", "accountant",
                          "privacy_mode"):
                if p.get(field) is not None:
                    c[field] = p[field]
            if p.get("steps"):
                c["steps"] = p["steps"]
        return clients

    def record_round(self, server_round: int, metrics: dict[str, Any],
                     outcomes: list[ReplyOutcome], duration_s: float,
                     checkpoint_sha256: str) -> dict[str, Any]:
        participation = []
        for o in outcomes:
            entry = {"round": server_round, "client_id": o.client_id, "node_id": o.node_id,
                     "status": o.status, "reason": o.reason}
            if o.report is not None:
                entry.update(o.report.model_dump(exclude={"client_id", "status", "reason"}))
            participation.append(entry)
        self.participation.extend(participation)
        self._append(self.participation_path, participation)
        self._note_epsilons(participation)

        count = {s: sum(o.status == s for o in outcomes) for s in OUTCOMES}
        epsilons = list(self.epsilon.values())
        row = {
            "round": server_round, **metrics,
            "clients_sampled": len(outcomes),
            "clients_trained": count["trained"],
            "clients_refused": count["refused-budget"] + count["refused-policy"],
            "clients_rejected": count["rejected"],
            "clients_failed": count["failed"],
            "epsilon_max": max(epsilons) if epsilons else None,
            "epsilon_mean": statistics.fmean(epsilons) if epsilons else None,
            "duration_s": round(duration_s, 4),
            "checkpoint_sha256": checkpoint_sha256,
        }
        self.rows.append(row)
        self._append(self.metrics_path, [row])
        if self.store is not None:  # the store mirrors the files
            self.store.record_round(self.run_id, row, participation)
        return row

    def write_summary(self, *, task: str, rounds: int, delta: float | None,
                      config: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        last = self.rows[-1] if self.rows else {}
        summary = {
            "task": task, "rounds": rounds, "rounds_completed": len(self.rows),
            "final_accuracy": last.get("accuracy"), "final_loss": last.get("loss"),
            "delta": delta, "config": config,
            "clients": sorted(self.clients().values(), key=lambda c: natural_key(c["id"])),
            **(extra or {}),
        }
        atomic_write_json(self.out_dir / SUMMARY_FILE, summary)
        return summary

