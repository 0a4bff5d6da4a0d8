"""`fedprompt` command line: one sub-command module per job under fedprompt/commands/."""

from __future__ import annotations

import argparse
import importlib
import sys

from fedprompt import __version__
from fedprompt.common.exit_codes import ExitCode, epilog

# name -> module in fedprompt.commands exposing `register(subparsers)`; each sets `func(args) -> int`.
COMMANDS = (
    "simulate",
    "plan",
    "data",
    "privacy",
    "selftest",
    "audit",
    "predict",
    "personalize",
    "pki",
    "aggregator",
    "hospital",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedprompt",
        description="Federated soft-prompt tuning for hospitals, with differential privacy.",
        epilog=epilog(),  # every code; each command's --help lists its own
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fedprompt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"fedprompt.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fedprompt.common.errors import InputError, LedgerError, PrivacyBudgetExceeded

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (LedgerError, PrivacyBudgetExceeded) as exc:
        print(f"privacy: {exc}", file=sys.stderr)
        return ExitCode.LEDGER
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
