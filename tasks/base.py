"""What a task is: a model factory, a data loader, and train/eval steps. Nothing more."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def default_device() -> torch.device:
    """Where a task's model trains and evaluates: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class TaskData:
    """A task's full training set (partitioned across clients) and held-out test set."""

    train: TensorDataset
    test: TensorDataset

    @property
    def train_labels(self) -> np.ndarray:
        return self.train.tensors[1].numpy()


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    build_model: Callable[..., nn.Module]
    load_data: Callable[[str | None], TaskData]

    def train_step(self, model: nn.Module, batch: tuple[torch.Tensor, ...],
                   device: torch.device) -> torch.Tensor:
        """Loss on one batch; the trainer calls backward and the optimizer step."""
        x, y = (t.to(device, non_blocking=True) for t in batch)
        return nn.functional.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: TensorDataset, device: torch.device,
                 batch_size: int = 1024) -> dict[str, float]:
        model.eval()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in DataLoader(dataset, batch_size=batch_size):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=1) == y).sum().item()
            seen += len(y)
        model.train()
        return {"loss": loss_sum / seen, "accuracy": correct / seen}


def activation(name: str) -> nn.Module:
    # Tempered sigmoids (tanh) keep activations bounded, which suits DP-SGD's clipping
    # better than ReLU (Papernot et al. 2021).
    return {"tanh": nn.Tanh, "relu": nn.ReLU}[name]()
