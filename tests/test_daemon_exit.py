"""The hospital daemon always ends, with real processes on loopback (benchmarks/deploy_topology.py: PKI,
SuperLink with TLS + node auth + SQLite, the Fleet-only proxy, `fedprompt hospital start`).

- Its SuperNode SIGKILLed while idle: the daemon exits 1 within 30 s (worker gone too), and
  a restart right away is activated by the SuperLink (the crashed session is cleared, not waited out
  for 2 missed heartbeats, which made five restarts in a row fail with Flower's 305); so is a
  restart right after the whole daemon was SIGKILLed.
- A message in flight (the worker frozen with SIGSTOP while it holds the run's first message):
  SuperNode SIGKILLed -> 1 within 30 s; SIGTERM -> 0 within a few seconds.
- SIGTERM while idle ends it within a few seconds, with code 0.

The idle test runs by default (about 2 minutes on a loaded 2-core host: an aggregator and three daemon
starts); the two with a message in flight also submit a run each (marker `heavy`: `-m heavy`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from test_faults_processes import Topology, cmdline, descendants

from benchmarks.deploy_topology import wait_for

pytestmark = [pytest.mark.deployment, pytest.mark.faults, pytest.mark.subprocess]

EXIT_S = 30.0  # issue 23's target: the daemon ends within 30 s of its SuperNode's death
SIGTERM_S = 10.0  # "within a few seconds" on a loaded shared host
ACTIVATION_S = 180.0  # a daemon's start (its worker imports torch) on 2 loaded cores: a deadline, not a figure


@pytest.fixture(scope="module")
def topo():
    """One aggregator and one registered hospital, shared by the tests (each starts its own daemon)."""
    root = Path(tempfile.mkdtemp(prefix="fedprompt-daemon-"))
    topology = None
    try:
        topology = Topology(root, 1, per_hospital=24, test_size=10, rounds=1, min_hospitals=1, n_virtual_tokens=2)
        topology.start_aggregator()
        topology.register_all()
        yield topology
    finally:
        if topology is not None:
            topology.teardown()
        if not os.environ.get("FEDPROMPT_KEEP_DEPLOY"):
            shutil.rmtree(root, ignore_errors=True)


STARTS = [0]


def activations(topo: Topology) -> int:
    return topo.procs.log("aggregator").count("[Fleet.ActivateNode] Activated")


def start_daemon(topo: Topology) -> tuple[str, subprocess.Popen, float]:
    """A new `fedprompt hospital start` for hospital-1, once the SuperLink activated it and its worker
    is warm; returns its name, process and the seconds until its activation."""
    STARTS[0] += 1
    name, before, t0 = f"daemon-{STARTS[0]}", activations(topo), time.monotonic()
    topo.start_hospital(1, name=name)
    proc = topo.procs.procs[name]
    wait_for(lambda: proc.poll() is not None or activations(topo) > before, ACTIVATION_S, f"{name} activated")
    activated = time.monotonic() - t0
    wait_for(lambda: proc.poll() is not None or "worker ready" in topo.procs.log(name), ACTIVATION_S, "a warm worker")
    assert proc.poll() is None, topo.procs.log(name)[-3000:]
    return name, proc, activated


def child(proc: subprocess.Popen, marker: str) -> int:
    pids = [p for p in descendants(proc.pid) if marker in cmdline(p)]
    assert len(pids) == 1, (marker, [cmdline(p) for p in descendants(proc.pid)])
    return pids[0]


def supernode(proc: subprocess.Popen) -> int:
    return child(proc, "fedprompt.client.supernode_main")


def worker(proc: subprocess.Popen) -> int:
    return child(proc, "fedprompt.client.worker")


def ended_within(proc: subprocess.Popen, limit: float, t0: float, log: str) -> tuple[int, float]:
    """The exit code and the seconds since t0; fails (after killing it) if it runs past `limit`."""
    try:
        rc = proc.wait(max(0.1, t0 + limit - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the daemon still ran {limit:g}s later:\n{log[-3000:]}")
    return rc, time.monotonic() - t0


def gone(pids: list[int]) -> bool:
    return not any(Path(f"/proc/{p}").exists() and "fedprompt" in cmdline(p) for p in pids)


def hold_a_message(topo: Topology, proc: subprocess.Popen, name: str) -> None:
    """Freeze the worker, submit a run: its first message (the pre-flight query) is taken by the
    executor and handed to the frozen worker, where it stays: a message in flight."""
    os.kill(worker(proc), signal.SIGSTOP)
    topo.out = topo.root / f"out-{name}"
    topo.submit(f"run-{name}", timeout=300)
    # "Received successfully": the SuperNode holds the message (its executor polls every 50 ms).
    wait_for(lambda: "Received successfully" in topo.procs.log(name), 240, f"{name} to receive a message")
    wait_for(lambda: executor_holds_a_message(proc), 30, f"{name}'s executor to hand the message to the worker")


def executor_holds_a_message(proc: subprocess.Popen) -> bool:
    """The frozen worker's end of its socket pair has unread bytes: the executor sent it a message."""
    out = subprocess.run(["ss", "-xp"], capture_output=True, text=True).stdout
    pid = worker(proc)
    return any(
        f"pid={pid}," in line and line.split()[2] != "0" for line in out.splitlines() if line.startswith("u_str")
    )


