"""`fedprompt privacy`: create or inspect a hospital's privacy ledger.

Light imports only: opacus (and torch) load only when an epsilon is actually computed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedprompt.client.ledger import PrivacyLedger, compute_epsilon
from fedprompt.common.config import SiteConfig
from fedprompt.common.errors import LedgerError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("privacy", help="create or inspect this hospital's privacy ledger")
    sub = parser.add_subparsers(dest="privacy_command", required=True, metavar="ACTION")

    p = sub.add_parser("show", help="the epsilon this hospital has spent, entry by entry")
    p.add_argument("--site", type=Path, required=True, help="the hospital's site.yaml")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_show)

    p = sub.add_parser("init", help="create the ledger of a site that has never trained")
    p.add_argument("--site", type=Path, required=True, help="the hospital's site.yaml")
    p.set_defaults(func=run_init)


def run_show(args: argparse.Namespace) -> int:
    site = SiteConfig.load(args.site)
    ledger = PrivacyLedger.for_site(site)
    if args.json:
        print(json.dumps(ledger.to_json()))
        return 0
    header = f"{'run':<24} {'round':>5} {'sigma':>10} {'q':>10} {'steps':>8} {'epsilon':>10}"
    print(header)
    print("-" * len(header))
    steps: list[tuple[float, float, int]] = []
    spent = 0.0
    for e in ledger.history:
        steps.append((e.noise_multiplier, e.sample_rate, e.steps))
        # Cumulative epsilon after this entry: the ledger's own computation over the history up to here,
        # so the last row is exactly ledger.epsilon_spent().
        spent = compute_epsilon(ledger.mechanism, steps, ledger.delta)
        print(f"{e.run_id:<24} {e.round:>5} {e.noise_multiplier:>10.4g} {e.sample_rate:>10.4g} {e.steps:>8} {spent:>10.4f}", flush=True)
    cap = site.privacy.max_epsilon
    print(f"spent {spent:.4f} of cap {cap:g} (delta {ledger.delta:g}, accountant {ledger.mechanism})")
    if ledger.epsilon_cap != cap:
        print(f"note: the cap at the last record was {ledger.epsilon_cap:g}; site.yaml now says {cap:g}")
    if spent > cap:
        print("note: spent exceeds the current cap: this site will refuse every further private round")
    return 0


def run_init(args: argparse.Namespace) -> int:
    site = SiteConfig.load(args.site)
    try:
        site.ledger.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LedgerError(f"cannot create the ledger folder {site.ledger.parent}: {exc.strerror or exc}") from exc
    ledger = PrivacyLedger.create(
        site.ledger,
        hospital_id=site.hospital_id,
        epsilon_cap=site.privacy.max_epsilon,
        delta=site.privacy.delta,
        mechanism=site.privacy.accountant,
    )
    print(f"created privacy ledger {ledger.path} for hospital {ledger.hospital_id} "
          f"(cap {ledger.epsilon_cap:g}, delta {ledger.delta:g}, accountant {ledger.mechanism})")
    return 0
