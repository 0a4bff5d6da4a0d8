"""User-facing errors: each names the file, line and field, and maps to exit code 2 (ExitCode.BAD_INPUT)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .exit_codes import ExitCode


@dataclass(frozen=True)
class Problem:
    """One defect in one input: `path:line: field: message`."""

    path: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class InputError(Exception):
    """Bad input (config, records, keys, backbone): nothing may be trained or sent.

    Carries every problem found in the input at once, so a user fixes a file in one pass.
    """

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, problems: list[Problem] | Problem, *, omitted: int = 0):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        self.omitted = omitted
        super().__init__(str(self))

    @classmethod
    def at(cls, path: str | Path, message: str, *, line: int | None = None, field: str | None = None) -> InputError:
        return cls(Problem(str(path), line, field, message))

    def __str__(self) -> str:
        lines = [str(p) for p in self.problems]
        if self.omitted:
            lines.append(f"... and {self.omitted} more problem(s) not shown")
        return "\n".join(lines)


class PrivacyBudgetExceeded(Exception):
    """Training this round would take the site past its own epsilon cap."""


class LedgerError(Exception):
    """The privacy ledger is missing, corrupted, locked or unwritable: training must stop."""
