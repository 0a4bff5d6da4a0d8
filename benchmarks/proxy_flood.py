"""The Fleet proxy under an unauthenticated flood, with the real SuperLink behind it (issue 23).

    python -m benchmarks.proxy_flood [--seconds 20] [--json OUT.json]

Starts, on loopback only: `fedprompt aggregator start --no-fleet-proxy` (the SuperLink: TLS,
SuperNode authentication, SQLite state), registers hospital-1's key, and `fedprompt aggregator
proxy` in front of it. Then, for --seconds, an attacking process (source addresses in 8 networks
127.10-17.0.0/24) keeps up
  - 8 connections each sending a 60 MiB push-object body as fast as they can (4 declared with
    Content-Length, 4 chunked), and
  - 200 slow bodies: push-object declaring 5 MiB, 1 KiB a second,
none of them signed, each reconnecting as soon as the proxy closes it (the attacking process runs at
nice 10: on a real network its CPU would not be the aggregator's). Meanwhile hospital-1 sends a
signed request every 0.5 s (send-node-heartbeat, answered by the SuperLink) and the resident memory
of the proxy's and the SuperLink's process trees is sampled.

Prints (and writes with --json): RSS before, peak during, after; the growth of both together
(target <= 100 MB); hospital-1's latencies (target: all < 1 s); what the attackers sent and got;
ERROR lines the SuperLink logged during the attack.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import h11
from cryptography.hazmat.primitives import serialization
from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
from flwr.proto.node_pb2 import Node

from fedprompt.server.proxy_auth import signed_headers

from .common import tree_rss_mb

FEDPROMPT = [sys.executable, "-m", "fedprompt"]
LOOPBACK = "127.0.0.1"
BIG_BODY = 60 * 1024 * 1024
SLOW_DECLARED = 5 * 1024 * 1024
RSS_GROWTH_TARGET_MB = 100
LATENCY_TARGET_S = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise SystemExit(f"timed out after {timeout:g}s waiting for {what}")


def can_connect(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
        return True
    except OSError:
        return False


def cli(env: dict, *args: str) -> str:
    done = subprocess.run([*FEDPROMPT, *args], env=env, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode:
        raise SystemExit(f"fedprompt {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


class Attack(multiprocessing.Process):  # forked (Linux): nothing is pickled
    """The unauthenticated flood, in a process of its own (no GIL shared with the measurements)."""

    def __init__(self, port: int, ca: Path, seconds: float):
        super().__init__(daemon=True)
        self.port, self.ca, self.seconds = port, ca, seconds
        self.report: multiprocessing.Queue = multiprocessing.Queue()

    def run(self) -> None:
        # A real attacker's CPU is not the aggregator's: on one host, the flood yields to what it measures.
        os.nice(10)
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "socket.send() raised exception" per reset
        self.report.put(asyncio.run(self._main()))

    async def _main(self) -> dict:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        stats: Counter[str] = Counter()
        end = time.monotonic() + self.seconds
        tasks = [self._loop(i, "big", ctx, stats, end) for i in range(8)]
        tasks += [self._loop(i, "slow", ctx, stats, end) for i in range(200)]
        await asyncio.gather(*tasks)
        return dict(stats)

    async def _loop(self, i: int, kind: str, ctx: ssl.SSLContext, stats: Counter, end: float) -> None:
        src = f"127.{10 + i % 8}.0.{2 + i // 8 % 200}"
        while time.monotonic() < end:
            try:
                await asyncio.wait_for(self._one(i, kind, src, ctx, stats), end - time.monotonic())
            except (OSError, TimeoutError, ssl.SSLError):
                stats[f"{kind} closed by the proxy without an answer (caps, rate)"] += 1
            await asyncio.sleep(0.2)

    async def _one(self, i: int, kind: str, src: str, ctx: ssl.SSLContext, stats: Counter) -> None:
        reader, writer = await asyncio.open_connection(
            LOOPBACK, self.port, ssl=ctx, server_hostname="localhost", local_addr=(src, 0)
        )
        stats[f"{kind} connections"] += 1
        chunked = kind == "big" and i % 2 == 1
        size = BIG_BODY if kind == "big" else SLOW_DECLARED
        framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % size
        writer.write(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Type: application/protobuf\r\n")
        writer.write(framing + b"\r\n" + (b"%x\r\n" % BIG_BODY if chunked else b""))
        answer = asyncio.ensure_future(reader.read())  # the proxy's answer, complete when it closes
        block = os.urandom(64 * 1024 if kind == "big" else 1024)
        sent = 0
        try:
            while sent < size and not answer.done():
                writer.write(block)
                await writer.drain()
                sent += len(block)
                stats[f"{kind} body bytes sent"] += len(block)
                if kind == "slow":
                    await asyncio.sleep(1.0)
            status = (await answer)[9:12].decode("latin-1") or "closed without an answer"
            stats[f"{kind} answered {status}"] += 1
        finally:
            answer.cancel()
            writer.close()


class Hospital:
    """hospital-1's SuperNode as it talks to the proxy: signed heartbeats on one kept-alive TLS
    connection (httpx pools it), reopened when the proxy closes it."""

    def __init__(self, port: int, ctx: ssl.SSLContext, key, node_id: int):
        self.port, self.ctx, self.key = port, ctx, key
        self.body = SendNodeHeartbeatRequest(node=Node(node_id=node_id), heartbeat_interval=30).SerializeToString()
        self.sock: ssl.SSLSocket | None = None
        self.conn = h11.Connection(h11.CLIENT)

    def request(self) -> tuple[float, int, bool]:
        """One heartbeat: (seconds, status, answered by the SuperLink)."""
        t0 = time.monotonic()
        if self.sock is None or self.conn.our_state is not h11.IDLE:
            if self.sock is not None:
                self.sock.close()
            raw = socket.create_connection((LOOPBACK, self.port), timeout=10)
            self.sock, self.conn = self.ctx.wrap_socket(raw, server_hostname="localhost"), h11.Connection(h11.CLIENT)
        headers = [(b"host", b"x"), (b"content-type", b"application/protobuf"), *signed_headers(self.key)]
        headers.append((b"content-length", str(len(self.body)).encode()))
        target = "/v1/fleet/send-node-heartbeat"
        self.sock.sendall(self.conn.send(h11.Request(method="POST", target=target, headers=headers)))
        self.sock.sendall(self.conn.send(h11.Data(data=self.body)) + self.conn.send(h11.EndOfMessage()))
        status, by_superlink = 0, False
        while not isinstance(event := self.conn.next_event(), (h11.EndOfMessage, h11.ConnectionClosed)):
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                status, by_superlink = event.status_code, (b"server", b"uvicorn") in list(event.headers)
        elapsed = time.monotonic() - t0
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return elapsed, status, by_superlink


def start(root: Path, env: dict) -> tuple[dict[str, subprocess.Popen], int, int, Path, int]:
    pki, keys, state = root / "pki", root / "keys", root / "state"
    cli(env, "pki", "init", "--out", str(pki), "--host", "localhost", "--host", LOOPBACK)
    cli(env, "pki", "hospital", "--id", "hospital-1", "--out", str(keys))
    link, fleet = free_port(), free_port()
    procs, node_id = {}, 0
    for name, argv in (
        ("superlink", ["aggregator", "start", "--pki", str(pki), "--state", str(state), "--host", LOOPBACK]),
        ("proxy", ["aggregator", "proxy", "--pki", str(pki), "--listen", f"{LOOPBACK}:{fleet}"]),
    ):
        extra = (
            ["--port", str(link), "--no-fleet-proxy"] if name == "superlink" else ["--upstream", f"{LOOPBACK}:{link}"]
        )
        with open(root / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen(
                [*FEDPROMPT, *argv, *extra], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        if name == "superlink":
            wait_for(lambda: can_connect(link), 180, "the SuperLink")
            out = cli(env, "aggregator", "register", "--state", str(state), str(keys / "hospital-1.pub"))
            registered = re.search(r"SuperNode (\d+) registered", out)
            if registered is None:
                raise SystemExit(f"no node id in the output of `fedprompt aggregator register`:\n{out}")
            node_id = int(registered.group(1))
    wait_for(lambda: "1 registered SuperNode key" in (root / "proxy.log").read_text(), 60, "the proxy to read the keys")
    return procs, link, fleet, keys / "hospital-1.key", node_id


def measure(root: Path, seconds: float) -> dict:
    env = dict(os.environ, FLWR_HOME=str(root / "flwr-home"), PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # flower-superexec
    procs, link, port, key_path, node_id = start(root, env)
    try:
        key = serialization.load_ssh_private_key(key_path.read_bytes(), None)
        ctx = ssl.create_default_context(cafile=str(root / "pki" / "ca.pem"))

        def rss() -> dict[str, float]:
            return {name: tree_rss_mb(p.pid) for name, p in procs.items()}

        hospital = Hospital(port, ctx, key, node_id)
        # The same heartbeats straight to the SuperLink (its internal port): how much of the latency
        # is this busy host's, not the proxy's.
        direct = Hospital(link, ctx, key, node_id)
        quiet = []
        for _ in range(10):  # the first requests load what each side needs; then the latency without attack
            quiet.append(hospital.request()[0])
            time.sleep(0.2)
        before = rss()
        errors_before = _errors(root / "superlink.log")
        attack = Attack(port, root / "pki" / "ca.pem", seconds)
        attack.start()
        latencies, direct_latencies, answered, peak = [], [], [], dict(before)
        while attack.is_alive():
            elapsed, status, by_superlink = hospital.request()
            latencies.append(elapsed)
            direct_latencies.append(direct.request()[0])
            answered.append(status == 200 and by_superlink)
            peak = {k: max(v, peak[k]) for k, v in rss().items()}
            time.sleep(0.5)
        seen = attack.report.get(timeout=60)
        attack.join(10)
        after = rss()
        growth = sum(peak.values()) - sum(before.values())
        return {
            "rss_mb_before": before,
            "rss_mb_peak": peak,
            "rss_mb_after": after,
            "growth_mb_proxy_plus_superlink": round(growth, 1),
            "growth_target_mb": RSS_GROWTH_TARGET_MB,
            "hospital_requests": len(latencies),
            "hospital_answered_200_by_superlink": sum(answered),
            "hospital_latency_max_s": round(max(latencies), 3),
            "hospital_latency_median_s": round(statistics.median(latencies), 3),
            "hospital_latency_without_attack_max_s": round(max(quiet[3:]), 3),
            "hospital_latencies_s": [round(t, 3) for t in latencies],
            "direct_to_superlink_latencies_s": [round(t, 3) for t in direct_latencies],
            "host_load_average": os.getloadavg(),
            "latency_target_s": LATENCY_TARGET_S,
            "attack_seconds": seconds,
            "attack": seen,
            "superlink_error_lines_during_attack": _errors(root / "superlink.log") - errors_before,
            "met": growth <= RSS_GROWTH_TARGET_MB and max(latencies) < LATENCY_TARGET_S and all(answered),
        }
    finally:
        for p in procs.values():
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def _errors(log: Path) -> int:
    return len(re.findall(r"\bERROR\b", log.read_text(errors="replace")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.proxy_flood", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="how long the flood lasts (default 20)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs) and print its path")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="fedprompt-proxy-flood-"))
    try:
        result = measure(root, args.seconds)
    finally:
        if args.keep:
            print(f"work folder: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
