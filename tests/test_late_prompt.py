"""The prompt's place on the record path (PromptConfig.prompt_layer): at the input, late (before
layer k, over cached layer-k states), or nowhere; exact per-sample gradients and the layer cache.
Tiny random encoders (tests/tinybert.py), CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import PROMPT_LABELS as LABELS
from conftest import PROMPT_LAYERS as LAYERS
from conftest import PROMPT_MAX_LENGTH as MAX_LENGTH
from conftest import PROMPT_TEXTS as TEXTS
from opacus import GradSampleModule
from torch import nn

from fedprompt.client.selftest import FEATURE_TOLERANCE, _loop_gradients
from fedprompt.client.trainer import TrainSettings, train
from fedprompt.common import features as feats
from fedprompt.common.backbone import load_backbone
from fedprompt.common.encoding import encode
from fedprompt.common.errors import InputError
from fedprompt.common.model import (
    NO_PROMPT,
    LayerStateClassifier,
    PromptClassifier,
    PromptConfig,
    build_model,
    load_prompt,
    save_prompt,
)
from fedprompt.common.zeroshot import label_prototypes

CPU = torch.device("cpu")


def _config(bb, k: int, **kw) -> PromptConfig:
    return PromptConfig(
        labels=["x", "y", "z"],
        hidden_size=bb.hidden_size,
        backbone_fingerprint=bb.fingerprint,
        n_virtual_tokens=3,
        max_length=MAX_LENGTH,
        prompt_layer=k,
        normalize=True,
        **{"prompt_style": "tokens", **kw},  # the concatenated tokens (test_prompt_recipe.py: the prefix)
    )


def _model(bb, k: int, **kw) -> PromptClassifier:
    model = build_model(bb, _config(bb, k, **kw)).train()
    with torch.no_grad():  # a prompt and bias unlike the initial ones: every term is exercised
        model.prompt.weight.add_(torch.linspace(-0.5, 0.5, model.prompt.weight.numel()).view_as(model.prompt.weight))
        model.head.bias.add_(torch.tensor([0.3, -0.2, 0.1]))
    return model


def _data(bb, texts=TEXTS):
    return encode(bb.tokenizer, texts, LABELS[: len(texts)], MAX_LENGTH).dataset


def _inserted_at_layer_k(model: PromptClassifier, ids, mask) -> torch.Tensor:
    """Reference logits: the encoder's OWN full forward (its own masks, its own layer loop), with
    hooks that prepend the prompt to the hidden states entering layer k and widen the attention
    mask every layer >= k receives (in whatever format the attention implementation uses)."""
    k, n = model.config.prompt_layer, model.config.n_virtual_tokens
    longest = int(mask.sum(1).max())
    ids, mask = ids[:, :longest], mask[:, :longest]

    def widen(m):
        if m is None:  # no padding anywhere: every key is attended, the prompt's too
            return None
        attend = torch.ones((), dtype=m.dtype) if m.dtype == torch.bool else torch.zeros((), dtype=m.dtype)
        if m.shape[2] > 1:  # one row per query: a bidirectional mask's rows are all alike
            m = torch.cat([m[:, :, :1].expand(-1, -1, n, -1), m], 2)
        return torch.cat([attend.expand(*m.shape[:3], n), m], 3)

    def hook(layer_index):
        def pre(_module, args, kwargs):
            hidden, m, *rest = args
            if layer_index == k:
                hidden = torch.cat([model.prompt.weight.expand(len(hidden), -1, -1), hidden], 1)
            return (hidden, widen(m), *rest), kwargs

        return pre

    layers = model.encoder.encoder.layer
    handles = [layers[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in range(k, len(layers))]
    try:
        hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, n:]
    finally:
        for h in handles:
            h.remove()
    m = mask.unsqueeze(-1).float()
    pooled = nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    return model.head(pooled)


def _input_prompt_reference(model: PromptClassifier, ids, mask) -> torch.Tensor:
    """Today's model before prompt_layer existed: the prompt prepended to the word embeddings."""
    n = model.config.n_virtual_tokens
    longest = int(mask.sum(1).max())
    ids, mask = ids[:, :longest], mask[:, :longest]
    words = model.encoder.get_input_embeddings()(ids)
    x = torch.cat([model.prompt.weight.expand(len(ids), -1, -1), words], 1)
    ones = torch.ones(len(ids), n, dtype=mask.dtype)
    hidden = model.encoder(inputs_embeds=x, attention_mask=torch.cat([ones, mask], 1)).last_hidden_state[:, n:]
    m = mask.unsqueeze(-1).float()
    return model.head(nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1))


