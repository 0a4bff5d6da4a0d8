"""The DP schedule (common/schedule.py): noise that does not depend on the site's true size, bounds
that never reject an honest update, a whole-run composition that spends exactly the target, and
the one-shot class-sums release (client/class_sums.py, server/class_means.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_workspace
from torch.utils.data import TensorDataset

from fedprompt.client.class_sums import noisy_class_sums, unit_contributions
from fedprompt.client.trainer import TrainSettings, train
from fedprompt.common.accounting import compute_epsilon
from fedprompt.common.config import FederationConfig
from fedprompt.common.features import group_by_patient
from fedprompt.common.model import PromptConfig
from fedprompt.common.plan import RoundPlan
from fedprompt.common.schedule import (
    MAX_UNITS_PER_DECLARED,
    RunNoise,
    calibrate_run,
    class_sums_round,
    largest_update_bound,
    noise_ratio,
    sampling,
    sgd_noise,
    sgd_rounds,
    sgd_signal,
    update_bound,
)
from fedprompt.server.class_means import head_from_class_sums

LABELS = ["a", "b", "c", "d", "e"]
HIDDEN = 24


def _plan(round_: int = 2, rounds: int = 20, **training) -> RoundPlan:
    """A plan of a run with DP-SGD rounds (the default run is the one-shot release alone)."""
    fed = FederationConfig(name="t", labels=LABELS, rounds=rounds, training=training)
    prompt = PromptConfig(labels=LABELS, hidden_size=HIDDEN, backbone_fingerprint="0" * 64, n_virtual_tokens=4)
    return RoundPlan.for_run(fed, prompt, round=round_)


def _features(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, HIDDEN, generator=gen), dim=-1)
    return TensorDataset(x, torch.randint(0, len(LABELS), (n,), generator=gen))


def _head_update(data: TensorDataset, plan: RoundPlan, declared: float, sigma: float | None, seed: int) -> torch.Tensor:
    """One private round of the head on `data` (the product's trainer) with fixed generators."""
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, len(LABELS))
    start = torch.cat([p.detach().flatten().clone() for p in head.parameters()])
    s = sampling(plan, declared)
    settings = TrainSettings(
        sample_rate=s.sample_rate,
        expected_batch=s.expected_batch,
        lr=plan.lr,
        optimizer="sgd",
        noise_multiplier=sigma if sigma is not None else 0.0,
        max_grad_norm=1.0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(
            head,
            data,
            settings,
            torch.device("cpu"),
            noise_generator=torch.Generator().manual_seed(seed),
            sample_generator=torch.Generator().manual_seed(seed + 1),
        )
    return torch.cat([p.detach().flatten() for p in head.parameters()]) - start


def test_update_noise_does_not_depend_on_the_true_record_count():
    """Sites of 40, 60 and 90 records that declare the same size: the noise part of their updates
    (the same update with and without noise, same batches) has one scale, lr x sigma x C x sqrt(T) / B.
    Normalised by round(q x n) as before, it would have revealed n (std ratio 90 / 40)."""
    plan = _plan()
    declared, sigma = 50.0, 2.0
    s = sampling(plan, declared)
    expected = plan.lr * sigma * s.steps_per_round**0.5 / s.expected_batch
    stds = []
    for n in (40, 60, 90):
        data = _features(n, seed=n)
        noise = _head_update(data, plan, declared, sigma, seed=7) - _head_update(data, plan, declared, None, seed=7)
        stds.append(float(noise.std()))
    for std in stds:
        assert std == pytest.approx(expected, rel=0.15)
    assert max(stds) / min(stds) < 1.2


def test_small_sites_sample_up_to_the_expected_batch_floor():
    plan = _plan(min_expected_batch=32, sample_rate=0.25)
    assert sampling(plan, 1000).sample_rate == 0.25 and sampling(plan, 1000).expected_batch == 250
    s = sampling(plan, 80)
    assert (s.sample_rate, s.expected_batch, s.steps_per_round) == (0.4, 32.0, 2)
    assert sampling(plan, 20).sample_rate == 1.0 and sampling(plan, 20).expected_batch == 20


def test_whole_run_spends_exactly_the_target_across_both_phases():
    plan = _plan(class_sums_share=0.5)
    s = sampling(plan, 200)
    noise = calibrate_run(plan, s, 4.0, 1e-5, "prv")
    history = noise.history(s, sgd_rounds(plan))
    assert history[0] == (noise.class_sums, 1.0, 1) and sgd_rounds(plan) == plan.total_rounds - 1
    assert compute_epsilon("prv", history, 1e-5) == pytest.approx(4.0, abs=0.02)
    # the release alone costs its share
    assert compute_epsilon("prv", history[:1], 1e-5) == pytest.approx(2.0, abs=0.02)
    assert class_sums_round(plan.model_copy(update={"round": 1})) and not class_sums_round(plan)


def test_an_honest_update_stays_under_the_derived_bound_even_at_twice_its_declared_size():
    """The worst honest site: it holds MAX_UNITS_PER_DECLARED x its declared size, its gradients all
    point one way (every record the same, wrong label), and its noise is as large as the plan admits."""
    plan = _plan()
    for declared in (10.0, 40.0, 128.0, 400.0):
        n = int(MAX_UNITS_PER_DECLARED * declared)
        s = sampling(plan, declared)
        x = torch.nn.functional.normalize(torch.ones(n, HIDDEN), dim=-1)
        data = TensorDataset(x, torch.zeros(n, dtype=torch.long))
        # the largest sigma the plan's max_noise_ratio admits for this site
        sigma = plan.max_noise_ratio * sgd_signal(plan, s) / sgd_noise(plan, s, 1.0)
        assert noise_ratio(plan, declared, RunNoise(None, sigma)) == pytest.approx(plan.max_noise_ratio)
        norm = float(_head_update(data, plan, declared, sigma, seed=3).norm())
        bound = update_bound(plan, declared, 0.0)
        assert norm < bound, (declared, norm, bound)


def test_a_fixed_norm_bound_must_cover_every_honest_site():
    plan = _plan()
    worst = largest_update_bound(plan, 10.0)
    assert worst >= max(update_bound(plan, w, 10.0) for w in (1, 10, 32, 128, 129, 1000, 1e6))
    assert largest_update_bound(plan.model_copy(update={"batch_size": 16}), 10.0) == float("inf")


def test_class_sums_have_sensitivity_one_per_unit():
    data = _features(30, seed=1)
    per_record = unit_contributions(data, len(LABELS))
    assert torch.allclose(per_record.flatten(1).norm(dim=1), torch.ones(30))
    # a patient's records together are clipped to norm 1 too (patient-level DP)
    patients = [f"p{i // 3}" for i in range(30)]
    per_patient = unit_contributions(group_by_patient(data, patients), len(LABELS))
    assert per_patient.shape[0] == 10 and float(per_patient.flatten(1).norm(dim=1).max()) <= 1.0 + 1e-6
    # without noise the release is the class sums over the declared size
    x, y = data.tensors
    exact = torch.stack([x[y == c].sum(0) for c in range(len(LABELS))]) / 25.0
    released = noisy_class_sums(data, len(LABELS), 0.0, 25.0, torch.Generator().manual_seed(0))
    assert torch.allclose(released, exact, atol=1e-6)


def test_head_from_class_sums_falls_back_to_the_label_for_an_empty_class():
    protos = torch.nn.functional.normalize(torch.randn(len(LABELS), HIDDEN), dim=-1)
    sums = torch.zeros(len(LABELS), HIDDEN)
    sums[0] = 5 * protos[1]  # class 0's records point at label 1's text
    head = head_from_class_sums(sums / 100.0, 100.0, protos, prior=1.0, logit_scale=10.0)
    assert torch.allclose(head.norm(dim=1), torch.full((len(LABELS),), 10.0))
    assert torch.allclose(head[2] / 10.0, protos[2], atol=1e-6)  # no records: the zero-shot row
    assert float(head[0] @ protos[1]) > float(head[0] @ protos[0])  # the data outweighs a prior of 1


# --- on the product's path: the aggregator's start and a site's round ---------------------------------
def test_a_fixed_norm_bound_below_an_honest_update_is_refused_at_start(tmp_path, tiny_dir):
    from fedprompt.client.workspace import load_workspace
    from fedprompt.common.errors import InputError
    from fedprompt.server.federation import RunSpec, prepare_run

    overrides = {"rounds": 5, "model": {"max_length": 32}, "strategy": {"update_norm_bound": 100.0}}
    ws = make_workspace(tmp_path, tiny_dir, hospitals=1, per_hospital=20, overrides=overrides)
    fed, _, _ = load_workspace(ws)
    with pytest.raises(InputError, match="strategy.update_norm_bound.*below the largest update an honest site"):
        prepare_run(RunSpec(fed, tmp_path / "out", None, tiny_dir))
    # derived (the default), or large enough: the run is prepared
    prepare_run(
        RunSpec(fed.replaced(strategy=fed.strategy.replaced(update_norm_bound=1e6)), tmp_path / "o2", None, tiny_dir)
    )


def test_a_site_whose_update_would_be_mostly_noise_refuses_before_spending(tmp_path, tiny_dir, caplog):
    """20 records at epsilon 0.5: the noise bound is many times the signal bound; the site says
    "too few records" and its ledger is untouched. The same site at epsilon 8 trains."""
    from flwr.app import RecordDict

    from fedprompt.client.hospital import train_round
    from fedprompt.client.workspace import list_hospitals, load_workspace
    from fedprompt.common.wire import ARRAYS, STATUS, state_to_arrays
    from fedprompt.server.federation import RunSpec, prepare_run
    from fedprompt.simulation import ensure_ledgers

    ws = make_workspace(
        tmp_path, tiny_dir, hospitals=1, per_hospital=20, overrides={"rounds": 20, "model": {"max_length": 32}}
    )
    ensure_ledgers(ws)
    fed, (site,), _ = load_workspace(ws)
    run = prepare_run(RunSpec(fed, tmp_path / "out", None, tiny_dir))
    before = site.ledger.read_bytes()
    for eps, expected in ((0.5, "too few records"), (8.0, "ok")):
        plan = RoundPlan.for_run(fed, run.prompt, round=1).replaced(target_epsilon=eps)
        content = RecordDict({ARRAYS: state_to_arrays(run.state), "config": plan.to_config_record()})
        with caplog.at_level("WARNING", logger="fedprompt.hospital"):
            reply = train_round(content, list_hospitals(ws)[0])
        status = reply[STATUS]
        assert (status["status"] if expected == "ok" else status["reason"]) == expected, caplog.text
        if expected != "ok":
            assert site.ledger.read_bytes() == before and "mostly noise" in caplog.text
    assert site.ledger.read_bytes() != before
