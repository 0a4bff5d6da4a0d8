"""`fedprompt aggregator`: the aggregator's daemon (SuperLink + Fleet-only proxy), enrolment, runs.

    fedprompt aggregator start    --pki PKI --state STATE [--port 8000] [--fleet-port 9443]
    fedprompt aggregator proxy    --pki PKI --listen 0.0.0.0:9443 --upstream superlink:8000
    fedprompt aggregator register --state STATE hospital-1.pub
    fedprompt aggregator nodes    --state STATE
    fedprompt aggregator run      --state STATE --workspace WS --out OUT [--rounds N]

`start` runs `flower-superlink` (TLS, SuperNode authentication, SQLite state, no runtime
dependency installation) bound to the aggregator's internal address, and the Fleet-only proxy on
the address hospitals reach. `register` and `run` talk to the Control API through the connection
`start` writes to STATE/flwr/config.toml (also usable directly: FLWR_HOME=STATE/flwr flwr ...).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedprompt.common.exit_codes import ExitCode, epilog

if TYPE_CHECKING:
    from fedprompt.common.pki import PkiPaths
    from fedprompt.server.fleet_proxy import ProxyConfig

log = logging.getLogger("fedprompt.aggregator")

RUN_EXIT_CODES = (
    ExitCode.OK,
    ExitCode.FAILED,
    ExitCode.BAD_INPUT,
    ExitCode.NOTHING_TRAINED,
    ExitCode.PARTLY_TRAINED,
    ExitCode.INTERRUPTED,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from fedprompt.common.logs import add_log_format_argument

    parser = subparsers.add_parser(
        "aggregator", help="run the aggregator (SuperLink + Fleet-only proxy), enrol hospitals, submit runs"
    )
    sub = parser.add_subparsers(dest="aggregator_command", required=True, metavar="ACTION")

    _add_start_parser(sub)

    p = sub.add_parser("proxy", help="run only the Fleet-only reverse proxy (403 for the Control and Runtime APIs)")
    from fedprompt.server.fleet_proxy import build_parser

    build_parser(p)
    add_log_format_argument(p)
    p.set_defaults(func=run_proxy)

    p = sub.add_parser("register", help="register a hospital's SuperNode public key (flwr supernode register)")
    p.add_argument("public_key", type=Path, help="the hospital's ID.pub from `fedprompt pki hospital`")
    p.add_argument("--state", type=Path, required=True, help="aggregator state folder (as given to `start`)")
    p.add_argument("--name", help="a name for the SuperNode (default: the key file's stem)")
    _connection_args(p)
    p.set_defaults(func=run_register)

    p = sub.add_parser("nodes", help="list registered SuperNodes and their status (flwr supernode ls)")
    p.add_argument("--state", type=Path, required=True)
    _connection_args(p)
    p.set_defaults(func=run_nodes)

    _add_run_parser(sub)


def _add_start_parser(sub: argparse._SubParsersAction) -> None:
    from fedprompt.common.logs import add_log_format_argument

    p = sub.add_parser("start", help="start the SuperLink (internal) and the Fleet-only proxy (for hospitals)")
    p.add_argument("--pki", type=Path, required=True, help="folder from `fedprompt pki init`")
    p.add_argument(
        "--state", type=Path, required=True, help="aggregator state folder (SQLite database, apps, flwr connection)"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="SuperLink bind address: the aggregator's INTERNAL network only (default 127.0.0.1)",
    )
    p.add_argument(
        "--port", type=int, default=8000, help="SuperLink port: Fleet + Control + Runtime APIs (default 8000)"
    )
    p.add_argument(
        "--fleet-host",
        default="0.0.0.0",
        help="Fleet-only proxy bind address, reachable by hospitals (default 0.0.0.0)",
    )
    p.add_argument("--fleet-port", type=int, default=9443, help="Fleet-only proxy port (default 9443)")
    p.add_argument(
        "--no-fleet-proxy",
        action="store_true",
        help="start only the SuperLink (the proxy runs elsewhere: `aggregator proxy`)",
    )
    p.add_argument(
        "--isolation",
        choices=("subprocess", "process"),
        default="subprocess",
        help="ServerApp in a SuperLink subprocess (default) or in a separate `flower-superexec`",
    )
    add_log_format_argument(p)
    p.set_defaults(func=run_start)


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="submit a federation run (flwr run) and follow its log until it ends",
        epilog=epilog(*RUN_EXIT_CODES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--state", type=Path, required=True, help="aggregator state folder (as given to `start`)")
    p.add_argument(
        "--workspace",
        type=Path,
        required=True,
        help="folder with federation.yaml (and optional test.csv), on the aggregator",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="run folder on the aggregator (checkpoint, metrics.json, export, report)",
    )
    p.add_argument("--rounds", type=int, help="override federation.yaml's rounds")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--app",
        type=Path,
        help="Flower app folder to submit (default: $FEDPROMPT_APP, else the code-free app installed with fedprompt)",
    )
    p.add_argument(
        "--run-config",
        action="append",
        default=[],
        metavar="'KEY=VALUE ...'",
        help="extra run-config overrides passed on to `flwr run` (keys must exist in the app's [tool.flwr.app.config])",
    )
    p.add_argument("--detach", action="store_true", help="submit and return at once, without following the log")
    p.add_argument("--timeout", type=float, help="give up following the log after this many seconds")
    p.add_argument(
        "--retries",
        type=int,
        default=0,
        metavar="N",
        help="if the run fails after a checkpoint, resubmit it from that checkpoint up to N times (default 0)",
    )
    _connection_args(p)
    p.set_defaults(func=run_run)


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--superlink",
        metavar="HOST:PORT",
        help=(
            "the SuperLink's Control API on the aggregator's internal network (default: the connection `start` wrote "
            "to STATE)"
        ),
    )
    p.add_argument("--root-certificates", type=Path, help="CA certificate for --superlink (the PKI's ca.pem)")


def _ensure_connection(args: argparse.Namespace) -> None:
    """With --superlink: (re)write STATE/flwr/config.toml (e.g. a submitter container next to the SuperLink)."""
    from fedprompt.common.deploy import split_address
    from fedprompt.common.errors import InputError
    from fedprompt.common.pki import load_cert
    from fedprompt.server import deploy

    if args.superlink is None:
        deploy.require_connection(args.state)
        return
    split_address(args.superlink, "--superlink")
    if args.root_certificates is None:
        raise InputError.at("--root-certificates", "required with --superlink (the SuperLink always runs with TLS)")
    load_cert(args.root_certificates)
    deploy.write_connection(args.state, args.superlink, args.root_certificates)


def _check_san(pki, host: str) -> None:
    import ipaddress

    from cryptography import x509

    from fedprompt.common.errors import InputError
    from fedprompt.common.pki import load_cert

    cert = load_cert(pki.server_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    try:
        ok = str(ipaddress.ip_address(host)) in ips
    except ValueError:
        ok = host.lower() in names
    if not ok:
        raise InputError.at(
            pki.server_cert,
            f"does not name {host!r} (it names {', '.join(names + ips)}); the proxy and `flwr` reach "
            f"the SuperLink as {host}: re-create the PKI with `--host {host}` among the hosts",
        )


def _internal_address(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)


def _start_superlink(args: argparse.Namespace, pki: PkiPaths, internal: str) -> subprocess.Popen:
    from fedprompt.server import deploy

    state = args.state
    state.mkdir(parents=True, exist_ok=True)
    conn = deploy.write_connection(state, f"{internal}:{args.port}", pki.ca_cert)
    argv = deploy.superlink_argv(pki, state, host=args.host, port=args.port, isolation=args.isolation)
    log.info(
        "SuperLink on %s:%d (TLS, SuperNode auth, database %s); Control API connection '%s' in %s",
        args.host,
        args.port,
        state / "superlink.db",
        deploy.CONNECTION,
        conn,
    )
    return subprocess.Popen(argv, env=deploy.aggregator_env(state))


async def _serve_proxy(config: ProxyConfig, args: argparse.Namespace, internal: str, link: subprocess.Popen) -> int:
    """The Fleet-only proxy until a signal or the SuperLink's exit; the SuperLink's exit code."""
    import asyncio

    from fedprompt.server import fleet_proxy

    proxy = fleet_proxy.FleetProxy(config)
    await proxy.start()
    log.info(
        "Fleet-only proxy on %s:%d -> %s:%d (hospitals connect here; /v1/control and /v1/runtime answer 403)",
        args.fleet_host,
        proxy.port,
        internal,
        args.port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set() and link.poll() is None:
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass
    finally:
        await proxy.close()
    return link.returncode if link.returncode is not None else 0


def run_start(args: argparse.Namespace) -> int:
    import asyncio

    from fedprompt.common.errors import InputError
    from fedprompt.common.logs import configure_logging
    from fedprompt.common.pki import PkiPaths
    from fedprompt.server import fleet_proxy

    configure_logging(args.log_format)  # this process's lines and the proxy's refusals
    pki = PkiPaths.of(args.pki)
    pki.check_server_side()
    for name in ("port", "fleet_port"):
        if not (0 < getattr(args, name) < 65536):
            raise InputError.at(f"--{name.replace('_', '-')}", f"not a port: {getattr(args, name)}")
    internal = _internal_address(args.host)
    _check_san(pki, internal)
    link = _start_superlink(args, pki, internal)

    def stop_link() -> int:
        if link.poll() is None:
            link.send_signal(signal.SIGTERM)
            try:
                link.wait(15)
            except subprocess.TimeoutExpired:
                link.kill()
        return link.wait()

    if args.no_fleet_proxy:
        # SIGTERM as Ctrl-C: it interrupts link.wait() below. (Stopping the SuperLink inside the handler
        # waited on the same Popen the main thread was blocked in: its wait lock held, the full 15 s,
        # then SIGKILL.)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            return link.wait()
        except KeyboardInterrupt:
            return max(stop_link(), 0)  # the SuperLink ended by the signal we passed on: a clean stop
        finally:
            stop_link()

    config = fleet_proxy.ProxyConfig(
        args.fleet_host,
        args.fleet_port,
        internal,
        args.port,
        server_ssl=fleet_proxy.server_context(str(pki.server_cert), str(pki.server_key)),
        upstream_ssl=fleet_proxy.upstream_context(str(pki.ca_cert)),
    )

    try:
        rc = asyncio.run(_serve_proxy(config, args, internal, link))
    finally:
        code = stop_link()
    return rc or (code if code and code > 0 else 0)


def run_proxy(args: argparse.Namespace) -> int:
    import asyncio
    import ssl

    from fedprompt.common.errors import InputError
    from fedprompt.common.logs import configure_logging
    from fedprompt.server import fleet_proxy

    configure_logging(args.log_format)
    try:
        config = fleet_proxy.config_from_args(args)
    except (ValueError, OSError, ssl.SSLError) as exc:
        raise InputError.at("fleet proxy", str(exc)) from None
    asyncio.run(fleet_proxy.serve(config))
    return 0


def _check_public_key(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedprompt.common.errors import InputError

    if not path.is_file():
        raise InputError.at(path, "public key file not found")
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except Exception as exc:  # ValueError, UnsupportedAlgorithm
        raise InputError.at(path, f"not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InputError.at(path, f"Flower needs an EC public key on a NIST curve, got {type(key).__name__}")


def run_register(args: argparse.Namespace) -> int:
    from fedprompt.common.pki import public_key_fingerprint
    from fedprompt.server import deploy

    _check_public_key(args.public_key)
    _ensure_connection(args)
    print(f"[fedprompt] registering {args.public_key} ({public_key_fingerprint(args.public_key)})", flush=True)
    name = args.name or args.public_key.stem
    return deploy.flwr_cli(
        args.state, "supernode", "register", str(args.public_key), deploy.CONNECTION, "--name", name
    ).returncode


def run_nodes(args: argparse.Namespace) -> int:
    from fedprompt.server import deploy

    _ensure_connection(args)
    return deploy.flwr_cli(args.state, "supernode", "ls", deploy.CONNECTION).returncode


def packaged_app() -> Path:
    """The code-free Flower app shipped in the fedprompt package (fedprompt/app/pyproject.toml,
    package data): its components name the installed fedprompt modules, so the FAB that travels
    to the hospitals is that one file and every site runs the fedprompt it installed itself."""
    import fedprompt

    return Path(fedprompt.__file__).resolve().parent / "app"


def default_app() -> Path:
    env = os.environ.get("FEDPROMPT_APP")
    return Path(env) if env else packaged_app()


def _checked_run_args(args: argparse.Namespace) -> Path:
    """`run`'s arguments and workspace checked before anything is submitted; the app folder."""
    from fedprompt.client.workspace import load_workspace
    from fedprompt.common.errors import InputError

    if args.rounds is not None and args.rounds < 1:
        raise InputError.at("--rounds", f"expected >= 1, got {args.rounds}")
    if args.retries < 0:
        raise InputError.at("--retries", f"expected >= 0, got {args.retries}")
    # The ServerApp reads federation.yaml from this path: validate it now, not in the SuperLink's log.
    load_workspace(args.workspace) if any(args.workspace.glob("hospital-*/site.yaml")) else _load_federation(
        args.workspace
    )
    if (args.out / "checkpoint").exists() and not args.resume:
        raise InputError.at(args.out, "holds a run already: pass --resume to continue it, or choose another --out")
    if args.resume and not (args.out / "checkpoint" / "state.json").is_file():
        raise InputError.at(args.out, "no checkpoint to resume from")
    _ensure_connection(args)
    app = args.app or default_app()
    if not (app / "pyproject.toml").is_file():
        raise InputError.at(
            app, "not a Flower app folder (no pyproject.toml with [tool.flwr.app]): pass --app DIR or set FEDPROMPT_APP"
        )
    return app


