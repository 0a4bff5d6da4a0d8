"""Duplicate and conflicting records: what `data check` and `data partition` report, a partition
that never splits a text's copies and leaves conflicting texts out, and workspaces whose sites
have their ledgers from the start (`simulate --workspace` runs right after `data partition`)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import edit_yaml

from fedprompt.client.ledger import PrivacyLedger
from fedprompt.client.partition import partition
from fedprompt.client.workspace import create_ledgers, list_hospitals, load_workspace, write_workspace
from fedprompt.common.config import SiteConfig
from fedprompt.common.errors import LedgerError
from fedprompt.common.records import Records, find_duplicates, load_labelled, normalised_text

LABELS = ["a", "b", "c"]

# A site whose files repeat themselves. Line numbers as written (header on line 1; the quoted
# two-line text takes lines 7-8, so the next record starts on line 9).
TRAIN = [
    ("chest pain at rest", "a"),  # 2
    ("an ulcer", "b"),  # 3
    ("chest  pain at rest ", "a"),  # 4: line 2 again, other whitespace
    ("a mass", "c"),  # 5
    ("an ulcer", "c"),  # 6: line 3 under another label
    ("two\nlines", "c"),  # 7-8
    ("two lines", "c"),  # 9: lines 7-8 again
    ("seizure", "a"),  # 10
]
VAL = [("seizure", "a"), ("headache", "b")]  # line 2 is train line 10: a leak
LOCAL_TEST = [("a mass", "c")]  # line 2 is train line 5: a leak
FED_TEST = [("an ulcer", "b")]  # the aggregator's test set (the workspace's test.csv): train line 3


@pytest.fixture
def site(tmp_path) -> Path:
    ws = write_workspace(
        tmp_path / "ws",
        name="dups",
        labels=LABELS,
        hospitals={"1": (TRAIN, VAL)},
        local_tests={"1": LOCAL_TEST},
        test_rows=FED_TEST,
    )
    return ws / "hospital-1"


def test_check_reports_duplicates_conflicts_and_leaks_with_their_lines(site, data_cli, capsys):
    assert data_cli(["data", "check", "--site", str(site / "site.yaml")]) == 0  # warnings, not errors
    out = capsys.readouterr().out
    train, val, test, fed = site / "train.csv", site / "val.csv", site / "test.csv", site.parent / "test.csv"
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: duplicate records: 11 rows hold 5 texts read more than once (of 12 rows, 6 distinct texts); each "
        f"copy counts as one more record: {train}:2 = {train}:4; {train}:3 = {train}:6 = {fed}:2; {train}:5 = "
        f"{test}:2; {train}:7 = {train}:9; {train}:10 = {val}:2",
        f"warning: conflicting records: 1 text read under two or more labels (3 rows): {train}:3 (b) = {train}:6 (c) "
        f"= {fed}:2 (b)",
        "warning: LEAK: 3 training texts also in the validation/test records (evaluation on them measures "
        f"memorisation, not learning; remove them from one side): {train}:3 = {train}:6 = {fed}:2; {train}:5 = "
        f"{test}:2; {train}:10 = {val}:2",
    ]
    assert out.endswith("ok\n")


def test_check_a_single_file_names_lines_only_and_is_silent_without_repeats(tmp_path, data_cli, capsys):
    corpus = tmp_path / "notes.csv"
    corpus.write_text("text,label\nx,a\ny,b\nx,a\nz,a\ny, b\n", encoding="utf-8")
    records, names = load_labelled(corpus, text_field="text", label_field="label")
    found = find_duplicates([(records, names)])
    assert (found.rows, found.distinct, found.repeated_rows, len(found.groups)) == (5, 3, 4, 2)
    assert found.report(limit=1) == [
        f"warning: duplicate records: 4 rows hold 2 texts read more than once (of 5 rows, 3 distinct texts); each "
        f"copy counts as one more record: {corpus}: lines 2 = 4; ... (1 more)",
    ]  # " b" is label "b": the same label, no conflict
    assert find_duplicates([(Records(["x", "y"], [0, 1], corpus), ["a", "b"])]).report() == []


def _corpus_with_repeats(n: int = 300) -> tuple[Records, set[str], set[str]]:
    """`n` distinct notes, then 3 more copies of note 0 (whitespace varied), one of note 1, and note 2
    again under another label; the repeated and the conflicting texts (normalised)."""
    texts = [f"note {i}" for i in range(n)]
    labels = [i % 3 for i in range(n)]
    texts += [" note  0", "note 0 ", "note\t0", "note 1", "note 2"]
    labels += [0, 0, 0, 1, 0]  # note 2 was label 2
    return Records(texts, labels, Path("corpus.csv")), {"note 0", "note 1"}, {"note 2"}


def test_partition_keeps_every_copy_on_one_side_and_drops_conflicts():
    records, repeated, conflicting = _corpus_with_repeats()
    args = dict(hospitals=3, alpha=1.0, test_frac=0.3, val_frac=0.2, seed=5, local_test_frac=0.2)
    split = partition(records, LABELS, **args)
    assert (split.conflicting_texts, split.dropped_rows) == (1, 2)
    sides: dict[str, set[str]] = {}  # normalised text -> where its copies went
    used: Counter = Counter()
    buckets = {"test": split.test}
    for hid, (train, val) in split.hospitals.items():
        buckets |= {f"{hid}/train": train, f"{hid}/val": val, f"{hid}/local": split.local_tests[hid]}
    for side, rows in buckets.items():
        for text, label in rows:
            sides.setdefault(normalised_text(text), set()).add(side)
            used[(text, label)] += 1
    assert all(len(s) == 1 for s in sides.values()), {t: s for t, s in sides.items() if len(s) > 1}
    assert not conflicting & set(sides)  # both copies of the conflicting text left out
    expected = Counter(
        (t, LABELS[y])
        for t, y in zip(records.texts, records.labels, strict=True)
        if normalised_text(t) not in conflicting
    )
    assert used == expected and sum(used.values()) == len(records) - 2  # every other row exactly once
    assert sum(used[(t, y)] for t, y in used if normalised_text(t) == "note 0") == 4  # all 4 copies, one side
    assert repeated <= set(sides)
    assert partition(records, LABELS, **args) == split  # same seed, same split
    assert partition(records, LABELS, **(args | {"seed": 6})) != split


def _write_corpus(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["condition_label", "medical_abstract"])
        w.writerows([(label, text) for text, label in rows])


def _run_partition(data_cli, corpus: Path, out: Path) -> int:
    return data_cli(
        [
            "data",
            "partition",
            "--input",
            str(corpus),
            "--text-column",
            "medical_abstract",
            "--label-column",
            "condition_label",
            "--hospitals",
            "2",
            "--test-frac",
            "0.2",
            "--val-frac",
            "0.2",
            "--local-test-frac",
            "0",
            "--seed",
            "1",
            "--out",
            str(out),
        ]
    )


def test_partition_command_reports_and_creates_ledgers_simulate_accepts(tmp_path, data_cli, cli_with, capsys):
    rows = [(f"abstract {i}", "123"[i % 3]) for i in range(150)]
    rows[10] = ("abstract 0", "1")  # line 12: line 2 again, same label
    rows[20] = ("abstract  1", "3")  # line 22: line 3 (label 2) under label 3
    corpus = tmp_path / "corpus.csv"
    _write_corpus(corpus, rows)
    assert _run_partition(data_cli, corpus, tmp_path / "ws") == 0
    out = capsys.readouterr().out
    assert (
        "warning: duplicate records: 4 rows hold 2 texts read more than once (of 150 rows, 148 distinct texts); each "
        f"copy counts as one more record: {corpus}: lines 2 = 12; 3 = 22\n"
    ) in out
    conflict = f"1 text read under two or more labels (2 rows): {corpus}: lines 3 (2) = 22 (3)\n"
    assert f"warning: conflicting records: {conflict}" in out
    assert "left out of the split: the 2 rows of the conflicting records\n" in out
    assert "every other repeated text has all its copies on one side" in out
    assert f"workspace written to {tmp_path / 'ws'} (148 of 150 rows from {corpus})\n" in out
    assert "privacy ledgers created for hospital-1, hospital-2 " in out

    _, sites, test = load_workspace(tmp_path / "ws")
    written = [r for s in sites for f in (s.train, s.validation) if f for r in csv.DictReader(f.open())]
    written += list(csv.DictReader(test.open())) if test else []
    texts = Counter(r["text"] for r in written)
    assert len(written) == 148 and texts["abstract 0"] == 2 and "abstract 1" not in texts and "abstract  1" not in texts

    # The ledgers are there, empty, each its site's: `privacy show` reads them, and `simulate
    # --workspace` (which never creates one) finds every one.
    from fedprompt.simulation import check_ledgers

    check_ledgers(sites)
    privacy_cli = cli_with("privacy")  # `data_cli` registered `data` only
    for site in sites:
        assert privacy_cli(["privacy", "show", "--site", str(site.source), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["hospital_id"] == site.hospital_id and shown["history"] == []
        assert shown["epsilon_cap"] == 8.0 and shown["delta"] == site.privacy.delta


def test_create_ledgers_honours_the_anchor_and_never_replaces_a_ledger(tmp_path):
    ws = write_workspace(tmp_path / "ws", name="t", labels=LABELS, hospitals={"1": (TRAIN, []), "2": (TRAIN, [])})
    anchors = tmp_path / "anchors"  # another volume, in real life
    anchors.mkdir()
    site_file = ws / "hospital-2" / "site.yaml"
    edit_yaml(site_file, lambda d: d.update(ledger_anchor=str(anchors / "hospital-2.anchor")))
    first = SiteConfig.load(ws / "hospital-1" / "site.yaml")
    PrivacyLedger.create_for_site(first)  # hospital-1 already has its ledger (`privacy init`)
    kept = first.ledger.read_bytes()

    assert create_ledgers(ws) == ["hospital-2"]
    assert first.ledger.read_bytes() == kept  # untouched
    second = SiteConfig.load(site_file)
    assert (anchors / "hospital-2.anchor").is_file() and not Path(f"{second.ledger}.anchor").exists()
    assert PrivacyLedger.for_site(second).anchor_path == anchors / "hospital-2.anchor"
    assert create_ledgers(ws) == []  # every site has one: nothing created, nothing rewritten
    with pytest.raises(LedgerError, match="already exists; refusing to overwrite it"):
        PrivacyLedger.create_for_site(first)
    assert [p.parent.name for p in list_hospitals(ws)] == ["hospital-1", "hospital-2"]
