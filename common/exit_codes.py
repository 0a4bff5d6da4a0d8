"""Every exit status a fedprompt program returns, defined once; `--help` texts are generated from it.

Scripts and service managers branch on these numbers, so a number never changes meaning. Kept free
of imports: every entry point reads it.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """An exit status and its one-line meaning (`epilog` prints them)."""

    meaning: str

    def __new__(cls, value: int, meaning: str) -> ExitCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        return member

    OK = 0, "success (a run: most of its rounds aggregated; the model is in OUT/export)"
    FAILED = 1, "failed: a run ended unfinished or was not accepted (its log says why), a check failed"
    BAD_INPUT = 2, "bad input (config, records, keys, backbone, arguments): nothing trained, sent or written"
    LEDGER = 3, "a privacy ledger is missing, corrupt, locked, rolled back or spent, or fails verification"
    AUDIT_FAILED = 4, "the privacy audit failed: a privacy bug is likely (rerun once to rule out a false alarm)"
    NOTHING_TRAINED = 5, "no hospital trained (or too few confirmed the run): no export; metrics.json says why"
    PARTLY_TRAINED = 6, "most rounds did not aggregate (a --resume: its new ones); metrics.json says why"
    INTERRUPTED = 130, "interrupted (Ctrl-C)"


def epilog(*codes: ExitCode) -> str:
    """A command's "exit status:" block for its --help (argparse.RawDescriptionHelpFormatter): the
    given codes, or all of them."""
    return "\n".join(["exit status:", *(f"  {int(code):>3}  {code.meaning}" for code in codes or tuple(ExitCode))])
