"""The GPU path of DP fine-tuning: CUDA, bf16 autocast, virtual batches (skipped without one).

CI has no GPU; these run where one is (`pytest tests/test_gpu.py` on a CUDA machine).
"""

import pytest
import torch

from consortia.client.trainer import LocalTrainer
from consortia.messages import TrainInstructions
from consortia.privacy.dp import PrivacyLedger
from consortia.tasks import get_task
from consortia.tasks.base import TaskOptions, default_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def dp_round_on_gpu(tmp_path, physical_batch_size):
    task = get_task("reviews-minilm-lora").with_options(
        TaskOptions(max_length=64, train_examples=512, test_examples=128))
    data = task.load_data(None)
    ledger = PrivacyLedger.open(tmp_path, accountant="rdp", delta=1e-5, epsilon_budget=8.0)
    ins = TrainInstructions(run_id="gpu", task=task.name, model_activation="tanh", local_epochs=1,
                            batch_size=128, lr=0.001, momentum=0.0, optimizer="adam", seed=0,
                            dp_enabled=True, max_grad_norm=1.0, noise_multiplier=1.0,
                            planned_rounds=1, grad_sample_mode="ghost",
                            physical_batch_size=physical_batch_size)
    device = default_device()
    torch.manual_seed(0)
    model = task.build_model("tanh")
    before = {k: v.clone() for k, v in task.travelling_weights(model).items()}
    torch.cuda.reset_peak_memory_stats(device)
    report, weights = LocalTrainer("0", task, data.train, ledger, device).train(
        model, ins, server_round=1)
    peak = torch.cuda.max_memory_allocated(device)
    return report, before, weights, peak, task, data, model


def test_a_dp_round_trains_on_the_gpu_with_bf16_and_virtual_batches(tmp_path):
    report, before, weights, peak_pieces, task, data, model = dp_round_on_gpu(tmp_path / "a", 16)
    assert report.status == "trained" and report.steps == 4  # logical steps: 512 / 128
    assert next(model.parameters()).device.type == "cuda"
    changed = [k for k in before if not torch.equal(before[k], weights[k])]
    assert changed, "no travelling tensor changed"
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert 0 < report.epsilon <= 8.0
    metrics = task.evaluate(model, data.test, default_device())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] == metrics["loss"]

    # The same logical batch without virtual batches: same steps and ε, more memory.
    whole, _, _, peak_whole, *_ = dp_round_on_gpu(tmp_path / "b", None)
    assert whole.steps == report.steps and whole.epsilon == pytest.approx(report.epsilon)
    assert peak_pieces < peak_whole, (peak_pieces, peak_whole)


def test_the_reviews_forward_runs_in_bf16_on_the_gpu():
    task = get_task("reviews-minilm-lora").with_options(TaskOptions(max_length=16, train_examples=8,
                                                                    test_examples=8))
    model = task.build_model("tanh").to("cuda")
    batch = task.load_data(None).test.tensors
    seen = []
    hook = model.base_model.model.classifier.modules_to_save["default"].register_forward_hook(
        lambda module, args, out: seen.append(out.dtype))
    logits, _ = task.forward(model, batch, torch.device("cuda"))
    hook.remove()
    assert seen == [torch.bfloat16] and logits.dtype == torch.float32
