"""What crosses the wire, and the aggregator's check of every update before aggregation.

Hospitals send exactly the trainable tensors (common/model.TRAINABLE_KEYS) as float32, plus
the few fields whitelisted below and a small status record. Nothing else: anything computed from
records (losses, counts, truncation, refusal details) stays in the hospital's log, or leaves
noised and charged to its ledger (docs/deployment.md section 5 lists every field and its cost).
Every field of every reply is type-checked here before the aggregator uses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeGuard

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from .model import HEAD_BIAS_KEY, TRAINABLE_KEYS

ARRAYS = "arrays"  # Flower strategies' default record keys
METRICS = "metrics"
CONFIG = "config"
STATUS = "fedprompt.status"
EVALUATION = "fedprompt.evaluation"  # a train reply's noised validation counts (one message per round)

# What a train reply's MetricRecord may carry (docs/deployment.md section 5 says what each costs).
# `num-examples` is Flower's FedAvg weight key: it carries the weight the site DECLARES in its
# site.yaml (`weight`, default 1.0), never its record count. No loss, no steps, no sigma, no q.
TRAIN_METRIC_KEYS = frozenset({"num-examples", "private", "epsilon-spent", "epsilon-cap", "delta"})
PRIVATE_METRIC_KEYS = frozenset({"epsilon-spent", "epsilon-cap", "delta"})  # present iff private == 1
# An evaluate reply carries no MetricRecord unless the site opted in (`share_evaluation: noised`):
# then only Gaussian-noised per-class counts, charged to its ledger. Never a loss, never N.
EVAL_METRIC_KEYS = frozenset({"tp", "fp", "fn"})
STATUS_KEYS = frozenset({"hospital-id", "status", "reason"})
# All a refusal says about why: the detail (files, lines, labels, paths) stays in the site's log.
REFUSAL_CATEGORIES = (
    "budget",  # epsilon cap reached, or the privacy ledger cannot account for the round
    "backbone",  # the site's backbone differs from the federation's, or cannot be loaded
    "records",  # the site's records are unreadable or invalid (e.g. a label outside the label space)
    "configuration",  # the site's or the federation's configuration is invalid or incompatible
    # under the plan, the site's update would be mostly noise (its declared size is small for its budget)
    "too few records",
    "non-private refused",  # the aggregator asked for training without DP and the site does not allow it
    "internal",  # an unexpected failure at the site (its log has the traceback)
    # the submitted app bundle is not a code-free bundle naming the installed fedprompt (client/bundle.py)
    "untrusted app",
    "worker unavailable",  # the site's warm worker died or hung on this message (it is restarted for the next)
)
MAX_HOSPITAL_ID = 64
MAX_WEIGHT = 1e9  # a declared FedAvg weight above this is rejected (a sum of them must stay finite)


def state_to_arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(state[k].detach().cpu().numpy().astype(np.float32))) for k in TRAINABLE_KEYS}
    )


def arrays_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(record[k].numpy(), copy=True)) for k in record.keys()}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor data in a record (what one upload costs, before framing)."""
    return sum(len(arr.data) for arr in record.values())


def status_record(hospital_id: str, status: str, reason: str = "") -> ConfigRecord:
    return ConfigRecord({"hospital-id": hospital_id, "status": status, "reason": reason})


def refusal(hospital_id: str, category: str) -> RecordDict:
    """A well-formed reply saying that a site did not train or evaluate (not an error).

    Only the category (REFUSAL_CATEGORIES) leaves: the detail stays in the site's own log.
    """
    if category not in REFUSAL_CATEGORIES:  # a programming error: never let free text onto the wire
        raise ValueError(f"refusal category {category!r} is not one of {REFUSAL_CATEGORIES}")
    return RecordDict({STATUS: status_record(hospital_id, "refused", category)})


def _show(value: object) -> str:
    """A value from a reply, named safely in a rejection reason (type + bounded repr)."""
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def round_of(config: ConfigRecord | None) -> int:
    """The round number (`fp.round`) in a message's config record, 0 without one (timing lines)."""
    value = config.get("fp.round", 0) if config is not None else 0
    if isinstance(value, list):
        raise TypeError(f"fp.round must be a number, got {_show(value)}")
    return int(value)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_records(content: RecordDict, arrays: set[str], metrics: set[str], configs: set[str]) -> str | None:
    got = {
        "ArrayRecord": (set(content.array_records.keys()), arrays),
        "MetricRecord": (set(content.metric_records.keys()), metrics),
        "ConfigRecord": (set(content.config_records.keys()), configs),
    }
    for kind, (have, want) in got.items():
        if have != want:
            return f"expected {kind}s {sorted(want)}, got {sorted(have)}"
    extra = set(content.keys()) - arrays - metrics - configs
    return f"unexpected records {sorted(extra)}" if extra else None


