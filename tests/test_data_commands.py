"""`fedprompt data demo|partition|download` and the workspace layout they write."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from fedprompt.client.demo_data import LABELS, PER_HOSPITAL, generate_demo
from fedprompt.client.download import FILES, TEST_FILE
from fedprompt.client.ledger import PrivacyLedger
from fedprompt.client.workspace import list_hospitals, load_workspace, site_delta, write_workspace
from fedprompt.common.config import FederationConfig, SiteConfig
from fedprompt.common.records import load_records

SHARED = Path(__file__).parents[1].parent / "shared/data/medical-abstracts"
TEST_SHA = FILES[TEST_FILE]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def data_tree(folder: Path) -> dict[str, bytes]:
    """`tree` without the sites' new ledgers (each holds its creation time: never byte-identical)."""
    return {name: data for name, data in tree(folder).items() if "/ledger/" not in name}


def rows(path: Path) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return [(r["text"], r["label"]) for r in csv.DictReader(f)]


def workspace_rows(ws: Path) -> tuple[dict[str, tuple[list, list, list]], list]:
    """(hospital id -> (train, validation, local test) rows, global test rows)."""
    _, sites, test = load_workspace(ws)
    per_site = {
        s.hospital_id: (rows(s.train), rows(s.validation) if s.validation else [], rows(s.test) if s.test else [])
        for s in sites
    }
    return per_site, rows(test) if test else []


# --- demo -----------------------------------------------------------------------------------


def test_demo_is_deterministic_and_loads(tmp_path, data_cli, capsys):
    assert data_cli(["data", "demo", "--hospitals", "3", "--out", str(tmp_path / "a"), "--seed", "7"]) == 0
    table = capsys.readouterr().out
    assert "hospital-3" in table and "480/120/40" in table and "neoplasms" in table and "train/val/local test" in table
    assert data_cli(["data", "demo", "--hospitals", "3", "--out", str(tmp_path / "b"), "--seed", "7"]) == 0
    assert data_cli(["data", "demo", "--hospitals", "3", "--out", str(tmp_path / "c"), "--seed", "8"]) == 0
    a, b, c = (data_tree(tmp_path / x) for x in "abc")
    assert a == b and a != c
    assert sorted(a) == sorted(
        ["federation.yaml", "test.csv"]
        + [f"hospital-{i}/{f}" for i in (1, 2, 3) for f in ("site.yaml", "train.csv", "val.csv", "test.csv")]
    )
    ledgers = sorted(set(tree(tmp_path / "a")) - set(a))  # and each site's ledger, so `simulate` runs at once
    assert ledgers == sorted(
        f"hospital-{i}/ledger/privacy-ledger.json{s}" for i in (1, 2, 3) for s in ("", ".anchor", ".lock")
    )

    federation, sites, test = load_workspace(tmp_path / "a")
    assert (
        federation.labels == LABELS and federation.min_hospitals == 3 and federation.rounds == 1
    )  # the one-shot release
    assert federation.name == "demo" and federation == FederationConfig.load(tmp_path / "a" / "federation.yaml")
    assert [s.hospital_id for s in sites] == ["hospital-1", "hospital-2", "hospital-3"]
    for site in sites:
        assert not site.allow_non_private and site.privacy.max_epsilon == 8.0  # docs/deployment.md's recommendation
        assert site.ledger == tmp_path / "a" / site.hospital_id / "ledger" / "privacy-ledger.json"
        ledger = PrivacyLedger.for_site(site)  # as the daemon opens it: this site's, at its cap and delta
        assert list(ledger.history) == [] and ledger.epsilon_cap == 8.0 and ledger.delta == site.privacy.delta
        train = load_records(
            site.train, text_field=site.text_field, label_field=site.label_field, labels=federation.labels
        )
        assert len(train) == 480 and site.privacy.delta < 1 / len(train)
        assert len(rows(site.validation)) == 120
        assert site.test == tmp_path / "a" / site.hospital_id / "test.csv" and len(rows(site.test)) == 40
    assert len(rows(test)) == 200 and Counter(y for _, y in rows(test)) == {y: 40 for y in LABELS}


def test_demo_is_label_skewed_across_hospitals():
    demo = generate_demo(hospitals=3, seed=0)
    mixes = [Counter(y for _, y in train + val) for train, val in demo.hospitals.values()]
    # Total variation distance between hospitals' label mixes: IID sites would be near 0.
    tv = [
        0.5 * sum(abs(a[y] - b[y]) / PER_HOSPITAL for y in LABELS)
        for a, b in [(mixes[0], mixes[1]), (mixes[0], mixes[2]), (mixes[1], mixes[2])]
    ]
    assert max(tv) > 0.3, tv


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9/]+", text.lower()))


