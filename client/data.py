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
# What an image's values are divided by to lie in [0, 1], by PIL mode: 16-bit grayscale
# (medical images) by 65535, a 1-bit image is 0 or 1 already.
IMAGE_SCALE = {"L": 255.0, "LA": 255.0, "RGB": 255.0, "RGBA": 255.0, "CMYK": 255.0,
               "YCbCr": 255.0, "1": 1.0, "I;16": 65535.0, "I;16B": 65535.0,
               "I;16L": 65535.0}


class DataError(ValueError):
    """The site's data cannot be read as configured; the message says which and why."""


def _tensors(features: np.ndarray, labels: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)),
                         torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)))


MAX_NAMED = 5  # bad values an error names; the rest are counted, so one read shows them all
FEATURE_RULE = "a finite number (e.g. 0.5, -2, 1e-3; not empty, nan or inf)"
LABEL_RULE = "a class index: a whole number, 0 or more"


class SourcedRecords(TensorDataset):
    """Records read from a file, remembering where each came from, so that a check made
    later (the label range, known once the task's model is built) can name the line."""

    def __init__(self, features, labels, source: Path, columns: list[str], label: str,
                 lines: list[int] | None = None):
        super().__init__(*_tensors(features, labels).tensors)
        self.source, self.columns, self.label, self.lines = source, columns, label, lines

    def where(self, i: int) -> str:
        if self.lines is None:  # Parquet: no lines, records counted from 1
            return f"row {i + 1}"
        return f"line {self.lines[i]}"


LINES = " (lines as an editor or `sed -n` counts them, the header line 1)"


def _fail(source: Path, what: str, problems: list[str], total: int, accepted: str,
          counting: str) -> DataError:
    more = f"; and {total - len(problems)} more" if total > len(problems) else ""
    return DataError(f"{source}: {total} bad {what}{'s' * (total != 1)}{counting}: "
                     f"{'; '.join(problems)}{more}. Accepted: {accepted}")


def _why(value: float) -> str:
    if np.isnan(value):
        return "not a number"
    if not np.isfinite(value):
        return "not finite"
    return "not a whole number" if value != round(value) else "negative"


def _records(values: np.ndarray, names: list[str], label: str, source: Path,
             lines: list[int] | None, raw=None) -> SourcedRecords:
    """Features and label from a float matrix (one column per name; NaN where `raw`, the
    text, was not a number), every bad cell counted and the first few named."""
    if label not in names:
        raise DataError(f"{source}: no column {label!r} (data.label_column); columns: "
                        f"{', '.join(names)}")
    if len(names) < 2:
        raise DataError(f"{source}: no feature column besides the label {label!r}")
    j = names.index(label)
    col = values[:, j]
    with np.errstate(over="ignore", invalid="ignore"):
        values32 = values.astype(np.float32)  # what the model gets: 1e39 is inf there
        bad = ~np.isfinite(values32)
        bad[:, j] |= (col != np.round(col)) | (col < 0)
    cells = np.argwhere(bad)  # row-major: in file order
    if len(cells):
        named = []
        for r, c in cells[:MAX_NAMED]:
            value = raw[r][c] if raw is not None else float(values[r, c])
            row = f"line {lines[r]}" if lines is not None else f"row {r + 1}"
            named.append(f"{row}, column {names[c]!r}: {value!r} "
                         f"({_why(values32[r, c])})")
        counting = LINES if lines is not None else " (rows counted from 1)"
        raise _fail(source, "value", named, len(cells), f"every feature column {FEATURE_RULE}; "
                    f"{label!r} (data.label_column) {LABEL_RULE}", counting)
    return SourcedRecords(np.delete(values32, j, axis=1), col.astype(np.int64), source,
                          [n for n in names if n != label], label, lines)


