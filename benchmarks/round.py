"""Round overhead of the real deployment: round wall time minus the slowest hospital's training.

The topology is benchmarks/deploy_topology.py's, on 127.0.0.1 only: PKI, `fedprompt aggregator start`
(SuperLink with TLS + node auth + Fleet-only proxy), 3 registered hospital keys, 3 `fedprompt
hospital start` daemons (SuperNode + executor + warm worker, client/daemon.py), then `fedprompt
aggregator run` of the packaged code-free app. Hospitals use the default backbone unless
`--backbone DIR` is given, and demo records (40 per hospital).

Where the time goes comes from two clocks on the same host: the ServerApp's phase boundaries
(metrics.json `timing`: instructions sent, replies in) and each hospital executor's
`fedprompt-timing` line in its log (task acquired, inputs pulled, worker handler phases, reply
pushed). Each phase is split along its critical hospital, the one whose reply came last. With
the default `evaluation: in_train` a round is one message per hospital (no evaluate phase).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from . import deploy_topology as topo
from .common import Context, describe, md_table, tree_rss_mb

HOSPITALS = 3
PER_HOSPITAL = 40
TARGET_OVERHEAD_S = 5.0
RUN_TIMEOUT_S = 1500.0
TAG = "fedprompt-timing "
PHASES = ("train", "evaluate")
# Segments of one phase along its critical hospital, in time order.
SEGMENTS = (
    (
        "delivery",
        "sent -> the hospital's executor holds the task (SuperNode pull every 1 s when idle, Flower's: 3 s; executor "
        "poll 0.05 s)",
    ),
    ("pull", "task inputs pulled from the SuperNode (it fetches the message's objects from the aggregator)"),
    ("dispatch", "handed to the warm worker"),
    ("records", "records file hashed (tokenised once per content)"),
    ("privacy", "noise calibration (first round of a run) + ledger entry"),
    ("build", "model built from the global tensors"),
    ("evaluate", "local validation of the model received"),
    ("train", "local DP-SGD training"),
    ("reply", "reply tensors packed"),
    ("handler_other", "rest of the handler"),
    ("push", "reply pushed to the SuperNode"),
    (
        "return",
        "-> ServerApp has every reply (SuperNode reply check 0.1 s + push; ServerApp pull every 0.5 s, server/grid.py)",
    ),
)


def _workspace(root: Path, backbone: str | None, rounds: int) -> Path:
    from fedprompt.client.demo_data import generate_demo, write_demo_workspace
    from fedprompt.simulation import ensure_ledgers

    ws = write_demo_workspace(
        root / "workspace", generate_demo(hospitals=HOSPITALS, per_hospital=PER_HOSPITAL, test_size=30)
    )
    if backbone is not None:
        for site in sorted(ws.glob("hospital-*/site.yaml")):
            doc = yaml.safe_load(site.read_text())
            doc["backbone"] = str(Path(backbone).resolve())
            site.write_text(yaml.safe_dump(doc, sort_keys=False))
    fed_path = ws / "federation.yaml"
    fed = yaml.safe_load(fed_path.read_text())
    fed.update(rounds=rounds, round_timeout=600.0)  # evaluation: in_train (the default): one message per round
    fed_path.write_text(yaml.safe_dump(fed, sort_keys=False))
    ensure_ledgers(ws)
    return ws


def _deploy(ctx: Context, root: Path, rounds: int) -> tuple[dict, list[dict], dict]:
    """Runs the topology; returns (metrics.json, executor timing lines, facts about the run)."""
    logs = root / "logs"
    logs.mkdir()
    procs = topo.Processes(logs)
    env = topo.deploy_env(root)
    # Flower spawns `flower-superexec` / `flwr-clientapp` by name: this interpreter's bin first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    try:
        state = root / "aggregator-state"
        pki, keys = topo.init_pki(root, env, keys=HOSPITALS)
        ws = _workspace(root, ctx.backbone, rounds)
        app = topo.copy_app(root)
        _, fleet_port = topo.start_aggregator(procs, pki, state, env)
        for i in range(1, HOSPITALS + 1):
            topo.register_hospital(state, keys / f"hospital-{i}.pub", env)
        for i in range(1, HOSPITALS + 1):
            topo.start_hospital(
                procs,
                f"hospital-{i}",
                ws / f"hospital-{i}" / "site.yaml",
                keys / f"hospital-{i}.key",
                pki,
                fleet_port,
                root / f"node-{i}",
                env,
            )
        out = root / "run-out"
        extra = ["--run-config", f'backbone="{Path(ctx.backbone).resolve()}"'] if ctx.backbone else []
        t0 = time.monotonic()
        run = procs.start(
            "run",
            [
                *topo.FEDPROMPT,
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
                str(RUN_TIMEOUT_S),
                *extra,
            ],
            env,
        )
        try:
            rc = run.wait(RUN_TIMEOUT_S + 30)
        except subprocess.TimeoutExpired:
            rc = None
        wall = time.monotonic() - t0
        if rc != 0 or not (out / "metrics.json").is_file():
            raise RuntimeError(f"deployment run failed (rc {rc}); logs in {logs}:\n" + procs.log("run")[-3000:])
        time.sleep(5)  # the daemons idle again
        idle_mb = [tree_rss_mb(procs.procs[f"hospital-{i}"].pid) for i in range(1, HOSPITALS + 1)]
        lines = [
            json.loads(line.split(TAG, 1)[1])
            for i in range(1, HOSPITALS + 1)
            for line in procs.log(f"hospital-{i}").splitlines()
            if TAG in line
        ]
        return (
            json.loads((out / "metrics.json").read_text()),
            lines,
            {"run_wall_s": wall, "idle_daemon_rss_mb": describe(idle_mb)},
        )
    finally:
        procs.stop_all()


def _segments(t: dict) -> dict[str, float]:
    """One message's timeline at its hospital cut into SEGMENTS (without `delivery` and `return`)."""
    ph = dict(t["phases"])
    seg = {"pull": t["pulled"] - t["acquired"], "dispatch": t["handler_start"] - t["pulled"]}
    seg.update(ph)
    seg["handler_other"] = (t["handler_end"] - t["handler_start"]) - sum(ph.values())
    seg["push"] = t["pushed"] - t["handler_end"]
    return seg


