"""Time one optimizer step of a task's model: non-private SGD vs Opacus DP-SGD.

Three modes, each a fresh copy of the same model (same seed) trained with plain SGD:

- ``nonprivate``: forward, backward, ``optimizer.step()``;
- ``hooks``: Opacus per-sample gradients from module hooks (``grad_sample_mode="hooks"``);
- ``ghost``: Opacus ghost clipping (``grad_sample_mode="ghost"``), which computes only
  per-sample gradient *norms* and needs a second backward pass through the wrapped criterion.

Batches are fixed-size (``poisson_sampling=False``), so every mode times the same batch
size. That is fine for timing but is not the sampling DP-SGD's accounting assumes: do not
train private models this way. The batches are built once and kept on the device, so the
timing holds the step alone, not data loading.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable
from itertools import cycle

import torch
from torch.utils.data import DataLoader, TensorDataset

from consortia.tasks import Task, default_device, get_task

MODES = ("nonprivate", "hooks", "ghost")
WARMUP_STEPS = 3
SAMPLES = 4096  # the first few thousand training samples are plenty to cycle through
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LEARNING_RATE = 0.05
SEED = 0

Step = Callable[[], None]


def bench_dp(
    task: str = "fashion-mnist-cnn", batch_size: int = 64, steps: int = 20, repeats: int = 3
) -> dict:
    """Milliseconds per optimizer step in each mode: the median over ``repeats`` of the mean
    over ``steps`` timed steps, after ``WARMUP_STEPS`` untimed ones.

    A mode that fails (a layer ghost clipping does not support, say) is reported as ``None``
    with its exception under ``errors[mode]``; the other modes still run.
    """
    if batch_size < 1 or steps < 1 or repeats < 1:
        raise ValueError(
            f"batch_size, steps and repeats must be >= 1; got {batch_size}, {steps}, {repeats}"
        )
    spec = get_task(task)
    device = default_device()
    torch.set_num_threads(_machine_cores())

    dataset = _first_samples(spec.load_data(None).train, SAMPLES)
    if len(dataset) < batch_size:
        raise ValueError(
            f"task {task!r} has {len(dataset)} training samples, fewer than batch_size {batch_size}"
        )
    batches = [tuple(t.to(device) for t in batch) for batch in _fixed_size_loader(dataset, batch_size)]

    with warnings.catch_warnings():
        # Opacus's backward hooks fire on modules whose inputs need no gradient (the first
        # layer's); torch warns about it, and it is expected here.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        ms, peak_mb, errors = _time_modes(spec, dataset, batch_size, batches, device, steps, repeats)

    model = spec.build_model("tanh")
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "task": task,
        "device": device.type,
        "batch_size": batch_size,
        "steps": steps,
        "params": params,
        "total_params": sum(p.numel() for p in model.parameters()),
        # What one client sends per round (the travelling tensors) vs the whole model.
        "update_bytes": _bytes(spec.travelling_weights(model)),
        "model_bytes": _bytes(model.state_dict()),
        "torch_threads": torch.get_num_threads(),
        "nonprivate_ms": ms["nonprivate"],
        "hooks_ms": ms["hooks"],
        "ghost_ms": ms["ghost"],
        "hooks_over_nonprivate": _ratio(ms["hooks"], ms["nonprivate"]),
        "ghost_over_nonprivate": _ratio(ms["ghost"], ms["nonprivate"]),
        # On a GPU: the most memory a step of each mode took on top of what was resident
        # before it (the three modes' models, the batches); None on CPU.
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpu_resident_mb": _mb(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None,
        "nonprivate_step_peak_mb": peak_mb["nonprivate"],
        "hooks_step_peak_mb": peak_mb["hooks"],
        "ghost_step_peak_mb": peak_mb["ghost"],
        "errors": errors,
    }


def _time_modes(
    spec: Task,
    dataset: TensorDataset,
    batch_size: int,
    batches: list[tuple[torch.Tensor, ...]],
    device: torch.device,
    steps: int,
    repeats: int,
) -> tuple[dict[str, float | None], dict[str, float | None], dict[str, str]]:
    """Median ms per step for each mode (None where it failed), its peak GPU memory per
    step in MB (None on CPU), and each failure's message."""
    errors: dict[str, str] = {}
    step_fns: dict[str, Step] = {}
    for mode in MODES:
        try:
            step = _make_step(mode, spec, dataset, batch_size, batches, device)
            for _ in range(WARMUP_STEPS):
                step()
            step_fns[mode] = step
        except Exception as err:  # report the failing mode, keep timing the others
            errors[mode] = f"{type(err).__name__}: {err}"

    # Modes take turns within each repeat, so a burst of load from other processes on a
    # shared machine lands on all of them rather than on one.
    samples: dict[str, list[float]] = {mode: [] for mode in step_fns}
    peaks: dict[str, float] = {}
    for _ in range(repeats):
        for mode in list(step_fns):
            try:
                before = _reset_peak(device)
                samples[mode].append(_mean_step_ms(step_fns[mode], steps, device))
                if device.type == "cuda":
                    peak = _mb(torch.cuda.max_memory_allocated(device) - before)
                    peaks[mode] = max(peaks.get(mode, 0.0), peak)
            except Exception as err:
                del step_fns[mode], samples[mode]
                errors[mode] = f"{type(err).__name__}: {err}"

    ms = {mode: round(statistics.median(samples[mode]), 3) if mode in samples else None
          for mode in MODES}
    return ms, {mode: peaks.get(mode) for mode in MODES}, errors


def _reset_peak(device: torch.device) -> int:
    """Start a new peak-memory window; the bytes allocated now (0 on CPU)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _mb(n_bytes: int) -> float:
    return round(n_bytes / 2**20, 1)


def _make_step(
    mode: str,
    spec: Task,
    dataset: TensorDataset,
    batch_size: int,
    batches: list[tuple[torch.Tensor, ...]],
    device: torch.device,
) -> Step:
    torch.manual_seed(SEED)
    model = spec.build_model("tanh").to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                lr=LEARNING_RATE)
    criterion: Callable = spec.criterion()

    if mode != "nonprivate":
        from opacus import PrivacyEngine

        private = dict(
            module=model,
            optimizer=optimizer,
            data_loader=_fixed_size_loader(dataset, batch_size),
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=MAX_GRAD_NORM,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure-RNG and accountant notices, not results
            if mode == "ghost":
                # Ghost clipping returns a wrapped criterion whose backward() runs both passes.
                private["criterion"] = criterion
                model, optimizer, criterion, _ = PrivacyEngine().make_private(**private)
            else:
                model, optimizer, _ = PrivacyEngine().make_private(**private)
    model.train()
    batch_stream = cycle(batches)
    if mode != "nonprivate":  # as the trainer trains under DP (client/trainer.py)
        from consortia.client.trainer import fp32_trainable_layers_hooks

        fp32_trainable_layers_hooks(model)  # for the model's life: its hooks go with it

    def step() -> None:
        batch = next(batch_stream)
        optimizer.zero_grad(set_to_none=True)
        criterion(*spec.forward(model, batch, device)).backward()
        optimizer.step()

    return step


def _mean_step_ms(step: Step, steps: int, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    return (time.perf_counter() - start) * 1000.0 / steps


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _first_samples(dataset: TensorDataset, n: int) -> TensorDataset:
    return TensorDataset(*(t[:n] for t in dataset.tensors))


def _fixed_size_loader(dataset: TensorDataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=True)


def _machine_cores() -> int:
    # The cores this process may run on, which can be fewer than the machine has.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 2)
