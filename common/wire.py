"""What crosses the wire, and the aggregator's check of every update before aggregation.

Hospitals send exactly the trainable tensors (common/model.TRAINABLE_KEYS) as float32, plus
aggregate metrics from the whitelists below and a small status record. Nothing else.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from .model import TRAINABLE_KEYS

ARRAYS = "arrays"  # Flower strategies' default record keys
METRICS = "metrics"
CONFIG = "config"
STATUS = "fedprompt.status"

# Aggregates only: counts, loss, accuracy inputs, epsilon. Never per-record values.
TRAIN_METRIC_KEYS = frozenset(
    {"num-examples", "train-loss", "steps", "private", "noise-multiplier", "sample-rate", "epsilon-spent", "epsilon-cap", "delta"}
)
EVAL_METRIC_KEYS = frozenset({"num-examples", "loss-sum", "tp", "fp", "fn"})
STATUS_KEYS = frozenset({"hospital-id", "status", "reason", "truncated"})


def state_to_arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(state[k].detach().cpu().numpy().astype(np.float32))) for k in TRAINABLE_KEYS})


def arrays_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(record[k].numpy(), copy=True)) for k in record.keys()}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor data in a record (what one upload costs, before framing)."""
    return sum(len(arr.data) for arr in record.values())


def status_record(hospital_id: str, status: str, reason: str = "", truncated: int = 0) -> ConfigRecord:
    return ConfigRecord({"hospital-id": hospital_id, "status": status, "reason": reason, "truncated": truncated})


def refusal(hospital_id: str, reason: str) -> RecordDict:
    """A well-formed reply saying why a site did not train or evaluate (not an error)."""
    return RecordDict({STATUS: status_record(hospital_id, "refused", reason)})


def validate_update(
    content: RecordDict, expected_shapes: dict[str, tuple[int, ...]], global_state: dict[str, torch.Tensor], norm_bound: float
) -> str | None:
    """Return why a train reply must be rejected, or None if it is well-formed."""
    if set(content.array_records.keys()) != {ARRAYS} or len(content.array_records) != 1:
        return f"expected one ArrayRecord '{ARRAYS}', got {sorted(content.array_records.keys())}"
    if set(content.metric_records.keys()) != {METRICS}:
        return f"expected one MetricRecord '{METRICS}', got {sorted(content.metric_records.keys())}"
    extra = set(content.keys()) - {ARRAYS, METRICS, STATUS}
    if extra:
        return f"unexpected records {sorted(extra)}"
    arrays = content[ARRAYS]
    if set(arrays.keys()) != set(expected_shapes):
        return f"tensor keys {sorted(arrays.keys())} != expected {sorted(expected_shapes)}"
    metrics = content[METRICS]
    bad_metrics = set(metrics.keys()) - TRAIN_METRIC_KEYS
    if bad_metrics:
        return f"metric keys not allowed: {sorted(bad_metrics)}"
    n = metrics.get("num-examples")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"num-examples must be a positive integer, got {n!r}"
    sq = 0.0
    for key, shape in expected_shapes.items():
        arr = arrays[key]
        if arr.dtype != "float32":
            return f"{key}: dtype {arr.dtype} != float32"
        if tuple(arr.shape) != tuple(shape):
            return f"{key}: shape {tuple(arr.shape)} != expected {tuple(shape)}"
        try:
            values = arr.numpy()
        except Exception as exc:
            return f"{key}: undecodable tensor ({exc})"
        if values.dtype != np.float32:
            return f"{key}: dtype {values.dtype} != float32"
        if not np.isfinite(values).all():
            return f"{key}: non-finite values (NaN or Inf)"
        sq += float(((values.astype(np.float64) - global_state[key].numpy().astype(np.float64)) ** 2).sum())
    norm = math.sqrt(sq)
    if norm > norm_bound:
        return f"update norm {norm:.3g} exceeds the bound {norm_bound:g}"
    return None


def metric_record(values: dict, allowed: frozenset[str]) -> MetricRecord:
    unknown = set(values) - allowed
    if unknown:  # a programming error: never let a new key slip onto the wire unreviewed
        raise ValueError(f"metric keys not whitelisted: {sorted(unknown)}")
    return MetricRecord(values)
