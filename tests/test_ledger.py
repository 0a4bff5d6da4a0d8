"""The privacy ledger: exact Opacus accounting, durable across crashes, never reset, never corrupted."""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedprompt.client import ledger as ledger_mod
from fedprompt.client.ledger import SCHEMA, PrivacyLedger
from fedprompt.common.config import SiteConfig
from fedprompt.common.errors import LedgerError, PrivacyBudgetExceeded

DELTA = 1e-5
# Distinct (sigma, q) per entry: the accountant keeps them as separate entries too.
HISTORY = [(1.0, 0.01, 200), (1.2, 0.02, 100), (0.9, 0.01, 50)]
ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant}


def opacus_epsilon(mechanism: str, history: list[tuple[float, float, int]]) -> float:
    accountant = ACCOUNTANTS[mechanism]()
    accountant.history = list(history)
    return float(accountant.get_epsilon(DELTA))


def new_ledger(tmp_path: Path, mechanism: str = "prv", cap: float = 8.0) -> PrivacyLedger:
    return PrivacyLedger.create(tmp_path / "ledger.json", hospital_id="h1", epsilon_cap=cap, delta=DELTA, mechanism=mechanism)


def record(ledger: PrivacyLedger, sigma: float, q: float, steps: int, *, cap: float = 8.0, round: int = 0) -> float:
    return ledger.record(sigma, q, steps, epsilon_cap=cap, run_id="run-a", round=round)


# --- accounting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["prv", "rdp"])
def test_epsilon_equals_opacus_and_survives_restart(tmp_path, mechanism):
    ledger = new_ledger(tmp_path, mechanism)
    assert ledger.epsilon_spent() == 0.0
    for i, (sigma, q, steps) in enumerate(HISTORY):
        spent = record(ledger, sigma, q, steps, round=i)
    expected = opacus_epsilon(mechanism, HISTORY)
    assert spent == pytest.approx(expected, abs=1e-9)
    assert ledger.epsilon_spent() == pytest.approx(expected, abs=1e-9)

    restarted = PrivacyLedger.open(ledger.path, hospital_id="h1", delta=DELTA)
    assert restarted.history == ledger.history
    assert [(e.run_id, e.round) for e in restarted.history] == [("run-a", 0), ("run-a", 1), ("run-a", 2)]
    assert restarted.epsilon_spent() == pytest.approx(expected, abs=1e-9)
    assert restarted.to_json() == ledger.to_json()
    assert isinstance(restarted.to_json()["epsilon_spent"], float)  # not a numpy float: JSON-safe


@pytest.mark.parametrize("mechanism", ["prv", "rdp"])
def test_rounds_with_one_sigma_count_as_one_accountant_run(tmp_path, mechanism):
    ledger = new_ledger(tmp_path, mechanism)
    for i in range(3):
        spent = record(ledger, 1.0, 0.02, 40, round=i)
    # What Opacus's own accountant holds after stepping through all 120 steps in one process.
    accountant = ACCOUNTANTS[mechanism]()
    for _ in range(120):
        accountant.step(noise_multiplier=1.0, sample_rate=0.02)
    assert spent == pytest.approx(float(accountant.get_epsilon(DELTA)), abs=1e-9)
    assert len(ledger.history) == 3  # the audit trail keeps every round


def test_project_writes_nothing_and_matches_record(tmp_path):
    ledger = new_ledger(tmp_path, "rdp")
    before = ledger.path.read_bytes()
    projected = ledger.project(1.0, 0.01, 300)
    assert projected == pytest.approx(opacus_epsilon("rdp", [(1.0, 0.01, 300)]), abs=1e-9)
    assert ledger.path.read_bytes() == before and ledger.history == []
    assert record(ledger, 1.0, 0.01, 300) == pytest.approx(projected, abs=1e-12)


def test_refuses_over_cap_and_writes_nothing(tmp_path):
    ledger = new_ledger(tmp_path, "prv", cap=2.0)
    spent = record(ledger, 1.0, 0.01, 200, cap=2.0)
    before = ledger.path.read_bytes()
    projected = ledger.project(1.0, 0.01, 5000)
    assert projected > 2.0
    with pytest.raises(PrivacyBudgetExceeded) as err:
        record(ledger, 1.0, 0.01, 5000, cap=2.0, round=1)
    message = str(err.value)
    assert f"{spent:.4f}" in message and f"{projected:.4f}" in message and "cap 2" in message
    assert ledger.path.read_bytes() == before
    assert len(ledger.history) == 1 and ledger.epsilon_spent() == spent


