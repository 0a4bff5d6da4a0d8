"""server/report.py: report.html + three PNGs (server/plots.py) from a run's metrics, read as the
history's typed model (server/history.RunMetrics): content that is not valid metrics is refused."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from fedprompt.server.history import RunMetrics
from fedprompt.server.report import EPSILON_PNG, METRICS_PNG, UPLOAD_PNG, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNGS = (METRICS_PNG, EPSILON_PNG, UPLOAD_PNG)
EVIL = 'prompt.weight: non-finite values <script>alert("x")</script> & more'


def _site(status, *, eps=None, cap=10.0, upload=38400, reason=""):
    return {
        "status": status,
        "reason": reason,
        "weight": 1.0 if status == "ok" else 0.0,  # the site's declared FedAvg weight (no record count, no loss)
        "epsilon_spent": eps,
        "epsilon_cap": cap if eps is not None else None,
        "upload_bytes": upload if status in ("ok", "rejected") else 0,  # a rejected update was received
    }


def _val(accuracy: float, macro_f1: float, model_round: int) -> dict:
    """The sum of the noised counts the sites that share them sent (no loss: no site sends one)."""
    return {
        "accuracy": accuracy,
        "macro_f1": macro_f1,
        "loss": None,
        "num_examples": 120,
        "noised": True,
        "hospitals": 2,
        "model_round": model_round,
    }


def _test(accuracy: float, macro_f1: float, loss: float) -> dict:
    return {"accuracy": accuracy, "macro_f1": macro_f1, "loss": loss, "num_examples": 200}


@pytest.fixture
def private_metrics() -> dict:
    return {
        "run": "demo-run",
        "outcome": "trained",
        "outcome_reason": None,
        "private": True,
        "strategy": "fedavg",
        "backbone_fingerprint": "0c41d7a9e3b2f5aa6b9c0d1e2f3a4b5c6d7e8f90" + "0" * 24,
        "labels": ["neoplasms", "digestive", "nervous", "cardiovascular", "general"],
        "rounds": [
            {
                "round": 1,
                "seconds": 12.34,
                "upload_bytes": 115200,
                "evaluate": _val(0.41, 0.35, 1),
                "test": _test(0.40, 0.33, 1.45),
                "hospitals": {
                    "h1": _site("ok", eps=2.1),
                    "h2": _site("ok", eps=1.8, cap=8.0),
                    "h3": _site("ok", eps=2.4, cap=6.0),
                },
            },
            {
                "round": 2,
                "seconds": 11.0,
                "upload_bytes": 76800,
                "evaluate": _val(0.525, 0.4812, 2),
                "test": None,  # no held-out test this round
                "hospitals": {
                    "h1": _site("ok", eps=4.2),
                    "h2": _site("refused", reason="budget"),
                    "h3": _site("ok", eps=4.6, cap=6.0),
                },
            },
            {
                "round": 3,
                "seconds": 10.5,
                "upload_bytes": 76800,
                "evaluate": _val(0.6, 0.5567, 3),
                "test": _test(0.58, 0.51, 1.1),
                "hospitals": {
                    "h1": _site("ok", eps=6.3),
                    "h2": _site("refused", reason="budget"),
                    "h3": _site("rejected", eps=5.9, cap=6.0, reason=EVIL),
                },
            },
        ],
        "export": "/tmp/fedprompt-runs/demo-run/export",
    }


@pytest.fixture
def non_private_metrics(private_metrics) -> dict:
    metrics = copy.deepcopy(private_metrics)
    metrics["private"] = False
    for rnd in metrics["rounds"]:
        for site in rnd["hospitals"].values():
            site["epsilon_spent"] = site["epsilon_cap"] = None
    return metrics


def _assert_pngs(out: Path) -> None:
    from PIL import Image

    for name in PNGS:
        path = out / name
        assert path.is_file(), name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            width, height = img.size
        assert width > 200 and height > 150, (name, img.size)


def _row(page: str, rnd: int) -> list[str]:
    match = re.search(rf'<tr id="round-{rnd}">(.*?)</tr>', page, re.S)
    assert match, f"no row for round {rnd}"
    return re.findall(r"<td[^>]*>(.*?)</td>", match.group(1), re.S)


def test_private_report(private_metrics, tmp_path):
    out = tmp_path / "report"
    report = write_report(private_metrics, out)
    assert report == out / "report.html"
    _assert_pngs(out)
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in out.iterdir()) == sorted([*PNGS, "report.html"])

    page = report.read_text(encoding="utf-8")
    assert "NON-PRIVATE" not in page
    assert "<title>fedprompt report: demo-run</title>" in page
    assert "fedavg" in page
    assert "0c41d7a9e3b2f5aa" in page and "0c41d7a9e3b2f5aa6" not in page  # first 16 chars only
    assert "neoplasms" in page and "cardiovascular" in page
    for name in PNGS:
        assert f'<img src="{name}"' in page
    assert "<script" not in page.lower()  # nothing executable, and the remote reason is escaped
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; more" in page  # MarkupSafe's escapes
    assert "budget" in page  # a refusal names its category only

    # round, val acc, val F1, test acc, test F1, test loss, ok, refused, rejected, failed, bytes, seconds
    assert _row(page, 1) == ["1", "0.410", "0.350", "0.400", "0.330", "1.450", "3", "0", "0", "0", "115,200", "12.3"]
    assert _row(page, 2) == ["2", "0.525", "0.481", "—", "—", "—", "2", "1", "0", "0", "76,800", "11.0"]
    assert _row(page, 3) == ["3", "0.600", "0.557", "0.580", "0.510", "1.100", "1", "1", "1", "0", "76,800", "10.5"]
    # the typed metrics themselves (as the aggregator holds them) render the same page
    typed = write_report(RunMetrics.model_validate(private_metrics), tmp_path / "typed").read_text(encoding="utf-8")
    assert typed == page

    # Summary: final round's scores, largest epsilon spent (h1, 6.30 of cap 10).
    assert "Final round 3" in page and "<b>0.557</b>" in page and "<b>0.600</b>" in page
    assert "Max ε spent <b>6.30</b> (h1) of cap <b>10.00</b>" in page
    assert "Closest to its cap: h3, 5.90 of 6.00 (98%)" in page
    # Per-hospital last status.
    hospitals = page[page.index('<table class="hospitals">') :]
    assert re.search(r'<td class="name">h2</td><td class="st-refused">refused</td><td class="num">3</td>', hospitals)
    assert re.search(r'<td class="name">h3</td><td class="st-rejected">rejected</td>', hospitals)
    assert re.search(r'<td class="name">h1</td><td class="st-ok">ok</td>', hospitals)
    # Export link, relative to the report folder.
    href = re.search(r'Exported model: <a href="([^"]+)">', page).group(1)
    assert not href.startswith("/")
    assert (out / href).resolve() == Path("/tmp/fedprompt-runs/demo-run/export").resolve()


def test_non_private_banner(non_private_metrics, tmp_path):
    report = write_report(non_private_metrics, tmp_path)
    _assert_pngs(tmp_path)
    page = report.read_text(encoding="utf-8")
    assert '<div class="banner" role="alert">NON-PRIVATE run' in page
    # The banner is the first thing in the body.
    assert page.index('class="banner"') < page.index("<h1>")
    assert "ε spent / cap" not in page  # no epsilon column when there is no accounting


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda m: m.pop("private"), "private"),  # never reported as private (nor as not) without the flag
        (lambda m: m["rounds"][0]["hospitals"].update(h9={"status": "weird"}), "status"),
        (lambda m: m["rounds"][0]["hospitals"]["h1"].update(upload_bytes="12"), "upload_bytes"),
        (lambda m: m["rounds"][0]["hospitals"].update(h9=None), "h9"),
        (lambda m: m["rounds"].append({"hospitals": {}}), "round"),
        (lambda m: m["rounds"][0]["evaluate"].update(loss=1.4), "loss"),  # no site sends a loss
    ],
    ids=["no private flag", "unknown status", "bytes as text", "null hospital", "no round number", "shared loss"],
)
def test_metrics_the_history_model_refuses_are_not_rendered(private_metrics, tmp_path, change, field):
    change(private_metrics)
    with pytest.raises(ValidationError, match=field):
        write_report(private_metrics, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_empty_rounds(private_metrics, tmp_path):
    private_metrics["rounds"] = []
    private_metrics["export"] = None
    report = write_report(private_metrics, tmp_path / "empty")
    _assert_pngs(tmp_path / "empty")  # placeholders, so stale plots never survive
    page = report.read_text(encoding="utf-8")
    assert "No round completed" in page
    assert "<img" not in page and 'id="round-' not in page
    assert "NON-PRIVATE" not in page


def test_relative_export_link(private_metrics, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    private_metrics["export"] = "runs/demo/export"  # as the server writes it for a relative out_dir
    page = write_report(private_metrics, Path("runs/demo")).read_text(encoding="utf-8")
    assert 'Exported model: <a href="export">' in page


def test_nulls_and_rewrite(private_metrics, tmp_path):
    """Null sections/values render as dashes; a second report replaces the first in place."""
    write_report(private_metrics, tmp_path)
    rnd = private_metrics["rounds"][2]
    rnd["evaluate"] = None
    rnd["test"] = None
    rnd["hospitals"]["h1"] = _site("failed", reason="connection lost")
    page = write_report(private_metrics, tmp_path).read_text(encoding="utf-8")
    assert _row(page, 3)[:6] == ["3", "—", "—", "—", "—", "—"]
    assert _row(page, 3)[6:10] == ["0", "1", "1", "1"]
    assert "no federated validation in the final round" in page
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*PNGS, "report.html"])


def test_hostile_and_odd_values_render(private_metrics, tmp_path):
    """Remote-supplied ids (mathtext, a leading underscore) and non-finite scores never break the render."""
    rnd = private_metrics["rounds"][0]
    rnd["hospitals"]["cost $5 $x^{"] = _site("ok", eps=1.0, reason="a $ b")
    rnd["hospitals"]["_hidden"] = _site("failed", reason="error reply: $x^{")
    rnd["test"].update(loss=float("inf"), accuracy=float("nan"))
    empty = {"round": 4, "seconds": 0.0, "evaluate": None, "test": None, "hospitals": {}, "upload_bytes": 0}
    private_metrics["rounds"].append(empty)
    page = write_report(private_metrics, tmp_path).read_text(encoding="utf-8")
    _assert_pngs(tmp_path)
    assert _row(page, 1)[3:6] == ["NaN", "0.330", "∞"]
    assert _row(page, 1)[6:10] == ["4", "0", "0", "1"]
    assert _row(page, 4) == ["4", "—", "—", "—", "—", "—", "0", "0", "0", "0", "0", "0.0"]


def test_hostile_hospital_id_and_reason_are_escaped_everywhere(private_metrics, tmp_path):
    """A remote site controls its id and (through a rejection) the reason text: neither may open a
    tag or leave an attribute, in the tables, the summary or the export link."""
    hostile = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    rnd = private_metrics["rounds"][2]
    rnd["hospitals"][hostile] = _site("rejected", eps=9.5, cap=8.0, reason=hostile)
    private_metrics["run"] = hostile
    private_metrics["labels"].append(hostile)
    private_metrics["export"] = f"/tmp/{hostile}"
    page = write_report(private_metrics, tmp_path).read_text(encoding="utf-8")
    assert "<script" not in page.lower() and "<img src=x" not in page and "onerror=alert(2)>" not in page
    escaped = "&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;"
    assert f'<td class="name">{escaped}</td>' in page and f'<td class="reason">{escaped}</td>' in page
    assert f"Max ε spent <b>9.50</b> ({escaped}) of cap <b>8.00</b>" in page  # the largest spender is the hostile site
    assert f'<span class="over">Over cap: {escaped}.</span>' in page
    assert f"<title>fedprompt report: {escaped}</title>" in page and f"<code>{escaped}</code>" in page
    assert f"<code>/tmp/{escaped}</code>" in page  # the export path as text; its href is URL-quoted
    assert re.search(r'Exported model: <a href="[^"<>]*%22%3E%3Cscript%3E[^"<>]*">', page)


def test_report_of_a_running_run_reloads_and_promises_the_export(private_metrics, tmp_path):
    """Rewritten after every round (server/federation.py): the page says the run is running,
    reloads itself, and has no export yet."""
    private_metrics.update(outcome="running", outcome_reason=None, export=None)
    page = write_report(private_metrics, tmp_path).read_text(encoding="utf-8")
    assert '<meta http-equiv="refresh" content="30">' in page
    assert "<dt>Outcome</dt><dd>running (this page is rewritten after every round)</dd>" in page
    assert "The model is exported when the run ends." in page and 'role="alert"' not in page


def test_live_report_renders_off_the_round_and_ends_with_the_latest_state(private_metrics, tmp_path):
    """server/live_report.py: rounds submit snapshots faster than a page renders; the page ends
    as the newest one, and wait() returns only once nothing is left to render."""
    import copy

    from fedprompt.server.live_report import LiveReport

    live = LiveReport(tmp_path)
    for name in ("first", "second", "third"):
        snapshot = copy.deepcopy(private_metrics)
        snapshot.update(run=f"run-{name}", outcome="running", outcome_reason=None, export=None)
        live.submit(snapshot)
    live.wait()
    assert "<title>fedprompt report: run-third</title>" in (tmp_path / "report.html").read_text(encoding="utf-8")
    assert live._thread is not None and not live._thread.is_alive()


def test_round_zero_is_shown_as_the_zero_shot_start(private_metrics, tmp_path):
    """Round 0 (validated and tested, nobody trained) is in the scores, not in the hospitals' tables."""
    start = {
        "round": 0,
        "seconds": 3.0,
        "upload_bytes": 0,
        "hospitals": {},
        "evaluate": _val(0.30, 0.247, 0),
        "test": _test(0.31, 0.235, 1.6),
    }
    private_metrics["rounds"].insert(0, start)
    html = write_report(private_metrics, tmp_path).read_text()
    assert "Rounds completed</dt><dd>3 (+ round 0, the zero-shot start)" in html
    assert "against the zero-shot start (round 0, test): macro-F1 <b>0.235</b>" in html
    rounds_table = html.split('<table class="rounds">')[1].split("</table>")[0]
    assert "0.247" in rounds_table  # round 0's validation score is a row of the rounds table
    hospitals_table = html.split("<h2>Hospitals</h2>")[1].split("</table>")[0]
    assert "/ 3" in hospitals_table and "/ 4" not in hospitals_table  # ok rounds count training rounds only
    assert all((tmp_path / name).read_bytes().startswith(PNG_MAGIC) for name in PNGS)


