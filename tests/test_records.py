"""Record validation: every bad input names its file, line and field; `data check` exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import edit_yaml

from fedprompt.client.workspace import write_workspace
from fedprompt.common.errors import InputError
from fedprompt.common.records import load_records

LABELS = [
    "neoplasms",
    "digestive system diseases",
    "nervous system diseases",
    "cardiovascular diseases",
    "general pathological conditions",
]


def load(path: Path, **kw):
    return load_records(path, text_field="text", label_field="label", labels=LABELS, **kw)


def problems(path: Path, **kw):
    with pytest.raises(InputError) as info:
        load(path, **kw)
    return info.value


def only(path: Path):
    err = problems(path)
    assert len(err.problems) == 1, str(err)
    return err.problems[0]


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_good_csv_and_jsonl(tmp_path):
    csv_path = write(
        tmp_path, "train.csv", "text,label\nmass in the lung,neoplasms\nepigastric pain,digestive system diseases\n"
    )
    records = load(csv_path)
    assert records.texts == ["mass in the lung", "epigastric pain"]
    assert records.labels == [0, 1] and records.path == csv_path
    assert records.counts(len(LABELS)) == [1, 1, 0, 0, 0]
    lines = [
        json.dumps({"text": "chest pain", "label": "cardiovascular diseases", "extra": 1}),
        "",
        json.dumps({"label": "neoplasms", "text": "a tumour"}),
    ]
    records = load(write(tmp_path, "train.jsonl", "\n".join(lines) + "\n"))
    assert records.texts == ["chest pain", "a tumour"] and records.labels == [3, 0]


def test_missing_file_and_folder(tmp_path):
    p = only(tmp_path / "nope.csv")
    assert (p.path, p.line, p.message) == (str(tmp_path / "nope.csv"), None, "file not found")
    (tmp_path / "dir.csv").mkdir()
    assert only(tmp_path / "dir.csv").message == "not a regular file"


def test_unsupported_extension(tmp_path):
    p = only(write(tmp_path, "train.txt", "text,label\nx,neoplasms\n"))
    assert "unsupported file type '.txt'" in p.message


def test_binary_file(tmp_path):
    p = only(write(tmp_path, "train.csv", b"text,label\nabc,neoplasms\nx\x00y,neoplasms\n"))
    assert p.line == 3 and "binary file" in p.message


def test_undecodable_bytes_report_each_line(tmp_path):
    p = write(tmp_path, "train.csv", b"text,label\ncaf\xe9,neoplasms\nok,neoplasms\nbad \xff\xfe,neoplasms\n")
    err = problems(p)
    assert [(x.line, x.field) for x in err.problems] == [(2, None), (4, None)]
    assert "not UTF-8" in err.problems[0].message and "0xe9" in err.problems[0].message


def test_empty_file_and_header_only(tmp_path):
    p = only(write(tmp_path, "train.csv", ""))
    assert p.line is None and "empty file" in p.message
    assert "empty file" in only(write(tmp_path, "blank.csv", "\n  \n")).message
    assert "empty file" in only(write(tmp_path, "train.jsonl", "\n")).message
    p = only(write(tmp_path, "header.csv", "text,label\n"))
    assert "no records" in p.message and "header" in p.message


def test_missing_columns_listed_at_line_1(tmp_path):
    err = problems(write(tmp_path, "train.csv", "note,diagnosis\nx,neoplasms\n"))
    assert [(p.line, p.field) for p in err.problems] == [(1, "text"), (1, "label")]
    assert "missing column" in err.problems[0].message and "'note', 'diagnosis'" in err.problems[0].message


def test_every_row_problem_at_once_with_exact_format(tmp_path):
    path = write(
        tmp_path,
        "train.csv",
        "text,label\n"
        "fine,neoplasms\n"
        "  ,neoplasms\n"  # line 3: empty text
        "tumour,cancer\n"  # line 4: unknown label
        "x,\n"  # line 5: empty label
        "a,neoplasms,extra\n",  # line 6: wrong field count
    )
    err = problems(path)
    got = [(p.line, p.field) for p in err.problems]
    assert got == [(3, "text"), (4, "label"), (5, "label"), (6, None)]
    assert str(err.problems[1]) == (
        f"{path}:4: label: unknown label 'cancer' (expected one of: neoplasms, digestive system diseases, "
        "nervous system diseases, cardiovascular diseases, general pathological conditions)"
    )
    assert err.problems[0].message == "empty text" and err.problems[2].message == "empty label"
    assert "expected 2 fields" in err.problems[3].message


def test_label_space_truncated_in_message(tmp_path):
    many = [f"class-{i}-with-a-long-name" for i in range(40)]
    path = write(tmp_path, "train.csv", "text,label\nx,nope\n")
    with pytest.raises(InputError) as info:
        load_records(path, text_field="text", label_field="label", labels=many)
    message = info.value.problems[0].message
    assert len(message) < 260 and "(40 labels in all)" in message and "class-0-with-a-long-name" in message


def test_integer_labels_rejected_unless_they_are_names(tmp_path):
    p = only(write(tmp_path, "train.csv", "text,label\nx,1\n"))
    assert (p.line, p.field) == (2, "label") and "unknown label '1'" in p.message
    p = only(write(tmp_path, "train.jsonl", '{"text": "x", "label": 1}\n'))
    assert (p.line, p.field) == (1, "label") and "unknown label '1'" in p.message
    numeric = write(tmp_path, "numeric.jsonl", '{"text": "x", "label": 2}\n')
    assert load_records(numeric, text_field="text", label_field="label", labels=["1", "2"]).labels == [1]


def test_too_many_problems_are_counted(tmp_path):
    path = write(tmp_path, "train.csv", "text,label\n" + "x,bad\n" * 30)
    err = problems(path, max_problems=5)
    assert len(err.problems) == 5 and err.omitted == 25
    assert str(err).endswith("... and 25 more problem(s) not shown")


def test_multiline_csv_reports_the_line_where_a_record_starts(tmp_path):
    path = write(
        tmp_path,
        "train.csv",
        'text,label\n"CC: chest pain\nHPI: 3 days\nA/P: NSTEMI",cardiovascular diseases\n\n"two\nlines",oops\n',
    )
    p = only(path)
    assert (p.line, p.field) == (6, "label")
    good = write(tmp_path, "good.csv", 'text,label\n"a\nb",neoplasms\nc,neoplasms\n')
    assert load(good).texts == ["a\nb", "c"]


def test_unterminated_quote_is_reported_where_it_starts(tmp_path):
    path = write(tmp_path, "train.csv", 'text,label\nok,neoplasms\n"never closed,neoplasms\nmore,neoplasms\n')
    p = only(path)
    assert p.line == 3 and "unterminated quoted field" in p.message


def test_bom_is_stripped(tmp_path):
    path = write(tmp_path, "train.csv", b"\xef\xbb\xbftext,label\nx,neoplasms\n")
    assert load(path).texts == ["x"]
    path = write(tmp_path, "train.jsonl", b'\xef\xbb\xbf{"text": "x", "label": "neoplasms"}\n')
    assert load(path).labels == [0]


def test_jsonl_problems(tmp_path):
    lines = [
        '{"text": "ok", "label": "neoplasms"}',
        '{"text": "x", "label": "neoplasms"',  # 2: malformed
        '["text", "label"]',  # 3: not an object
        '{"label": "neoplasms"}',  # 4: missing text
        '{"text": 5, "label": "neoplasms"}',  # 5: text not a string
        '{"text": "", "label": "neoplasms"}',  # 6: empty text
        '{"text": "y", "label": "cancer"}',  # 7: unknown label
    ]
    err = problems(write(tmp_path, "train.jsonl", "\n".join(lines) + "\n"))
    got = [(p.line, p.field) for p in err.problems]
    assert got == [(2, None), (3, None), (4, "text"), (5, "text"), (6, "text"), (7, "label")]
    messages = [p.message for p in err.problems]
    assert messages[0].startswith("malformed JSON")
    assert "expected a JSON object, got list" == messages[1]
    assert "missing field" in messages[2] and "'label'" in messages[2]
    assert (
        "expected a string" in messages[3] and messages[4] == "empty text" and "unknown label 'cancer'" in messages[5]
    )


def test_long_texts_are_not_an_error(tmp_path):
    text = "word " * 40_000  # 200 KB: above the csv module's default field size limit
    assert len(load(write(tmp_path, "train.csv", f"text,label\n{text},neoplasms\n")).texts[0]) == len(text)


# --- `fedprompt data check` ---------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path):
    train = [("mass", "neoplasms"), ("ulcer", "digestive system diseases")] * 10
    val = [("seizure", "nervous system diseases")]
    return write_workspace(tmp_path / "ws", name="t", labels=LABELS, hospitals={"1": (train, val)})


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_check_ok_prints_counts(workspace, data_cli, capsys):
    assert data_cli(["data", "check", "--site", str(workspace / "hospital-1" / "site.yaml")]) == 0
    out = capsys.readouterr().out
    assert "neoplasms" in out and " 10 " in out and out.rstrip().endswith("ok")


def test_check_bad_records_exits_2_and_writes_nothing(workspace, data_cli, capsys):
    site = workspace / "hospital-1"
    (site / "train.csv").write_text("text,label\nx,neoplasms\ny,cancer\n", encoding="utf-8")
    (site / "val.csv").write_text("text,diagnosis\nx,neoplasms\n", encoding="utf-8")
    before = tree(workspace)
    assert data_cli(["data", "check", "--site", str(site / "site.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{site / 'train.csv'}:3: label: unknown label 'cancer'" in err
    assert f"{site / 'val.csv'}:1: label: missing column" in err  # both files' problems at once
    assert tree(workspace) == before and not (site / "ledger").exists()


def test_check_without_a_federation_checks_the_site_alone(workspace, data_cli, capsys, tmp_path):
    """A hospital holds its site.yaml, not the aggregator's federation.yaml: `data check` checks
    what the site can alone (the labels against the space pinned in site.yaml, if pinned) and says
    what it could not."""
    (workspace / "federation.yaml").rename(tmp_path / "federation.yaml")
    site = workspace / "hospital-1"
    assert data_cli(["data", "check", "--site", str(site / "site.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"labels checked against the label space pinned in {site / 'site.yaml'}" in out
    assert "not checked" not in out
    assert "neoplasms" in out and "ledger: not created yet" in out and out.rstrip().endswith("ok")
    # A label outside the label space: caught against the pinned space; an unpinned site passes alone
    # (the label is listed, the check named as not done) and is caught with --federation.
    with (site / "train.csv").open("a", encoding="utf-8") as f:
        f.write("x,cancer\n")
    assert data_cli(["data", "check", "--site", str(site / "site.yaml")]) == 2
    assert f"{site / 'train.csv'}:22: label: unknown label 'cancer'" in capsys.readouterr().err
    edit_yaml(site / "site.yaml", lambda d: d.pop("labels"))
    assert data_cli(["data", "check", "--site", str(site / "site.yaml")]) == 0
    out = capsys.readouterr().out
    assert "cancer" in out
    assert "not checked: the labels above against the federation's label space: pass --federation" in out
    assert (
        data_cli(
            ["data", "check", "--site", str(site / "site.yaml"), "--federation", str(tmp_path / "federation.yaml")]
        )
        == 2
    )
    assert f"{site / 'train.csv'}:22: label: unknown label 'cancer'" in capsys.readouterr().err
    # Pinned to another label space than the federation's: refused, naming both.
    edit_yaml(site / "site.yaml", lambda d: d.update(labels=["a", "b"]))
    argv = ["data", "check", "--site", str(site / "site.yaml"), "--federation", str(tmp_path / "federation.yaml")]
    assert data_cli(argv) == 2
    err = capsys.readouterr().err
    assert "labels: pinned ['a', 'b'], but" in err and "every plan of that federation would be refused" in err
    edit_yaml(site / "site.yaml", lambda d: d.pop("labels"))
    # What the site can check alone is still checked: columns, empty texts, delta, backbone, ledger.
    (site / "val.csv").write_text("text,diagnosis\nx,neoplasms\n", encoding="utf-8")
    edit_yaml(site / "site.yaml", lambda d: d.update(privacy={**d["privacy"], "delta": 0.1}, backbone=str(tmp_path)))
    (site / "ledger").mkdir()
    (site / "ledger" / "privacy-ledger.json").write_text("{}", encoding="utf-8")
    before = tree(workspace)
    assert data_cli(["data", "check", "--site", str(site / "site.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{site / 'val.csv'}:1: label: missing column" in err
    assert (
        "privacy.delta: 0.1 is not below 1/n = 1/21" in err and f"backbone: {tmp_path} is not a model directory" in err
    )
    assert f"{site / 'ledger' / 'privacy-ledger.json'}: ledger: privacy ledger" in err and "corrupted" in err
    assert tree(workspace) == before


def test_check_opens_the_ledger_as_the_daemon_does(workspace, data_cli, capsys):
    from fedprompt.simulation import ensure_ledgers

    site = workspace / "hospital-1" / "site.yaml"
    assert ensure_ledgers(workspace) == ["hospital-1"]  # `privacy init`
    assert data_cli(["data", "check", "--site", str(site)]) == 0
    assert "privacy-ledger.json: 0 round(s) recorded; lifetime cap epsilon 8" in capsys.readouterr().out
    # A ledger that belongs to another hospital's site.yaml is bad input, named with its file.
    edit_yaml(site, lambda d: d.update(hospital_id="hospital-9"))
    assert data_cli(["data", "check", "--site", str(site)]) == 2
    assert "belongs to hospital 'hospital-1', not 'hospital-9'" in capsys.readouterr().err


def test_check_refuses_a_delta_too_large_for_the_site(workspace, data_cli, capsys):
    site = workspace / "hospital-1" / "site.yaml"
    edit_yaml(site, lambda d: d["privacy"].update(delta=0.1))
    assert data_cli(["data", "check", "--site", str(site)]) == 2
    assert "privacy.delta: 0.1 is not below 1/n = 1/20" in capsys.readouterr().err


def test_check_bad_site_yaml(workspace, data_cli, capsys):
    site = workspace / "hospital-1" / "site.yaml"
    edit_yaml(site, lambda d: d.update(text_feild=d.pop("text_field")))
    assert data_cli(["data", "check", "--site", str(site)]) == 2
    assert "text_feild: unknown key" in capsys.readouterr().err
