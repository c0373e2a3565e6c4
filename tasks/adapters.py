"""Pretrained transformers fine-tuned with LoRA: what they share.

Only the adapters (and a freshly initialised head) train, so only they travel; the
frozen pretrained weights are named by a SHA-256 over their tensors, which a client
compares with the run's before it trains. Models and data come from installed packages,
never from a hub: the loaders run with HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from consortia.tasks.base import Task, check_fits

# A peft ModulesToSaveWrapper keeps the untrained original of a module whose trained copy
# travels (the classification head): it is neither base weights nor an update.
PEFT_ORIGINAL = ".original_module."
# Per model instance (weakly: a model dropped is forgotten): its base's identity and hash.
_BASE_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class MissingPackage(ImportError):
    """A model or dataset package that is not installed; the message says what to install."""


def offline() -> None:
    """Nothing is fetched from a hub: a missing file is an error, not a download."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def require(module: str, install: str, what: str):
    """Import `module`, or say which package to install for `what`."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingPackage(f"{what} needs the Python package {install!r}, which is not "
                             f"installed ({err}); install it with `pip install {install}` "
                             "(or `make install`)") from None


def package_dir(module: str, install: str, what: str) -> Path:
    """The folder of an installed package, found without importing it (data-only packages)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"{what} needs the Python package {install!r}, which is not "
                             f"installed; install it with `pip install {install}` "
                             "(or `make install`)")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """Where converted models are kept: $CONSORTIA_CACHE, else ~/.cache/consortia."""
    root = os.environ.get("CONSORTIA_CACHE") or \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "consortia"
    return Path(root)


def tensors_sha256(named: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order: a file-format-free id."""
    digest = hashlib.sha256()
    for name in sorted(named):
        t = named[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass(frozen=True)
class AdapterTask(Task):
    """A Task whose model is a peft model: the trainable tensors travel, the base stays."""

    model_keys: tuple[str, ...] = ("lora_rank", "lora_alpha", "max_length")

    def travelling_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}

    def load_travelling_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        check_fits({n: p for n, p in params.items() if p.requires_grad}, weights)
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)

    def base_sha256(self, model: nn.Module) -> str:
        travelling = {n for n, p in model.named_parameters() if p.requires_grad}
        frozen = {n: t for n, t in model.state_dict().items()
                  if PEFT_ORIGINAL not in n and n not in travelling}
        # A simulation's actor keeps one model for every request (simulations/sites.py):
        # hashing its base each time cost 0.67 s a request for SmolLM2 on the CPU. The hash
        # is kept with what identifies the tensors' contents without reading them: storage,
        # dtype, shape and torch's version counter, which every in-place write (a
        # load_state_dict, an optimizer step) bumps. Anything else: hashed again. (Writes
        # through `.data` bypass that counter; nothing in consortia writes a base that way,
        # and a deployed site builds a fresh model, so hashes, every request.)
        identity = tuple((n, t.data_ptr(), t._version, t.dtype, tuple(t.shape))
                         for n, t in sorted(frozen.items()))
        kept = _BASE_HASHES.get(model)
        if kept is not None and kept[0] == identity:
            return kept[1]
        digest = tensors_sha256(frozen)
        _BASE_HASHES[model] = (identity, digest)
        return digest

    def merged(self, model: nn.Module) -> nn.Module:
        """The plain transformers model with the adapters folded into the base weights."""
        return model.merge_and_unload()

    def tokenizer(self):
        raise NotImplementedError


def lora_model(model: nn.Module, task_type: str, rank: int, alpha: float,
               target_modules: list[str], modules_to_save: list[str] | None = None) -> nn.Module:
    peft = require("peft", "peft", "LoRA fine-tuning")
    # A rank above a layer's smaller side adds parameters, not expressiveness (the update
    # B·A then has at most that rank): a config asking for it is a mistake, said at start.
    widths = [min(m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules]
    if widths and rank > min(widths):
        raise ValueError(f"model.lora_rank = {rank} is above the smaller side ({min(widths)}) "
                         f"of the adapted layers ({', '.join(target_modules)}); accepted: 1 to "
                         f"{min(widths)}")
    config = peft.LoraConfig(task_type=task_type, r=rank, lora_alpha=alpha, lora_dropout=0.0,
                             target_modules=target_modules, modules_to_save=modules_to_save)
    with warnings.catch_warnings():  # peft calls a transformers API that is being renamed
        warnings.simplefilter("ignore", FutureWarning)
        return peft.get_peft_model(model, config)


def quiet_transformers():
    """transformers, imported, without its progress bars and load reports (expected here)."""
    transformers = require("transformers", "transformers", "pretrained-model tasks")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers
