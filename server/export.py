"""`consortia export`: a run's final global model as a plain Hugging Face model.

The latest checkpoint's travelling tensors (LoRA adapters and head) are loaded into the
task's model, peft folds the adapters into the base weights (`merge_and_unload`), and
transformers writes the result with its tokenizer, so `from_pretrained(DIR)` loads it
offline with no consortia and no peft. Beside it, consortia-manifest.json says what it
is: task, run, round, the hashes of the base weights, the checkpoint and the exported
weights, the ε each client reported with its δ, and the user-level ε (user_dp).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from consortia.config import validate_config
from consortia.privacy.storage import atomic_write_json
from consortia.server.checkpoint import CheckpointStore
from consortia.server.directory import natural_key
from consortia.server.results import METRICS_FILE, RunRecorder, read_jsonl
from consortia.tasks import get_task
from consortia.tasks.adapters import AdapterTask

FORMAT = "consortia-export/1"
MANIFEST = "consortia-manifest.json"


def privacy_terms(dp: bool, summary: dict[str, Any]) -> dict[str, Any]:
    """The manifest's privacy terms, from `summary` (summary.json's fields, or
    recorded_through's for the exported round): each client's ε with the
    δ it is at (a partner's site.toml sets its own, which need not be the run's `delta`),
    and the user-level ε of the model (user_dp; at the run's δ), None without it."""
    clients = summary.get("clients", [])
    return {"dp": dp, "delta": summary.get("delta"),
            "epsilon_per_client": {c["id"]: c["epsilon"] for c in clients},
            "delta_per_client": {c["id"]: c.get("delta") for c in clients},
            "user_epsilon": summary.get("user_epsilon")}


def recorded_through(results_dir: Path, cfg: Any, server_round: int) -> dict[str, Any]:
    """What summary.json would say of the run's privacy after `server_round` (its δ, each
    client's latest ε with its δ, the user-level ε), from metrics.jsonl and
    participation.jsonl: summary.json is written when a run ends, so during a run it is
    missing, or of an earlier stop, and a checkpoint that does not verify is exported
    from an earlier round than the summary's."""
    recorder = RunRecorder(results_dir)
    recorder.participation = [p for p in read_jsonl(recorder.participation_path)
                              if p["round"] <= server_round]
    row = next((r for r in read_jsonl(recorder.metrics_path) if r["round"] == server_round), {})
    return {"delta": cfg.privacy.delta if cfg.privacy.enabled or cfg.user_dp.enabled else None,
            "clients": sorted(recorder.clients().values(), key=lambda c: natural_key(c["id"])),
            "user_epsilon": row.get("user_epsilon")}


class ExportError(ValueError):
    pass


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path} not found: {what}")
    return json.loads(path.read_text())


def export_run(results_dir: str | Path, out: str | Path) -> Path:
    """Write the merged model, tokenizer and manifest of the run in `results_dir` to `out`."""
    results_dir, out = Path(results_dir), Path(out)
    run = _read_json(results_dir / "run.json", "is this a results directory (--out of a run)?")
    cfg = validate_config(run["config"], str(results_dir / "run.json"))
    task = get_task(cfg.task, cfg.task_options())
    if not isinstance(task, AdapterTask):
        raise ExportError(f"task {cfg.task!r} trains a model from scratch, not a Hugging Face "
                          "model: its weights are in the run's checkpoints/ (safetensors)")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; choose a new --out directory")
    checkpoints = CheckpointStore(results_dir / "checkpoints")
    latest = checkpoints.latest()
    if latest is None:
        raise ExportError(f"{results_dir / 'checkpoints'} holds no checkpoint with valid weights")
    summary_path = results_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    # A round's checkpoint is written before its rows: one whose round is not on record
    # (the run in between, or killed there) is passed over, as --resume does, so the
    # weights are never those of a round whose ε the files do not have yet.
    on_record = [r["round"] for r in read_jsonl(results_dir / METRICS_FILE)
                 if r["round"] <= latest.round]
    if latest.round > 0 and summary.get("rounds_completed") != latest.round \
            and max(on_record, default=0) == latest.round - 1:
        latest = checkpoints.latest(before=latest.round)
        if latest is None:
            raise ExportError(f"{results_dir / 'checkpoints'} holds no checkpoint with valid "
                              "weights of a round on record")
    broken = checkpoints.chain_break(latest)
    if broken is not None:  # the manifest would vouch for a history the files do not hold
        raise ExportError(f"the checkpoints in {results_dir / 'checkpoints'} do not form one "
                          f"chain ({broken}); restore checkpoints/ from a copy")
    # The privacy terms of the exported round: summary.json's when the run ended there,
    # else from the results files (the run goes on, or resumed after a stop).
    recorded = (summary if summary.get("rounds_completed") == latest.round
                else recorded_through(results_dir, cfg, latest.round))
    if cfg.privacy.enabled and latest.round > 0 and not recorded.get("clients"):
        raise ExportError(f"the ε of round {latest.round} cannot be stated: "
                          f"{results_dir / 'participation.jsonl'} has no row up to it (and "
                          "summary.json is not of that round): restore it from a copy (the "
                          "run store keeps its rows too) and export again")

    model = task.build_model(cfg.model.activation)
    base = task.base_sha256(model)
    if latest.manifest.get("base_sha256") != base:
        raise ExportError(f"the run's base weights (sha256 {latest.manifest.get('base_sha256')}) "
                          f"are not the installed model's ({base}); install the model package "
                          "version the run used")
    task.load_travelling_weights(model, {k: torch.from_numpy(v)
                                         for k, v in latest.load_weights().items()})
    task.merged(model).save_pretrained(out)
    task.tokenizer().save_pretrained(out)

    manifest = {
        "format": FORMAT, "task": cfg.task, "run_id": run["run_id"],
        "round": latest.round, "rounds": cfg.rounds,
        "base_sha256": base, "checkpoint_sha256": latest.sha256,
        "weights_sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                           for p in sorted(out.glob("*.safetensors"))},
        **privacy_terms(cfg.privacy.enabled, recorded),
        "lora": {"rank": cfg.model.lora_rank, "alpha": cfg.model.lora_alpha},
        "config": run["config"],
    }
    atomic_write_json(out / MANIFEST, manifest)
    # An export is for sharing; safetensors writes its files 0600 whatever the umask says.
    umask = os.umask(0)
    os.umask(umask)
    for path in out.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)
    return out
