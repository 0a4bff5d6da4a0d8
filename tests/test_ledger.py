"""The privacy ledger: exact Opacus accounting, durable across crashes, never reset, never corrupted;
a tamper-evident audit trail (hash chain + anchor), non-private rounds at infinite epsilon."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_workspace
from opacus.accountants import PRVAccountant, RDPAccountant

from fedprompt.client import ledger as ledger_mod
from fedprompt.client.ledger import SCHEMA, PrivacyLedger, state_sha256
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
    return PrivacyLedger.create(
        tmp_path / "ledger.json", hospital_id="h1", epsilon_cap=cap, delta=DELTA, mechanism=mechanism
    )


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
        (0.0, 0.01, 10),
        (-1.0, 0.01, 10),
        (float("nan"), 0.01, 10),
        (1.0, 0.0, 10),
        (1.0, 1.5, 10),
        (1.0, 0.01, 0),
        (1.0, 0.01, 2.5),
        (1.0, 0.01, True),
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


@pytest.mark.subprocess
def test_crash_right_after_record_still_counts(tmp_path):
    ledger = new_ledger(tmp_path, "rdp")
    child = subprocess.run(
        [sys.executable, "-c", CRASH_AFTER_RECORD, str(ledger.path)], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert "sent" not in child.stdout
    after = PrivacyLedger.open(ledger.path)
    assert [(e.run_id, e.round, e.steps) for e in after.history] == [("crashed", 7, 100)]
    assert after.epsilon_spent() == pytest.approx(opacus_epsilon("rdp", [(1.0, 0.01, 100)]), abs=1e-9)


@pytest.mark.subprocess
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
    monkeypatch.setattr(ledger_mod.chain, "LOCK_TIMEOUT_S", 0.2)
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
    return {
        "noise_multiplier": 1.0,
        "sample_rate": 0.01,
        "steps": 10,
        "run_id": "r",
        "round": 0,
        "recorded_at": "2025-01-01T00:00:00+00:00",
        **overrides,
    }


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
    "schema-mismatch": lambda d: d.update(schema="fedprompt-ledger/3"),
    "missing-completions": lambda d: d.pop("completions"),
    "hash-not-hex": lambda d: d["history"][0].update(hash="xyz"),
    "records-hash-not-hex": lambda d: d["history"][0].update(records_sha256="ABC"),
    "non-private-with-sigma": lambda d: d["history"][0].update(non_private=True),
    "bad-migrated-from": lambda d: d.update(migrated_from={"schema": "fedprompt-ledger/0", "entries": 0}),
    "completion-missing-key": lambda d: d["completions"].append({"entry": 0}),
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
    # Someone "fixes" the site by starting over: its anchor remembers the entry, so init refuses...
    with pytest.raises(LedgerError, match="held 1 entries, so this site has trained"):
        new_ledger(tmp_path, "rdp")
    assert not ledger.path.exists()
    ledger.anchor_path.unlink()  # ...unless the anchor goes too
    new_ledger(tmp_path, "rdp")
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


def write_site(
    tmp_path: Path,
    *,
    ledger: str = "ledger/privacy-ledger.json",
    cap: float = 8.0,
    accountant: str = "prv",
    anchor: str | None = None,
) -> Path:
    site = tmp_path / "site.yaml"
    site.write_text(
        "hospital_id: h1\ntrain: train.csv\n"
        f"privacy:\n  max_epsilon: {cap}\n  delta: 1.0e-5\n  accountant: {accountant}\n"
        f"ledger: {ledger}\n" + (f"ledger_anchor: {anchor}\n" if anchor else "")
    )
    return site


@pytest.fixture
def cli(cli_with):
    """`fedprompt.cli.main` with only `privacy` registered: these tests don't depend on the other commands."""
    return cli_with("privacy")


