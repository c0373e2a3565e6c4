"""A BERT sequence classifier that reads the mean of its token states, not [CLS].

all-MiniLM-L6-v2 was trained as a sentence encoder whose sentence vector is the
attention-masked mean of the last hidden states (its `1_Pooling/config.json`:
`pooling_mode_mean_tokens`). transformers' BertForSequenceClassification reads the
pooled [CLS] token instead, which this checkpoint never trained for: with that head every
federated reviews run, with or without DP, stayed at the majority class (docs/results.md).
Here the head reads the mean, as the encoder was trained.

This file is self-contained (torch and transformers only): `consortia export` copies it
beside the exported weights, with an `auto_map` in config.json, so that
`AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)` loads
the exported model offline with neither consortia nor peft installed. Its own model_type
makes a load without trust_remote_code fail loudly rather than fall back to transformers'
BertForSequenceClassification, whose [CLS] head would give other logits.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertModel, BertPreTrainedModel


class BertMeanPoolConfig(BertConfig):
    model_type = "bert-mean-pool"


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of each row's token states over its real (unmasked) tokens."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class BertMeanPoolForSequenceClassification(BertPreTrainedModel):
    """BERT encoder, masked mean pooling, one linear layer to `config.num_labels` logits."""

    config_class = BertMeanPoolConfig

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, **kwargs):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids, position_ids=position_ids,
                           inputs_embeds=inputs_embeds).last_hidden_state
        logits = self.classifier(masked_mean(hidden, attention_mask))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


# save_pretrained writes this file beside the weights, with an auto_map naming these classes.
BertMeanPoolConfig.register_for_auto_class()
BertMeanPoolForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
