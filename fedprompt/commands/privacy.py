"""`fedprompt privacy`: create, inspect or verify a hospital's privacy ledger.

Light imports only: opacus (and torch) load only when an epsilon is actually computed.
Exit codes: 0 fine, 2 bad site.yaml, 3 a ledger problem (missing, corrupted, broken chain,
rolled back, or `verify` failing).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from fedprompt.client.ledger import PrivacyLedger, compute_epsilon, verify_ledger
from fedprompt.common.config import SiteConfig
from fedprompt.common.exit_codes import ExitCode, epilog
from fedprompt.common.schema import SHA256_PATTERN


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("privacy", help="create, inspect or verify this hospital's privacy ledger")
    sub = parser.add_subparsers(dest="privacy_command", required=True, metavar="ACTION")

    p = sub.add_parser("show", help="the epsilon this hospital has spent, entry by entry")
    p.add_argument("--site", type=Path, required=True, help="the hospital's site.yaml")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_show)

    p = sub.add_parser("init", help="create the ledger of a site that has never trained")
    p.add_argument("--site", type=Path, required=True, help="the hospital's site.yaml")
    p.set_defaults(func=run_init)

    p = sub.add_parser(
        "verify",
        help=f"check the ledger's hash chain and anchor, recompute its epsilon (exit {ExitCode.LEDGER:d} if it fails)",
        epilog=epilog(ExitCode.OK, ExitCode.BAD_INPUT, ExitCode.LEDGER),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--site", type=Path, required=True, help="the hospital's site.yaml")
    p.add_argument("--json", action="store_true", help="machine-readable verdict on stdout (exit code as without)")
    p.set_defaults(func=run_verify)

    p = sub.add_parser(
        "anchor", help="re-create a lost or moved ledger anchor from the ledger as it is (never over a rollback)"
    )
    p.add_argument("--site", type=Path, required=True, help="the hospital's site.yaml")
    p.add_argument(
        "--last-head",
        type=_sha256,
        metavar="HEX",
        help="the last ledger head the aggregator recorded for this site (metrics.json: rounds[].hospitals[<id>]."
        "ledger_head); needed when the anchor is missing or unusable: the ledger must contain it",
    )
    p.set_defaults(func=run_anchor)


def _sha256(value: str) -> str:
    if not re.fullmatch(SHA256_PATTERN, value):
        raise argparse.ArgumentTypeError(f"expected a sha256 hex digest (64 lowercase hex characters), got {value!r}")
    return value


def run_show(args: argparse.Namespace) -> int:
    site = SiteConfig.load(args.site)
    ledger = PrivacyLedger.for_site(site)
    if args.json:
        print(json.dumps(ledger.to_json()))
        return 0
    header = f"{'run':<24} {'round':>5} {'sigma':>10} {'q':>10} {'steps':>8} {'epsilon':>10}"  # sigma "none": no DP
    print(header)
    print("-" * len(header))
    steps: list[tuple[float | None, float, int]] = []
    spent = 0.0
    for e in ledger.history:
        steps.append((e.noise_multiplier, e.sample_rate, e.steps))
        # Cumulative epsilon after this entry: the ledger's own computation over the history up to here,
        # so the last row is exactly ledger.epsilon_spent() (inf from a non-private entry on).
        spent = compute_epsilon(ledger.mechanism, steps, ledger.delta)
        sigma = "none" if e.noise_multiplier is None else f"{e.noise_multiplier:.4g}"
        print(f"{e.run_id:<24} {e.round:>5} {sigma:>10} {e.sample_rate:>10.4g} {e.steps:>8} {spent:>10.4f}", flush=True)
    cap = site.privacy.max_epsilon
    print(f"spent {spent:.4f} of cap {cap:g} (delta {ledger.delta:g}, accountant {ledger.mechanism})")
    if ledger.epsilon_cap != cap:
        print(f"note: the cap at the last record was {ledger.epsilon_cap:g}; site.yaml now says {cap:g}")
    _print_non_private(ledger)
    if spent > cap:
        print("note: spent exceeds the current cap: this site will refuse every further private round")
    return 0


def _print_non_private(ledger: PrivacyLedger) -> None:
    rounds = [e for e in ledger.history if e.non_private]
    if rounds:
        first = rounds[0]
        print(
            f"note: this site trained WITHOUT differential privacy ({len(rounds)} round(s), first: run {first.run_id} "
            f"round {first.round}): its epsilon is infinite, for good"
        )


def run_verify(args: argparse.Namespace) -> int:
    site = SiteConfig.load(args.site)
    verdict = verify_ledger(
        site.ledger,
        anchor=site.ledger_anchor,
        hospital_id=site.hospital_id,
        delta=site.privacy.delta,
        mechanism=site.privacy.accountant,
        source=site.source,
    )
    cap = site.privacy.max_epsilon
    if verdict["ok"]:
        spent = math.inf if verdict["epsilon_spent"] == "inf" else verdict["epsilon_spent"]
        verdict.update(epsilon_cap=cap, over_cap=spent > cap)
    if args.json:
        print(json.dumps(verdict))
        return ExitCode.OK if verdict["ok"] else ExitCode.LEDGER
    if not verdict["ok"]:
        print(f"privacy: verification FAILED: {verdict['failure']['message']}", file=sys.stderr)
        return ExitCode.LEDGER
    print(
        f"ledger  {verdict['ledger']}: {verdict['entries']} entries, {verdict['completions']} completions, chain "
        f"intact (head {verdict['head'][:16]}...)"
    )
    if verdict["migration_pending"]:
        print(f"        schema {verdict['schema']}: chained in memory; stored as fedprompt-ledger/2 at the next write")
    anchor = {
        "in step": "in step with the ledger",
        "ahead": "behind the ledger (a crash between the two writes; rewritten at the next one)",
        "none": "none yet (written at the next ledger write)",
    }[verdict["anchor_status"]]
    print(f"anchor  {verdict['anchor']}: {anchor}")
    if verdict["incomplete"]:
        print(
            f"note: {len(verdict['incomplete'])} entries have no out-hash (recorded but nothing sent for them -- "
            f"crash, refusal or an evaluation charge -- or recorded before schema 2): {verdict['incomplete'][:20]}"
        )
    spent = verdict["epsilon_spent"]
    print(
        f"epsilon spent {spent if spent == 'inf' else format(spent, '.4f')} of cap {cap:g} "
        f"(delta {verdict['delta']:g}, accountant {verdict['mechanism']}), recomputed from the entries"
    )
    if verdict["non_private"]:
        print("note: this site trained WITHOUT differential privacy: its epsilon is infinite, for good")
    if verdict["over_cap"]:
        print("note: spent exceeds the current cap: this site will refuse every further private round")
    print("ok")
    return 0


def run_anchor(args: argparse.Namespace) -> int:
    site = SiteConfig.load(args.site)
    ledger = PrivacyLedger.for_site(site, anchored=False)  # the anchor is what is repaired here
    before = ledger.reanchor(args.last_head)
    print(
        f"anchor {ledger.anchor_path} written for privacy ledger {ledger.path} ({len(ledger.history)} entries, "
        f"head {ledger.head[:16]}...; the anchor was {before})"
    )
    return 0


def run_init(args: argparse.Namespace) -> int:
    ledger = PrivacyLedger.create_for_site(SiteConfig.load(args.site))
    print(
        f"created privacy ledger {ledger.path} for hospital {ledger.hospital_id} (cap {ledger.epsilon_cap:g}, delta "
        f"{ledger.delta:g}, accountant {ledger.mechanism}; anchor {ledger.anchor_path})"
    )
    return 0
