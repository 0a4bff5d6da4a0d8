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
from conftest import cli_main, edit_yaml
from torch.utils.data import TensorDataset

from fedprompt.client.personalize import (
    CANDIDATES,
    FOLDS,
    GLOBAL,
    METHODS,
    OWN,
    PENALTIES,
    PERSONALIZED,
    PRIOR,
    SMALL_SITE_FOLDS,
    Head,
    criterion,
    cv_folds,
    fit_head,
    own_model_features,
    personalize_features,
    prior_shift,
    scores,
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
from tinybert import TOY_KEYWORDS, TOY_LABELS, TOY_NEUTRAL

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
def world(tmp_path_factory, tiny_dir, other_dir) -> Path:
    """root/tinybert, root/otherbert, root/export (a global model fitted on FEDERATION_MIX notes),
    root/ws: hospital-1 (SITE_MIX: train, val, local test) and hospital-2 (must stay untouched)."""
    root = tmp_path_factory.mktemp("personalize").resolve()
    tiny = shutil.copytree(tiny_dir, root / "tinybert")  # inside the root its file watch covers
    shutil.copytree(other_dir, root / "otherbert")
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
    head = own_model_features(feats, len(LABELS))
    save_prompt(root / "export", config, head.into(state))

    hospitals = {
        "1": (notes(rng, SITE_MIX, 120), notes(rng, SITE_MIX, 40)),
        "2": (notes(rng, FEDERATION_MIX, 60), notes(rng, FEDERATION_MIX, 20)),
    }
    local = {"1": notes(rng, SITE_MIX, 60), "2": notes(rng, FEDERATION_MIX, 20)}
    write_workspace(root / "ws", name="t", labels=LABELS, hospitals=hospitals, local_tests=local, backbone=tiny)
    return root


@pytest.fixture
def cli(cli_with):
    return cli_with("personalize", "predict")


@pytest.fixture(scope="module")
def personalized(world) -> dict:
    """One `fedprompt personalize` of hospital-1, run with sockets forbidden and every opened file
    recorded: what it opened, tried to connect, printed, and changed under the world's root."""
    site, out = world / "ws" / "hospital-1" / "site.yaml", world / "out"
    with pytest.MonkeyPatch.context() as patch:
        main = cli_main(patch, "personalize")
        with watched(world) as watch:
            code = main(["personalize", "--site", str(site), "--model", str(world / "export"), "--out", str(out)])
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
    cv = report["cross_validation"]
    assert set(cv) == set(report["validation"]) == set(report["test"]) == {*CANDIDATES, PERSONALIZED}
    assert report["folds"] == FOLDS and all(row["num_examples"] == 120 for row in cv.values())
    # the chosen candidate is the first best (simplest first) on the pooled cross-validation
    # criterion of the train split, over every penalty; the validation split plays no part
    grid = report["cross_validation_grid"]
    assert len(grid) == 2 + 2 * len(PENALTIES)
    assert all(row["criterion"] == round((row["accuracy"] + row["macro_f1"]) / 2, 12) for row in grid)
    top = max(grid, key=lambda row: row["criterion"])
    best = top["candidate"]
    assert (
        provenance["method"] == report["method"] == best
        and provenance["penalty"] == report["penalty"] == top["penalty"]
    )
    assert provenance["cross_validation"] == cv and cv[PERSONALIZED] == cv[best]
    assert cv[best]["criterion"] == top["criterion"] == max(cv[m]["criterion"] for m in CANDIDATES)
    assert config.private is (best == GLOBAL)  # fitted on the site's records without DP
    assert report["num_records"] == {"train": 120, "validation": 40, "test": 60}
    assert report["test"][PERSONALIZED] == report["test"][best]
    assert report["validation"][PERSONALIZED] == report["validation"][best]


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
    edit_yaml(site / "site.yaml", lambda d: d.update(backbone=str(other)))
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
    result = personalize_features(state, config, feats)
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


def clusters(n: int, seed: int, noise: float = 0.1) -> TensorDataset:
    """n records of 3 labels, nearly in turn, each feature its label's axis in 8 dimensions plus
    noise, unit length: a site whose features separate its labels."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.nn.functional.one_hot(y, 8).float() + noise * torch.randn(n, 8, generator=gen)
    return TensorDataset(torch.nn.functional.normalize(x, dim=-1), y)


def three_labels(head: Head) -> tuple[dict[str, torch.Tensor], PromptConfig]:
    config = PromptConfig(labels=["a", "b", "c"], hidden_size=8, backbone_fingerprint="x", n_virtual_tokens=2)
    return head.into({PROMPT_KEY: torch.ones(2, 8)}), config


def test_the_sites_own_model_is_chosen_where_it_wins_cross_validation():
    # A global model confidently wrong for this site: its rows permuted (label a's row is c's
    # axis...) and 1e5 long. The local head cannot undo that at any penalty: a row moves at most
    # sum_i ||x_i|| / penalty = 60 / 0.01 = 6,000 from the global row. The site alone can.
    axes = torch.eye(3, 8)
    state, config = three_labels(Head(1e5 * axes[[2, 0, 1]], torch.zeros(3)))
    train, test = clusters(60, seed=0), clusters(60, seed=1)
    result = personalize_features(state, config, train)
    assert result.method == OWN and result.folds == FOLDS
    cv = result.cross_validation
    assert cv is not None
    own = criterion(cv[(OWN, result.penalty)])
    assert own == 1.0 and all(criterion(s) < own for (m, _), s in cv.items() if m != OWN)
    # refitted on the whole train split at the chosen penalty, and that is the saved head
    refit = fit_head(train, Head(torch.zeros(3, 8), torch.zeros(3)), result.penalty)
    assert torch.equal(result.heads[OWN].weight, refit.weight) and torch.equal(
        result.state[HEAD_WEIGHT_KEY], refit.weight
    )
    assert torch.equal(result.state[PROMPT_KEY], state[PROMPT_KEY])
    on_test = {m: scores(head, test, 3) for m, head in result.heads.items()}
    assert on_test[OWN]["macro_f1"] == 1.0 and on_test[GLOBAL]["macro_f1"] == 0.0
    assert on_test[OWN]["macro_f1"] >= on_test[GLOBAL]["macro_f1"]


def test_a_site_with_very_few_records_keeps_a_good_global_model():
    # Six noisy records (leave-one-out): a head fitted on five of them misses, the global model
    # (the right axes) does not, and on a tie the global model would win anyway.
    state, config = three_labels(Head(10 * torch.eye(3, 8), torch.zeros(3)))
    train, test = clusters(6, seed=2, noise=0.6), clusters(300, seed=3, noise=0.6)
    result = personalize_features(state, config, train)
    assert result.method == GLOBAL and result.penalty is None and result.folds == 6
    assert torch.equal(result.state[HEAD_WEIGHT_KEY], state[HEAD_WEIGHT_KEY])
    assert torch.equal(result.state[HEAD_BIAS_KEY], state[HEAD_BIAS_KEY])
    on_test = {m: scores(head, test, 3)["macro_f1"] for m, head in result.heads.items()}
    assert on_test[GLOBAL] >= max(on_test.values()) - 0.01, on_test


def test_folds_on_a_tiny_site_are_stratified_deterministic_and_the_choice_too():
    y = torch.tensor([0, 1, 2] * 4)  # 12 records, 3 labels of 4
    folds = cv_folds(y)
    assert folds is not None and torch.equal(folds, cv_folds(y))
    assert sorted(folds.tolist()) == sorted(list(range(SMALL_SITE_FOLDS)) + [0, 1])  # 10 folds, none empty
    for label in range(3):  # a label with fewer records than folds: one of them per fold
        assert len(set(folds[y == label].tolist())) == 4
    assert cv_folds(torch.tensor([1])) is None and cv_folds(torch.tensor([0, 1])).tolist() in ([0, 1], [1, 0])
    # 5 folds from 50 records: each fold's label mix is the site's, to within a record
    y = torch.tensor([0] * 30 + [1] * 17 + [2] * 6)
    folds = cv_folds(y)
    assert folds.max() + 1 == FOLDS
    for label in range(3):
        counts = torch.bincount(folds[y == label], minlength=FOLDS)
        assert counts.max() - counts.min() <= 1

    state, config = three_labels(Head(torch.randn(3, 8, generator=torch.Generator().manual_seed(4)), torch.zeros(3)))
    train = clusters(12, seed=5, noise=0.5)
    first, again = (personalize_features(state, config, train) for _ in range(2))
    assert first.folds == SMALL_SITE_FOLDS and first.method in CANDIDATES
    assert (first.method, first.penalty) == (again.method, again.penalty)
    assert all(torch.equal(first.state[k], again.state[k]) for k in first.state)
    # a label with a single record, and a site of one record: no crash; one record keeps the global model
    lone = TensorDataset(train.tensors[0][:10], torch.tensor([0, 1] * 4 + [1, 2]))
    assert personalize_features(state, config, lone).folds == 10
    single = personalize_features(state, config, TensorDataset(train.tensors[0][:1], train.tensors[1][:1]))
    assert single.method == GLOBAL and single.folds == 0 and single.cross_validation is None


def test_own_model_features_is_a_plain_probe_at_one_penalty():
    gen = torch.Generator().manual_seed(3)
    y = torch.randint(0, 3, (60,), generator=gen)
    x = torch.nn.functional.one_hot(y, 4).float() + 0.3 * torch.randn(60, 4, generator=gen)
    own = own_model_features(TensorDataset(x, y), 3)
    assert (own.logits(x).argmax(-1) == y).float().mean() > 0.9
    strong = own_model_features(TensorDataset(x, y), 3, penalty=100.0)
    assert strong.weight.norm() < own.weight.norm()  # the penalty pulls towards zero
