"""What a task is: a model factory, a data loader, and train/eval steps. Nothing more.

A task also says which of its model's tensors travel between server and clients
(`travelling_weights`): the whole state dict for a model trained from scratch, only the
adapters and head for a pretrained model fine-tuned with LoRA (tasks/adapters.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

GradSampleMode = Literal["hooks", "ghost"]


def default_device() -> torch.device:
    """Where a task's model trains and evaluates: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class WeightsMismatch(ValueError):
    """Weights that do not fit a task's model: unknown, missing or wrongly shaped tensors."""


@dataclass(frozen=True)
class TaskOptions:
    """Run-level choices a task may use (`model.*`, `train_examples`, `test_examples`)."""

    activation: str = "tanh"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    max_length: int = 64  # tokens per example (text tasks)
    train_examples: int | None = None  # None: the whole training set
    test_examples: int | None = None  # None: the whole test set


@dataclass(frozen=True)
class TaskData:
    """A task's full training set (partitioned across clients) and held-out test set.

    `natural_clients` is set by tasks whose data comes already split by its owners (one
    client per speaker, say): client i holds the training rows `natural_clients[i]`.
    """

    train: TensorDataset
    test: TensorDataset
    natural_clients: tuple[np.ndarray, ...] | None = None

    @property
    def train_labels(self) -> np.ndarray:
        return self.train.tensors[-1].numpy()  # labels come last in every task's rows


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    build_model: Callable[..., nn.Module]
    load_data: Callable[[str | None], TaskData]
    # Opacus's mode when the config says "auto": ghost clipping where the task's trainable
    # layers support it (it is faster for sequence models), per-sample hooks otherwise.
    grad_sample_mode: GradSampleMode = "hooks"
    natural_partition: bool = False  # clients are given by the data (partition.kind = "natural")
    options: TaskOptions = field(default_factory=TaskOptions)
    # Rebuilds the task for other options; tasks that use none keep the default (self).
    configure: Callable[[TaskOptions], Task] | None = None
    # The [model] keys the task is built with; another key set away from its default is
    # refused at start (config.RunConfig), since it would be recorded but change nothing.
    model_keys: tuple[str, ...] = ("activation",)
    # What one record is, for a partner preparing its own data (and the record check's hint).
    records: str = ("(features, label): features as the model takes them, float32; the label "
                    "a class index, int64")

    def with_options(self, options: TaskOptions) -> Task:
        """The task for a run's `options`. A task without its own `configure` gets
        `train_examples` / `test_examples` here: a fixed subset of each set (SubsetLoader)."""
        if self.configure is not None:
            return self.configure(options)
        load = self.load_data.load if isinstance(self.load_data, SubsetLoader) else self.load_data
        if options.train_examples is not None or options.test_examples is not None:
            load = SubsetLoader(load, options.train_examples, options.test_examples)
        return dataclasses.replace(self, options=options, load_data=load)

    # --- training -----------------------------------------------------------------------
    def criterion(self) -> nn.Module:
        """The loss, reduction "mean" (Opacus's ghost clipping asks it per sample)."""
        return nn.CrossEntropyLoss()

    def forward(self, model: nn.Module, batch: tuple[torch.Tensor, ...],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs, targets) of one batch, as the criterion takes them."""
        x, y = (t.to(device, non_blocking=True) for t in batch)
        return model(x), y

    def train_step(self, model: nn.Module, batch: tuple[torch.Tensor, ...],
                   device: torch.device, criterion: Callable | None = None) -> torch.Tensor:
        """Loss on one batch; the trainer calls backward and the optimizer step."""
        return (criterion or self.criterion())(*self.forward(model, batch, device))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: TensorDataset, device: torch.device,
                 batch_size: int = 1024) -> dict[str, float]:
        model.eval()
        loss_sum, correct, seen = 0.0, 0, 0
        for batch in DataLoader(dataset, batch_size=batch_size):
            logits, y = self.forward(model, batch, device)
            loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(dim=1) == y).sum().item()
            seen += len(y)
        model.train()
        return {"loss": loss_sum / seen, "accuracy": correct / seen}

    # --- what travels -------------------------------------------------------------------
    def travelling_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors the server and clients exchange, keyed by name (here: all of them)."""
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def load_travelling_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Put travelling tensors into `model`; WeightsMismatch if they do not fit it."""
        check_fits(model.state_dict(), weights)  # no copy: only names and shapes are read
        model.load_state_dict(weights, strict=False)

    def base_sha256(self, model: nn.Module) -> str | None:
        """The hash of the frozen pretrained weights the update applies to; None: no base."""
        return None


SUBSET_SEED = 12345  # train_examples / test_examples: the same subset whatever the run's seed


def subset_indices(n: int, limit: int | None) -> np.ndarray:
    """The indices, in order, of the fixed subset of `limit` of `n` rows (drawn with
    SUBSET_SEED), or of all of them: every task's train_examples / test_examples."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(SUBSET_SEED).permutation(n)[:limit])


