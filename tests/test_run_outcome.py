"""A run in which no hospital trained must not pass for a finished one (server/outcome.py).

Every hospital refuses (its privacy budget is spent): no export, metrics.json and the report say
why, and `fedprompt simulate` / `fedprompt aggregator run` exit with EXIT_NOTHING_TRAINED (5).
A run in which one hospital trained once stays a success.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from fedprompt.cli import main
from fedprompt.client.demo_data import generate_demo
from fedprompt.client.ledger import PrivacyLedger
from fedprompt.client.workspace import list_hospitals, write_workspace
from fedprompt.server.outcome import EXIT_NOTHING_TRAINED, NOTHING_TRAINED, TRAINED, run_outcome
from fedprompt.simulation import ensure_ledgers

from tinybert import make_tiny_backbone


def _site(status: str, reason: str = "") -> dict:
    return {
        "status": status,
        "reason": reason,
        "weight": 1.0 if status == "ok" else 0.0,
        "epsilon_spent": None,
        "epsilon_cap": None,
        "upload_bytes": 0,
    }


def _round(r: int, **hospitals: dict) -> dict:
    return {"round": r, "hospitals": hospitals}


def test_outcome_tallies_why_nothing_trained():
    history = [
        _round(0),  # the zero-shot start: evaluated, never trained
        _round(
            1, h1=_site("refused", "budget"), h2=_site("refused", "non-private refused"), h3=_site("failed", "no reply")
        ),
        _round(
            2, h1=_site("refused", "budget"), h2=_site("rejected", "non-finite values"), h3=_site("refused", "budget")
        ),
    ]
    assert run_outcome(history) == (
        NOTHING_TRAINED,
        "no hospital's update was accepted in 2 training round(s): failed 1; refused 4 (budget 3, non-private "
        "refused 1); rejected 1",
    )
    assert run_outcome([_round(0)]) == (NOTHING_TRAINED, "no training round ran")


def test_one_accepted_update_in_any_round_is_a_trained_run():
    refused = _site("refused", "budget")
    # a resumed run: round 1 (before the restart) trained, every later round was refused
    assert run_outcome([_round(0), _round(1, h1=_site("ok"), h2=refused), _round(2, h1=refused, h2=refused)]) == (
        TRAINED,
        None,
    )


def test_accepted_updates_below_min_hospitals_did_not_train():
    """An accepted update in a round that had fewer than min_hospitals of them left the model as it
    was (the strategy records `aggregated: false`): not a trained run."""
    lone = _round(1, h1=_site("ok"), h2=_site("refused", "budget"))
    assert run_outcome([_round(0), {**lone, "aggregated": False}]) == (
        NOTHING_TRAINED,
        "fewer valid updates than min_hospitals in every one of 1 training round(s): the global model never changed",
    )
    assert run_outcome([_round(0), {**lone, "aggregated": True}]) == (TRAINED, None)


# --- the whole path, every hospital's budget spent --------------------------------------------------


@pytest.fixture(scope="module")
def nothing_trained(tmp_path_factory):
    """`fedprompt simulate` (tiny BERT, 2 hospitals, 2 rounds) where both hospitals' budgets are spent."""
    root = tmp_path_factory.mktemp("spent")
    tiny = make_tiny_backbone(root / "tinybert", hidden=32, layers=2)
    demo = generate_demo(hospitals=2, per_hospital=30, test_size=20, seed=1)
    ws = write_workspace(
        root / "ws",
        name="spent",
        labels=demo.labels,
        hospitals=demo.hospitals,
        test_rows=demo.test,
        federation_overrides={"rounds": 2, "model": {"n_virtual_tokens": 4, "max_length": 32}},
    )
    ensure_ledgers(ws)
    ledgers = {}
    for site in list_hospitals(ws):
        doc = yaml.safe_load(site.read_text())
        doc["backbone"] = str(tiny)
        ledger_path = ws / site.parent.name / "ledger" / "privacy-ledger.json"
        # An earlier run spent the budget; the site's cap is now what it spent: any round is refused.
        spent = PrivacyLedger.open(ledger_path).record(1.0, 0.2, 30, epsilon_cap=10.0, run_id="earlier", round=1)
        doc["privacy"]["max_epsilon"] = round(spent + 0.01, 3)
        site.write_text(yaml.safe_dump(doc, sort_keys=False))
        ledgers[ledger_path] = ledger_path.read_bytes()
    return root, ws, tiny, ledgers


