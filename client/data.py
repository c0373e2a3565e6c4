"""Bring your own data: a site's training records as a torch Dataset of (features, label).

Adapters, chosen by `[data] kind` in site.toml:

- `csv`: a CSV file with a header row; every column but `label_column` is a float32
  feature, `label_column` (default "label") the class index.
- `parquet`: the same from a Parquet file (needs pyarrow: `pip install consortia[parquet]`).
- `folder`: one subfolder per class (sorted names are labels 0, 1, ...) of `.npy` arrays
  or images (PNG/JPEG, scaled to [0, 1], channels first).
- `hook`: "package.module:function", called with no argument, returning a Dataset.
- `partition`: share `index` of `count` of the task's own training set (demos, tests).

The Python API (`consortia.client.join_federation(..., dataset=...)`) takes any Dataset
directly. Whatever the source, the records stay on the site: only DP-protected, masked
model updates leave it.
"""

from __future__ import annotations

import csv
import importlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from consortia.client.site_config import DataSection
from consortia.tasks import Task

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


class DataError(ValueError):
    """The site's data cannot be read as configured; the message says which and why."""


def _tensors(features: np.ndarray, labels: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)),
                         torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)))


def _split_columns(columns: dict[str, np.ndarray], label: str, source: Path) -> TensorDataset:
    if label not in columns:
        raise DataError(f"{source}: no column {label!r} (data.label_column); columns: "
                        f"{', '.join(columns)}")
    names = [c for c in columns if c != label]
    if not names:
        raise DataError(f"{source}: no feature column besides the label {label!r}")
    try:
        features = np.stack([np.asarray(columns[c], dtype=np.float32) for c in names], axis=1)
        labels = np.asarray(columns[label], dtype=np.float64)
    except ValueError as err:
        raise DataError(f"{source}: every feature column must be numeric ({err})") from None
    if not np.all(labels == np.round(labels)):
        raise DataError(f"{source}: labels in {label!r} must be whole numbers (class indices)")
    return _tensors(features, labels.astype(np.int64))


def read_csv(path: Path, label_column: str) -> TensorDataset:
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DataError(f"data.path: {path} not found") from None
    if len(rows) < 2:
        raise DataError(f"{path}: expected a header row and at least one record")
    header, body = rows[0], rows[1:]
    columns = {name: np.array([r[i] for r in body]) for i, name in enumerate(header)}
    return _split_columns(columns, label_column, path)


def read_parquet(path: Path, label_column: str) -> TensorDataset:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("data.kind = 'parquet' needs pyarrow: pip install 'consortia[parquet]'"
                        ) from None
    if not path.is_file():
        raise DataError(f"data.path: {path} not found")
    table = pq.read_table(path)
    columns = {name: table.column(name).to_numpy() for name in table.column_names}
    return _split_columns(columns, label_column, path)


def _read_item(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float32)
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image, dtype=np.float32) / 255.0
    return array if array.ndim == 2 else np.moveaxis(array, -1, 0)  # HWC -> CHW


def read_folder(path: Path) -> TensorDataset:
    if not path.is_dir():
        raise DataError(f"data.path: {path} is not a directory")
    classes = sorted(p for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{path}: expected one subfolder per class (e.g. 0/, 1/ or cat/, dog/)")
    items, labels = [], []
    for label, folder in enumerate(classes):
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES | {".npy"}:
                items.append(_read_item(file))
                labels.append(label)
    if not items:
        raise DataError(f"{path}: no .npy or image files in its class subfolders")
    shapes = {a.shape for a in items}
    if len(shapes) > 1:
        raise DataError(f"{path}: records differ in shape ({sorted(shapes)[:3]}...); "
                        "every record must have the shape the task's model takes")
    return _tensors(np.stack(items), np.array(labels))


def call_hook(ref: str) -> Dataset:
    module_name, _, function = ref.partition(":")
    if not module_name or not function:
        raise DataError(f"data.hook {ref!r}: expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as err:
        raise DataError(f"data.hook {ref!r} cannot be loaded: {err}") from None
    dataset = fn()
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise DataError(f"data.hook {ref!r} returned {type(dataset).__name__}; accepted: a "
                        "torch Dataset (with __len__ and __getitem__)")
    return dataset


def task_partition(task: Task, index: int, count: int) -> Dataset:
    train = task.load_data(None).train
    order = np.random.default_rng(0).permutation(len(train))
    return Subset(train, np.array_split(order, count)[index].tolist())


PROBE_RECORDS = 8  # records put through the task's model at start


def check_records(dataset: Dataset, task: Task, model: torch.nn.Module | None = None) -> None:
    """Fail at start, not at the first training request, when the site's records do not
    fit the task: none at all, not (features, label) pairs, or a batch of them that the
    task's model and loss cannot take (shape, dtype, a label beyond the model's classes)."""
    if len(dataset) == 0:
        raise DataError("the site's dataset is empty")
    first = dataset[0]
    if not isinstance(first, (tuple, list)):  # the task's forward takes a tuple of tensors
        raise DataError(f"each record must be a tuple; record 0 is a {type(first).__name__}; "
                        f"task {task.name!r} takes records {task.records}")
    tensors = dataset.tensors if isinstance(dataset, TensorDataset) else ()
    labels = tensors[1] if len(tensors) == 2 and tensors[1].dim() == 1 else None
    if labels is not None and labels.is_floating_point():  # (features, label) records
        raise DataError(f"labels must be class indices (int64), got {labels.dtype}")
    probe = Subset(dataset, range(min(PROBE_RECORDS, len(dataset))))
    model = model if model is not None else task.build_model()
    try:
        batch = next(iter(torch.utils.data.DataLoader(probe, batch_size=len(probe))))
        with torch.no_grad():
            outputs, targets = task.forward(model, batch, torch.device("cpu"))
            # All labels, cheaply, against the classes the model scores (one score each).
            classes = int(outputs.shape[-1]) if outputs.dim() == 2 else None
            if labels is not None and classes is not None and \
                    (labels.min() < 0 or labels.max() >= classes):
                raise DataError(f"labels must lie in [0, {classes - 1}] (task {task.name!r} "
                                f"has {classes} classes); found {int(labels.min())} to "
                                f"{int(labels.max())}")
            task.criterion()(outputs, targets)
    except DataError:
        raise
    except Exception as err:  # whatever the model and loss refuse, said in their words
        raise DataError(f"the site's records do not fit task {task.name!r}'s model: "
                        f"{type(err).__name__}: {err}; task {task.name!r} takes records "
                        f"{task.records}") from None


def load_site_data(data: DataSection, task: Task) -> Dataset:
    if data.kind == "csv":
        dataset = read_csv(data.path, data.label_column)
    elif data.kind == "parquet":
        dataset = read_parquet(data.path, data.label_column)
    elif data.kind == "folder":
        dataset = read_folder(data.path)
    elif data.kind == "hook":
        dataset = call_hook(data.hook)
    else:
        dataset = task_partition(task, data.index, data.count)
    return dataset
