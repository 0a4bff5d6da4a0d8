"""`fedprompt audit`: the one-run privacy audit (Steinke, Nasr & Jagielski 2023) at a hospital, its
runs through the site's own train_round on a throwaway copy (tiny random BERT, synthetic records,
CPU; seeded canaries here, OS entropy in the product; the noise from the CSPRNG as at a site)."""

from __future__ import annotations

import json
import math
import random
import tempfile
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import yaml

from fedprompt.client import audit
from fedprompt.client.audit import (
    LOW_NOISE,
    NO_DP,
    PRIVATE,
    canary_scores,
    count_correct,
    epsilon_lower_bound,
    make_canaries,
    prepare_site,
    run_audit,
)
from fedprompt.client.workspace import write_workspace
from fedprompt.common.schedule import sgd_rounds

from site_isolation import watched
from tinybert import TOY_KEYWORDS, TOY_LABELS, TOY_NEUTRAL

LABELS, KEYWORDS, NEUTRAL = TOY_LABELS, TOY_KEYWORDS, TOY_NEUTRAL
HIDDEN = 128  # room for 83 canaries next to 3 labels (canary_capacity)


# --- the bound ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("r", "expected"), [(20, 1.8), (50, 2.8), (100, 3.5)])
def test_ceiling_all_guesses_right_matches_the_paper(r, expected):
    # The paper's ceilings at 95% with delta 1e-5 (notes/dp-soft-prompt.md), with m = r or m = 1000.
    assert round(epsilon_lower_bound(r, r, r, 1e-5), 1) == expected
    assert round(epsilon_lower_bound(1000, r, r, 1e-5), 1) == expected


@pytest.mark.parametrize("r", [20, 50, 100, 1000])
def test_all_right_without_delta_is_the_closed_form(r):
    # delta 0, v = r: p(eps) = q^r, so q = beta^(1/r) and eps = log(q / (1 - q)).
    q = 0.05 ** (1 / r)
    assert epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-9)


def test_hand_computed_case_with_delta():
    # m 100, r 10, v 10, delta 1e-3: p(eps) = q^10 + 200e-3 * max_i (P[B >= 10 - i] - q^10) / i.
    from scipy.stats import binom

    eps = epsilon_lower_bound(100, 10, 10, 1e-3)

    def p(e):
        q = 1 / (1 + math.exp(-e))
        tail = [binom.sf(10 - i - 1, 10, q) for i in range(1, 11)]
        return q**10 + 0.2 * max((t - q**10) / i for i, t in enumerate(tail, 1))

    assert p(eps) <= 0.05 < p(eps + 1e-6)
    assert 0.5 < eps < epsilon_lower_bound(100, 10, 10, 0.0)


def test_chance_level_gives_zero_and_the_bound_grows_with_v():
    assert epsilon_lower_bound(100, 100, 50, 1e-5) == 0.0
    assert epsilon_lower_bound(100, 100, 55, 1e-5) < 0.1
    assert epsilon_lower_bound(100, 100, 0, 1e-5) == 0.0
    bounds = [epsilon_lower_bound(1000, 100, v, 1e-5) for v in range(50, 101)]
    assert all(a <= b for a, b in pairwise(bounds))
    assert bounds[-1] > bounds[-2] > bounds[-10] > 0
    # more canaries for the same guesses widen the delta term: a lower bound
    assert epsilon_lower_bound(5000, 100, 100, 1e-5) < epsilon_lower_bound(100, 100, 100, 1e-5)
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 20, 5, 1e-5)


def test_guessing_counts_the_top_and_bottom():
    scores = torch.tensor([5.0, -1.0, 3.0, 0.0, -4.0, 2.0])
    included = torch.tensor([True, False, False, True, False, True])
    assert count_correct(scores, included, 2) == (4, 3)  # top {0: in, 2: out}, bottom {4: out, 1: out}


def test_canaries_are_orthonormal_quiet_and_uniform_under_the_initial_head():
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(64, 64, generator=gen))[0]
    # records in 8 dims
    feats = torch.nn.functional.normalize(torch.randn(300, 8, generator=gen) @ basis[:, :8].T, dim=-1)
    head = torch.randn(3, 64, generator=gen)
    c = make_canaries(feats, head, 40, gen)
    assert torch.allclose(c.directions @ c.directions.T, torch.eye(40), atol=1e-5)
    assert (head @ c.directions.T).abs().max() < 1e-4  # the initial head is uniform on every canary
    assert c.record_energy < 1e-6 and (feats @ c.directions.T).abs().max() < 1e-4
    assert torch.allclose(c.features.norm(dim=1), torch.full((40,), audit.CANARY_NORM))
    # a head update made of exactly one canary's gradient direction scores on that canary alone
    i = 7
    u = (torch.nn.functional.one_hot(c.labels[i], 3).float() - 1 / 3)[:, None] * c.directions[i][None, :]
    s = canary_scores(u, c)
    assert s[i] == pytest.approx(float(u.norm()), rel=1e-5) and s.abs().sort().values[-2] < 1e-5


