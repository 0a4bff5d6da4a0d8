"""`fedprompt personalize`: a global export adapted to one hospital's records, at that hospital
(tiny random BERT, synthetic records, CPU)."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

from fedprompt.client.personalize import (
    DEFAULT_PENALTY,
    GLOBAL,
    LOCAL_HEAD,
    METHODS,
    OWN,
    PERSONALIZED,
    PRIOR,
    Head,
    own_model_features,
    personalize_features,
    prior_shift,
)
from fedprompt.client.workspace import write_workspace
from fedprompt.common.backbone import load_backbone
from fedprompt.common.encoding import encode
from fedprompt.common.errors import InputError
from fedprompt.common.features import extract_features
from fedprompt.common.model import (
    HEAD_BIAS_KEY,
    HEAD_WEIGHT_KEY,
    PROMPT_KEY,
    PromptClassifier,
    PromptConfig,
    build_model,
    initial_state,
    load_prompt,
    save_prompt,
)

from site_isolation import watched
from tinybert import TOY_KEYWORDS, TOY_LABELS, TOY_NEUTRAL, make_tiny_backbone

LABELS, KEYWORDS, NEUTRAL = TOY_LABELS, TOY_KEYWORDS, TOY_NEUTRAL
FEDERATION_MIX = [0.8, 0.1, 0.1]  # what the global model learnt from
SITE_MIX = [0.1, 0.1, 0.8]  # this hospital: mostly neurology


def notes(rng: random.Random, mix: list[float], n: int) -> list[tuple[str, str]]:
    """Half the notes name their class's keywords; half are neutral, so only the label prior
    can tell them apart: a model that learnt another label mix gets those wrong here."""
    out = []
    for _ in range(n):
        y = rng.choices(range(len(LABELS)), weights=mix)[0]
        words = (
            rng.choices(NEUTRAL, k=5)
            if rng.random() < 0.5
            else rng.choices(KEYWORDS[y], k=3) + rng.choices(NEUTRAL, k=2)
        )
        out.append((" ".join(words), LABELS[y]))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """root/tinybert, root/otherbert, root/export (a global model fitted on FEDERATION_MIX notes),
    root/ws: hospital-1 (SITE_MIX: train, val, local test) and hospital-2 (must stay untouched)."""
    root = tmp_path_factory.mktemp("personalize").resolve()
    tiny = make_tiny_backbone(root / "tinybert", hidden=32, layers=2)
    make_tiny_backbone(root / "otherbert", seed=7, hidden=32, layers=2)
    bb = load_backbone(tiny)
    config = PromptConfig(
        labels=LABELS,
        hidden_size=bb.hidden_size,
        backbone_fingerprint=bb.fingerprint,
        n_virtual_tokens=4,
        max_length=24,
        normalize=True,
        extra={"run": "t"},
    )
    state = initial_state(bb, config)
    rng = random.Random(0)
    federation = notes(rng, FEDERATION_MIX, 300)
    model = build_model(bb, config, state)
    feats = extract_features(
        model, encode(bb.tokenizer, [t for t, _ in federation], [LABELS.index(y) for _, y in federation], 24).dataset
    )
    head, _ = own_model_features(feats, len(LABELS))
    save_prompt(root / "export", config, head.into(state))

    hospitals = {
        "1": (notes(rng, SITE_MIX, 120), notes(rng, SITE_MIX, 40)),
        "2": (notes(rng, FEDERATION_MIX, 60), notes(rng, FEDERATION_MIX, 20)),
    }
    local = {"1": notes(rng, SITE_MIX, 60), "2": notes(rng, FEDERATION_MIX, 20)}
    ws = write_workspace(root / "ws", name="t", labels=LABELS, hospitals=hospitals, local_tests=local)
    for hid in hospitals:
        path = ws / f"hospital-{hid}" / "site.yaml"
        data = yaml.safe_load(path.read_text())
        data["backbone"] = str(tiny)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return root


@pytest.fixture
def cli(monkeypatch):
    from fedprompt import cli

    monkeypatch.setattr(cli, "COMMANDS", ("personalize", "predict"))
    return cli.main


@pytest.fixture(scope="module")
def personalized(world) -> dict:
    """One `fedprompt personalize` of hospital-1, run with sockets forbidden and every opened file
    recorded: what it opened, tried to connect, printed, and changed under the world's root."""
    from fedprompt import cli

    patch = pytest.MonkeyPatch()
    patch.setattr(cli, "COMMANDS", ("personalize",))
    site, out = world / "ws" / "hospital-1" / "site.yaml", world / "out"
    try:
        with watched(world) as watch:
            code = cli.main(["personalize", "--site", str(site), "--model", str(world / "export"), "--out", str(out)])
    finally:
        patch.undo()
    return {
        "code": code,
        "out": out,
        "dials": watch.dials,
        "sockets": watch.sockets,
        "opened": watch.opened,
        "changed": watch.changed,
        "report": json.loads((out / "personalize.json").read_text()) if code == 0 else None,
    }


