"""The trained prompt's recipe: a key/value prefix at a late layer, trained by DP-SGD on cached states.

What matters: the prefix starts as (almost exactly) the plain encoder, so round 0 is the zero-shot
classifier; per-sample gradients on cached states are exact, per record and per patient; one round
takes exactly the steps and sample rate the ledger is charged for; the cached path is the uncached one.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPT_LABELS as LABELS
from conftest import PROMPT_MAX_LENGTH as MAX_LENGTH
from conftest import PROMPT_TEXTS as TEXTS
from opacus import GradSampleModule
from torch import nn
from torch.utils.data import TensorDataset

from fedprompt.client.trainer import local_update, patient_loss, trained_rows
from fedprompt.common import features as feats
from fedprompt.common.config import FederationConfig
from fedprompt.common.encoding import encode
from fedprompt.common.model import (
    NO_PROMPT,
    IndexedStateClassifier,
    PromptClassifier,
    PromptConfig,
    build_model,
    initial_state,
)
from fedprompt.common.plan import RoundPlan, prompt_config
from fedprompt.common.schedule import sampling

CPU = torch.device("cpu")
PATIENTS = ["p1", "p2", "p1", "p3", "p2", "p1"]  # 3 patients of 3, 2 and 1 records


def _config(bb, k: int = 3, style: str = "prefix") -> PromptConfig:
    return PromptConfig(
        labels=["x", "y", "z"],
        hidden_size=bb.hidden_size,
        backbone_fingerprint=bb.fingerprint,
        n_virtual_tokens=3,
        max_length=MAX_LENGTH,
        prompt_layer=k,
        prompt_style=style,
        normalize=True,
    )


def _data(bb) -> TensorDataset:
    return encode(bb.tokenizer, TEXTS, LABELS, MAX_LENGTH).dataset


def _trained_looking(model: PromptClassifier) -> PromptClassifier:
    with torch.no_grad():  # a prompt far from its start: every term of the prefix is exercised
        model.prompt.weight.copy_(torch.linspace(-2, 2, model.prompt.weight.numel()).view_as(model.prompt.weight))
    return model


def test_an_initial_prefix_leaves_the_plain_encoders_features(bert):
    model = build_model(bert, _config(bert))
    plain = build_model(bert, _config(bert, NO_PROMPT), model.trainable_state())
    ids, mask, _ = _data(bert).tensors
    with torch.no_grad():
        start, reference = model.features(ids, mask), plain.features(ids, mask)
        assert (start - reference).abs().max() <= 1e-6  # round 0 is the zero-shot classifier
        trained = _trained_looking(model).features(ids, mask)
    assert (trained - reference).abs().max() > 1e-3  # and a trained prefix does change them


@pytest.mark.parametrize("encoder", ["bert", "roberta"])
def test_a_zero_prefix_adds_exactly_nothing(request, encoder):
    bb = request.getfixturevalue(encoder)
    model = build_model(bb, _config(bb, 2))
    with torch.no_grad():
        model.prompt.weight.zero_()
    plain = build_model(bb, _config(bb, NO_PROMPT), model.trainable_state())
    ids, mask, _ = _data(bb).tensors
    with torch.no_grad():
        assert (model.features(ids, mask) - plain.features(ids, mask)).abs().max() <= 1e-6


@pytest.mark.parametrize("encoder", ["bert", "roberta"])
def test_cached_states_give_the_uncached_logits(request, encoder):
    bb = request.getfixturevalue(encoder)
    model = _trained_looking(build_model(bb, _config(bb, 2)))
    data = _data(bb)
    states, mask, labels = feats.extract_layer_states(model, data).tensors
    with torch.no_grad():
        cached = IndexedStateClassifier(model, states, mask)(torch.arange(len(labels)))
        uncached = model(*data.tensors[:2])
    assert (cached - uncached).abs().max() <= 1e-5


def _loop(model: PromptClassifier, forward, units: list[list[int]], labels: torch.Tensor) -> dict:
    """Reference per-unit gradients: each unit (a record, or a patient's records) on its own, the
    patient's loss the sum of its records' (trainer.patient_loss)."""
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in model.trainable_parameters()}
    for unit in units:
        model.zero_grad(set_to_none=True)
        index = torch.tensor(unit)
        nn.functional.cross_entropy(forward(index), labels[index], reduction="sum").backward()
        for k, p in model.trainable_parameters().items():
            assert p.grad is not None
            rows[k].append(p.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {k: torch.stack(v) for k, v in rows.items()}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("style", ["prefix", "tokens"])
@pytest.mark.parametrize("by_patient", [False, True])
def test_per_unit_gradients_on_cached_states_match_a_loop(bert, style, by_patient):
    model = _trained_looking(build_model(bert, _config(bert, 2, style)).train())
    data = _data(bert)
    states, mask, labels = feats.extract_layer_states(model, data).tensors
    module = IndexedStateClassifier(model, states, mask)
    rows = TensorDataset(torch.arange(len(labels)), labels)
    if by_patient:
        rows = feats.group_by_patient(rows, PATIENTS, fill=-1)
    index, targets = rows.tensors
    units = [[int(i) for i in row if i >= 0] for row in index] if by_patient else [[i] for i in range(len(labels))]
    reference = _loop(model, module, units, labels)
    gsm = GradSampleModule(module, batch_first=True, loss_reduction="mean")
    try:
        logits = gsm(index)
        loss = patient_loss(logits, targets) if by_patient else nn.functional.cross_entropy(logits, targets)
        loss.backward()
        for key, p in model.trainable_parameters().items():
            grad_sample = p.grad_sample  # type: ignore[attr-defined]
            assert grad_sample.shape == (len(units), *p.shape), key
            assert (grad_sample - reference[key]).abs().max() <= 1e-6, key
            assert reference[key].abs().max() > 1e-5, key  # a real gradient, not zeros on both sides
    finally:
        gsm._close()


def _plan(bb, **training) -> RoundPlan:
    fed = FederationConfig.model_validate(
        {
            "name": "prompt",
            "labels": ["x", "y", "z"],
            "rounds": 3,
            "model": {"prompt_layer": 2, "n_virtual_tokens": 3, "max_length": MAX_LENGTH},
            "training": {"train_prompt": True, "class_sums_share": 0.5, "sample_rate": 0.5, **training},
        }
    )
    return RoundPlan.for_run(fed, prompt_config(fed, bb), round=2)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("patients", [None, PATIENTS])
def test_a_prompt_round_takes_the_steps_and_rate_it_is_charged_for(bert, patients):
    plan = _plan(bert, min_expected_batch=1)
    assert plan.prompt_style == "prefix" and plan.train_prompt
    model = build_model(bert, plan.prompt_config())
    before = model.trainable_state()
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    units = len(set(patients)) if patients else len(TEXTS)
    s = sampling(plan, units)
    result = local_update(model, _data(bert), plan, s, 1.0, CPU, patients=patients)
    # the ledger is charged (sigma, q, steps_per_round) of this sampling: train() refuses any other count
    assert result.private and result.steps == s.steps_per_round == plan.local_epochs * int(1 / s.sample_rate)
    assert result.sample_rate == s.sample_rate and result.num_examples == units
    after = model.trainable_state()
    assert all(not torch.equal(before[k], after[k]) for k in before)  # prompt and head both trained
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder.items())  # encoder frozen


def test_the_prompt_rows_are_indices_a_few_bytes_each(bert):
    plan = _plan(bert)
    model = build_model(bert, plan.prompt_config())
    module, rows, physical = trained_rows(model, _data(bert), plan, CPU, PATIENTS, max_records=6)
    assert isinstance(module, IndexedStateClassifier)
    assert rows.tensors[0].tolist() == [[0, 2, 5], [1, 4, -1], [3, -1, -1]]  # patients x their records
    assert physical == 2  # 6 records a physical batch, 3 per patient row


def test_an_input_prompt_refuses_patient_level_dp(bert):
    plan = _plan(bert).replaced(prompt_layer=0, prompt_style="tokens")
    from fedprompt.common.errors import InputError

    with pytest.raises(InputError, match="needs a late prompt"):
        trained_rows(build_model(bert, plan.prompt_config()), _data(bert), plan, CPU, PATIENTS)


def test_initial_prefix_is_small_and_centred(bert):
    state = initial_state(bert, _config(bert))
    prefix = state["prompt.weight"]
    assert prefix.mean(0).abs().max() <= 1e-6 and 0 < prefix.norm() <= 1e-2 * prefix.shape[0] * bert.hidden_size**0.5