# --- the forward ---------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("encoder", ["bert", "roberta"])
@pytest.mark.parametrize("k", [1, 3])
def test_late_prompt_equals_the_full_forward_with_the_prompt_inserted_at_layer_k(request, encoder, attention, k):
    bb = request.getfixturevalue(encoder)
    bb.model.set_attn_implementation(attention)
    try:
        model = _model(bb, k)
        ids, mask, _ = _data(bb).tensors
        with torch.no_grad():
            reference = _inserted_at_layer_k(model, ids, mask)
            uncached = model(ids, mask)
            states = feats.extract_layer_states(model, _data(bb))
            cached = LayerStateClassifier(model)(*states.tensors[:2])
    finally:
        bb.model.set_attn_implementation("sdpa")
    assert (uncached - reference).abs().max() <= 1e-5
    assert (cached - uncached).abs().max() <= 1e-5
    # the states entering layer k are the encoder's own (its hidden_states output), not a copy of its loop
    with torch.no_grad():
        own = bb.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[k]
    real = mask[:, : states.tensors[0].shape[1]].bool()
    assert (states.tensors[0][real] - own[:, : real.shape[1]][real]).abs().max() <= 1e-5


def test_input_prompt_is_todays_model(bert):
    model = _model(bert, 0)
    ids, mask, _ = _data(bert).tensors
    with torch.no_grad():
        assert (model(ids, mask) - _input_prompt_reference(model, ids, mask)).abs().max() == 0.0


