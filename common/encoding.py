"""Text -> fixed-length token tensors (padding is cut per batch in the model's forward)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset
from transformers import PreTrainedTokenizerBase


@dataclass
class Encoded:
    dataset: TensorDataset  # (input_ids, attention_mask, labels)
    truncated: int  # texts longer than max_length (cut, counted, not an error)


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], labels: list[int], max_length: int) -> Encoded:
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    full = tokenizer(texts, truncation=False, add_special_tokens=True)["input_ids"]
    truncated = sum(1 for ids in full if len(ids) > max_length)
    ds = TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(labels, dtype=torch.long))
    return Encoded(ds, truncated)
