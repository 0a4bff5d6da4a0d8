"""A site's limits on what an aggregator may ask (site.yaml `limits`, client/limits.py), and its check
of the model it receives: each refused as "configuration" through the real train_round /
evaluate_round on a real site directory, before any calibration, noise memo or ledger entry (the
ledger's folder is byte-for-byte unchanged); `fedprompt plan` says so with exit 1, no traceback."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import edit_yaml, make_workspace
from flwr.app import Array, ArrayRecord, RecordDict

from fedprompt.cli import main
from fedprompt.client.hospital import evaluate_round, train_round
from fedprompt.client.workspace import list_hospitals, load_workspace
from fedprompt.common.config import FederationConfig, SiteConfig, SiteLimits
from fedprompt.common.model import HEAD_BIAS_KEY, HEAD_WEIGHT_KEY, PROMPT_KEY
from fedprompt.common.plan import RoundPlan
from fedprompt.common.wire import ARRAYS, STATUS, state_to_arrays
from fedprompt.server.federation import RunSpec, prepare_run
from fedprompt.simulation import ensure_ledgers

ROUNDS = 5  # the default limits.min_total_rounds: the workspace's own plan is within every default


@pytest.fixture
def site(tmp_path, tiny_dir):
    """(the aggregator's prepared run, site.yaml) of a one-hospital workspace with its ledger."""
    ws = make_workspace(
        tmp_path,
        tiny_dir,
        hospitals=1,
        per_hospital=20,
        test_size=10,
        overrides={"rounds": ROUNDS, "model": {"n_virtual_tokens": 2, "max_length": 16}},
        allow_non_private=False,
        accountant="rdp",  # PRV costs seconds on a shared host
        name="limits",
    )
    ensure_ledgers(ws)
    fed, _, _ = load_workspace(ws)
    return prepare_run(RunSpec(fed, tmp_path / "out", None, tiny_dir)), list_hospitals(ws)[0]


def _content(run, arrays: ArrayRecord | None = None, **plan_changes) -> RecordDict:
    config = RoundPlan.for_run(run.spec.federation, run.prompt, round=1).to_config_record()
    config.update({f"fp.{k}": v for k, v in plan_changes.items()})
    return RecordDict({ARRAYS: arrays if arrays is not None else state_to_arrays(run.state), "config": config})


def _ledger_folder(site_yaml: Path) -> dict[str, bytes]:
    """Every file beside the ledger (the ledger, its anchor, the noise memo), by name."""
    folder = SiteConfig.load(site_yaml).ledger.parent
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _refused(handler, content: RecordDict, site_yaml: Path, caplog, why: str) -> None:
    """`handler` refuses `content` as "configuration", logs `why`, and the ledger's folder is untouched."""
    before = _ledger_folder(site_yaml)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedprompt.hospital"):
        reply = handler(content, site_yaml)
    assert (reply[STATUS]["status"], reply[STATUS]["reason"]) == ("refused", "configuration"), caplog.text
    assert why in caplog.text
    assert _ledger_folder(site_yaml) == before  # no entry, no memo, no anchor rewrite


def _arrays(shapes: dict[str, tuple[int, ...]], value: float = 0.0, dtype=np.float32) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(shape, value, dtype=dtype)) for k, shape in shapes.items()})