def test_exactly_at_cap_is_allowed(tmp_path):
    ledger = new_ledger(tmp_path, "rdp")
    cap = ledger.project(1.0, 0.01, 100)
    assert record(ledger, 1.0, 0.01, 100, cap=cap) == cap
    assert ledger.to_json()["epsilon_cap"] == cap  # the cap passed at the last record, for audit


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
def test_absurd_spend_is_refused_without_exhausting_memory(tmp_path):
    # Opacus's PRV needs gigabytes here (OOM-killed on a 23 GB host); its RDP bound is valid and cheap.
    ledger = new_ledger(tmp_path, "prv", cap=8.0)
    assert ledger.project(0.1, 1.0, 1000) == opacus_epsilon("rdp", [(0.1, 1.0, 1000)]) > 1000
    with pytest.raises(PrivacyBudgetExceeded):
        record(ledger, 0.1, 1.0, 1000)


@pytest.mark.parametrize(
    "sigma, q, steps",
    [
        (0.0, 0.01, 10), (-1.0, 0.01, 10), (float("nan"), 0.01, 10),
        (1.0, 0.0, 10), (1.0, 1.5, 10),
        (1.0, 0.01, 0), (1.0, 0.01, 2.5), (1.0, 0.01, True),
    ],
)
def test_bad_step_arguments_are_never_recorded(tmp_path, sigma, q, steps):
    ledger = new_ledger(tmp_path, "rdp")
    before = ledger.path.read_bytes()
    with pytest.raises(ValueError, match="non-private" if sigma == 0 else None):
        record(ledger, sigma, q, steps)
    with pytest.raises(ValueError):
        ledger.project(sigma, q, steps)
    assert ledger.path.read_bytes() == before


@pytest.mark.parametrize("kwargs", [{"epsilon_cap": 0.0}, {"epsilon_cap": float("inf")}, {"run_id": ""}, {"round": -1}])
def test_bad_record_arguments(tmp_path, kwargs):
    ledger = new_ledger(tmp_path, "rdp")
    before = ledger.path.read_bytes()
    with pytest.raises(ValueError):
        ledger.record(1.0, 0.01, 10, **{"epsilon_cap": 8.0, "run_id": "r", "round": 0, **kwargs})
    assert ledger.path.read_bytes() == before


# --- durability and concurrency -----------------------------------------------------------------

CRASH_AFTER_RECORD = """
import os, signal, sys
from fedprompt.client.ledger import PrivacyLedger
ledger = PrivacyLedger.open(sys.argv[1], hospital_id="h1")
ledger.record(1.0, 0.01, 100, epsilon_cap=8.0, run_id="crashed", round=7)
os.kill(os.getpid(), signal.SIGKILL)  # dies before training or sending
print("sent")
"""


def _record_many(path: str, me: int, n: int, start: Any) -> None:
    ledger = PrivacyLedger.open(path, hospital_id="h1")
    start.wait()  # both processes record at the same time
    for i in range(n):
        ledger.record(1.0, 0.001, 1, epsilon_cap=1e6, run_id=f"proc-{me}", round=i)
        time.sleep(0.005)  # a round's work: lets the other process take the lock in between


def test_crash_right_after_record_still_counts(tmp_path):
    ledger = new_ledger(tmp_path, "rdp")
    child = subprocess.run([sys.executable, "-c", CRASH_AFTER_RECORD, str(ledger.path)], capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert "sent" not in child.stdout
    after = PrivacyLedger.open(ledger.path)
    assert [(e.run_id, e.round, e.steps) for e in after.history] == [("crashed", 7, 100)]
    assert after.epsilon_spent() == pytest.approx(opacus_epsilon("rdp", [(1.0, 0.01, 100)]), abs=1e-9)


def test_concurrent_records_all_survive(tmp_path):
    ledger = new_ledger(tmp_path, "rdp")
    n = 25
    # fork: the children inherit the imported opacus, so they start at once and truly overlap.
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_record_many, args=(str(ledger.path), me, n, start)) for me in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0

    json.loads(ledger.path.read_text())  # parses
    after = PrivacyLedger.open(ledger.path)
    for me in (1, 2):
        assert [e.round for e in after.history if e.run_id == f"proc-{me}"] == list(range(n))
    assert len(after.history) == 2 * n
    steps = [(e.noise_multiplier, e.sample_rate, e.steps) for e in after.history]
    assert after.epsilon_spent() == pytest.approx(opacus_epsilon("rdp", steps), abs=1e-9)


