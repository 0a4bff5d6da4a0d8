"""The ledger's contents on disk, validated on read by these models (common/schema.py): entries,
completions, the schema-2 file and the schema-1 file it migrates, and `_State`, a ledger in memory."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, Self, get_args

from pydantic import AfterValidator, Field, model_validator

from fedprompt.common.schema import SHA256_PATTERN, Schema, Sha256

from .hashing import record_hash

SCHEMA: Final = "fedprompt-ledger/2"
SCHEMA_V1: Final = "fedprompt-ledger/1"  # still read; migrated on the next write
ANCHOR_SCHEMA: Final = "fedprompt-ledger-anchor/1"
Mechanism = Literal["prv", "rdp"]
MECHANISMS = get_args(Mechanism)

_SHA256 = re.compile(SHA256_PATTERN)


def _iso8601(value: str) -> str:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"expected an ISO 8601 timestamp, got {value!r}") from None
    return value


Timestamp = Annotated[str, AfterValidator(_iso8601)]
Count = Annotated[int, Field(ge=0)]
PositiveNumber = Annotated[float, Field(gt=0)]
NonEmpty = Annotated[str, Field(min_length=1)]


if TYPE_CHECKING:  # a mixin of Schema models: to a type checker, one of them
    _ChainedBase = Schema
else:
    _ChainedBase = object


class _Chained(_ChainedBase):
    """An entry or completion: a link of its chain (`prev`: the hash before it; `hash`: its own)."""

    def to_doc(self) -> dict[str, Any]:
        """What is stored and hashed: the same keys and values as the file holds."""
        return self.model_dump()

    def linked(self, prev: str) -> Self:
        """This record chained after `prev`, with its own hash."""
        body = self.model_copy(update={"prev": prev, "hash": ""})
        return body.model_copy(update={"hash": record_hash(body.to_doc())})


class _EntryV1(Schema):
    """A round as schema "fedprompt-ledger/1" recorded it (always private)."""

    noise_multiplier: PositiveNumber
    sample_rate: Annotated[float, Field(gt=0, le=1)]
    steps: Annotated[int, Field(ge=1)]
    run_id: NonEmpty
    round: Count
    recorded_at: Timestamp


class LedgerEntry(_Chained, _EntryV1):
    """One planned round (or a charged evaluation), recorded before it ran; never changed afterwards."""

    # None: a non-private round (infinite epsilon). A pydantic field redefined on purpose (wider than v1's).
    noise_multiplier: PositiveNumber | None  # type: ignore[assignment]
    non_private: bool = False
    epsilon_cap: PositiveNumber | None = None  # the cap it was checked against (None: recorded before schema 2)
    records_sha256: Sha256 | None = None
    model_in_sha256: Sha256 | None = None
    prev: str = ""
    hash: str = ""

    @model_validator(mode="after")
    def _null_sigma_is_non_private(self) -> Self:
        if self.non_private != (self.noise_multiplier is None):
            raise ValueError(
                f"non_private is {str(self.non_private).lower()} but noise_multiplier is {self.noise_multiplier!r}: "
                "exactly the non-private rounds have a null noise_multiplier"
            )
        return self


class _StoredEntry(LedgerEntry):
    """An entry as schema 2 stores it: every key present, chained."""

    non_private: bool
    epsilon_cap: PositiveNumber | None
    records_sha256: Sha256 | None
    model_in_sha256: Sha256 | None
    prev: Sha256
    hash: Sha256


class Completion(_Chained, Schema):
    """The hash of the update that left for history[entry], written after training, before the reply."""

    entry: Count
    entry_hash: Sha256
    model_out_sha256: Sha256
    completed_at: Timestamp
    prev: str = ""
    hash: str = ""


class _StoredCompletion(Completion):
    prev: Sha256
    hash: Sha256


class _Migration(Schema):
    schema_: Literal["fedprompt-ledger/1"] = Field(alias="schema")
    entries: Count


class _LedgerV1(Schema):
    """A "fedprompt-ledger/1" file: read as if migrated, stored as schema 2 at the next write."""

    schema_: Literal["fedprompt-ledger/1"] = Field(alias="schema")
    hospital_id: NonEmpty
    mechanism: Mechanism
    delta: Annotated[float, Field(gt=0, lt=1)]
    epsilon_cap: PositiveNumber  # the cap at the last record (not hashed)
    created_at: Timestamp
    history: list[_EntryV1]


class _LedgerV2(_LedgerV1):
    """A "fedprompt-ledger/2" file (the module's docstring)."""

    # pydantic fields redefined on purpose: the v2 file's schema and entries.
    schema_: Literal["fedprompt-ledger/2"] = Field(alias="schema")  # type: ignore[assignment]
    history: list[_StoredEntry]  # type: ignore[assignment]
    migrated_from: _Migration | None
    completions: list[_StoredCompletion]

    @model_validator(mode="after")
    def _migrated_entries_exist(self) -> Self:
        if self.migrated_from is not None and self.migrated_from.entries > len(self.history):
            raise ValueError(
                f"migrated_from names {self.migrated_from.entries} migrated entries, the history holds "
                f"{len(self.history)}"
            )
        return self


@dataclass(frozen=True)
class _State:
    hospital_id: str
    mechanism: str
    delta: float
    epsilon_cap: float
    created_at: str
    history: tuple[LedgerEntry, ...]
    completions: tuple[Completion, ...] = ()
    migrated_from: dict[str, Any] | None = None
    stored_schema: str = SCHEMA  # as read from disk: SCHEMA_V1 until the next write migrates it

    def header(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "hospital_id": self.hospital_id,
            "mechanism": self.mechanism,
            "delta": self.delta,
            "created_at": self.created_at,
            "migrated_from": self.migrated_from,
        }

    def header_hash(self) -> str:
        return record_hash(self.header())

    def head(self, n: int | None = None) -> str:
        """Hash of the chain of the first n entries (all by default): the header's hash for none."""
        n = len(self.history) if n is None else n
        return self.history[n - 1].hash if n else self.header_hash()

    def completions_head(self, n: int | None = None) -> str:
        n = len(self.completions) if n is None else n
        return self.completions[n - 1].hash if n else self.header_hash()

    def to_doc(self) -> dict[str, Any]:
        return {
            **self.header(),
            "epsilon_cap": self.epsilon_cap,
            "history": [e.to_doc() for e in self.history],
            "completions": [c.to_doc() for c in self.completions],
        }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
