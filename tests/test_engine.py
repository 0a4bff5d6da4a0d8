"""Core engine: backbone, fingerprint, model, exact DP-SGD, self-test checks (tiny BERT, CPU)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from opacus.accountants.utils import get_noise_multiplier
from safetensors.torch import load_file, save_file

from fedprompt.client import selftest
from fedprompt.client.dp import PerSampleGradientError, noise_only_step, wrap_private
from fedprompt.client.trainer import TrainSettings, train
from fedprompt.common.accounting import calibrate_noise
from fedprompt.common.backbone import load_backbone
from fedprompt.common.config import FederationConfig, TrainingSettings
from fedprompt.common.encoding import encode
from fedprompt.common.errors import InputError
from fedprompt.common.model import TRAINABLE_KEYS, PromptClassifier, PromptConfig, build_model, load_prompt
from fedprompt.common.plan import RoundPlan, initial_global_state_for, prompt_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_backbone(tiny_dir)


def _config(bb, **kw) -> PromptConfig:
    return PromptConfig(
        labels=["a", "b", "c"],
        hidden_size=bb.hidden_size,
        backbone_fingerprint=bb.fingerprint,
        n_virtual_tokens=4,
        max_length=24,
        **kw,
    )


def _dataset(bb, n=12):
    texts = ["chest pain heart blood pressure", "brain seizure nerve headache", "tumor mass carcinoma neoplasm"]
    return encode(bb.tokenizer, [texts[i % 3] + f" case {i}" for i in range(n)], [i % 3 for i in range(n)], 24).dataset


# --- self-test checks, each as a unit test ------------------------------------------------------
def test_per_sample_gradients_match_one_example_loop(tiny):
    check = selftest.check_per_sample_gradients(tiny, CPU)
    assert check.passed and check.max_abs_diff <= 1e-6


def test_zero_noise_dp_step_equals_manual_clip_and_average(tiny):
    check = selftest.check_zero_noise_step(tiny, CPU)
    assert check.passed and check.max_abs_diff <= 1e-6
    assert "6/6 examples clipped" in check.detail  # the clipping path is really exercised


def test_guard_catches_batch_summed_prompt_gradient(tiny):
    check = selftest.check_broadcast_guard(tiny, CPU)
    assert check.passed, check.detail
    assert "(1, 4, 32)" in check.detail  # Opacus saw one batch-summed row for 6 samples


def test_trainer_refuses_to_step_with_a_broadcast_prompt(tiny):
    model = build_model(tiny, _config(tiny))
    model.prompt = selftest.BroadcastPrompt(4, tiny.hidden_size)
    model.head.requires_grad_(False)
    # the trainer's parameter list is what the guard checks: point it at the broadcast prompt
    model.trainable_parameters = lambda: {"prompt.weight": model.prompt.embedding.weight}
    with pytest.raises(PerSampleGradientError, match="broadcast over the batch"):
        train(model, _dataset(tiny), TrainSettings(epochs=1, sample_rate=0.5, noise_multiplier=1.0), CPU)


def test_backbone_bit_identical_after_training(tiny):
    check = selftest.check_backbone_frozen(tiny, CPU)
    assert check.passed and check.max_abs_diff == 0.0


def test_selftest_cli_json(tiny_dir, capsys):
    from fedprompt.cli import main

    assert main(["selftest", "--backbone", str(tiny_dir), "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] is True and out["device"] == "cpu" and out["dtype"] == "float32"  # bf16 only on CUDA
    assert [c["name"] for c in out["checks"]] == [
        "per_sample_gradients",
        "zero_noise_dp_step",
        "broadcast_guard",
        "backbone_bit_identical",
        "feature_precision",
    ]
    assert out["checks"][-1]["max_abs_diff"] == 0.0  # float32 against float32 on the CPU
    assert all(set(c) >= {"name", "passed", "max_abs_diff"} for c in out["checks"])


# --- DP mechanics ------------------------------------------------------------------------------
def test_empty_poisson_batch_takes_a_counted_noise_only_step(tiny):
    model = build_model(tiny, _config(tiny))
    ds = _dataset(tiny, n=4)
    params = list(model.trainable_parameters().values())
    opt = torch.optim.SGD(params, lr=1.0)
    gsm, dp_opt, _ = wrap_private(model, opt, ds, sample_rate=0.25, noise_multiplier=1.0, max_grad_norm=1.0)
    before = [p.detach().clone() for p in params]
    noise_only_step(dp_opt, params)
    gsm._close()
    moved = [float((p.detach() - b).abs().max()) for p, b in zip(params, before, strict=True)]
    assert all(m > 0 for m in moved)  # noise was added although no sample was drawn
    # and in the training loop: with q = 1/4 some Poisson batches are empty; all steps counted
    gen = torch.Generator().manual_seed(3)
    result = train(
        model, ds, TrainSettings(epochs=6, sample_rate=0.25, noise_multiplier=1.0), CPU, sample_generator=gen
    )
    assert result.steps == 6 * int(1 / 0.25) == 24
    assert result.empty_batches > 0


def test_physical_batches_split_logical_ones_and_steps_are_logical(tiny):
    model = build_model(tiny, _config(tiny))
    result = train(
        model,
        _dataset(tiny, 24),
        TrainSettings(epochs=2, sample_rate=0.5, max_physical_batch_size=3, noise_multiplier=1.0),
        CPU,
    )
    assert result.steps == 2 * int(24 / 12)


def test_noise_calibration_agrees_with_opacus():
    for eps, q, steps in [(8.0, 0.032, 640), (1.0, 0.1, 30), (4.0, 0.05, 120)]:
        ours = calibrate_noise(eps, 1e-5, q, steps, "prv")
        ref = get_noise_multiplier(
            target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps, accountant="prv", epsilon_tolerance=0.01
        )
        assert ours == pytest.approx(ref, rel=1e-12)
    assert calibrate_noise(8.0, 1e-5, 0.032, 640) == pytest.approx(0.821, abs=0.01)  # notes' reference point


def test_noise_is_not_repeated_by_reseeding_the_process(tiny):
    results = []
    for _ in range(2):
        torch.manual_seed(0)  # the global RNG must not drive DP noise
        model = build_model(tiny, _config(tiny))
        train(model, _dataset(tiny), TrainSettings(epochs=1, sample_rate=0.5, noise_multiplier=1.0), CPU)
        results.append(model.trainable_state()["prompt.weight"])
    assert not torch.equal(results[0], results[1])


def test_non_private_mode_trains_and_says_so(tiny):
    model = build_model(tiny, _config(tiny))
    result = train(model, _dataset(tiny), TrainSettings(epochs=1, sample_rate=1 / 3, noise_multiplier=None), CPU)
    assert result.private is False and result.noise_multiplier is None and result.steps == 3


# --- backbone, fingerprint, saved form -------------------------------------------------------------
def test_fingerprint_stable_across_loads_and_sensitive_to_one_weight(tiny_dir, tiny, tmp_path):
    assert load_backbone(tiny_dir).fingerprint == tiny.fingerprint
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    assert load_backbone(copy).fingerprint == tiny.fingerprint  # path does not matter
    weights = load_file(str(copy / "model.safetensors"))
    key = next(k for k in weights if k.endswith("attention.self.query.weight"))
    weights[key][0, 0] += 1e-3
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert load_backbone(copy).fingerprint != tiny.fingerprint


def test_fingerprint_changes_with_tokenizer(tiny_dir, tiny, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 77
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_backbone(copy).fingerprint != tiny.fingerprint


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: d / "nope", "not found"),
        (lambda d: (d / "file.txt").write_text("x") and d / "file.txt", "must be a directory"),
        (lambda d: d, "no config.json"),
        (lambda d: (d / "config.json").write_text('{"model_type": "gpt2"}') and d, "unsupported encoder 'gpt2'"),
        (lambda d: (d / "config.json").write_text('{"model_type": "bert"}') and d, "no weights"),
    ],
)
def test_bad_backbone_directories_are_clear_errors(tmp_path, setup, message):
    with pytest.raises(InputError, match=message) as exc:
        load_backbone(setup(tmp_path))
    assert str(tmp_path) in str(exc.value)


def test_trainable_state_has_fixed_names_and_shapes(tiny):
    model = build_model(tiny, _config(tiny))
    state = model.trainable_state()
    assert tuple(state) == TRAINABLE_KEYS
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "prompt.weight": (4, 32),
        "head.weight": (3, 32),
        "head.bias": (3,),
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(TRAINABLE_KEYS)


def test_label_init_uses_label_token_embeddings(tiny):
    cfg = _config(tiny)
    cfg.labels = ["heart", "brain", "tumor"]
    prompt = build_model(tiny, cfg).prompt.weight
    table = tiny.model.get_input_embeddings().weight
    ids = tiny.tokenizer("heart brain tumor", add_special_tokens=False)["input_ids"]
    assert torch.equal(prompt[0], table[ids[0]]) and torch.equal(prompt[1], table[ids[1]])


def test_save_and_load_round_trip_and_fingerprint_check(tiny, tiny_backbone, tmp_path):
    model = build_model(tiny, _config(tiny))
    train(model, _dataset(tiny), TrainSettings(epochs=1, sample_rate=0.5, noise_multiplier=1.0), CPU)
    model.save_pretrained(tmp_path / "export")
    config, state = load_prompt(tmp_path / "export")
    assert config == model.config
    again = PromptClassifier.from_pretrained(tmp_path / "export", tiny)
    ids, mask, _ = _dataset(tiny).tensors
    assert torch.equal(again.eval()(ids, mask), model.eval()(ids, mask))
    other = load_backbone(tiny_backbone(seed=1))
    with pytest.raises(InputError, match="backbone_fingerprint"):
        PromptClassifier.from_pretrained(tmp_path / "export", other)


def test_an_old_export_keeps_its_meaning_and_a_bad_config_names_file_and_field(tiny, tmp_path):
    build_model(tiny, _config(tiny, normalize=True)).save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    doc = json.loads(path.read_text())
    del doc["normalize"], doc["prompt_layer"]  # written before either existed
    path.write_text(json.dumps(doc))
    config, _ = load_prompt(tmp_path / "old")
    # their meaning then (raw features, the prompt at the input), not today's defaults (normalize on)
    assert (config.normalize, config.prompt_layer) == (False, 0) and PromptConfig(["a", "b"], 1, "f").normalize
    path.write_text(json.dumps({**doc, "hidden_size": "32", "pooling": "max", "head": 1}))
    with pytest.raises(InputError) as err:
        load_prompt(tmp_path / "old")
    text = str(err.value)
    assert f"{path}: hidden_size: expected an integer, got '32'" in text, text
    assert f"{path}: pooling: expected one of 'mean', 'cls', got 'max'" in text and f"{path}: head: unknown key" in text


def test_the_model_defaults_are_the_federations_and_a_pinned_backbone_is_checked(tiny):
    fed = FederationConfig(name="d", labels=["a", "b"], training=TrainingSettings(train_prompt=True))
    bare = PromptConfig(labels=["a", "b"], hidden_size=tiny.hidden_size, backbone_fingerprint=tiny.fingerprint)
    # one source of defaults: ModelSettings (its prompt_layer null is the backbone's last layer)
    last = int(tiny.model.config.num_hidden_layers) - 1
    assert prompt_config(fed, tiny) == dataclasses.replace(bare, prompt_layer=last)
    plan = RoundPlan.for_run(fed, bare)
    assert (plan.n_virtual_tokens, plan.max_length, plan.normalize) == (4, 256, True)
    pinned = fed.replaced(model=fed.model.replaced(backbone_fingerprint="0" * 64))
    with pytest.raises(InputError, match=r"model\.backbone_fingerprint: pinned backbone 0000000000000000"):
        initial_global_state_for(pinned, tiny)


# --- the real default backbone on real abstracts ---------------------------------------------------
def _dp_training_on_real_abstracts(prompt_layer: int | None) -> None:
    """DP-SGD at epsilon 8 on 600 real abstracts learns what a majority guess cannot: the training
    loss falls, held-out accuracy beats the majority share (0.30) by 0.15, macro-F1 exceeds 0.4 (a
    majority guess scores 0.09). `prompt_layer` None: the last layer (the product's default).
    The generators are seeded so a failure reproduces; the product draws both from OS entropy."""
    import csv
    import random
    from collections import Counter
    from pathlib import Path

    from fedprompt.common.metrics import evaluate

    corpus = Path(__file__).resolve().parents[1].parent / "shared/data/medical-abstracts/medical_tc_test.csv"
    if not corpus.is_file():
        pytest.skip(f"shared corpus not found at {corpus}")
    rows = list(csv.DictReader(corpus.open(encoding="utf-8")))
    random.Random(0).shuffle(rows)
    train_rows, test_rows = rows[:600], rows[600:900]
    names = [
        "neoplasms",
        "digestive system diseases",
        "nervous system diseases",
        "cardiovascular diseases",
        "general pathological conditions",
    ]

    bb = load_backbone()  # embedded all-MiniLM-L6-v2

    def ds(rs):
        return encode(
            bb.tokenizer, [r["medical_abstract"] for r in rs], [int(r["condition_label"]) - 1 for r in rs], 64
        ).dataset

    train_ds, test_ds = ds(train_rows), ds(test_rows)
    cfg = PromptConfig(
        labels=names,
        hidden_size=bb.hidden_size,
        backbone_fingerprint=bb.fingerprint,
        n_virtual_tokens=10,
        max_length=64,
        normalize=False,  # the raw pooled features these margins were sized on
        prompt_layer=int(bb.model.config.num_hidden_layers) - 1 if prompt_layer is None else prompt_layer,
    )
    model = build_model(bb, cfg)
    loss_before = evaluate(model, train_ds, 5).summary()["loss"]
    q = 32 / len(train_ds)
    steps = 3 * int(1 / q)
    sigma = calibrate_noise(8.0, 1e-4, q, steps)  # delta < 1/n
    settings = TrainSettings(epochs=3, sample_rate=q, lr=0.05, noise_multiplier=sigma)
    noise, sampling = torch.Generator().manual_seed(100), torch.Generator().manual_seed(200)
    result = train(model, train_ds, settings, CPU, noise_generator=noise, sample_generator=sampling)
    assert result.private and result.steps == steps
    assert evaluate(model, train_ds, 5).summary()["loss"] < loss_before - 0.3
    majority = Counter(int(r["condition_label"]) for r in test_rows).most_common(1)[0][1] / len(test_rows)
    held_out = evaluate(model, test_ds, 5).summary()
    assert held_out["accuracy"] > majority + 0.15, (held_out, majority)
    assert held_out["macro_f1"] > 0.4, held_out


@pytest.mark.slow
def test_dp_training_on_real_abstracts_with_default_backbone():
    """The prompt at the last layer (the product's default), trained on cached layer states. Margins
    from six seeds (noise and sampling generators 100+k / 200+k): training loss down 0.50-0.58,
    held-out accuracy 0.48-0.55, macro-F1 0.45-0.54."""
    _dp_training_on_real_abstracts(None)


@pytest.mark.slow
@pytest.mark.heavy  # minutes: every DP-SGD step back-propagates through the whole backbone
def test_dp_training_an_input_prompt_on_real_abstracts_with_default_backbone():
    """The prompt at the input. Margins from six seeds: held-out accuracy 0.51-0.57, macro-F1 0.48-0.56."""
    _dp_training_on_real_abstracts(0)


def test_noise_memo_remembers_and_survives_a_bad_file(tmp_path):
    from fedprompt.client.dp import NoiseMemo

    memo = NoiseMemo(tmp_path / "ledger.json.noise-memo")
    args = (8.0, 1e-5, 0.5, 12, "prv")
    assert memo.get(args) is None
    memo.put(args, 1.25)
    assert NoiseMemo(memo.path).get(args) == 1.25  # another process (a new ClientApp) reads it
    assert memo.get((8.0, 1e-5, 0.5, 13, "prv")) is None  # any other argument: calibrate again
    memo.path.write_text("{not json")
    assert memo.get(args) is None
    memo.path.write_text(json.dumps({NoiseMemo._key(args): -1.0}))
    assert memo.get(args) is None  # never a non-positive sigma
