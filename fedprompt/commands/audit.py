"""`fedprompt audit`: an empirical one-run privacy audit at a hospital (client/audit.py).

Trains throwaway copies of the head on the site's own records plus synthetic canaries, with the
site's private settings, and reports a 95% lower bound on epsilon next to the accounted epsilon.
Spends nothing from the ledger, writes no file, sends nothing. Exit 0: the audit passed; 4: it
failed (a privacy bug, or a rare false alarm: rerun); 2: bad input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedprompt.common.exit_codes import ExitCode, epilog


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="empirical one-run privacy audit of this site's DP training (spends no budget, sends nothing)",
        epilog=epilog(ExitCode.OK, ExitCode.BAD_INPUT, ExitCode.AUDIT_FAILED),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--site", type=Path, required=True, help="the hospital's site.yaml (its train records, cap, delta, backbone)"
    )
    p.add_argument(
        "--federation",
        type=Path,
        help="federation.yaml as received (label space, recipe, rounds, target epsilon); default: the federation "
        "defaults over the labels the site's records hold",
    )
    p.add_argument("--canaries", type=_count, help="number of canaries m (default 250, or fewer on a narrow backbone)")
    p.add_argument(
        "--epsilon",
        type=_positive_float,
        help="target epsilon to calibrate for (default: the federation's; the site's cap still wins)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_report(report: dict) -> None:
    rc = report["recipe"]
    print(
        f"fedprompt audit: {report['hospital_id']}, {report['num_records']} records + {report['canaries']} canaries "
        "(one-run audit, Steinke, Nasr & Jagielski 2023)"
    )
    print(
        f"recipe: head-only DP-SGD, {rc['rounds']} rounds x {rc['steps_per_round']} steps, q {rc['sample_rate']:.4g}, "
        f"sigma {rc['noise_multiplier']:.4g}, C {rc['max_grad_norm']:g}, lr {rc['lr']:g} ({rc['optimizer']}); "
        f"delta {report['delta']:g} ({rc['accountant']})"
    )
    print(f"accounted epsilon: {report['accounted_epsilon']:.3f} (target {report['target_epsilon']:g})")
    print(
        f"ceiling of this audit: {report['ceiling']:.3f} (all {report['guesses']} guesses right, "
        f"{1 - report['beta']:.0%} confidence)"
    )
    print()
    width = max(len(r["title"]) for r in report["runs"].values())
    header = f"{'run'.ljust(width)}  {'sigma':>9}  {'C':>5}  {'m':>5}  {'r':>5}  {'v':>5}  {'eps lower bound':>15}"
    print(header)
    print("-" * len(header))
    for r in report["runs"].values():
        print(
            f"{r['title'].ljust(width)}  {_fmt(r['noise_multiplier'], '.4g'):>9}  {_fmt(r['max_grad_norm'], 'g'):>5}  "
            f"{r['m']:>5}  {r['r']:>5}  {r['v']:>5}  {r['epsilon_lower_bound']:>15.3f}"
        )
    print()
    private = report["runs"]["private"]["epsilon_lower_bound"]
    if report["passed"]:
        print(
            f"PASS: the private run's bound {private:.3f} <= accounted {report['accounted_epsilon']:.3f}, and both "
            f"controls exceed it by >= {report['clear_margin']:g}"
        )
    else:
        print(
            f"AUDIT FAILED (exit {ExitCode.AUDIT_FAILED:d}): a privacy bug is likely; rerun once to rule out a false "
            "alarm (the bound holds at 95%)"
        )
        for reason in report["reasons"]:
            print(f"  - {reason}")
    print(
        f"(the audit detects privacy bugs; it cannot certify epsilon {report['accounted_epsilon']:.3g}: its ceiling "
        f"here is {report['ceiling']:.2f}. Nothing was spent, written or sent.)"
    )


def run(args: argparse.Namespace) -> int:
    from fedprompt.client.audit import audit_site

    report = audit_site(args.site, federation_path=args.federation, canaries=args.canaries, epsilon=args.epsilon)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return ExitCode.OK if report["passed"] else ExitCode.AUDIT_FAILED