def _phase(sent: float, received: float, msgs: list[dict]) -> dict:
    """A phase (train or evaluate) of one round along its critical hospital; zero if no message was sent."""
    if not msgs:
        return {"seconds": received - sent, "critical": None, "segments": {}, "per_hospital": {}}
    last = max(msgs, key=lambda m: m["pushed"])
    seg = {"delivery": last["acquired"] - sent, **_segments(last)}  # from the ServerApp's own clock
    seg["return"] = received - last["pushed"]
    return {
        "seconds": received - sent,
        "critical": last["site"],
        "segments": seg,
        "per_hospital": {m["site"]: _segments(m) for m in msgs},
    }


def _rounds(metrics: dict, lines: list[dict]) -> list[dict]:
    rows = []
    for rec in metrics["rounds"]:
        tm, r = rec["timing"], rec["round"]
        if r == 0:  # the zero-shot start: no training to compare against
            continue
        msgs = {p: [m for m in lines if m["type"] == p and m["round"] == r] for p in PHASES}
        slowest = max(m["phases"].get("train", 0.0) for m in msgs["train"])
        wall = tm["end"] - tm["start"]
        rows.append(
            {
                "round": r,
                "wall": wall,
                "seconds_recorded": rec["seconds"],
                "slowest_training": slowest,
                "overhead": wall - slowest,
                "train": _phase(tm["train_sent"], tm["train_received"], msgs["train"]),
                "evaluate": _phase(tm["evaluate_sent"], tm["evaluate_received"], msgs["evaluate"]),
                "server": {
                    "before_train": tm["train_sent"] - tm["start"],  # previous checkpoint write, plan
                    "aggregate": tm["evaluate_sent"] - tm["train_received"],  # validation + FedAvg
                    "after_evaluate": tm["end"] - tm["evaluate_received"],  # aggregator's test-set evaluation
                },
                "messages": len(msgs["train"]) + len(msgs["evaluate"]),
                "processes": len({m["pid"] for m in msgs["train"] + msgs["evaluate"]}),
            }
        )
    return rows


