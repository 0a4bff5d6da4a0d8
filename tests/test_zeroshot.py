"""The zero-shot start: the federation's round-0 model is exactly the cosine classifier between a
record's feature and each label text's embedding, computed here independently of the model code."""

from __future__ import annotations

import pytest
import torch

from fedprompt.common.backbone import load_backbone
from fedprompt.common.config import FederationConfig, LabelSpec, ModelSettings
from fedprompt.common.encoding import encode
from fedprompt.common.errors import InputError
from fedprompt.common.model import HEAD_BIAS_KEY, HEAD_WEIGHT_KEY, build_model
from fedprompt.common.plan import initial_global_state_for, prompt_config

TEXTS = [
    "the patient reports chest pain and high blood pressure",
    "colon carcinoma with a liver mass",
    "seizure and headache, history of stroke",
    "fever with infection, normal exam",
    "gastric pain after meals, bowel normal",
    "brain tumor with neurologic deficit",
    "cardiac history, denies chest pain",
    "inflammation of the stomach and liver",
] * 3


@pytest.fixture(scope="module")
def bb(tiny_backbone):
    return load_backbone(tiny_backbone(init_range=0.5))


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).float()
    return (hidden * m).sum(1) / m.sum(1)


@torch.no_grad()
def _zero_shot_by_hand(bb, fed: FederationConfig, texts: list[str], max_length: int) -> torch.Tensor:
    """cos(record through the plain encoder, label text through the plain encoder)."""
    lab = bb.tokenizer(fed.label_texts, padding=True, return_tensors="pt")
    labels = _mean_pool(
        bb.model(input_ids=lab["input_ids"], attention_mask=lab["attention_mask"]).last_hidden_state,
        lab["attention_mask"],
    )
    enc = bb.tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    hidden = bb.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    records = _mean_pool(hidden, enc["attention_mask"])
    return torch.nn.functional.normalize(records, dim=-1) @ torch.nn.functional.normalize(labels, dim=-1).T


def test_round_zero_is_the_zero_shot_classifier(bb):
    fed = FederationConfig(
        name="z",
        labels=[
            LabelSpec(name="cardiovascular", description="heart and blood pressure"),
            "neoplasms",
            LabelSpec(name="nervous", description="brain, seizure, stroke"),
            "general",
        ],
        model=ModelSettings(max_length=32),
    )
    config = prompt_config(fed, bb)
    state = initial_global_state_for(fed, bb)
    model = build_model(bb, config, state).eval()
    ids, mask, _ = encode(bb.tokenizer, TEXTS, [0] * len(TEXTS), 32).dataset.tensors
    with torch.no_grad():
        logits = model(ids, mask)
    # the default run does not train the prompt, so it is off the record path: the plain encoder
    assert not config.has_prompt
    cos = _zero_shot_by_hand(bb, fed, TEXTS, 32)
    assert torch.equal(logits.argmax(-1), cos.argmax(-1))
    assert len(set(cos.argmax(-1).tolist())) > 1  # a real decision, not one class for everything
    # logits = scale x cosine, bias 0
    torch.testing.assert_close(logits, fed.model.logit_scale * cos, atol=1e-5, rtol=1e-5)
    assert torch.equal(state[HEAD_BIAS_KEY], torch.zeros(4))


def test_label_descriptions_shape_the_prototypes(bb):
    plain = FederationConfig(name="p", labels=["cardiovascular", "neoplasms"], model=ModelSettings(max_length=32))
    described = FederationConfig(
        name="d",
        labels=[LabelSpec(name="cardiovascular", description="heart and blood pressure"), "neoplasms"],
        model=ModelSettings(max_length=32),
    )
    assert described.label_names == plain.label_names == ["cardiovascular", "neoplasms"]
    assert described.label_texts == ["cardiovascular: heart and blood pressure", "neoplasms"]
    heads = [initial_global_state_for(f, bb)[HEAD_WEIGHT_KEY] for f in (plain, described)]
    assert not torch.allclose(heads[0][0], heads[1][0]) and torch.equal(heads[0][1], heads[1][1])
    assert torch.allclose(heads[1].norm(dim=1), torch.full((2,), 10.0))  # unit prototypes x logit_scale


def test_random_head_is_still_available(bb):
    fed = FederationConfig(name="r", labels=["a", "b"], model=ModelSettings(max_length=32, head_init="random"))
    state = initial_global_state_for(fed, bb)
    assert state[HEAD_WEIGHT_KEY].abs().max() <= 1 / 32**0.5  # the old uniform init, no prototypes


def test_labels_with_descriptions_load_from_yaml_and_bad_entries_name_the_line(tmp_path):
    good = tmp_path / "federation.yaml"
    good.write_text(
        "name: f\nlabels:\n  - name: neoplasms\n    description: tumours, cancers\n  - cardiovascular diseases\n"
    )
    fed = FederationConfig.load(good)
    assert fed.label_names == ["neoplasms", "cardiovascular diseases"]
    assert fed.label_texts == ["neoplasms: tumours, cancers", "cardiovascular diseases"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: f\nlabels:\n  - name: neoplasms\n    colour: red\n  - [x, y]\n")
    with pytest.raises(InputError) as err:
        FederationConfig.load(bad)
    text = str(err.value)
    assert f"{bad}:4: labels[0].colour: unknown key" in text and "labels[1]" in text
    dupes = tmp_path / "dupes.yaml"
    dupes.write_text("name: f\nlabels:\n  - name: a\n  - a\n")
    with pytest.raises(InputError, match="duplicate label"):
        FederationConfig.load(dupes)
