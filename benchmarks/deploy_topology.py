"""Helpers that start the real deployment topology on loopback, shared by the deployment tests
(tests/test_deployment.py, test_faults_processes.py, ...) and benchmarks/round.py.

    init_pki                  fedprompt pki init / pki hospital (CA + server certificate, SuperNode keys)
    start_aggregator          fedprompt aggregator start: flower-superlink (TLS, node auth, SQLite) + Fleet-only proxy
    register_hospital         fedprompt aggregator register
    start_hospital            fedprompt hospital start: flower-supernode -> the proxy

Every process runs in its own session (process group) so that it can be killed whole, with its
Flower children (ServerApp, ClientApp, superexec); every wait has a deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from fedprompt.commands.aggregator import packaged_app

FEDPROMPT = [sys.executable, "-m", "fedprompt"]

# The code-free app `aggregator run` submits by default (package data, as in the containers):
# its components name the installed fedprompt package.
APP = packaged_app()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def can_connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Processes:
    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def signal_group(self, name: str, sig: int) -> None:
        """Send `sig` to the whole process group of `name` (the daemon and its Flower children)."""
        try:
            os.killpg(self.procs[name].pid, sig)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGCONT)  # a stopped group cannot act on SIGTERM
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            try:  # the group too: Flower's superexec / clientapp children
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(5)


def cli(*args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDPROMPT, *args], capture_output=True, text=True, timeout=timeout, env=env)


def make_workspace(
    root: Path,
    *,
    hospitals: int = 3,
    per_hospital: int = 40,
    test_size: int = 30,
    rounds: int = 2,
    round_timeout: float = 120.0,
    min_hospitals: int | None = None,
    n_virtual_tokens: int = 4,
    max_length: int = 32,
    max_epsilon: float | None = None,
) -> Path:
    from benchmarks.tiny_backbone import make_tiny_backbone
    from fedprompt.client.demo_data import generate_demo, write_demo_workspace
    from fedprompt.simulation import ensure_ledgers

    ws = write_demo_workspace(
        root / "workspace", generate_demo(hospitals=hospitals, per_hospital=per_hospital, test_size=test_size)
    )
    backbone = make_tiny_backbone(root / "tinybert")
    for site in sorted(ws.glob("hospital-*/site.yaml")):
        doc = yaml.safe_load(site.read_text())
        doc["backbone"] = str(backbone)
        # The topology's runs are short and fix the batch (the federation below): its sites admit them.
        doc["limits"].update(min_total_rounds=1, allow_fixed_batch=True)
        if max_epsilon is not None:
            doc["privacy"]["max_epsilon"] = max_epsilon
        site.write_text(yaml.safe_dump(doc, sort_keys=False))
    fed_path = ws / "federation.yaml"
    fed = yaml.safe_load(fed_path.read_text())
    fed["rounds"] = rounds
    fed["round_timeout"] = round_timeout
    if min_hospitals is not None:
        fed["min_hospitals"] = min_hospitals
    fed["model"].update(n_virtual_tokens=n_virtual_tokens, max_length=max_length)
    fed["training"].update(batch_size=8, local_epochs=1)
    fed_path.write_text(yaml.safe_dump(fed, sort_keys=False))
    assert ensure_ledgers(ws) == [f"hospital-{i}" for i in range(1, hospitals + 1)]
    return ws


def deploy_env(root: Path) -> dict:
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        FLWR_HOME=str(root / "flwr-home-unused"),
        PYTHONUNBUFFERED="1",
    )


def init_pki(root: Path, env: dict, keys: int) -> tuple[Path, Path]:
    """CA + server certificate in ROOT/pki, SuperNode keys hospital-1..KEYS in ROOT/keys (through the CLI)."""
    pki, keydir = root / "pki", root / "keys"
    r = cli("pki", "init", "--out", str(pki), "--host", "localhost", "--host", "127.0.0.1", env=env)
    assert r.returncode == 0, r.stderr
    for i in range(1, keys + 1):
        r = cli("pki", "hospital", "--id", f"hospital-{i}", "--out", str(keydir), env=env)
        assert r.returncode == 0, r.stderr
    return pki, keydir


def start_aggregator(
    procs: Processes,
    pki: Path,
    state: Path,
    env: dict,
    *,
    name: str = "aggregator",
    link_port: int | None = None,
    fleet_port: int | None = None,
) -> tuple[int, int]:
    """SuperLink + Fleet-only proxy; returns (SuperLink port, proxy port) once both accept connections."""
    link_port, fleet_port = link_port or free_port(), fleet_port or free_port()
    procs.start(
        name,
        [
            *FEDPROMPT,
            "aggregator",
            "start",
            "--pki",
            str(pki),
            "--state",
            str(state),
            "--port",
            str(link_port),
            "--fleet-host",
            "127.0.0.1",
            "--fleet-port",
            str(fleet_port),
        ],
        env,
    )
    wait_for(lambda: can_connect(fleet_port) and can_connect(link_port), 180, "SuperLink and proxy ports")
    return link_port, fleet_port


def register_hospital(state: Path, pub: Path, env: dict) -> None:
    r = cli("aggregator", "register", "--state", str(state), str(pub), env=env)
    assert r.returncode == 0, r.stdout + r.stderr


def start_hospital(
    procs: Processes,
    name: str,
    site: Path,
    key: Path,
    pki: Path,
    fleet_port: int,
    flwr_home: Path,
    env: dict,
    extra: tuple[str, ...] = (),
    nice: int = 0,
) -> subprocess.Popen:
    """`nice` > 0 lowers the daemon's CPU priority (and its ClientApps'): many simulated hospitals on
    one host must not starve the aggregator, which in a deployment has a host of its own."""
    return procs.start(
        name,
        [
            *(["nice", "-n", str(nice)] if nice else []),
            *FEDPROMPT,
            "hospital",
            "start",
            "--site",
            str(site),
            "--superlink",
            f"127.0.0.1:{fleet_port}",
            "--root-certificates",
            str(pki / "ca.pem"),
            "--key",
            str(key),
            "--clientappio-port",
            str(free_port()),
            "--flwr-home",
            str(flwr_home),
            *extra,
        ],
        env,
    )


def copy_app(root: Path) -> Path:
    app = root / "app"
    shutil.copytree(APP, app)  # `flwr run` builds the FAB from this folder
    return app
