"""The one schema layer (common/schema.py): site.yaml, federation.yaml and the round plan are
validated by the same strict models; every problem names file, line and field; overrides are
validated too; the published JSON Schemas are what the models generate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from fedprompt.common.config import FederationConfig, FedTrimmedAvgSettings, SiteConfig, json_schemas
from fedprompt.common.errors import InputError
from fedprompt.common.plan import RoundPlan

DOCS = Path(__file__).resolve().parents[1] / "docs" / "schema"

SITE = """\
hospital_id: hospital-1
train: train.csv
validation: val.csv
privacy:
  max_epsilon: 8.0
  delta: 1e-5
  min_noise_multiplier: 0.0
ledger: ledger/privacy-ledger.json
max_physical_batch_size: 32
weight: 500.0
trusted_apps: []
"""

FEDERATION = """\
name: demo
labels:
  - cardiovascular
  - name: neoplasms
    description: tumours
rounds: 20
round_timeout: 600.0
strategy:
  name: fedtrimmedavg
  proximal_mu: 0.01
  trim_beta: 0.2
  server_lr: 0.1
  update_norm_bound: 100.0
model:
  n_virtual_tokens: 4
  max_length: 256
  pooling: mean
training:
  local_epochs: 1
  sample_rate: 0.25
  lr: 8.0
privacy:
  target_epsilon: 8.0
  max_grad_norm: 1.0