def validate_status(content: RecordDict, allowed: tuple[str, ...] = ("ok", "refused")) -> str | None:
    """Why a reply's status record is malformed, or None. Every field type-checked."""
    if STATUS not in content.config_records:
        return f"no status record '{STATUS}'"
    status = content.config_records[STATUS]
    if set(status.keys()) != STATUS_KEYS:
        return f"status keys {sorted(status.keys())} != expected {sorted(STATUS_KEYS)}"
    hospital_id, state, reason = status["hospital-id"], status["status"], status["reason"]
    if not (isinstance(hospital_id, str) and 0 < len(hospital_id) <= MAX_HOSPITAL_ID):
        return f"status hospital-id must be a string of 1..{MAX_HOSPITAL_ID} characters, got {_show(hospital_id)}"
    if not (isinstance(state, str) and state in allowed):
        return f"status must be one of {list(allowed)}, got {_show(state)}"
    if not isinstance(reason, str):
        return f"status reason must be a string, got {_show(reason)}"
    if state == "ok" and reason:
        return "status reason must be empty when status is ok"
    if state == "refused" and reason not in REFUSAL_CATEGORIES:
        return f"refusal reason must be one of {list(REFUSAL_CATEGORIES)}, got {_show(reason)}"
    return None


def validate_refusal(content: RecordDict) -> str | None:
    """Why a refusal reply is malformed (it carries only a status record with a category), or None."""
    return _check_records(content, set(), set(), {STATUS}) or validate_status(content, ("refused",))


def validate_train_metrics(metrics: MetricRecord) -> str | None:
    """Why a train reply's MetricRecord is malformed, or None: whitelisted keys, each typed."""
    keys = set(metrics.keys())
    if keys - TRAIN_METRIC_KEYS:
        return f"metric keys not allowed: {sorted(keys - TRAIN_METRIC_KEYS)}"
    for key in ("num-examples", "private"):
        if key not in keys:
            return f"missing metric {key!r}"
    weight = metrics["num-examples"]
    if not (_is_number(weight) and 0 < weight <= MAX_WEIGHT):
        return (
            f"num-examples (the site's declared weight) must be a finite number in (0, {MAX_WEIGHT:g}], got "
            f"{_show(weight)}"
        )
    private = metrics["private"]
    if not (isinstance(private, int) and not isinstance(private, bool) and private in (0, 1)):
        return f"private must be the integer 0 or 1, got {_show(private)}"
    if private and PRIVATE_METRIC_KEYS - keys:
        return f"private update lacks {sorted(PRIVATE_METRIC_KEYS - keys)}"
    if not private and keys & PRIVATE_METRIC_KEYS:
        return f"non-private update carries {sorted(keys & PRIVATE_METRIC_KEYS)}"
    if private:
        spent, cap, delta = metrics["epsilon-spent"], metrics["epsilon-cap"], metrics["delta"]
        if not (_is_number(spent) and spent >= 0):
            return f"epsilon-spent must be a finite number >= 0, got {_show(spent)}"
        if not (_is_number(cap) and cap > 0):
            return f"epsilon-cap must be a finite number > 0, got {_show(cap)}"
        if not (_is_number(delta) and 0 < delta < 1):
            return f"delta must be a number in (0, 1), got {_show(delta)}"
        if spent > cap:
            return f"epsilon-spent {spent:g} exceeds the site's own epsilon-cap {cap:g}"
    return None


