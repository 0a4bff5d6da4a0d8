"""The pre-flight (client/preflight.py, server/federation.py): before round 1 every site the run
will sample says whether it will train the whole run, spending nothing; the run starts only when
at least min_hospitals confirm, the others are sent no train message, and a site that confirmed
and refuses later is reported. Federations run in-process (fedprompt/local_engine.py, tiny BERT)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import FAST, edit_yaml, make_workspace
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from test_federation import _message, wire_bytes
from test_worker import _bundle

from fedprompt.cli import main
from fedprompt.client.client_app import make_client_app
from fedprompt.client.executor import Executor, WorkerHandle
from fedprompt.client.hospital import site_run
from fedprompt.client.ledger import PrivacyLedger
from fedprompt.client.preflight import count_units
from fedprompt.client.workspace import list_hospitals, load_workspace
from fedprompt.common.exit_codes import ExitCode
from fedprompt.common.plan import RoundPlan
from fedprompt.common.wire import ARRAYS, CONFIG, STATUS, refusal, state_to_arrays
from fedprompt.local_engine import run_local
from fedprompt.server.federation import RunSpec, prepare_run
from fedprompt.server.outcome import NOTHING_TRAINED, TRAINED
from fedprompt.server.server_app import make_server_app
from fedprompt.simulation import ensure_ledgers

pytestmark = pytest.mark.slow

# Fast settings; no fixed batch_size (a site's default limits refuse one: its epsilon would reveal its size).
QUICK = {**FAST, "training": {"local_epochs": 1, "lr": 0.05}}


def _set_cap(site_yaml: Path, cap: float) -> None:
    edit_yaml(site_yaml, lambda d: d["privacy"].update(max_epsilon=cap))


def _ledger_files(ws: Path) -> dict[Path, bytes]:
    """Every file of every site's ledger folder (ledger, anchor, noise memo), byte for byte."""
    return {p: p.read_bytes() for site in list_hospitals(ws) for p in sorted((site.parent / "ledger").iterdir())}


def _little_left(ws: Path, tiny_dir: Path, hospital: str) -> tuple[float, float, float]:
    """`hospital` spent budget in an earlier run and its cap now leaves a little, less than this run's
    first round at the request's noise: spread over the whole run (calibrated on what is left), its
    update would be mostly noise. Returns (epsilon spent, cap, epsilon after round 1 at the request's noise)."""
    fed, sites, _ = load_workspace(ws)
    site = next(s for s in sites if s.hospital_id == hospital)
    spent = PrivacyLedger.for_site(site).record(1.5, 0.2, 30, epsilon_cap=10.0, run_id="earlier", round=1)
    plan = RoundPlan.for_run(fed, prepare_run(RunSpec(fed, ws / "unused", None, tiny_dir)).prompt, round=1)
    first = PrivacyLedger.for_site(site).project_all(site_run(site, plan, count_units(site, plan)).releases(plan)[:1])
    cap = round(spent + 0.01, 3)
    _set_cap(site.source, cap)
    return spent, cap, first


@pytest.mark.simulation
def test_run_that_not_enough_sites_can_afford_never_starts_and_charges_nothing(tmp_path, tiny_dir, capsys):
    ws = make_workspace(tmp_path, tiny_dir, hospitals=3, per_hospital=40, overrides={**QUICK, "min_hospitals": 3})
    ensure_ledgers(ws)
    spent, cap, first = _little_left(ws, tiny_dir, "hospital-3")
    assert spent < cap < first  # some budget left, too little for this run
    before = _ledger_files(ws)
    out = tmp_path / "out"
    argv = ["simulate", "--workspace", str(ws), "--out", str(out), "--backbone", str(tiny_dir), "--engine", "local"]
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == ExitCode.NOTHING_TRAINED, captured.out[-3000:] + captured.err[-3000:]
    why = "pre-flight: only 2 of min_hospitals 3 sites can train the run: hospital-3: budget"
    assert f"did not train: {why}" in captured.err
    assert (
        "pre-flight for rounds 1-3 | 2 of 3 site(s) will train the run (min_hospitals 3) | not: hospital-3 (budget) | "
        "the run does not start: no site is charged"
    ) in captured.out
    assert _ledger_files(ws) == before  # no entry, no anchor move, no noise memo: nobody paid anything
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["outcome"], metrics["outcome_reason"], metrics["export"]) == (NOTHING_TRAINED, why, None)
    assert metrics["rounds"] == []  # not even round 0's evaluation went out
    assert metrics["preflight"] == {
        "round": 1,
        "min_hospitals": 3,
        "confirmed": 2,
        "hospitals": {
            "hospital-1": {"status": "ok", "reason": ""},
            "hospital-2": {"status": "ok", "reason": ""},
            "hospital-3": {"status": "refused", "reason": "budget"},
        },
    }
    assert not (out / "export").exists() and not (out / "checkpoint").exists()
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<h2>Pre-flight</h2>" in page and "2 of 3 hospitals confirmed" in page
    assert '<td class="name">hospital-3</td><td class="st-refused">refused</td><td class="reason">budget</td>' in page


