"""Seed the compose demo: one hospital's private data volume, or the aggregator's federation folder.

    python docker/demo_site.py hospital --id 1 --data /data --ledger /ledger [--anchor /anchor]
    python docker/demo_site.py federation --out /federation

Both sides regenerate the same seeded synthetic demo and keep only their own part: a hospital
writes only its own records, site.yaml and ledger; the aggregator only federation.yaml and the
held-out test set. Idempotent: nothing that exists is touched. A ledger is created only for a site seeded in the
same call; a seeded site whose ledger has gone is refused (exit 3, ExitCode.LEDGER), never given a new one.
A real site replaces this step by its own records and site.yaml (see docs/deployment.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from fedprompt.common.exit_codes import ExitCode


def _demo(tmp: Path) -> Path:
    from fedprompt.client.demo_data import generate_demo, write_demo_workspace

    return write_demo_workspace(tmp / "ws", generate_demo(hospitals=3, seed=0))


def hospital(args: argparse.Namespace) -> int:
    from fedprompt.client.ledger import PrivacyLedger
    from fedprompt.common.config import SiteConfig
    from fedprompt.common.errors import LedgerError

    site_path = args.data / "site.yaml"
    seeded = not site_path.exists()
    if seeded:
        with tempfile.TemporaryDirectory() as tmp:
            src = _demo(Path(tmp)) / f"hospital-{args.id}"
            if not src.is_dir():
                print(f"no demo hospital {args.id}", file=sys.stderr)
                return ExitCode.BAD_INPUT
            for name in ("train.csv", "val.csv"):
                shutil.copyfile(src / name, args.data / name)
            site = yaml.safe_load((src / "site.yaml").read_text())
            site["ledger"] = str(args.ledger / "privacy-ledger.json")
            if args.anchor is not None:  # on its own volume: restoring the ledger's volume leaves it
                site["ledger_anchor"] = str(args.anchor / "privacy-ledger.json.anchor")
            site_path.write_text(
                "# Demo hospital site config (see docs/deployment.md)\n" + yaml.safe_dump(site, sort_keys=False)
            )
        print(f"seeded demo data for hospital-{args.id} in {args.data}")
    site = SiteConfig.load(site_path)
    if site.ledger.exists():
        return 0
    if not seeded:
        # A site seeded earlier whose ledger is gone (a lost volume): re-creating it would forget the
        # epsilon it spent. Refuse, as the hospital daemon does; restore the ledger from a backup.
        print(
            f"privacy ledger {site.ledger} is missing for a site seeded earlier: restore it from a backup "
            "(never re-create the ledger of a site that has trained)",
            file=sys.stderr,
        )
        return ExitCode.LEDGER
    # `fedprompt privacy init --site ...`, once in the life of the site: the site was seeded just now
    try:
        PrivacyLedger.create_for_site(site)  # site.yaml's ledger, cap, delta, accountant and ledger_anchor
    except LedgerError as exc:  # e.g. the anchor says this site has trained: its ledger was lost
        print(str(exc), file=sys.stderr)
        return ExitCode.LEDGER
    print(f"created privacy ledger {site.ledger}")
    return 0


def federation(args: argparse.Namespace) -> int:
    if (args.out / "federation.yaml").exists():
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        ws = _demo(Path(tmp))
        for name in ("federation.yaml", "test.csv"):
            shutil.copyfile(ws / name, args.out / name)
    print(f"seeded the demo federation in {args.out}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hospital")
    h.add_argument("--id", required=True)
    h.add_argument("--data", type=Path, required=True)
    h.add_argument("--ledger", type=Path, required=True)
    h.add_argument("--anchor", type=Path, help="the folder of the ledger's anchor (default: beside the ledger)")
    h.set_defaults(func=hospital)
    f = sub.add_parser("federation")
    f.add_argument("--out", type=Path, required=True)
    f.set_defaults(func=federation)
    args = p.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