def _cold_import(repeats: int) -> dict:
    """A fresh interpreter importing the ClientApp module (what every message pays)."""
    code = "import time; t = time.perf_counter(); import fedprompt.client.client_app; print(time.perf_counter() - t)"
    xs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
        xs.append((float(r.stdout.strip()), time.perf_counter() - t0))
    return {"import": describe([a for a, _ in xs]), "interpreter_total": describe([b for _, b in xs])}


def summarize(rows: list[dict]) -> dict:
    """The suite's figures from the per-round rows (`_rounds`)."""
    overheads = [r["overhead"] for r in rows]
    return {
        "rounds": rows,
        "overhead": describe(overheads),
        "mean_segments": {
            p: {name: sum(r[p]["segments"].get(name, 0.0) for r in rows) / len(rows) for name, _ in SEGMENTS}
            for p in PHASES
        },
        "mean_server": {k: sum(r["server"][k] for r in rows) / len(rows) for k in rows[0]["server"]},
        "messages_per_round": max(r["messages"] for r in rows),
        "warm_processes": max(r["processes"] for r in rows),  # executor pids: one per hospital, whatever the rounds
        "target_met": describe(overheads)["median"] <= TARGET_OVERHEAD_S,
    }


def run(ctx: Context) -> dict:
    rounds = 2 if ctx.quick else 5
    root = Path(tempfile.mkdtemp(prefix="fedprompt-bench-round-"))
    load_start = os.getloadavg()
    metrics, lines, facts = _deploy(ctx, root, rounds)  # on failure the folder (logs) stays for a look
    shutil.rmtree(root, ignore_errors=True)
    load_end = os.getloadavg()
    ctx.log("round: measuring a cold ClientApp import (what the warm worker saves per message)")
    return {
        "config": {
            "hospitals": HOSPITALS,
            "records_per_hospital": PER_HOSPITAL,
            "rounds": rounds,
            "backbone": ctx.backbone or "default (all-MiniLM-L6-v2)",
            "target_overhead_s": TARGET_OVERHEAD_S,
        },
        **summarize(_rounds(metrics, lines)),
        "cold_import": _cold_import(1 if ctx.quick else 3),
        "loadavg": {"start": list(load_start), "end": list(load_end)},
        **facts,
    }


HANDLER_SEGMENTS = ("dispatch", "records", "privacy", "build", "evaluate", "reply", "handler_other")


def _where(r: dict) -> list[str]:
    """Where the remaining seconds go, from the measured segments (Flower's polling floor named)."""
    seg, srv = r["mean_segments"]["train"], r["mean_server"]

    def handler(segments: dict) -> float:
        return sum(segments.get(k, 0.0) for k in HANDLER_SEGMENTS)

    later = describe([handler(x["train"]["segments"]) for x in r["rounds"][1:]] or [float("nan")])["median"]
    return [
        f"**Delivery {seg['delivery']:.1f} s**: the SuperNode sleeps between pulls that find no message: 3 s in "
        "Flower 1.42 (a literal in `start_client_internal.py`), 1 s as fedprompt runs it (client/supernode_main.py), "
        "so an instruction waits 0.5 s on average for the pull, plus the pull itself through the proxy. The floor of "
        "this design: only Flower long-polling would remove it.",
        f"**Inputs {seg['pull']:.1f} s**: the SuperNode fetches the message's objects from the aggregator after "
        "creating the task; the executor retries every 0.05-0.25 s (Flower: 1 s, then 2 s, ...).",
        f"**Handler {handler(seg):.1f} s besides training** in the warm worker, a mean that holds round 1: the worker "
        "finishing its warm-up (imports, backbone) and the run's one noise calibration; from round 2 on "
        f"{later:.2f} s (median), the next round's epsilon having been projected while the worker was idle.",
        f"**Return {seg['return'] + seg['push']:.1f} s**: the SuperNode checks for the reply every 0.1 s (Flower: 0.5 "
        "s) and pushes it and its objects to the aggregator; the ServerApp pulls every 0.5 s (server/grid.py; "
        "Flower's Grid: 3 s) and fetches the reply's objects.",
        f"**Aggregator {sum(srv.values()):.1f} s**: validation + FedAvg, the checkpoint and its own test-set "
        "evaluation.",
    ]


