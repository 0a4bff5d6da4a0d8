"""`fedprompt audit`: an empirical one-run privacy audit at a hospital (client/audit.py).

Runs the site's own rounds (train_round) on a throwaway copy of the site with synthetic canaries
added, and reports a 95% lower bound on epsilon next to the accounted epsilon, with two controls and
a power table (the bound when the noise is drawn at sigma / 2 and sigma / 4). Spends nothing from
the site's ledger, writes nothing outside a temporary folder it deletes, sends nothing. Exit 0: the audit passed; 4: it
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


def _noise(scale: float | None) -> str:
    if scale is None:
        return "none"
    return "sigma" if scale == 1 else f"sigma / {1 / scale:g}"


def _charge(c: dict) -> str:
    return (
        f"{c['release']} sigma {c['noise_multiplier']:.4g}, q {c['sample_rate']:.4g}, {c['steps']} steps "
        f"x {c['entries']}"
    )


def print_report(report: dict) -> None:
    plan = report["plan"]
    print(
        f"fedprompt audit: {report['hospital_id']}, {report['num_records']} records + {report['canaries']} canaries "
        "(one-run audit, Steinke, Nasr & Jagielski 2023)"
    )
    print(
        f"audited run: {plan['rounds']} rounds of the site's own train_round ({plan['sgd_rounds']} of DP-SGD), "
        f"lr {plan['lr']:g} ({plan['optimizer']}), C {plan['max_grad_norm']:g}; DP unit: {report['dp_unit']}; "
        f"declared size {report['declared_size']:g}; delta {report['delta']:g}"
    )
    print("charged (the copy's ledger): " + "; ".join(_charge(c) for c in report["charges"]))
    print(f"accounted epsilon: {report['accounted_epsilon']:.3f} (target {report['target_epsilon']:g})")
    print(
        f"ceiling of this audit: {report['ceiling']:.3f} (all {report['guesses']} guesses right, "
        f"{1 - report['beta']:.0%} confidence)"
    )
    print()
    width = max(len(r["title"]) for r in report["runs"].values())
    header = (
        f"{'run'.ljust(width)}  {'noise':>11}  {'m':>5}  {'r':>5}  {'v':>5}  {'accounted':>9}  {'eps lower bound':>15}"
    )
    print(header)
    print("-" * len(header))
    for r in report["runs"].values():
        print(
            f"{r['title'].ljust(width)}  {_noise(r['noise_scale']):>11}  {r['m']:>5}  {r['r']:>5}  {r['v']:>5}  "
            f"{_fmt(r['accounted_epsilon']):>9}  {r['epsilon_lower_bound']:>15.3f}"
        )
    print()
    print(
        f"power (noise drawn smaller than charged; told apart at a bound >= {report['detection_threshold']:.3f}, "
        f"the private run's + {report['clear_margin']:g}):"
    )
    for row in report["power"]:
        seen = "-" if row["noise_scale"] == 1 else ("told apart" if row["detected"] else "NOT told apart")
        print(f"  {_noise(row['noise_scale']):>11}  {row['epsilon_lower_bound']:6.3f}  {seen}")
    print()
    private = report["runs"]["private"]["epsilon_lower_bound"]
    if report["passed"]:
        print(
            f"PASS: the private run's bound {private:.3f} <= accounted {report['accounted_epsilon']:.3f}, and both "
            f"controls exceed it by >= {report['clear_margin']:g}"
        )
    else:
        print(
            "AUDIT FAILED (exit 4): a privacy bug is likely; rerun once to rule out a false alarm (the bound holds "
            "at 95%)"
        )
        for reason in report["reasons"]:
            print(f"  - {reason}")
    print(
        f"(the audit detects privacy bugs; it cannot certify epsilon {report['accounted_epsilon']:.3g}: its ceiling "
        f"here is {report['ceiling']:.2f}. Nothing was spent or sent; its throwaway copy of the site is deleted.)"
    )


def run(args: argparse.Namespace) -> int:
    from fedprompt.client.audit import audit_site

    report = audit_site(args.site, federation_path=args.federation, canaries=args.canaries, epsilon=args.epsilon)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return ExitCode.OK if report["passed"] else ExitCode.AUDIT_FAILED