def _naive_bayes_accuracy(train: list[tuple[str, str]], test: list[tuple[str, str]]) -> float:
    counts = {y: Counter() for y in LABELS}
    prior = Counter(y for _, y in train)
    for text, y in train:
        counts[y].update(_tokens(text))
    vocab = len(set().union(*counts.values()))
    totals = {y: sum(c.values()) for y, c in counts.items()}

    def score(tokens: set[str], y: str) -> float:
        return math.log(prior[y] + 1) + sum(math.log((counts[y][w] + 1) / (totals[y] + vocab)) for w in tokens)

    return sum(max(LABELS, key=lambda y: score(_tokens(t), y)) == label for t, label in test) / len(test)


def test_demo_is_learnable_but_not_keyword_separable():
    # Even with plenty of data a bag-of-words classifier stays well short of perfect (overlapping
    # symptoms, negations, vague assessments), yet far above chance (0.2).
    demo = generate_demo(hospitals=3, per_hospital=1000, test_size=500, seed=1)
    train = [r for tr, _ in demo.hospitals.values() for r in tr]
    accuracy = _naive_bayes_accuracy(train, demo.test)
    assert 0.55 < accuracy < 0.95, accuracy


# --- partition ------------------------------------------------------------------------------


def _corpus(tmp_path: Path, n: int = 600) -> tuple[Path, Path]:
    """A corpus shaped like the real one: numeric labels, a mapping file, imbalanced classes."""
    corpus, names = tmp_path / "corpus.csv", tmp_path / "names.csv"
    with corpus.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["condition_label", "medical_abstract"])
        for i in range(n):
            w.writerow(["1112233445555"[i % 13], f"abstract number {i}\nsecond line"])
    names.write_text(
        "condition_label,condition_name\n" + "".join(f"{i + 1},{y}\n" for i, y in enumerate(LABELS)), encoding="utf-8"
    )
    return corpus, names


def _partition(data_cli, corpus, names, out, *extra) -> int:
    args = [
        "data",
        "partition",
        "--input",
        str(corpus),
        "--text-column",
        "medical_abstract",
        "--label-column",
        "condition_label",
    ]
    if names:
        args += ["--label-names", str(names)]
    return data_cli(
        [
            *args,
            "--hospitals",
            "3",
            "--alpha",
            "0.5",
            "--test-frac",
            "0.3",
            "--val-frac",
            "0.2",
            "--seed",
            "3",
            "--out",
            str(out),
            *extra,
        ]
    )


def _check_partition(corpus_rows: list[tuple[str, str]], ws: Path, test_frac: float, min_train: int = 20) -> dict:
    per_site, test = workspace_rows(ws)
    used = Counter(test)
    for train, val, local in per_site.values():
        used.update(train + val + local)
        assert len(train) >= min_train
    assert used == Counter(corpus_rows)  # every row exactly once
    n = len(corpus_rows)
    assert abs(len(test) - test_frac * n) <= 1
    by_label, test_by_label = Counter(y for _, y in corpus_rows), Counter(y for _, y in test)
    for y, count in by_label.items():
        assert abs(test_by_label[y] - test_frac * count) <= 1, (y, test_by_label[y], count)  # stratified
    return per_site


def test_partition_deterministic_exact_and_skewed(tmp_path, data_cli, capsys):
    corpus, names = _corpus(tmp_path)
    assert _partition(data_cli, corpus, names, tmp_path / "a", "--name", "t") == 0
    assert "hospital-1" in capsys.readouterr().out
    assert _partition(data_cli, corpus, names, tmp_path / "b", "--name", "t") == 0
    assert _partition(data_cli, corpus, names, tmp_path / "c", "--name", "t", "--seed", "4") == 0
    assert data_tree(tmp_path / "a") == data_tree(tmp_path / "b") != data_tree(tmp_path / "c")

    mapping = dict(zip("12345", LABELS, strict=True))
    corpus_rows = [
        (r["medical_abstract"], mapping[r["condition_label"]])
        for r in csv.DictReader(corpus.open(encoding="utf-8", newline=""))
    ]
    per_site = _check_partition(corpus_rows, tmp_path / "a", 0.3)
    mixes = [Counter(y for _, y in train + val + local) for train, val, local in per_site.values()]
    shares = [[m[y] / sum(m.values()) for y in LABELS] for m in mixes]
    assert (
        max(abs(a - b) for y in range(5) for a, b in [(shares[0][y], shares[1][y]), (shares[1][y], shares[2][y])])
        > 0.15
    )
    assert FederationConfig.load(tmp_path / "a" / "federation.yaml").labels == LABELS


