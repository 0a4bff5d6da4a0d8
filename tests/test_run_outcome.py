"""A run in which no hospital trained, or in which most rounds did not aggregate, must not pass for a
finished one (server/outcome.py).

Every hospital refuses (its privacy budget is spent): no export, metrics.json and the report say
why, and `fedprompt simulate` / `fedprompt aggregator run` exit with ExitCode.NOTHING_TRAINED (5).
Most rounds failed, or a resumed run's new rounds accepted nothing: ExitCode.PARTLY_TRAINED (6),
with the export of the last model that aggregated. Every exit status in the CLI's help is the one
common/exit_codes.py defines.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import edit_yaml, make_workspace

from fedprompt.cli import main
from fedprompt.client.ledger import PrivacyLedger
from fedprompt.client.workspace import list_hospitals
from fedprompt.common.exit_codes import ExitCode
from fedprompt.server.outcome import NOTHING_TRAINED, PARTLY_TRAINED, TRAINED, exit_code, run_outcome
from fedprompt.simulation import ensure_ledgers


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


def test_a_run_trained_in_half_its_rounds_is_trained():
    refused = _site("refused", "budget")
    # round 1 trained, round 2 was refused: half of the rounds aggregated
    assert run_outcome([_round(0), _round(1, h1=_site("ok"), h2=refused), _round(2, h1=refused, h2=refused)]) == (
        TRAINED,
        None,
    )


def test_a_run_whose_most_rounds_did_not_aggregate_is_partly_trained():
    """The issue's run: the hospitals' processes died after round 1 and every later round failed. It
    has a model (round 1's) but must not pass for a finished run."""
    died = _site("failed", "error reply: <class 'ray.exceptions.ActorDiedError'>:<'The actor died'>")
    history = [_round(0), _round(1, h1=_site("ok"), h2=_site("ok"))] + [_round(r, h1=died, h2=died) for r in (2, 3)]
    assert run_outcome(history) == (
        PARTLY_TRAINED,
        "only 1 of 3 training round(s) aggregated; rounds 2, 3 did not (failed 4); the model is that of round 1",
    )
    assert exit_code(PARTLY_TRAINED) == ExitCode.PARTLY_TRAINED == 6


def test_a_resumed_run_is_judged_on_its_new_rounds():
    """A resumed run whose new round accepted nothing (all refused) is partly trained, although most
    rounds of its whole history aggregated; a resumed run the pre-flight stopped is too."""
    ok, refused = _site("ok"), _site("refused", "budget")
    history = [_round(0), _round(1, h1=ok, h2=ok), _round(2, h1=ok, h2=ok), _round(3, h1=refused, h2=refused)]
    assert run_outcome(history) == (TRAINED, None)  # judged as one invocation: 2 of 3
    assert run_outcome(history, first_round=3) == (
        PARTLY_TRAINED,
        "only 0 of 1 training round(s) since round 3 aggregated; round 3 did not (refused 2 (budget 2)); the model "
        "is that of round 2",
    )
    stopped = "pre-flight: only 0 of min_hospitals 2 sites can train the run: h1: budget, h2: budget"
    assert run_outcome(history[:3], stopped, first_round=3) == (
        PARTLY_TRAINED,
        f"{stopped}; no new round ran, the model is that of round 2",
    )
    # nothing ever aggregated: still "no hospital trained", whatever this invocation did
    assert run_outcome([_round(0)], stopped, first_round=1) == (NOTHING_TRAINED, stopped)


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
def nothing_trained(tmp_path_factory, tiny_dir):
    """`fedprompt simulate` (tiny BERT, 2 hospitals, 2 rounds) where both hospitals' budgets are spent."""
    root = tmp_path_factory.mktemp("spent")
    overrides = {"rounds": 2, "model": {"n_virtual_tokens": 4, "max_length": 32}}
    ws = make_workspace(
        root,
        tiny_dir,
        hospitals=2,
        per_hospital=30,
        test_size=20,
        overrides=overrides,
        cap=8.0,
        allow_non_private=False,
        name="spent",
    )
    ensure_ledgers(ws)
    ledgers = {}
    for site in list_hospitals(ws):
        ledger_path = ws / site.parent.name / "ledger" / "privacy-ledger.json"
        # An earlier run spent the budget; the site's cap is now what it spent: any round is refused.
        spent = PrivacyLedger.open(ledger_path).record(1.0, 0.2, 30, epsilon_cap=10.0, run_id="earlier", round=1)
        cap = round(spent + 0.01, 3)
        edit_yaml(site, lambda d, cap=cap: d["privacy"].update(max_epsilon=cap))
        ledgers[ledger_path] = ledger_path.read_bytes()
    return root, ws, tiny_dir, ledgers


@pytest.mark.simulation
def test_simulate_with_every_budget_spent_writes_why_and_no_export(nothing_trained, monkeypatch, capsys):
    from fedprompt import simulation as sim

    root, ws, tiny, ledgers = nothing_trained
    out = root / "out"
    returned, real = [], sim.simulate

    def recording(*args, **kwargs):
        returned.append(real(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(sim, "simulate", recording)  # the command imports it when it runs
    # the in-process engine: the pre-flight and the outcome are the ServerApp's, on either engine
    rc = main(["simulate", "--workspace", str(ws), "--out", str(out), "--backbone", str(tiny), "--engine", "local"])
    captured = capsys.readouterr()
    assert rc == ExitCode.NOTHING_TRAINED, captured.out[-3000:] + captured.err[-3000:]
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


@pytest.mark.simulation  # reads the metrics.json the simulation above wrote
@pytest.mark.parametrize("outcome", [NOTHING_TRAINED, PARTLY_TRAINED, TRAINED])
def test_aggregator_run_exit_status_follows_the_outcome(nothing_trained, outcome, tmp_path, monkeypatch, capsys):
    """`aggregator run` against a stand-in `flwr`: the SuperLink reports the run completed and the
    ServerApp has written metrics.json (that of the simulated run above, a partly trained or a trained one)."""
    from fedprompt.commands.aggregator import packaged_app
    from fedprompt.server import deploy

    root, ws, _, _ = nothing_trained
    done = json.loads((root / "out" / "metrics.json").read_text())
    why = "only 1 of 3 training round(s) aggregated; rounds 2, 3 did not (failed 4); the model is that of round 1"
    if outcome != NOTHING_TRAINED:
        done.update(outcome=outcome, outcome_reason=None, export=str(tmp_path / "out" / "export"))
    if outcome == PARTLY_TRAINED:
        done.update(outcome_reason=why)
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
    assert rc == exit_code(outcome) == {TRAINED: 0, NOTHING_TRAINED: 5, PARTLY_TRAINED: 6}[outcome]
    assert ("run finished" in captured.out) == (outcome == TRAINED)
    if outcome == NOTHING_TRAINED:
        assert f"run 7 ended without training: {done['outcome_reason']}; no export written" in captured.err
    if outcome == PARTLY_TRAINED:
        assert f"run 7 PARTLY TRAINED: {why} (exported to {out / 'export'}" in captured.err


def _exit_rows(help_text: str) -> dict[int, str]:
    """code -> meaning, from the "exit status:" block of a --help text."""
    block = help_text.split("exit status:\n", 1)[1]
    return {int(code): meaning for code, meaning in re.findall(r"^ +(\d+)  (.+)$", block, re.MULTILINE)}


@pytest.mark.parametrize(
    ("command", "codes"),
    [
        ([], set(ExitCode)),  # `fedprompt --help`: every code
        (["simulate"], {0, 1, 2, 3, 5, 6, 130}),
        (["aggregator", "run"], {0, 1, 2, 5, 6, 130}),
        (["privacy", "verify"], {0, 2, 3}),
        (["audit"], {0, 2, 4}),
    ],
)
def test_help_lists_the_exit_codes_the_enum_defines(command, codes, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    rows = _exit_rows(capsys.readouterr().out)
    assert rows == {int(code): ExitCode(code).meaning for code in codes}


def test_exit_codes_keep_their_numbers():
    """Scripts branch on the numbers: each is distinct, and the published ones never move."""
    assert len({c.meaning for c in ExitCode}) == len(ExitCode)
    assert [(c.name, int(c)) for c in ExitCode] == [
        ("OK", 0),
        ("FAILED", 1),
        ("BAD_INPUT", 2),
        ("LEDGER", 3),
        ("AUDIT_FAILED", 4),
        ("NOTHING_TRAINED", 5),
        ("PARTLY_TRAINED", 6),
        ("INTERRUPTED", 130),
    ]