def test_each_limit_refuses_before_anything_is_spent(site, caplog):
    run, site_yaml = site
    ledger_names = set(_ledger_folder(site_yaml))
    cases = [
        (
            {"total_rounds": 1_000_000},
            "limits.max_total_rounds: the plan has 1000000 rounds, above this site's limit 200",
        ),
        ({"round": ROUNDS + 1}, f"the plan's round {ROUNDS + 1} is beyond its total of {ROUNDS} rounds"),
        # 4 steps a round at sample_rate 0.25: 10,000 epochs x 4 x 5 rounds
        ({"local_epochs": 10_000}, "limits.max_steps: the run plans 200,000 DP-SGD steps"),
        ({"batch_size": 8}, "limits.allow_fixed_batch: the plan fixes the expected batch (batch_size 8)"),
        ({"total_rounds": 2}, "limits.min_total_rounds: the plan's noise would be calibrated for 2 round(s)"),
    ]
    for changes, why in cases:
        _refused(train_round, _content(run, **changes), site_yaml, caplog, why)
    # The separate evaluate message obeys the same limits.
    _refused(evaluate_round, _content(run, total_rounds=1_000_000), site_yaml, caplog, "limits.max_total_rounds")

    # Limits the site lowers: the tensors' size and the run's epsilon (the plan asks for 8).
    edit_yaml(site_yaml, lambda d: d["limits"].update(max_tensor_values=100, max_run_epsilon=2.0))
    _refused(train_round, _content(run), site_yaml, caplog, "limits.max_tensor_values: the plan's prompt and head hold")
    edit_yaml(site_yaml, lambda d: d["limits"].update(max_tensor_values=1_000_000))
    _refused(
        train_round,
        _content(run),
        site_yaml,
        caplog,
        "limits.max_run_epsilon: the plan targets epsilon 8 for the run, above this site's per-run limit 2",
    )
    # A site that allows fixed batches bounds their steps by its declared size, or refuses without one.
    edit_yaml(site_yaml, lambda d: d["limits"].update(max_run_epsilon=None, allow_fixed_batch=True, max_steps=50))
    size = SiteConfig.load(site_yaml).weight
    assert size is not None
    steps = ROUNDS * int(size)  # batch 1 of the declared size: q = 1 / size, size steps a round
    _refused(train_round, _content(run, batch_size=1), site_yaml, caplog, f"the run plans {steps:,} DP-SGD steps")
    edit_yaml(site_yaml, lambda d: d.update(weight=None))
    _refused(train_round, _content(run, batch_size=1), site_yaml, caplog, "weight: the plan fixes the expected batch")
    assert set(_ledger_folder(site_yaml)) == ledger_names  # nothing was calibrated: no noise memo appeared

    # Within the limits (max_run_epsilon null: the lifetime cap wins silently over a larger target), it trains.
    edit_yaml(site_yaml, lambda d: d["limits"].update(max_run_epsilon=None))
    before = _ledger_folder(site_yaml)
    reply = train_round(_content(run, target_epsilon=50.0), site_yaml)
    assert reply[STATUS]["status"] == "ok"
    assert _ledger_folder(site_yaml) != before  # this one is charged


def test_received_models_are_checked_before_training(site, caplog):
    run, site_yaml = site
    shapes, head = run.prompt.shapes(), HEAD_WEIGHT_KEY
    values = {k: t.numpy().astype(np.float32) for k, t in run.state.items()}
    values[head][0, 0] = np.nan  # one value of the real model
    nan = {k: Array(v) for k, v in values.items()}
    inf = {**nan, head: Array(np.full(shapes[head], np.inf, dtype=np.float32))}
    wrong_shape = {**shapes, head: (shapes[head][0] + 1, shapes[head][1])}
    missing = {k: v for k, v in shapes.items() if k != head}
    cases = [
        (ArrayRecord(nan), f"{head}: non-finite values (NaN or Inf)"),
        (ArrayRecord(inf), f"{head}: non-finite values (NaN or Inf)"),
        (_arrays(wrong_shape), f"{head}: shape {wrong_shape[head]} != expected {shapes[head]}"),
        (_arrays(missing), "tensor keys"),
        (_arrays(shapes, dtype=np.float64), "dtype float64 != float32"),
        (_arrays(shapes, value=1e5), "values up to 1e+05 in size, beyond +-10000"),
    ]
    for arrays, why in cases:
        _refused(train_round, _content(run, arrays), site_yaml, caplog, why)
        _refused(evaluate_round, _content(run, arrays), site_yaml, caplog, why)


