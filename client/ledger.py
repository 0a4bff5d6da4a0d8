"""The hospital's privacy ledger: every DP-SGD step this site ever took, on disk, for good.

The ledger is the site's legal promise that it never exceeds its own epsilon cap, so it is built
to fail closed: it never under-counts (steps are recorded before training, under a lock, after
re-reading the file), never resets silently (a missing, unreadable or shrunken ledger is an
error, not an empty one), and never corrupts (atomic replace + fsync, strict validation on read).

Epsilon is what Opacus's own accountant reports for the same history: consecutive entries with
the same (noise_multiplier, sample_rate) are merged, exactly as the accountant's own `step()`
merges them, so a site that trained for many rounds with one sigma is accounted as one long run.

A tamper-evident audit trail (schema "fedprompt-ledger/2"):
- `history`: one entry per round, written BEFORE training, never changed afterwards: run_id, round,
  noise_multiplier (sigma; null for a non-private round), sample_rate (q), steps, non_private,
  epsilon_cap (the cap it was checked against), records_sha256 (the records file it trains on),
  model_in_sha256 (the model it received, `state_sha256`), recorded_at, `prev` (the hash of the
  entry before it; the first entry: the hash of the header) and `hash` (its own hash).
- `completions`: the out-hash of each update that left, appended after training and before the reply
  (`complete`): entry (index), entry_hash, model_out_sha256, completed_at, prev (the completion before
  it; the first: the header hash), hash. A separate append-only chain, so that `history` stays one
  immutable entry per round; an entry without a completion was recorded but its update never left
  (crash, refusal after recording) -- or it predates this schema, or it charged an evaluation.
- Every hash is `record_hash`: sha256 of the canonical JSON (sorted keys, no whitespace) of the
  object without its own "hash" key; the header is schema, hospital_id, mechanism, delta,
  created_at, migrated_from. The top-level `epsilon_cap` (the cap at the last record) is not hashed.
- A "fedprompt-ledger/1" ledger is read as if migrated (its entries chained from a header with
  migrated_from {"schema": "fedprompt-ledger/1", "entries": N}, their new hash fields null); the
  next write stores it so. Deterministic: every process computes the same hashes.
- The chain has no secret: it shows a deleted, edited, inserted or reordered entry (with its
  index), not a chain rewritten from scratch. The ANCHOR does that: a small file (site.yaml
  `ledger_anchor`, default `<ledger>.anchor`; best on another volume) holding the entry and
  completion counts and heads, rewritten atomically after every ledger write (ledger first, then
  anchor) and checked on every open and before every record: a ledger with fewer entries than its
  anchor, or another entry where the anchor's head was, is an older copy restored (rollback) and is
  refused. A ledger AHEAD of its anchor is accepted (a crash between the two writes).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import os
import re
import stat
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, Self, TypeGuard, get_args

import numpy as np
from pydantic import AfterValidator, Field, ValidationError, model_validator

from fedprompt.common.accounting import accountant_history, compute_epsilon
from fedprompt.common.atomic import DirectorySyncError, atomic_write
from fedprompt.common.errors import LedgerError, PrivacyBudgetExceeded
from fedprompt.common.schema import SHA256_PATTERN, Schema, Sha256, issues

if TYPE_CHECKING:
    from fedprompt.common.config import SiteConfig

SCHEMA: Final = "fedprompt-ledger/2"
SCHEMA_V1: Final = "fedprompt-ledger/1"  # still read; migrated on the next write
ANCHOR_SCHEMA: Final = "fedprompt-ledger-anchor/1"
Mechanism = Literal["prv", "rdp"]
MECHANISMS = get_args(Mechanism)
# How long `record` waits for another process holding the ledger (it may be computing a PRV).
LOCK_TIMEOUT_S = 300.0
# Above this RDP epsilon the guarantee is meaningless and Opacus's PRV discretisation needs
# gigabytes (it was OOM-killed on a 23 GB host at RDP epsilon ~30000); report the RDP bound there,
# which is also a valid upper bound, so the ledger still never under-counts.

_SHA256 = re.compile(SHA256_PATTERN)
_NEVER_RECREATE = (
    "Never recreate a ledger for a site that has trained: that forgets the epsilon it already spent; "
    "restore the file from a backup instead."
)


class LedgerIntegrityError(LedgerError):
    """A ledger that cannot be trusted, with where: `kind` is one of missing, unreadable, corrupted,
    chain, identity, anchor, rollback; `where` ("history", "completions" or None) and `index` locate it."""

    def __init__(self, message: str, *, kind: str, where: str | None = None, index: int | None = None):
        super().__init__(message)
        self.kind, self.where, self.index = kind, where, index


# --- hashes -------------------------------------------------------------------------------------


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


# --- the ledger's contents: validated on read by these models (common/schema.py) ------------------


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


def _triples(history: Iterable[LedgerEntry]) -> list[tuple[float | None, float, int]]:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in history]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_step_args(
    noise_multiplier: float | None, sample_rate: float, steps: int, *, non_private: bool = False
) -> None:
    if non_private:
        if noise_multiplier is not None:
            raise ValueError(f"a non-private round has no noise_multiplier (null), got {noise_multiplier!r}")
    elif _is_number(noise_multiplier) and noise_multiplier == 0:
        raise ValueError(
            "noise_multiplier 0 is non-private training: it spends infinite epsilon, is a separate, "
            "labelled mode, and is recorded only by `record_non_private`"
        )
    elif not (_is_number(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if not (_is_number(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not (_is_int(steps) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _check_cap(epsilon_cap: float) -> None:
    if not (_is_number(epsilon_cap) and epsilon_cap > 0):
        raise ValueError(f"epsilon_cap must be a finite number > 0, got {epsilon_cap!r}")


def _corrupt(
    path: Path, detail: str, *, kind: str = "corrupted", where: str | None = None, index: int | None = None
) -> LedgerIntegrityError:
    return LedgerIntegrityError(
        f"privacy ledger {path} is corrupted ({detail}). It was NOT reset and nothing may be trained "
        f"until it is repaired. {_NEVER_RECREATE}",
        kind=kind,
        where=where,
        index=index,
    )


def _read_state(path: Path) -> _State:
    """Load and strictly validate a ledger file, its chain included; any doubt is a LedgerError,
    never a fresh ledger."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LedgerIntegrityError(
            f"no privacy ledger at {path}. For a site that has never trained, create one with "
            f"`fedprompt privacy init --site site.yaml`. {_NEVER_RECREATE}",
            kind="missing",
        ) from None
    except OSError as exc:
        raise LedgerIntegrityError(
            f"cannot read privacy ledger {path}: {exc.strerror or exc}", kind="unreadable"
        ) from exc
    try:
        # NaN/Infinity/1e999 parse, but every number then goes through a finiteness check.
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _corrupt(path, f"not valid JSON: {exc}") from None
    return _parse(doc, path)