def fixed_subset(dataset: TensorDataset, limit: int | None) -> TensorDataset:
    """`limit` rows of `dataset` (subset_indices), or all of them."""
    if limit is None or limit >= len(dataset):
        return dataset
    keep = torch.from_numpy(subset_indices(len(dataset), limit))
    return TensorDataset(*(t[keep] for t in dataset.tensors))


@lru_cache(maxsize=8)
def check_examples_limit(key: str, limit: int | None, rows: int) -> None:
    """`train_examples` / `test_examples` (`key`) above the set's `rows` would silently mean
    all of them, while the run records the limit: refused, naming both."""
    if limit is not None and limit > rows:
        name = "training" if key == "train_examples" else "test"
        raise ValueError(f"{key} = {limit}, but the task's {name} set has {rows:,} "
                         f"examples; accepted: 1 … {rows}, or leave {key} unset for all of them")


def _subset_data(load: Callable[[str | None], TaskData], data_dir: str | None,
                 train_examples: int | None, test_examples: int | None) -> TaskData:
    data = load(data_dir)
    if data.natural_clients is not None and train_examples is not None:
        raise ValueError("train_examples does not apply to a task whose data names its "
                         "clients (its rows are the clients' own); take fewer clients instead")
    check_examples_limit("train_examples", train_examples, len(data.train))
    check_examples_limit("test_examples", test_examples, len(data.test))
    return dataclasses.replace(data, train=fixed_subset(data.train, train_examples),
                               test=fixed_subset(data.test, test_examples))


@dataclass(frozen=True)
class SubsetLoader:
    """A task's `load_data` cut to `train_examples` / `test_examples` rows (fixed subsets,
    independent of the run's seed); built once per process for each (data_dir, sizes)."""

    load: Callable[[str | None], TaskData]
    train_examples: int | None
    test_examples: int | None

    def __call__(self, data_dir: str | None = None) -> TaskData:
        return _subset_data(self.load, data_dir, self.train_examples, self.test_examples)


def check_fits(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> None:
    missing, unknown = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unknown:
        raise WeightsMismatch(f"tensor names differ from this model's (missing {missing[:3]}"
                              f"{'...' if len(missing) > 3 else ''}, unknown {unknown[:3]}"
                              f"{'...' if len(unknown) > 3 else ''})")
    for name, ref in expected.items():
        if tuple(given[name].shape) != tuple(ref.shape):
            raise WeightsMismatch(f"tensor {name!r} has shape {tuple(given[name].shape)}, this "
                                  f"model's is {tuple(ref.shape)}")


def activation(name: str) -> nn.Module:
    # Tempered sigmoids (tanh) keep activations bounded, which suits DP-SGD's clipping
    # better than ReLU (Papernot et al. 2021).
    return {"tanh": nn.Tanh, "relu": nn.ReLU}[name]()
