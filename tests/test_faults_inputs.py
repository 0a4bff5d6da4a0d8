"""Fault tolerance and hostile input, the scenarios that need no deployment processes.

- Scenario 6, bad configuration and bad records: a catalogue of malformed inputs, each through
  the real CLI (`data check`, `privacy show`, `simulate`, `predict`, `selftest`) or through a
  hospital's `train_round`. Each must give a clear error naming the file (and line and field
  where they apply), a non-zero exit code (or a well-formed refusal), and change nothing on disk:
  no ledger entry, no run folder, no checkpoint, no training.
- Scenario 7, disk full / read-only ledger folder: the site refuses before any update leaves it.
- Scenario 5, cap reached mid-run: an earlier run left less than the request needs; the site spreads what
  is left over the run's remaining rounds (more noise), and refuses when nothing useful is left.

Only the tiny random BERT of tests/tinybert.py; no Ray simulation (the engine is stubbed and
must not even be reached). The defects this file first found are listed in docs/reliability.md.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest
import yaml
from conftest import FAST, edit_yaml, make_workspace
from flwr.app import RecordDict

from fedprompt.cli import main
from fedprompt.client import hospital
from fedprompt.client.ledger import PrivacyLedger
from fedprompt.client.workspace import load_workspace
from fedprompt.common import atomic as atomic_mod
from fedprompt.common.plan import RoundPlan
from fedprompt.common.wire import ARRAYS, STATUS, state_to_arrays
from fedprompt.server.checkpoint import Checkpoint, save_checkpoint
from fedprompt.server.export import export_model
from fedprompt.server.federation import RunSpec, prepare_run
from fedprompt.simulation import ensure_ledgers

pytestmark = pytest.mark.faults

# the federation's request; below every site cap used here, so sigma never depends on the cap
TARGET_EPSILON = FAST["privacy"]["target_epsilon"]


# --- the template: one workspace, its ledger, an export and a checkpoint -------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_dir) -> Path:
    """root/ws (1 hospital, 16 train + 4 validation notes, rdp accountant, empty ledger),
    root/export (an exported prompt), root/run/checkpoint (a round-1 checkpoint)."""
    root = tmp_path_factory.mktemp("template").resolve()
    ws = make_workspace(
        root, tiny_dir, hospitals=1, per_hospital=20, test_size=10, allow_non_private=False, accountant="rdp"
    )
    ensure_ledgers(ws)
    fed, _, _ = load_workspace(ws)
    run = prepare_run(RunSpec(fed, root / "never-created", None, tiny_dir))
    export_model(root / "export", run.prompt, run.state, [], fed.name)
    save_checkpoint(
        root / "run" / "checkpoint", Checkpoint(1, run.state, [], run.prompt.backbone_fingerprint, fed.name)
    )
    assert not (root / "never-created").exists()
    return root


@pytest.fixture(scope="module")
def prepared(template, tiny_dir):
    """The aggregator's view of the template federation (for round plans)."""
    fed, _, _ = load_workspace(template / "ws")
    return prepare_run(RunSpec(fed, template / "never-created", None, tiny_dir))


def train_content(run, round_: int = 1, **plan_changes) -> RecordDict:
    """`plan_changes` are written into the plan's ConfigRecord as they are: a malformed plan too."""
    config = RoundPlan.for_run(run.spec.federation, run.prompt, round=round_).to_config_record()
    config.update({f"fp.{k}": v for k, v in plan_changes.items()})
    return RecordDict({ARRAYS: state_to_arrays(run.state), "config": config})


class Ctx:
    """A fresh copy of the template, with the paths a case needs."""

    def __init__(self, root: Path, tiny: Path, other: Path):
        self.root, self.tiny, self.other = root, tiny, other
        self.ws = root / "ws"
        self.fed = self.ws / "federation.yaml"
        self.hdir = self.ws / "hospital-1"
        self.site = self.hdir / "site.yaml"
        self.train = self.hdir / "train.csv"
        self.val = self.hdir / "val.csv"
        self.test = self.ws / "test.csv"
        self.ledger = self.hdir / "ledger" / "privacy-ledger.json"
        self.export = root / "export"
        self.run = root / "run"
        self.state_json = self.run / "checkpoint" / "state.json"
        self.out = root / "out"

    # argv of the five commands
    def check(self) -> list[str]:
        return ["data", "check", "--site", str(self.site)]

    def show(self) -> list[str]:
        return ["privacy", "show", "--site", str(self.site)]

    def simulate(self, *extra: str, out: Path | None = None, backbone: Path | None = None) -> list[str]:
        return [
            "simulate",
            "--workspace",
            str(self.ws),
            "--out",
            str(out or self.out),
            "--backbone",
            str(backbone or self.tiny),
            *extra,
        ]

    def predict(self, *extra: str, model: Path | None = None, backbone: Path | None = None) -> list[str]:
        src = list(extra) or ["--text", "chest pain"]
        return ["predict", "--model", str(model or self.export), "--backbone", str(backbone or self.tiny), *src]

    @staticmethod
    def selftest(backbone: Path) -> list[str]:
        return ["selftest", "--backbone", str(backbone), "--device", "cpu"]

    # edits
    def yaml(self, path: Path, change: Callable[[dict], None]) -> None:
        edit_yaml(path, change)

    def labels(self) -> list[str]:
        return yaml.safe_load(self.fed.read_text())["labels"]

    def append(self, path: Path, text: str | bytes) -> int:
        """Append one record; returns its line number (the template files hold no multi-line fields)."""
        data = path.read_bytes()
        line = data.count(b"\n") + 1
        path.write_bytes(data + (text.encode() if isinstance(text, str) else text))
        return line

    def to_jsonl(self) -> Path:
        """Rewrite the training records as train.jsonl and point site.yaml at it."""
        import csv

        rows = list(csv.DictReader(self.train.read_text().splitlines()))
        path = self.hdir / "train.jsonl"
        path.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows))
        self.yaml(self.site, lambda d: d.update(train="train.jsonl"))
        return path

    def ledger_doc(self, change: Callable[[dict], None]) -> None:
        doc = json.loads(self.ledger.read_text())
        change(doc)
        self.ledger.write_text(json.dumps(doc))

    def drop_ledger(self) -> None:
        shutil.rmtree(self.ledger.parent)


