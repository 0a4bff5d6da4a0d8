"""What crosses the wire: the tensors, the typed replies, and the aggregator's check of every update.

Hospitals send exactly the trainable tensors (common/model.TRAINABLE_KEYS) as float32, plus the
records of a reply model below and nothing else: anything computed from records (losses, counts,
truncation, refusal details) stays in the hospital's log, or leaves noised and charged to its
ledger (docs/deployment.md section 5 lists every field and its cost). A hospital builds its reply
from a model (`to_content`) and the aggregator parses it with the same model (`from_content`), so
a field is declared once: its record, its wire key (the field's name, kebab-cased), its type and range.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal, Self, get_args

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from pydantic import AfterValidator, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from .model import TRAINABLE_KEYS
from .schema import Schema, Sha256, issues

ARRAYS = "arrays"  # Flower strategies' default record keys
METRICS = "metrics"
CONFIG = "config"
STATUS = "fedprompt.status"
EVALUATION = "fedprompt.evaluation"  # a train reply's noised validation counts (one message per round)
LEDGER = "fedprompt.ledger"  # a train reply's ledger chain: the rollback witness (docs/privacy.md)

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


class ReplyError(ValueError):
    """A reply that does not match its model: the reason names the record and field."""


# --- one record of a reply ------------------------------------------------------------------------


class _Fields(Schema):
    """The fields of one record, under their wire keys (the field's name with '-' for '_')."""

    model_config = ConfigDict(alias_generator=lambda name: name.replace("_", "-"), populate_by_name=True)
    kind: ClassVar[type[MetricRecord] | type[ConfigRecord]]

    @classmethod
    def keys(cls) -> frozenset[str]:
        """The wire keys this record may carry."""
        return frozenset(f.alias or name for name, f in cls.model_fields.items())

    def to_record(self) -> MetricRecord | ConfigRecord:
        return self.kind(self.model_dump(by_alias=True, exclude_none=True))


class Status(_Fields):
    """Who answered, and whether it took part (a refusal names only its category)."""

    kind = ConfigRecord
    hospital_id: Annotated[str, Field(min_length=1, max_length=MAX_HOSPITAL_ID)]
    status: Literal["ok", "refused"]
    reason: str  # "" when ok

    @classmethod
    def ok(cls, hospital_id: str) -> Status:
        return cls(hospital_id=hospital_id, status="ok", reason="")

    @model_validator(mode="after")
    def _reason_fits(self) -> Self:
        if self.status == "ok" and self.reason:
            raise ValueError("reason must be empty when status is ok")
        if self.status == "refused" and self.reason not in REFUSAL_CATEGORIES:
            raise ValueError(f"a refusal's reason must be one of {list(REFUSAL_CATEGORIES)}, got {self.reason!r}")
        return self


class TrainMetrics(_Fields):
    """A train reply's numbers. No loss, no steps, no sigma, no q, no record count."""

    kind = MetricRecord
    # Flower's FedAvg weight key: the weight the site DECLARES (site.yaml `weight`), never its record count.
    num_examples: Annotated[float, Field(gt=0, le=MAX_WEIGHT)]
    private: Annotated[int, Field(ge=0, le=1)]  # 1: trained with DP-SGD
    # Present exactly when private is 1: the site's cumulative epsilon (its ledger), its cap, its delta.
    epsilon_spent: Annotated[float, Field(ge=0)] | None = None
    epsilon_cap: Annotated[float, Field(gt=0)] | None = None
    delta: Annotated[float, Field(gt=0, lt=1)] | None = None

    @model_validator(mode="after")
    def _privacy_fields(self) -> Self:
        given = [self.epsilon_spent, self.epsilon_cap, self.delta]
        if self.private and None in given:
            raise ValueError("a private update carries epsilon-spent, epsilon-cap and delta")
        if not self.private and given != [None, None, None]:
            raise ValueError("a non-private update carries no epsilon-spent, epsilon-cap or delta")
        if self.epsilon_spent is not None and self.epsilon_cap is not None and self.epsilon_spent > self.epsilon_cap:
            raise ValueError(
                f"epsilon-spent {self.epsilon_spent:g} exceeds the site's own epsilon-cap {self.epsilon_cap:g}"
            )
        return self


class LedgerChain(_Fields):
    """The hashes of the site's ledger entries from this run's first on, the head (its last entry) last.

    Public: hashes of the site's own accounting records. The aggregator keeps the head of each accepted
    reply and rejects a later reply whose chain does not contain it (a ledger cut or rolled back).
    """

    kind = ConfigRecord
    chain: Annotated[list[Sha256], Field(min_length=1)]

    @property
    def head(self) -> str:
        return self.chain[-1]


def _num_labels(values: list[float], info: ValidationInfo) -> list[float]:
    n = (info.context or {}).get("num_labels")
    if n is not None and len(values) != n:
        raise ValueError(f"expected one count per label ({n}), got {len(values)}")
    return values


PerLabel = Annotated[list[float], AfterValidator(_num_labels)]


class Counts(_Fields):
    """Noised per-class validation counts (`share_evaluation: noised`), charged to the site's ledger."""

    kind = MetricRecord
    tp: PerLabel
    fp: PerLabel
    fn: PerLabel


# --- replies: records by name ----------------------------------------------------------------------


class _Reply(Schema):
    """A reply: each field one record (its alias the record's name); `tensors` says if it carries ARRAYS."""

    model_config = ConfigDict(populate_by_name=True)
    tensors: ClassVar[bool] = False

    @classmethod
    def records(cls) -> dict[str, type[_Fields]]:
        return {f.alias or name: _record_model(f.annotation) for name, f in cls.model_fields.items()}

    @classmethod
    def from_content(cls, content: RecordDict, *, num_labels: int | None = None) -> Self:
        """The reply in `content`, validated; ReplyError names the record and field of each problem."""
        records, data = cls.records(), {}
        for name in content.keys():
            record = content[name]
            if name == ARRAYS and cls.tensors:
                if not isinstance(record, ArrayRecord):
                    raise ReplyError(f"record {name!r}: expected an ArrayRecord, got a {type(record).__name__}")
                continue
            if name not in records:
                allowed = ", ".join(repr(r) for r in sorted([*records, *([ARRAYS] if cls.tensors else [])]))
                raise ReplyError(f"unexpected record {name!r}: a {cls.__name__} carries only {allowed}")
            kind = records[name].kind
            if not isinstance(record, kind):
                raise ReplyError(f"record {name!r}: expected a {kind.__name__}, got a {type(record).__name__}")
            data[name] = dict(record)
        if cls.tensors and ARRAYS not in content.keys():
            raise ReplyError(f"missing record {ARRAYS!r} (an ArrayRecord)")
        for field, info in cls.model_fields.items():
            key = info.alias or field
            if info.is_required() and key not in data:
                raise ReplyError(f"missing record {key!r} (a {records[key].kind.__name__})")
        try:
            return cls.model_validate(data, context={"num_labels": num_labels})
        except ValidationError as exc:
            problems = (f"{key}: {message}" if key else message for key, message in issues(cls, exc))
            raise ReplyError("; ".join(problems)) from None

    def to_content(self, arrays: ArrayRecord | None = None) -> RecordDict:
        content = RecordDict({ARRAYS: arrays} if arrays is not None else {})
        for name, f in type(self).model_fields.items():
            value = getattr(self, name)
            if value is not None:
                content[f.alias or name] = value.to_record()
        return content


def _record_model(annotation: Any) -> type[_Fields]:
    """The record model of a reply's field (`Counts | None` -> Counts)."""
    if isinstance(annotation, type) and issubclass(annotation, _Fields):
        return annotation
    return next(_record_model(a) for a in get_args(annotation) if a is not type(None))


def _ok(status: Status) -> Status:
    if status.status != "ok":
        raise ValueError(f"status must be ok, got {status.status!r}")
    return status


def _refused(status: Status) -> Status:
    if status.status != "refused":
        raise ValueError(f"status must be refused, got {status.status!r}")
    return status


OkStatus = Annotated[Status, Field(alias=STATUS), AfterValidator(_ok)]


class TrainReply(_Reply):
    """The site trained this round: the tensors (ARRAYS) and these records."""

    tensors = True
    status: OkStatus
    metrics: Annotated[TrainMetrics, Field(alias=METRICS)]
    ledger: Annotated[LedgerChain, Field(alias=LEDGER)]
    # the model received, validated (opt-in, noised; `evaluation: in_train`)
    evaluation: Annotated[Counts | None, Field(alias=EVALUATION)] = None


class EvaluateReply(_Reply):
    """The site validated the model received: its status alone (the default), or noised counts too."""

    status: OkStatus
    metrics: Annotated[Counts | None, Field(alias=METRICS)] = None


class PreflightReply(_Reply):
    """The site will train the run: its status alone."""

    status: OkStatus


class Refusal(_Reply):
    """The site did not take part: the category alone (REFUSAL_CATEGORIES)."""

    status: Annotated[Status, Field(alias=STATUS), AfterValidator(_refused)]


def refusal(hospital_id: str, category: str) -> RecordDict:
    """A well-formed reply saying that a site did not train or evaluate (not an error).

    Only the category (REFUSAL_CATEGORIES) leaves: the detail stays in the site's own log. Any
    other category is a programming error (ValueError): free text never reaches the wire.
    """
    return Refusal(status=Status(hospital_id=hospital_id, status="refused", reason=category)).to_content()


# --- the tensors ------------------------------------------------------------------------------------


def state_to_arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(state[k].detach().cpu().numpy().astype(np.float32))) for k in TRAINABLE_KEYS}
    )


