"""The deployment topology as real processes on loopback (marker `deployment`).

    fedprompt pki init / pki hospital          CA + server certificate, 4 SuperNode keys
    fedprompt aggregator start                 flower-superlink (TLS, node auth, SQLite) on 127.0.0.1:P1
                                               + Fleet-only proxy on 127.0.0.1:P2
    fedprompt aggregator register x3           keys of hospital-1..3 (the 4th stays unregistered)
    fedprompt hospital start x3                flower-supernode -> proxy (P2), never the SuperLink itself
    fedprompt aggregator run                   flwr run: 2 rounds, metrics.json + export in --out

Every process runs in its own session and is killed (whole process group) at teardown; every
wait has a deadline. The submitted Flower app is fedprompt/app (the default), a code-free app folder whose
components are the installed `fedprompt.server.server_app:app` and `fedprompt.client.client_app:app`;
the aggregator's backbone (the tiny test BERT) comes through the `backbone` run-config key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from benchmarks.deploy_topology import (
    APP,
    FEDPROMPT,
    Processes,
    can_connect,
    cli,
    copy_app,
    deploy_env,
    free_port,
    init_pki,
    make_workspace,
    register_hospital,
    start_aggregator,
    start_hospital,
    wait_for,
)
from fedprompt.server.proxy_auth import signed_headers

pytestmark = [pytest.mark.deployment, pytest.mark.subprocess]

RUN_TIMEOUT = 900.0  # the 2-round run, from submission to metrics.json (a generous bound: 2 cores shared)
# How Flower 1.42 words a daemon it declared gone (SuperNode or ClientApp heartbeat missed).
FLOWER_LIVENESS = ("Node Unavailable", "ClientApp stopped responding")


@pytest.fixture(scope="module")
def deployment():
    # Not tmp_path_factory: a concurrent pytest session on the same machine may rotate away its
    # numbered folders while these daemons still use them. FEDPROMPT_KEEP_DEPLOY=1 keeps the logs.
    root = Path(tempfile.mkdtemp(prefix="fedprompt-deploy-"))
    logs = root / "logs"
    logs.mkdir()
    procs = Processes(logs)
    env = deploy_env(root)
    t0 = time.monotonic()
    try:
        state = root / "aggregator-state"
        pki, keys = init_pki(root, env, keys=4)
        ws = make_workspace(root, round_timeout=400.0)  # a ClientApp import alone took 85 s on a host at load 30
        app = copy_app(root)

        link_port, fleet_port = start_aggregator(procs, pki, state, env)
        for i in range(1, 4):
            register_hospital(state, keys / f"hospital-{i}.pub", env)
        for i in range(1, 4):
            start_hospital(
                procs,
                f"hospital-{i}",
                ws / f"hospital-{i}" / "site.yaml",
                keys / f"hospital-{i}.key",
                pki,
                fleet_port,
                root / f"node-{i}",
                env,
            )
        # A fourth SuperNode with a valid but unregistered key, also through the proxy.
        procs.start(
            "intruder",
            [
                *FEDPROMPT,
                "hospital",
                "start",
                "--site",
                str(ws / "hospital-1" / "site.yaml"),
                "--superlink",
                f"127.0.0.1:{fleet_port}",
                "--root-certificates",
                str(pki / "ca.pem"),
                "--key",
                str(keys / "hospital-4.key"),
                "--clientappio-port",
                str(free_port()),
                "--flwr-home",
                str(root / "node-4"),
                "--max-retries",
                "1",
                "--max-wait-time",
                "30",
            ],
            env,
        )
        out = root / "run-out"
        procs.start(
            "run",
            [
                *FEDPROMPT,
                "aggregator",
                "run",
                "--state",
                str(state),
                "--workspace",
                str(ws),
                "--out",
                str(out),
                "--app",
                str(app),
                "--timeout",
                str(RUN_TIMEOUT),
                # the aggregator uses the hospitals' (tiny) backbone
                "--run-config",
                f'backbone="{root / "tinybert"}"',
            ],
            env,
        )
        yield {
            "root": root,
            "procs": procs,
            "pki": pki,
            "keys": keys,
            "state": state,
            "ws": ws,
            "out": out,
            "fleet_port": fleet_port,
            "link_port": link_port,
            "t0": t0,
            "env": env,
        }
    finally:
        procs.stop_all()
        print(f"\n[deployment] total {time.monotonic() - t0:.1f}s; logs in {logs}")
        if not os.environ.get("FEDPROMPT_KEEP_DEPLOY"):
            shutil.rmtree(root, ignore_errors=True)


def https_post(port: int, path: str, ca: Path, method: str = "POST", body: bytes = b"") -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        s.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/protobuf\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), rest


def test_control_and_runtime_apis_refused_through_proxy(deployment):
    port, ca = deployment["fleet_port"], deployment["pki"] / "ca.pem"
    for method, path in [
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/runtime/get-nodes"),
        ("GET", "/"),
        ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
        ("GET", "/v1/fleet/pull-messages"),
    ]:
        status, body = https_post(port, path, ca, method)
        assert status == 403, (method, path, status, body)
    # An unsigned Fleet call gets the SuperLink's own 401, from the proxy (which never forwards it).
    status, _ = https_post(port, "/v1/fleet/get-run", ca)
    assert status == 401
    # The SuperLink itself still serves the Control API: on the aggregator's internal address only.
    status, _ = https_post(deployment["link_port"], "/v1/control/list-runs", ca)
    assert status != 403


def test_unregistered_supernode_is_refused(deployment):
    procs = deployment["procs"]
    proc = procs.procs["intruder"]
    try:
        rc = proc.wait(180)  # a deadline, not a figure: its start alone can take a minute on a loaded host
    except subprocess.TimeoutExpired:
        pytest.fail("the unregistered SuperNode is still running after 180s:\n" + procs.log("intruder")[-2000:])
    log = procs.log("intruder")
    assert rc != 0
    assert "Failed to activate SuperNode" in log, log[-2000:]


def test_hospital_start_validates_before_starting(deployment, tmp_path):
    from fedprompt import cli as fp_cli

    ws, keys, pki = deployment["ws"], deployment["keys"], deployment["pki"]
    base = ["hospital", "start", "--superlink", "127.0.0.1:1", "--root-certificates", str(pki / "ca.pem"), "--check"]
    assert (
        fp_cli.main([*base, "--site", str(ws / "hospital-2" / "site.yaml"), "--key", str(keys / "hospital-2.key")]) == 0
    )
    # No ledger: exit 2 and the operator is told how to create it.
    site = yaml.safe_load((ws / "hospital-2" / "site.yaml").read_text())
    site["ledger"] = str(tmp_path / "missing" / "ledger.json")
    for key in ("train", "validation"):
        site[key] = str(ws / "hospital-2" / site[key])
    bad_site = tmp_path / "site.yaml"
    bad_site.write_text(yaml.safe_dump(site))
    r = cli(*base, "--site", str(bad_site), "--key", str(keys / "hospital-2.key"), env=deployment["env"])
    assert r.returncode == 2 and "fedprompt privacy init --site" in r.stderr, r.stderr
    # No label space pinned (a daemon that would refuse every message): exit 2, and how to pin it.
    site = yaml.safe_load((ws / "hospital-2" / "site.yaml").read_text())
    for key in ("train", "validation", "ledger"):
        site[key] = str(ws / "hospital-2" / site[key])
    del site["labels"]
    bad_site.write_text(yaml.safe_dump(site))
    r = cli(*base, "--site", str(bad_site), "--key", str(keys / "hospital-2.key"), env=deployment["env"])
    assert r.returncode == 2 and "labels: the label space is not pinned" in r.stderr, r.stderr
    assert "fedprompt hospital labels --site" in r.stderr, r.stderr
    # A key that is not an OpenSSH EC private key (here: the public key): exit 2.
    r = cli(
        *base,
        "--site",
        str(ws / "hospital-2" / "site.yaml"),
        "--key",
        str(keys / "hospital-2.pub"),
        env=deployment["env"],
    )
    assert r.returncode == 2 and "hospital-2.pub" in r.stderr, r.stderr


def test_two_round_run_completes(deployment):
    procs, out = deployment["procs"], deployment["out"]
    run = procs.procs["run"]
    try:
        rc = run.wait(RUN_TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        pytest.fail("`fedprompt aggregator run` did not return:\n" + procs.log("run")[-3000:])
    assert rc == 0, procs.log("run")[-4000:] + "\n--- hospital-1\n" + procs.log("hospital-1")[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]  # round 0: the zero-shot start, evaluated only
    # each hospital validates locally (its log): nothing of it reaches metrics.json by default
    assert metrics["rounds"][0]["hospitals"] == {} and all(r["evaluate"] is None for r in metrics["rounds"])
    hospitals = ["hospital-1", "hospital-2", "hospital-3"]
    ok_rounds = dict.fromkeys(hospitals, 0)
    lapses = []
    for rec in metrics["rounds"][1:]:
        seen = json.dumps(rec["hospitals"], indent=1)  # whole, with each failure's reason
        assert len(rec["hospitals"]) == 3, seen
        for name, h in rec["hospitals"].items():
            if h["status"] == "ok":
                assert name in ok_rounds, seen
                ok_rounds[name] += 1
            else:
                # Only Flower declaring a daemon gone is tolerated: on a loaded shared host its
                # 2 x 30 s heartbeat windows can lapse, and the round must go on without it.
                assert h["status"] == "failed" and any(s in h["reason"] for s in FLOWER_LIVENESS), seen
                lapses.append((rec["round"], name, h["reason"]))
    assert len(lapses) <= 1, lapses
    if lapses:
        warnings.warn(f"a hospital missed one round on Flower's liveness check: {lapses}", stacklevel=1)
    assert min(ok_rounds.values()) >= 1, (ok_rounds, lapses)
    assert metrics["outcome"] == "trained" and metrics["outcome_reason"] is None
    export = Path(metrics["export"])
    assert export.is_dir() and any(export.iterdir())
    # Each hospital's ledger recorded its DP-SGD steps on its own disk (before training: a daemon
    # declared gone after recording has spent that round's budget without contributing).
    for name in hospitals:
        ledger = json.loads(next((deployment["ws"] / name / "ledger").glob("*.json")).read_text())
        assert ok_rounds[name] <= len(ledger["history"]) <= 2, (name, ledger["history"], lapses)
    # The hospitals reached only the proxy: the SuperLink saw them via the Fleet proxy's port.
    for i in range(1, 4):
        assert f"127.0.0.1:{deployment['fleet_port']}" in procs.log(f"hospital-{i}")
    print(f"\n[deployment] run finished {time.monotonic() - deployment['t0']:.1f}s after setup began")


def test_a_bundle_with_code_is_refused_at_every_hospital(deployment):
    """Only installed code runs at a hospital: a run whose bundle brings its own ClientApp (one
    that would copy the records) is refused by every site as "untrusted app", nothing of it runs,
    and `aggregator run` exits 5 without an export."""
    procs, root, env = deployment["procs"], deployment["root"], deployment["env"]
    run = procs.procs["run"]
    run.wait(RUN_TIMEOUT + 30)  # after the two-round run (its hospitals, its ledgers)
    evil = root / "evil-app"
    (evil / "evil").mkdir(parents=True)
    marker = root / "evil-ran"
    train = deployment["ws"] / "hospital-1" / "train.csv"
    (evil / "evil" / "__init__.py").write_text("")
    (evil / "evil" / "client_app.py").write_text(  # flwr checks statically (AST) that `app` is assigned
        f"open({str(marker)!r}, 'w').write(open({str(train)!r}).read())\nfrom flwr.clientapp import ClientApp\n\napp "
        "= ClientApp()\n"
    )
    (evil / "pyproject.toml").write_text(
        (APP / "pyproject.toml").read_text().replace("fedprompt.client.client_app:app", "evil.client_app:app")
    )
    out = root / "evil-out"
    r = cli(
        "aggregator",
        "run",
        "--state",
        str(deployment["state"]),
        "--workspace",
        str(deployment["ws"]),
        "--out",
        str(out),
        "--app",
        str(evil),
        "--rounds",
        "1",
        "--timeout",
        str(RUN_TIMEOUT),
        "--run-config",
        f'backbone="{root / "tinybert"}"',
        env=env,
        timeout=RUN_TIMEOUT + 60,
    )
    assert r.returncode == 5, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    outcomes = metrics["preflight"]["hospitals"]  # every site refuses the run's pre-flight: it never starts
    assert metrics["outcome"] == "no hospital trained" and metrics["export"] is None and not metrics["rounds"], metrics
    assert len(outcomes) == 3 and all(
        h["status"] == "refused" and h["reason"] == "untrusted app" for h in outcomes.values()
    ), outcomes
    assert not marker.exists()
    for i in range(1, 4):
        assert "untrusted app" in procs.log(f"hospital-{i}") and "evil/client_app.py" in procs.log(f"hospital-{i}")


def test_proxy_checks_every_request_on_a_kept_alive_connection(deployment):
    """A Control request pipelined behind an allowed (signed) Fleet request is refused too; framing tricks get 400."""
    ctx = ssl.create_default_context(cafile=str(deployment["pki"] / "ca.pem"))
    key = serialization.load_ssh_private_key((deployment["keys"] / "hospital-1.key").read_bytes(), None)
    auth = b"".join(name + b": " + value + b"\r\n" for name, value in signed_headers(key))

    def exchange(payload: bytes) -> bytes:
        with (
            socket.create_connection(("127.0.0.1", deployment["fleet_port"]), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            s.sendall(payload)
            data = b""
            try:
                while chunk := s.recv(65536):
                    data += chunk
            except TimeoutError:
                pass
        return data

    fleet = (
        b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Type: application/protobuf\r\n"
        + auth
        + b"Content-Length: 0\r\n\r\n"
    )
    control = (
        b"POST /v1/control/list-runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/protobuf\r\nContent-Length: "
        b"0\r\n\r\n"
    )
    data = exchange(fleet + control)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3})", data)
    assert len(statuses) == 2 and statuses[0] != b"403" and statuses[1] == b"403", data[:600]
    smuggle = (
        b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n" + control
    )
    assert exchange(smuggle).startswith(b"HTTP/1.1 400"), "CL+TE must be refused"


def test_run_id_and_status_are_read_from_flwr_json_output():
    """`aggregator run` follows a run by id and decides its end by the SuperLink's status, so
    the JSON flwr prints (pretty, possibly after log lines) must be read exactly."""
    from fedprompt.server.deploy import _json_reply, submitted_run_id

    accepted = (
        'INFO : Starting\n{\n  "success": true,\n  "run-id": "4777088481461087582",\n  "fab-hash": "a8a08a5a"\n}\n'
    )
    assert submitted_run_id(accepted) == 4777088481461087582
    assert submitted_run_id('{\n  "success": false,\n  "error-message": "Run was not created"\n}') is None
    assert submitted_run_id("Traceback (most recent call last): {oops\n") is None
    listed = '{"success": true, "runs": [{"run-id": "1", "status": "finished:failed", "status-details": "x"}]}'
    assert _json_reply(listed)["runs"][0]["status"] == "finished:failed"


def test_proxy_stops_cleanly_with_connections_open(tmp_path):
    """SIGTERM with hospitals' connections still open: exit 0, no traceback in the aggregator's log."""
    env, port = deploy_env(tmp_path), free_port()
    proc = subprocess.Popen(
        [
            *FEDPROMPT,
            "aggregator",
            "proxy",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            "127.0.0.1:1",
            "--insecure",
            "--upstream-insecure",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: can_connect(port), 180, "the proxy's port")
        conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        time.sleep(0.5)  # let the proxy accept them
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    for c in conns:
        c.close()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "fleet proxy stopped" in out, out


@pytest.mark.parametrize("proxy", [False, True], ids=["no-fleet-proxy", "with-proxy"])
def test_aggregator_stops_on_sigterm_within_seconds(tmp_path, proxy):
    """`aggregator start` passes SIGTERM to its SuperLink and exits 0 once it ended: with
    --no-fleet-proxy it used to stop the SuperLink from inside the signal handler, blocked on the wait
    lock its own main thread held, and killed it 15 s later (exit 247)."""
    env = deploy_env(tmp_path)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    pki, _ = init_pki(tmp_path, env, keys=1)
    port = free_port()
    argv = [*FEDPROMPT, "aggregator", "start", "--pki", str(pki), "--state", str(tmp_path / "state")]
    argv += ["--port", str(port), "--fleet-port", str(free_port())] + ([] if proxy else ["--no-fleet-proxy"])
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: can_connect(port), 180, "the SuperLink")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # the aggregator only, not its process group
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 0 and took < 10, (proc.returncode, took, out[-3000:])
    assert "Traceback" not in out, out[-3000:]