def test_a_5005_label_model_is_refused(site, caplog):
    """The plan and the tensors agree (5,005 labels): the site's label limit refuses it, as the
    aggregator's typo or attack it is, before a 7.7 MB model is trained or charged."""
    run, site_yaml = site
    labels = [f"label-{i}" for i in range(5005)]
    hidden, virtual = run.prompt.hidden_size, run.prompt.n_virtual_tokens
    arrays = _arrays({PROMPT_KEY: (virtual, hidden), HEAD_WEIGHT_KEY: (5005, hidden), HEAD_BIAS_KEY: (5005,)})
    _refused(
        train_round,
        _content(run, arrays, labels=labels),
        site_yaml,
        caplog,
        "limits.max_labels: the plan has 5005 labels, above this site's limit 1000",
    )


def test_a_generated_workspace_admits_its_own_plan_only():
    """write_workspace's sites widen the defaults just enough for the federation they are written with."""
    fed = FederationConfig(name="x", labels=["a", "b"], rounds=3, training={"batch_size": 8})
    limits = SiteLimits.admitting(fed)
    assert (limits.min_total_rounds, limits.allow_fixed_batch, limits.max_total_rounds) == (3, True, 200)
    assert SiteLimits.admitting(FederationConfig(name="x", labels=["a", "b"])) == SiteLimits()


def test_fedprompt_plan_refuses_a_million_rounds_without_a_traceback(site, tiny_dir, capsys):
    run, site_yaml = site
    ws = site_yaml.parent.parent
    before = _ledger_folder(site_yaml)
    assert main(["plan", "--workspace", str(ws), "--backbone", str(tiny_dir), "--rounds", "1000000"]) == 1
    out, err = capsys.readouterr()
    assert "REFUSES [configuration]" in out and "Traceback" not in out + err
    assert "fedprompt plan: no hospital would train this run (1 refuse)" in err
    assert "limits.max_total_rounds: the plan has 1000000 rounds, above this site's limit 200" in err
    assert _ledger_folder(site_yaml) == before


def _pin_refused(site_yaml: Path, content: RecordDict, caplog, why: str) -> None:
    """train, evaluate and pre-flight messages are all refused as "configuration", before a record is read."""
    from fedprompt.client.preflight import preflight

    for handler in (train_round, evaluate_round, preflight):
        _refused(handler, content, site_yaml, caplog, why)


def test_a_plan_with_another_label_space_is_refused_before_a_record_is_read(site, caplog):
    """The label space site.yaml pins is the judge, never the records: an aggregator that drops a label
    the site's records hold, or adds one they don't, gets the same "configuration" refusal, and so
    learns nothing about which labels occur in the site's files."""
    run, site_yaml = site
    pinned = SiteConfig.load(site_yaml).labels
    assert pinned == run.prompt.labels  # the workspace pinned its federation's label space
    held = "cardiovascular diseases"  # in this site's training records
    shapes = lambda labels: dataclasses.replace(run.prompt, labels=labels).shapes()  # noqa: E731
    dropped = [x for x in pinned if x != held]
    _pin_refused(
        site_yaml,
        _content(run, _arrays(shapes(dropped)), labels=dropped),
        caplog,
        "labels: the plan's label space is not the one this site pinned (missing from the plan: cardiovascular",
    )
    added = [*pinned, "rare disease"]
    _pin_refused(
        site_yaml,
        _content(run, _arrays(shapes(added)), labels=added),
        caplog,
        "labels: the plan's label space is not the one this site pinned (not pinned: rare disease)",
    )
    # The order of the names is the aggregator's to choose: the same set trains.
    reordered = list(reversed(pinned))
    reply = train_round(_content(run, _arrays(shapes(reordered)), labels=reordered), site_yaml)
    assert reply[STATUS]["status"] == "ok"


