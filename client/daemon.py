"""The hospital daemon behind `fedprompt hospital start`: three processes, one supervisor.

    fedprompt hospital start (this process, the supervisor)
      |- flower-supernode --isolation process   talks to the aggregator (through its Fleet proxy);
      |                                        Runtime API on 127.0.0.1:<free port>, tasks signed
      |                                        with a secret only this daemon holds
      |- executor thread (client/executor.py)   takes the SuperNode's tasks, checks each app bundle
      '- worker process (client/worker.py)      warm: backbone, records, features; answers messages

The supervisor restarts a dead worker (at once when idle; a message in flight gets a "worker
unavailable" refusal) and ends when the SuperNode ends, with the SuperNode's exit code.
SIGTERM/SIGINT stop all three.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import threading
from pathlib import Path

from .executor import Executor, WorkerHandle, die_with_parent

log = logging.getLogger("fedprompt.daemon")

IDLE_CHECK_S = 1.0


def free_local_port() -> int:
    """A free port on 127.0.0.1 for the SuperNode's Runtime API: several daemons share a host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_secret(folder: Path) -> Path:
    """A fresh SuperExec secret for this start, readable by this user only."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "superexec.secret"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path


def run(
    *,
    supernode_argv: list[str],
    runtime_port: int,
    site: Path,
    hospital_id: str,
    trusted_apps: frozenset[str],
    state_dir: Path,
    env: dict[str, str],
) -> int:
    logging.getLogger("flwr").propagate = False  # Flower prints its own records: once is enough
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per task poll otherwise (20 a second)
    secret_path = write_secret(state_dir)
    argv = [*supernode_argv, "--superexec-auth-secret-file", str(secret_path)]
    worker = WorkerHandle(site, env)
    worker.start()
    supernode = subprocess.Popen(argv, env=env, preexec_fn=die_with_parent)
    executor = Executor(f"127.0.0.1:{runtime_port}", secret_path.read_bytes(), site, hospital_id, trusted_apps, worker)
    thread = threading.Thread(target=executor.run, name="fedprompt-executor", daemon=True)
    thread.start()
    stopped = threading.Event()

    def stop(signum, _frame) -> None:
        log.info("signal %d: stopping the hospital daemon", signum)
        stopped.set()
        if supernode.poll() is None:
            supernode.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while supernode.poll() is None:
            try:
                supernode.wait(IDLE_CHECK_S)
            except subprocess.TimeoutExpired:
                pass
            if not stopped.is_set():
                worker.restart_if_dead()
        return 0 if stopped.is_set() else supernode.returncode
    finally:
        executor.stop()
        thread.join(timeout=5)
        worker.stop()
        if supernode.poll() is None:
            supernode.kill()
        secret_path.unlink(missing_ok=True)
