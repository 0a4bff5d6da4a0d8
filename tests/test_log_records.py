"""The hospital's daemon log names bad records by file, line and field, never by the values read
from them (a label outside the label space, a record's text, a patient id), unless the site opts
in (site.yaml: log_records). `fedprompt data check`, the operator's own terminal, still shows them."""

from __future__ import annotations

import pytest
from conftest import edit_yaml, make_workspace
from test_federation import _train_content

from fedprompt.client.hospital import evaluate_round, train_round
from fedprompt.client.preflight import preflight
from fedprompt.common.errors import InputError
from fedprompt.common.records import load_records, redacted
from fedprompt.common.wire import STATUS
from fedprompt.server.federation import RunSpec, prepare_run
from fedprompt.simulation import ensure_ledgers

SECRET = "hiv-positive-secret"


@pytest.fixture
def site(tmp_path, tiny_dir):
    """One hospital whose training and validation files each end with a label outside the label space."""
    from fedprompt.client.workspace import list_hospitals, load_workspace

    ws = make_workspace(tmp_path, tiny_dir, hospitals=1, per_hospital=20)
    ensure_ledgers(ws)
    fed, _, _ = load_workspace(ws)
    run = prepare_run(RunSpec(fed, tmp_path / "out", None, tiny_dir))
    site_yaml = list_hospitals(ws)[0]
    lines = {}
    for name in ("train.csv", "val.csv"):
        path = site_yaml.parent / name
        path.write_text(path.read_text() + f'"a note",{SECRET}\n')
        lines[name] = len(path.read_text().splitlines())
    return run, site_yaml, lines


def _opt_in(site_yaml) -> None:
    edit_yaml(site_yaml, lambda d: d.update(log_records=True))


def test_refusals_name_line_and_field_but_withhold_the_value_by_default(site, caplog):
    run, site_yaml, lines = site
    content = _train_content(run)
    with caplog.at_level("INFO", logger="fedprompt"):
        replies = [
            train_round(_train_content(run), site_yaml),
            evaluate_round(_train_content(run), site_yaml),
            preflight(content, site_yaml),
        ]
    for reply in replies:
        assert dict(reply[STATUS]) == {"hospital-id": "hospital-1", "status": "refused", "reason": "records"}
    assert SECRET not in caplog.text
    for name in ("train.csv", "val.csv"):
        assert f"{name}:{lines[name]}: label: unknown label (expected one of: " in caplog.text
    assert "[value withheld from this log]" in caplog.text
    assert caplog.text.count("refuses") == 3  # each refusal is still logged, with its reason

    _opt_in(site_yaml)  # the site's own choice: its log may quote the records
    caplog.clear()
    with caplog.at_level("INFO", logger="fedprompt"):
        train_round(_train_content(run), site_yaml)
    assert f"train.csv:{lines['train.csv']}: label: unknown label '{SECRET}'" in caplog.text


def test_redaction_covers_every_value_a_record_problem_quotes(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(
        '{"text": "ok", "label": "a", "pid": 1}\n'
        '{"text": ["patient has ' + SECRET + '"], "label": "a", "pid": 1}\n'
        '{"text": "ok", "label": ["' + SECRET + '"], "pid": 1}\n'
        '{"text": "ok", "label": "a", "pid": ["' + SECRET + '"]}\n'
        '{"text": "ok", "label": "' + SECRET + '", "pid": 1}\n'
        '{"note ' + SECRET + '": "ok", "label": "a", "pid": 1}\n'
    )
    with pytest.raises(InputError) as info:
        load_records(path, text_field="text", label_field="label", labels=["a"], patient_field="pid")
    full, safe = str(info.value), redacted(info.value)
    assert full.count(SECRET) == 5  # what `data check` prints at the operator's terminal: unchanged
    assert SECRET not in safe and safe.count("[value withheld from this log]") == 5
    for line, field in ((2, "text"), (3, "label"), (4, "pid"), (5, "label"), (6, "text")):
        assert f"{path}:{line}: {field}: " in safe
