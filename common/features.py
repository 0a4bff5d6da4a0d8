"""Frozen features: the head's input for every record, computed with the encoder's forward only.

With the prompt held fixed (head-only training, evaluation, personalisation) the encoder is a
fixed feature map, so one forward pass per record serves every step and every round that
follows: `cached_features` keeps the most recent results in this process, keyed by the
records' token ids, the prompt's bytes and the model settings that shape a feature.

With a late prompt (PromptConfig.prompt_layer = k >= 1) being trained, the layers below k never
see a trainable tensor: `cached_layer_states` keeps each record's hidden states entering layer k,
so a training step runs only layers k..L-1 (model.LayerStateClassifier).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .model import PromptClassifier, cut_padding

PAD_LABEL = -100  # a padding position of a patient's records (cross_entropy's ignore_index)
CACHE_ENTRIES = 16  # a site's train, validation and test splits, the aggregator's test set, a few prompts back
# Layer states are [records, tokens, hidden]: about 0.4 MB a record of 256 tokens on a 384-wide
# encoder in float32 (0.2 MB in bf16), so that cache is bounded by bytes, not entries.
LAYER_CACHE_BYTES = 4 * 2**30


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
    if model.config.prompt_layer > 0:  # a late prompt: the layers below it once per record, cached
        assert isinstance(dataset, TensorDataset)
        states = (
            cached_layer_states(model, dataset, device)
            if dtype is None
            else extract_layer_states(model, dataset, device, dtype=dtype)
        )
        return _features_from_states(model, states, device, batch_size)
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


@torch.no_grad()
def _features_from_states(
    model: PromptClassifier, states: TensorDataset, device: torch.device, batch_size: int
) -> TensorDataset:
    was_training = model.training
    model.to(device).eval()
    feats = [
        model.features_from_states(x.to(device), mask.to(device)).float().cpu()
        for x, mask, _ in DataLoader(states, batch_size=batch_size)
    ]
    model.train(was_training)
    labels = states.tensors[2]
    return TensorDataset(torch.cat(feats) if feats else torch.zeros(0, model.config.hidden_size), labels)


def _key(model: PromptClassifier, dataset: TensorDataset, device: torch.device | str) -> str:
    h = hashlib.sha256()
    c = model.config
    h.update(
        repr(
            (
                c.backbone_fingerprint,
                c.n_virtual_tokens,
                c.prompt_layer,
                c.pooling,
                c.max_length,
                c.normalize,
                feature_dtype(device),
            )
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
    return remember_features(model, dataset, device, extract_features(model, dataset, device))


def remember_features(
    model: PromptClassifier, dataset: TensorDataset, device: torch.device | str, features: TensorDataset
) -> TensorDataset:
    """`features` as what cached_features returns for these records under this model. `fedprompt audit`
    sets its canary records' features this way (white-box canaries: client/audit.py); everything else
    stores what the encoder computed."""
    key = _key(model, dataset, device)
    _cache[key] = features
    _cache.move_to_end(key)
    while len(_cache) > CACHE_ENTRIES:
        _cache.popitem(last=False)
    return features


@torch.no_grad()
def extract_layer_states(
    model: PromptClassifier,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
    storage_dtype: torch.dtype = torch.float32,
) -> TensorDataset:
    """(states, attention_mask, labels) of an encoded dataset (input_ids, attention_mask, labels):
    model.layer_states() per record, on the CPU in `storage_dtype`, cut to the dataset's longest
    record (so a batch of them is what model.features_from_states() takes).
    `dtype`: the encoder forward's precision (default feature_dtype(device))."""
    device = torch.device(device)
    dtype = dtype or feature_dtype(device)
    was_training = model.training
    model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size)
    longest = max((int(mask.sum(1).max()) for _, mask, _ in loader), default=1)
    states, masks, labels = [], [], []
    for input_ids, mask, y in loader:
        ids, mask = input_ids[:, :longest].to(device), mask[:, :longest].to(device)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            h = model.layer_states(*cut_padding(ids, mask))
        padded = torch.zeros(len(ids), longest, h.shape[-1], dtype=storage_dtype)
        padded[:, : h.shape[1]] = h.to("cpu", storage_dtype)
        states.append(padded)
        masks.append(mask.cpu())
        labels.append(y)
    model.train(was_training)
    if not states:
        return TensorDataset(
            torch.zeros(0, 1, model.config.hidden_size, dtype=storage_dtype),
            torch.zeros(0, 1, dtype=torch.long),
            torch.zeros(0, dtype=torch.long),
        )
    return TensorDataset(torch.cat(states), torch.cat(masks), torch.cat(labels))


