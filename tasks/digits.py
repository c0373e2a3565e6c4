"""digits-mlp: scikit-learn's 1,797 handwritten 8x8 digits and a small MLP, for fast tests."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from consortia.tasks.base import Task, TaskData, activation

TEST_FRACTION = 0.2


def build_model(activation_name: str = "tanh") -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), activation(activation_name), nn.Linear(64, 10))


@lru_cache(maxsize=1)
def load_data(data_dir: str | None = None) -> TaskData:
    from sklearn.datasets import load_digits  # ships with scikit-learn, no download

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    # A fixed split, independent of the run's seed, so every run tests on the same images.
    order = np.random.default_rng(12345).permutation(len(y))
    n_test = int(len(y) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    as_ds = lambda idx: TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))  # noqa: E731
    return TaskData(train=as_ds(train), test=as_ds(test))


TASK = Task(
    name="digits-mlp",
    description="scikit-learn digits (1,438 train / 359 test), MLP 64-64-10",
    build_model=build_model,
    load_data=load_data,
    # A CSV's values are read as they are (client/data.py), so they must be scaled as here.
    records="(features, label): features float32 of shape [64] (an 8x8 image's pixels, "
            "0 to 1: scikit-learn's 0-16 values divided by 16); the label a digit, int64 "
            "in 0..9",
)