def _parse(doc: Any, path: Path) -> _State:
    if not isinstance(doc, dict):
        raise _corrupt(path, f"expected a JSON object, got {type(doc).__name__}")
    schema = doc.get("schema")
    if schema not in (SCHEMA, SCHEMA_V1):
        raise _corrupt(
            path, f"schema is {schema!r}, expected {SCHEMA!r} (or {SCHEMA_V1!r}, migrated on the next write)"
        )
    model = _LedgerV1 if schema == SCHEMA_V1 else _LedgerV2
    try:
        parsed = model.model_validate(doc)
    except ValidationError as exc:
        raise _corrupt(
            path, "; ".join(f"{key}: {message}" if key else message for key, message in issues(model, exc))
        ) from None
    header = (parsed.hospital_id, parsed.mechanism, parsed.delta, parsed.epsilon_cap, parsed.created_at)
    # As LedgerEntry/Completion, equal to what this process records (a stored form is another type).
    entries = tuple(LedgerEntry(**e.model_dump()) for e in parsed.history)
    if schema == SCHEMA_V1:
        # Read as if migrated: chained from a header saying so. Deterministic, so every process agrees.
        state = _State(*header, (), (), {"schema": SCHEMA_V1, "entries": len(entries)}, SCHEMA_V1)
        linked: list[LedgerEntry] = []
        for e in entries:
            linked.append(e.linked(linked[-1].hash if linked else state.header_hash()))
        return replace(state, history=tuple(linked))
    assert isinstance(parsed, _LedgerV2)
    migrated = None if parsed.migrated_from is None else parsed.migrated_from.model_dump(by_alias=True)
    completions = tuple(Completion(**c.model_dump()) for c in parsed.completions)
    state = _State(*header, entries, completions, migrated, SCHEMA)
    _verify_chain(state, path)
    return state


