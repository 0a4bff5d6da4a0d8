"""`fedprompt hospital start`: the hospital daemon (a Flower SuperNode running this project's ClientApp).

Everything is validated BEFORE the SuperNode starts (exit 2 on bad input): the site config, its
record files, its privacy ledger (created once with `fedprompt privacy init --site ...`), the
SuperNode key and the aggregator's CA certificate. Then the process becomes `flower-supernode`
(exec), so signals and exit codes are the SuperNode's own.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("hospital", help="run this hospital's daemon (Flower SuperNode with the fedprompt ClientApp)")
    sub = parser.add_subparsers(dest="hospital_command", required=True, metavar="ACTION")
    p = sub.add_parser("start", help="validate the site, then start the SuperNode")
    p.add_argument("--site", type=Path, required=True, help="this hospital's site.yaml")
    p.add_argument("--superlink", required=True, help="HOST:PORT of the aggregator's Fleet endpoint (its Fleet-only proxy)")
    p.add_argument("--root-certificates", type=Path, required=True, help="the aggregator's ca.pem (verifies its TLS certificate)")
    p.add_argument("--key", type=Path, required=True, help="this hospital's SuperNode private key (ID.key from `fedprompt pki hospital`)")
    p.add_argument("--clientappio-port", "--runtime-port", dest="runtime_port", type=int, default=9094,
                   help="port of the SuperNode's local runtime API, where its ClientApp processes connect (default 9094)")
    p.add_argument("--runtime-host", default="127.0.0.1", help="bind address of that API (default 127.0.0.1; 0.0.0.0 only with --isolation process)")
    p.add_argument("--isolation", choices=("subprocess", "process"), default="subprocess",
                   help="ClientApp in a SuperNode subprocess (default) or in a separate `flower-superexec`")
    p.add_argument("--flwr-home", type=Path, help="the SuperNode's working folder (installed apps); default $FLWR_HOME or ~/.flwr")
    p.add_argument("--max-retries", type=int, help="give up after this many failed reconnections (default: never)")
    p.add_argument("--max-wait-time", type=float, help="give up after this many seconds without the aggregator (default: never)")
    p.add_argument("--trusted-entities", type=Path,
                   help="YAML of Ed25519 keys whose signature an app must carry (Flower Hub apps only; see docs/deployment.md)")
    p.add_argument("--check", action="store_true", help="only validate and print the SuperNode command; do not start it")
    p.set_defaults(func=run_start)


def run_start(args: argparse.Namespace) -> int:
    from fedprompt.common.errors import InputError
    from fedprompt.server import deploy

    deploy.split_address(args.superlink, "--superlink")
    if not (0 < args.runtime_port < 65536):
        raise InputError.at("--clientappio-port", f"not a port: {args.runtime_port}")
    if args.trusted_entities is not None and not args.trusted_entities.is_file():
        raise InputError.at(args.trusted_entities, "trusted entities file not found")
    checked = deploy.check_hospital(args.site, args.key, args.root_certificates)
    argv = deploy.supernode_argv(
        superlink=args.superlink, root_certificates=args.root_certificates, key=args.key, site_path=checked.site_path,
        runtime_host=args.runtime_host, runtime_port=args.runtime_port, max_retries=args.max_retries,
        max_wait_time=args.max_wait_time, isolation=args.isolation, trusted_entities=args.trusted_entities,
    )
    env = deploy.hospital_env(args.flwr_home)
    print(f"[fedprompt] hospital {checked.hospital_id}: site {checked.site_path}, ledger {checked.ledger}; "
          f"connecting to {args.superlink}", flush=True)
    if args.check:
        print(" ".join(argv))
        return 0
    if args.flwr_home is not None:
        args.flwr_home.mkdir(parents=True, exist_ok=True)
    os.execve(argv[0], argv, env)
    return 1  # pragma: no cover - execve does not return
