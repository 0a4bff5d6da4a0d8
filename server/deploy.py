"""Process wrappers for a real deployment: SuperLink (+ Fleet-only proxy), SuperNode, `flwr` CLI.

Flags are those of Flower 1.42 (checked against `flower-superlink --help`, `flower-supernode
--help` and the installed source); see docs/deployment.md for the whole picture.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedprompt.common.atomic import atomic_write
from fedprompt.common.errors import InputError, Problem

from .pki import PkiPaths, check_hospital_key, load_cert

CONNECTION = "fedprompt"  # name of the Control API connection in the aggregator's flwr config
log = logging.getLogger("fedprompt.deploy")


def flower_exe(name: str) -> str:
    """`flower-superlink` etc. from this interpreter's environment first, then PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise InputError.at(name, "Flower executable not found (is flwr installed in this environment?)")
    return found


def split_address(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 < int(port) < 65536):
        raise InputError.at(what, f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _toml_str(value: str, what: str) -> str:
    if any(c in value for c in '"\\\n\r\t') or any(ord(c) < 32 for c in value):
        raise InputError.at(what, f"{value!r}: quotes, backslashes and control characters are not supported here")
    return f'"{value}"'


# ---------------------------------------------------------------- aggregator side


def superlink_argv(pki: PkiPaths, state: Path, *, host: str = "127.0.0.1", port: int = 8000, isolation: str = "subprocess") -> list[str]:
    return [
        sys.executable, "-m", "fedprompt.server.superlink_main",  # flower-superlink, longer SQLite busy timeout
        "--ssl-certfile", str(pki.server_cert),
        "--ssl-keyfile", str(pki.server_key),
        "--ssl-ca-certfile", str(pki.ca_cert),
        "--enable-supernode-auth",
        "--database", str(state / "superlink.db"),
        "--disable-runtime-dependency-installation",
        "--isolation", isolation,
        "--host", host,
        "--port", str(port),
    ]


def flwr_home(state: Path) -> Path:
    """FLWR_HOME of the aggregator's processes: the SuperLink's apps and the CLI's connection."""
    return state / "flwr"


def write_connection(state: Path, address: str, ca_cert: Path) -> Path:
    """`[superlink.fedprompt]` in STATE/flwr/config.toml: where `flwr` reaches the Control API."""
    home = flwr_home(state)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    connection = {"address": address, "root-certificates": str(ca_cert.resolve())}
    text = (
        "# Written by `fedprompt aggregator start`: the aggregator's own Control API connection.\n"
        f"# Use with: FLWR_HOME={home} flwr <command> ... {CONNECTION}\n"
        + tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}})
    )
    atomic_write(path, text.encode("utf-8"))
    return path


def aggregator_env(state: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home(state).resolve())
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def require_connection(state: Path) -> Path:
    path = flwr_home(state) / "config.toml"
    if not path.is_file():
        raise InputError.at(path, "no Control API connection here: start the aggregator first (`fedprompt aggregator start --state ...`)")
    return path


def flwr_cli(state: Path, *args: str, timeout: float | None = None, capture: bool = False) -> subprocess.CompletedProcess:
    require_connection(state)
    return subprocess.run(
        [flower_exe("flwr"), *args], env=aggregator_env(state), timeout=timeout, text=True,
        stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None, check=False,
    )


def _json_reply(output: str) -> dict:
    """The JSON object a `flwr ... --format json` command printed (pretty-printed, maybe after log lines)."""
    start = output.find("{")
    while start != -1:
        try:
            reply, _ = json.JSONDecoder().raw_decode(output, start)
            if isinstance(reply, dict):
                return reply
        except ValueError:
            pass
        start = output.find("{", start + 1)
    return {}


def submitted_run_id(output: str) -> int | None:
    """The run id in `flwr run --format json`'s output, or None if the run was not accepted."""
    reply = _json_reply(output)
    return int(reply["run-id"]) if reply.get("success") and reply.get("run-id") else None


