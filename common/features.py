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

PAD_LABEL = -100  # a padding position of a patient's records (cross_entropy's ignore_index)
CACHE_ENTRIES = 16  # a site's train, validation and test splits, the aggregator's test set, a few prompts back


def feature_dtype(device: torch.device | str) -> torch.dtype:
    """The frozen encoder's forward runs in bf16 on a CUDA device that supports it (about twice as
    fast, half the activation memory); the features are stored, and the head trained, in float32,
    so DP-SGD's per-sample gradients are unchanged. `fedprompt selftest` measures the difference.
    Not verified on CUDA in this project's CI (no GPU there)."""
    device = torch.device(device)
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


@torch.no_grad()
def extract_features(
    model: PromptClassifier,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
) -> TensorDataset:
    """(features, labels) of an encoded dataset (input_ids, attention_mask, labels), float32 features on the CPU.
    `dtype`: the encoder forward's precision (default feature_dtype(device))."""
    device = torch.device(device)
    dtype = dtype or feature_dtype(device)
    was_training = model.training
    model.to(device).eval()
    feats, labels = [], []
    for input_ids, mask, y in DataLoader(dataset, batch_size=batch_size):
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            feats.append(model.features(input_ids.to(device), mask.to(device)).float().cpu())
        labels.append(y)
    model.train(was_training)
    hidden = model.config.hidden_size
    return TensorDataset(
        torch.cat(feats) if feats else torch.zeros(0, hidden),
        torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
    )


def _key(model: PromptClassifier, dataset: TensorDataset, device: torch.device | str) -> str:
    h = hashlib.sha256()
    c = model.config
    h.update(
        repr(
            (c.backbone_fingerprint, c.n_virtual_tokens, c.pooling, c.max_length, c.normalize, feature_dtype(device))
        ).encode()
    )
    h.update(model.prompt.weight.detach().float().cpu().numpy().tobytes())
    for t in dataset.tensors:
        h.update(t.cpu().numpy().tobytes())
    return h.hexdigest()


_cache: OrderedDict[str, TensorDataset] = OrderedDict()


def cached_features(
    model: PromptClassifier, dataset: TensorDataset, device: torch.device | str = "cpu"
) -> TensorDataset:
    """extract_features, remembered for the same records, prompt and settings (LRU, in this process)."""
    key = _key(model, dataset, device)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    out = _cache[key] = extract_features(model, dataset, device)
    while len(_cache) > CACHE_ENTRIES:
        _cache.popitem(last=False)
    return out


def group_by_patient(features: TensorDataset, patients: list[str]) -> TensorDataset:
    """Per-record (features, labels) grouped by patient, for patient-level DP on the head:
    features [patients, max_records, hidden] (zero-padded), labels [patients, max_records]
    (padded with PAD_LABEL). Patients in order of first appearance, records in file order.

    One row per patient is what Poisson sampling and clipping then act on; nn.Linear's per-sample
    gradient on a 3-D input sums over the records axis, i.e. it is the patient's summed gradient.
    """
    x, y = features.tensors
    if len(patients) != len(y):
        raise ValueError(f"{len(patients)} patient ids for {len(y)} records")
    rows: dict[str, list[int]] = {}
    for i, patient in enumerate(patients):
        rows.setdefault(patient, []).append(i)
    width = max((len(r) for r in rows.values()), default=1)
    xs = torch.zeros(len(rows), width, x.shape[-1], dtype=x.dtype)
    ys = torch.full((len(rows), width), PAD_LABEL, dtype=torch.long)
    for j, idx in enumerate(rows.values()):
        index = torch.tensor(idx, dtype=torch.long)
        xs[j, : len(idx)] = x[index]
        ys[j, : len(idx)] = y[index]
    return TensorDataset(xs, ys)
