"""The simulation survives its engine (fedprompt/simulation.py).

Hospitals' Ray actor processes are killed for real (SIGKILL, as the kernel's OOM killer or Ray's
memory monitor would) from this test, between rounds: an actor killed once is restarted by Ray and
its hospitals' next round aggregates; actors killed whenever they come back leave a run whose most
rounds did not aggregate, which says so on the console, in metrics.json and in its exit status,
naming the hospitals. And a resumed run whose new rounds accepted nothing never exits 0.
Tiny BERT, 2 hospitals, 2-3 rounds.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FAST, edit_yaml, make_workspace

from fedprompt.cli import main
from fedprompt.client.ledger import PrivacyLedger
from fedprompt.client.workspace import list_hospitals, load_workspace
from fedprompt.common.config import SiteConfig
from fedprompt.common.exit_codes import ExitCode
from fedprompt.server import federation
from fedprompt.server.outcome import PARTLY_TRAINED, TRAINED
from fedprompt.simulation import ensure_ledgers, simulate

pytestmark = [
    pytest.mark.simulation,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the actor processes in /proc"),
]

HOSPITALS = {"hospital-1", "hospital-2"}


def _workspace(root: Path, tiny_dir: Path, rounds: int) -> Path:
    overrides = {**FAST, "rounds": rounds}
    # rdp: PRV costs seconds per epsilon on a loaded machine
    ws = make_workspace(
        root, tiny_dir, hospitals=2, per_hospital=30, test_size=20, overrides=overrides, accountant="rdp"
    )
    ensure_ledgers(ws)
    return ws


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        tree.setdefault(ppid, []).append(int(stat.parent.name))
    return tree


def actor_pids() -> set[int]:
    """This process' descendants that are Flower's Ray actors (`ray::ClientAppActor...`): only this
    test's simulation, never another one on the machine."""
    tree, pending, found = _children(), [os.getpid()], set()
    while pending:
        for child in tree.get(pending.pop(), []):
            pending.append(child)
            try:
                if (Path("/proc") / str(child) / "cmdline").read_bytes().startswith(b"ray::ClientAppActor"):
                    found.add(child)
            except OSError:
                pass
    return found


def kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def after_checkpoint(monkeypatch, act: Callable[[int], None]) -> None:
    """`act(round)` right after the aggregator checkpoints each round, before the next round's messages."""
    real = federation.save_checkpoint

    def save(directory, checkpoint):
        real(directory, checkpoint)
        act(checkpoint.round)

    monkeypatch.setattr(federation, "save_checkpoint", save)


def test_a_killed_hospital_is_restarted_and_its_next_round_aggregates(tmp_path, tiny_dir, monkeypatch):
    ws = _workspace(tmp_path, tiny_dir, rounds=2)
    killed: set[int] = set()
    serving: set[int] = set()

    def act(round_: int) -> None:
        if round_ == 1:
            killed.update(actor_pids())
            kill(killed)
        elif round_ == 2:
            serving.update(actor_pids())

    after_checkpoint(monkeypatch, act)
    metrics = simulate(ws, tmp_path / "out", backbone=tiny_dir, engine="ray", compare=False)
    assert killed and serving and not killed & serving  # round 2 was answered by restarted processes
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    for record in metrics["rounds"][1:]:
        assert record["aggregated"], record
        assert {h: o["status"] for h, o in record["hospitals"].items()} == dict.fromkeys(HOSPITALS, "ok"), record
    assert (metrics["outcome"], metrics["outcome_reason"]) == (TRAINED, None)
    # killed between rounds: nothing was running, so nothing was charged twice
    _, sites, _ = load_workspace(ws)
    assert {s.hospital_id: len(PrivacyLedger.open(s.ledger).history) for s in sites} == dict.fromkeys(HOSPITALS, 2)


def test_hospitals_that_keep_dying_end_a_partly_trained_run(tmp_path, tiny_dir, monkeypatch, capsys):
    ws, out = _workspace(tmp_path, tiny_dir, rounds=3), tmp_path / "out"
    stop = threading.Event()

    def killer() -> None:  # every incarnation of every actor, until Ray stops restarting them
        while not stop.wait(0.05):
            kill(actor_pids())

    thread = threading.Thread(target=killer, daemon=True)
    after_checkpoint(monkeypatch, lambda round_: thread.start() if round_ == 1 else None)
    try:
        rc = main(["simulate", "--workspace", str(ws), "--out", str(out), "--backbone", str(tiny_dir)])
    finally:
        stop.set()
    captured = capsys.readouterr()
    console = captured.out + captured.err
    assert rc == ExitCode.PARTLY_TRAINED == 6, console[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["aggregated"] for r in metrics["rounds"]] == [False, True, False, False]  # round 0: zero-shot
    for record in metrics["rounds"][2:]:
        assert set(record["hospitals"]) == HOSPITALS, record  # by name, never node-<id>
        for outcome in record["hospitals"].values():
            assert outcome["status"] == "failed" and outcome["reason"].startswith("error reply: <class 'ray."), outcome
            assert "\n" not in outcome["reason"]
    why = "only 1 of 3 training round(s) aggregated; rounds 2, 3 did not (failed 4); the model is that of round 1"
    assert (metrics["outcome"], metrics["outcome_reason"]) == (PARTLY_TRAINED, why)
    assert metrics["export"] and (out / "export").is_dir()  # round 1's model, the last that aggregated
    assert f"[fedprompt] run 't' PARTLY TRAINED: {why}" in captured.err
    assert "finished:" not in console and "node-" not in console
    assert "round 3/3" in console and "hospital-1 failed" in console and "hospital-2 failed" in console


def test_a_resumed_run_whose_new_round_trains_nothing_does_not_exit_0(tmp_path, tiny_dir, capsys):
    """Round 1, then (budgets spent meanwhile) a --resume whose pre-flight every site refuses: the
    run has round 1's model, but this invocation trained nothing."""
    ws, out = _workspace(tmp_path, tiny_dir, rounds=2), tmp_path / "out"
    argv = ["simulate", "--workspace", str(ws), "--out", str(out), "--backbone", str(tiny_dir), "--engine", "local"]
    assert main([*argv, "--stop-after", "1"]) == ExitCode.OK
    capsys.readouterr()
    for path in list_hospitals(ws):  # each site's cap: what it has spent
        cap = round(PrivacyLedger.open(SiteConfig.load(path).ledger).epsilon_spent() + 0.01, 3)
        edit_yaml(path, lambda d, cap=cap: d["privacy"].update(max_epsilon=cap))
    rc = main([*argv, "--resume"])
    captured = capsys.readouterr()
    assert rc == ExitCode.PARTLY_TRAINED, captured.out[-3000:] + captured.err[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    why = (
        "pre-flight: only 0 of min_hospitals 1 sites can train the run: hospital-1: budget, hospital-2: budget; "
        "no new round ran, the model is that of round 1"
    )
    assert (metrics["outcome"], metrics["outcome_reason"]) == (PARTLY_TRAINED, why)
    assert [r["round"] for r in metrics["rounds"]] == [0, 1] and metrics["export"]
    assert f"PARTLY TRAINED: {why}" in captured.err and "finished:" not in captured.out