def test_simulate_with_every_budget_spent_writes_why_and_no_export(nothing_trained, monkeypatch, capsys):
    from fedprompt import simulation as sim

    root, ws, tiny, ledgers = nothing_trained
    out = root / "out"
    returned, real = [], sim.simulate

    def recording(*args, **kwargs):
        returned.append(real(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(sim, "simulate", recording)  # the command imports it when it runs
    rc = main(["simulate", "--workspace", str(ws), "--out", str(out), "--backbone", str(tiny)])
    captured = capsys.readouterr()
    assert rc == EXIT_NOTHING_TRAINED, captured.out[-3000:] + captured.err[-3000:]
    # Both sites refuse the run in its pre-flight (server/federation.py): it never starts.
    why = "pre-flight: only 0 of min_hospitals 2 sites can train the run: hospital-1: budget, hospital-2: budget"
    assert f"did not train: {why}" in captured.err and "run 'spent' finished" not in captured.out
    metrics = json.loads((out / "metrics.json").read_text())
    assert returned == [metrics]  # simulate() returns the outcome it wrote
    assert (metrics["outcome"], metrics["outcome_reason"], metrics["export"]) == (NOTHING_TRAINED, why, None)
    assert metrics["rounds"] == []
    assert {h: (a["status"], a["reason"]) for h, a in metrics["preflight"]["hospitals"].items()} == {
        "hospital-1": ("refused", "budget"),
        "hospital-2": ("refused", "budget"),
    }
    assert not (out / "export").exists() and not (out / "comparison.json").exists()
    page = (out / "report.html").read_text(encoding="utf-8")
    assert (
        f'<div class="banner" role="alert">{NOTHING_TRAINED}: {why.replace(chr(39), "&#39;")}. No model was '
        "exported.</div>" in page
    )
    assert "No export was written for this run." in page
    assert all(path.read_bytes() == before for path, before in ledgers.items())  # refused before spending anything


@pytest.mark.parametrize("outcome", [NOTHING_TRAINED, TRAINED])
def test_aggregator_run_exit_status_follows_the_outcome(nothing_trained, outcome, tmp_path, monkeypatch, capsys):
    """`aggregator run` against a stand-in `flwr`: the SuperLink reports the run completed and the
    ServerApp has written metrics.json (that of the simulated run above, or a trained one)."""
    from fedprompt.commands.aggregator import packaged_app
    from fedprompt.server import deploy

    root, ws, _, _ = nothing_trained
    done = json.loads((root / "out" / "metrics.json").read_text())
    if outcome == TRAINED:
        done.update(outcome=TRAINED, outcome_reason=None, export=str(tmp_path / "out" / "export"))
    state, out = tmp_path / "state", tmp_path / "out"
    deploy.write_connection(state, "127.0.0.1:9", tmp_path / "ca.pem")
    submitted: list[tuple[str, ...]] = []

    def flwr_cli(_state: Path, *argv: str, **_kw) -> subprocess.CompletedProcess:
        submitted.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout='{"success": true, "run-id": "7"}')

    def follow_run(_state: Path, run_id: int, **_kw) -> str:
        out.mkdir()
        (out / "metrics.json").write_text(json.dumps(done))
        return "finished:completed"

    monkeypatch.delenv("FEDPROMPT_APP", raising=False)
    monkeypatch.setattr(deploy, "flwr_cli", flwr_cli)
    monkeypatch.setattr(deploy, "follow_run", follow_run)
    rc = main(["aggregator", "run", "--state", str(state), "--workspace", str(ws), "--out", str(out)])
    captured = capsys.readouterr()
    assert submitted[0][:2] == ("run", str(packaged_app()))  # the code-free app, by default
    if outcome == TRAINED:
        assert rc == 0 and "run finished" in captured.out
    else:
        assert rc == EXIT_NOTHING_TRAINED and "run finished" not in captured.out
        assert f"run 7 ended without training: {done['outcome_reason']}; no export written" in captured.err


@pytest.mark.parametrize("command", [["aggregator", "run"], ["simulate"]])
def test_help_documents_the_exit_status(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    assert "5  " in capsys.readouterr().out.split("exit status:")[1]
