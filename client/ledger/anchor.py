"""The anchor: rollback detection across processes (the package's docstring)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import Field, ValidationError

from fedprompt.common.schema import Schema, Sha256, issues

from .errors import _NEVER_RECREATE, LedgerIntegrityError
from .models import SCHEMA_V1, Count, Timestamp, _now, _State

ANCHOR_SCHEMA: Final = "fedprompt-ledger-anchor/1"


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