def test_waits_for_the_lock_then_gives_up(tmp_path, monkeypatch):
    ledger = new_ledger(tmp_path, "rdp")
    before = ledger.path.read_bytes()
    monkeypatch.setattr(ledger_mod, "LOCK_TIMEOUT_S", 0.2)
    fd = os.open(f"{ledger.path}.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process is recording
        with pytest.raises(LedgerError, match="locked"):
            record(ledger, 1.0, 0.01, 10)
    finally:
        os.close(fd)
    assert ledger.path.read_bytes() == before and ledger.history == []


# --- failures of the disk -----------------------------------------------------------------------


def _fail(err: int):
    def raiser(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    return raiser


@pytest.mark.parametrize(
    "target, name, err",
    [(os, "replace", errno.ENOSPC), (os, "fsync", errno.EIO), (tempfile, "mkstemp", errno.EROFS)],
    ids=["disk-full-at-replace", "fsync-fails", "read-only-filesystem"],
)
def test_failed_write_changes_nothing(tmp_path, monkeypatch, target, name, err):
    ledger = new_ledger(tmp_path, "rdp")
    record(ledger, 1.0, 0.01, 10)
    before_bytes, before_history, before_eps = ledger.path.read_bytes(), ledger.history, ledger.epsilon_spent()
    listing = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(target, name, _fail(err))
    with pytest.raises(LedgerError, match="nothing was recorded"):
        record(ledger, 1.0, 0.01, 10, round=1)
    monkeypatch.undo()
    assert ledger.history == before_history and ledger.epsilon_spent() == before_eps
    assert ledger.path.read_bytes() == before_bytes
    assert sorted(os.listdir(tmp_path)) == listing  # no temp file left behind


def test_unwritable_location(tmp_path):
    # As root chmod does not stop writes; a path under a regular file is unwritable for anyone.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(LedgerError):
        PrivacyLedger.create(blocker / "ledger.json", hospital_id="h1", epsilon_cap=8.0, delta=DELTA)
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(tmp_path):
    ledger = new_ledger(tmp_path, "rdp")
    before = ledger.path.read_bytes()
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(LedgerError):
            record(ledger, 1.0, 0.01, 10)
    finally:
        tmp_path.chmod(0o700)
    assert ledger.path.read_bytes() == before and ledger.history == []


# --- never reset, never trust a damaged file ----------------------------------------------------


def test_missing_ledger_says_how_to_create_one(tmp_path):
    with pytest.raises(LedgerError, match="privacy init") as err:
        PrivacyLedger.open(tmp_path / "nope.json")
    assert "Never recreate" in str(err.value)
    assert not (tmp_path / "nope.json").exists()


def test_create_refuses_an_existing_ledger(tmp_path):
    ledger = new_ledger(tmp_path, "rdp")
    record(ledger, 1.0, 0.01, 10)
    before = ledger.path.read_bytes()
    with pytest.raises(LedgerError, match="already exists"):
        new_ledger(tmp_path, "rdp")
    assert ledger.path.read_bytes() == before


def _entry(**overrides) -> dict:
    return {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "run_id": "r", "round": 0,
            "recorded_at": "2025-01-01T00:00:00+00:00", **overrides}


CORRUPTIONS = {
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "not-utf8": lambda text: "\udcff",
    "not-an-object": lambda text: "[]",
    "nan": lambda text: text.replace('"noise_multiplier": 1.0', '"noise_multiplier": NaN'),
    "infinity": lambda text: text.replace('"epsilon_cap": 8.0', '"epsilon_cap": Infinity'),
    "overflow-to-inf": lambda text: text.replace('"noise_multiplier": 1.0', '"noise_multiplier": 1e999'),
}
DOC_CORRUPTIONS = {
    "missing-history": lambda d: d.pop("history"),
    "unknown-key": lambda d: d.update(extra=1),
    "schema-mismatch": lambda d: d.update(schema="fedprompt-ledger/2"),
    "delta-not-a-number": lambda d: d.update(delta="1e-5"),
    "bad-mechanism": lambda d: d.update(mechanism="gdp"),
    "history-not-a-list": lambda d: d.update(history={}),
    "steps-as-string": lambda d: d["history"].append(_entry(steps="10")),
    "steps-as-float": lambda d: d["history"].append(_entry(steps=10.0)),
    "steps-as-bool": lambda d: d["history"].append(_entry(steps=True)),
    "negative-steps": lambda d: d["history"].append(_entry(steps=-5)),
    "zero-sample-rate": lambda d: d["history"].append(_entry(sample_rate=0.0)),
    "sample-rate-above-one": lambda d: d["history"].append(_entry(sample_rate=1.5)),
    "non-private-entry": lambda d: d["history"].append(_entry(noise_multiplier=0.0)),
    "entry-missing-key": lambda d: d["history"].append({k: v for k, v in _entry().items() if k != "round"}),
    "bad-timestamp": lambda d: d["history"].append(_entry(recorded_at="yesterday")),
}


def _corrupt(path: Path, kind: str) -> None:
    if kind in CORRUPTIONS:
        path.write_text(CORRUPTIONS[kind](path.read_text()), errors="surrogateescape")
    else:
        doc = json.loads(path.read_text())
        DOC_CORRUPTIONS[kind](doc)
        path.write_text(json.dumps(doc))


@pytest.mark.parametrize("kind", [*CORRUPTIONS, *DOC_CORRUPTIONS])
def test_corruption_is_an_error_never_a_reset(tmp_path, kind):
    ledger = new_ledger(tmp_path, "rdp")
    record(ledger, 1.0, 0.01, 10)
    _corrupt(ledger.path, kind)
    damaged = ledger.path.read_bytes()
    with pytest.raises(LedgerError, match="corrupted") as err:
        PrivacyLedger.open(ledger.path)
    assert "NOT reset" in str(err.value)
    # A process that had the ledger open re-reads it before recording: it must refuse too.
    with pytest.raises(LedgerError, match="corrupted"):
        record(ledger, 1.0, 0.01, 10, round=1)
    assert ledger.path.read_bytes() == damaged


def test_a_reset_under_a_running_process_is_refused(tmp_path):
    ledger = new_ledger(tmp_path, "rdp")
    record(ledger, 1.0, 0.01, 10)
    ledger.path.unlink()
    new_ledger(tmp_path, "rdp")  # someone "fixed" the site by starting over
    with pytest.raises(LedgerError, match="lost entries"):
        record(ledger, 1.0, 0.01, 10, round=1)
    assert PrivacyLedger.open(ledger.path).history == []


def test_identity_mismatches(tmp_path):
    ledger = new_ledger(tmp_path, "rdp")
    with pytest.raises(LedgerError, match="belongs to hospital 'h1'"):
        PrivacyLedger.open(ledger.path, hospital_id="h2")
    with pytest.raises(LedgerError, match="not comparable"):
        PrivacyLedger.open(ledger.path, delta=1e-6)
    site = write_site(tmp_path, ledger=ledger.path.name, accountant="prv")
    with pytest.raises(LedgerError, match="accountant"):
        PrivacyLedger.for_site(SiteConfig.load(site))
    site = write_site(tmp_path, ledger=ledger.path.name, accountant="rdp")
    assert PrivacyLedger.for_site(SiteConfig.load(site)).path == ledger.path


# --- the CLI ------------------------------------------------------------------------------------


def write_site(tmp_path: Path, *, ledger: str = "ledger/privacy-ledger.json", cap: float = 8.0, accountant: str = "prv") -> Path:
    site = tmp_path / "site.yaml"
    site.write_text(
        "hospital_id: h1\ntrain: train.csv\n"
        f"privacy:\n  max_epsilon: {cap}\n  delta: 1.0e-5\n  accountant: {accountant}\n"
        f"ledger: {ledger}\n"
    )
    return site


@pytest.fixture
def cli(monkeypatch):
    """`fedprompt.cli.main` with only `privacy` registered: these tests don't depend on the other commands."""
    from fedprompt import cli

    monkeypatch.setattr(cli, "COMMANDS", ("privacy",))
    return cli.main


def test_cli_init_and_show(tmp_path, cli, capsys):
    site = write_site(tmp_path)
    assert cli(["privacy", "init", "--site", str(site)]) == 0
    path = tmp_path / "ledger" / "privacy-ledger.json"
    assert json.loads(path.read_text())["schema"] == SCHEMA
    capsys.readouterr()

    assert cli(["privacy", "show", "--site", str(site), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == {"hospital_id": "h1", "mechanism": "prv", "delta": DELTA, "epsilon_spent": 0.0, "epsilon_cap": 8.0, "history": []}

    ledger = PrivacyLedger.open(path)
    record(ledger, 1.0, 0.01, 200)
    record(ledger, 1.2, 0.02, 100, round=1)
    assert cli(["privacy", "show", "--site", str(site), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == ledger.to_json()
    assert shown["history"] == [[1.0, 0.01, 200], [1.2, 0.02, 100]]

    write_site(tmp_path, cap=5.0)  # the hospital lowered its cap since the last round
    assert cli(["privacy", "show", "--site", str(site)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("run-a")]
    assert [row[-1] for row in rows] == [f"{opacus_epsilon('prv', HISTORY[:1]):.4f}", f"{ledger.epsilon_spent():.4f}"]
    assert "cap at the last record was 8" in out
    assert f"spent {ledger.epsilon_spent():.4f} of cap 5 (delta 1e-05, accountant prv)" in out

    assert cli(["privacy", "init", "--site", str(site)]) == 3
    assert "already exists" in capsys.readouterr().err


def test_cli_errors(tmp_path, cli, capsys):
    site = write_site(tmp_path)
    assert cli(["privacy", "show", "--site", str(site)]) == 3
    assert "privacy init" in capsys.readouterr().err
    assert cli(["privacy", "show", "--site", str(tmp_path / "missing.yaml")]) == 2

    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    site = write_site(tmp_path, ledger="blocker/ledger.json")
    assert cli(["privacy", "init", "--site", str(site)]) == 3
