"""`fedprompt audit`: the one-run privacy audit (Steinke, Nasr & Jagielski 2023) at a hospital
(tiny random BERT, synthetic records, CPU; seeded generators here, OS entropy in the product)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
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

from site_isolation import watched
from tinybert import TOY_KEYWORDS, TOY_LABELS, TOY_NEUTRAL, make_tiny_backbone

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


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """root/tinybert; root/ws: federation.yaml (max_length 32: the tiny BERT has 256 positions) and
    hospital-1 (200 train records, 30 validation)."""
    root = tmp_path_factory.mktemp("audit").resolve()
    tiny = make_tiny_backbone(root / "tinybert", hidden=HIDDEN, layers=2)
    rng = random.Random(0)
    ws = write_workspace(
        root / "ws",
        name="t",
        labels=LABELS,
        hospitals={"1": (notes(rng, 200), notes(rng, 30))},
        federation_overrides={"model": {"max_length": 32}},
    )
    path = ws / "hospital-1" / "site.yaml"
    data = yaml.safe_load(path.read_text())
    data["backbone"] = str(tiny)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def inputs(world):
    return prepare_site(world / "ws" / "hospital-1" / "site.yaml", federation_path=world / "ws" / "federation.yaml")


def test_prepare_uses_the_sites_recipe(inputs):
    rc = inputs.recipe
    # 200 records, expected batch raised to min_expected_batch 64: q 0.32, 3 steps a round; the default
    # one-shot run has no DP-SGD rounds, so the audit plans the 20 a longer run would take
    assert (rc.rounds, rc.local_epochs, rc.sample_rate, rc.steps_per_round, rc.lr, rc.optimizer) == (
        audit.AUDIT_SGD_ROUNDS,
        1,
        pytest.approx(0.32),
        3,
        8.0,
        "sgd",
    )
    assert rc.target_epsilon == 8.0 and rc.delta == 1e-5 and rc.max_grad_norm == 1.0
    assert 7.9 <= rc.accounted_epsilon <= 8.0
    assert len(inputs.records) == 200 and inputs.records.tensors[0].shape == (200, HIDDEN)
    assert inputs.head_state["weight"].shape == (3, HIDDEN)
    # the default (250) does not fit a 128-wide backbone
    assert inputs.canaries == audit.canary_capacity(HIDDEN, 3) == 83


@pytest.mark.parametrize("seed", [0, 1])
def test_private_run_stays_below_its_epsilon_and_both_controls_are_clearly_above(inputs, seed):
    report = run_audit(inputs.records, inputs.head_state, inputs.recipe, canaries=80, seed=seed)
    runs = {k: v["epsilon_lower_bound"] for k, v in report["runs"].items()}
    assert set(runs) == {PRIVATE, NO_DP, LOW_NOISE}
    assert runs[PRIVATE] <= report["accounted_epsilon"]
    assert runs[NO_DP] >= runs[PRIVATE] + 1.0 and runs[LOW_NOISE] >= runs[PRIVATE] + 1.0, runs
    assert runs[NO_DP] == pytest.approx(report["ceiling"])  # no noise: every guess right
    assert report["passed"] and report["reasons"] == []
    for r in report["runs"].values():
        assert (r["m"], r["r"]) == (80, 32) and r["steps"] == (
            inputs.recipe.steps if r["name"] != NO_DP else r["steps"]
        )
        assert 0 <= r["v"] <= r["r"] and 0 < r["included"] < 80
    assert report["runs"][LOW_NOISE]["noise_multiplier"] == pytest.approx(inputs.recipe.noise_multiplier / 100)
    assert report["runs"][NO_DP]["noise_multiplier"] is None


def test_a_noise_bug_fails_the_audit(inputs):
    # What a broken site would do: charge for sigma, train with sigma / 100.
    broken = dataclasses.replace(inputs.recipe, noise_multiplier=inputs.recipe.noise_multiplier / 100)
    report = run_audit(
        inputs.records, inputs.head_state, dataclasses.replace(broken, accounted_epsilon=1.0), canaries=80, seed=0
    )
    private = report["runs"][PRIVATE]["epsilon_lower_bound"]
    assert private == pytest.approx(report["ceiling"]) and private > 1.0
    assert not report["passed"]
    assert any("exceeds the accounted epsilon" in r for r in report["reasons"])
    assert any("not clearly above" in r for r in report["reasons"])


# --- the command -----------------------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch):
    from fedprompt import cli

    monkeypatch.setattr(cli, "COMMANDS", ("audit", "privacy"))
    # the product: OS entropy
    monkeypatch.setattr(audit, "_generator", lambda seed: torch.Generator().manual_seed(1234))
    return cli.main


def test_the_command_is_registered():
    from fedprompt import cli

    assert "audit" in cli.COMMANDS


def test_command_writes_nothing_spends_nothing_and_opens_no_socket(world, cli, capsys):
    site = world / "ws" / "hospital-1"
    assert cli(["privacy", "init", "--site", str(site / "site.yaml")]) == 0
    ledger = site / "ledger" / "privacy-ledger.json"
    ledger_bytes = ledger.read_bytes()
    capsys.readouterr()
    with watched(world) as watch:
        code = cli(
            [
                "audit",
                "--site",
                str(site / "site.yaml"),
                "--federation",
                str(world / "ws" / "federation.yaml"),
                "--json",
            ]
        )
    assert watch.changed == set()
    assert ledger.read_bytes() == ledger_bytes
    assert watch.dials == [] and watch.sockets == []
    assert watch.written == [], watch.written
    out = capsys.readouterr().out
    report = json.loads(out)
    assert code == 0, report["reasons"]
    assert report["hospital_id"] == "hospital-1" and report["labels"] == LABELS
    assert report["canaries"] == 83 and report["guesses"] == 32  # the tiny backbone's capacity
    assert report["runs"][PRIVATE]["epsilon_lower_bound"] <= report["accounted_epsilon"]
    assert report["ceiling"] == pytest.approx(epsilon_lower_bound(83, 32, 32, 1e-5))
    for name in (NO_DP, LOW_NOISE):
        assert report["runs"][name]["epsilon_lower_bound"] >= report["runs"][PRIVATE]["epsilon_lower_bound"] + 1.0


def test_command_table_and_exit_4_on_a_privacy_bug(world, cli, capsys, monkeypatch):
    site, fed = world / "ws" / "hospital-1" / "site.yaml", world / "ws" / "federation.yaml"
    assert cli(["audit", "--site", str(site), "--federation", str(fed), "--canaries", "60", "--epsilon", "4"]) == 0
    out = capsys.readouterr().out
    for text in (
        "accounted epsilon: 3.9",
        "ceiling of this audit:",
        "private (as the site trains)",
        "control: no noise, no clipping",
        "control: noise 100x too small",
        "PASS",
    ):
        assert text in out, out

    settings = audit._settings  # a bug: the private run trains with a hundredth of the noise it is charged for

    def broken(recipe, run):
        s = settings(recipe, run)
        return dataclasses.replace(s, noise_multiplier=s.noise_multiplier / 100) if run == PRIVATE else s

    monkeypatch.setattr(audit, "_settings", broken)
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
    assert cli(["audit", "--site", str(site), "--federation", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert (
        not any(tmp_path.rglob("ledger*"))
        and not (world / "ws" / "hospital-1" / "ledger" / "privacy-ledger.json.noise-memo").exists()
    )