def test_no_prompt_is_the_plain_encoder_of_the_zero_shot_prototypes(bert):
    """prompt_layer -1: a record's feature is computed exactly as a label's prototype is, so round 0
    is the plain label-embedding zero-shot classifier; the prompt tensor (still sent) is not read."""
    model = _model(bert, NO_PROMPT)
    enc = bert.tokenizer(TEXTS, truncation=True, max_length=MAX_LENGTH, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        features = model.features(enc["input_ids"], enc["attention_mask"])
        model.prompt.weight.mul_(-3.0)
        again = model.features(enc["input_ids"], enc["attention_mask"])
    prototypes = label_prototypes(bert, model.config, TEXTS)
    assert (features - prototypes).abs().max() <= 1e-6
    assert torch.equal(features, again)


def test_late_prompt_starts_among_layer_k_states(bert):
    """A late prompt's initial vectors are the label tokens' states entering layer k (public: the
    label names only), at the scale of the states it joins; at the input, word embedding rows."""
    ids, mask, _ = _data(bert).tensors
    states = build_model(bert, _config(bert, 2)).layer_states(ids, mask)
    late = build_model(bert, _config(bert, 2)).prompt.weight
    early = build_model(bert, _config(bert, 0)).prompt.weight
    scale = states[mask.bool()].norm(dim=-1).mean()
    assert 0.5 < float(late.detach().norm(dim=-1).mean() / scale) < 2.0
    assert float(early.detach().norm(dim=-1).mean() / scale) < 0.1
    rows = bert.tokenizer("x y z", add_special_tokens=False)["input_ids"][:3]
    assert torch.equal(early, bert.model.get_input_embeddings().weight[rows])


# --- settings ------------------------------------------------------------------------------------
def test_prompt_layer_is_saved_and_absent_means_the_input(bert, tmp_path):
    model = _model(bert, 2)
    save_prompt(tmp_path / "late", model.config, model.trainable_state())
    assert load_prompt(tmp_path / "late")[0].prompt_layer == 2
    old = tmp_path / "old"
    save_prompt(old, _config(bert, 0), model.trainable_state())
    raw = (old / "config.json").read_text()
    (old / "config.json").write_text(raw.replace('  "prompt_layer": 0,\n', ""))
    assert "prompt_layer" not in (old / "config.json").read_text()
    assert load_prompt(old)[0].prompt_layer == 0


@pytest.mark.parametrize("k", [-2, LAYERS])
def test_a_prompt_layer_outside_the_encoder_is_refused(bert, k):
    with pytest.raises(InputError, match=f"prompt_layer {k} is not -1") as info:
        build_model(bert, _config(bert, k))
    assert info.value.problems[0].field == "prompt_layer"


def test_roberta_positions_a_late_prompt_needs_none(roberta):
    """RoBERTa numbers positions from padding_idx + 1: max_length + 2 positions fit the records alone.
    Virtual tokens at the input need positions too; a late prompt's enter after the position embeddings."""
    with pytest.raises(InputError, match=r"= 29 exceeds the encoder's 26 positions"):
        build_model(roberta, _config(roberta, 0))
    build_model(roberta, _config(roberta, 1))
    build_model(roberta, _config(roberta, NO_PROMPT))
    with pytest.raises(InputError, match=r"= 27 exceeds the encoder's 26 positions"):
        build_model(roberta, replace(_config(roberta, 1), max_length=MAX_LENGTH + 1))


# --- exact per-sample gradients --------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize(("k", "cached"), [(0, False), (2, False), (1, True), (3, True)])
def test_per_sample_gradients_match_a_one_example_loop(bert, k, cached):
    model = _model(bert, k)
    if not cached:  # token ids through the whole model
        module, inputs = model, _data(bert).tensors[:2]
    else:  # the late prompt on cached layer-k states
        module = LayerStateClassifier(model)
        inputs = feats.extract_layer_states(model, _data(bert)).tensors[:2]
    labels = torch.tensor(LABELS)
    reference = _loop_gradients(module, *inputs, labels)  # type: ignore[arg-type]
    gsm = GradSampleModule(module, batch_first=True, loss_reduction="mean")
    try:
        nn.functional.cross_entropy(gsm(*inputs), labels).backward()
        for key, p in model.trainable_parameters().items():
            grad_sample = p.grad_sample  # type: ignore[attr-defined]
            assert grad_sample.shape == (len(labels), *p.shape), key
            assert (grad_sample - reference[key]).abs().max() <= 1e-6, key
            assert reference[key].abs().max() > 1e-4, key  # a real gradient, not zeros on both sides
    finally:
        gsm._close()


def test_dp_training_on_cached_states_moves_prompt_and_head_only(bert):
    model = _model(bert, 2)
    before = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    start = model.trainable_state()
    states = feats.extract_layer_states(model, _data(bert))
    result = train(
        LayerStateClassifier(model), states, TrainSettings(epochs=2, sample_rate=0.5, noise_multiplier=1.0), CPU
    )
    assert result.steps == 4 and result.private
    after = model.trainable_state()
    assert all(not torch.equal(start[k], after[k]) for k in start)
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in before.items())


