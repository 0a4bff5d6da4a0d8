"""`fedprompt hospital start`: the hospital daemon (a Flower SuperNode + the site's warm worker).

Everything is validated BEFORE the SuperNode starts (exit 2 on bad input): the site config, its
record files, its privacy ledger (created once with `fedprompt privacy init --site ...`), the
SuperNode key and the aggregator's CA certificate. Then, by default, this process supervises the
SuperNode (`--isolation process`), the executor and the warm worker (client/daemon.py), and exits
non-zero within seconds when the SuperNode dies (0 when stopped by SIGTERM/SIGINT). `--executor
flower` instead becomes `flower-supernode` (exec) with Flower's per-message ClientApp processes,
which import the submitted bundle's ClientApp.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("fedprompt.hospital")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "hospital", help="run this hospital's daemon (Flower SuperNode with the fedprompt ClientApp)"
    )
    sub = parser.add_subparsers(dest="hospital_command", required=True, metavar="ACTION")
    _add_start_parser(sub)

    p = sub.add_parser(
        "init", help="write a commented site.yaml template with the recommended private settings (never overwrites)"
    )
    p.add_argument("--out", type=Path, required=True, help="the site.yaml to write (refused if it exists)")
    p.add_argument("--hospital-id", help="this site's id, the one of its SuperNode key (`fedprompt pki hospital --id`)")
    for name, what in (
        ("train", "training records (CSV or JSONL)"),
        ("validation", "validation records"),
        ("test", "this site's own held-out records (personalisation)"),
        ("ledger", "privacy ledger file, on a writable, backed-up volume"),
        ("backbone", "local backbone directory (default: the embedded all-MiniLM-L6-v2)"),
    ):
        p.add_argument(f"--{name}", type=Path, help=f"{what}; written as an absolute path")
    p.add_argument("--text-field", help="column/field holding the text (default: text)")
    p.add_argument("--label-field", help="column/field holding the label (default: label)")
    p.add_argument(
        "--federation", type=Path, help="the aggregator's federation.yaml: its label space is pinned (labels)"
    )
    p.set_defaults(func=run_init)

    p = sub.add_parser(
        "labels", help="pin the federation's label space in site.yaml (a plan with another one is refused)"
    )
    p.add_argument("--site", type=Path, required=True, help="this hospital's site.yaml")
    p.add_argument("--federation", type=Path, required=True, help="the aggregator's federation.yaml")
    p.set_defaults(func=run_labels)


def _add_start_parser(sub: argparse._SubParsersAction) -> None:
    from fedprompt.common.logs import add_log_format_argument

    p = sub.add_parser("start", help="validate the site, then start the SuperNode")
    p.add_argument("--site", type=Path, required=True, help="this hospital's site.yaml")
    p.add_argument(
        "--superlink", required=True, help="HOST:PORT of the aggregator's Fleet endpoint (its Fleet-only proxy)"
    )
    p.add_argument(
        "--root-certificates", type=Path, required=True, help="the aggregator's ca.pem (verifies its TLS certificate)"
    )
    p.add_argument(
        "--key",
        type=Path,
        required=True,
        help="this hospital's SuperNode private key (ID.key from `fedprompt pki hospital`)",
    )
    p.add_argument(
        "--clientappio-port",
        "--runtime-port",
        dest="runtime_port",
        type=int,
        help="port of the SuperNode's local runtime API on 127.0.0.1 (default: a free port, so daemons share a host)",
    )
    p.add_argument(
        "--executor",
        choices=("worker", "flower"),
        default="worker",
        help="worker (default): the site's warm worker runs the installed fedprompt and refuses bundles "
        "with code; flower: Flower's own per-message ClientApp processes (imports the bundle's code)",
    )
    p.add_argument(
        "--flwr-home",
        type=Path,
        help=(
            "the SuperNode's working folder (installed apps, caches); default: LEDGER.flwr-home beside this site's "
            "ledger"
        ),
    )
    p.add_argument("--max-retries", type=int, help="give up after this many failed reconnections (default: never)")
    p.add_argument(
        "--max-wait-time", type=float, help="give up after this many seconds without the aggregator (default: never)"
    )
    p.add_argument(
        "--trusted-entities",
        type=Path,
        help="YAML of Ed25519 keys whose signature an app must carry (Flower Hub apps only; see docs/deployment.md)",
    )
    p.add_argument(
        "--check", action="store_true", help="only validate and print the SuperNode command; do not start it"
    )
    add_log_format_argument(p)
    p.set_defaults(func=run_start)


def run_start(args: argparse.Namespace) -> int:
    from fedprompt.client import deploy
    from fedprompt.common.deploy import flower_env, split_address
    from fedprompt.common.errors import InputError
    from fedprompt.common.logs import configure_logging

    split_address(args.superlink, "--superlink")
    if args.runtime_port is not None and not (0 < args.runtime_port < 65536):
        raise InputError.at("--clientappio-port", f"not a port: {args.runtime_port}")
    if args.trusted_entities is not None and not args.trusted_entities.is_file():
        raise InputError.at(args.trusted_entities, "trusted entities file not found")
    checked = deploy.check_hospital(args.site, args.key, args.root_certificates)
    from fedprompt.client import daemon
    from fedprompt.client.fleet_session import FleetSession

    port = args.runtime_port or daemon.free_local_port()
    argv = deploy.supernode_argv(
        superlink=args.superlink,
        root_certificates=args.root_certificates,
        key=args.key,
        site_path=checked.site_path,
        runtime_port=port,
        max_retries=args.max_retries,
        max_wait_time=args.max_wait_time,
        isolation="process" if args.executor == "worker" else "subprocess",
        trusted_entities=args.trusted_entities,
    )
    summary = (
        f"hospital {checked.hospital_id}: site {checked.site_path}, ledger {checked.ledger}; connecting to "
        f"{args.superlink}"
    )
    if args.check:  # validation only: this process's logging stays as it was
        print(summary)
        print(" ".join(argv))
        return 0
    configure_logging(args.log_format)  # before the daemon's environment: its worker inherits the format
    env = flower_env(args.flwr_home or deploy.site_flwr_home(checked.ledger))
    log.info("%s", summary)
    state_dir = deploy.flwr_home_of(env)
    state_dir.mkdir(parents=True, exist_ok=True)
    session = FleetSession(args.superlink, args.root_certificates, args.key, state_dir)
    if args.max_wait_time is not None:
        session.wait_s = min(session.wait_s, args.max_wait_time)
    if args.executor == "flower":
        session.clear(threading.Event())  # a session its crashed predecessor left open (client/fleet_session.py)
        os.execve(argv[0], argv, env)
    daemon.run(  # ends the process
        supernode_argv=argv,
        runtime_port=port,
        site=checked.site_path,
        hospital_id=checked.hospital_id,
        trusted_apps=frozenset(checked.trusted_apps),
        state_dir=state_dir,
        env=env,
        session=session,
    )


def run_init(args: argparse.Namespace) -> int:
    from fedprompt.client.site_template import write_template

    given = {
        "hospital_id": args.hospital_id,
        "text_field": args.text_field,
        "label_field": args.label_field,
        # Absolute: the file resolves relative paths against its own folder, not the current one.
        **{
            k: getattr(args, k).absolute()
            for k in ("train", "validation", "test", "ledger", "backbone")
            if getattr(args, k)
        },
    }
    if args.federation is not None:
        from fedprompt.common.config import FederationConfig

        given["labels"] = FederationConfig.load(args.federation).label_names
    required = write_template(args.out, {k: v for k, v in given.items() if v is not None})
    print(
        f"[fedprompt] wrote {args.out}" + (f"; still to fill in (REQUIRED): {', '.join(required)}" if required else "")
    )
    if args.federation is None:
        print(
            f"labels not pinned: the site trains nothing until `fedprompt hospital labels --site {args.out} "
            "--federation FILE`"
        )
    print(
        f"next: fedprompt data check --site {args.out}   then, once in the life of the site: fedprompt privacy init "
        f"--site {args.out}"
    )
    return 0


def run_labels(args: argparse.Namespace) -> int:
    from fedprompt.client.site_template import pin_labels
    from fedprompt.common.config import FederationConfig

    labels = FederationConfig.load(args.federation).label_names
    written = pin_labels(args.site, labels)
    print(f"[fedprompt] {args.site}: labels {'pinned' if written else 'already pinned'}: {', '.join(labels)}")
    print(f"next: fedprompt data check --site {args.site} --federation {args.federation}")
    return 0
