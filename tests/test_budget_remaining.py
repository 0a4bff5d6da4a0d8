"""Calibration on what is left (client/hospital.site_run, common/schedule.calibrate_run and
fit_to_budget): a site's noise covers the run's rounds, its noised evaluations and a retried round
(site.yaml privacy.retry_margin) within the run's epsilon, and is raised to fit what the ledger
leaves of the cap after earlier runs. Real train_round on a real site (tiny BERT), real ledger."""

from __future__ import annotations

import logging
from pathlib import Path

from conftest import edit_yaml, make_workspace
from flwr.app import RecordDict

from fedprompt.client.hospital import train_round
from fedprompt.client.ledger import PrivacyLedger
from fedprompt.client.workspace import list_hospitals, load_workspace
from fedprompt.common.config import SiteConfig
from fedprompt.common.plan import RoundPlan
from fedprompt.common.wire import ARRAYS, EVALUATION, STATUS, state_to_arrays
from fedprompt.server.federation import RunSpec, prepare_run
from fedprompt.simulation import ensure_ledgers

ROUNDS = 5  # the class-sums release, then 4 DP-SGD rounds
CAP = 4.0  # the run's target and the lifetime cap: nothing to spare


def _site(tmp_path: Path, tiny: Path):
    """(prepared run, site.yaml) of one hospital sharing noised evaluations, cap = the run's target."""
    overrides = {
        "rounds": ROUNDS,
        "model": {"n_virtual_tokens": 2, "max_length": 16},
        "training": {"lr": 0.05},
        "privacy": {"target_epsilon": CAP},
    }
    # rdp: PRV's calibrations cost seconds each on a shared host
    ws = make_workspace(
        tmp_path,
        tiny,
        hospitals=1,
        per_hospital=40,
        test_size=10,
        overrides=overrides,
        cap=CAP,
        allow_non_private=False,
        accountant="rdp",
    )
    site_yaml = list_hospitals(ws)[0]
    edit_yaml(site_yaml, lambda d: d.update(share_evaluation="noised", evaluation_epsilon=0.2))
    ensure_ledgers(ws)
    fed, _, _ = load_workspace(ws)
    return prepare_run(RunSpec(fed, tmp_path / "out", None, tiny)), site_yaml


def _train(run, site_yaml: Path, r: int) -> RecordDict:
    plan = RoundPlan.for_run(run.spec.federation, run.prompt, round=r)
    return train_round(RecordDict({ARRAYS: state_to_arrays(run.state), "config": plan.to_config_record()}), site_yaml)


def _run_all(run, site_yaml: Path, rounds: list[int], caplog) -> list[str]:
    statuses = []
    with caplog.at_level(logging.WARNING, logger="fedprompt.hospital"):
        for r in rounds:
            reply = _train(run, site_yaml, r)
            statuses.append(reply[STATUS]["status"])
            if reply[STATUS]["status"] == "ok":
                assert EVALUATION in reply  # the noised counts went out, charged
    return statuses


def test_a_retried_round_and_noised_evaluations_fit_within_the_cap(tmp_path, tiny_dir, caplog):
    run, site_yaml = _site(tmp_path, tiny_dir)
    rounds = [1, 2, 3, 3, 4, 5]  # round 3 is sent twice (the aggregator retried it): charged twice
    assert _run_all(run, site_yaml, rounds, caplog) == ["ok"] * len(rounds), caplog.text
    ledger = PrivacyLedger.for_site(SiteConfig.load(site_yaml))
    trained = [e for e in ledger.history if not e.run_id.endswith("/evaluation")]
    assert [e.round for e in trained] == rounds
    assert sum(e.run_id.endswith("/evaluation") for e in ledger.history) == len(rounds)
    spent = ledger.epsilon_spent()
    assert CAP - 0.5 < spent <= CAP  # every round trained, the budget used and not crossed


def test_the_run_is_calibrated_on_what_earlier_runs_left(tmp_path, tiny_dir, caplog):
    run, site_yaml = _site(tmp_path, tiny_dir)
    site = SiteConfig.load(site_yaml)
    earlier = PrivacyLedger.for_site(site).record(3.0, 1.0, 1, epsilon_cap=CAP, run_id="earlier", round=1)
    assert 1.0 < earlier < CAP - 1.0
    assert _run_all(run, site_yaml, list(range(1, ROUNDS + 1)), caplog) == ["ok"] * ROUNDS, caplog.text
    spent = PrivacyLedger.for_site(site).epsilon_spent()
    assert earlier < spent <= CAP

    # What is left after that cannot hold a useful run: refused before anything is charged.
    before = site.ledger.read_bytes()
    caplog.clear()
    assert _run_all(run, site_yaml, [1], caplog) == ["refused"]
    assert "leaves too little of this site's cap" in caplog.text
    assert site.ledger.read_bytes() == before