def test_reads_only_the_sites_files_writes_only_under_out_and_opens_no_socket(world, personalized):
    assert personalized["code"] == 0
    assert personalized["dials"] == [] and personalized["sockets"] == []
    assert personalized["changed"] == {"out", "out/personalize.json", "out/config.json", "out/prompt.safetensors"}
    site = world / "ws" / "hospital-1"
    allowed_files = {str(site / f) for f in ("site.yaml", "train.csv", "val.csv", "test.csv")}
    allowed_dirs = [str(world / d) for d in ("export", "tinybert", "out")]
    inside = {p for p in personalized["opened"] if p.startswith(str(world) + "/")}
    assert inside >= allowed_files  # it did read the site's records
    strays = {p for p in inside - allowed_files if not any(p == d or p.startswith(d + "/") for d in allowed_dirs)}
    assert strays == set()  # not hospital-2, not the federation file, not the ledger


def test_personalised_model_has_the_export_format_and_its_provenance(world, personalized):
    config, state = load_prompt(personalized["out"])
    base_config, base_state = load_prompt(world / "export")
    report = personalized["report"]
    assert torch.equal(state[PROMPT_KEY], base_state[PROMPT_KEY])  # the prompt is the federation's
    provenance = config.extra["personalized"]
    assert (
        config.extra["run"] == "t"
        and config.labels == LABELS
        and config.backbone_fingerprint == base_config.backbone_fingerprint
    )
    assert provenance["hospital_id"] == "hospital-1"
    assert (
        provenance["base_model_sha256"]
        == hashlib.sha256((world / "export" / "prompt.safetensors").read_bytes()).hexdigest()
    )
    validation = report["validation"]
    assert set(validation) == set(report["test"]) == {GLOBAL, PRIOR, LOCAL_HEAD, PERSONALIZED, OWN}
    # the chosen candidate is the first best on validation macro-F1, and it is what was saved
    order = [GLOBAL, PRIOR, LOCAL_HEAD]
    best = max(order, key=lambda m: validation[m]["macro_f1"])
    assert provenance["method"] == report["method"] == best and provenance["penalty"] == report["penalty"]
    assert (
        provenance["validation"][best]["macro_f1"]
        == validation[best]["macro_f1"]
        == validation[PERSONALIZED]["macro_f1"]
    )
    assert config.private is (best == GLOBAL)  # fitted on the site's records without DP
    assert report["num_records"] == {"train": 120, "validation": 40, "test": 60}
    assert report["test"][PERSONALIZED] == report["test"][best]


def test_personalised_beats_the_global_model_on_a_site_with_another_label_mix(personalized):
    test = personalized["report"]["test"]
    # The global model learnt mostly tumour notes; this site is mostly neurology, and half its
    # notes carry no keyword: the global model calls those tumour, the site's prior says neuro.
    assert test[PRIOR]["accuracy"] > test[GLOBAL]["accuracy"] + 0.1, test
    assert test[PERSONALIZED]["accuracy"] >= test[GLOBAL]["accuracy"] + 0.1, test


