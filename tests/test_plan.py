"""`fedprompt plan`: each hospital's q, steps, sigma and projected epsilon before a run, computed by
the functions a round uses. What it plans is what a real train_round then records in the ledger;
the sites it says refuse do refuse; bad input exits 2 with file and line."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import edit_yaml, make_workspace
from flwr.app import RecordDict

from fedprompt.cli import main
from fedprompt.client.hospital import train_round
from fedprompt.client.ledger import PrivacyLedger
from fedprompt.client.workspace import list_hospitals, load_workspace
from fedprompt.common.config import SiteConfig
from fedprompt.common.plan import RoundPlan
from fedprompt.common.wire import ARRAYS, STATUS, state_to_arrays
from fedprompt.server.federation import RunSpec, prepare_run
from fedprompt.simulation import ensure_ledgers

PATIENTS = 5


def _workspace(root, tiny_dir, **training):
    """Two hospitals on the tiny BERT, ledgers created. hospital-1 has a noise floor above its
    calibrated sigma; hospital-2 accounts patients (PATIENTS of them), not records."""
    overrides = {
        "rounds": 3,
        "model": {"n_virtual_tokens": 2, "max_length": 16},
        "training": {"batch_size": 4, **training},
    }
    ws = make_workspace(
        root,
        tiny_dir,
        hospitals=2,
        per_hospital=24,
        test_size=10,
        overrides=overrides,
        allow_non_private=False,
        name="plan",
        seed=3,
    )
    one, two = list_hospitals(ws)
    edit_yaml(one, lambda d: d["privacy"].update(min_noise_multiplier=2.0))
    edit_yaml(two, lambda d: d.update(patient_field="patient", privacy={**d["privacy"], "delta": 1e-3}))
    train = two.parent / "train.csv"
    rows = list(csv.reader(train.open(newline="")))
    with train.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(rows[0] + ["patient"])
        w.writerows(row + [f"p{i % PATIENTS}"] for i, row in enumerate(rows[1:]))
    ensure_ledgers(ws)
    return ws


def _plan(capsys, ws, tiny_dir, *extra) -> dict:
    assert main(["plan", "--workspace", str(ws), "--backbone", str(tiny_dir), "--json", *extra]) == 0
    return {row["hospital_id"]: row for row in json.loads(capsys.readouterr().out)["hospitals"]}


def _round_1(ws, tiny_dir, tmp_path) -> dict[str, str]:
    """Each site's status after a real train_round of round 1 of the workspace's run."""
    fed, _, _ = load_workspace(ws)
    run = prepare_run(RunSpec(fed, tmp_path / "out", None, tiny_dir))
    plan = RoundPlan.for_run(run.spec.federation, run.prompt, round=1)
    content = {ARRAYS: state_to_arrays(run.state), "config": plan.to_config_record()}
    return {site.parent.name: train_round(RecordDict(content), site)[STATUS]["status"] for site in list_hospitals(ws)}


def test_the_plan_is_what_a_round_records(tmp_path, tiny_dir, capsys):
    ws = _workspace(tmp_path, tiny_dir)
    planned = _plan(capsys, ws, tiny_dir)
    one, two = planned["hospital-1"], planned["hospital-2"]
    assert (one["dp_unit"], one["units"]) == ("record", 20) and (two["dp_unit"], two["units"]) == ("patient", PATIENTS)
    assert one["noise_multiplier"] == 2.0  # the site's floor, above what calibration gives
    for row in planned.values():
        assert row["refusal"] is None and row["epsilon_spent"] == 0.0 and row["epsilon_remaining"] == 10.0
        assert 0 < row["epsilon_after_run"] <= row["epsilon_cap"]
    assert main(["plan", "--workspace", str(ws), "--backbone", str(tiny_dir)]) == 0
    table = capsys.readouterr().out
    assert "hospital-2" in table and f"{PATIENTS} patients" in table and "trains" in table

    assert _round_1(ws, tiny_dir, tmp_path) == {"hospital-1": "ok", "hospital-2": "ok"}
    for site in list_hospitals(ws):
        row = planned[site.parent.name]
        ledger = PrivacyLedger.for_site(SiteConfig.load(site))
        entry = ledger.history[-1]
        # round 1 is the one-shot class-sums release (q 1, one step)
        assert (entry.noise_multiplier, entry.sample_rate, entry.steps) == (row["class_sums_noise_multiplier"], 1.0, 1)
        assert ledger.delta == row["delta"] and row["noise_ratio"] <= 4.0
        # The whole run is the plan's projection: this round's entry, then the DP-SGD rounds.
        sgd = (row["noise_multiplier"], row["sample_rate"], row["steps_per_round"])
        assert ledger.project_all([sgd, sgd]) == pytest.approx(row["epsilon_after_run"])


def test_the_sites_the_plan_says_refuse_do_refuse(tmp_path, tiny_dir, capsys):
    ws = _workspace(tmp_path, tiny_dir)
    one, two = list_hospitals(ws)
    earlier = PrivacyLedger.for_site(SiteConfig.load(one))
    earlier.record(0.5, 0.5, 400, epsilon_cap=1e6, run_id="earlier", round=1)  # an earlier run spent past the cap of 10
    planned = _plan(capsys, ws, tiny_dir)
    row = planned["hospital-1"]
    assert row["refusal"]["category"] == "budget" and "leaves too little of this site's cap" in row["refusal"]["reason"]
    assert row["epsilon_spent"] > 10 and row["epsilon_remaining"] == 0.0
    assert planned["hospital-2"]["refusal"] is None
    assert _round_1(ws, tiny_dir, tmp_path) == {"hospital-1": "refused", "hospital-2": "ok"}

    # A non-private run: refused where allow_non_private is false, infinite epsilon where it is true.
    edit_yaml(two, lambda d: d.update(allow_non_private=True))
    planned = _plan(capsys, ws, tiny_dir, "--non-private")
    assert planned["hospital-1"]["refusal"]["category"] == "non-private refused"
    assert planned["hospital-2"]["refusal"] is None and planned["hospital-2"]["epsilon_after_run"] == "inf"
    assert planned["hospital-2"]["noise_multiplier"] is None


def test_patient_level_dp_trains_a_late_prompt_and_refuses_an_input_prompt(tmp_path, tiny_dir, capsys):
    ws = _workspace(tmp_path, tiny_dir, train_prompt=True)  # model.prompt_layer null: before the last layer
    planned = _plan(capsys, ws, tiny_dir)
    assert planned["hospital-1"]["refusal"] is None and planned["hospital-2"]["refusal"] is None
    edit_yaml(ws / "federation.yaml", lambda d: d["model"].update(prompt_layer=0))
    planned = _plan(capsys, ws, tiny_dir)
    assert planned["hospital-1"]["refusal"] is None
    assert planned["hospital-2"]["refusal"]["category"] == "configuration"
    assert "patient-level DP with a trained prompt needs a late prompt" in planned["hospital-2"]["refusal"]["reason"]


def test_the_plan_says_whether_the_run_trains_the_prompt_and_why(tmp_path, tiny_dir, capsys):
    ws = _workspace(tmp_path, tiny_dir)  # train_prompt: auto (the default), 3 rounds at epsilon 8
    assert main(["plan", "--workspace", str(ws), "--backbone", str(tiny_dir)]) == 0
    text = capsys.readouterr().out
    assert "no prompt: a prompt step is worth its noise at sigma <=" in text and "above the" in text
    main(["plan", "--workspace", str(ws), "--backbone", str(tiny_dir), "--json", "--non-private"])  # sites refuse it
    report = json.loads(capsys.readouterr().out)
    assert report["train_prompt"] is False and report["train_prompt_why"].startswith("a non-private run")
    main(["plan", "--workspace", str(ws), "--backbone", str(tiny_dir), "--json", "--rounds", "1"])
    report = json.loads(capsys.readouterr().out)
    assert report["train_prompt"] is False and "no DP-SGD round" in report["train_prompt_why"]


def test_bad_input_exits_2_with_file_and_line(tmp_path, tiny_dir, capsys):
    ws = _workspace(tmp_path, tiny_dir)
    train = list_hospitals(ws)[0].parent / "train.csv"
    lines = len(train.read_text().splitlines())
    with train.open("a") as f:
        f.write('"a note",not-a-label\n')
    assert main(["plan", "--workspace", str(ws), "--backbone", str(tiny_dir)]) == 2
    captured = capsys.readouterr()
    assert f"{train}:{lines + 1}: label: unknown label 'not-a-label'" in captured.err and captured.out == ""
    assert main(["plan", "--workspace", str(tmp_path / "nowhere"), "--backbone", str(tiny_dir)]) == 2