def line_of(path: Path, needle: str, nth: int = 1) -> int:
    """1-based line of the nth line holding `needle`."""
    hits = [i for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if needle in line]
    assert len(hits) >= nth, (path, needle)
    return hits[nth - 1]


def at(path: Path | str, line: int | None = None, field: str | None = None) -> str:
    """Regex of an error location: `path[:line][: field]:`."""
    rx = re.escape(str(path)) + (f":{line}" if line is not None else "")
    return rx + (": " + re.escape(field) + ":" if field else ":")


def snapshot(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = None if p.is_dir() else p.read_bytes()
    return out


@pytest.fixture
def ctx(tmp_path, template, tiny_dir, other_dir) -> Ctx:
    root = tmp_path.resolve() / "case"
    shutil.copytree(template, root, symlinks=True)
    return Ctx(root, tiny_dir, other_dir)


class Forbidden(AssertionError):
    pass


@pytest.fixture
def no_training(monkeypatch) -> list[str]:
    """Trainer, DP self-test and simulation engine: reaching any of them fails the test."""
    reached: list[str] = []

    def guard(name):
        def boom(*args, **kwargs):
            reached.append(name)
            raise Forbidden(f"{name} was reached on bad input")

        return boom

    import flwr.simulation

    from fedprompt.client import selftest, trainer

    monkeypatch.setattr(hospital, "local_update", guard("trainer.local_update"))
    monkeypatch.setattr(trainer, "train", guard("trainer.train"))
    monkeypatch.setattr(selftest, "run_selftest", guard("selftest.run_selftest"))
    monkeypatch.setattr(flwr.simulation, "run_simulation", guard("flwr.simulation.run_simulation"))
    return reached


# --- scenario 6: the catalogue through the real CLI ------------------------------------------------
# Each case edits the fresh copy and returns (argv, expected exit code, regexes the stderr must match).

Case = Callable[[Ctx], tuple[list[str], int, list[str]]]
BAD = 2  # InputError
PRIVACY = 3  # LedgerError / PrivacyBudgetExceeded


def _site_syntax(c: Ctx):
    c.site.write_text(c.site.read_text().replace("device: auto", "device: auto: cpu"))
    return (
        c.check(),
        BAD,
        [at(c.site, line_of(c.site, "device: auto: cpu")) + " YAML syntax error: mapping values are not allowed"],
    )


def _site_type_int(c: Ctx):
    c.yaml(c.site, lambda d: d.update(max_physical_batch_size="lots"))
    return (
        c.check(),
        BAD,
        [
            at(c.site, line_of(c.site, "max_physical_batch_size:"), "max_physical_batch_size")
            + " expected an integer, got 'lots'"
        ],
    )


def _site_type_bool(c: Ctx):
    c.yaml(c.site, lambda d: d.update(allow_non_private="yes please"))
    return (
        c.check(),
        BAD,
        [at(c.site, line_of(c.site, "allow_non_private:"), "allow_non_private") + " expected true or false"],
    )


def _site_unknown_top(c: Ctx):
    c.yaml(c.site, lambda d: d.update(epsilon_cap=3))
    return c.check(), BAD, [at(c.site, line_of(c.site, "epsilon_cap:"), "epsilon_cap") + " unknown key"]


def _site_unknown_nested(c: Ctx):
    c.yaml(c.site, lambda d: d["privacy"].update(noise=1.0))
    return c.check(), BAD, [at(c.site, line_of(c.site, "noise:"), "privacy.noise") + " unknown key"]


def _site_missing_required(c: Ctx):
    c.yaml(c.site, lambda d: d.pop("train"))
    return c.check(), BAD, [at(c.site, None, "train") + " missing required key"]


def _site_missing_nested(c: Ctx):
    c.yaml(c.site, lambda d: d["privacy"].pop("delta"))
    return c.check(), BAD, [at(c.site, line_of(c.site, "privacy:"), "privacy.delta") + " missing required key"]


def _site_negative_epsilon(c: Ctx):
    c.yaml(c.site, lambda d: d["privacy"].update(max_epsilon=-1.0))
    return (
        c.check(),
        BAD,
        [at(c.site, line_of(c.site, "max_epsilon:"), "privacy.max_epsilon") + " expected > 0, got -1"],
    )


def _site_delta_ge_1(c: Ctx):
    c.yaml(c.site, lambda d: d["privacy"].update(delta=1.0))
    return c.check(), BAD, [at(c.site, line_of(c.site, "delta:"), "privacy.delta") + " expected 0 < delta < 1"]


def _site_delta_not_below_1_over_n(c: Ctx):
    c.yaml(c.site, lambda d: d["privacy"].update(delta=0.5))
    return c.check(), BAD, [at(c.site, None, "privacy.delta") + r" 0\.5 is not below 1/n = 1/16"]


def _site_bad_literal(c: Ctx):
    c.yaml(c.site, lambda d: d.update(device="tpu"))
    return c.check(), BAD, [at(c.site, line_of(c.site, "device:"), "device") + " expected one of 'auto', 'cpu', 'cuda'"]


def _site_bad_hospital_id(c: Ctx):
    c.yaml(c.site, lambda d: d.update(hospital_id="bad id!"))
    return c.check(), BAD, [at(c.site, line_of(c.site, "hospital_id:"), "hospital_id")]


def _site_duplicate_key(c: Ctx):
    line = c.append(c.site, "device: cpu\n")
    return c.check(), BAD, [at(c.site, line, "device") + " duplicate key"]


def _site_empty(c: Ctx):
    c.site.write_text("# nothing here\n")
    return c.check(), BAD, [at(c.site) + " empty file"]


def _site_not_mapping(c: Ctx):
    c.site.write_text("- hospital-1\n- train.csv\n")
    return c.check(), BAD, [at(c.site, 1) + " expected a YAML mapping at top level"]


def _site_not_utf8(c: Ctx):
    c.append(c.site, b"# caf\xe9\n")
    return c.check(), BAD, [at(c.site) + " not UTF-8 text"]


def _site_missing_file(c: Ctx):
    missing = c.hdir / "sites.yaml"
    return ["data", "check", "--site", str(missing)], BAD, [at(missing) + " file not found"]


def _site_train_path_missing(c: Ctx):
    c.yaml(c.site, lambda d: d.update(train="nowhere.csv"))
    return c.check(), BAD, [at(c.hdir / "nowhere.csv") + " file not found"]


def _site_train_path_is_dir(c: Ctx):
    (c.hdir / "records.csv").mkdir()
    c.yaml(c.site, lambda d: d.update(train="records.csv"))
    return c.check(), BAD, [at(c.hdir / "records.csv") + " not a regular file"]


def _site_unsupported_ext(c: Ctx):
    shutil.copy(c.train, c.hdir / "train.txt")
    c.yaml(c.site, lambda d: d.update(train="train.txt"))
    return c.check(), BAD, [at(c.hdir / "train.txt") + " unsupported file type '.txt'"]


def _fed_rounds_zero(c: Ctx):
    c.yaml(c.fed, lambda d: d.update(rounds=0))
    return c.check(), BAD, [at(c.fed, line_of(c.fed, "rounds:"), "rounds") + " expected >= 1, got 0"]


def _fed_duplicate_labels(c: Ctx):
    c.yaml(c.fed, lambda d: d["labels"].append(d["labels"][0]))
    return c.check(), BAD, [at(c.fed, line_of(c.fed, "labels:"), "labels") + " duplicate label"]


def _fed_delta_ge_1(c: Ctx):
    c.yaml(c.fed, lambda d: d["privacy"].update(delta=1.5))
    return c.check(), BAD, [at(c.fed, line_of(c.fed, "delta:"), "privacy.delta") + " expected 0 < delta < 1, got 1.5"]


def _fed_negative_epsilon(c: Ctx):
    c.yaml(c.fed, lambda d: d["privacy"].update(target_epsilon=-2.0))
    return c.check(), BAD, [at(c.fed, line_of(c.fed, "target_epsilon:"), "privacy.target_epsilon") + " expected > 0"]


def _fed_unknown_nested(c: Ctx):
    c.yaml(c.fed, lambda d: d["training"].update(epochs=3))
    return c.check(), BAD, [at(c.fed, line_of(c.fed, "epochs: 3"), "training.epochs") + " unknown key"]


def _fed_wrong_type(c: Ctx):
    c.yaml(c.fed, lambda d: d.update(rounds="three"))
    return c.check(), BAD, [at(c.fed, line_of(c.fed, "rounds:"), "rounds") + " expected an integer, got 'three'"]


def _fed_bad_strategy(c: Ctx):
    c.yaml(c.fed, lambda d: d["strategy"].update(name="fedsgd"))
    return c.check(), BAD, [at(c.fed, line_of(c.fed, "name: fedsgd"), "strategy.name") + " expected one of"]


def _fed_labels_not_list(c: Ctx):
    c.yaml(c.fed, lambda d: d.update(labels="a,b"))
    return c.check(), BAD, [at(c.fed, line_of(c.fed, "labels:"), "labels") + " expected a list"]


def _fed_missing_name(c: Ctx):
    c.yaml(c.fed, lambda d: d.pop("name"))
    return c.check(), BAD, [at(c.fed, None, "name") + " missing required key"]


def _fed_missing_file(c: Ctx):
    c.fed.unlink()  # without a federation, `data check` checks the site alone; named, it must exist
    return [*c.check(), "--federation", str(c.fed)], BAD, [at(c.fed) + " file not found"]


def _records_label_space_mismatch(c: Ctx):
    c.yaml(c.fed, lambda d: d.update(labels=["alpha", "beta"]))
    return c.check(), BAD, [at(c.train, 2, "label") + " unknown label .* \\(expected one of: alpha, beta\\)"]


def _csv_missing_column(c: Ctx):
    c.train.write_text(c.train.read_text().replace("text,label", "note,label", 1))
    return c.check(), BAD, [at(c.train, 1, "text") + " missing column \\(found columns: 'note', 'label'\\)"]


def _csv_duplicate_column(c: Ctx):
    c.train.write_text("text,label,text\n" + "".join(f"{line},x\n" for line in c.train.read_text().splitlines()[1:]))
    return c.check(), BAD, [at(c.train, 1, "text") + " column appears more than once"]


def _csv_empty_text(c: Ctx):
    line = c.append(c.train, f'"   ",{c.labels()[0]}\n')
    return c.check(), BAD, [at(c.train, line, "text") + " empty text"]


def _csv_empty_label(c: Ctx):
    line = c.append(c.train, '"a note",\n')
    return c.check(), BAD, [at(c.train, line, "label") + " empty label"]


def _csv_unknown_label(c: Ctx):
    line = c.append(c.train, '"a note",not-a-label\n')
    return c.check(), BAD, [at(c.train, line, "label") + " unknown label 'not-a-label'"]


def _csv_undecodable(c: Ctx):
    line = c.append(c.train, b'"caf\xe9 au lait",' + c.labels()[0].encode() + b"\n")
    return c.check(), BAD, [at(c.train, line) + " not UTF-8 text \\(byte 0xe9"]


def _csv_binary(c: Ctx):
    line = c.append(c.train, b"\x00\x01\x02\x03PK\x03\x04\n")
    return c.check(), BAD, [at(c.train, line) + " binary file"]


def _csv_header_only(c: Ctx):
    c.train.write_text("text,label\n")
    return c.check(), BAD, [at(c.train) + " no records: the file has a header but no rows"]


def _csv_empty_file(c: Ctx):
    c.train.write_text("")
    return c.check(), BAD, [at(c.train) + " empty file"]


def _csv_field_count(c: Ctx):
    line = c.append(c.train, f'"a note",{c.labels()[0]},extra\n')
    return c.check(), BAD, [at(c.train, line) + " expected 2 fields"]


def _csv_unterminated_quote(c: Ctx):
    line = c.append(c.train, f'"a note that never ends,{c.labels()[0]}\n')
    return c.check(), BAD, [at(c.train, line) + " CSV syntax error: unterminated quoted field"]


def _jsonl_malformed(c: Ctx):
    path = c.to_jsonl()
    line = c.append(path, '{"text": "a note", "label": \n')
    return c.check(), BAD, [at(path, line) + " malformed JSON"]


def _jsonl_not_object(c: Ctx):
    path = c.to_jsonl()
    line = c.append(path, '["a note", "neoplasms"]\n')
    return c.check(), BAD, [at(path, line) + " expected a JSON object, got list"]


def _jsonl_missing_field(c: Ctx):
    path = c.to_jsonl()
    line = c.append(path, '{"text": "a note"}\n')
    return c.check(), BAD, [at(path, line, "label") + " missing field"]


def _jsonl_text_not_string(c: Ctx):
    path = c.to_jsonl()
    line = c.append(path, json.dumps({"text": 42, "label": c.labels()[0]}) + "\n")
    return c.check(), BAD, [at(path, line, "text") + " expected a string, got 42"]


def _val_unknown_label(c: Ctx):
    line = c.append(c.val, '"a note",not-a-label\n')
    return c.check(), BAD, [at(c.val, line, "label") + " unknown label 'not-a-label'"]


def _ledger_corrupted(c: Ctx):
    c.ledger.write_bytes(c.ledger.read_bytes()[:40])
    return c.show(), PRIVACY, [f"privacy ledger {re.escape(str(c.ledger))} is corrupted \\(not valid JSON"]


def _ledger_missing(c: Ctx):
    c.ledger.unlink()
    return c.show(), PRIVACY, [f"no privacy ledger at {re.escape(str(c.ledger))}"]


def _ledger_other_hospital(c: Ctx):
    c.ledger_doc(lambda d: d.update(hospital_id="hospital-9"))
    return (
        c.show(),
        PRIVACY,
        [f"privacy ledger {re.escape(str(c.ledger))} belongs to hospital 'hospital-9', not 'hospital-1'"],
    )


def _ledger_nan_entry(c: Ctx):
    entry = {
        "noise_multiplier": float("nan"),
        "sample_rate": 0.5,
        "steps": 2,
        "run_id": "t",
        "round": 1,
        "recorded_at": "2024-01-01T00:00:00+00:00",
    }
    c.ledger_doc(lambda d: d.update(history=[entry]))
    return (
        c.show(),
        PRIVACY,
        [
            f"privacy ledger {re.escape(str(c.ledger))} is corrupted \\(history\\[0\\]\\.noise_multiplier: expected "
            "a finite number"
        ],
    )


def _ledger_wrong_schema(c: Ctx):
    c.ledger_doc(lambda d: d.update(schema="fedprompt-ledger/0"))
    return (
        c.show(),
        PRIVACY,
        [f"privacy ledger {re.escape(str(c.ledger))} is corrupted \\(schema is 'fedprompt-ledger/0'"],
    )


def _ledger_other_delta(c: Ctx):
    c.ledger_doc(lambda d: d.update(delta=d["delta"] * 2))
    return c.show(), PRIVACY, [f"privacy ledger {re.escape(str(c.ledger))} accounts at delta"]


def _ledger_other_accountant(c: Ctx):
    c.ledger_doc(lambda d: d.update(mechanism="prv"))
    return (
        c.show(),
        PRIVACY,
        [
            f"privacy ledger {re.escape(str(c.ledger))} uses the 'prv' accountant but {re.escape(str(c.site))} says "
            "'rdp'"
        ],
    )


def _ledger_is_a_folder(c: Ctx):
    c.ledger.unlink()
    c.ledger.mkdir()
    return c.show(), PRIVACY, [f"cannot read privacy ledger {re.escape(str(c.ledger))}"]


# simulate: every case must stop before the engine, create no ledger and no run folder
def _sim_fed_wrong_type(c: Ctx):
    c.drop_ledger()
    c.yaml(c.fed, lambda d: d.update(rounds="three"))
    return c.simulate(), BAD, [at(c.fed, line_of(c.fed, "rounds:"), "rounds") + " expected an integer"]


def _sim_site_unknown_key(c: Ctx):
    c.drop_ledger()
    c.yaml(c.site, lambda d: d.update(colour="blue"))
    return c.simulate(), BAD, [at(c.site, line_of(c.site, "colour:"), "colour") + " unknown key"]


def _sim_duplicate_hospital(c: Ctx):
    c.drop_ledger()
    shutil.copytree(c.hdir, c.ws / "hospital-2")
    return (
        c.simulate(),
        BAD,
        [at(c.ws / "hospital-2" / "site.yaml", None, "hospital_id") + " 'hospital-1' is also used by"],
    )


def _sim_workspace_missing(c: Ctx):
    c.ws = c.root / "no-such-workspace"
    return c.simulate(), BAD, [at(c.ws) + " workspace folder not found"]


def _sim_no_hospitals(c: Ctx):
    shutil.rmtree(c.hdir)
    return c.simulate(), BAD, [at(c.ws) + " no hospital-\\*/site.yaml found"]


def _sim_backbone_not_hf(c: Ctx):
    c.drop_ledger()
    fake = c.root / "not-a-model"
    fake.mkdir()
    (fake / "README.md").write_text("weights are elsewhere\n")
    return c.simulate(backbone=fake), BAD, [at(fake) + " no config.json: not a HuggingFace model directory"]


def _sim_pinned_backbone_mismatch(c: Ctx):
    c.drop_ledger()
    c.yaml(c.fed, lambda d: d["model"].update(backbone_fingerprint="0" * 64))
    return c.simulate(), BAD, [at(c.fed, None, "model.backbone_fingerprint") + " pinned backbone 0000000000000000"]


def _sim_bad_test_set(c: Ctx):
    c.drop_ledger()
    line = c.append(c.test, '"a note",not-a-label\n')
    return c.simulate(), BAD, [at(c.test, line, "label") + " unknown label 'not-a-label'"]


def _sim_rounds_zero(c: Ctx):
    c.drop_ledger()
    return c.simulate("--rounds", "0"), BAD, ["--rounds: expected >= 1, got 0"]


def _sim_resume_corrupt_state(c: Ctx):
    c.drop_ledger()
    c.state_json.write_bytes(c.state_json.read_bytes()[:50])
    return c.simulate("--resume", out=c.run), BAD, [at(c.state_json) + " unreadable checkpoint"]


def _sim_resume_state_not_object(c: Ctx):
    c.drop_ledger()
    c.state_json.write_text("[1, 2, 3]\n")
    return c.simulate("--resume", out=c.run), BAD, [at(c.state_json) + " unreadable checkpoint"]


def _sim_resume_truncated_tensors(c: Ctx):
    c.drop_ledger()
    (tensors,) = (c.run / "checkpoint").glob("*.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:20])
    return c.simulate("--resume", out=c.run), BAD, [re.escape(str(c.run / "checkpoint")) + r"/\S+: unreadable"]


def _sim_resume_tensors_missing(c: Ctx):
    c.drop_ledger()
    (tensors,) = (c.run / "checkpoint").glob("*.safetensors")
    tensors.unlink()
    return c.simulate("--resume", out=c.run), BAD, [at(c.state_json) + " unreadable checkpoint"]


def _sim_resume_other_run(c: Ctx):
    c.drop_ledger()
    doc = json.loads(c.state_json.read_text())
    doc["run"] = "someone-else"
    c.state_json.write_text(json.dumps(doc))
    return c.simulate("--resume", out=c.run), BAD, [at(c.state_json) + " checkpoint is of run 'someone-else'"]


def _sim_existing_run_without_resume(c: Ctx):
    c.drop_ledger()
    return c.simulate(out=c.run), BAD, [at(c.run) + " holds a run already \\(checkpoint at round 1\\): pass --resume"]


# predict
def _predict_missing_config(c: Ctx):
    (c.export / "config.json").unlink()
    return c.predict(), BAD, [at(c.export / "config.json") + " missing"]


def _predict_config_not_json(c: Ctx):
    (c.export / "config.json").write_text('{"format": "fedprompt-prompt/1", ')
    return c.predict(), BAD, [at(c.export / "config.json") + " not valid JSON"]


def _predict_config_not_object(c: Ctx):
    (c.export / "config.json").write_text("[1, 2]\n")
    return c.predict(), BAD, [at(c.export / "config.json")]


def _predict_wrong_format(c: Ctx):
    doc = json.loads((c.export / "config.json").read_text())
    doc["format"] = "something-else/9"
    (c.export / "config.json").write_text(json.dumps(doc))
    return c.predict(), BAD, [at(c.export / "config.json", None, "format") + " expected format"]


def _predict_corrupt_weights(c: Ctx):
    (c.export / "prompt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return c.predict(), BAD, [at(c.export / "prompt.safetensors") + " unreadable safetensors"]


def _predict_wrong_shapes(c: Ctx):
    doc = json.loads((c.export / "config.json").read_text())
    doc["n_virtual_tokens"] += 1
    (c.export / "config.json").write_text(json.dumps(doc))
    return c.predict(), BAD, [at(c.export / "prompt.safetensors") + " tensors .* != expected"]


def _predict_export_missing(c: Ctx):
    model = c.root / "no-export"
    return c.predict(model=model), BAD, [at(model / "config.json") + " missing"]


def _predict_backbone_mismatch(c: Ctx):
    return (
        c.predict(backbone=c.other),
        BAD,
        [at(c.export / "config.json", None, "backbone_fingerprint") + " trained on backbone"],
    )


def _predict_backbone_not_hf(c: Ctx):
    fake = c.root / "not-a-model"
    fake.mkdir()
    (fake / "weights.txt").write_text("no\n")
    return c.predict(backbone=fake), BAD, [at(fake) + " no config.json"]


def _predict_input_missing(c: Ctx):
    path = c.root / "notes.txt"
    return c.predict("--input", str(path)), BAD, [at(path) + " file not found"]


def _predict_input_jsonl_malformed(c: Ctx):
    path = c.root / "notes.jsonl"
    path.write_text('{"text": "chest pain"}\n{"text": \n')
    return c.predict("--input", str(path)), BAD, [at(path, 2, "text") + " expected a JSON object"]


def _predict_input_csv_missing_column(c: Ctx):
    path = c.root / "notes.csv"
    path.write_text("note\nchest pain\n")
    return c.predict("--input", str(path)), BAD, [at(path, 1, "text") + " missing column"]


def _predict_input_not_utf8(c: Ctx):
    path = c.root / "notes.txt"
    path.write_bytes(b"chest pain\ncaf\xe9 au lait\n")
    return c.predict("--input", str(path)), BAD, [at(path)]


# selftest
def _selftest_not_hf(c: Ctx):
    fake = c.root / "not-a-model"
    fake.mkdir()
    (fake / "README.md").write_text("x\n")
    return c.selftest(fake), BAD, [at(fake) + " no config.json: not a HuggingFace model directory"]


def _selftest_missing_dir(c: Ctx):
    return c.selftest(c.root / "nowhere"), BAD, [at(c.root / "nowhere") + " backbone directory not found"]


def _selftest_is_a_file(c: Ctx):
    return c.selftest(c.fed), BAD, [at(c.fed) + " backbone must be a directory"]


def _copy_backbone(c: Ctx, weights: bool = True) -> Path:
    dst = c.root / "bb"
    shutil.copytree(c.tiny, dst, ignore=None if weights else shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dst


def _selftest_unsupported_type(c: Ctx):
    bb = _copy_backbone(c)
    cfg = json.loads((bb / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bb / "config.json").write_text(json.dumps(cfg))
    return c.selftest(bb), BAD, [at(bb / "config.json", None, "model_type") + " unsupported encoder 'gpt2'"]


def _selftest_config_not_json(c: Ctx):
    bb = _copy_backbone(c)
    (bb / "config.json").write_text("{ not json")
    return c.selftest(bb), BAD, [at(bb / "config.json") + " unreadable model config"]


def _selftest_no_weights(c: Ctx):
    bb = _copy_backbone(c, weights=False)
    return c.selftest(bb), BAD, [at(bb) + " no weights"]


# hostile YAML: explicit tags
def _site_yaml_bad_int_tag(c: Ctx):
    c.site.write_text(c.site.read_text().replace("max_physical_batch_size: 32", "max_physical_batch_size: !!int lots"))
    return c.check(), BAD, [at(c.site, line_of(c.site, "max_physical_batch_size:"))]


def _site_yaml_python_tag(c: Ctx):
    c.site.write_text(c.site.read_text().replace("device: auto", "device: !!python/name:os.system ''"))
    return c.check(), BAD, [at(c.site, line_of(c.site, "device:"))]


CATALOGUE: list = [
    # site.yaml (data check)
    _site_syntax,
    _site_type_int,
    _site_type_bool,
    _site_unknown_top,
    _site_unknown_nested,
    _site_missing_required,
    _site_missing_nested,
    _site_negative_epsilon,
    _site_delta_ge_1,
    _site_delta_not_below_1_over_n,
    _site_bad_literal,
    _site_bad_hospital_id,
    _site_duplicate_key,
    _site_empty,
    _site_not_mapping,
    _site_not_utf8,
    _site_missing_file,
    _site_train_path_missing,
    _site_train_path_is_dir,
    _site_unsupported_ext,
    _site_yaml_bad_int_tag,
    _site_yaml_python_tag,
    # federation.yaml (data check)
    _fed_rounds_zero,
    _fed_duplicate_labels,
    _fed_delta_ge_1,
    _fed_negative_epsilon,
    _fed_unknown_nested,
    _fed_wrong_type,
    _fed_bad_strategy,
    _fed_labels_not_list,
    _fed_missing_name,
    _fed_missing_file,
    # records (data check)
    _records_label_space_mismatch,
    _csv_missing_column,
    _csv_duplicate_column,
    _csv_empty_text,
    _csv_empty_label,
    _csv_unknown_label,
    _csv_undecodable,
    _csv_binary,
    _csv_header_only,
    _csv_empty_file,
    _csv_field_count,
    _csv_unterminated_quote,
    _jsonl_malformed,
    _jsonl_not_object,
    _jsonl_missing_field,
    _jsonl_text_not_string,
    _val_unknown_label,
    # privacy ledger (privacy show)
    _ledger_corrupted,
    _ledger_missing,
    _ledger_other_hospital,
    _ledger_nan_entry,
    _ledger_wrong_schema,
    _ledger_other_delta,
    _ledger_other_accountant,
    _ledger_is_a_folder,
    # simulate, before any training
    _sim_fed_wrong_type,
    _sim_site_unknown_key,
    _sim_duplicate_hospital,
    _sim_workspace_missing,
    _sim_no_hospitals,
    _sim_backbone_not_hf,
    _sim_pinned_backbone_mismatch,
    _sim_bad_test_set,
    _sim_rounds_zero,
    _sim_resume_corrupt_state,
    _sim_resume_tensors_missing,
    _sim_resume_other_run,
    _sim_existing_run_without_resume,
    _sim_resume_state_not_object,
    _sim_resume_truncated_tensors,
    # predict
    _predict_missing_config,
    _predict_config_not_json,
    _predict_wrong_format,
    _predict_corrupt_weights,
    _predict_wrong_shapes,
    _predict_export_missing,
    _predict_backbone_mismatch,
    _predict_backbone_not_hf,
    _predict_input_missing,
    _predict_input_jsonl_malformed,
    _predict_input_csv_missing_column,
    _predict_config_not_object,
    _predict_input_not_utf8,
    # selftest
    _selftest_not_hf,
    _selftest_missing_dir,
    _selftest_is_a_file,
    _selftest_unsupported_type,
    _selftest_config_not_json,
    _selftest_no_weights,
]


def _id(case) -> str:
    return case.__name__.lstrip("_")


def _params(cases: list) -> list:
    """Each case becomes a param named after its function."""
    return [pytest.param(c, id=_id(c)) for c in cases]


@pytest.mark.parametrize("case", _params(CATALOGUE))
def test_bad_input_is_a_clear_error_and_changes_nothing(case: Case, ctx: Ctx, no_training, capsys):
    argv, code, patterns = case(ctx)
    capsys.readouterr()
    before = snapshot(ctx.root)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == code, (rc, err)
    for rx in patterns:
        assert re.search(rx, err), f"stderr lacks {rx!r}:\n{err}"
    assert err.startswith(("error: ", "privacy: ")) and "Traceback" not in err
    assert no_training == []  # nothing trained, no engine started, no self-test run
    assert snapshot(ctx.root) == before  # nothing written, overwritten or created (no ledger, no run folder)
    assert not ctx.out.exists() and not (ctx.run / "metrics.json").exists()


def test_catalogue_size():
    """The issue asks for at least 25 distinct malformed inputs."""
    assert len(CATALOGUE) >= 25
    assert len({p.id for p in _params(CATALOGUE)}) == len(CATALOGUE)


# --- scenario 6 at the hospital: bad input is a well-formed refusal, never an update ---------------


def _refuse_backbone_mismatch(c: Ctx, run):
    c.yaml(c.site, lambda d: d.update(backbone=str(c.other)))
    return train_content(run), ["backbone mismatch", "this site's backbone is [0-9a-f]{16}"]


def _refuse_label_space(c: Ctx, run):
    content = train_content(run, labels=["alpha", "beta"])
    # A model of the plan's 2 labels: one of another shape is refused first (client/limits.check_received).
    content[ARRAYS] = state_to_arrays({k: v[:2] if k.startswith("head.") else v for k, v in run.state.items()})
    # site.yaml's pinned label space refuses it before a record is read (client/limits.check_label_space).
    return content, ["labels: the plan's label space is not the one this site pinned \\(not pinned: alpha, beta;"]


def _refuse_corrupted_ledger(c: Ctx, run):
    c.ledger.write_text('{"schema": "fedprompt-ledger/1", "history": [')
    return train_content(run), [f"privacy ledger {re.escape(str(c.ledger))} is corrupted"]


def _refuse_missing_ledger(c: Ctx, run):
    c.ledger.unlink()
    return train_content(run), [f"no privacy ledger at {re.escape(str(c.ledger))}"]


def _refuse_other_hospitals_ledger(c: Ctx, run):
    c.ledger_doc(lambda d: d.update(hospital_id="hospital-2"))
    return train_content(run), ["belongs to hospital 'hospital-2', not 'hospital-1'"]


def _refuse_bad_site_yaml(c: Ctx, run):
    c.yaml(c.site, lambda d: d["privacy"].update(max_epsilonn=5))
    return train_content(run), [at(c.site, line_of(c.site, "max_epsilonn:"), "privacy.max_epsilonn") + " unknown key"]


def _refuse_binary_records(c: Ctx, run):
    c.train.write_bytes(b"text,label\n\x00\x00\x00")
    return train_content(run), [at(c.train, 2) + " binary file"]


def _refuse_backbone_not_hf(c: Ctx, run):
    fake = c.root / "not-a-model"
    fake.mkdir()
    c.yaml(c.site, lambda d: d.update(backbone=str(fake)))
    return train_content(run), [at(fake) + " no config.json"]


def _refuse_non_private_request(c: Ctx, run):
    return train_content(run, private=False), ["NON-PRIVATE"]


def _refuse_malformed_plan(c: Ctx, run):
    # The aggregator's round plan goes through the same validation as federation.yaml.
    return train_content(run, lr=-1.0, optimizer="lbfgs"), [
        r"the aggregator's round plan: fp\.lr: expected > 0, got -1\.0",
        r"fp\.optimizer: expected one of 'adam', 'sgd'",
    ]


def _refuse_yaml_tag(c: Ctx, run):
    c.site.write_text(c.site.read_text().replace("max_physical_batch_size: 32", "max_physical_batch_size: !!int lots"))
    return train_content(run), [at(c.site)]


REFUSALS = [
    _refuse_backbone_mismatch,
    _refuse_label_space,
    _refuse_corrupted_ledger,
    _refuse_missing_ledger,
    _refuse_other_hospitals_ledger,
    _refuse_bad_site_yaml,
    _refuse_binary_records,
    _refuse_backbone_not_hf,
    _refuse_non_private_request,
    _refuse_malformed_plan,
    _refuse_yaml_tag,
]
# What the aggregator learns of each: a category (common/wire.REFUSAL_CATEGORIES), nothing more.
REFUSAL_CATEGORY = {
    _refuse_backbone_mismatch: "backbone",
    _refuse_label_space: "configuration",
    _refuse_corrupted_ledger: "budget",
    _refuse_missing_ledger: "budget",
    _refuse_other_hospitals_ledger: "budget",
    _refuse_bad_site_yaml: "configuration",
    _refuse_binary_records: "records",
    _refuse_backbone_not_hf: "backbone",
    _refuse_non_private_request: "non-private refused",
    _refuse_yaml_tag: "configuration",
    _refuse_malformed_plan: "configuration",
}


@pytest.mark.parametrize("case", _params(REFUSALS))
def test_hospital_refuses_bad_input_before_training(case, ctx: Ctx, prepared, no_training, caplog):
    content, patterns = case(ctx, prepared)
    before = snapshot(ctx.root)
    with caplog.at_level("WARNING", logger="fedprompt.hospital"):
        reply = hospital.train_round(content, ctx.site)
    assert set(reply.keys()) == {STATUS}, set(reply.keys())  # no ARRAYS, no METRICS: nothing leaves the site
    assert reply[STATUS]["status"] == "refused"
    local = "\n".join(r.getMessage() for r in caplog.records if "refuses round" in r.getMessage())
    for rx in patterns:  # the hospital's own log has the full message, paths included
        assert re.search(rx, local), f"local log lacks {rx!r}: {local}"
    # what the aggregator sees: the category alone (no file, line, field, label or path)
    assert dict(reply[STATUS]) == {"hospital-id": "hospital-1", "status": "refused", "reason": REFUSAL_CATEGORY[case]}
    assert f"[{REFUSAL_CATEGORY[case]}]" in local
    assert no_training == []
    assert snapshot(ctx.root) == before  # ledger bytes unchanged, nothing created


# --- simulate must not start a run on a workspace whose records are all bad -------------------------


def test_simulate_refuses_a_workspace_whose_records_are_all_bad(ctx: Ctx, no_training, capsys):
    ctx.drop_ledger()
    ctx.append(ctx.train, '"a note",not-a-label\n')
    before = snapshot(ctx.root)
    try:
        rc = main(ctx.simulate())
    except Forbidden:
        rc = None
    err = capsys.readouterr().err
    assert no_training == [], "the simulation engine was started"
    assert rc == BAD and re.search(at(ctx.train), err)
    assert snapshot(ctx.root) == before


# --- scenario 7: disk full / read-only ledger folder -----------------------------------------------


class _FaultyModule:
    """A stand-in for `os` or `tempfile` inside common.atomic, the ledger's writer (a round writes no
    other file before its ledger entry): one function fails."""

    def __init__(self, real, **faults):
        self._real, self._faults = real, faults

    def __getattr__(self, name):
        return self._faults.get(name) or getattr(self._real, name)


def _oserror(err: int):
    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    return fail


def _fsync_dirs_only(fd):
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    return os.fsync(fd)


DISK_FAULTS = {
    "disk-full-at-fsync": ("os", {"fsync": _oserror(errno.ENOSPC)}, "No space left on device"),
    "disk-full-at-replace": ("os", {"replace": _oserror(errno.ENOSPC)}, "No space left on device"),
    "read-only-fs-at-mkstemp": ("tempfile", {"mkstemp": _oserror(errno.EROFS)}, "Read-only file system"),
    "directory-fsync-fails": ("os", {"fsync": _fsync_dirs_only}, "could not be synced"),
}


def _chattr(path: Path, flag: str) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.parametrize("fault", [*DISK_FAULTS, "immutable-ledger-folder"])
def test_unwritable_ledger_refuses_before_any_update_leaves(
    fault, ctx: Ctx, prepared, no_training, monkeypatch, caplog
):
    hospital.cached_backbone(str(ctx.tiny))  # warm: the fault hits the ledger write, nothing else
    # Noise calibration is not under test here (test_engine covers it) and costs seconds: pin sigma.
    monkeypatch.setattr(hospital, "calibrate_noise", lambda *args, **kwargs: 3.0)
    before_bytes = ctx.ledger.read_bytes()
    before_listing = sorted(os.listdir(ctx.ledger.parent))
    before_eps = PrivacyLedger.open(ctx.ledger).epsilon_spent()
    content = train_content(prepared, 1)
    if fault == "immutable-ledger-folder":
        # A real read-only folder that even root cannot write into (chmod does not stop root).
        if not _chattr(ctx.ledger.parent, "+i"):
            pytest.skip("chattr +i not available here")
        try:
            with caplog.at_level("WARNING", logger="fedprompt.hospital"):
                reply = hospital.train_round(content, ctx.site)
        finally:
            _chattr(ctx.ledger.parent, "-i")
        expected = "Operation not permitted|Permission denied|Read-only"
    else:
        module, faults, expected = DISK_FAULTS[fault]
        with monkeypatch.context() as m:
            m.setattr(atomic_mod, module, _FaultyModule(getattr(atomic_mod, module), **faults))
            with caplog.at_level("WARNING", logger="fedprompt.hospital"):
                reply = hospital.train_round(content, ctx.site)
    assert set(reply.keys()) == {STATUS}, set(reply.keys())  # refused: no ARRAYS, no METRICS
    assert reply[STATUS]["status"] == "refused"
    assert reply[STATUS]["reason"] == "budget"  # the ledger cannot account for the round; the detail stays local
    local = "\n".join(r.getMessage() for r in caplog.records if "refuses round" in r.getMessage())
    assert re.search(expected, local) and ctx.ledger.name in local, local
    assert no_training == []
    assert sorted(os.listdir(ctx.ledger.parent)) == before_listing  # no temp file left behind
    after = PrivacyLedger.open(ctx.ledger)
    if fault == "directory-fsync-fails":
        # The entry reached the file before the folder sync failed: the site over-counts, never under-counts.
        assert len(after.history) == 1 and after.epsilon_spent() > before_eps
    else:
        assert ctx.ledger.read_bytes() == before_bytes and after.epsilon_spent() == before_eps


# --- scenario 5: the cap is reached mid-run ---------------------------------------------------------


def test_cap_reached_mid_run_spreads_what_is_left_over_the_remaining_rounds(ctx: Ctx, prepared, monkeypatch, caplog):
    from fedprompt.client.hospital import site_run
    from fedprompt.common.accounting import compute_epsilon
    from fedprompt.common.config import SiteConfig

    site = SiteConfig.load(ctx.site)
    # The DP-SGD rounds (round 1 is the one-shot class-sums release): the site's sigma for this run,
    # calibrated on the federation's request alone (below every cap used here).
    plan = RoundPlan.for_run(prepared.spec.federation, prepared.prompt, round=2)
    sigma, q, steps = site_run(site, plan, 16).mechanism(plan)
    assert sigma is not None

    # An earlier run spent part of the budget; at the request's sigma the cap pays for round 2, not round 3.
    ledger = PrivacyLedger.open(ctx.ledger)
    e0 = ledger.record(1.0, q, 3 * steps, epsilon_cap=1e6, run_id="earlier", round=1)
    e1 = ledger.project(sigma, q, steps)
    e2 = compute_epsilon(ledger.mechanism, [(1.0, q, 3 * steps), (sigma, q, steps), (sigma, q, steps)], ledger.delta)
    cap = (e1 + e2) / 2
    assert TARGET_EPSILON < e0 < e1 < cap < e2
    ctx.yaml(ctx.site, lambda d: d["privacy"].update(max_epsilon=cap))

    trained = []
    real_update = hospital.local_update
    monkeypatch.setattr(hospital, "local_update", lambda *a, **k: trained.append(1) or real_update(*a, **k))
    spent = [e0]
    for r in (2, 3):
        reply = hospital.train_round(train_content(prepared, r), ctx.site)
        assert reply[STATUS]["status"] == "ok" and ARRAYS in reply
        spent.append(PrivacyLedger.open(ctx.ledger).epsilon_spent())
    # Calibrated on what was left: rounds 2 and 3 (and room for one retried round) at one larger sigma.
    assert trained == [1, 1]
    history = PrivacyLedger.open(ctx.ledger).history
    assert [e.run_id for e in history] == ["earlier", "t", "t"]
    fitted = history[1].noise_multiplier  # each round fits anew, to 1%: round 3 needs about the same
    assert fitted > sigma and history[2].noise_multiplier == pytest.approx(fitted, rel=0.02)
    assert all(a <= b for a, b in pairwise(spent)) and spent[-1] <= cap, spent

    # Nothing useful left (the cap is what was spent): refused before anything is recorded.
    ctx.yaml(ctx.site, lambda d: d["privacy"].update(max_epsilon=spent[-1]))
    before = ctx.ledger.read_bytes()
    with caplog.at_level("WARNING", logger="fedprompt.hospital"):
        reply = hospital.train_round(train_content(prepared, 3), ctx.site)
    assert set(reply.keys()) == {STATUS} and reply[STATUS]["reason"] == "budget"
    assert "leaves too little of this site's cap" in caplog.text
    assert ctx.ledger.read_bytes() == before and trained == [1, 1]
    print(
        f"\n[scenario 5] request sigma {sigma:.4f} q {q:g} steps/round {steps}; epsilon before {e0:.4f}; cap {cap:.4f} "
        f"(at the request's sigma round 3 would reach {e2:.4f}); fitted sigma {fitted:.4f}; ledger after rounds 2/3: "
        f"{spent[1]:.4f}/{spent[2]:.4f}"
    )