def _flaky_app(site_paths: list[Path], flaky: str, in_round: int) -> ClientApp:
    """The real ClientApp, except that site `flaky` refuses round `in_round` (after confirming the run)."""
    honest = make_client_app(site_paths, torch_threads=1)
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = site_paths[int(context.node_config["partition-id"])].parent.name
        if site == flaky and int(msg.content[CONFIG]["fp.round"]) == in_round:
            return Message(content=refusal(site, "records"), reply_to=msg)
        return honest(msg, context)

    return app


@pytest.mark.simulation
def test_sites_that_decline_get_no_train_message_and_a_broken_promise_is_reported(tmp_path, tiny_dir):
    ws = make_workspace(tmp_path, tiny_dir, hospitals=4, per_hospital=40, overrides={**QUICK, "min_hospitals": 3})
    ensure_ledgers(ws)
    # hospital-4 spent its whole budget in an earlier run: not even one round fits under its cap
    site4 = ws / "hospital-4" / "site.yaml"
    spent = PrivacyLedger.open(ws / "hospital-4" / "ledger" / "privacy-ledger.json").record(
        1.0, 0.2, 30, epsilon_cap=10.0, run_id="earlier", round=1
    )
    _set_cap(site4, round(spent + 0.01, 3))
    ledger4 = {p: b for p, b in _ledger_files(ws).items() if p.is_relative_to(ws / "hospital-4")}
    fed, sites, test = load_workspace(ws)
    run = prepare_run(RunSpec(fed, tmp_path / "out", test, tiny_dir, expected_hospitals=4))
    run_local(make_server_app(run), _flaky_app(list_hospitals(ws), "hospital-2", in_round=2), 4)

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["outcome"] == TRAINED
    assert metrics["preflight"]["confirmed"] == 3
    assert {h: a["status"] for h, a in metrics["preflight"]["hospitals"].items()} == {
        "hospital-1": "ok",
        "hospital-2": "ok",
        "hospital-3": "ok",
        "hospital-4": "refused",
    }
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2, 3]
    for r in metrics["rounds"][1:]:  # hospital-4 is sent nothing: no refusal of its own in any round
        assert sorted(r["hospitals"]) == ["hospital-1", "hospital-2", "hospital-3"]
    assert "refused_after_preflight" not in metrics["rounds"][1]
    assert metrics["rounds"][2]["refused_after_preflight"] == {"hospital-2": "records"}
    assert metrics["rounds"][2]["aggregated"] is False  # 2 valid updates < min_hospitals 3
    assert {p: b for p, b in _ledger_files(ws).items() if p.is_relative_to(ws / "hospital-4")} == ledger4
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "refused after confirming in pre-flight: round 2: records" in page