def validate_update(
    content: RecordDict,
    expected_shapes: dict[str, tuple[int, ...]],
    global_state: dict[str, torch.Tensor],
    norm_bound: float | Callable[[float], float],
) -> str | None:
    """Return why a train reply must be rejected, or None if it is well-formed.

    Every field is checked for presence and type, so that nothing downstream can trip on it.
    `norm_bound`: on the L2 norm of (update - global); or a function of the reply's declared weight
    (`num-examples`) giving it (common/schedule.update_bound).
    """
    # the model received, validated (opt-in, noised)
    shared = {EVALUATION} if EVALUATION in content.metric_records else set()
    reason = _check_records(content, {ARRAYS}, {METRICS} | shared, {STATUS})
    if reason:
        return reason
    if shared and (reason := validate_counts(content.metric_records[EVALUATION], expected_shapes[HEAD_BIAS_KEY][0])):
        return f"evaluation: {reason}"
    arrays = content.array_records[ARRAYS]
    if set(arrays.keys()) != set(expected_shapes):
        return f"tensor keys {sorted(arrays.keys())} != expected {sorted(expected_shapes)}"
    reason = validate_train_metrics(content.metric_records[METRICS]) or validate_status(content, ("ok",))
    if reason:
        return reason
    try:
        decoded = decode_tensors(arrays, expected_shapes)
    except ValueError as exc:
        return str(exc)
    sq = 0.0
    for key, values in decoded.items():
        sq += float(((values.astype(np.float64) - global_state[key].numpy().astype(np.float64)) ** 2).sum())
    norm = math.sqrt(sq)
    weight = content.metric_records[METRICS]["num-examples"]  # validated above: a positive number
    bound = norm_bound if isinstance(norm_bound, (int, float)) else norm_bound(float(weight))  # type: ignore[arg-type]
    if norm > bound:
        return f"update norm {norm:.3g} exceeds the bound {bound:g}"
    return None


def decode_tensors(arrays: ArrayRecord, expected_shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The tensors of `arrays`, decoded; ValueError (the reason) unless they are exactly the expected
    keys, each float32 of its expected shape with finite values. The aggregator checks every update
    with it (validate_update), a site every model it receives (client/limits.py)."""
    if set(arrays.keys()) != set(expected_shapes):
        raise ValueError(f"tensor keys {sorted(arrays.keys())} != expected {sorted(expected_shapes)}")
    decoded = {}
    for key, shape in expected_shapes.items():
        arr = arrays[key]
        if arr.dtype != "float32":
            raise ValueError(f"{key}: dtype {arr.dtype} != float32")
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"{key}: shape {tuple(arr.shape)} != expected {tuple(shape)}")
        try:
            values = arr.numpy()
        except Exception as exc:
            raise ValueError(f"{key}: undecodable tensor ({exc})") from None
        if values.dtype != np.float32:
            raise ValueError(f"{key}: dtype {values.dtype} != float32")
        if tuple(values.shape) != tuple(shape):
            raise ValueError(f"{key}: decoded shape {tuple(values.shape)} != expected {tuple(shape)}")
        if not np.isfinite(values).all():
            raise ValueError(f"{key}: non-finite values (NaN or Inf)")
        decoded[key] = values
    return decoded


def validate_evaluation(content: RecordDict, num_labels: int) -> str | None:
    """Why an evaluate reply is malformed, or None.

    Well-formed: a refusal; a status record alone (the site evaluated locally, the default); or a
    status record and noised per-class counts (`share_evaluation: noised`): exactly `tp`, `fp`,
    `fn`, each a list of `num_labels` finite numbers.
    """
    if STATUS in content.config_records and content.config_records[STATUS].get("status") == "refused":
        return validate_refusal(content)
    metrics = {METRICS} if METRICS in content.metric_records else set()
    reason = _check_records(content, set(), metrics, {STATUS}) or validate_status(content, ("ok",))
    if reason or not metrics:
        return reason
    return validate_counts(content.metric_records[METRICS], num_labels)


def validate_counts(m: MetricRecord, num_labels: int) -> str | None:
    """Why noised per-class counts are malformed, or None: exactly tp, fp, fn, each `num_labels` finite numbers."""
    if set(m.keys()) != EVAL_METRIC_KEYS:
        return f"evaluation metric keys {sorted(m.keys())} != expected {sorted(EVAL_METRIC_KEYS)}"
    for key in sorted(EVAL_METRIC_KEYS):
        values = m[key]
        if not (isinstance(values, list) and len(values) == num_labels and all(_is_number(v) for v in values)):
            return f"{key} must be a list of {num_labels} finite numbers, got {_show(values)}"
    return None


def metric_record(values: dict, allowed: frozenset[str]) -> MetricRecord:
    unknown = set(values) - allowed
    if unknown:  # a programming error: never let a new key slip onto the wire unreviewed
        raise ValueError(f"metric keys not whitelisted: {sorted(unknown)}")
    return MetricRecord(values)