def test_predict_uses_the_personalised_model_and_names_its_hospital(world, personalized, cli, capsys):
    out = personalized["out"]
    assert (
        cli(
            [
                "predict",
                "--model",
                str(out),
                "--backbone",
                str(world / "tinybert"),
                "--text",
                "the patient reports pain",
                "--json",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    method = METHODS[personalized["report"]["method"]]
    assert json.loads(captured.out)["label"] in LABELS
    assert f"personalised for hospital-1 ({method})" in captured.err


def test_personalised_model_refuses_another_backbone(world, personalized, cli, capsys, tmp_path):
    other = world / "otherbert"
    with pytest.raises(InputError, match="backbone_fingerprint"):
        PromptClassifier.from_pretrained(personalized["out"], load_backbone(other))
    assert cli(["predict", "--model", str(personalized["out"]), "--backbone", str(other), "--text", "x"]) == 2
    assert "backbone_fingerprint" in capsys.readouterr().err

    # a site on another backbone cannot personalise the export either, and writes nothing
    site = tmp_path / "hospital-1"
    shutil.copytree(world / "ws" / "hospital-1", site)
    data = yaml.safe_load((site / "site.yaml").read_text())
    data["backbone"] = str(other)
    (site / "site.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    assert (
        cli(
            [
                "personalize",
                "--site",
                str(site / "site.yaml"),
                "--model",
                str(world / "export"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "backbone_fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_out_and_writes_nothing(world, cli, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    site = world / "ws" / "hospital-1" / "site.yaml"
    assert cli(["personalize", "--site", str(site), "--model", str(world / "export"), "--out", str(out)]) == 2
    assert f"{out}: output folder already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_refuses_to_personalise_a_personalised_model(world, personalized, cli, capsys, tmp_path):
    site = world / "ws" / "hospital-1" / "site.yaml"
    assert (
        cli(["personalize", "--site", str(site), "--model", str(personalized["out"]), "--out", str(tmp_path / "again")])
        == 2
    )
    assert "already personalised for hospital-1" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


# --- the pure core, on features ------------------------------------------------------------------


def test_prior_correction_shifts_the_bias_by_log_p_site_minus_log_p_model():
    # Zero features: the model predicts softmax(bias) for every record, so p_model is known exactly.
    bias = torch.tensor([0.0, 2.0, -1.0])
    head = Head(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), bias)
    labels = torch.tensor([0, 0, 0, 2])  # counts 3, 0, 1 -> add-one: 4/7, 1/7, 2/7
    feats = TensorDataset(torch.zeros(4, 4), labels)
    expected = torch.tensor([4 / 7, 1 / 7, 2 / 7]).double().log() - bias.double().softmax(-1).log()
    assert torch.allclose(prior_shift(head, feats, 3), expected, atol=1e-12)
    state = head.into({PROMPT_KEY: torch.zeros(2, 4)})
    config = PromptConfig(labels=["a", "b", "c"], hidden_size=4, backbone_fingerprint="x", n_virtual_tokens=2)
    result = personalize_features(state, config, feats, feats)
    prior = result.heads[PRIOR]
    assert torch.equal(prior.weight, head.weight) and torch.allclose(
        prior.bias.double(), bias.double() + expected, atol=1e-6
    )
    # ...so on zero features the corrected model predicts the site's smoothed label frequencies
    assert torch.allclose(
        prior.logits(torch.zeros(1, 4)).softmax(-1)[0], torch.tensor([4 / 7, 1 / 7, 2 / 7]).double(), atol=1e-6
    )

    # Any features: the shift uses the mean predicted distribution over the site's records.
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(2))
    p_model = torch.stack([(head.weight.double() @ xi.double() + bias.double()).softmax(-1) for xi in x]).mean(0)
    p_site = torch.tensor([(y == k).sum().item() + 1 for k in range(3)]).double() / 53
    assert torch.allclose(prior_shift(head, TensorDataset(x, y), 3), p_site.log() - p_model.log(), atol=1e-12)


def test_without_validation_the_local_head_is_taken_with_the_default_penalty():
    gen = torch.Generator().manual_seed(3)
    y = torch.randint(0, 3, (60,), generator=gen)
    x = torch.nn.functional.one_hot(y, 4).float() + 0.3 * torch.randn(60, 4, generator=gen)
    state = {PROMPT_KEY: torch.ones(2, 4), HEAD_WEIGHT_KEY: torch.zeros(3, 4), HEAD_BIAS_KEY: torch.zeros(3)}
    config = PromptConfig(labels=["a", "b", "c"], hidden_size=4, backbone_fingerprint="x", n_virtual_tokens=2)
    result = personalize_features(state, config, TensorDataset(x, y))
    assert result.method == LOCAL_HEAD and result.penalty == DEFAULT_PENALTY and result.validation is None
    assert torch.equal(result.state[PROMPT_KEY], state[PROMPT_KEY])
    assert torch.equal(result.state[HEAD_WEIGHT_KEY], result.heads[LOCAL_HEAD].weight)
    own, penalty = own_model_features(TensorDataset(x, y), 3)
    assert penalty == DEFAULT_PENALTY and (own.logits(x).argmax(-1) == y).float().mean() > 0.9
