"""Checkpoints: safetensors weights plus a JSON manifest, one pair per round.

The manifest records the round, the SHA-256 of the weights file, the parent
checkpoint's hash (a chain back to the initial model) and the round's metrics. Both
files are written atomically, weights first, so a manifest only ever names complete
weights; `latest()` also re-hashes the weights before trusting them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from consortia.privacy.storage import atomic_write_bytes, atomic_write_json

FORMAT = "consortia-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    round: int
    sha256: str
    parent_sha256: str | None
    weights_path: Path
    manifest: dict[str, Any]

    def load_weights(self) -> dict[str, np.ndarray]:
        return load_safetensors(self.weights_path.read_bytes())

    @property
    def state_path(self) -> Path | None:
        """The server optimizer's state beside the weights (see CheckpointStore.save)."""
        state = self.manifest.get("state_arrays")
        return self.weights_path.parent / state["file"] if state else None

    def state_problem(self) -> str | None:
        """Why the optimizer state this checkpoint names cannot be used, or None."""
        path = self.state_path
        if path is None:
            return None
        if not path.is_file():
            return f"state {path.name} missing"
        if hashlib.sha256(path.read_bytes()).hexdigest() != self.manifest["state_arrays"]["sha256"]:
            return f"state {path.name} does not match its hash"
        return None

    def load_state_arrays(self) -> dict[str, np.ndarray]:
        """The server optimizer's state saved with this checkpoint ({} if none)."""
        path = self.state_path
        return load_safetensors(path.read_bytes()) if path is not None else {}


def weights_bytes(weights: dict[str, np.ndarray]) -> bytes:
    """The checkpoint file's bytes (safetensors); their SHA-256 names the checkpoint."""
    return save_safetensors({k: np.ascontiguousarray(v) for k, v in weights.items()})


class CheckpointStore:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._last: Checkpoint | None = None
        self.problems: list[str] = []  # what the last all() / latest() passed over, and why

    def _paths(self, server_round: int) -> tuple[Path, Path]:
        stem = self.directory / f"round-{server_round:05d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def save(self, server_round: int, weights: dict[str, np.ndarray],
             metrics: dict[str, Any], extra: dict[str, Any] | None = None,
             state_arrays: dict[str, np.ndarray] | None = None) -> Checkpoint:
        """`state_arrays`: the server optimizer's state (a momentum, moments), which a
        resume needs to go on as the run would have; written beside the weights, before
        the manifest that names it with its hash."""
        # The parent is the checkpoint of the rounds before this one: on a resume, not a
        # newer one left by the stopped process (its round runs again, this save replaces it).
        parent = self._last if self._last is not None and self._last.round < server_round \
            else self.latest(before=server_round)
        data = weights_bytes(weights)
        digest = hashlib.sha256(data).hexdigest()
        weights_path, manifest_path = self._paths(server_round)
        atomic_write_bytes(weights_path, data)
        manifest = {
            "format": FORMAT, "round": server_round, "sha256": digest,
            "parent_sha256": parent.sha256 if parent else None,
            "weights": weights_path.name, "created_at": time.time(),
            "metrics": metrics, **(extra or {}),
        }
        if state_arrays:
            state_path = weights_path.with_suffix(".state.safetensors")
            state = weights_bytes(state_arrays)
            atomic_write_bytes(state_path, state)
            manifest["state_arrays"] = {"file": state_path.name,
                                        "sha256": hashlib.sha256(state).hexdigest()}
        atomic_write_json(manifest_path, manifest)
        self._last = Checkpoint(server_round, digest, manifest["parent_sha256"], weights_path,
                                manifest)
        return self._last

    def all(self) -> list[Checkpoint]:
        """Every checkpoint whose manifest can be read; what cannot is in `problems`."""
        found, self.problems = [], []
        for manifest_path in sorted(self.directory.glob("round-*.json")):
            try:
                manifest = json.loads(manifest_path.read_text())
                weights_path = self.directory / manifest["weights"]
                found.append(Checkpoint(manifest["round"], manifest["sha256"],
                                        manifest["parent_sha256"], weights_path, manifest))
            except (OSError, ValueError, KeyError, TypeError) as err:
                self.problems.append(f"{manifest_path.name}: manifest unreadable ({err!r})")
        return sorted(found, key=lambda c: c.round)

    def chain_break(self, ckpt: Checkpoint) -> str | None:
        """Where the chain of manifests from `ckpt` back to round 0 contradicts itself, or
        None: each checkpoint must name as parent the hash the previous round's manifest
        records (round 0: none). Manifests only (the weights of the newest are checked by
        `latest`); a round whose manifest is gone leaves that link unchecked, since nothing
        there contradicts it. A break means checkpoints/ is not one run's history: a
        manifest edited, or files from another run mixed in."""
        by_round = {c.round: c for c in self.all()}
        for r in range(ckpt.round, -1, -1):
            child = by_round.get(r)
            if child is None:
                continue
            parent = by_round.get(r - 1)
            if r == 0 and child.parent_sha256 is not None:
                return (f"round-00000.json names a parent ({child.parent_sha256[:16]}...), but "
                        "round 0 is the initial model")
            if parent is not None and child.parent_sha256 != parent.sha256:
                return (f"round-{r:05d}.json names parent {str(child.parent_sha256)[:16]}..., "
                        f"but round {r - 1}'s checkpoint is {parent.sha256[:16]}...")
        return None

    def latest(self, before: int | None = None) -> Checkpoint | None:
        """The newest checkpoint whose weights match their recorded hash (of a round before
        `before`, if given). What was passed over on the way (newer ones that do not
        verify) is in `problems`."""
        checkpoints = [c for c in self.all() if before is None or c.round < before]
        for ckpt in reversed(checkpoints):
            if ckpt.weights_path.is_file() and \
                    hashlib.sha256(ckpt.weights_path.read_bytes()).hexdigest() == ckpt.sha256:
                state_problem = ckpt.state_problem()
                if state_problem is None:
                    return ckpt
                self.problems.append(f"round {ckpt.round}: {state_problem}")
                continue
            why = "missing" if not ckpt.weights_path.is_file() else "do not match their hash"
            self.problems.append(f"round {ckpt.round}: weights {ckpt.weights_path.name} {why}")
        return None
