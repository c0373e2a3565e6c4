"""fashion-mnist-cnn: the full Fashion-MNIST (60,000 + 10,000) and Papernot et al.'s DP CNN."""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from consortia.tasks.base import Task, TaskData, activation

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
ENV_DIR = "CONSORTIA_FASHION_MNIST_DIR"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MEAN, STD = 0.2860, 0.3530  # training-set pixel statistics


class DatasetMissingError(FileNotFoundError):
    pass


class Standardized(nn.Sequential):
    """The CNN, standardizing its input (pixels in [0, 1], as the task's records are) with
    the training set's statistics. Inside the model, so that every site's records, the
    server's test set and the simulation's partitions are the same [0, 1] pixels: a site
    that prepared its records as `records` says trained on what the server tested
    differently. A module with no weights of its own: the parameters keep their names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x - MEAN) / STD)


def build_model(activation_name: str = "tanh") -> nn.Module:
    """conv 16@8x8/2, maxpool, conv 32@4x4/2, maxpool, fc 32, fc 10 (26,010 parameters)."""
    return Standardized(
        nn.Conv2d(1, 16, 8, stride=2, padding=3), activation(activation_name), nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2), activation(activation_name), nn.MaxPool2d(2, 1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32), activation(activation_name),
        nn.Linear(32, 10),
    )


def resolve_dir(data_dir: str | None) -> Path:
    directory = Path(data_dir or os.environ.get(ENV_DIR) or DEFAULT_DIR)
    missing = [name for name in FILES.values() if not (directory / name).is_file()]
    if missing:
        raise DatasetMissingError(
            f"Fashion-MNIST files not found in {directory} (missing: {', '.join(missing)}). "
            "Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set "
            f"`data_dir` in the config (or ${ENV_DIR}) to a folder holding {', '.join(FILES.values())}."
        )
    return directory


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)


@lru_cache(maxsize=2)
def load_data(data_dir: str | None = None) -> TaskData:
    directory = resolve_dir(data_dir)

    def images(name: str) -> torch.Tensor:
        raw = _read_idx(directory / FILES[name], 16).reshape(-1, 1, 28, 28)
        return torch.from_numpy(raw.astype(np.float32) / 255.0)  # the model standardizes

    def labels(name: str) -> torch.Tensor:
        return torch.from_numpy(_read_idx(directory / FILES[name], 8).astype(np.int64))

    return TaskData(
        train=TensorDataset(images("train_images"), labels("train_labels")),
        test=TensorDataset(images("test_images"), labels("test_labels")),
    )


TASK = Task(
    name="fashion-mnist-cnn",
    description="Fashion-MNIST (60,000 train / 10,000 test), Papernot et al.'s tanh CNN",
    build_model=build_model,
    load_data=load_data,
    records="(image, label): image float32 of shape [1, 28, 28], scaled to [0, 1]; the label "
            "a class index, int64 in 0..9",
)