def read_csv(path: Path, label_column: str) -> TensorDataset:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's BOM
            reader = csv.reader(f)
            header = next(reader, None)
            rows, lines, start = [], [], reader.line_num + 1
            for row in reader:
                if row:  # a blank line is no record
                    rows.append(row)
                    lines.append(start)  # a quoted value may span lines: its first
                start = reader.line_num + 1
    except FileNotFoundError:
        raise DataError(f"data.path: {path} not found") from None
    except OSError as err:  # a directory, a file this user may not read
        raise DataError(f"data.path: {path} cannot be read ({err.strerror or err}); accepted: "
                        "a CSV file with a header row") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: not a UTF-8 CSV file ({err}); accepted: comma-separated "
                        "text with a header row") from None
    if header is None or not rows:
        raise DataError(f"{path}: expected a header row and at least one record")
    width = len(header)
    short = [i for i, r in enumerate(rows) if len(r) != width]
    if short:  # no value can be placed in its column until every line has them all
        named = [f"line {lines[i]}: {len(rows[i])} values" for i in short[:MAX_NAMED]]
        raise _fail(path, "line", named, len(short), f"{width} comma-separated values a "
                    f"line, one for each header column ({', '.join(header[:8])}"
                    f"{', ...' * (width > 8)})", LINES)
    text = np.array(rows)
    try:
        values = text.astype(np.float64)
    except ValueError:  # the slow path, only for a file with a value that is no number
        values = np.array([[_number(v) for v in r] for r in rows])
    return _records(values, header, label_column, path, lines, raw=rows)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return np.nan  # counted as bad, shown as its text


def read_parquet(path: Path, label_column: str) -> TensorDataset:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("data.kind = 'parquet' needs pyarrow: pip install 'consortia[parquet]'"
                        ) from None
    if not path.is_file():
        raise DataError(f"data.path: {path} " + ("is a directory; accepted: a Parquet file"
                                                 if path.is_dir() else "not found"))
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"data.path: {path} cannot be read as Parquet ({err}); accepted: a "
                        "Parquet file of numeric columns") from None
    try:
        values = np.stack([table.column(n).to_numpy().astype(np.float64)
                           for n in table.column_names], axis=1)
    except (ValueError, TypeError) as err:
        raise DataError(f"{path}: every column must be numeric ({err})") from None
    return _records(values, table.column_names, label_column, path, None)


def _read_item(path: Path) -> np.ndarray:
    """One record of a folder; a file that is not a numeric array or an image is named."""
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False).astype(np.float32)
        from PIL import Image

        with Image.open(path) as image:
            if image.mode == "P":  # palette indices are no intensities: their colours are
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            if image.mode not in IMAGE_SCALE:
                raise DataError(f"{path}: image mode {image.mode!r} has no known [0, 1] "
                                f"scale; accepted: 8- or 16-bit grayscale or colour, or a "
                                ".npy array")
            array = np.asarray(image, dtype=np.float32) / IMAGE_SCALE[image.mode]
    except DataError:
        raise
    except (OSError, ValueError, TypeError) as err:  # PIL's UnidentifiedImageError: OSError
        raise DataError(f"{path} cannot be read as a record ({err}); accepted: a .npy array "
                        "of numbers (saved without pickle) or a PNG/JPEG image") from None
    # Channels first: a grayscale image is [1, H, W] (as fashion-mnist-cnn takes it), a
    # colour one [C, H, W]. A .npy array is taken as it is.
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)  # HWC -> CHW


def read_folder(path: Path) -> TensorDataset:
    if not path.is_dir():
        raise DataError(f"data.path: {path} is not a directory")
    # Hidden folders and files (.ipynb_checkpoints, .DS_Store, macOS's ._ copies) are no
    # records: a hidden folder taken as class 0 would shift every real class's label.
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{path}: expected one subfolder per class (e.g. 0/, 1/ or cat/, dog/)")
    items, labels = [], []
    for label, folder in enumerate(classes):
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES | {".npy"} and not file.name.startswith("."):
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
    # The label comes last in every task's records: (features, label), or a text task's
    # (input_ids, attention_mask, label); all of them are checked against the classes,
    # whatever Dataset holds them (a Subset, a ConcatDataset, the partner's own class).
    labels = all_labels(dataset)
    if labels is not None and labels.is_floating_point():
        # (features, label) records for the cross-entropy Task trains with; a task with a
        # loss of its own (Task.criterion or train_step overridden) may take float targets
        if len(first) == 2 and type(task).criterion is Task.criterion \
                and type(task).train_step is Task.train_step:
            raise DataError(f"labels must be class indices (int64), got {labels.dtype}")
        labels = None  # an own task's float target: the probe below is its check
    probe = Subset(dataset, range(min(PROBE_RECORDS, len(dataset))))
    model = model if model is not None else task.build_model()
    check_token_ids(tensors, task, model)
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
                                f"{int(labels.max())}: {_outside(dataset, labels, classes)}")
            task.criterion()(outputs, targets)
    except DataError:
        raise
    except Exception as err:  # whatever the model and loss refuse, said in their words
        read = f" ({dataset.source} gives {len(dataset.columns)} feature columns besides " \
            f"{dataset.label!r})" if isinstance(dataset, SourcedRecords) else ""
        raise DataError(f"the site's records do not fit task {task.name!r}'s model: "
                        f"{type(err).__name__}: {err}; task {task.name!r} takes records "
                        f"{task.records}{read}") from None