def _completed(args: argparse.Namespace, run_id: int, metrics: Path) -> int:
    """A completed run's outcome, said on the console; its exit code."""
    from fedprompt.server.history import read_metrics
    from fedprompt.server.outcome import NOTHING_TRAINED, PARTLY_TRAINED, exit_code

    done = read_metrics(metrics)
    if done["outcome"] == NOTHING_TRAINED:
        print(
            f"[fedprompt] run {run_id} ended without training: {done['outcome_reason']}; no export written "
            f"(see {metrics} and {args.out / 'report.html'})",
            file=sys.stderr,
        )
    elif done["outcome"] == PARTLY_TRAINED:
        print(
            f"[fedprompt] run {run_id} PARTLY TRAINED: {done['outcome_reason']} (exported to {done['export']}; "
            f"see {metrics} and {args.out / 'report.html'})",
            file=sys.stderr,
        )
    else:
        print(f"[fedprompt] run finished: {metrics}")
    return exit_code(done["outcome"])


def run_run(args: argparse.Namespace) -> int:
    from fedprompt.server import deploy

    app = _checked_run_args(args)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    checkpoint = args.out / "checkpoint" / "state.json"
    resume, attempt = args.resume, 0
    while True:
        argv = [
            "run",
            str(app),
            deploy.CONNECTION,
            "--run-config",
            deploy.run_config_arg(args.workspace, args.out, args.rounds),
        ]
        if resume:
            argv += ["--run-config", "resume=true"]
        for extra in args.run_config:
            argv += ["--run-config", extra]
        submitted = deploy.flwr_cli(args.state, *argv, "--format", "json", capture=True)
        run_id = deploy.submitted_run_id(submitted.stdout)
        if run_id is None:
            print(submitted.stdout, end="", file=sys.stderr)
            print("[fedprompt] the SuperLink did not accept the run (above: what flwr said)", file=sys.stderr)
            return submitted.returncode or ExitCode.FAILED
        if args.detach:
            print(
                f"[fedprompt] run {run_id} submitted; follow it with: FLWR_HOME={deploy.flwr_home(args.state)} flwr "
                f"log {run_id} {deploy.CONNECTION}"
            )
            return 0
        try:
            status = deploy.follow_run(
                args.state, run_id, timeout=None if deadline is None else max(deadline - time.monotonic(), 0.001)
            )
        except subprocess.TimeoutExpired:
            print(
                f"[fedprompt] stopped following run {run_id} after {args.timeout:g}s (it goes on at the SuperLink)",
                file=sys.stderr,
            )
            return ExitCode.FAILED
        metrics = args.out / "metrics.json"
        if status == "finished:completed" and metrics.is_file():
            return _completed(args, run_id, metrics)
        print(
            f"[fedprompt] run {run_id} ended {status}"
            + ("" if metrics.is_file() else f" without writing {metrics}")
            + ": see the SuperLink's log",
            file=sys.stderr,
        )
        if status != "finished:failed" or attempt >= args.retries or not checkpoint.is_file():
            return ExitCode.FAILED
        # A ServerApp can fail on a transient SuperLink error (an HTTP 500 under load): go on
        # from the last complete round, as `--resume` would. Hospitals that trained in the lost
        # round have recorded it already: their ledgers over-count, never under-count.
        attempt, resume = attempt + 1, True
        print(
            f"[fedprompt] resubmitting from the round-{deploy.checkpoint_round(checkpoint)} checkpoint (retry "
            f"{attempt} of {args.retries})",
            file=sys.stderr,
            flush=True,
        )


def _load_federation(workspace: Path) -> None:
    from fedprompt.common.config import FederationConfig

    FederationConfig.load(workspace / "federation.yaml")