def run_status(state: Path, run_id: int) -> str:
    """The SuperLink's status of a run ("running", "finished:completed", ...); "unknown" if unreadable."""
    out = flwr_cli(state, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json", capture=True, timeout=120).stdout
    runs = _json_reply(out).get("runs") or [{}]
    return str(runs[0].get("status", "unknown"))


def follow_run(state: Path, run_id: int, *, timeout: float | None = None, poll: float = 5.0) -> str:
    """Stream a run's log until the SuperLink reports it finished; returns its final status.

    `flwr log --stream` returns as soon as its stream ends for any reason (flwr treats any end of
    the stream as "all logs retrieved"), e.g. after an HTTP 500 from a SuperLink whose SQLite state
    is busy: so the status, not the stream, says when the run is over. Raises
    subprocess.TimeoutExpired after `timeout` seconds.
    """
    deadline = None if timeout is None else time.monotonic() + timeout

    def remaining() -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise subprocess.TimeoutExpired(["flwr", "log", str(run_id)], timeout or 0)
        return left

    flwr_cli(state, "log", str(run_id), CONNECTION, "--stream", timeout=remaining())
    status = run_status(state, run_id)
    if not status.startswith("finished"):
        log.warning("the log stream of run %s ended while the run is %s: polling its status every %gs", run_id, status, poll)
    while not status.startswith("finished"):
        time.sleep(min(poll, remaining() or poll))
        status = run_status(state, run_id)
    return status


def checkpoint_round(state_json: Path) -> int | None:
    """The last complete round recorded in a run's checkpoint/state.json (None if unreadable)."""
    from .history import read_checkpoint_state  # pydantic: only when a run is followed

    try:
        return read_checkpoint_state(state_json).round
    except InputError:
        return None


def run_config_arg(workspace: Path, out: Path, rounds: int | None) -> str:
    parts = [f"workspace={_toml_str(str(workspace.resolve()), '--workspace')}", f"out={_toml_str(str(out.resolve()), '--out')}"]
    if rounds:
        parts.append(f"rounds={int(rounds)}")
    return " ".join(parts)


# ---------------------------------------------------------------- hospital side


@dataclass
class HospitalCheck:
    site_path: Path
    hospital_id: str
    ledger: Path
    trusted_apps: list[str]


def check_hospital(site_path: Path, key: Path, root_certificates: Path) -> HospitalCheck:
    """Everything a hospital daemon needs, validated before the SuperNode starts (InputError)."""
    from fedprompt.common.config import SiteConfig

    problems: list[Problem] = []
    site_path = Path(site_path)
    site = None
    try:
        site = SiteConfig.load(site_path)
    except InputError as exc:
        problems += exc.problems
    if site is not None:
        if not site.ledger.is_file():
            problems.append(Problem(str(site.ledger), None, "ledger",
                                    f"privacy ledger not found: create it once with `fedprompt privacy init --site {site_path}` "
                                    "(never re-create a lost ledger on a site that has trained: restore it from backup)"))
        else:
            from fedprompt.client.ledger import PrivacyLedger
            from fedprompt.common.errors import LedgerError

            try:
                PrivacyLedger.for_site(site)
            except LedgerError as exc:
                problems.append(Problem(str(site.ledger), None, "ledger", str(exc)))
            except InputError as exc:
                problems += exc.problems
        for name in ("train", "validation"):
            p = getattr(site, name)
            if p is not None and not Path(p).is_file():
                problems.append(Problem(str(site_path), None, name, f"record file {p} not found"))
        if site.backbone is not None and not (Path(site.backbone) / "config.json").is_file():
            problems.append(Problem(str(site_path), None, "backbone", f"{site.backbone} is not a model directory (no config.json)"))
    for check in (lambda: check_hospital_key(key), lambda: load_cert(root_certificates)):
        try:
            check()
        except InputError as exc:
            problems += exc.problems
    if problems:
        raise InputError(problems)
    assert site is not None
    return HospitalCheck(site_path.resolve(), site.hospital_id, site.ledger, list(site.trusted_apps))


def supernode_argv(
    *, superlink: str, root_certificates: Path, key: Path, site_path: Path, runtime_host: str = "127.0.0.1", runtime_port: int = 9094,
    max_retries: int | None = None, max_wait_time: float | None = None, isolation: str = "subprocess", trusted_entities: Path | None = None,
) -> list[str]:
    argv = [
        sys.executable, "-P", "-m", "fedprompt.client.supernode_main",  # flower-supernode, idle poll 1 s (not 3 s)
        "--superlink", superlink,
        "--root-certificates", str(Path(root_certificates).resolve()),
        "--auth-supernode-private-key", str(Path(key).resolve()),
        "--node-config", f"site-config={_toml_str(str(Path(site_path).resolve()), '--site')}",
        "--isolation", isolation,
        "--host", runtime_host,
        "--port", str(runtime_port),
    ]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    if trusted_entities is not None:
        argv += ["--trusted-entities", str(Path(trusted_entities).resolve())]
    return argv


def flwr_home_of(env: dict[str, str]) -> Path:
    """The FLWR_HOME a daemon started with `env` uses (Flower's default: ~/.flwr)."""
    return Path(env["FLWR_HOME"]) if env.get("FLWR_HOME") else Path.home() / ".flwr"


def site_flwr_home(ledger: Path) -> Path:
    """A hospital daemon's FLWR_HOME unless `--flwr-home` says otherwise: `LEDGER.flwr-home/`, beside
    the site's privacy ledger (like `LEDGER.anchor` and `LEDGER.noise-memo`). Per site: a ledger
    belongs to one hospital, so two daemons on one host never share it, as they would share ~/.flwr
    or an inherited $FLWR_HOME. Writable: the daemon writes the ledger's folder anyway, while
    site.yaml and the records may be read-only. What Flower keeps there (installed app bundles,
    caches) is disposable and needs no backup."""
    return ledger.with_name(ledger.name + ".flwr-home")


def hospital_env(flwr_home_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(Path(flwr_home_dir).resolve())
    # The hospital never downloads anything: backbone and tokenizer are local files.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env
