"""Federation end to end on Flower's simulation engine (tiny BERT): learning, export, resume,
rogue updates, budget refusal, and an audit of every byte a hospital sends."""

from __future__ import annotations

import csv
import io
import json
import re
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

# FAST and make_workspace: tests/conftest.py (imported here too by the modules that import them from here)
from conftest import FAST, edit_yaml, make_workspace
from flwr.app import Array, ArrayRecord, Context, Message, Metadata, RecordDict

from fedprompt.client.client_app import make_client_app
from fedprompt.client.workspace import list_hospitals, load_workspace
from fedprompt.common.backbone import load_backbone
from fedprompt.common.config import FederationConfig
from fedprompt.common.encoding import encode
from fedprompt.common.model import TRAINABLE_KEYS, PromptClassifier, build_model, initial_state
from fedprompt.common.plan import RoundPlan
from fedprompt.common.records import load_records
from fedprompt.common.wire import (
    ARRAYS,
    LEDGER,
    METRICS,
    REFUSAL_CATEGORIES,
    STATUS,
    Status,
    TrainMetrics,
    TrainReply,
    state_to_arrays,
)
from fedprompt.server.checkpoint import load_checkpoint
from fedprompt.server.federation import RunSpec, prepare_run
from fedprompt.simulation import ensure_ledgers, simulate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The product's main path on the real default backbone (all-MiniLM-L6-v2), DP at eps 8, on the
    in-process engine (Ray's startup and three actor processes cost half a minute; the README example
    in test_api runs on Ray).

    (A tiny random BERT gives features too weak for any learning signal to survive DP noise.)
    The training recipe is the product's default (head on frozen features, sample rate 0.25, SGD
    lr 8); only the rounds (10) and the sequence length (128) are cut for time. Sized so that DP
    noise cannot decide the outcome: with 600 notes per hospital (the demo's size) and 300 test
    notes, four seeded runs of the same federation in-process ended at +0.19 to +0.23 macro-F1
    over the zero-shot start; at 200-240 notes, or 48 tokens and 5 rounds, the gain ranged from
    -0.08 to +0.12 (2026-11-29).
    """
    root = tmp_path_factory.mktemp("run")
    overrides = {"rounds": 10, "model": {"max_length": 128}, "privacy": {"target_epsilon": 8.0}}
    ws = make_workspace(root, None, per_hospital=600, test_size=300, overrides=overrides)
    ensure_ledgers(ws)  # a workspace written just now (simulate never creates ledgers on its own)
    metrics = simulate(ws, root / "out", engine="local")  # the same model as on Ray (test_local_engine)
    return ws, root / "out", metrics


@pytest.mark.simulation
def test_three_hospitals_learn_together_and_export(finished_run):
    ws, out, metrics = finished_run
    assert [r["round"] for r in metrics["rounds"]] == list(range(11))
    # tested, not trained
    assert metrics["rounds"][0]["hospitals"] == {} and metrics["rounds"][0]["test"]["num_examples"] > 0
    # the hospitals validate locally (their logs): no site shares evaluation by default
    assert all(r["evaluate"] is None for r in metrics["rounds"])
    for r in metrics["rounds"][1:]:
        assert {h: o["status"] for h, o in r["hospitals"].items()} == {
            "hospital-1": "ok",
            "hospital-2": "ok",
            "hospital-3": "ok",
        }
        assert all(0 < o["epsilon_spent"] <= o["epsilon_cap"] for o in r["hospitals"].values())
    # from the zero-shot start (round 0) to the last round: the private federation adds to it
    f1 = [r["test"]["macro_f1"] for r in metrics["rounds"]]
    loss = [r["test"]["loss"] for r in metrics["rounds"]]
    assert f1[-1] > f1[0] + 0.05 and loss[-1] < loss[0] - 0.03, (f1, loss)
    # epsilon grows monotonically per hospital, as recorded in each site's own ledger
    eps = [
        [r["hospitals"][h]["epsilon_spent"] for r in metrics["rounds"][1:]]
        for h in ("hospital-1", "hospital-2", "hospital-3")
    ]
    assert all(a < b for e in eps for a, b in pairwise(e))
    # (simulate() adds the per-hospital comparison, which it writes to comparison.json instead)
    assert metrics["private"] is True and json.loads((out / "metrics.json").read_text()) == {
        k: v for k, v in metrics.items() if k != "hospital_comparison"
    }
    assert (out / "report.html").is_file() and (out / "export" / "MODEL_CARD.md").is_file()


@pytest.mark.simulation
def test_export_predicts_exactly_like_the_final_global_model(finished_run):
    ws, out, metrics = finished_run
    bb = load_backbone()
    exported = PromptClassifier.from_pretrained(out / "export", bb).eval()
    ckpt = load_checkpoint(out / "checkpoint")
    assert ckpt.round == 10
    final = build_model(bb, exported.config, ckpt.state).eval()
    fed, _, test = load_workspace(ws)
    texts = [line.split(",")[0] for line in test.read_text().splitlines()[1:20]]
    ids, mask, _ = encode(bb.tokenizer, texts, [0] * len(texts), 128).dataset.tensors
    with torch.no_grad():
        assert torch.equal(exported(ids, mask), final(ids, mask))


@pytest.mark.simulation
def test_predict_cli_on_the_export(finished_run, other_dir, capsys):
    from fedprompt.cli import main

    ws, out, metrics = finished_run
    assert main(["predict", "--model", str(out / "export"), "--text", "chest pain", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["label"] in metrics["labels"] and abs(sum(row["probabilities"].values()) - 1) < 1e-5
    assert main(["predict", "--model", str(out / "export"), "--backbone", str(other_dir), "--text", "x"]) == 2
    assert "backbone_fingerprint" in capsys.readouterr().err


@pytest.mark.simulation
def test_resume_continues_round_numbering_and_history(tmp_path, tiny_dir):
    ws = make_workspace(tmp_path, tiny_dir)
    ensure_ledgers(ws)
    # the in-process engine: the checkpoint and resume are the ServerApp's (test_local_engine: same model as Ray)
    first = simulate(ws, tmp_path / "out", backbone=tiny_dir, stop_after=2, engine="local")
    assert [r["round"] for r in first["rounds"]] == [0, 1, 2]
    with pytest.raises(Exception, match="--resume"):
        prepare_run(RunSpec(FederationConfig.load(ws / "federation.yaml"), tmp_path / "out", backbone=tiny_dir))
    resumed = simulate(ws, tmp_path / "out", backbone=tiny_dir, resume=True, engine="local")
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2, 3]  # round 0 once: not re-evaluated on resume
    assert resumed["rounds"][:3] == first["rounds"]
    ledger = json.loads((ws / "hospital-1" / "ledger" / "privacy-ledger.json").read_text())
    assert [e["round"] for e in ledger["history"]] == [1, 2, 3]


# --- rogue hospital and exhausted budget, in one federation --------------------------------------
def rogue_client_app(site_paths, rogue_index: int):
    """The real ClientApp, except that one hospital corrupts its update differently each round."""
    honest = make_client_app(site_paths, torch_threads=1)
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest(msg, context)
        if int(context.node_config["partition-id"]) == rogue_index:
            arrays = reply.content[ARRAYS]
            rnd = int(msg.content["config"]["fp.round"])
            tensors = {k: arrays[k].numpy().copy() for k in arrays.keys()}
            if rnd == 1:
                tensors["prompt.weight"][0, 0] = np.nan
            elif rnd == 2:
                tensors["head.bias"] = np.zeros(7, np.float32)
            else:
                tensors["stolen.embeddings"] = np.ones((2, 2), np.float32)
            reply.content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in tensors.items()})
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    @app.query()  # the run's pre-flight
    def query(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    return app


@pytest.mark.simulation
def test_rogue_updates_rejected_and_capped_hospital_refused(tmp_path, tiny_dir):
    from fedprompt.local_engine import run_local
    from fedprompt.server.server_app import make_server_app

    ws = make_workspace(tmp_path, tiny_dir, hospitals=4, per_hospital=40, overrides={**FAST, "min_hospitals": 2})
    from fedprompt.client.ledger import PrivacyLedger
    from fedprompt.simulation import ensure_ledgers

    ensure_ledgers(ws)
    # hospital-4 spent most of its budget in an earlier run, then lowered its cap to what it spent
    site4 = ws / "hospital-4" / "site.yaml"
    ledger4 = PrivacyLedger.open(ws / "hospital-4" / "ledger" / "privacy-ledger.json")
    spent = ledger4.record(1.0, 0.2, 30, epsilon_cap=10.0, run_id="earlier", round=1)
    edit_yaml(site4, lambda d: d["privacy"].update(max_epsilon=round(spent + 0.01, 3)))
    fed, sites, test = load_workspace(ws)
    run = prepare_run(RunSpec(fed, tmp_path / "out", test, tiny_dir, expected_hospitals=4))
    # in-process: what the aggregator accepts is the ServerApp's, on either engine (test_local_engine)
    run_local(make_server_app(run), rogue_client_app(list_hospitals(ws), rogue_index=2), 4)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2, 3]
    reasons = [r["hospitals"]["hospital-3"] for r in metrics["rounds"][1:]]
    assert [o["status"] for o in reasons] == ["rejected"] * 3
    assert "non-finite" in reasons[0]["reason"]
    assert "head.bias: shape (7,)" in reasons[1]["reason"]
    assert "stolen.embeddings" in reasons[2]["reason"]
    for r in metrics["rounds"][1:]:
        assert r["hospitals"]["hospital-1"]["status"] == r["hospitals"]["hospital-2"]["status"] == "ok"
        assert "hospital-4" not in r["hospitals"]  # it refused the run in pre-flight: sent no train message
    # the category: the detail stays in its log
    assert metrics["preflight"]["hospitals"]["hospital-4"] == {"status": "refused", "reason": "budget"}
    after = json.loads((ws / "hospital-4" / "ledger" / "privacy-ledger.json").read_text())
    assert [e["run_id"] for e in after["history"]] == ["earlier"]  # refused before recording or training
    final = load_checkpoint(tmp_path / "out" / "checkpoint").state
    assert all(torch.isfinite(v).all() for v in final.values())


# --- wire audit ----------------------------------------------------------------------------------
def wire_bytes(obj) -> bytes:
    """Everything Flower serialises for a message: the object and all its children."""
    return obj.deflate() + b"".join(wire_bytes(c) for c in (obj.children or {}).values())


# What a train reply's metrics may carry (docs/deployment.md 5): the reply model's, all of them under default settings.
DEFAULT_TRAIN_FIELDS = TrainMetrics.keys()


def _message(kind: str, content: RecordDict) -> Message:
    md = Metadata(
        run_id=1,
        message_id=f"m-{kind}",
        src_node_id=1,
        dst_node_id=11,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=3600,
        message_type=kind,
    )
    return Message(metadata=md, content=content)


def test_wire_audit_only_declared_tensors_and_aggregates_leave(tmp_path, tiny_backbone, monkeypatch, caplog):
    """Every byte of a train, evaluate and refusal reply under the default settings: the declared
    tensors, the documented minimal fields, a status record; no loss, no per-class counts, no
    record count, no truncation count, no record line, label or path in any reason."""
    # hidden 384 like the default backbone, so the payload has its real size
    bb_dir = tiny_backbone(hidden=384, layers=1)
    ws = make_workspace(
        tmp_path,
        bb_dir,
        hospitals=1,
        per_hospital=40,
        overrides={
            **FAST,
            "model": {"n_virtual_tokens": 20, "max_length": 32},
            "training": {"local_epochs": 1, "batch_size": 8},
        },
    )
    fed, sites, _ = load_workspace(ws)
    from fedprompt.client import client_app as client_app_mod
    from fedprompt.simulation import ensure_ledgers

    ensure_ledgers(ws)
    run = prepare_run(RunSpec(fed, tmp_path / "out", None, bb_dir))
    plan = RoundPlan.for_run(fed, run.prompt, round=1).to_config_record()
    app = make_client_app(list_hospitals(ws))
    ctx = Context(
        run_id=1, node_id=11, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(), run_config={}
    )
    site = sites[0]
    train_rows = site.train.read_text().splitlines()[1:]
    n_train, n_val = (
        len(load_records(p, text_field="text", label_field="label", labels=fed.label_names).texts)
        for p in (site.train, site.validation)
    )

    def ask(kind: str) -> Message:
        reply = app(_message(kind, RecordDict({ARRAYS: state_to_arrays(run.state), "config": plan})), ctx)
        assert not reply.has_error()  # never a Flower error reply: it would carry exception text
        return reply

    with caplog.at_level("INFO", logger="fedprompt"):
        train_reply, eval_reply = ask("train"), ask("evaluate")
    local_log = caplog.text
    c = train_reply.content
    assert set(c.keys()) == {ARRAYS, METRICS, STATUS, LEDGER}
    TrainReply.from_content(c)  # exactly the reply model's records and keys, each typed
    shapes = {k: tuple(c[ARRAYS][k].shape) for k in c[ARRAYS].keys()}
    assert shapes == {k: tuple(v) for k, v in run.prompt.shapes().items()} and tuple(shapes) == TRAINABLE_KEYS
    assert all(c[ARRAYS][k].dtype == "float32" for k in TRAINABLE_KEYS)
    # train: the declared weight (not the record count), the privacy fields; no loss, steps, sigma, q
    assert set(c[METRICS].keys()) == DEFAULT_TRAIN_FIELDS
    # 32 training records: the site.yaml fedprompt wrote declares 30 (one significant digit)
    assert c[METRICS]["num-examples"] == 30.0 and c[METRICS]["private"] == 1
    assert dict(c[STATUS]) == {"hospital-id": "hospital-1", "status": "ok", "reason": ""}  # no truncation count
    # the ledger record: the hashes of the site's own ledger entries (this run's), nothing else
    from fedprompt.client.ledger import PrivacyLedger

    assert list(c[LEDGER].keys()) == ["chain"]
    assert c[LEDGER]["chain"] == [e.hash for e in PrivacyLedger.for_site(site).history]
    # evaluate: the status record alone (the site validated locally and logged it)
    assert set(eval_reply.content.keys()) == {STATUS} and dict(eval_reply.content[STATUS])["reason"] == ""
    # what stayed behind is in the hospital's own log
    assert "loss" in local_log and "truncated" in local_log and f"{n_train} records" in local_log
    assert "validation of the model received (local log, not sent)" in local_log and f"{n_val} records" in local_log

    # refusals: a category only. Bad records (line, label), then an unexpected failure (traceback).
    bad_line = len(site.train.read_text().splitlines()) + 1
    site.train.write_text(site.train.read_text() + '"a secret note",label-xyzzy\n')
    with caplog.at_level("WARNING", logger="fedprompt"):
        refused = ask("train")
    assert dict(refused.content[STATUS]) == {"hospital-id": "hospital-1", "status": "refused", "reason": "records"}
    assert set(refused.content.keys()) == {STATUS}
    # the detail stays here: file and line; the record's value only with site.yaml log_records: true
    assert f"train.csv:{bad_line}" in caplog.text and "label-xyzzy" not in caplog.text
    assert "[value withheld from this log]" in caplog.text

    def crash(*args, **kwargs):
        raise RuntimeError(f"{site.train}:{bad_line}: label-xyzzy in 'a secret note'")

    monkeypatch.setattr(client_app_mod, "evaluate_round", crash)
    with caplog.at_level("ERROR", logger="fedprompt"):
        internal = ask("evaluate")
    assert dict(internal.content[STATUS]) == {"hospital-id": "hospital-1", "status": "refused", "reason": "internal"}
    assert "Traceback" in caplog.text and "label-xyzzy" in caplog.text

    # every serialized byte: no record text, no token-id sequence, no count, no line, label or path
    bb = load_backbone(bb_dir)
    replies = [train_reply, eval_reply, refused, internal]
    for reply in replies:
        blob = wire_bytes(reply)
        for row in train_rows[:40] + ['"a secret note",label-xyzzy']:
            text = row.rsplit(",", 1)[0].strip('"')
            for word in re.findall(r"[A-Za-z]{6,}", text)[:5]:
                assert word.encode() not in blob, word
            ids = bb.tokenizer(text, truncation=True, max_length=32)["input_ids"][1:9]
            for dtype in (np.int64, np.int32):
                assert np.asarray(ids, dtype=dtype).tobytes() not in blob
        for needle in (
            "xyzzy",
            "train.csv",
            "val.csv",
            str(tmp_path),
            "loss",
            "truncated",
            "sample-rate",
            "noise-multiplier",
            "steps",
        ):
            assert needle.encode() not in blob, (needle, reply.metadata.message_type)
        for record in reply.content.metric_records.values():  # no field is the record count
            assert all(v not in (n_train, n_val) for v in record.values() if not isinstance(v, list))
        for name, record in reply.content.config_records.items():
            if name != LEDGER:  # checked above: hashes only
                assert set(record.keys()) == Status.keys() and record["reason"] in ("", *REFUSAL_CATEGORIES)
    raw = sum(v.numel() * 4 for v in initial_state(bb, run.prompt).values())
    assert len(wire_bytes(train_reply.content)) <= 1.1 * raw, (len(wire_bytes(train_reply.content)), raw)


# --- refusals are well-formed replies, never crashes -----------------------------------------------
def _train_content(run, round_=1, **plan_changes):
    plan = RoundPlan.for_run(run.spec.federation, run.prompt, round=round_).replaced(**plan_changes)
    return RecordDict({ARRAYS: state_to_arrays(run.state), "config": plan.to_config_record()})


def one_site(tmp_path: Path, tiny_dir: Path):
    """A prepared run and a single hospital with its ledger: (workspace, run, site.yaml, ledger path)."""
    from fedprompt.simulation import ensure_ledgers

    ws = make_workspace(tmp_path, tiny_dir, hospitals=1, per_hospital=20)
    ensure_ledgers(ws)
    fed, _, _ = load_workspace(ws)
    run = prepare_run(RunSpec(fed, tmp_path / "out", None, tiny_dir))
    return ws, run, list_hospitals(ws)[0], ws / "hospital-1" / "ledger" / "privacy-ledger.json"


def test_site_refuses_on_backbone_mismatch_and_bad_records(tmp_path, tiny_dir, caplog):
    """A refusal names its category; the detail (file, line, label) is in the hospital's log only."""
    from fedprompt.client.hospital import evaluate_round, train_round

    ws, run, site_yaml, ledger = one_site(tmp_path, tiny_dir)
    before = ledger.read_bytes()

    with caplog.at_level("WARNING", logger="fedprompt.hospital"):
        reply = train_round(_train_content(run, backbone_fingerprint="0" * 64), site_yaml)
    assert set(reply.keys()) == {STATUS} and reply[STATUS]["status"] == "refused"
    assert reply[STATUS]["reason"] == "backbone" and "backbone mismatch" in caplog.text

    train_csv = ws / "hospital-1" / "train.csv"
    line = len(train_csv.read_text().splitlines()) + 1
    train_csv.write_text(train_csv.read_text() + '"a note",not-a-label\n')
    caplog.clear()
    with caplog.at_level("WARNING", logger="fedprompt.hospital"):
        reply = train_round(_train_content(run), site_yaml)
    assert dict(reply[STATUS]) == {"hospital-id": "hospital-1", "status": "refused", "reason": "records"}
    assert f"train.csv:{line}: label: unknown label (expected one of: " in caplog.text  # the value: log_records
    assert ledger.read_bytes() == before  # nothing recorded, nothing trained, nothing sent

    val_csv = ws / "hospital-1" / "val.csv"
    val_csv.write_text(val_csv.read_text() + '"a note",not-a-label\n')
    reply = evaluate_round(_train_content(run), site_yaml)
    assert dict(reply[STATUS]) == {"hospital-id": "hospital-1", "status": "refused", "reason": "records"}


def test_tampered_noise_memo_changes_only_what_the_ledger_accounts(tmp_path, tiny_dir):
    """The noise memo beside the ledger can be edited by anyone who can edit the ledger. A smaller
    sigma there must be refused by the cap before training; a larger one must be the sigma both
    trained with and recorded."""
    from fedprompt.client.hospital import train_round
    from fedprompt.client.ledger import PrivacyLedger

    _, run, site_yaml, ledger = one_site(tmp_path, tiny_dir)
    memo = ledger.with_name(ledger.name + ".noise-memo")

    # The DP-SGD rounds' sigma (round 1 is the class-sums release: its own calibration, also remembered).
    honest = train_round(_train_content(run, round_=2), site_yaml)
    assert honest[STATUS]["status"] == "ok"
    sigma = PrivacyLedger.open(ledger).history[-1].noise_multiplier  # the reply does not carry sigma
    remembered = json.loads(memo.read_text())  # written after the ledger entry
    (key,) = [k for k, v in remembered.items() if v == sigma]
    sums_key = next(k for k in remembered if k != key)  # the release's sigma enters the SGD calibration

    memo.write_text(json.dumps({**remembered, key: sigma / 50}))  # far less noise than the budget allows
    before = ledger.read_bytes()
    reply = train_round(_train_content(run, round_=3), site_yaml)
    assert reply[STATUS]["status"] == "refused" and reply[STATUS]["reason"] == "budget", reply[STATUS]
    assert ARRAYS not in reply and ledger.read_bytes() == before  # nothing trained, sent or recorded

    memo.write_text(json.dumps({sums_key: remembered[sums_key], key: 2 * sigma}))  # more noise: spends less
    reply = train_round(_train_content(run, round_=3), site_yaml)
    assert reply[STATUS]["status"] == "ok" and "noise-multiplier" not in reply[METRICS]
    book = PrivacyLedger.open(ledger)
    assert [e.noise_multiplier for e in book.history] == [sigma, 2 * sigma]
    assert reply[METRICS]["epsilon-spent"] == pytest.approx(book.epsilon_spent())


@pytest.mark.simulation
def test_partitioned_real_corpus_trains(tmp_path, tiny_dir):
    """`fedprompt data partition` on the shared abstracts yields a workspace a federation trains on."""
    from fedprompt.cli import main

    corpus = Path(__file__).resolve().parents[1].parent / "shared/data/medical-abstracts"
    if not (corpus / "medical_tc_test.csv").is_file():
        pytest.skip(f"shared corpus not found at {corpus}")
    ws = tmp_path / "ws"
    assert (
        main(
            [
                "data",
                "partition",
                "--input",
                str(corpus / "medical_tc_test.csv"),
                "--text-column",
                "medical_abstract",
                "--label-column",
                "condition_label",
                "--label-names",
                str(corpus / "medical_tc_labels.csv"),
                "--hospitals",
                "3",
                "--alpha",
                "0.5",
                "--test-frac",
                "0.3",
                "--val-frac",
                "0.2",
                "--seed",
                "0",
                "--out",
                str(ws),
            ]
        )
        == 0
    )
    edit_yaml(
        ws / "federation.yaml",
        lambda d: d.update(
            rounds=1,
            model={**d["model"], "n_virtual_tokens": 4, "max_length": 32},
            training={**d["training"], "local_epochs": 1, "batch_size": 64},
        ),
    )
    for site in list_hospitals(ws):

        def local(d):
            d["backbone"] = str(tiny_dir)
            d["limits"].update(min_total_rounds=1, allow_fixed_batch=True)  # the one fixed-batch round above

        edit_yaml(site, local)
    ensure_ledgers(ws)
    metrics = simulate(ws, tmp_path / "out", backbone=tiny_dir, engine="local")  # as on Ray (test_local_engine)
    start, r = metrics["rounds"]
    assert start["round"] == 0 and {o["status"] for o in r["hospitals"].values()} == {"ok"}
    fed_cfg, sites, _ = load_workspace(ws)

    def count(path):
        return (
            len(
                load_records(
                    path, text_field=sites[0].text_field, label_field=sites[0].label_field, labels=fed_cfg.label_names
                ).texts
            )
            if path
            else 0
        )

    assert all(count(site.test) > 0 for site in sites)
    held = sum(count(site.train) + count(site.validation) + count(site.test) for site in sites)
    # every record in exactly one split, but the 231 rows of the 113 texts under conflicting labels
    assert held + r["test"]["num_examples"] == 2888 - 231
    # no record count left any site: each declared the default weight, and validated locally
    declared = {s.hospital_id: s.weight for s in load_workspace(ws)[1]}  # what each site.yaml declares
    assert {name: o["weight"] for name, o in r["hospitals"].items()} == declared and r["evaluate"] is None
    # every hospital with a local test split gets the comparison the demo prints
    assert [row["hospital"] for row in metrics["hospital_comparison"]] == ["hospital-1", "hospital-2", "hospital-3"]


def test_default_recipe_is_what_the_ledger_accounts(tmp_path, tiny_dir):
    """With the product's training defaults, round 1 records the one-shot class-sums release and
    round 2 the DP-SGD rounds' (sigma, q, steps), each exactly as the documented rule gives from the
    site's declared size, before training; the whole run composes to the target, and no more."""
    from fedprompt.client.hospital import train_round
    from fedprompt.client.ledger import PrivacyLedger
    from fedprompt.common.accounting import calibrate_noise, compute_epsilon
    from fedprompt.common.config import TrainingSettings
    from fedprompt.common.schedule import sampling
    from fedprompt.simulation import ensure_ledgers

    ws = make_workspace(
        tmp_path, tiny_dir, hospitals=1, per_hospital=50, overrides={"rounds": 5, "model": {"max_length": 32}}
    )
    ensure_ledgers(ws)
    fed, (site,), _ = load_workspace(ws)
    assert fed.training == TrainingSettings()  # nothing overridden: the defaults under test
    run = prepare_run(RunSpec(fed, tmp_path / "out", None, tiny_dir))
    for round_ in (1, 2):
        reply = train_round(_train_content(run, round_=round_), list_hospitals(ws)[0])
        assert reply[STATUS]["status"] == "ok", reply[STATUS]
    assert site.weight is not None  # declared by the workspace, never counted
    s = sampling(RoundPlan.for_run(fed, run.prompt), site.weight)
    target, delta = min(fed.privacy.target_epsilon, site.privacy.max_epsilon), site.privacy.delta
    sums = calibrate_noise(fed.training.class_sums_share * target, delta, 1.0, 1, "prv")
    margin = site.privacy.retry_margin  # retried SGD rounds the run keeps room for inside its target
    sigma = calibrate_noise(
        target, delta, s.sample_rate, s.steps_per_round * (fed.rounds - 1 + margin), "prv", ((sums, 1.0, 1),)
    )
    first, second = PrivacyLedger.open(site.ledger).history
    assert (first.noise_multiplier, first.sample_rate, first.steps) == (sums, 1.0, 1)
    assert (second.noise_multiplier, second.sample_rate, second.steps) == (sigma, s.sample_rate, s.steps_per_round)
    # the reply carries none of sigma, q, steps: the ledger has them
    assert set(reply[METRICS].keys()) == DEFAULT_TRAIN_FIELDS
    assert reply[METRICS]["epsilon-spent"] == pytest.approx(PrivacyLedger.open(site.ledger).epsilon_spent())
    # a whole run at these sigmas, its retry margin included, spends the target, and no more
    whole = [(sums, 1.0, 1)] + [(sigma, s.sample_rate, s.steps_per_round)] * (fed.rounds - 1 + margin)
    assert compute_epsilon("prv", whole, delta) == pytest.approx(target, abs=0.02)


# --- privacy hardening: each channel that used to leak at zero epsilon --------------------------------
def test_record_count_never_leaves_the_weight_is_declared(tmp_path, tiny_dir):
    """Two hospitals of different sizes, same settings: their train replies carry the same fields
    and values (the default recipe's q, steps and sigma do not depend on N), except the weight
    each declared in its site.yaml."""
    from fedprompt.client.hospital import train_round
    from fedprompt.simulation import ensure_ledgers

    ws = make_workspace(
        tmp_path, tiny_dir, hospitals=2, per_hospital=40, overrides={"rounds": 3, "model": {"max_length": 32}}
    )
    small = ws / "hospital-2" / "train.csv"
    rows = list(csv.reader(io.StringIO(small.read_text())))
    with small.open("w", newline="") as f:
        csv.writer(f).writerows(rows[:26])  # 25 records against 40
    site2 = ws / "hospital-2" / "site.yaml"
    edit_yaml(site2, lambda d: d.update(weight=20.0))
    ensure_ledgers(ws)
    fed, sites, _ = load_workspace(ws)
    assert sites[0].privacy.delta == sites[1].privacy.delta
    run = prepare_run(RunSpec(fed, tmp_path / "out", None, tiny_dir))
    big, little = (train_round(_train_content(run), path) for path in list_hospitals(ws))
    assert big[STATUS]["status"] == little[STATUS]["status"] == "ok"
    assert big[METRICS]["num-examples"] == 30.0 and little[METRICS]["num-examples"] == 20.0  # as declared
    assert {**dict(big[METRICS]), "num-examples": 0} == {**dict(little[METRICS]), "num-examples": 0}


def test_evaluation_shared_only_noised_and_charged_to_the_ledger(tmp_path, tiny_dir, caplog):
    """`share_evaluation: noised`: per-class counts plus Gaussian noise, one Gaussian mechanism
    release accounted in the ledger as (sigma, q=1, 1 step) before the reply; over the cap: a
    "budget" refusal and nothing recorded."""
    from fedprompt.client.hospital import evaluate_round
    from fedprompt.client.ledger import PrivacyLedger, compute_epsilon
    from fedprompt.common.accounting import calibrate_noise

    ws, run, site_yaml, ledger = one_site(tmp_path, tiny_dir)
    edit_yaml(site_yaml, lambda d: d.update(share_evaluation="noised", evaluation_epsilon=0.5))
    delta = yaml.safe_load(site_yaml.read_text())["privacy"]["delta"]
    with caplog.at_level("INFO", logger="fedprompt.hospital"):
        reply = evaluate_round(_train_content(run), site_yaml, run_id="7")
    assert set(reply.keys()) == {METRICS, STATUS} and set(reply[METRICS].keys()) == {"tp", "fp", "fn"}
    counts = [v for k in ("tp", "fp", "fn") for v in reply[METRICS][k]]
    assert len(counts) == 3 * len(run.prompt.labels) and any(v != round(v) for v in counts)  # noised
    sigma = calibrate_noise(0.5, delta, 1.0, 1, "prv")
    (entry,) = PrivacyLedger.open(ledger).history
    assert (entry.noise_multiplier, entry.sample_rate, entry.steps, entry.round) == (sigma, 1.0, 1, 1)
    assert entry.run_id == "t/7/evaluation"
    assert compute_epsilon("prv", [(sigma, 1.0, 1)], delta) == pytest.approx(0.5, rel=0.02)
    assert "validation of the model received (local log, not sent)" in caplog.text

    edit_yaml(site_yaml, lambda d: d["privacy"].update(max_epsilon=0.6))  # a second release (0.5 more) passes it
    before = ledger.read_bytes()
    reply = evaluate_round(_train_content(run), site_yaml, run_id="7")
    assert dict(reply[STATUS]) == {"hospital-id": "hospital-1", "status": "refused", "reason": "budget"}
    assert set(reply.keys()) == {STATUS} and ledger.read_bytes() == before


def test_one_message_round_charges_the_shared_evaluation_before_training(tmp_path, tiny_dir):
    """`evaluation: in_train` (the default): the train reply carries the noised validation counts of
    the model received, and the ledger holds that release (q = 1, 1 step, ".../evaluation") before
    the round's training entry; the aggregator's check accepts the reply. Without sharing, the
    train reply has no such record (test_wire_audit_only_declared_tensors_and_aggregates_leave)."""
    from fedprompt.client.hospital import train_round
    from fedprompt.client.ledger import PrivacyLedger
    from fedprompt.common.wire import EVALUATION, check_update

    ws, run, site_yaml, ledger = one_site(tmp_path, tiny_dir)
    edit_yaml(site_yaml, lambda d: d.update(share_evaluation="noised", evaluation_epsilon=0.5))
    content = _train_content(run)
    assert content["config"]["fp.evaluate_in_train"] is True
    reply = train_round(content, site_yaml, run_id="7")
    assert set(reply.keys()) == {ARRAYS, METRICS, STATUS, LEDGER, EVALUATION}
    assert set(reply[EVALUATION].keys()) == {"tp", "fp", "fn"}
    evaluation, training = PrivacyLedger.open(ledger).history
    assert (evaluation.run_id, evaluation.sample_rate, evaluation.steps) == ("t/7/evaluation", 1.0, 1)
    assert training.run_id == "t/7" and training.round == evaluation.round == 1
    parsed = TrainReply.from_content(reply, num_labels=run.prompt.num_labels)
    assert parsed.evaluation is not None and parsed.ledger.chain == [evaluation.hash, training.hash]
    assert check_update(reply[ARRAYS], run.prompt.shapes(), run.state, 1e9) is None


def test_noised_counts_have_the_gaussian_mechanism_std():
    """Noise std = sigma x sqrt(2): one record moves tp by 1, or fn and fp by 1 each (L2 sqrt 2)."""
    from fedprompt.client.hospital import EVAL_COUNT_SENSITIVITY, noised_counts
    from fedprompt.common.metrics import ClassCounts

    assert EVAL_COUNT_SENSITIVITY == pytest.approx(2**0.5)
    counts = ClassCounts([10, 0, 3], [1, 2, 3], [0, 4, 4])
    draws = np.array([[v for k in ("tp", "fp", "fn") for v in noised_counts(counts, 2.0)[k]] for _ in range(4000)])
    exact = np.array(counts.tp + counts.fp + counts.fn, dtype=float)
    assert np.allclose(draws.mean(axis=0), exact, atol=0.25)
    assert np.allclose(draws.std(axis=0), 2.0 * 2**0.5, rtol=0.06)


@pytest.mark.parametrize(
    "node_config, expected_id", [({"site-config": "/nowhere/h7/site.yaml"}, "h7"), ({}, "unknown")]
)
def test_any_clientapp_exception_is_an_internal_refusal_not_a_flower_error(
    node_config, expected_id, monkeypatch, caplog
):
    """Flower's error reply would carry the exception's text (a record line, a label, a path)."""
    from fedprompt.client import client_app as client_app_mod

    def crash(*args, **kwargs):
        raise ValueError("train.csv:17: label: unknown label 'secret-diagnosis'")

    monkeypatch.setattr(client_app_mod, "train_round", crash)
    app = make_client_app()
    ctx = Context(run_id=1, node_id=11, node_config=node_config, state=RecordDict(), run_config={})
    with caplog.at_level("ERROR", logger="fedprompt"):
        reply = app(_message("train", RecordDict()), ctx)
    assert not reply.has_error()
    assert set(reply.content.keys()) == {STATUS}
    assert dict(reply.content[STATUS]) == {"hospital-id": expected_id, "status": "refused", "reason": "internal"}
    assert b"secret-diagnosis" not in wire_bytes(reply) and b"Traceback" not in wire_bytes(reply)
    assert "Traceback" in caplog.text  # the detail (no site config, or the crash) is in the hospital's log


@pytest.mark.parametrize(
    "change, field",
    [
        ({"weight": 0}, "weight"),
        ({"weight": -1.0}, "weight"),
        ({"weight": "lots"}, "weight"),
        ({"weight": 1e10}, "weight"),
        ({"share_evaluation": "exact"}, "share_evaluation"),
        ({"share_evaluation": True}, "share_evaluation"),
        ({"evaluation_epsilon": 0}, "evaluation_epsilon"),
        ({"share_evaluation": "noised", "evaluation_epsilon": 50.0}, "evaluation_epsilon"),
    ],
)
def test_site_yaml_privacy_settings_are_validated(tmp_path, change, field):
    """The declared weight and the evaluation sharing are site settings: bad values name file, line, field."""
    from fedprompt.common.config import SiteConfig
    from fedprompt.common.errors import InputError

    doc = {
        "hospital_id": "h1",
        "train": "train.csv",
        "ledger": "ledger.json",
        "privacy": {"max_epsilon": 8.0, "delta": 1e-5},
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    site = SiteConfig.load(path)
    # defaults: the declared size rounded from the count at each run, evaluation stays local
    assert (site.weight, site.share_evaluation) == (None, "none")
    path.write_text(yaml.safe_dump({**doc, **change}, sort_keys=False))
    with pytest.raises(InputError, match=rf"site\.yaml:\d+: {field}:"):
        SiteConfig.load(path)