def test_preflight_reply_is_the_status_record_alone_and_writes_nothing(tmp_path, tiny_dir):
    """Through the ClientApp's "query" handler: "ok", or a refusal's category; nothing else leaves
    (no count, no epsilon), and nothing is written at the site."""
    ws = make_workspace(tmp_path, tiny_dir, hospitals=1, per_hospital=20, overrides=QUICK)
    ensure_ledgers(ws)
    fed, sites, _ = load_workspace(ws)
    run = prepare_run(RunSpec(fed, tmp_path / "out", None, tiny_dir))
    plan = RoundPlan.for_run(fed, run.prompt, round=1)
    content = RecordDict({ARRAYS: state_to_arrays(run.state), CONFIG: plan.to_config_record()})
    app = make_client_app()
    node = {"site-config": str(sites[0].source)}
    ctx = Context(run_id=1, node_id=11, node_config=node, state=RecordDict(), run_config={})
    before = _ledger_files(ws)

    reply = app(_message("query", content), ctx)
    assert set(reply.content.keys()) == {STATUS}
    assert dict(reply.content[STATUS]) == {"hospital-id": "hospital-1", "status": "ok", "reason": ""}
    n_train = len((ws / "hospital-1" / "train.csv").read_text().splitlines()) - 1
    assert str(n_train).encode() not in wire_bytes(reply.content)

    # an earlier run spent the budget: the cap is now just above what it spent
    spent = PrivacyLedger.for_site(sites[0]).record(1.0, 0.2, 30, epsilon_cap=10.0, run_id="earlier", round=1)
    _set_cap(sites[0].source, round(spent + 0.01, 3))
    before = _ledger_files(ws)
    reply = app(_message("query", content), ctx)
    assert set(reply.content.keys()) == {STATUS}
    assert dict(reply.content[STATUS]) == {"hospital-id": "hospital-1", "status": "refused", "reason": "budget"}

    late = RecordDict({ARRAYS: content[ARRAYS], CONFIG: plan.replaced(round=plan.total_rounds + 1).to_config_record()})
    assert app(_message("query", late), ctx).content[STATUS]["reason"] == "configuration"
    assert _ledger_files(ws) == before


@pytest.mark.simulation
def test_malformed_preflight_answer_does_not_confirm(tmp_path, tiny_dir):
    """A reply carrying anything but the status record is rejected, and counts as a no."""
    ws = make_workspace(tmp_path, tiny_dir, hospitals=2, per_hospital=20, overrides={**QUICK, "min_hospitals": 2})
    ensure_ledgers(ws)
    honest = make_client_app(list_hospitals(ws), torch_threads=1)
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        reply = honest(msg, context)
        if context.node_config["partition-id"] == 1:
            reply.content[MetricRecord.__name__] = MetricRecord({"num-records": 20})
        return reply

    fed, _, test = load_workspace(ws)
    run = prepare_run(RunSpec(fed, tmp_path / "out", test, tiny_dir, expected_hospitals=2))
    run_local(make_server_app(run), app, 2)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["outcome"] == NOTHING_TRAINED and metrics["rounds"] == []
    answer = metrics["preflight"]["hospitals"]["hospital-2"]
    assert answer["status"] == "rejected" and "carries only 'fedprompt.status'" in answer["reason"]
    assert metrics["outcome_reason"].startswith("pre-flight: only 1 of min_hospitals 2 sites can train the run: ")


@pytest.mark.subprocess
def test_the_warm_worker_answers_the_preflight(tmp_path, tiny_dir):
    """A deployed daemon: its executor hands the "query" message to the warm worker (the same
    handler as the ClientApp), which answers with the status record alone and charges nothing."""
    ws = make_workspace(tmp_path, tiny_dir, hospitals=1, per_hospital=20, overrides=QUICK)
    ensure_ledgers(ws)
    fed, sites, _ = load_workspace(ws)
    run = prepare_run(RunSpec(fed, tmp_path / "out", None, tiny_dir))
    plan = RoundPlan.for_run(fed, run.prompt, round=1)
    content = RecordDict({ARRAYS: state_to_arrays(run.state), CONFIG: plan.to_config_record()})
    before = _ledger_files(ws)
    worker = WorkerHandle(sites[0].source, dict(os.environ))
    worker.start()
    executor = Executor("127.0.0.1:1", b"secret", sites[0].source, "hospital-1", frozenset(), worker)
    try:
        worker.wait_ready(time.monotonic() + 300)
        reply, _ = executor._answer(_message("query", content), _bundle(tmp_path / "app"), "query")
    finally:
        worker.stop()
    assert set(reply.keys()) == {STATUS}
    assert dict(reply[STATUS]) == {"hospital-id": "hospital-1", "status": "ok", "reason": ""}
    assert _ledger_files(ws) == before
