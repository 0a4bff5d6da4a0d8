"""`fedprompt hospital init`: a commented site.yaml template that SiteConfig.load accepts once filled in."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedprompt.client.site_template import LAYOUT, RECOMMENDED, render
from fedprompt.common.config import PrivacyCap, SiteConfig, SiteLimits
from fedprompt.common.errors import InputError


@pytest.fixture
def cli(cli_with):
    return cli_with("hospital", "data")


def _records(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"note {i},{'ab'[i % 2]}\n" for i in range(20))
    (folder / "train.csv").write_text("text,label\n" + rows, encoding="utf-8")
    (folder / "val.csv").write_text("text,label\nx,a\ny,b\n", encoding="utf-8")
    return folder / "train.csv", folder / "val.csv"


def test_every_field_is_documented_once():
    """A field added to SiteConfig (or its privacy cap, or its limits) must be explained in the template too."""
    fields = list(SiteConfig.model_fields) + [f"privacy.{name}" for name in PrivacyCap.model_fields]
    fields += [f"limits.{name}" for name in SiteLimits.model_fields]
    documented = [key for key, _ in LAYOUT]
    assert sorted(documented) == sorted(fields) and len(set(documented)) == len(documented)
    text, required = render({})
    assert required == ["hospital_id", "train", "ledger"]  # nothing else can be guessed
    lines = text.splitlines()
    for key, _ in LAYOUT:
        field, indent = key.rsplit(".", 1)[-1], "  " * key.count(".")
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{indent}{field}:"))
        assert lines[at - 1].lstrip().startswith("#"), key  # its meaning, right above it
        if key not in ("privacy", "limits"):  # sections: their fields carry the defaults
            assert any(w in lines[at - 1] for w in ("Default:", "REQUIRED", "Required")), (key, lines[at - 1])


def test_init_with_paths_writes_a_site_that_loads_with_the_recommended_private_settings(
    tmp_path, cli, capsys, monkeypatch
):
    train, val = _records(tmp_path / "records")
    monkeypatch.chdir(tmp_path)  # relative paths on the command line are relative to here, not to the file
    out = tmp_path / "etc" / "site.yaml"
    assert (
        cli(
            [
                "hospital",
                "init",
                "--out",
                str(out),
                "--hospital-id",
                "hospital-7",
                "--train",
                "records/train.csv",
                "--validation",
                str(val),
                "--ledger",
                "state/privacy-ledger.json",
            ]
        )
        == 0
    )
    assert "still to fill in" not in capsys.readouterr().out
    site = SiteConfig.load(out)
    assert (site.hospital_id, site.train, site.validation, site.ledger) == (
        "hospital-7",
        train,
        val,
        tmp_path / "state" / "privacy-ledger.json",
    )
    assert site.privacy == PrivacyCap(max_epsilon=8.0, delta=1e-5)
    assert (site.allow_non_private, site.share_evaluation, site.weight, site.patient_field) == (
        False,
        "none",
        None,
        None,
    )
    defaults = SiteConfig(hospital_id="x", train=Path("t"), privacy=site.privacy, ledger=Path("l"))
    for f in (
        "test",
        "text_field",
        "label_field",
        "device",
        "backbone",
        "max_physical_batch_size",
        "ledger_anchor",
        "evaluation_epsilon",
        "trusted_apps",
    ):
        assert getattr(site, f) == getattr(defaults, f), f
    assert RECOMMENDED == {"privacy.max_epsilon": site.privacy.max_epsilon, "privacy.delta": site.privacy.delta}
    # The hospital's next step: the site checks alone (no federation.yaml), the ledger comes later.
    assert cli(["data", "check", "--site", str(out)]) == 0
    assert "not checked: the labels above against the federation's label space" in capsys.readouterr().out


def test_init_without_paths_marks_what_to_fill_in(tmp_path, cli, capsys):
    out = tmp_path / "site.yaml"
    assert cli(["hospital", "init", "--out", str(out)]) == 0
    assert "still to fill in (REQUIRED): hospital_id, train, ledger" in capsys.readouterr().out
    with pytest.raises(InputError) as err:  # unfilled, it does not load: each REQUIRED field named at its line
        SiteConfig.load(out)
    text = out.read_text(encoding="utf-8")
    lines = text.splitlines()
    for key in ("hospital_id", "train", "ledger"):
        line = lines.index(f"{key}: null") + 1
        assert f"{out}:{line}: {key}: expected" in str(err.value)
        assert "REQUIRED" in lines[line - 2]
    train, _ = _records(tmp_path)
    filled = text.replace("hospital_id: null", "hospital_id: h1").replace("train: null", "train: train.csv")
    out.write_text(filled.replace("ledger: null", "ledger: ledger/privacy-ledger.json"), encoding="utf-8")
    site = SiteConfig.load(out)
    assert site.train == train and site.ledger == tmp_path / "ledger" / "privacy-ledger.json"


def test_init_never_overwrites_and_writes_nothing_on_bad_input(tmp_path, cli, capsys):
    out = tmp_path / "site.yaml"
    out.write_text("mine\n", encoding="utf-8")
    assert cli(["hospital", "init", "--out", str(out), "--hospital-id", "h1"]) == 2
    assert f"error: {out}: already exists; refusing to overwrite it" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "mine\n"
    target = tmp_path / "new" / "site.yaml"
    assert cli(["hospital", "init", "--out", str(target), "--hospital-id", "h 1/x", "--text-field", " "]) == 2
    err = capsys.readouterr().err
    assert (
        "--hospital-id: expected letters, digits, '-' or '_', got 'h 1/x'" in err
        and "--text-field: expected a non-empty value" in err
    )
    assert not (tmp_path / "new").exists()


def test_any_path_is_written_as_one_yaml_line_that_reads_back(tmp_path):
    odd = {"train": tmp_path / "a: b #c" / "train.csv", "ledger": "null", "backbone": "/x/'quoted\" ünï"}
    text, _ = render({"hospital_id": "h1", **odd})
    doc = yaml.safe_load(text)
    assert (doc["train"], doc["ledger"], doc["backbone"]) == (str(odd["train"]), "null", odd["backbone"])
