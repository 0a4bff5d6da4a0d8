"""Frozen features: the head's input for every record, computed with the encoder's forward only.

With the prompt held fixed (head-only training, evaluation, personalisation) the encoder is a
fixed feature map, so one forward pass per record serves every step and every round that
follows: `cached_features` keeps the most recent results in this process, keyed by the
records' token ids, the prompt's bytes and the model settings that shape a feature.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .model import PromptClassifier

CACHE_ENTRIES = 16  # a site's train, validation and test splits, the aggregator's test set, a few prompts back


@torch.no_grad()
def extract_features(model: PromptClassifier, dataset: Dataset, device: torch.device | str = "cpu", batch_size: int = 64) -> TensorDataset:
    """(features, labels) of an encoded dataset (input_ids, attention_mask, labels), features on the CPU."""
    was_training = model.training
    model.to(device).eval()
    feats, labels = [], []
    for input_ids, mask, y in DataLoader(dataset, batch_size=batch_size):
        feats.append(model.features(input_ids.to(device), mask.to(device)).float().cpu())
        labels.append(y)
    model.train(was_training)
    hidden = model.config.hidden_size
    return TensorDataset(torch.cat(feats) if feats else torch.zeros(0, hidden), torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))


def _key(model: PromptClassifier, dataset: TensorDataset) -> str:
    h = hashlib.sha256()
    c = model.config
    h.update(repr((c.backbone_fingerprint, c.n_virtual_tokens, c.pooling, c.max_length, c.normalize)).encode())
    h.update(model.prompt.weight.detach().float().cpu().numpy().tobytes())
    for t in dataset.tensors:
        h.update(t.cpu().numpy().tobytes())
    return h.hexdigest()


_cache: OrderedDict[str, TensorDataset] = OrderedDict()


def cached_features(model: PromptClassifier, dataset: TensorDataset, device: torch.device | str = "cpu") -> TensorDataset:
    """extract_features, remembered for the same records, prompt and settings (LRU, in this process)."""
    key = _key(model, dataset)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    out = _cache[key] = extract_features(model, dataset, device)
    while len(_cache) > CACHE_ENTRIES:
        _cache.popitem(last=False)
    return out
