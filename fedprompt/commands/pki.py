"""`fedprompt pki`: the deployment's CA + aggregator TLS certificate, and hospital SuperNode keys."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pki", help="create TLS certificates (aggregator) and SuperNode keys (hospitals)")
    sub = parser.add_subparsers(dest="pki_command", required=True, metavar="ACTION")

    p = sub.add_parser("init", help="a CA and the aggregator's TLS server certificate (run once, at the aggregator)")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for ca.pem, ca.key, server.pem, server.key (must not hold them yet)",
    )
    p.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME",
        help="host name or IP address hospitals (and the proxy) use to reach the aggregator; repeat for each",
    )
    p.add_argument("--days", type=int, default=825, help="validity of the server certificate (default 825 days)")
    p.set_defaults(func=run_init)

    p = sub.add_parser(
        "hospital", help="a hospital's SuperNode key pair (EC P-384, OpenSSH format; run at the hospital)"
    )
    p.add_argument("--id", required=True, help="hospital id, e.g. hospital-1 (names the files ID.key and ID.pub)")
    p.add_argument("--out", type=Path, required=True, help="folder for ID.key (private, 0600) and ID.pub")
    p.set_defaults(func=run_hospital)


def run_init(args: argparse.Namespace) -> int:
    from fedprompt.common.errors import InputError
    from fedprompt.common.pki import init_pki

    if args.days < 1:
        raise InputError.at("--days", f"expected >= 1, got {args.days}")
    paths = init_pki(args.out, args.host, days=args.days)
    print(f"created CA            {paths.ca_cert}  (give this file to every hospital: --root-certificates)")
    print(f"        CA key        {paths.ca_key}  (0600; keep it offline, it signs new server certificates)")
    print(f"        server cert   {paths.server_cert}  for {', '.join(args.host)}")
    print(f"        server key    {paths.server_key}  (0600)")
    print(f"next:   fedprompt aggregator start --pki {args.out} --state STATE_DIR")
    return 0


def run_hospital(args: argparse.Namespace) -> int:
    from fedprompt.common.pki import hospital_key, public_key_fingerprint

    priv, pub = hospital_key(args.id, args.out)
    print(f"created SuperNode key {priv}  (0600; never leaves this hospital)")
    print(f"        public key    {pub}  fingerprint {public_key_fingerprint(pub)}")
    print(f"next:   send {pub.name} to the aggregator operator, who registers it with")
    print(f"        fedprompt aggregator register --state STATE_DIR {pub.name}")
    print("        (check the fingerprint with them over a second channel, e.g. by phone)")
    return 0