# --- a tiny site -----------------------------------------------------------------------------------
def notes(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        y = rng.randrange(len(LABELS))
        words = rng.choices(KEYWORDS[y], k=3) + rng.choices(NEUTRAL, k=4)
        rng.shuffle(words)
        out.append((" ".join(words), LABELS[y]))
    return out


EPSILON = 2.0  # the tests' target: a private bound far enough below the controls' ceiling (2.32 at m 80)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_backbone) -> Path:
    """root/ws, on a tiny BERT of hidden size HIDDEN: federation.yaml (max_length 32: the tiny BERT has 256
    positions; 5 rounds of DP-SGD, no class-sums release: the shortest run a site's limits admit) and
    hospital-1 (200 train records, 30 validation)."""
    root = tmp_path_factory.mktemp("audit").resolve()
    rng = random.Random(0)
    write_workspace(
        root / "ws",
        name="t",
        labels=LABELS,
        hospitals={"1": (notes(rng, 200), notes(rng, 30))},
        federation_overrides={
            "rounds": 5,
            "model": {"max_length": 32},
            "training": {"class_sums_share": 0.0, "train_prompt": False},
        },
        backbone=tiny_backbone(hidden=HIDDEN),
    )
    return root


def _variant(world: Path, name: str, **changes) -> Path:
    """A copy of hospital-1's site.yaml (same records) with `changes`; its ledger not created."""
    site = world / "ws" / "hospital-1"
    folder = world / name
    folder.mkdir(exist_ok=True)
    data = yaml.safe_load((site / "site.yaml").read_text())
    data.update(
        {
            "train": str(site / data["train"]),
            "validation": str(site / data["validation"]),
            "ledger": str(folder / "ledger.json"),
            **changes,
        }
    )
    (folder / "site.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder / "site.yaml"


@pytest.fixture(scope="module")
def inputs(world):
    return prepare_site(
        world / "ws" / "hospital-1" / "site.yaml", federation_path=world / "ws" / "federation.yaml", epsilon=EPSILON
    )


@pytest.fixture(scope="module")
def report(inputs):
    """The whole audit, every run, on the tiny site."""
    return run_audit(inputs, seed=0)


def test_prepare_takes_the_sites_plan_and_records(inputs):
    plan = inputs.plan
    assert (plan.total_rounds, sgd_rounds(plan), plan.local_epochs, plan.lr, plan.optimizer) == (5, 5, 1, 8.0, "sgd")
    assert plan.target_epsilon == EPSILON and plan.labels == LABELS
    assert inputs.declared_size == 200 and len(inputs.records) == 200 and inputs.features.shape == (200, HIDDEN)
    assert inputs.head_weight.shape == (3, HIDDEN)
    # the default (250) fits neither the 128-wide backbone (83) nor, at worst all included, 2 x 200 - 200 units
    assert inputs.canaries == audit.canary_capacity(HIDDEN, 3) == 83
    assert audit.resolve_canaries(None, 384, 3, room=40) == 40


def test_every_run_trains_the_sites_rounds_and_is_charged_as_the_site_would_be(report):
    # The copy's ledger: train_round's entries, 5 rounds of q 0.32 (200 declared, min_expected_batch 64), 3 steps
    (charge,) = report["charges"]
    assert (charge["release"], charge["sample_rate"], charge["steps"], charge["entries"]) == (
        "training",
        pytest.approx(0.32),
        3,
        5,
    )
    # calibrated on the site's target (less a margin for retried rounds: client/hospital.site_run)
    assert 0.8 * EPSILON < report["accounted_epsilon"] <= EPSILON
    runs = report["runs"]
    assert list(runs) == [PRIVATE, audit.HALF, audit.QUARTER, LOW_NOISE, NO_DP]
    for name, run in runs.items():
        assert (run["m"], run["r"], run["rounds"]) == (83, 32, 5) and 0 < run["included"] < 83
        # a noise bug is charged as the private run: the ledger never sees it
        assert run["accounted_epsilon"] == (None if name == NO_DP else report["accounted_epsilon"])
    assert [runs[n]["noise_scale"] for n in runs] == [1.0, 0.5, 0.25, 0.01, None]


def test_private_run_stays_below_its_epsilon_and_both_controls_are_clearly_above(report):
    bound = {k: v["epsilon_lower_bound"] for k, v in report["runs"].items()}
    assert bound[PRIVATE] <= report["accounted_epsilon"]
    assert bound[NO_DP] >= bound[PRIVATE] + 1.0 and bound[LOW_NOISE] >= bound[PRIVATE] + 1.0, bound
    assert bound[NO_DP] == pytest.approx(report["ceiling"])  # no noise: every guess right
    assert report["passed"] and report["reasons"] == []


def test_the_power_table(report):
    bound = {k: v["epsilon_lower_bound"] for k, v in report["runs"].items()}
    assert report["detection_threshold"] == pytest.approx(bound[PRIVATE] + audit.CLEAR_MARGIN)
    rows = {row["run"]: row for row in report["power"]}
    assert [row["noise_scale"] for row in report["power"]] == [1.0, 0.5, 0.25]
    for name, row in rows.items():
        assert row["epsilon_lower_bound"] == bound[name]
        assert row["detected"] == (name != PRIVATE and bound[name] >= report["detection_threshold"])
    assert bound[audit.QUARTER] >= bound[PRIVATE]  # less noise, more seen


def test_patient_level_and_noised_evaluation_are_audited_as_they_ship(world, caplog):
    """The site's options train_round carries: with patient_field every record of a patient (and each
    canary, a patient of its own) is one unit; a shared evaluation is released and charged each round."""
    fed = world / "ws" / "federation.yaml"
    site = world / "ws" / "hospital-1"
    rows = (site / "train.csv").read_text().splitlines()
    with (world / "patients.csv").open("w") as f:  # 200 records of 100 patients, two notes each
        f.write(rows[0] + ",patient\n")
        f.writelines(f"{row},p{i // 2}\n" for i, row in enumerate(rows[1:]))
    patients = prepare_site(
        _variant(world, "by-patient", train=str(world / "patients.csv"), patient_field="patient", weight=100),
        federation_path=fed,
        epsilon=EPSILON,
    )
    assert len(patients.records) == 200 and patients.declared_size == 100
    report = run_audit(patients, seed=1, runs=(PRIVATE,))
    assert report["dp_unit"] == "patient"
    (charge,) = report["charges"]  # 100 declared patients: q = 64 / 100
    assert (charge["sample_rate"], charge["steps"], charge["entries"]) == (pytest.approx(0.64), 1, 5)

    shared = prepare_site(
        _variant(world, "shared-eval", share_evaluation="noised", evaluation_epsilon=0.1),
        federation_path=fed,
        epsilon=EPSILON,
    )
    report = run_audit(shared, seed=1, runs=(PRIVATE,))
    releases = {c["release"]: c for c in report["charges"]}
    assert releases["evaluation"]["entries"] == 5 and releases["evaluation"]["sample_rate"] == 1.0
    assert releases["training"]["entries"] == 5
    assert report["dp_unit"] == "record" and report["accounted_epsilon"] <= EPSILON


def test_a_noise_bug_fails_the_audit(inputs, monkeypatch):
    # What a broken site would do: charge for sigma, draw sigma / 100.
    monkeypatch.setitem(audit.RUNS, PRIVATE, 0.01)
    report = run_audit(inputs, seed=0, runs=(PRIVATE, NO_DP))
    private = report["runs"][PRIVATE]["epsilon_lower_bound"]
    assert private == pytest.approx(report["ceiling"]) and private > report["accounted_epsilon"]
    assert not report["passed"]
    assert any("exceeds the accounted epsilon" in r for r in report["reasons"])
    assert any("not clearly above" in r for r in report["reasons"])


def test_only_the_audit_weakens_the_noise():
    """secure_noise.weakened is the audit's simulated bug: no other module of the product names it."""
    package = Path(audit.__file__).resolve().parent.parent
    users = {
        str(p.relative_to(package))
        for folder in ("client", "common", "server", "fedprompt")
        for p in (package / folder).rglob("*.py")
        if "weakened" in p.read_text()
    }
    assert users == {"client/audit.py", "client/secure_noise.py"}


# --- the command -----------------------------------------------------------------------------------
@pytest.fixture
def cli(cli_with, monkeypatch):
    # the product: OS entropy
    monkeypatch.setattr(audit, "_generator", lambda seed: torch.Generator().manual_seed(1234))
    return cli_with("audit", "privacy")


def test_the_command_is_registered():
    from fedprompt import cli

    assert "audit" in cli.COMMANDS


def test_command_spends_nothing_sends_nothing_and_leaves_no_file(world, cli, capsys):
    site = world / "ws" / "hospital-1"
    assert cli(["privacy", "init", "--site", str(site / "site.yaml")]) == 0
    ledger = site / "ledger" / "privacy-ledger.json"
    ledger_bytes = ledger.read_bytes()
    capsys.readouterr()
    argv = ["audit", "--site", str(site / "site.yaml"), "--federation", str(world / "ws" / "federation.yaml")]
    with watched(world) as watch:
        code = cli([*argv, "--epsilon", str(EPSILON), "--json"])
    assert watch.changed == set()
    assert ledger.read_bytes() == ledger_bytes
    assert watch.dials == [] and watch.sockets == []
    # written: only its throwaway copy of the site, in one temporary folder that is gone
    folders = {Path(p).resolve().relative_to(Path(tempfile.gettempdir()).resolve()).parts[0] for p in watch.written}
    assert len(folders) == 1 and next(iter(folders)).startswith("fedprompt-audit-"), watch.written
    assert not (Path(tempfile.gettempdir()) / next(iter(folders))).exists()
    out = capsys.readouterr().out
    report = json.loads(out)
    assert code == 0, report["reasons"]
    assert report["hospital_id"] == "hospital-1" and report["labels"] == LABELS
    assert report["canaries"] == 83 and report["guesses"] == 32  # the tiny backbone's capacity
    assert report["runs"][PRIVATE]["epsilon_lower_bound"] <= report["accounted_epsilon"]
    assert report["ceiling"] == pytest.approx(epsilon_lower_bound(83, 32, 32, 1e-5))
    for name in (NO_DP, LOW_NOISE):
        assert report["runs"][name]["epsilon_lower_bound"] >= report["runs"][PRIVATE]["epsilon_lower_bound"] + 1.0

    from fedprompt.commands.audit import print_report

    print_report(report)
    text = capsys.readouterr().out
    for line in (
        "audited run: 5 rounds of the site's own train_round (5 of DP-SGD)",
        "DP unit: record; declared size 200",
        "charged (the copy's ledger): training sigma",
        f"accounted epsilon: {report['accounted_epsilon']:.3f} (target 2)",
        "private (as the site trains)",
        "control: no noise, no clipping",
        "control: noise 100x too small",
        f"told apart at a bound >= {report['detection_threshold']:.3f}",
        "sigma / 2",
        "sigma / 4",
        "PASS",
    ):
        assert line in text, text


def test_command_exit_4_on_a_privacy_bug(world, cli, capsys, monkeypatch):
    site, fed = world / "ws" / "hospital-1" / "site.yaml", world / "ws" / "federation.yaml"
    # a bug: the private run draws a hundredth of the noise it is charged for
    monkeypatch.setattr(audit, "RUNS", {PRIVATE: 0.01, NO_DP: None})
    assert cli(["audit", "--site", str(site), "--federation", str(fed), "--canaries", "60", "--epsilon", "1"]) == 4
    out = capsys.readouterr().out
    assert "AUDIT FAILED" in out and "exceeds the accounted epsilon" in out


def test_bad_input_is_exit_2(world, cli, capsys, tmp_path):
    fed = world / "ws" / "federation.yaml"
    assert cli(["audit", "--site", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err

    site = world / "ws" / "hospital-1" / "site.yaml"
    bad = tmp_path / "site"
    bad.mkdir()
    (bad / "train.csv").write_text("text,label\nfine note,tumour\n,neuro\nanother,cardiology\n")
    data = yaml.safe_load(site.read_text())
    (bad / "site.yaml").write_text(yaml.safe_dump({**data, "train": "train.csv", "validation": None, "test": None}))
    assert cli(["audit", "--site", str(bad / "site.yaml"), "--federation", str(fed)]) == 2
    err = capsys.readouterr().err
    assert "train.csv:3: text: empty text" in err and "train.csv:4: label: unknown label 'cardiology'" in err

    assert cli(["audit", "--site", str(site), "--federation", str(fed), "--canaries", "5000"]) == 2
    assert "at most 83" in capsys.readouterr().err
    # a plan this site refuses (its limits: at most 3 rounds) is not audited: the site would not train it
    limited = _variant(world, "limited", limits={"max_total_rounds": 3})
    assert cli(["audit", "--site", str(limited), "--federation", str(fed)]) == 2
    assert f"{limited}: this site refuses round 1 of the audited run [configuration]" in capsys.readouterr().err
    assert cli(["audit", "--site", str(site), "--federation", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert (
        not any(tmp_path.rglob("ledger*"))
        and not (world / "ws" / "hospital-1" / "ledger" / "privacy-ledger.json.noise-memo").exists()
    )