def test_cli_init_and_show(tmp_path, cli, capsys):
    site = write_site(tmp_path)
    assert cli(["privacy", "init", "--site", str(site)]) == 0
    path = tmp_path / "ledger" / "privacy-ledger.json"
    assert json.loads(path.read_text())["schema"] == SCHEMA
    capsys.readouterr()

    assert cli(["privacy", "show", "--site", str(site), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == {
        "hospital_id": "h1",
        "mechanism": "prv",
        "delta": DELTA,
        "epsilon_spent": 0.0,
        "epsilon_cap": 8.0,
        "non_private": False,
        "history": [],
    }

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


# --- the audit trail: hash chain, anchor, schema 1 ----------------------------------------------


def spec_hash(obj: dict) -> str:
    """The documented rule, written out independently of the module: sha256 of the sorted-key,
    whitespace-free JSON of the object without its own "hash" key."""
    body = {k: v for k, v in obj.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def header_of(doc: dict) -> dict:
    return {k: doc[k] for k in ("schema", "hospital_id", "mechanism", "delta", "created_at", "migrated_from")}


SIGMAS = [1.0, 1.1, 1.2, 1.3]


def chained_ledger(tmp_path: Path) -> PrivacyLedger:
    """4 rounds (rdp); rounds 0 and 2 completed (their update left), 1 and 3 not."""
    ledger = new_ledger(tmp_path, "rdp")
    for i, sigma in enumerate(SIGMAS):
        ledger.record(
            sigma,
            0.01,
            10,
            epsilon_cap=8.0,
            run_id="run-a",
            round=i,
            records_sha256=f"{i:064x}",
            model_in_sha256=f"{100 + i:064x}",
        )
        if i % 2 == 0:
            ledger.complete(f"{200 + i:064x}")
    return ledger


def verify(cli, capsys, site: Path) -> tuple[int, dict]:
    capsys.readouterr()
    rc = cli(["privacy", "verify", "--site", str(site), "--json"])
    return rc, json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_chain_verifies_on_a_real_sequence_of_records(tmp_path, cli, capsys):
    ledger = chained_ledger(tmp_path)
    doc = json.loads(ledger.path.read_text())
    assert doc["schema"] == SCHEMA == "fedprompt-ledger/2" and doc["migrated_from"] is None
    prev = spec_hash(header_of(doc))
    for i, e in enumerate(doc["history"]):
        assert e["prev"] == prev and e["hash"] == spec_hash(e), i
        assert (
            e["noise_multiplier"],
            e["round"],
            e["records_sha256"],
            e["model_in_sha256"],
            e["epsilon_cap"],
            e["non_private"],
        ) == (SIGMAS[i], i, f"{i:064x}", f"{100 + i:064x}", 8.0, False)
        prev = e["hash"]
    completions = doc["completions"]
    assert [(c["entry"], c["entry_hash"], c["model_out_sha256"]) for c in completions] == [
        (0, doc["history"][0]["hash"], f"{200:064x}"),
        (2, doc["history"][2]["hash"], f"{202:064x}"),
    ]
    assert completions[0]["prev"] == spec_hash(header_of(doc)) and completions[1]["prev"] == completions[0]["hash"]
    assert all(c["hash"] == spec_hash(c) for c in completions)
    # The anchor (default: beside the ledger) holds both counts and heads.
    assert ledger.anchor_path == tmp_path / "ledger.json.anchor"
    anchor = json.loads(ledger.anchor_path.read_text())
    assert {k: anchor[k] for k in ("hospital_id", "entries", "head", "completions", "completions_head")} == {
        "hospital_id": "h1",
        "entries": 4,
        "head": prev,
        "completions": 2,
        "completions_head": completions[1]["hash"],
    }

    site = write_site(tmp_path, ledger="ledger.json", accountant="rdp")
    rc, verdict = verify(cli, capsys, site)
    assert rc == 0 and verdict["ok"] is True and verdict["failure"] is None
    assert (
        verdict["entries"],
        verdict["completions"],
        verdict["head"],
        verdict["anchor_status"],
        verdict["incomplete"],
    ) == (4, 2, prev, "in step", [1, 3])
    assert verdict["epsilon_spent"] == pytest.approx(opacus_epsilon("rdp", [(s, 0.01, 10) for s in SIGMAS]), abs=1e-9)
    assert verdict["epsilon_cap"] == 8.0 and verdict["over_cap"] is False and verdict["non_private"] is False
    assert cli(["privacy", "verify", "--site", str(site)]) == 0
    out = capsys.readouterr().out
    assert (
        "4 entries, 2 completions, chain intact" in out
        and "in step with the ledger" in out
        and out.rstrip().endswith("ok")
    )


def _swap(items: list, i: int, j: int) -> None:
    items[i], items[j] = items[j], items[i]


# name: (change to the JSON document, kind, where, index of the first bad entry)
TAMPERING = {
    "delete-entry-1": (lambda d: d["history"].pop(1), "chain", "history", 1),
    "edit-steps-of-entry-2": (lambda d: d["history"][2].update(steps=1), "chain", "history", 2),
    "edit-sigma-of-entry-0": (lambda d: d["history"][0].update(noise_multiplier=50.0), "chain", "history", 0),
    "reorder-entries-1-and-2": (lambda d: _swap(d["history"], 1, 2), "chain", "history", 1),
    "edit-header": (lambda d: d.update(created_at="2020-01-01T00:00:00+00:00"), "chain", "history", 0),
    "delete-a-completion": (lambda d: d["completions"].pop(0), "chain", "completions", 0),
    "edit-an-out-hash": (lambda d: d["completions"][1].update(model_out_sha256="f" * 64), "chain", "completions", 1),
    # the chain alone cannot see a missing LAST entry: the anchor does
    "delete-the-last-entry": (lambda d: d["history"].pop(), "rollback", "history", 3),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_tampering_fails_verify_with_the_entry_index(tmp_path, cli, capsys, case):
    change, kind, where, index = TAMPERING[case]
    ledger = chained_ledger(tmp_path)
    doc = json.loads(ledger.path.read_text())
    change(doc)
    ledger.path.write_text(json.dumps(doc, indent=2))
    tampered, anchor = ledger.path.read_bytes(), ledger.anchor_path.read_bytes()
    site = write_site(tmp_path, ledger="ledger.json", accountant="rdp")

    rc, verdict = verify(cli, capsys, site)
    assert rc == 3 and verdict["ok"] is False and "epsilon_spent" not in verdict
    failure = verdict["failure"]
    assert (failure["kind"], failure["where"], failure["index"]) == (kind, where, index), failure
    assert cli(["privacy", "verify", "--site", str(site)]) == 3
    err = capsys.readouterr().err
    assert err.startswith("privacy: verification FAILED") and str(ledger.path) in err and f"{where}[{index}]" in err, (
        err
    )
    # Nothing is recorded on it: by the process that wrote it, or by a fresh one (a site's next round).
    with pytest.raises(LedgerError):
        record(ledger, 1.0, 0.01, 10, round=9)
    with pytest.raises(LedgerError, match=re.escape(f"{where}[{index}]")):
        PrivacyLedger.for_site(SiteConfig.load(site))
    assert cli(["privacy", "show", "--site", str(site)]) == 3
    assert ledger.path.read_bytes() == tampered and ledger.anchor_path.read_bytes() == anchor


ROUND_IN_ANOTHER_PROCESS = """
import sys
from fedprompt.client.ledger import PrivacyLedger
from fedprompt.common.config import SiteConfig
from fedprompt.common.errors import LedgerError
try:
    ledger = PrivacyLedger.for_site(SiteConfig.load(sys.argv[1]))  # what train_round does before projecting epsilon
    ledger.record(1.0, 0.01, 10, epsilon_cap=8.0, run_id="next", round=9)
except LedgerError as exc:
    print(exc)
    sys.exit(3)
print("recorded")
"""


@pytest.mark.subprocess
def test_rollback_is_detected_and_refused_in_another_process(tmp_path, cli, capsys):
    (tmp_path / "other-volume").mkdir()
    site = write_site(tmp_path, accountant="rdp", anchor="other-volume/ledger.anchor")
    assert cli(["privacy", "init", "--site", str(site)]) == 0
    path, anchor = tmp_path / "ledger" / "privacy-ledger.json", tmp_path / "other-volume" / "ledger.anchor"
    # site.yaml's anchor, not the default
    assert anchor.is_file() and not (path.parent / "privacy-ledger.json.anchor").exists()

    ledger = PrivacyLedger.for_site(SiteConfig.load(site))
    record(ledger, 1.0, 0.01, 10, round=0)
    record(ledger, 1.0, 0.01, 10, round=1)
    old = path.read_bytes()  # a copy put aside (a backup)
    record(ledger, 1.0, 0.01, 10, round=2)
    record(ledger, 1.0, 0.01, 10, round=3)
    latest = path.read_bytes()
    path.write_bytes(old)  # the old copy put back: the chain itself is intact...

    rc, verdict = verify(cli, capsys, site)  # ...but the anchor remembers 4 entries
    assert rc == 3 and (verdict["failure"]["kind"], verdict["failure"]["where"], verdict["failure"]["index"]) == (
        "rollback",
        "history",
        2,
    )
    assert verdict["anchor"] == str(anchor)
    child = subprocess.run(
        [sys.executable, "-c", ROUND_IN_ANOTHER_PROCESS, str(site)], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 3, (child.stdout, child.stderr)
    assert "was rolled back: its history has 2 entries but its anchor" in child.stdout and "recorded 4" in child.stdout
    assert path.read_bytes() == old  # nothing recorded

    path.write_bytes(latest)  # the latest copy restored: whole again
    rc, verdict = verify(cli, capsys, site)
    assert rc == 0 and verdict["entries"] == 4 and verdict["anchor_status"] == "in step"
    child = subprocess.run(
        [sys.executable, "-c", ROUND_IN_ANOTHER_PROCESS, str(site)], capture_output=True, text=True, timeout=120
    )
    assert (child.returncode, child.stdout.strip()) == (0, "recorded"), child.stderr
    assert [e.round for e in PrivacyLedger.for_site(SiteConfig.load(site)).history] == [0, 1, 2, 3, 9]


def test_anchor_setting_is_checked(tmp_path, cli, capsys):
    site = write_site(tmp_path, ledger="ledger.json", anchor="ledger.json")
    assert cli(["privacy", "init", "--site", str(site)]) == 2  # bad site.yaml: the anchor is not the ledger
    assert "ledger_anchor: must not be the ledger itself" in capsys.readouterr().err
    site = write_site(tmp_path, ledger="ledger.json", anchor="unmounted-volume/ledger.anchor")
    assert cli(["privacy", "init", "--site", str(site)]) == 3  # never created elsewhere than asked
    assert "unmounted-volume/ledger.anchor does not exist; nothing was created" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json.lock", "site.yaml"]


def test_ledger_ahead_of_its_anchor_is_accepted(tmp_path):
    """A crash between the ledger write and the anchor write leaves the anchor one step behind."""
    ledger = chained_ledger(tmp_path)
    behind = ledger.anchor_path.read_bytes()
    record(ledger, 1.0, 0.01, 10, round=4)
    ledger.complete("e" * 64)
    ledger.anchor_path.write_bytes(behind)
    reopened = PrivacyLedger.open(ledger.path)
    assert reopened.anchor_status == "ahead" and len(reopened.history) == 5
    record(reopened, 1.0, 0.01, 10, round=5)
    assert (
        json.loads(ledger.anchor_path.read_text())["entries"] == 6
        and PrivacyLedger.open(ledger.path).anchor_status == "in step"
    )


def test_a_missing_anchor_refuses_until_re_anchored_never_over_a_rollback(tmp_path, cli, capsys):
    site = write_site(tmp_path, accountant="rdp")
    assert cli(["privacy", "init", "--site", str(site)]) == 0
    ledger = PrivacyLedger.for_site(SiteConfig.load(site))
    record(ledger, 1.0, 0.01, 10, round=0)
    record(ledger, 1.0, 0.01, 10, round=1)
    ledger.anchor_path.unlink()
    with pytest.raises(LedgerError, match="anchor of privacy ledger .* is missing"):
        PrivacyLedger.for_site(SiteConfig.load(site))
    rc, verdict = verify(cli, capsys, site)
    assert rc == 3 and verdict["failure"]["kind"] == "anchor"

    # re-anchoring needs the last head the aggregator saw (metrics.json), and the chain must hold it
    head = ledger.head
    assert cli(["privacy", "anchor", "--site", str(site)]) == 3
    assert "needs the last ledger head the aggregator recorded" in capsys.readouterr().err
    assert cli(["privacy", "anchor", "--site", str(site), "--last-head", "0" * 64]) == 3
    assert "does not contain the head 0000000000000000..." in capsys.readouterr().err
    assert not ledger.anchor_path.exists()  # nothing written
    assert cli(["privacy", "anchor", "--site", str(site), "--last-head", head]) == 0
    assert "2 entries" in capsys.readouterr().out
    assert verify(cli, capsys, site)[0] == 0

    old = ledger.path.read_bytes()
    record(ledger, 1.0, 0.01, 10, round=2)
    ledger.path.write_bytes(old)
    anchor = ledger.anchor_path.read_bytes()
    assert cli(["privacy", "anchor", "--site", str(site)]) == 3  # a rollback is never blessed
    assert "rolled back" in capsys.readouterr().err and ledger.anchor_path.read_bytes() == anchor


def test_a_cut_ledger_cannot_be_re_anchored_past_the_head_the_aggregator_saw(tmp_path, cli, capsys):
    """Entries cut from the end (the chain stays valid) and the anchor deleted: `privacy anchor` with
    the last head the aggregator recorded refuses (exit 3), and with a malformed head argparse does (2)."""
    site = write_site(tmp_path, accountant="rdp")
    assert cli(["privacy", "init", "--site", str(site)]) == 0
    ledger = PrivacyLedger.for_site(SiteConfig.load(site))
    for r in range(3):
        record(ledger, 1.0, 0.01, 10, round=r)
    witnessed, spent = ledger.head, ledger.epsilon_spent()  # what the aggregator recorded
    doc = json.loads(ledger.path.read_text())
    doc["history"] = doc["history"][:1]  # cut: what is left is a valid chain, with less epsilon
    ledger.path.write_text(json.dumps(doc))
    ledger.anchor_path.unlink()
    with pytest.raises(SystemExit) as exited:
        cli(["privacy", "anchor", "--site", str(site), "--last-head", "xyz"])
    assert exited.value.code == 2 and "expected a sha256 hex digest" in capsys.readouterr().err
    assert cli(["privacy", "anchor", "--site", str(site), "--last-head", witnessed]) == 3
    assert f"does not contain the head {witnessed[:16]}..." in capsys.readouterr().err
    assert not ledger.anchor_path.exists()
    with pytest.raises(LedgerError, match="anchor of privacy ledger .* is missing"):  # still nothing may train
        PrivacyLedger.for_site(SiteConfig.load(site))
    cut = PrivacyLedger.for_site(SiteConfig.load(site), anchored=False)
    assert cut.epsilon_spent() < spent


def test_schema_1_ledger_is_read_then_migrated_on_the_next_write(tmp_path, cli, capsys):
    v1 = {
        "schema": "fedprompt-ledger/1",
        "hospital_id": "h1",
        "mechanism": "rdp",
        "delta": DELTA,
        "epsilon_cap": 8.0,
        "created_at": "2025-01-01T00:00:00+00:00",
        "history": [_entry(steps=200, round=0), _entry(noise_multiplier=1.2, sample_rate=0.02, steps=100, round=1)],
    }
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps(v1, indent=2))
    original = path.read_bytes()
    site = write_site(tmp_path, ledger="ledger.json", accountant="rdp")
    steps = [(1.0, 0.01, 200), (1.2, 0.02, 100)]

    ledger = PrivacyLedger.for_site(SiteConfig.load(site))  # no anchor yet: fine for a schema-1 ledger
    assert ledger.stored_schema == "fedprompt-ledger/1" and ledger.anchor_status == "none"
    assert [(e.noise_multiplier, e.sample_rate, e.steps, e.run_id, e.round) for e in ledger.history] == [
        (*s, "r", i) for i, s in enumerate(steps)
    ]
    assert ledger.epsilon_spent() == pytest.approx(opacus_epsilon("rdp", steps), abs=1e-9)
    rc, verdict = verify(cli, capsys, site)
    assert rc == 0 and (
        verdict["schema"],
        verdict["migration_pending"],
        verdict["anchor_status"],
        verdict["entries"],
    ) == ("fedprompt-ledger/1", True, "none", 2)
    assert path.read_bytes() == original and not ledger.anchor_path.exists()  # reading and verifying write nothing
    as_read = [e.hash for e in ledger.history]

    record(ledger, 0.9, 0.01, 50, round=2)
    doc = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA and doc["migrated_from"] == {"schema": "fedprompt-ledger/1", "entries": 2}
    assert (doc["created_at"], [e["recorded_at"] for e in doc["history"][:2]]) == (
        v1["created_at"],
        [_entry()["recorded_at"]] * 2,
    )
    assert [e["hash"] for e in doc["history"][:2]] == as_read  # chained exactly as every process reads it
    assert [(e["records_sha256"], e["model_in_sha256"], e["epsilon_cap"]) for e in doc["history"][:2]] == [
        (None, None, None)
    ] * 2
    assert doc["history"][0]["prev"] == spec_hash(header_of(doc)) and all(
        e["hash"] == spec_hash(e) for e in doc["history"]
    )
    rc, verdict = verify(cli, capsys, site)
    assert rc == 0 and (
        verdict["schema"],
        verdict["migration_pending"],
        verdict["anchor_status"],
        verdict["entries"],
    ) == (SCHEMA, False, "in step", 3)
    assert verdict["epsilon_spent"] == pytest.approx(opacus_epsilon("rdp", [*steps, (0.9, 0.01, 50)]), abs=1e-9)


def test_state_sha256_is_the_documented_canonical_hash():
    from flwr.app import Array

    state = {
        "head.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7,
        "head.bias": torch.tensor([1.5, -2.0]),
    }
    expected = hashlib.sha256(
        b'[["head.bias",[2]],["head.weight",[2,3]]]\n'
        + state["head.bias"].numpy().astype("<f4").tobytes()
        + state["head.weight"].numpy().astype("<f4").tobytes()
    ).hexdigest()
    assert state_sha256(state) == expected
    assert state_sha256(dict(reversed(list(state.items())))) == expected  # name order does not matter
    assert state_sha256({k: Array(v.numpy()) for k, v in state.items()}) == expected  # what Flower carries
    # float32 values, whatever the dtype
    assert state_sha256({k: v.double().numpy() for k, v in state.items()}) == expected
    assert state_sha256({**state, "head.weight": state["head.weight"].reshape(3, 2)}) != expected  # the shape counts
    assert state_sha256({**state, "head.bias": state["head.bias"] + 1e-6}) != expected


# --- non-private participation ------------------------------------------------------------------


def test_non_private_round_is_infinite_for_good(tmp_path, cli, capsys):
    ledger = new_ledger(tmp_path, "rdp")
    site = write_site(tmp_path, ledger="ledger.json", accountant="rdp")
    private = record(ledger, 1.0, 0.01, 100, round=0)
    assert (
        ledger.record_non_private(0.25, 4, epsilon_cap=8.0, run_id="reference", round=1, records_sha256="a" * 64)
        == math.inf
    )
    assert ledger.epsilon_spent() == math.inf and ledger.non_private
    entry = json.loads(ledger.path.read_text())["history"][1]
    assert {
        k: entry[k]
        for k in ("noise_multiplier", "non_private", "sample_rate", "steps", "run_id", "round", "records_sha256")
    } == {
        "noise_multiplier": None,
        "non_private": True,
        "sample_rate": 0.25,
        "steps": 4,
        "run_id": "reference",
        "round": 1,
        "records_sha256": "a" * 64,
    }

    # Every later private round is over the cap, however small (the existing cap check: inf > cap).
    before = ledger.path.read_bytes()
    assert ledger.project(50.0, 0.001, 1) == math.inf
    with pytest.raises(PrivacyBudgetExceeded, match="over the site's cap") as err:
        record(ledger, 50.0, 0.001, 1, cap=1e6, round=2)
    assert "WITHOUT differential privacy in run 'reference' round 1" in str(
        err.value
    ) and "would bring it to inf" in str(err.value)
    assert ledger.path.read_bytes() == before

    reopened = PrivacyLedger.for_site(SiteConfig.load(site))  # a restart, another process: still infinite
    assert reopened.epsilon_spent() == math.inf and reopened.to_json()["epsilon_spent"] == "inf"
    with pytest.raises(PrivacyBudgetExceeded):
        record(reopened, 50.0, 0.001, 1, round=2)

    capsys.readouterr()
    assert cli(["privacy", "show", "--site", str(site), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert (shown["epsilon_spent"], shown["non_private"], shown["history"]) == (
        "inf",
        True,
        [[1.0, 0.01, 100], [None, 0.25, 4]],
    )
    assert cli(["privacy", "show", "--site", str(site)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("run-a", "reference"))]
    assert rows == [
        ["run-a", "0", "1", "0.01", "100", f"{private:.4f}"],
        ["reference", "1", "none", "0.25", "4", "inf"],
    ]
    assert (
        "spent inf of cap 8" in out and "WITHOUT differential privacy (1 round(s), first: run reference round 1)" in out
    )
    rc, verdict = verify(cli, capsys, site)
    assert rc == 0 and (verdict["epsilon_spent"], verdict["non_private"], verdict["over_cap"]) == ("inf", True, True)


# --- at the hospital (train_round) and in `fedprompt simulate` ----------------------------------


def tiny_workspace(root: Path, tiny_dir: Path, *, hospitals: int = 1) -> Path:
    """Sites that allow non-private rounds, on the tiny backbone, rdp accountant; no ledgers yet."""
    return make_workspace(root, tiny_dir, hospitals=hospitals, per_hospital=20, test_size=10, accountant="rdp")


@pytest.fixture
def one_hospital(tmp_path, tiny_dir, monkeypatch):
    """(site.yaml, SiteConfig, run, content(round, private), sigmas DP-SGD was called with: round 1 is
    the one-shot class-sums release, which does not call it)."""
    from flwr.app import RecordDict

    from fedprompt.client import hospital
    from fedprompt.client.workspace import list_hospitals, load_workspace
    from fedprompt.common.plan import RoundPlan
    from fedprompt.common.wire import ARRAYS, state_to_arrays
    from fedprompt.server.federation import RunSpec, prepare_run
    from fedprompt.simulation import ensure_ledgers

    ws = tiny_workspace(tmp_path, tiny_dir)
    assert ensure_ledgers(ws) == ["hospital-1"]
    fed, (site,), _ = load_workspace(ws)
    run = prepare_run(RunSpec(fed, tmp_path / "out", None, tiny_dir))
    trained: list = []
    real = hospital.local_update
    monkeypatch.setattr(hospital, "local_update", lambda *a, **k: trained.append(a[4]) or real(*a, **k))  # a[4]: sigma
    monkeypatch.setattr(hospital, "calibrate_noise", lambda *a, **k: 3.0)  # calibration is not under test (seconds)

    def content(round_: int, private: bool = True) -> RecordDict:
        plan = RoundPlan.for_run(fed, run.prompt, round=round_).replaced(private=private)
        return RecordDict({ARRAYS: state_to_arrays(run.state), "config": plan.to_config_record()})

    return list_hospitals(ws)[0], site, run, content, trained


def test_hospital_records_a_non_private_round_and_refuses_private_ones_after(one_hospital, caplog):
    from fedprompt.client import hospital
    from fedprompt.common.wire import ARRAYS, STATUS, arrays_to_state

    site_yaml, site, run, content, trained = one_hospital
    reply = hospital.train_round(content(1, private=False), site_yaml)
    assert reply[STATUS]["status"] == "ok" and trained == []  # the release, without noise
    ledger = PrivacyLedger.for_site(SiteConfig.load(site_yaml))
    (entry,), (done,) = ledger.history, ledger.completions
    assert (entry.non_private, entry.noise_multiplier, entry.round, entry.epsilon_cap) == (True, None, 1, 10.0)
    assert ledger.epsilon_spent() == math.inf
    # bound to what it trained on, what it received and what it sent
    assert entry.records_sha256 == hashlib.sha256(site.train.read_bytes()).hexdigest()
    assert entry.model_in_sha256 == state_sha256(run.state)
    assert (done.entry, done.entry_hash, done.model_out_sha256) == (
        0,
        entry.hash,
        state_sha256(arrays_to_state(reply[ARRAYS])),
    )
    assert done.model_out_sha256 != entry.model_in_sha256  # it did train

    before = site.ledger.read_bytes()
    for round_ in (2, 3):  # every later private round: refused before training, nothing recorded
        caplog.clear()
        with caplog.at_level("WARNING", logger="fedprompt.hospital"):
            reply = hospital.train_round(content(round_), site_yaml)
        assert set(reply.keys()) == {STATUS} and reply[STATUS]["status"] == "refused"
        # the run's projection (client/hospital.site_run) refuses it before the ledger would
        assert "epsilon spent inf leaves too little of this site's cap" in caplog.text, caplog.text
    assert trained == [] and site.ledger.read_bytes() == before


def test_hospital_refuses_a_rolled_back_ledger_before_training(one_hospital, caplog):
    from fedprompt.client import hospital
    from fedprompt.common.wire import ARRAYS, STATUS, arrays_to_state

    site_yaml, site, run, content, trained = one_hospital
    reply = hospital.train_round(content(1), site_yaml)
    assert reply[STATUS]["status"] == "ok"
    old = site.ledger.read_bytes()
    reply = hospital.train_round(content(2), site_yaml)
    assert reply[STATUS]["status"] == "ok" and trained == [3.0]  # round 2's DP-SGD
    ledger = PrivacyLedger.for_site(SiteConfig.load(site_yaml))
    assert [(c.entry, c.model_out_sha256) for c in ledger.completions][-1] == (
        1,
        state_sha256(arrays_to_state(reply[ARRAYS])),
    )
    assert [e.epsilon_cap for e in ledger.history] == [10.0, 10.0] and ledger.epsilon_spent() < 10.0

    site.ledger.write_bytes(old)  # an older copy restored: round 2 forgotten
    with caplog.at_level("WARNING", logger="fedprompt.hospital"):
        reply = hospital.train_round(content(3), site_yaml)
    assert "was rolled back: its history has 1 entries but its anchor" in caplog.text, caplog.text
    assert set(reply.keys()) == {STATUS} and reply[STATUS]["status"] == "refused"
    assert trained == [3.0] and site.ledger.read_bytes() == old


class _EngineReached(Exception):
    pass


@pytest.fixture
def sim_cli(monkeypatch, cli_with):
    """`fedprompt.cli.main` with `simulate` and `privacy`; the simulation engine stops the command when reached."""
    import flwr.simulation

    reached: list[int] = []

    def engine(*args, **kwargs):
        reached.append(1)
        raise _EngineReached

    monkeypatch.setattr(flwr.simulation, "run_simulation", engine)
    return cli_with("simulate", "privacy"), reached


def test_simulate_refuses_a_site_without_its_ledger(tmp_path, tiny_dir, sim_cli, capsys):
    from fedprompt.client.workspace import list_hospitals

    main, reached = sim_cli
    ws = tiny_workspace(tmp_path, tiny_dir, hospitals=2)
    site1, site2 = list_hospitals(ws)
    assert main(["privacy", "init", "--site", str(site1)]) == 0
    ledger1 = ws / "hospital-1" / "ledger" / "privacy-ledger.json"
    before = ledger1.read_bytes()
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["simulate", "--workspace", str(ws), "--out", str(out), "--backbone", str(tiny_dir)]) == 2
    err = capsys.readouterr().err
    missing = ws / "hospital-2" / "ledger" / "privacy-ledger.json"
    assert err.startswith(f"error: {missing}: ledger: hospital hospital-2 has no privacy ledger"), err
    assert f"`fedprompt privacy init --site {site2}`" in err and "hospital-1" not in err
    assert reached == [] and not out.exists()  # nothing trained, no run folder
    assert not missing.parent.exists() and ledger1.read_bytes() == before  # nothing created, nothing changed


def test_simulate_creates_ledgers_only_for_the_demo_it_writes(tmp_path, tiny_dir, sim_cli, capsys):
    main, reached = sim_cli
    out = tmp_path / "run"
    with pytest.raises(_EngineReached):
        main(["simulate", "--out", str(out), "--backbone", str(tiny_dir), "--rounds", "1"])
    printed = capsys.readouterr().out
    ws = out / "workspace"
    for i in (1, 2, 3):
        ledger = PrivacyLedger.open(
            ws / f"hospital-{i}" / "ledger" / "privacy-ledger.json", hospital_id=f"hospital-{i}"
        )
        assert ledger.history == [] and ledger.anchor_status == "in step" and ledger.anchor_path.is_file()
        assert f"created privacy ledger for hospital hospital-{i}" in printed
    # The same workspace named with --workspace is not fresh: a lost ledger stops it; none is re-created.
    lost = ws / "hospital-2" / "ledger" / "privacy-ledger.json"
    lost.unlink()
    assert main(["simulate", "--workspace", str(ws), "--out", str(tmp_path / "run2"), "--backbone", str(tiny_dir)]) == 2
    assert "hospital hospital-2 has no privacy ledger" in capsys.readouterr().err
    assert reached == [1] and not lost.exists() and not (tmp_path / "run2").exists()
