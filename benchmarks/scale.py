"""How a simulated federation grows with the number of hospitals: wall time and aggregation time
per round, peak memory, at N = 10, 50, 100 hospitals on a tiny random BERT.

Each N runs the product's real simulation path (fedprompt/simulation.py `simulate`: Flower's
`run_simulation` with the project's ServerApp and ClientApp, DP on) in a fresh process, so that
every figure is per-N. Flower's Ray backend runs the virtual hospitals in actor processes below
that process (one actor per core, plus Ray's own daemons), so memory is sampled over the whole
process tree: the sum of PSS (shared pages split between the processes mapping them, so the sum
counts them once) and, for reference, the sum of RSS (counts shared libraries in every process).
Aggregation time is what the run records per round: seconds inside `ValidatedStrategy.aggregate_train`
(validating every reply + the inner FedAvg), wall clock and the aggregating thread's CPU time. The
growth target is judged on CPU time: on a shared 2-core host the wall clock of a few milliseconds
of work mostly measures waiting for a core (and for the GIL, held by the engine's threads).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

from .common import PROJECT_ROOT, Context, md_table
from .tiny_backbone import make_tiny_backbone

SIZES, SIZES_QUICK = (10, 50, 100), (5, 10)
ROUNDS, ROUNDS_QUICK = 3, 2
PER_HOSPITAL = 20  # demo notes per hospital: 16 train, 4 validation
TEST_SIZE = 50  # the aggregator's held-out set, evaluated after every round
FEDERATION = {
    "model": {"n_virtual_tokens": 4, "max_length": 32},
    "training": {"local_epochs": 1, "batch_size": 8},
}
TARGET_N, TARGET_ROUNDS = 100, 3
EXPONENT_MAX = 1.0  # "linear or better"
EXPONENT_NOISE = 0.1  # allowance for timing noise on a shared machine: met while exponent <= 1.1
SAMPLE_S = 0.5
PNG = "scale.png"


# --- the process tree's memory, read from /proc ---------------------------------------------------
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and ')'
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def process_tree(root: int) -> list[int]:
    kids, tree, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += kids.get(pid, [])
    return tree


def _kib(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_memory(pids: list[int]) -> tuple[float, float]:
    """(sum of RSS MB, sum of PSS MB) over `pids`."""
    rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
    pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
    return rss / 1024, pss / 1024


def _watch(proc: subprocess.Popen, timeout: float) -> dict:
    """Sample the tree until `proc` exits; past `timeout`, end the tree this run started."""
    t0, samples, seen, timed_out = time.perf_counter(), [], set(), False
    while proc.poll() is None:
        elapsed = time.perf_counter() - t0
        if elapsed > timeout:
            timed_out = True
            for pid in reversed(process_tree(proc.pid)):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            proc.wait()
            break
        pids = process_tree(proc.pid)
        seen.update(pids)
        rss, pss = tree_memory(pids)
        samples.append([round(elapsed, 1), round(rss, 1), round(pss, 1), len(pids)])
        time.sleep(SAMPLE_S)
    return {
        "peak_tree_pss_mb": max((s[2] for s in samples), default=float("nan")),
        "peak_tree_rss_mb": max((s[1] for s in samples), default=float("nan")),
        "max_processes": max((s[3] for s in samples), default=0),
        "processes_seen": len(seen),
        "samples": samples,  # [seconds, tree RSS MB, tree PSS MB, processes]
        "timed_out": timed_out,
    }


# --- one N, in its own process ----------------------------------------------------------------
def one_size(spec: dict) -> dict:
    """Build an N-hospital demo workspace on the given backbone and simulate it; runs in the child."""
    import yaml

    from fedprompt.client.demo_data import generate_demo
    from fedprompt.client.workspace import list_hospitals, write_workspace
    from fedprompt.simulation import simulate

    n, work = spec["n"], Path(spec["work"])
    t0 = time.perf_counter()
    demo = generate_demo(hospitals=n, per_hospital=PER_HOSPITAL, test_size=TEST_SIZE, seed=spec["seed"])
    ws = write_workspace(
        work / "ws",
        name=f"scale-{n}",
        labels=demo.labels,
        hospitals=demo.hospitals,
        test_rows=demo.test,
        federation_overrides={**FEDERATION, "rounds": spec["rounds"]},
        allow_non_private=True,
    )
    for site in list_hospitals(ws):  # every simulated hospital uses the tiny backbone
        data = yaml.safe_load(site.read_text())
        data["backbone"] = spec["backbone"]
        site.write_text(yaml.safe_dump(data, sort_keys=False))
    setup = time.perf_counter() - t0
    error = None
    try:
        # the workspace was written just above: its ledgers are new (simulate never creates them itself)
        simulate(ws, work / "run", backbone=Path(spec["backbone"]), create_ledgers=True)
    except Exception as exc:  # the parent reports it; the rounds that did finish are still read below
        error = f"{type(exc).__name__}: {exc}"
    metrics_path = work / "run" / "metrics.json"
    # round 0 (the zero-shot start) trains nothing: only training rounds are timed
    rounds = (
        [r for r in json.loads(metrics_path.read_text())["rounds"] if r["round"] > 0] if metrics_path.exists() else []
    )
    return {
        "setup_seconds": setup,
        "simulate_seconds": time.perf_counter() - t0 - setup,
        "round_seconds": [r["seconds"] for r in rounds],
        "aggregate_seconds": [r.get("aggregate_seconds") for r in rounds],
        "aggregate_cpu_seconds": [r.get("aggregate_cpu_seconds") for r in rounds],
        "status_per_round": [_count(o["status"] for o in r["hospitals"].values()) for r in rounds],
        "aggregator_vmhwm_mb": _kib("/proc/self/status", "VmHWM:") / 1024,  # this process: ServerApp + engine
        "error": error,
    }


def _count(xs) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def _run_size(ctx: Context, n: int, rounds: int, backbone: str, root: Path) -> dict:
    work = root / f"n{n}"
    work.mkdir()
    result_path = work / "result.json"
    spec = {
        "n": n,
        "rounds": rounds,
        "backbone": backbone,
        "work": str(work),
        "seed": ctx.seed,
        "result": str(result_path),
    }
    log_path = ctx.out / f"scale_n{n}.log"
    timeout = 300 + 10 * n * rounds
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.scale", json.dumps(spec)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(PROJECT_ROOT),
        )
        memory = _watch(proc, timeout)
    child = json.loads(result_path.read_text()) if result_path.exists() else {}
    error = child.get("error")
    if proc.returncode != 0 or not child:
        cause = f"timed out after {timeout} s" if memory["timed_out"] else f"exit status {proc.returncode}"
        tail = " | ".join(log_path.read_text(errors="replace").splitlines()[-15:])
        error = f"{error or cause}; log tail: {tail}"
    # Rounds 2+ where there are any: round 1 also waits for Ray and the actors to start, and pays
    # first-use costs in the fresh process.
    rs = child.get("round_seconds", [])
    steady = rs[1:] or rs
    agg_s, cpu_s = (
        _median(child.get(k, [])[1:] or child.get(k, [])) for k in ("aggregate_seconds", "aggregate_cpu_seconds")
    )
    statuses = child.get("status_per_round", [])
    return {
        "n": n,
        "rounds_requested": rounds,
        "rounds_completed": len(rs),
        "hospitals_ok_min": min((s.get("ok", 0) for s in statuses), default=0),
        "status_per_round": statuses,
        "round_seconds": rs,
        "aggregate_seconds_per_round": child.get("aggregate_seconds", []),
        "aggregate_cpu_seconds_per_round": child.get("aggregate_cpu_seconds", []),
        "first_round_seconds": rs[0] if rs else float("nan"),
        "wall_s_per_round": statistics.median(steady) if steady else float("nan"),
        "aggregate_s_per_round": agg_s,
        "aggregate_ms_per_hospital": 1000 * agg_s / n,
        "aggregate_cpu_s_per_round": cpu_s,
        "aggregate_cpu_ms_per_hospital": 1000 * cpu_s / n,
        "setup_seconds": child.get("setup_seconds"),
        "simulate_seconds": child.get("simulate_seconds"),
        "process_seconds": time.perf_counter() - t0,
        "timeout_seconds": timeout,
        "returncode": proc.returncode,
        "error": error,
        "memory": {**memory, "aggregator_vmhwm_mb": child.get("aggregator_vmhwm_mb", float("nan"))},
        "log": log_path.name,
    }


def _median(xs: list) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


# --- growth ------------------------------------------------------------------------------------
def growth(ns: list[int], ys: list[float]) -> dict:
    """Log-log slopes: between neighbouring N, and the least-squares fit over all N (y ~ N^k)."""
    ok = [(n, y) for n, y in zip(ns, ys, strict=True) if y is not None and math.isfinite(y) and y > 0]
    pairs = [{"from": a, "to": b, "exponent": math.log(yb / ya) / math.log(b / a)} for (a, ya), (b, yb) in pairwise(ok)]
    pts = [(math.log(n), math.log(y)) for n, y in ok]
    if len(pts) < 2:
        return {"pairwise": pairs, "exponent": float("nan")}
    mx, my = statistics.fmean(x for x, _ in pts), statistics.fmean(y for _, y in pts)
    k = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return {"pairwise": pairs, "exponent": k}


def run(ctx: Context) -> dict:
    sizes = list(ctx.knob("scale_sizes", SIZES, SIZES_QUICK))
    rounds = int(ctx.knob("scale_rounds", ROUNDS, ROUNDS_QUICK))
    with tempfile.TemporaryDirectory(prefix="fedprompt-scale-") as tmp:
        root = Path(tmp)
        backbone = ctx.backbone or str(make_tiny_backbone(root / "tinybert"))
        per_n = []
        for n in sizes:
            ctx.log(f"scale: {n} hospitals, {rounds} round(s)")
            per_n.append(_run_size(ctx, n, rounds, backbone, root))
            r = per_n[-1]
            ctx.log(
                f"scale: {n} hospitals: {r['rounds_completed']}/{rounds} rounds, {r['wall_s_per_round']:.1f} s/round, "
                f"aggregate {1000 * r['aggregate_s_per_round']:.1f} ms ({1000 * r['aggregate_cpu_s_per_round']:.1f} "
                f"ms CPU), peak tree PSS {r['memory']['peak_tree_pss_mb']:.0f} MB"
                + (f", error: {r['error'][:200]}" if r["error"] else "")
            )
    done = [r for r in per_n if r["rounds_completed"] > 0]
    ns = [r["n"] for r in done]
    agg = growth(ns, [r["aggregate_cpu_s_per_round"] for r in done])
    big = next((r for r in per_n if r["n"] == TARGET_N), None)
    return {
        "config": {
            "sizes": sizes,
            "rounds": rounds,
            "per_hospital_notes": PER_HOSPITAL,
            "test_notes": TEST_SIZE,
            "federation": FEDERATION,
            "backbone": ctx.backbone or "tests/tinybert.py: random BERT, hidden 32, 2 layers",
            "private": True,
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "sample_seconds": SAMPLE_S,
        },
        "sizes": per_n,
        "growth": {
            "aggregate_cpu": agg,
            "aggregate_wall": growth(ns, [r["aggregate_s_per_round"] for r in done]),
            "wall": growth(ns, [r["wall_s_per_round"] for r in done]),
            "peak_tree_pss": growth(ns, [r["memory"]["peak_tree_pss_mb"] for r in done]),
        },
        "targets": {
            "n": TARGET_N,
            "rounds": TARGET_ROUNDS,
            # None: not measured (no run with TARGET_N hospitals and TARGET_ROUNDS rounds, e.g. --quick)
            "complete_met": None if big is None or rounds < TARGET_ROUNDS else big["rounds_completed"] >= TARGET_ROUNDS,
            "exponent_max": EXPONENT_MAX,
            "exponent_noise": EXPONENT_NOISE,
            "aggregate_linear_met": None
            if math.isnan(agg["exponent"])
            else agg["exponent"] <= EXPONENT_MAX + EXPONENT_NOISE,
        },
    }


# --- report ------------------------------------------------------------------------------------
def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("**met**" if met else "**MISSED**")


def _why_not_complete(r: dict) -> str:
    """Why the TARGET_N run did not finish its rounds, and what would close it, from what it recorded."""
    failed = sum(s.get("failed", 0) for s in r["status_per_round"])
    if r["memory"]["timed_out"]:
        return (
            f"the run was stopped after {r['timeout_seconds']} s with {r['rounds_completed']} round(s) done; the "
            "hospitals' local work is serial per core, so the round time is about N x (train + evaluate) / cores: "
            "more cores (actors) or a longer limit closes it."
        )
    if r["returncode"] in (-9, 137):
        return (
            "the process tree was killed (SIGKILL, likely the kernel's OOM killer): fewer simultaneous actors "
            "(client_resources num_cpus) or more memory closes it."
        )
    if failed:
        return (
            f"{failed} hospital replies failed (e.g. no reply within round_timeout); raise "
            "`round_timeout` in federation.yaml or give the simulation more cores. Log: `" + r["log"] + "`."
        )
    return f"the run failed: {r['error'] or 'unknown'} (log `{r['log']}`); fix that error and re-run."


def markdown(r: dict) -> str:
    c, t, g = r["config"], r["targets"], r["growth"]
    rows = [
        [
            s["n"],
            f"{s['rounds_completed']}/{s['rounds_requested']}",
            f"{s['hospitals_ok_min']}/{s['n']}",
            s["first_round_seconds"],
            s["wall_s_per_round"],
            s["aggregate_s_per_round"],
            s["aggregate_cpu_s_per_round"],
            s["aggregate_ms_per_hospital"],
            s["aggregate_cpu_ms_per_hospital"],
            s["memory"]["peak_tree_pss_mb"],
            s["memory"]["peak_tree_rss_mb"],
            s["memory"]["aggregator_vmhwm_mb"],
            s["memory"]["max_processes"],
        ]
        for s in r["sizes"]
    ]
    table = md_table(
        [
            "hospitals N",
            "rounds done",
            "updates ok (min/round)",
            "round 1 s (incl. engine start)",
            "wall s/round",
            "aggregation s/round (wall)",
            "aggregation s/round (CPU)",
            "aggregation ms/hospital (wall)",
            "aggregation ms/hospital (CPU)",
            "peak tree PSS MB",
            "peak tree RSS MB",
            "aggregator VmHWM MB",
            "processes",
        ],
        rows,
    )

    def exponents(name: str, key: str) -> str:
        e = g[key]
        pairs = ", ".join(f"{p['from']}->{p['to']}: {p['exponent']:.2f}" for p in e["pairwise"])
        return (
            f"- {name}: fitted exponent **{e['exponent']:.2f}** (log-log least squares; between neighbours "
            f"{pairs or 'n/a'})"
        )

    setup = (
        f"{c['cpus']} CPUs; {c['backbone']}; {c['per_hospital_notes']} demo notes per hospital (80/20 "
        f"train/validation), {c['test_notes']} test notes at the aggregator; {c['rounds']} round(s); DP on; model "
        f"{c['federation']['model']}, training {c['federation']['training']}. One fresh process per N; memory sampled "
        f"every {c['sample_seconds']} s over that process and all its descendants (Ray daemons and actors). Per-round "
        "figures are medians over rounds 2+ (round 1 also starts Ray and the actors); all rounds are in results.json."
    )
    parts = [
        setup,
        table,
        "Growth with N (y ~ N^k; k = 1 is linear):",
        "\n".join(
            [
                exponents("aggregation time per round, CPU", "aggregate_cpu"),
                exponents("aggregation time per round, wall", "aggregate_wall"),
                exponents("wall time per round", "wall"),
                exponents("peak memory (tree PSS)", "peak_tree_pss"),
            ]
        ),
    ]
    big = next((s for s in r["sizes"] if s["n"] == t["n"]), None)
    line = (
        f"Target: {t['n']} simulated hospitals on {c['cpus']} cores complete {t['rounds']} rounds: "
        f"{_verdict(t['complete_met'])}"
    )
    if t["complete_met"] is False and big is not None:
        line += f" — {_why_not_complete(big)}"
    parts.append(line + ".")
    e = g["aggregate_cpu"]["exponent"]
    line = (
        f"Target: aggregation time grows linearly or better (CPU-time exponent <= {t['exponent_max']}, "
        f"+{t['exponent_noise']} allowed for timing noise): {_verdict(t['aggregate_linear_met'])}"
    )
    if t["aggregate_linear_met"] is False:
        line += (
            f" — exponent {e:.2f}: the time per hospital rises with N. aggregate_train validates each reply (shapes, "
            "finiteness, update norm against the global model) and FedAvg sums the arrays, both O(N); superlinear "
            "growth points at per-reply work that scans all replies, or at load on the machine when the absolute "
            "times are milliseconds: profile aggregate_train at the largest N and re-run on an idle machine"
        )
    parts.append(line + ".")
    errors = [f"- N={s['n']}: {s['error']}" for s in r["sizes"] if s["error"]]
    if errors:
        parts.append("Errors:\n" + "\n".join(errors))
    return "\n\n".join(parts)


def plot(r: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s for s in r["sizes"] if s["rounds_completed"] > 0]
    ns = [s["n"] for s in sizes]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = (
        ("wall_s_per_round", "round, wall", "#4c72b0"),
        ("aggregate_s_per_round", "aggregation, wall", "#c44e52"),
        ("aggregate_cpu_s_per_round", "aggregation, CPU", "#dd8452"),
    )
    for key, label, colour in series:
        ys = [s[key] for s in sizes]
        ax1.plot(ns, ys, "o-", color=colour, label=label)
        if ns:  # a slope-1 line through the first point: linear growth for comparison
            ax1.plot(
                ns,
                [ys[0] * n / ns[0] for n in ns],
                ":",
                color=colour,
                alpha=0.6,
                label=f"{label}: linear from N={ns[0]}",
            )
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("simulated hospitals N (log)")
    ax1.set_ylabel("seconds per round (log)")
    ax1.set_title("time per round vs N")
    ax1.legend(fontsize=8)
    for key, label in (
        ("peak_tree_pss_mb", "process tree, sum of PSS"),
        ("peak_tree_rss_mb", "process tree, sum of RSS"),
        ("aggregator_vmhwm_mb", "aggregator process (VmHWM)"),
    ):
        ax2.plot(ns, [s["memory"][key] for s in sizes], "o-", label=label)
    ax2.set_xscale("log")
    ax2.set_xlabel("simulated hospitals N (log)")
    ax2.set_ylabel("peak MB")
    ax2.set_ylim(bottom=0)
    ax2.set_title("peak memory vs N")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.minorticks_off()
        ax.set_xticks(ns, [str(n) for n in ns])
    fig.tight_layout()
    path = out / PNG
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


if __name__ == "__main__":  # the child: one N (see _run_size)
    _spec = json.loads(sys.argv[1])
    Path(_spec["result"]).write_text(json.dumps(one_size(_spec)))