def arrays_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(record[k].numpy(), copy=True)) for k in record.keys()}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor data in a record (what one upload costs, before framing)."""
    return sum(len(arr.data) for arr in record.values())


def _show(value: object) -> str:
    """A value from a message, named safely in a reason (type + bounded repr)."""
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def round_of(config: ConfigRecord | None) -> int:
    """The round number (`fp.round`) in a message's config record, 0 without one (timing lines)."""
    value = config.get("fp.round", 0) if config is not None else 0
    if isinstance(value, list):
        raise TypeError(f"fp.round must be a number, got {_show(value)}")
    return int(value)


def check_update(
    arrays: ArrayRecord,
    expected_shapes: dict[str, tuple[int, ...]],
    global_state: dict[str, torch.Tensor],
    bound: float,
) -> str | None:
    """Why a train reply's tensors must be rejected, or None: exactly the expected keys, each float32 of
    its shape with finite values, and the L2 norm of (update - global) within `bound`
    (common/schedule.update_bound, from the reply's declared weight)."""
    try:
        decoded = decode_tensors(arrays, expected_shapes)
    except ValueError as exc:
        return str(exc)
    sq = 0.0
    for key, values in decoded.items():
        sq += float(((values.astype(np.float64) - global_state[key].numpy().astype(np.float64)) ** 2).sum())
    norm = math.sqrt(sq)
    if norm > bound:
        return f"update norm {norm:.3g} exceeds the bound {bound:g}"
    return None


def decode_tensors(arrays: ArrayRecord, expected_shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The tensors of `arrays`, decoded; ValueError (the reason) unless they are exactly the expected
    keys, each float32 of its expected shape with finite values. The aggregator checks every update
    with it (check_update), a site every model it receives (client/limits.py)."""
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