def test_partition_without_label_names_uses_sorted_values(tmp_path, data_cli):
    corpus, _ = _corpus(tmp_path)
    assert _partition(data_cli, corpus, None, tmp_path / "ws") == 0
    federation, sites, _ = load_workspace(tmp_path / "ws")
    assert federation.labels == ["1", "2", "3", "4", "5"] and federation.name == "ws"
    assert not any(s.allow_non_private for s in sites)


def test_partition_bad_input_names_the_line_and_writes_nothing(tmp_path, data_cli, capsys):
    corpus, names = _corpus(tmp_path, n=50)
    text = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    text.insert(5, "9,an abstract with an unmapped label\n")  # physical line 6 (records span 2 lines)
    corpus.write_text("".join(text), encoding="utf-8")
    assert _partition(data_cli, corpus, names, tmp_path / "out") == 2
    assert f"{corpus}:6: condition_label: unknown label '9' (expected one of: 1, 2, 3, 4, 5)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_partition_bad_label_names_file(tmp_path, data_cli, capsys):
    corpus, names = _corpus(tmp_path)
    names.write_text("condition_label,condition_name\n1,neoplasms\n2,neoplasms\n1,other\n3,\n", encoding="utf-8")
    assert _partition(data_cli, corpus, names, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{names}:3: label name 'neoplasms' is used twice" in err
    assert f"{names}:4: label value '1' is mapped twice" in err
    assert f"{names}:5: expected a label value and a name" in err


def test_partition_too_small_for_the_hospitals(tmp_path, data_cli, capsys):
    corpus, names = _corpus(tmp_path, n=60)
    assert _partition(data_cli, corpus, names, tmp_path / "out") == 2
    assert "cannot give each of 3 hospitals 20 training rows" in capsys.readouterr().err


def test_partition_real_medical_abstracts(tmp_path, data_cli, capsys):
    if not (SHARED / "medical_tc_test.csv").is_file():
        pytest.skip(f"shared corpus not found at {SHARED} (it sits beside the repository, read-only)")
    corpus = SHARED / "medical_tc_test.csv"
    assert _partition(data_cli, corpus, SHARED / "medical_tc_labels.csv", tmp_path / "ws") == 0
    capsys_out = capsys.readouterr().out
    mapping = dict(zip("12345", LABELS, strict=True))
    with corpus.open(encoding="utf-8", newline="") as f:
        corpus_rows = [(r["medical_abstract"], mapping[r["condition_label"]]) for r in csv.DictReader(f)]
    assert len(corpus_rows) == 2888
    out = capsys_out
    # The corpus repeats 113 texts (231 rows), every one under two or more labels: all left out.
    assert "warning: duplicate records: 231 rows hold 113 texts read more than once (of 2888 rows, 2770" in out
    assert "warning: conflicting records: 113 texts read under two or more labels (231 rows)" in out
    assert f"{corpus}: lines 20 (nervous system diseases) = 2032 (general pathological conditions); " in out
    assert "left out of the split: the 231 rows of the conflicting records" in out
    by_text: dict[str, set[str]] = {}
    for text, label in corpus_rows:
        by_text.setdefault(" ".join(text.split()), set()).add(label)
    kept = [(t, y) for t, y in corpus_rows if len(by_text[" ".join(t.split())]) == 1]
    assert len(kept) == 2657
    _check_partition(kept, tmp_path / "ws", 0.3)
    for site in list_hospitals(tmp_path / "ws"):
        assert data_cli(["data", "check", "--site", str(site)]) == 0


def _records(n: int = 600):
    from fedprompt.common.records import Records

    return Records(
        [f"abstract number {i}" for i in range(n)],
        [int("1112233445555"[i % 13]) - 1 for i in range(n)],
        Path("corpus.csv"),
    )


def test_partition_without_local_tests_is_the_split_made_before_they_existed():
    from fedprompt.client.partition import partition

    args = dict(hospitals=3, alpha=0.5, test_frac=0.3, val_frac=0.2, seed=3)
    before = partition(_records(), LABELS, **args)
    # sha256 of this split as the code before local tests made it (benchmark splits stay valid)
    digest = hashlib.sha256(json.dumps([before.labels, before.hospitals, before.test]).encode()).hexdigest()
    assert digest == "3d87dc7a1c5d812745994a89da54994ec9f0e8cd7d5b2d50d2a259f4b625e613"
    assert partition(_records(), LABELS, **args, local_test_frac=0.0) == before
    assert before.local_tests == {"1": [], "2": [], "3": []}


def test_partition_local_tests_are_stratified_disjoint_and_use_every_row_once():
    from fedprompt.client.partition import partition

    records = _records()
    split = partition(records, LABELS, hospitals=3, alpha=0.5, test_frac=0.3, val_frac=0.2, seed=3, local_test_frac=0.2)
    used = Counter(split.test)
    for hid, (train, val) in split.hospitals.items():
        local = split.local_tests[hid]
        size = len(train) + len(val) + len(local)
        assert len(val) == round(0.2 * size) and len(local) == round(0.2 * size) and len(train) >= 20
        mine, held = Counter(y for _, y in train + val + local), Counter(y for _, y in local)
        assert all(abs(held[y] - 0.2 * mine[y]) <= 2 for y in LABELS), (mine, held)  # the hospital's own mix
        used.update(train + val + local)
    # disjoint, every row once
    assert used == Counter(zip(records.texts, (LABELS[y] for y in records.labels), strict=True))
    with pytest.raises(ValueError, match="val_frac \\+ local_test_frac < 1"):
        partition(records, LABELS, hospitals=3, alpha=0.5, test_frac=0.3, val_frac=0.5, seed=3, local_test_frac=0.5)


def test_partition_writes_each_hospitals_local_test(tmp_path, data_cli, capsys):
    corpus, names = _corpus(tmp_path)
    assert _partition(data_cli, corpus, names, tmp_path / "ws", "--local-test-frac", "0.2") == 0
    assert "train/val/local test" in capsys.readouterr().out
    mapping = dict(zip("12345", LABELS, strict=True))
    corpus_rows = [
        (r["medical_abstract"], mapping[r["condition_label"]])
        for r in csv.DictReader(corpus.open(encoding="utf-8", newline=""))
    ]
    per_site = _check_partition(corpus_rows, tmp_path / "ws", 0.3)
    for site_file in list_hospitals(tmp_path / "ws"):
        assert "test: test.csv" in site_file.read_text(encoding="utf-8").splitlines()
        site = SiteConfig.load(site_file)
        assert site.test == site_file.parent / "test.csv"
        train, val, local = per_site[site.hospital_id]
        assert len(local) == round(0.2 * (len(train) + len(val) + len(local))) > 0
        assert rows(site.test) == local and not set(local) & set(train + val)
        assert data_cli(["data", "check", "--site", str(site_file)]) == 0
    assert "test" in capsys.readouterr().out  # `data check` validates the local test file too

    assert _partition(data_cli, corpus, names, tmp_path / "none", "--local-test-frac", "0") == 0
    assert not list((tmp_path / "none").glob("hospital-*/test.csv"))
    assert all(SiteConfig.load(f).test is None for f in list_hospitals(tmp_path / "none"))


def test_partition_refuses_fractions_leaving_no_training_rows(tmp_path, data_cli, capsys):
    corpus, names = _corpus(tmp_path)
    assert _partition(data_cli, corpus, names, tmp_path / "out", "--local-test-frac", "0.8") == 2
    assert (
        "--local-test-frac: --val-frac 0.2 + --local-test-frac 0.8 leaves no training rows" in capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


def test_stratified_subset_keeps_the_label_mix_and_corpus_order():
    from fedprompt.client.partition import stratified_subset
    from fedprompt.common.records import Records

    labels = [0] * 600 + [1] * 300 + [2] * 100  # 60 / 30 / 10 %
    records = Records([f"note {i}" for i in range(1000)], labels, Path("corpus.csv"))
    small = stratified_subset(records, 101, seed=3)
    assert len(small) == 101 and Counter(small.labels) == {0: 61, 1: 30, 2: 10}  # largest remainder
    order = [int(t.split()[1]) for t in small.texts]
    assert order == sorted(order) and all(labels[i] == y for i, y in zip(order, small.labels, strict=True))
    assert stratified_subset(records, 101, seed=3).texts == small.texts  # same seed, same rows
    assert stratified_subset(records, 101, seed=4).texts != small.texts
    assert stratified_subset(records, 5000, seed=3) is records  # asking for more than there is: all of it


# --- workspace ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["demo", "partition"])
def test_refuses_a_non_empty_out_dir(tmp_path, data_cli, capsys, command):
    out = tmp_path / "ws"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    if command == "demo":
        code = data_cli(["data", "demo", "--out", str(out)])
    else:
        corpus, names = _corpus(tmp_path)
        code = _partition(data_cli, corpus, names, out)
    assert code == 2
    assert f"{out}: output folder already exists and is not empty" in capsys.readouterr().err
    assert tree(out) == {"keep.txt": b"mine"}


def test_writes_into_an_empty_existing_folder(tmp_path):
    (tmp_path / "ws").mkdir()
    demo = generate_demo(hospitals=1, per_hospital=40, test_size=0)
    write_workspace(tmp_path / "ws", name="x", labels=demo.labels, hospitals=demo.hospitals)
    assert (tmp_path / "ws" / "hospital-1" / "site.yaml").is_file() and not (tmp_path / "ws" / "test.csv").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ws"]  # no temp folder left behind


def test_hospitals_sorted_naturally_and_overrides_applied(tmp_path):
    hospitals = {str(i): ([("x", "a"), ("y", "b")], []) for i in (10, 2, 1)}
    ws = write_workspace(
        tmp_path / "ws",
        name="n",
        labels=["a", "b"],
        hospitals=hospitals,
        federation_overrides={"rounds": 7, "training": {"lr": 0.05}},
    )
    assert [p.parent.name for p in list_hospitals(ws)] == ["hospital-1", "hospital-2", "hospital-10"]
    federation, sites, test = load_workspace(ws)
    assert federation.rounds == 7 and federation.training.lr == 0.05 and federation.training.batch_size is None
    assert federation.min_hospitals == 3 and test is None
    assert all(s.validation is None for s in sites)
    site = SiteConfig.load(ws / "hospital-10" / "site.yaml")
    assert site.train == ws / "hospital-10" / "train.csv" and not site.allow_non_private


def test_site_delta():
    assert site_delta(2) == 1e-5
    assert site_delta(160) == 1e-5
    assert site_delta(100_000) == 1e-6
    assert site_delta(300_000) == 3e-7  # 1/(3e6) = 3.33e-7, rounded down
    assert site_delta(70_000) == 1e-6  # 1.43e-6 -> 1e-6


# --- download -------------------------------------------------------------------------------


def test_download_from_a_file_source(tmp_path, data_cli, capsys):
    if not (SHARED / "medical_tc_test.csv").is_file():
        pytest.skip(f"shared corpus not found at {SHARED}")
    out = tmp_path / "dl"
    assert data_cli(["data", "download", "medical-abstracts", "--out", str(out), "--source", SHARED.as_uri()]) == 0
    report = capsys.readouterr().out
    assert f"downloaded medical_tc_test.csv  {TEST_SHA}" in report
    assert "missing    medical_tc_train.csv" in report  # absent from this source: reported, not fatal
    assert (out / "medical_tc_test.csv").read_bytes() == (SHARED / "medical_tc_test.csv").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["medical_tc_labels.csv", "medical_tc_test.csv"]
    # A second run keeps (and re-checks) what is there.
    assert data_cli(["data", "download", "medical-abstracts", "--out", str(out), "--source", str(SHARED)]) == 0
    assert "kept       medical_tc_test.csv" in capsys.readouterr().out


def test_download_refuses_a_corrupted_or_missing_test_split(tmp_path, data_cli, capsys):
    if not (SHARED / "medical_tc_test.csv").is_file():
        pytest.skip(f"shared corpus not found at {SHARED}")
    source = tmp_path / "mirror"
    source.mkdir()
    data = bytearray((SHARED / "medical_tc_test.csv").read_bytes())
    data[1000] ^= 0x01
    (source / "medical_tc_test.csv").write_bytes(bytes(data))
    out = tmp_path / "dl"
    assert data_cli(["data", "download", "medical-abstracts", "--out", str(out), "--source", source.as_uri()]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert list(out.iterdir()) == []  # nothing saved, no partial file left

    shutil.rmtree(out)
    (source / "medical_tc_test.csv").unlink()
    assert data_cli(["data", "download", "medical-abstracts", "--out", str(out), "--source", source.as_uri()]) == 2
    assert "medical_tc_test.csv: could not download" in capsys.readouterr().err
