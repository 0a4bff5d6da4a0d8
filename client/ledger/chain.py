"""The ledger file: read and strictly validated (a schema-1 file chained as if migrated), its hash
chain verified, written atomically under an exclusive lock."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedprompt.common.atomic import DirectorySyncError, atomic_write
from fedprompt.common.errors import LedgerError
from fedprompt.common.schema import issues

from .errors import _NEVER_RECREATE, LedgerIntegrityError, _corrupt
from .hashing import record_hash
from .models import SCHEMA, SCHEMA_V1, Completion, LedgerEntry, _LedgerV1, _LedgerV2, _State

# How long `record` waits for another process holding the ledger (it may be computing a PRV).
LOCK_TIMEOUT_S = 300.0


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