def test_a_site_without_a_pinned_label_space_refuses_and_says_how_to_pin_it(site, caplog, capsys):
    run, site_yaml = site
    fed_yaml = site_yaml.parent.parent / "federation.yaml"
    edit_yaml(site_yaml, lambda d: d.pop("labels"))
    assert SiteConfig.load(site_yaml).labels is None  # an older site.yaml still loads ...
    how = "labels: not set: this site trains and evaluates only on a label space it has pinned; pin the federation's"
    how += f" with `fedprompt hospital labels --site {site_yaml} --federation federation.yaml`"
    _pin_refused(site_yaml, _content(run), caplog, how)  # ... and trains nothing until pinned

    # The command the refusal names pins it, keeping the file's comments; then the site trains.
    site_yaml.write_text("# the operator's note\n" + site_yaml.read_text())
    assert main(["hospital", "labels", "--site", str(site_yaml), "--federation", str(fed_yaml)]) == 0
    assert "labels pinned: neoplasms, digestive system diseases" in capsys.readouterr().out
    assert site_yaml.read_text().startswith("# the operator's note\n")
    assert SiteConfig.load(site_yaml).labels == run.prompt.labels
    assert train_round(_content(run), site_yaml)[STATUS]["status"] == "ok"
    # Pinning again is a no-op; another label space is the site's decision, made in the file.
    assert main(["hospital", "labels", "--site", str(site_yaml), "--federation", str(fed_yaml)]) == 0
    edit_yaml(fed_yaml, lambda d: d.update(labels=["a", "b"]))
    assert main(["hospital", "labels", "--site", str(site_yaml), "--federation", str(fed_yaml)]) == 2
    assert "labels: already pins neoplasms" in capsys.readouterr().err


def test_fixed_batch_one_round_run_epsilon_and_late_rounds_are_refused_on_every_message(site, caplog):
    """Plans a site refuses by default (issue 22 item 3), on train, evaluate and pre-flight messages
    alike, before any calibration or ledger entry (the ledger's folder is byte-for-byte unchanged)."""
    from fedprompt.client.preflight import preflight

    run, site_yaml = site
    cases = [
        ({"batch_size": 8}, "limits.allow_fixed_batch: the plan fixes the expected batch (batch_size 8)"),
        (
            {"total_rounds": 1, "class_sums_share": 0.0},
            "limits.min_total_rounds: the plan's noise would be calibrated for 1 round(s)",
        ),
        ({"round": ROUNDS + 1}, f"the plan's round {ROUNDS + 1} is beyond its total of {ROUNDS} rounds"),
        (
            {"target_epsilon": 9.0},
            "limits.max_run_epsilon: the plan targets epsilon 9 for the run, above this site's per-run limit 3",
        ),
    ]
    edit_yaml(site_yaml, lambda d: d["limits"].update(max_run_epsilon=3.0))
    for changes, why in cases:
        for handler in (train_round, evaluate_round, preflight):
            _refused(handler, _content(run, **changes), site_yaml, caplog, why)


def test_hospital_init_pins_the_federations_label_space(tmp_path, capsys):
    """`hospital init --federation` writes the pin; without it the template says `labels: null`, which
    `hospital labels` then replaces in place."""
    fed = tmp_path / "federation.yaml"
    fed.write_text('name: t\nlabels: [a, "b c"]\n')
    pinned, later = tmp_path / "pinned.yaml", tmp_path / "later.yaml"
    assert main(["hospital", "init", "--out", str(pinned), "--hospital-id", "h1", "--federation", str(fed)]) == 0
    assert main(["hospital", "init", "--out", str(later), "--hospital-id", "h2"]) == 0
    assert "labels not pinned: the site trains nothing until `fedprompt hospital labels" in capsys.readouterr().out
    assert "\nlabels: [a, b c]\n" in pinned.read_text() and "\nlabels: null\n" in later.read_text()
    for site in (pinned, later):  # the REQUIRED paths filled in, as an operator would
        site.write_text(
            site.read_text()
            .replace("\ntrain: null\n", "\ntrain: t.csv\n")
            .replace("\nledger: null\n", "\nledger: l.json\n")
        )
    assert main(["hospital", "labels", "--site", str(later), "--federation", str(fed)]) == 0
    text = later.read_text()
    assert text.count("\nlabels:") == 1 and "\nlabels: [a, b c]\n" in text
    assert SiteConfig.load(later).labels == SiteConfig.load(pinned).labels == ["a", "b c"]