def markdown(r: dict) -> str:
    c, o = r["config"], r["overhead"]
    rows = [
        [
            x["round"],
            x["wall"],
            x["slowest_training"],
            x["overhead"],
            x["train"]["seconds"],
            x["evaluate"]["seconds"],
            x["server"]["before_train"] + x["server"]["aggregate"] + x["server"]["after_evaluate"],
        ]
        for x in r["rounds"]
    ]
    t1 = md_table(
        ["round", "wall s", "slowest training s", "overhead s", "train phase s", "evaluate phase s", "aggregator s"],
        rows,
    )
    seg = r["mean_segments"]
    srows = [[name, seg["train"][name], seg["evaluate"][name], what] for name, what in SEGMENTS]
    srows += [
        [f"aggregator: {k.replace('_', ' ')}", v, float("nan"), "ServerApp work between phases"]
        for k, v in r["mean_server"].items()
    ]
    t2 = md_table(["segment (critical hospital)", "train s", "evaluate s", "what"], srows)
    ci, mem = r["cold_import"], r["idle_daemon_rss_mb"]
    verdict = "MET" if r["target_met"] else "MISSED"
    return "\n\n".join(
        [
            f"{c['hospitals']} hospitals on 127.0.0.1 (TLS, node auth, Fleet proxy), backbone {c['backbone']}, "
            f"{c['records_per_hospital']} demo records per hospital, {c['rounds']} rounds; whole run "
            f"{r['run_wall_s']:.0f} s wall, "
            f"load average {r['loadavg']['start'][0]:.1f} -> {r['loadavg']['end'][0]:.1f}.",
            t1,
            f"Overhead per round: median **{o['median']:.1f} s** (min {o['min']:.1f}, max {o['max']:.1f}). "
            f"Target: median <= {c['target_overhead_s']:g} s: **{verdict}**.",
            "Mean per round, along each phase's critical hospital (the last to reply); the rows add up to the phase:",
            t2,
            f"Messages per round: {r['messages_per_round']} (one per hospital); warm executor processes: "
            f"{r['warm_processes']} (one per hospital for the whole run, where Flower's own executor starts a fresh "
            f"interpreter per message: importing the ClientApp module alone takes {ci['import']['median']:.1f} s "
            "here). Memory of an idle hospital daemon (supervisor + SuperNode + warm worker with the backbone): "
            f"median {mem['median']:.0f} MB (min {mem['min']:.0f}, max {mem['max']:.0f}).",
            "Where the remaining seconds go:",
            "\n".join(f"- {x}" for x in _where(r)),
        ]
    )


def plot(r: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, _ in SEGMENTS]
    fig, ax = plt.subplots(figsize=(9, 4.6))
    cmap = plt.get_cmap("tab20")
    phases = [p for p in PHASES if any(x[p]["segments"] for x in r["rounds"])]
    labels = [f"r{x['round']} {p}" for x in r["rounds"] for p in phases]
    left = [0.0] * len(labels)
    for i, name in enumerate(names):
        widths = [max(0.0, x[p]["segments"].get(name, 0.0)) for x in r["rounds"] for p in phases]
        ax.barh(labels, widths, left=left, color=cmap(i % 20), label=name)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds (critical hospital of each phase)")
    ax.set_title(f"where a deployment round goes (target overhead <= {r['config']['target_overhead_s']:g} s per round)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    path = out / "round_phases.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]
