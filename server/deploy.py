"""The aggregator's process wrappers for a real deployment: SuperLink (+ Fleet-only proxy), `flwr` CLI.
A hospital's (its checks, its SuperNode) are in client/deploy.py.

Flags are those of Flower 1.42 (checked against `flower-superlink --help` and the installed
source); see docs/deployment.md for the whole picture.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

from fedprompt.common.atomic import atomic_write
from fedprompt.common.deploy import flower_env, toml_str
from fedprompt.common.errors import InputError
from fedprompt.common.pki import PkiPaths

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


def superlink_argv(
    pki: PkiPaths, state: Path, *, host: str = "127.0.0.1", port: int = 8000, isolation: str = "subprocess"
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedprompt.server.superlink_main",  # flower-superlink, longer SQLite busy timeout
        "--ssl-certfile",
        str(pki.server_cert),
        "--ssl-keyfile",
        str(pki.server_key),
        "--ssl-ca-certfile",
        str(pki.ca_cert),
        "--enable-supernode-auth",
        "--database",
        str(state / "superlink.db"),
        "--disable-runtime-dependency-installation",
        "--isolation",
        isolation,
        "--host",
        host,
        "--port",
        str(port),
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
    return flower_env(flwr_home(state))


def require_connection(state: Path) -> Path:
    path = flwr_home(state) / "config.toml"
    if not path.is_file():
        raise InputError.at(
            path,
            "no Control API connection here: start the aggregator first (`fedprompt aggregator start --state ...`)",
        )
    return path


def flwr_cli(
    state: Path, *args: str, timeout: float | None = None, capture: bool = False
) -> subprocess.CompletedProcess:
    require_connection(state)
    return subprocess.run(
        [flower_exe("flwr"), *args],
        env=aggregator_env(state),
        timeout=timeout,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
        check=False,
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
    out = flwr_cli(
        state, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json", capture=True, timeout=120
    ).stdout
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
        log.warning(
            "the log stream of run %s ended while the run is %s: polling its status every %gs", run_id, status, poll
        )
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
    parts = [
        f"workspace={toml_str(str(workspace.resolve()), '--workspace')}",
        f"out={toml_str(str(out.resolve()), '--out')}",
    ]
    if rounds:
        parts.append(f"rounds={int(rounds)}")
    return " ".join(parts)