def _verify_chain(state: _State, path: Path) -> None:
    """Each entry's prev is the hash before it and its hash is its own; the same for completions,
    each of which must complete an existing entry (by index and hash), once."""

    def broken(where: str, i: int, detail: str) -> LedgerIntegrityError:
        return _corrupt(path, f"{where}[{i}]: {detail}", kind="chain", where=where, index=i)

    header = state.header_hash()
    chains: tuple[tuple[str, Sequence[LedgerEntry | Completion]], ...] = (
        ("history", state.history),
        ("completions", state.completions),
    )
    for where, items in chains:
        expected = header
        for i, item in enumerate(items):
            if item.prev != expected:
                before = "the header" if i == 0 else f"{where}[{i - 1}]"
                raise broken(
                    where,
                    i,
                    f"its prev is not the hash of {before}: an entry before it was deleted, inserted or "
                    f"reordered{', or the header was edited' if i == 0 else ''}",
                )
            if item.hash != record_hash(item.to_doc()):
                raise broken(where, i, "its contents do not match its hash: it was edited")
            expected = item.hash
    completed: set[int] = set()
    for i, c in enumerate(state.completions):
        if c.entry >= len(state.history) or state.history[c.entry].hash != c.entry_hash:
            raise broken("completions", i, f"it completes history[{c.entry}], which is not there or is another entry")
        if c.entry in completed:
            raise broken("completions", i, f"history[{c.entry}] is completed twice")
        completed.add(c.entry)


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """flock on a sidecar `<ledger>.lock`: the ledger itself is replaced on every write, so it can't hold a lock."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LedgerError(
            f"cannot open the ledger lock {lock_path}: {exc.strerror or exc}; nothing was recorded"
        ) from exc
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LedgerError(
                        f"privacy ledger {path} is locked by another process (waited {LOCK_TIMEOUT_S:g} s); nothing "
                        "was recorded"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # releases the flock


def _write_atomic(path: Path, doc: dict[str, Any], *, anchor: bool = False) -> None:
    """Replace `path` with `doc` so that a crash leaves either the old file or the new one, durably.

    The one writer of both files: the ledger, and (`anchor=True`) its anchor, always right after it.
    """
    data = (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode("utf-8")
    try:
        # Keep the file's mode across rewrites; a new ledger is world-readable for audits (no personal data).
        mode = stat.S_IMODE(os.stat(path).st_mode) if path.exists() else 0o644
        atomic_write(path, data, mode=mode)
    except DirectorySyncError as exc:
        # The new file is in place but may not survive a power cut: stop; the entry counts if it does.
        what = "ledger anchor" if anchor else "privacy ledger"
        raise LedgerError(
            f"{what} {path} was written but its directory could not be synced: {exc.strerror or exc}"
        ) from exc
    except OSError as exc:
        if anchor:
            raise LedgerError(
                f"cannot write the ledger anchor {path}: {exc.strerror or exc}; the ledger itself was written (its new "
                "entry counts), but nothing may be trained or sent until its anchor can be written"
            ) from exc
        raise LedgerError(
            f"cannot write privacy ledger {path}: {exc.strerror or exc}; nothing was recorded, so nothing may be "
            "trained or sent"
        ) from exc


# --- the anchor: rollback detection across processes --------------------------------------------


def default_anchor(ledger: str | Path) -> Path:
    """Where the anchor lives when site.yaml names none: `<ledger>.anchor`, beside the ledger."""
    ledger = Path(ledger)
    return ledger.with_name(ledger.name + ".anchor")


class _Anchor(Schema):
    schema_: Literal["fedprompt-ledger-anchor/1"] = Field(alias="schema")
    hospital_id: str
    entries: Count
    head: Sha256
    completions: Count
    completions_head: Sha256
    updated_at: Timestamp


def _anchor_doc(state: _State) -> dict[str, Any]:
    return _Anchor(
        schema=ANCHOR_SCHEMA,
        hospital_id=state.hospital_id,
        entries=len(state.history),
        head=state.head(),
        completions=len(state.completions),
        completions_head=state.completions_head(),
        updated_at=_now(),
    ).model_dump(by_alias=True)


# Re-creating a lost anchor needs the head the aggregator last witnessed (docs/privacy.md, "rollback witness").
_REANCHOR = (
    "`fedprompt privacy anchor --site site.yaml --last-head HEX` (HEX: the last `ledger_head` the aggregator's "
    "metrics.json records for this site)"
)


def _contains_head(state: _State, last_head: str | None, path: Path) -> None:
    """Refuse to re-anchor a ledger that has entries unless its chain holds `last_head`, the head the
    aggregator last saw from this site: without it, a ledger cut and re-anchored would pass for whole."""
    if not state.history:
        return  # nothing recorded, nothing to lose
    if last_head is None:
        raise LedgerIntegrityError(
            f"privacy ledger {path} has {len(state.history)} entries and no usable anchor: re-creating one needs "
            f"the last ledger head the aggregator recorded for this site: {_REANCHOR}; nothing was written",
            kind="anchor",
        )
    if last_head not in {e.hash for e in state.history}:
        raise LedgerIntegrityError(
            f"privacy ledger {path} does not contain the head {last_head[:16]}... the aggregator last saw: entries "
            f"were cut or an older copy restored; nothing was written. Restore the latest ledger. {_NEVER_RECREATE}",
            kind="rollback",
        )


def _read_anchor(path: Path) -> _Anchor | None:
    """The anchor, None if there is none; an unreadable or malformed one is an error."""

    def bad(detail: str) -> LedgerIntegrityError:
        return LedgerIntegrityError(
            f"the privacy ledger's anchor {path} is unusable ({detail}); nothing may be trained until it is restored "
            f"(or, only if you are sure the ledger is the latest, re-created with {_REANCHOR})",
            kind="anchor",
        )

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise bad(f"cannot read it: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"not valid JSON: {exc}") from None
    try:
        return _Anchor.model_validate(doc)
    except ValidationError as exc:
        raise bad("; ".join(f"{key}: {message}" if key else message for key, message in issues(_Anchor, exc))) from None


def _check_anchor(state: _State, anchor: _Anchor | None, anchor_path: Path, path: Path) -> str:
    """Refuse a ledger older than its anchor (a restored copy); returns "in step", "ahead" (a crash
    between the ledger write and the anchor write: accepted) or "none" (no anchor yet)."""
    if anchor is None:
        if state.stored_schema == SCHEMA_V1 or not (state.history or state.completions):
            # written at the next write (a schema-1 ledger predates anchors; an empty one has nothing to lose)
            return "none"
        raise LedgerIntegrityError(
            f"the anchor of privacy ledger {path} is missing ({anchor_path}) but the ledger holds "
            f"{len(state.history)} entries: an anchor is written with every entry, so it was lost, moved, or this "
            "ledger was put in another's place. Nothing may be trained until the anchor is restored (or site.yaml "
            "`ledger_anchor` points at it); only if you are sure this ledger is the latest, re-create it with "
            f"{_REANCHOR}",
            kind="anchor",
        )
    if anchor.hospital_id != state.hospital_id:
        raise LedgerIntegrityError(
            f"the anchor {anchor_path} belongs to hospital {anchor.hospital_id!r}, the privacy ledger {path} to "
            f"{state.hospital_id!r}; nothing may be trained",
            kind="anchor",
        )
    for where, items, n, head, heads in (
        ("history", state.history, anchor.entries, anchor.head, state.head),
        ("completions", state.completions, anchor.completions, anchor.completions_head, state.completions_head),
    ):
        if len(items) < n:
            raise LedgerIntegrityError(
                f"privacy ledger {path} was rolled back: its {where} has {len(items)} entries but its anchor "
                f"{anchor_path} recorded {n} (entries from {where}[{len(items)}] on are missing): an older copy was "
                f"restored. Nothing may be trained: restore the latest ledger. {_NEVER_RECREATE}",
                kind="rollback",
                where=where,
                index=len(items),
            )
        if heads(n) != head:
            at = f"{where}[{n - 1}] differs from the entry" if n else "its header differs from the one"
            raise LedgerIntegrityError(
                f"privacy ledger {path} was rolled back or replaced: {at} its anchor {anchor_path} recorded. "
                f"Nothing may be trained: restore the latest ledger. {_NEVER_RECREATE}",
                kind="rollback",
                where=where if n else None,
                index=n - 1 if n else None,
            )
    return (
        "in step" if (anchor.entries, anchor.completions) == (len(state.history), len(state.completions)) else "ahead"
    )


def json_epsilon(epsilon: float) -> float | str:
    """An epsilon fit for JSON: the number, or the string "inf" once a site trained without DP."""
    return "inf" if epsilon == math.inf else epsilon


def _non_private_note(state: _State) -> str:
    first = next((e for e in state.history if e.non_private), None)
    if first is None:
        return ""
    return (
        f" (this site trained WITHOUT differential privacy in run {first.run_id!r} round {first.round}: its epsilon "
        "is infinite, for good)"
    )


@functools.lru_cache(maxsize=256)
def _epsilon_of(mechanism: str, history: tuple, delta: float) -> float:
    """compute_epsilon is a pure function of the grouped history: remembered in this process, so a
    long-lived worker that projected the next round while idle (PrivacyLedger.project) finds it."""
    return compute_epsilon(mechanism, history, delta)


class PrivacyLedger:
    """One hospital's cumulative DP accounting. Construct with `create`, `open` or `for_site`."""

    def __init__(self, path: Path, state: _State, anchor_path: Path | None = None):
        self.path = path
        self.anchor_path = anchor_path if anchor_path is not None else default_anchor(path)
        self._state = state
        self._pending: int | None = None  # the entry this object recorded last, until `complete`
        self._found: tuple[_Anchor | None, LedgerIntegrityError | None] = (None, None)
        self.anchor_status = "in step"  # as of the last open/record: "in step", "ahead" or "none"

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        hospital_id: str,
        epsilon_cap: float,
        delta: float,
        mechanism: str = "prv",
        anchor: str | Path | None = None,
    ) -> PrivacyLedger:
        """A new, empty ledger and its anchor. Refuses if the ledger exists (it is never overwritten) or
        if the anchor says the site's ledger already held entries (the site has trained: restore it)."""
        if not (isinstance(hospital_id, str) and hospital_id):
            raise ValueError(f"hospital_id must be a non-empty string, got {hospital_id!r}")
        _check_cap(epsilon_cap)
        if not (_is_number(delta) and 0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        path = Path(path)
        anchor_path = Path(anchor) if anchor is not None else default_anchor(path)
        state = _State(hospital_id, mechanism, float(delta), float(epsilon_cap), _now(), ())
        # Check-then-write under the lock: every writer takes it, so no one can slip in between.
        with _exclusive_lock(path):
            if os.path.lexists(path):
                raise LedgerError(f"privacy ledger {path} already exists; refusing to overwrite it. {_NEVER_RECREATE}")
            if not anchor_path.parent.is_dir():  # e.g. its volume is not mounted: never create it somewhere else
                raise LedgerError(f"the folder of the ledger anchor {anchor_path} does not exist; nothing was created")
            previous = _read_anchor(anchor_path)
            if previous is not None and (previous.entries or previous.completions):
                raise LedgerIntegrityError(
                    f"refusing to create privacy ledger {path}: its anchor {anchor_path} says the ledger of hospital "
                    f"{previous.hospital_id!r} held {previous.entries} entries, so this site has trained. "
                    f"{_NEVER_RECREATE}",
                    kind="rollback",
                )
            _write_atomic(path, state.to_doc())
            _write_atomic(anchor_path, _anchor_doc(state), anchor=True)
        return cls(path, state, anchor_path)

    @classmethod
    def create_for_site(cls, site: SiteConfig) -> PrivacyLedger:
        """The site's new, empty ledger as its site.yaml describes it (cap, delta, accountant,
        `ledger_anchor`): `privacy init`, and the commands that write a new site (`data demo`,
        `data partition`, the compose demo). The ledger's folder is made; the anchor's must exist.
        Refuses, as `create` does, an existing ledger or one whose anchor says the site has trained."""
        try:
            site.ledger.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"cannot create the ledger folder {site.ledger.parent}: {exc.strerror or exc}") from exc
        return cls.create(
            site.ledger,
            hospital_id=site.hospital_id,
            epsilon_cap=site.privacy.max_epsilon,
            delta=site.privacy.delta,
            mechanism=site.privacy.accountant,
            anchor=site.ledger_anchor,
        )

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        hospital_id: str | None = None,
        delta: float | None = None,
        anchor: str | Path | None = None,
    ) -> PrivacyLedger:
        """An existing ledger, validated (chain included) and checked against its anchor (default
        `<ledger>.anchor`); optionally checked to belong to `hospital_id` at `delta`."""
        ledger = cls._load(path, anchor, hospital_id=hospital_id, delta=delta)
        ledger._check_found_anchor()
        return ledger

    @classmethod
    def for_site(cls, site: SiteConfig, *, anchored: bool = True) -> PrivacyLedger:
        """The site's ledger, checked against its site.yaml and (unless `anchored` is false: only to
        repair the anchor, `reanchor`) against its anchor."""
        ledger = cls._load(
            site.ledger,
            site.ledger_anchor,
            hospital_id=site.hospital_id,
            delta=site.privacy.delta,
            mechanism=site.privacy.accountant,
            source=site.source,
        )
        if anchored:
            ledger._check_found_anchor()
        return ledger

    @classmethod
    def _load(
        cls,
        path: str | Path,
        anchor: str | Path | None,
        *,
        hospital_id: str | None = None,
        delta: float | None = None,
        mechanism: str | None = None,
        source: Path | None = None,
    ) -> PrivacyLedger:
        """Ledger and anchor as they are on disk, the ledger validated; the anchor is compared by
        `_check_found_anchor`."""
        path = Path(path)
        anchor_path = Path(anchor) if anchor is not None else default_anchor(path)
        # The anchor BEFORE the ledger: writers write the ledger, then its anchor, so an anchor read
        # first is never ahead of the ledger read after it (no false rollback without the lock).
        try:
            found: tuple[_Anchor | None, LedgerIntegrityError | None] = (_read_anchor(anchor_path), None)
        except LedgerIntegrityError as exc:
            found = (None, exc)  # reported after the ledger's own problems
        state = _read_state(path)
        if hospital_id is not None and state.hospital_id != hospital_id:
            raise LedgerIntegrityError(
                f"privacy ledger {path} belongs to hospital {state.hospital_id!r}, not {hospital_id!r}", kind="identity"
            )
        if delta is not None and state.delta != delta:
            raise LedgerIntegrityError(
                f"privacy ledger {path} accounts at delta {state.delta:g}, but delta {delta:g} was asked for: "
                "epsilons at different deltas are not comparable",
                kind="identity",
            )
        if mechanism is not None and state.mechanism != mechanism:
            raise LedgerIntegrityError(
                f"privacy ledger {path} uses the {state.mechanism!r} accountant but {source or 'site.yaml'} "
                f"says {mechanism!r}: epsilons from different accountants are not comparable",
                kind="identity",
            )
        ledger = cls(path, state, anchor_path)
        ledger._found = found
        return ledger

    def _check_found_anchor(self) -> str:
        anchor, error = self._found
        if error is not None:
            raise error
        self.anchor_status = _check_anchor(self._state, anchor, self.anchor_path, self.path)
        return self.anchor_status

    # --- state ----------------------------------------------------------------------------------

    @property
    def hospital_id(self) -> str:
        return self._state.hospital_id

    @property
    def mechanism(self) -> str:
        return self._state.mechanism

    @property
    def delta(self) -> float:
        return self._state.delta

    @property
    def epsilon_cap(self) -> float:
        """The cap passed at the last record (or at creation), kept for audit; the site.yaml's cap rules."""
        return self._state.epsilon_cap

    @property
    def created_at(self) -> str:
        return self._state.created_at

    @property
    def history(self) -> list[LedgerEntry]:
        return list(self._state.history)

    @property
    def completions(self) -> list[Completion]:
        return list(self._state.completions)

    @property
    def head(self) -> str:
        """The hash of the last entry (of the header if there is none)."""
        return self._state.head()

    @property
    def stored_schema(self) -> str:
        """The schema of the file as read: SCHEMA_V1 until the next write migrates it."""
        return self._state.stored_schema

    @property
    def non_private(self) -> bool:
        """Has this site ever trained without DP? Then its epsilon is infinite, for good."""
        return any(e.non_private for e in self._state.history)

    def _epsilon(self, steps: Iterable[tuple[float | None, float, int]]) -> float:
        return _epsilon_of(self.mechanism, tuple(accountant_history(steps)), self.delta)

    # --- accounting -----------------------------------------------------------------------------

    def epsilon_spent(self) -> float:
        """math.inf once the site has trained without DP."""
        return self._epsilon(_triples(self._state.history))

    def project(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after adding these steps to the history in memory; nothing is written."""
        _check_step_args(noise_multiplier, sample_rate, steps)
        return self._epsilon([*_triples(self._state.history), (float(noise_multiplier), float(sample_rate), steps)])

    def project_all(self, releases: Iterable[tuple[float, float, int]]) -> float:
        """Epsilon after adding these (noise multiplier, sample rate, steps) releases, in order, to the
        history in memory; nothing is written (client/preflight.py: a whole run's rounds)."""
        triples = [(float(sigma), float(q), steps) for sigma, q, steps in releases]
        for triple in triples:
            _check_step_args(*triple)
        return self._epsilon([*_triples(self._state.history), *triples])

    def record(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        *,
        epsilon_cap: float,
        run_id: str,
        round: int,
        records_sha256: str | None = None,
        model_in_sha256: str | None = None,
    ) -> float:
        """Durably add planned steps, or refuse; returns the new epsilon_spent.

        Call BEFORE training or sending: a crash afterwards over-counts, never under-counts.
        `records_sha256` (`file_sha256` of the records) and `model_in_sha256` (`state_sha256` of the
        model received) bind the entry to what it trains; `complete` adds the update that leaves.
        """
        _check_step_args(noise_multiplier, sample_rate, steps)
        return self._append(
            float(noise_multiplier),
            float(sample_rate),
            steps,
            epsilon_cap=epsilon_cap,
            run_id=run_id,
            round=round,
            records_sha256=records_sha256,
            model_in_sha256=model_in_sha256,
        )

    def record_non_private(
        self,
        sample_rate: float,
        steps: int,
        *,
        epsilon_cap: float,
        run_id: str,
        round: int,
        records_sha256: str | None = None,
        model_in_sha256: str | None = None,
    ) -> float:
        """Durably record a round trained WITHOUT DP (a site with allow_non_private), before it runs.

        Never refused by the cap; returns math.inf, which `epsilon_spent` stays at for good, so the
        site's cap check refuses every later private round.
        """
        _check_step_args(None, sample_rate, steps, non_private=True)
        return self._append(
            None,
            float(sample_rate),
            steps,
            epsilon_cap=epsilon_cap,
            run_id=run_id,
            round=round,
            records_sha256=records_sha256,
            model_in_sha256=model_in_sha256,
        )

    def _append(
        self,
        sigma: float | None,
        q: float,
        steps: int,
        *,
        epsilon_cap: float,
        run_id: str,
        round: int,
        records_sha256: str | None,
        model_in_sha256: str | None,
    ) -> float:
        _check_cap(epsilon_cap)
        if not (isinstance(run_id, str) and run_id):
            raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
        if not (_is_int(round) and round >= 0):
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        for name, value in (("records_sha256", records_sha256), ("model_in_sha256", model_in_sha256)):
            if value is not None and not (isinstance(value, str) and _SHA256.fullmatch(value)):
                raise ValueError(f"{name} must be None or a sha256 hex digest, got {value!r}")
        with _exclusive_lock(self.path):
            disk = self._reread()
            if sigma is None:
                projected = math.inf
            else:
                projected = self._epsilon([*_triples(disk.history), (sigma, q, steps)])
                if projected > epsilon_cap:
                    raise PrivacyBudgetExceeded(
                        f"hospital {disk.hospital_id}: epsilon spent "
                        f"{self._epsilon(_triples(disk.history)):.4f}{_non_private_note(disk)}, this round (sigma "
                        f"{sigma:g}, q {q:g}, {steps} steps) would bring it to {projected:.4f}, over the site's cap "
                        f"{epsilon_cap:g} (delta {disk.delta:g}, accountant {disk.mechanism}); nothing was recorded"
                    )
            entry = LedgerEntry(
                noise_multiplier=sigma,
                sample_rate=q,
                steps=steps,
                run_id=run_id,
                round=round,
                recorded_at=_now(),
                non_private=sigma is None,
                epsilon_cap=float(epsilon_cap),
                records_sha256=records_sha256,
                model_in_sha256=model_in_sha256,
            ).linked(disk.head())
            self._commit(
                replace(disk, epsilon_cap=float(epsilon_cap), history=(*disk.history, entry), stored_schema=SCHEMA)
            )
            self._pending = len(self._state.history) - 1
        return projected

    def complete(self, model_out_sha256: str) -> Completion:
        """Durably bind the update that leaves (`state_sha256` of its tensors) to the entry this object
        recorded last. Call after training, BEFORE the reply: if it fails, nothing may be sent."""
        if self._pending is None:
            raise ValueError("nothing to complete: call record() (or record_non_private()) on this ledger object first")
        if not (isinstance(model_out_sha256, str) and _SHA256.fullmatch(model_out_sha256)):
            raise ValueError(f"model_out_sha256 must be a sha256 hex digest, got {model_out_sha256!r}")
        with _exclusive_lock(self.path):
            disk = self._reread()  # history extends ours, so history[pending] is still our entry
            index = self._pending
            if any(c.entry == index for c in disk.completions):
                raise LedgerError(f"privacy ledger {self.path}: history[{index}] is already completed")
            done = Completion(
                entry=index, entry_hash=disk.history[index].hash, model_out_sha256=model_out_sha256, completed_at=_now()
            ).linked(disk.completions_head())
            self._commit(replace(disk, completions=(*disk.completions, done), stored_schema=SCHEMA))
            self._pending = None
        return done

    def reanchor(self, last_head: str | None = None) -> str:
        """Rewrite the anchor from the ledger as it is now, its chain verified: for a lost or moved
        anchor. Never over a rollback: an anchor that shows one stays (restore the latest ledger); a
        ledger with entries and no usable anchor is re-anchored only if its chain holds `last_head`,
        the last head the aggregator recorded for this site (a cut ledger does not)."""
        with _exclusive_lock(self.path):
            fresh = type(self)._load(self.path, self.anchor_path)
            anchor, error = fresh._found
            if error is not None or anchor is None:
                before = "unusable" if error is not None else "missing"
                _contains_head(fresh._state, last_head, self.path)
            else:
                before = _check_anchor(fresh._state, anchor, self.anchor_path, self.path)  # raises on a rollback
            _write_atomic(self.anchor_path, _anchor_doc(fresh._state), anchor=True)
            self._state = fresh._state
            self.anchor_status = "in step"
        return before

    def _commit(self, new: _State) -> None:
        """Write the ledger, then its anchor (in that order: see `_load`); under the lock."""
        _write_atomic(self.path, new.to_doc())
        self._state = new  # only now: a failed write leaves this object as it was
        _write_atomic(self.anchor_path, _anchor_doc(new), anchor=True)
        self.anchor_status = "in step"

    def _reread(self) -> _State:
        """The file as it is now, which must extend what this process already saw and its anchor."""
        fresh = type(self)._load(self.path, self.anchor_path)
        disk = fresh._state
        ours = self._state
        if (disk.hospital_id, disk.mechanism, disk.delta) != (ours.hospital_id, ours.mechanism, ours.delta):
            raise LedgerIntegrityError(
                f"privacy ledger {self.path} was replaced by another ledger (hospital {disk.hospital_id!r}, "
                f"accountant {disk.mechanism}, delta {disk.delta:g}) while in use",
                kind="identity",
            )
        if (
            disk.history[: len(ours.history)] != ours.history
            or disk.completions[: len(ours.completions)] != ours.completions
        ):
            raise LedgerIntegrityError(
                f"privacy ledger {self.path} lost entries this process had already seen: it was reset or "
                f"replaced; refusing to record. {_NEVER_RECREATE}",
                kind="rollback",
            )
        self.anchor_status = fresh._check_found_anchor()
        return disk

    def to_json(self) -> dict[str, Any]:
        """epsilon_spent is "inf" (a string: JSON has no infinity) once the site trained without DP
        (`non_private` true); a non-private entry's sigma is null in `history`."""
        return {
            "hospital_id": self.hospital_id,
            "mechanism": self.mechanism,
            "delta": self.delta,
            "epsilon_spent": json_epsilon(self.epsilon_spent()),
            "epsilon_cap": self.epsilon_cap,
            "non_private": self.non_private,
            "history": [[e.noise_multiplier, e.sample_rate, e.steps] for e in self._state.history],
        }


def verify_ledger(
    path: str | Path,
    *,
    anchor: str | Path | None = None,
    hospital_id: str | None = None,
    delta: float | None = None,
    mechanism: str | None = None,
    source: Path | None = None,
) -> dict[str, Any]:
    """`fedprompt privacy verify`'s verdict (JSON-safe): the chain, the anchor, the identity, and the
    epsilon recomputed from the entries. Never raises for a bad ledger: `ok` false and `failure`
    {kind, where, index, message} say what and where (index: the first bad entry of `where`)."""
    path = Path(path)
    anchor_path = Path(anchor) if anchor is not None else default_anchor(path)
    verdict: dict[str, Any] = {"ok": False, "ledger": str(path), "anchor": str(anchor_path), "failure": None}
    try:
        ledger = PrivacyLedger._load(
            path, anchor_path, hospital_id=hospital_id, delta=delta, mechanism=mechanism, source=source
        )
        anchor_status = ledger._check_found_anchor()
    except LedgerIntegrityError as exc:
        verdict["failure"] = {"kind": exc.kind, "where": exc.where, "index": exc.index, "message": str(exc)}
        return verdict
    state = ledger._state
    completed = {c.entry for c in state.completions}
    verdict.update(
        ok=True,
        schema=state.stored_schema,
        migration_pending=state.stored_schema != SCHEMA,
        hospital_id=state.hospital_id,
        mechanism=state.mechanism,
        delta=state.delta,
        entries=len(state.history),
        completions=len(state.completions),
        head=state.head(),
        completions_head=state.completions_head(),
        anchor_status=anchor_status,
        incomplete=[i for i in range(len(state.history)) if i not in completed],
        non_private=ledger.non_private,
        epsilon_spent=json_epsilon(ledger.epsilon_spent()),
    )
    return verdict
