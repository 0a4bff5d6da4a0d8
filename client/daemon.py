"""The hospital daemon behind `fedprompt hospital start`: three processes, one supervisor.

    fedprompt hospital start (this process, the supervisor)
      |- flower-supernode --isolation process   talks to the aggregator (through its Fleet proxy);
      |                                        Runtime API on 127.0.0.1:<free port>, tasks signed
      |                                        with a secret only this daemon holds
      |- executor thread (client/executor.py)   takes the SuperNode's tasks, checks each app bundle
      '- worker process (client/worker.py)      warm: backbone, records, features; answers messages

The supervisor restarts a dead worker (at once when idle; a message in flight gets a "worker
unavailable" refusal). When the SuperNode ends unasked (a crash), the daemon ends within seconds,
message in flight or not, with a non-zero code, so that a service manager restarts it; SIGTERM/SIGINT
stop all three within seconds (exit 0). Before the SuperNode starts and after it ends, the node's
session at the aggregator is cleared (client/fleet_session.py): a restart right after a crash is
activated at once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, NoReturn

from fedprompt.common.errors import InputError
from fedprompt.common.exit_codes import ExitCode

from .executor import Executor, WorkerHandle, die_with_parent
from .fleet_session import FleetSession

log = logging.getLogger("fedprompt.daemon")

IDLE_CHECK_S = 1.0
STOP_GRACE_S = 5.0  # SIGTERM to the SuperNode, then SIGKILL
SUPERNODE_ENDED = ExitCode.FAILED  # the exit status when the SuperNode ended unasked
EXECUTOR_JOIN_S = 5.0  # the executor's Runtime API calls give up at once when told to stop


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
    session: FleetSession,
) -> NoReturn:
    """Start and supervise all three; ends the process (exit_now) with supervise()'s code."""
    logging.getLogger("flwr").propagate = False  # Flower prints its own records: once is enough
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per task poll otherwise (20 a second)
    lock = hold_state_lock(state_dir)
    stopped = threading.Event()
    started: list[tuple[subprocess.Popen, WorkerHandle, Executor]] = []  # the signal handler stops them

    def stop(signum, _frame) -> None:
        log.info("signal %d: stopping the hospital daemon", signum)
        stopped.set()
        if started:
            stop_all(*started[0], kill=False)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    session.clear(stopped)
    if stopped.is_set():
        exit_now(0)
    secret_path = write_secret(state_dir)
    argv = [*supernode_argv, "--superexec-auth-secret-file", str(secret_path)]
    worker = WorkerHandle(site, env)
    worker.start()
    supernode = subprocess.Popen(argv, env=env, preexec_fn=die_with_parent)
    executor = Executor(f"127.0.0.1:{runtime_port}", secret_path.read_bytes(), site, hospital_id, trusted_apps, worker)
    thread = threading.Thread(target=executor.run, name="fedprompt-executor", daemon=True)
    thread.start()
    started.append((supernode, worker, executor))
    code = 1
    try:
        code = supervise(supernode, worker, stopped)
    except Exception:  # noqa: BLE001 - a supervisor bug: the daemon still ends, non-zero, its children with it
        log.exception("the hospital daemon's supervisor failed")
    finally:
        stop_all(supernode, worker, executor, kill=True)
        thread.join(timeout=EXECUTOR_JOIN_S)
        if thread.is_alive():
            log.error("the executor did not stop within %.0f s: the daemon exits without it", EXECUTOR_JOIN_S)
        worker.stop()
        secret_path.unlink(missing_ok=True)
        session.close()
        lock.close()
        exit_now(code)


def stop_all(supernode: subprocess.Popen, worker: WorkerHandle, executor: Executor, *, kill: bool) -> None:
    """Stop all three at once: the worker is killed (a message in flight is answered "worker
    unavailable", or dropped with the SuperNode), the executor gives up its Runtime API calls, the
    SuperNode gets SIGTERM (`kill`: SIGKILL, and it is waited for)."""
    worker.close()
    executor.stop()
    if supernode.poll() is None:
        if not kill:
            supernode.send_signal(signal.SIGTERM)
            return
        supernode.kill()
        supernode.wait()


def exit_now(code: int) -> NoReturn:
    """End the process once its children are gone and its log is flushed. Not the interpreter's
    normal exit: its teardown of torch & co took 8 s on a loaded host, and it would wait for any
    thread still inside Flower's client code (a push thread retrying a dead SuperNode)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def supervise(supernode: subprocess.Popen, worker: WorkerHandle, stopped: threading.Event) -> int:
    """Until the SuperNode ends (killed after STOP_GRACE_S once the daemon is told to stop): 0 when
    told to stop, else SUPERNODE_ENDED (a service manager restarts the daemon on it)."""
    stop_at: float | None = None
    while supernode.poll() is None:
        try:
            supernode.wait(IDLE_CHECK_S)
        except subprocess.TimeoutExpired:
            pass
        if not stopped.is_set():
            worker.restart_if_dead()
        elif stop_at is None:
            stop_at = time.monotonic() + STOP_GRACE_S
        elif time.monotonic() > stop_at and supernode.poll() is None:
            log.warning("the SuperNode did not stop within %.0f s of SIGTERM: killing it", STOP_GRACE_S)
            supernode.kill()
    if stopped.is_set():
        return 0
    code = supernode.returncode
    how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    log.error("the SuperNode ended (%s): the hospital daemon exits with status %d", how, int(SUPERNODE_ENDED))
    return SUPERNODE_ENDED


def hold_state_lock(state_dir: Path) -> IO[str]:
    """One daemon per FLWR_HOME: a second one would take over this site's secret and its node's session."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = open(state_dir / "daemon.lock", "w")  # noqa: SIM115 - held until the daemon ends
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        lock.close()
        raise InputError.at(state_dir, "another hospital daemon runs with this working folder (--flwr-home)") from exc
    return lock