def _layer_key(model: PromptClassifier, dataset: TensorDataset, device, storage_dtype: torch.dtype) -> str:
    # The backbone's own fingerprint (not the config's copy): the states are the weights' output.
    # No prompt bytes: nothing trainable runs below the prompt's layer.
    h = hashlib.sha256()
    c = model.config
    h.update(
        repr((model.backbone_fingerprint, c.prompt_layer, c.max_length, feature_dtype(device), storage_dtype)).encode()
    )
    for t in dataset.tensors:
        h.update(t.cpu().numpy().tobytes())
    return h.hexdigest()


_layer_cache: OrderedDict[str, TensorDataset] = OrderedDict()


def cached_layer_states(
    model: PromptClassifier,
    dataset: TensorDataset,
    device: torch.device | str = "cpu",
    storage_dtype: torch.dtype = torch.float32,
) -> TensorDataset:
    """extract_layer_states, remembered in this process (LRU within LAYER_CACHE_BYTES) for the same
    records, backbone, prompt layer and max_length: computed once per run, reused by every step
    and round. A change of any of them computes afresh."""
    key = _layer_key(model, dataset, device, storage_dtype)
    if key in _layer_cache:
        _layer_cache.move_to_end(key)
        return _layer_cache[key]
    out = _layer_cache[key] = extract_layer_states(model, dataset, device, storage_dtype=storage_dtype)
    while len(_layer_cache) > 1 and sum(state_bytes(d) for d in _layer_cache.values()) > LAYER_CACHE_BYTES:
        _layer_cache.popitem(last=False)
    return out


def state_bytes(states: TensorDataset) -> int:
    """Memory a cached_layer_states() result holds (all its tensors)."""
    return sum(t.numel() * t.element_size() for t in states.tensors)


def group_by_patient(rows: TensorDataset, patients: list[str], fill: float = 0) -> TensorDataset:
    """Per-record (x, labels) grouped by patient, for patient-level DP: x [patients, max_records, ...]
    (padded with `fill`), labels [patients, max_records] (padded with PAD_LABEL). Patients in order of
    first appearance, records in file order. `x`: frozen features (the head recipe), or record indices
    into cached layer states (the prompt recipe, fill -1: model.IndexedStateClassifier).

    One row per patient is what Poisson sampling and clipping then act on; the trainable layers'
    per-sample gradients on a patient's rows sum over its records (nn.Linear's sampler on a 3-D input,
    SoftPrompt drawn once per patient), i.e. they are the patient's summed gradient.
    """
    x, y = rows.tensors
    if len(patients) != len(y):
        raise ValueError(f"{len(patients)} patient ids for {len(y)} records")
    groups: dict[str, list[int]] = {}
    for i, patient in enumerate(patients):
        groups.setdefault(patient, []).append(i)
    width = max((len(r) for r in groups.values()), default=1)
    xs = torch.full((len(groups), width, *x.shape[1:]), fill, dtype=x.dtype)
    ys = torch.full((len(groups), width), PAD_LABEL, dtype=torch.long)
    for j, idx in enumerate(groups.values()):
        index = torch.tensor(idx, dtype=torch.long)
        xs[j, : len(idx)] = x[index]
        ys[j, : len(idx)] = y[index]
    return TensorDataset(xs, ys)