"""


def test_published_json_schemas_are_the_models():
    """docs/schema/ cannot go stale: regenerate with `python -m fedprompt.common.config docs/schema`."""
    for name, text in json_schemas().items():
        assert (DOCS / name).read_text(encoding="utf-8") == text, f"docs/schema/{name} is stale"


def test_published_schemas_judge_files_as_the_loader_does(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    schemas = {name: json.loads(text) for name, text in json_schemas().items()}
    for text, name in ((SITE, "site.schema.json"), (FEDERATION, "federation.schema.json")):
        # YAML 1.2 reads 1e-5 as a number
        jsonschema.validate(yaml.safe_load(text.replace("1e-5", "1.0e-5")), schemas[name])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            yaml.safe_load(FEDERATION.replace("trim_beta: 0.2", "trim_beta: 0.7")), schemas["federation.schema.json"]
        )


def test_good_files_load(tmp_path):
    (tmp_path / "site.yaml").write_text(SITE)
    site = SiteConfig.load(tmp_path / "site.yaml")
    # `1e-5`: a number, as YAML 1.2 reads it
    assert site.privacy.delta == 1e-5 and isinstance(site.privacy.delta, float)
    assert site.train == tmp_path / "train.csv" and site.ledger == tmp_path / "ledger" / "privacy-ledger.json"
    assert site.source == tmp_path / "site.yaml"
    (tmp_path / "federation.yaml").write_text(FEDERATION)
    fed = FederationConfig.load(tmp_path / "federation.yaml")
    assert fed.label_names == ["cardiovascular", "neoplasms"] and fed.strategy.name == "fedtrimmedavg"


# (file, the line to change, its replacement, the field named): a bad value in every section.
BAD_VALUES = [
    ("site", "hospital_id: hospital-1", "hospital_id: hospital 1", "hospital_id"),
    ("site", "train: train.csv", "train: 3", "train"),
    ("site", "max_physical_batch_size: 32", "max_physical_batch_size: 0", "max_physical_batch_size"),
    ("site", "weight: 500.0", "weight: -1", "weight"),
    ("site", "trusted_apps: []", "trusted_apps: [abc]", "trusted_apps[0]"),
    ("site", "  max_epsilon: 8.0", "  max_epsilon: 0", "privacy.max_epsilon"),
    ("site", "  delta: 1e-5", "  delta: 1.5", "privacy.delta"),
    ("site", "  min_noise_multiplier: 0.0", "  min_noise_multiplier: -1.0", "privacy.min_noise_multiplier"),
    ("federation", "name: demo", "name: ' '", "name"),
    ("federation", "rounds: 20", "rounds: 0", "rounds"),
    ("federation", "round_timeout: 600.0", "round_timeout: .nan", "round_timeout"),
    ("federation", "  - cardiovascular", "  - [cardiovascular]", "labels[0]"),
    ("federation", "    description: tumours", "    description: [tumours]", "labels[1].description"),
    ("federation", "  name: fedtrimmedavg", "  name: fedsgd", "strategy.name"),
    ("federation", "  trim_beta: 0.2", "  trim_beta: 0.7", "strategy.trim_beta"),
    ("federation", "  update_norm_bound: 100.0", "  update_norm_bound: 0", "strategy.update_norm_bound"),
    ("federation", "  n_virtual_tokens: 4", "  n_virtual_tokens: 4.5", "model.n_virtual_tokens"),
    ("federation", "  max_length: 256", "  max_length: 4096", "model.max_length"),
    ("federation", "  pooling: mean", "  pooling: max", "model.pooling"),
    ("federation", "  sample_rate: 0.25", "  sample_rate: 1.5", "training.sample_rate"),
    ("federation", "  lr: 8.0", "  lr: '8'", "training.lr"),
    ("federation", "  target_epsilon: 8.0", "  target_epsilon: 0", "privacy.target_epsilon"),
    ("federation", "  max_grad_norm: 1.0", "  max_grad_norm: true", "privacy.max_grad_norm"),
]


@pytest.mark.parametrize("which, line, bad, field", BAD_VALUES, ids=[f"{w}-{f}" for w, _, _, f in BAD_VALUES])
def test_a_bad_value_in_any_section_names_file_line_and_field(tmp_path, which, line, bad, field):
    text, model = (SITE, SiteConfig) if which == "site" else (FEDERATION, FederationConfig)
    assert text.count(line + "\n") == 1
    path = tmp_path / f"{which}.yaml"
    path.write_text(text.replace(line + "\n", bad + "\n"))
    number = text.splitlines().index(line) + 1
    with pytest.raises(InputError) as err:
        model.load(path)
    assert len(err.value.problems) == 1, str(err.value)
    assert re.fullmatch(rf"{re.escape(f'{path}:{number}: {field}: ')}expected .+", str(err.value)), str(err.value)
    assert err.value.exit_code == 2


def test_every_problem_of_a_file_at_once(tmp_path):
    path = tmp_path / "federation.yaml"
    path.write_text(
        FEDERATION.replace("trim_beta: 0.2", "trim_beta: 0.7")
        .replace("rounds: 20", "rounds: many")
        .replace("pooling: mean", "pooling: mean\n  colour: red")
    )
    with pytest.raises(InputError) as err:
        FederationConfig.load(path)
    assert str(err.value).splitlines() == [
        f"{path}:6: rounds: expected an integer, got 'many'",
        f"{path}:11: strategy.trim_beta: expected 0 < trim_beta < 0.5, got 0.7",
        f"{path}:18: model.colour: unknown key (expected one of: backbone_fingerprint, head_init, logit_scale, "
        "max_length, n_virtual_tokens, normalize, pooling, prompt_init, prompt_layer, prompt_style, seed)",
    ]


def test_overrides_are_validated_and_never_mutate(tmp_path):
    (tmp_path / "federation.yaml").write_text(FEDERATION)
    fed = FederationConfig.load(tmp_path / "federation.yaml")
    with pytest.raises(ValidationError):
        fed.rounds = 3  # frozen: an override makes a new, validated object
    more = fed.replaced(rounds=3, origin="--rounds")
    assert (more.rounds, fed.rounds, more.source) == (3, 20, fed.source)
    with pytest.raises(InputError, match=r"^--rounds: expected >= 1, got 0$"):
        fed.replaced(rounds=0, origin="--rounds")
    with pytest.raises(
        InputError, match=r"federation.yaml: strategy.trim_beta: expected 0 < trim_beta < 0.5, got 0.6$"
    ):
        fed.replaced(strategy={"name": "fedtrimmedavg", "trim_beta": 0.6})
    with pytest.raises(ValidationError):
        FedTrimmedAvgSettings(name="fedtrimmedavg", trim_beta=0.5)


def test_cli_rounds_zero_is_refused_by_the_federation_rule(tmp_path, cli_with, capsys):
    out = tmp_path / "run"
    assert cli_with("simulate")(["simulate", "--rounds", "0", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "error: --rounds: expected >= 1, got 0"
    assert not out.exists()  # refused before the demo workspace is written
    (tmp_path / "federation.yaml").write_text(FEDERATION.replace("rounds: 20", "rounds: 0"))
    with pytest.raises(InputError, match=r"federation.yaml:6: rounds: expected >= 1, got 0$"):  # the same words
        FederationConfig.load(tmp_path / "federation.yaml")


PLAN = dict(
    run_name="demo",
    round=3,
    total_rounds=20,
    labels=["a", "b"],
    hidden_size=8,
    backbone_fingerprint="f" * 64,
    n_virtual_tokens=4,
    pooling="mean",
    max_length=32,
    prompt_init="labels",
    normalize=True,
    seed=0,
    local_epochs=1,
    sample_rate=0.25,
    batch_size=0,
    min_expected_batch=32,
    lr=8.0,
    optimizer="sgd",
    train_prompt=False,
    class_sums_share=0.5,
    max_noise_ratio=4.0,
    noise_lr_ref=0.01,
    private=True,
    target_epsilon=8.0,
    delta=0.0,
    max_grad_norm=1.0,
)


def test_round_plan_round_trips_through_its_config_record():
    plan = RoundPlan(**PLAN)
    record = plan.to_config_record()
    assert set(record) == {f"fp.{k}" for k in RoundPlan.model_fields}
    record["server-round"] = 3  # Flower's own keys ride along and are not the plan's
    assert RoundPlan.from_config_record(record) == plan


def test_a_malformed_round_plan_is_refused_with_every_reason():
    record = RoundPlan(**PLAN).to_config_record()
    del record["fp.lr"]
    record["fp.sample_rate"] = 2.0
    record["fp.private"] = 1
    record["fp.labels"] = ["a", "a"]
    record["fp.colour"] = "red"
    with pytest.raises(InputError) as err:
        RoundPlan.from_config_record(record)
    assert str(err.value).splitlines() == [
        "the aggregator's round plan: fp.labels: duplicate label(s): a",
        "the aggregator's round plan: fp.sample_rate: expected 0 < sample_rate <= 1, got 2.0",
        "the aggregator's round plan: fp.lr: missing required key",
        "the aggregator's round plan: fp.private: expected true or false, got 1",
        "the aggregator's round plan: fp.colour: unknown key (expected one of: "
        + ", ".join(sorted(RoundPlan.model_fields))
        + ")",
    ]


ROUND = {
    "round": 1,
    "seconds": 2.5,
    "evaluate": None,
    "test": {"accuracy": 0.5, "macro_f1": 0.4, "loss": float("nan"), "num_examples": 20},
    "hospitals": {
        "hospital-1": {"status": "ok", "weight": 500.0, "epsilon_spent": 1.5, "epsilon_cap": 8.0, "upload_bytes": 100},
        "hospital-2": {"status": "refused", "reason": "budget"},
    },
    "upload_bytes": 100,
}


def test_run_files_are_read_through_their_models(tmp_path):
    """metrics.json and the checkpoint's state.json: the aggregator's writer and every reader share one model."""
    from fedprompt.server.history import read_checkpoint_state, read_metrics

    metrics = {
        "run": "demo",
        "outcome": "trained",
        "outcome_reason": None,
        "private": True,
        "strategy": "fedavg",
        "backbone_fingerprint": "f" * 64,
        "labels": ["a", "b"],
        "rounds": [ROUND],
        "export": None,
    }
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    read = read_metrics(path)
    assert read["rounds"][0]["hospitals"]["hospital-2"] == {
        "status": "refused",
        "reason": "budget",
        "weight": 0.0,
        "epsilon_spent": None,
        "epsilon_cap": None,
        "delta": None,
        "ledger_head": None,
        "upload_bytes": 0,
    }
    bad = {**metrics, "rounds": [{**ROUND, "hospitals": {"hospital-1": {"status": "fine"}}, "upload_bytes": -1}]}
    path.write_text(json.dumps(bad))
    with pytest.raises(
        InputError,
        match=r"unreadable metrics: rounds\[0\]\.hospitals\.hospital-1\.status: expected one of 'ok', "
        r"'refused', 'rejected', 'failed', got 'fine'; rounds\[0\]\.upload_bytes: expected >= 0, got -1$",
    ):
        read_metrics(path)
    state = tmp_path / "state.json"
    doc = {
        "format": "fedprompt-checkpoint/1",
        "run": "demo",
        "round": 1,
        "tensors": "global-r0001.safetensors",
        "backbone_fingerprint": "f" * 64,
        "history": [ROUND],
    }
    state.write_text(json.dumps(doc))
    assert read_checkpoint_state(state).round == 1
    # never a file outside the checkpoint
    state.write_text(json.dumps({**doc, "tensors": "../../elsewhere.safetensors"}))
    with pytest.raises(InputError, match=r"unreadable checkpoint: tensors: expected a string matching"):
        read_checkpoint_state(state)
