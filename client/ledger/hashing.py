"""Hashes of the ledger: canonical JSON and its sha256 (the chain), and the hashes an entry binds
(the records file a round trains on, the model tensors it receives and sends)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII: the bytes every hash of the ledger is taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def record_hash(obj: Mapping[str, Any]) -> str:
    """sha256 of an entry, completion or header: its canonical JSON without its own "hash" key.

    The one function used to write and to verify the chain.
    """
    return hashlib.sha256(canonical_json({k: v for k, v in obj.items() if k != "hash"})).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (the records file a round trains on)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_sha256(state: Mapping[str, Any]) -> str:
    """Canonical hash of a model's tensors (torch tensors, numpy arrays or Flower Arrays by name).

    sha256 over the canonical JSON of [[name, shape], ...] in sorted name order, a newline, then
    each tensor's float32 little-endian C-order bytes in the same order. The shapes make the byte
    stream unambiguous; float32 is what goes on the wire (common/wire.state_to_arrays), so the hash
    of the tensors a site sends equals the hash of what the aggregator receives.
    """
    names = sorted(state)
    arrays = []
    for name in names:
        value = state[name]
        if hasattr(value, "detach"):  # torch.Tensor (bfloat16 has no numpy view: go through float32)
            value = value.detach().to("cpu").float().numpy()
        elif not isinstance(value, np.ndarray) and hasattr(value, "numpy"):  # flwr Array
            value = value.numpy()
        arrays.append(np.ascontiguousarray(np.asarray(value, dtype="<f4")))
    digest = hashlib.sha256(canonical_json([[n, list(a.shape)] for n, a in zip(names, arrays, strict=True)]) + b"\n")
    for a in arrays:
        digest.update(a.tobytes())
    return digest.hexdigest()