def test_supernode_killed_idle_daemon_exits_1_and_restarts_at_once(topo):
    name, proc, _ = start_daemon(topo)
    pids = descendants(proc.pid)
    t0 = time.monotonic()
    os.kill(supernode(proc), signal.SIGKILL)
    rc, took = ended_within(proc, EXIT_S, t0, topo.procs.log(name))
    assert rc == 1 and wait_for(lambda: gone(pids), 5, "the daemon's worker to end"), topo.procs.log(name)[-3000:]
    # A service manager restarts it at once: the SuperLink activates it (Flower's 305 came for ~60 s before).
    name, proc, restarted = start_daemon(topo)
    # The whole daemon SIGKILLed (nothing of it can end its session): its restart ends it, with the node id it kept.
    topo.procs.signal_group(name, signal.SIGKILL)
    proc.wait(10)
    name, proc, restarted_whole = start_daemon(topo)
    assert "(its previous session)" in topo.procs.log(name), topo.procs.log(name)[-3000:]
    # SIGTERM while idle: ends with 0, all three gone.
    pids = descendants(proc.pid)
    t2 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc2, stopped = ended_within(proc, SIGTERM_S, t2, topo.procs.log(name))
    assert rc2 == 0 and wait_for(lambda: gone(pids), 5, "the daemon's children to end"), topo.procs.log(name)
    # No restart waited out an old session. (The first start may be refused for a few seconds: the proxy
    # re-reads the registered keys at most every keys_miss_interval, and the key was registered just now.)
    refused = {
        f"daemon-{i}": [line for line in topo.procs.log(f"daemon-{i}").splitlines() if "Failed to activate" in line]
        for i in range(STARTS[0] - 1, STARTS[0] + 1)
    }
    assert not any(refused.values()), refused
    print(
        f"\n[daemon] idle SuperNode kill: exit {rc} after {took:.1f}s; restart active after {restarted:.1f}s; after a "
        f"whole-daemon kill: {restarted_whole:.1f}s; SIGTERM: exit 0 after {stopped:.1f}s"
    )


@pytest.mark.heavy
@pytest.mark.parametrize("fault", ["supernode-sigkill", "daemon-sigterm"])
def test_daemon_ends_with_a_message_in_flight(topo, fault):
    """A SuperNode killed: 1 within 30 s; the daemon sent SIGTERM: 0 within a few seconds."""
    name, proc, _ = start_daemon(topo)
    hold_a_message(topo, proc, name)
    pids = descendants(proc.pid)
    t0 = time.monotonic()
    crash = fault == "supernode-sigkill"
    if crash:
        os.kill(supernode(proc), signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGTERM)
    rc, took = ended_within(proc, EXIT_S if crash else SIGTERM_S, t0, topo.procs.log(name))
    assert rc == (1 if crash else 0) and wait_for(lambda: gone(pids), 5, "the daemon's children to end"), (
        topo.procs.log(name)
    )
    assert re.search(r"refuses the \w+ message \[worker unavailable\]", topo.procs.log(name))  # held, given up
    topo.procs.signal_group(f"run-{name}", signal.SIGKILL)
    print(f"\n[daemon] {fault} with a message in flight: exit {rc} after {took:.1f}s")
