"""The ledger's refusals: a ledger that cannot be trusted, and what to do about it."""

from __future__ import annotations

from pathlib import Path

from fedprompt.common.errors import LedgerError

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