# --- the layer-state cache ----------------------------------------------------------------------
def test_layer_cache_reuses_and_is_invalidated_by_records_backbone_and_layer(bert, tiny_backbone):
    feats._layer_cache.clear()
    model = _model(bert, 2)
    data = _data(bert)
    first = feats.cached_layer_states(model, data)
    assert feats.cached_layer_states(model, data) is first  # the same records: not recomputed
    with torch.no_grad():
        model.prompt.weight.add_(1.0)  # a trained prompt does not touch the layers below it
    assert feats.cached_layer_states(model, data) is first
    # the records change (one token of one record)
    ids, mask, y = (t.clone() for t in data.tensors)
    ids[2, 1] = bert.tokenizer.convert_tokens_to_ids("cancer")
    changed = feats.cached_layer_states(model, torch.utils.data.TensorDataset(ids, mask, y))
    assert changed is not first and not torch.equal(changed.tensors[0][2], first.tensors[0][2])
    assert torch.equal(changed.tensors[0][:2], first.tensors[0][:2])
    # the layer changes
    deeper = feats.cached_layer_states(_model(bert, 3), data)
    assert deeper is not first and not torch.equal(deeper.tensors[0], first.tensors[0])
    # the backbone changes (same architecture and tokenizer, other weights)
    other = load_backbone(tiny_backbone(seed=5, layers=LAYERS))
    elsewhere = feats.cached_layer_states(_model(other, 2), data)
    assert elsewhere is not first and not torch.equal(elsewhere.tensors[0], first.tensors[0])
    assert feats.cached_layer_states(model, data) is first  # still held (LRU)


def test_bf16_layer_cache_halves_memory_within_the_feature_tolerance(bert):
    model = _model(bert, 2)
    data = _data(bert)
    full = feats.extract_layer_states(model, data)
    half = feats.extract_layer_states(model, data, storage_dtype=torch.bfloat16)
    assert half.tensors[0].dtype == torch.bfloat16
    # states dominate: [records, longest, hidden]; the mask and labels are the same in both
    assert feats.state_bytes(full) - feats.state_bytes(half) == full.tensors[0].numel() * 2
    with torch.no_grad():
        exact = model.features_from_states(*full.tensors[:2])
        approx = model.features_from_states(*half.tensors[:2])
    diff = (approx - exact).abs().max().item()
    assert 0 < diff <= FEATURE_TOLERANCE


# --- the cost benchmark (benchmarks/late_prompt.py), micro-sized: well-formed, not timed -----------
def test_micro_benchmark_reports_every_mode_and_the_cache_bytes(tmp_path, tiny_backbone):
    import csv
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:  # `benchmarks` is a top-level package of the repository
        sys.path.insert(0, str(root))
    from benchmarks import late_prompt
    from benchmarks.common import Context

    from tinybert import WORDS

    with (tmp_path / "medical_tc_test.csv").open("w", newline="") as f:
        csv.writer(f).writerows(
            [["condition_label", "medical_abstract"]] + [[i % 2 + 1, " ".join(WORDS[i : i + 12])] for i in range(8)]
        )
    with (tmp_path / "medical_tc_labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["condition_label", "condition_name"], [1, "neoplasms"], [2, "digestive"]])
    backbone = tiny_backbone(layers=6)
    knobs = {"batch": 4, "max_length": MAX_LENGTH, "n_batches": 2, "pairs": 2, "warmup": 0}
    ctx = Context(out=tmp_path, backbone=str(backbone), data=tmp_path / "medical_tc_test.csv", overrides=knobs)
    r = late_prompt.run(ctx)
    assert set(r["step_seconds"]) == {"head", "head_uncached", "late3", "late5", "input"}
    assert all(s["median"] > 0 for s in r["step_seconds"].values())
    head, prompt = 2 * 32 + 2, 4 * 32  # 2 labels, hidden 32, 4 virtual tokens
    expected = {"head": head, "head_uncached": head, "late3": head + prompt, "late5": head + prompt}
    assert r["config"]["trainable_params"] == expected | {"input": head + prompt}
    layer3 = r["cache"]["layer3"]
    assert layer3["bytes_per_record_bf16"] < layer3["bytes_per_record_fp32"]
    assert layer3["bytes_per_record_fp32_at_max_length"] == MAX_LENGTH * 32 * 4
    assert isinstance(r["target"]["met"], bool) and "before layer 3" in late_prompt.markdown(r)