def all_labels(dataset: Dataset) -> torch.Tensor | None:
    """Every record's label (its last element, one number each) in record order, or None
    when the records end in something else (a text task's attention mask). Tensors are
    read whole (TensorDataset, and Subset / ConcatDataset of them); any other Dataset is
    read record by record, once."""
    if isinstance(dataset, TensorDataset):
        last = dataset.tensors[-1]
        return last if len(dataset.tensors) >= 2 and last.dim() == 1 else None
    if isinstance(dataset, Subset):
        inner = all_labels(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        parts = [all_labels(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else torch.cat(parts)
    labels, shapes = [], None
    for i in range(len(dataset)):
        record = dataset[i]
        if not isinstance(record, (tuple, list)) or len(record) < 2:
            return None
        # Training stacks records into batches: one of another shape fails mid-run.
        shaped = [tuple(getattr(t, "shape", ())) for t in record]
        if shapes is None:
            shapes = shaped
        elif shaped != shapes:
            raise DataError(f"record {i} (counted from 0) has shapes {shaped}, record 0 has "
                            f"{shapes}; accepted: records of one shape (a batch stacks them)")
        labels.append(torch.as_tensor(record[-1]))
    return torch.stack(labels) if labels[0].dim() == 0 else None


def check_token_ids(tensors: tuple[torch.Tensor, ...], task: Task, model: torch.nn.Module) -> None:
    """A text task's token ids (its records' first tensor), all of them, against the model's
    vocabulary: ids from another tokenizer fail in the embedding mid-run (on a GPU, as a
    device-side assert) when they are not among the records probed."""
    embeddings = getattr(model, "get_input_embeddings", None)
    if not tensors or tensors[0].is_floating_point() or not callable(embeddings):
        return
    try:
        vocab = int(embeddings().num_embeddings)
    except (AttributeError, NotImplementedError):  # a model without a token embedding
        return
    ids = tensors[0]
    bad = ((ids < 0) | (ids >= vocab)).flatten(1).any(dim=1).nonzero().flatten().tolist()
    if bad:
        named = ", ".join(f"record {i}: {int(ids[i][(ids[i] < 0) | (ids[i] >= vocab)][0])}"
                          for i in bad[:MAX_NAMED])
        more = f"; and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
        raise DataError(f"token ids must lie in [0, {vocab - 1}], the vocabulary of task "
                        f"{task.name!r} (tokenize with task.tokenizer()); {len(bad)} record"
                        f"{'s hold' if len(bad) != 1 else ' holds'} others (counted from 0): "
                        f"{named}{more}")


def _outside(dataset: Dataset, labels: torch.Tensor, classes: int) -> str:
    """The first few records whose label the model has no class for, and how many more."""
    bad = ((labels < 0) | (labels >= classes)).nonzero().flatten().tolist()
    if isinstance(dataset, SourcedRecords):
        named = [f"{dataset.where(i)}, column {dataset.label!r}: {int(labels[i])}"
                 for i in bad[:MAX_NAMED]]
        head = f"{dataset.source} has {len(bad)} such label{'s' * (len(bad) != 1)}: "
    else:
        named = [f"record {i}: {int(labels[i])}" for i in bad[:MAX_NAMED]]
        head = f"{len(bad)} record{'s' * (len(bad) != 1)} (counted from 0): "
    more = f"; and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
    return head + "; ".join(named) + more


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
