"""A run's results directory: created for a new run, checked when a run is resumed.

Shared by simulations (`consortia sim run`) and deployments (`consortia server start`):
run.json holds the run's id and resolved config, so `--resume` continues the same run
and refuses a config that differs from it.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from consortia.config import RunConfig, config_to_dict, validate_config
from consortia.privacy.storage import atomic_write_json
from consortia.server.checkpoint import CheckpointStore
from consortia.server.results import METRICS_FILE, PARTICIPATION_FILE, SUMMARY_FILE, read_jsonl

if TYPE_CHECKING:
    from consortia.server.store import RunStore

RUN_FILE = "run.json"
CHECKPOINTS_DIR = "checkpoints"  # in a results directory: server/checkpoint.py


class ResultsDirError(ValueError):
    pass


def _differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every leaf that differs."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append((f"{prefix}{key}", a, b))
    return found


def config_differences(cfg: RunConfig, stored: dict, where: str) -> str | None:
    """'key (old stored, new now), ...' for every key where `cfg` differs from the config
    stored in a results directory's run.json (`where`), or None when they agree. The stored
    config is read through today's schema, so keys added since (with their defaults) do not
    count as differences."""
    old, new = config_to_dict(validate_config(stored, where)), config_to_dict(cfg)
    if old == new:
        return None
    return ", ".join(f"{key} ({was!r} stored, {now!r} now)"
                     for key, was, now in _differences(old, new))


# Where the user sets a run's results directory, for messages that ask for another one:
# `sim run --out`; a deployment's server.toml (`server start` has no --out).
RESULTS_DIR_SETTING = {"simulation": "--out", "deployment": "[server] out in server.toml"}


def prepare_out_dir(cfg: RunConfig, out_dir: Path, resume: bool, kind: str = "simulation"
                    ) -> str:
    """Create the results directory, or check that a resumed run is the same run."""
    run_file = out_dir / RUN_FILE
    setting = RESULTS_DIR_SETTING[kind]
    if run_file.exists():
        stored = json.loads(run_file.read_text())
        if not resume:
            raise ResultsDirError(
                f"{out_dir} already holds run {stored['run_id']}; pass --resume to continue "
                f"it, or choose another results directory ({setting})")
        diff = config_differences(cfg, stored["config"], str(run_file))
        if diff is not None:
            # No option starts a run from another's weights: a simulation's new run would
            # account its clients' privacy from zero (their ledgers live in the old --out).
            raise ResultsDirError(
                f"--resume with a config that differs from the stored run in: {diff}; a "
                "resumed run is the same run: resume it with the config it was started with "
                f"(the \"config\" in {run_file}), or start a new run, from a new model, in "
                "another results directory")
        checkpoints = CheckpointStore(out_dir / CHECKPOINTS_DIR)
        # Resuming would silently start again from round 0, unless the run never began.
        if checkpoints.latest() is None and not never_began(out_dir):
            raise no_checkpoint_verifies(checkpoints.directory, checkpoints.problems, setting)
        return stored["run_id"]
    if resume:
        raise ResultsDirError(f"--resume: {out_dir} holds no run to resume")
    run_id = uuid.uuid4().hex[:12]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file there or on its path, a folder this user cannot make
        raise ResultsDirError(f"{out_dir} cannot be the results directory ({err.strerror or err}"
                              f"); accepted: a directory this user can create or write "
                              f"({setting})") from None
    atomic_write_json(run_file, {"run_id": run_id, "config": config_to_dict(cfg)})
    return run_id


def no_checkpoint_verifies(directory: Path, problems: list[str],
                           setting: str) -> ResultsDirError:
    """The --resume error for a run that began but has no checkpoint to continue from
    (`problems`: what CheckpointStore passed over; `setting`: where the results
    directory is set, RESULTS_DIR_SETTING)."""
    found = "; ".join(problems) or "none there"
    return ResultsDirError(f"--resume: no checkpoint in {directory} verifies ({found}); the "
                           "run cannot continue where it stopped: restore checkpoints/ from a "
                           f"copy, or start a new run in another results directory ({setting})")


def never_began(out_dir: Path) -> bool:
    """No round of the run in `out_dir` began: no checkpoint manifest is there (round 0's,
    written before any round is sent, is written after its weights), and no round is
    recorded. A run killed while it started (Ray, the SuperLink) leaves this: nothing is
    lost by starting it, and its --resume does."""
    checkpoints = out_dir / CHECKPOINTS_DIR
    if checkpoints.is_dir() and any(checkpoints.glob("round-*.json")):
        return False
    return not any((out_dir / name).is_file() and (out_dir / name).stat().st_size > 0
                   for name in (METRICS_FILE, PARTICIPATION_FILE))


def run_finished(cfg: RunConfig, out_dir: Path) -> bool:
    """Every round of the run is checkpointed and its summary, written after the last
    round, says so: a resume has nothing to run. A run stopped early has its summary, but
    not its last rounds; one killed after its last checkpoint, before its summary, may
    still have a stopped run's summary, of fewer rounds."""
    latest = CheckpointStore(out_dir / CHECKPOINTS_DIR).latest()
    if latest is None or latest.round < cfg.rounds:
        return False
    try:
        summary = json.loads((out_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):  # none yet (or not one a finished run wrote)
        return False
    return isinstance(summary, dict) and summary.get("rounds_completed", 0) >= cfg.rounds


def record_finished_run(store: RunStore, cfg: RunConfig, out_dir: Path, run_id: str,
                        kind: str = "simulation") -> bool:
    """A finished run that `store` does not hold whole (a damaged store file moved aside,
    or a new store.url): record it there from its results directory, as it finished
    (its rounds, participation and checkpoints; times of recording are now). True when it
    did; a store that has the run completed is left as it is."""
    from consortia.server.store import UnknownRun

    try:
        known = store.get_run(run_id)
    except UnknownRun:
        known = None
    rows = read_jsonl(out_dir / METRICS_FILE)
    last = max((r["round"] for r in rows), default=0)
    if known is not None and known["status"] == "completed" and known["rounds_completed"] >= last:
        return False
    participation = read_jsonl(out_dir / PARTICIPATION_FILE)
    store.start_run(run_id, task=cfg.task, rounds_total=cfg.rounds, config=config_to_dict(cfg),
                    out_dir=out_dir.resolve(), kind=kind)
    store.replace_rounds(run_id, last, rows, participation)
    for ckpt in CheckpointStore(out_dir / CHECKPOINTS_DIR).all():
        store.record_checkpoint(run_id, ckpt.round, ckpt.sha256, ckpt.parent_sha256,
                                ckpt.weights_path.resolve(), ckpt.manifest.get("created_at"))
    store.audit(run_id, "run-recorded-from-files",
                f"the store did not hold the finished run whole: recorded from {out_dir.resolve()} "
                f"({METRICS_FILE}, {PARTICIPATION_FILE}, {CHECKPOINTS_DIR}/)")
    store.finish_run(run_id, "completed")
    return True