def test_model_card_shows_the_zero_shot_start_and_no_nan(tmp_path):
    """The export's card: round 0 next to the last round, and a plain sentence (never "nan")
    when the hospitals share no validation (the default)."""
    import torch

    from fedprompt.common.model import PromptConfig
    from fedprompt.server.export import export_model

    prompt = PromptConfig(
        labels=["a", "b"], hidden_size=4, backbone_fingerprint="f" * 64, n_virtual_tokens=2, normalize=True
    )
    history = [
        {"round": 0, "test": {"accuracy": 0.5, "macro_f1": 0.4}, "evaluate": None, "hospitals": {}},
        {
            "round": 1,
            "test": {"accuracy": 0.6, "macro_f1": 0.55},
            "evaluate": None,
            "hospitals": {"h1": {"epsilon_spent": 2.0}},
        },
    ]
    card = (
        export_model(tmp_path, prompt, {k: torch.zeros(*s) for k, s in prompt.shapes().items()}, history, "r")
        / "MODEL_CARD.md"
    ).read_text()
    assert "Zero-shot start (round 0, aggregator's held-out test): accuracy 0.5000, macro-F1 0.4000" in card
    assert "Held-out test, last round: accuracy 0.6000, macro-F1 0.5500" in card
    assert "validate locally" in card and "nan" not in card.lower() and "h1 2.000" in card
