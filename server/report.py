"""Human-readable report of a federated run: ``report.html`` plus three PNG plots (server/plots.py).

Input is the run's metrics (server/history.RunMetrics: metrics.json's model, which the aggregator
validates before it writes the file), so every value read here has its type: a hospital's status is
one of four, a score is a number (NaN and infinity kept: a NaN loss or an infinite epsilon is
information), a missing section is None. The report is static: plain HTML with inline CSS and
relative ``<img>`` links to the PNGs written next to it; no JavaScript, no external stylesheet or
font. The page is the Jinja2 template ``templates/report.html.j2``, rendered with autoescaping:
every value is escaped, since hospital ids and refusal/rejection reasons come from remote sites.
The aggregator rewrites the report after every round (outcome "running"; the page then reloads
itself every 30 s), so that a run can be watched in a browser.

Every file is written with ``common/atomic.atomic_write`` (a temporary name, then a rename); the
HTML goes last, so a crash never leaves a half-written file and a new report page never points at
missing images.
"""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2

from fedprompt.common.atomic import atomic_write

from .history import HeldOutScores, HospitalOutcome, RoundRecord, RunMetrics, SharedEvaluation
from .outcome import RUNNING
from .plots import epsilon_png, metrics_png, upload_png

__all__ = ["write_report", "REPORT_NAME", "METRICS_PNG", "EPSILON_PNG", "UPLOAD_PNG", "STATUSES"]

REPORT_NAME = "report.html"
METRICS_PNG = "metrics_per_round.png"
EPSILON_PNG = "epsilon_per_hospital.png"
UPLOAD_PNG = "upload_bytes.png"

STATUSES = ("ok", "refused", "rejected", "failed")
_MISSING = "\u2014"  # em dash for an absent value in tables


def _natural_key(name: str) -> list:
    """h2 before h10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _hospitals(rounds: list[RoundRecord]) -> list[str]:
    return sorted({h for rnd in rounds for h in rnd.hospitals}, key=_natural_key)


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return _MISSING
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "\u221e" if v > 0 else "-\u221e"
    return f"{v:.{digits}f}"


def _fmt_int(v: int | None) -> str:
    return _MISSING if v is None else f"{v:,}"


def _fmt_eps(v: float | None) -> str:
    return f"{v:.2f}" if v is not None and math.isfinite(v) else _fmt(v)


# --------------------------------------------------------------------------------------------
# HTML: templates/report.html.j2, with autoescaping; the view below holds plain values only
# --------------------------------------------------------------------------------------------

_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _scores(section: HeldOutScores | SharedEvaluation) -> dict[str, str]:
    return {"f1": _fmt(section.macro_f1), "acc": _fmt(section.accuracy)}


def _final_quality(rounds: list[RoundRecord]) -> dict:
    last = rounds[-1]
    parts: list[dict] = []
    if last.evaluate is not None:
        parts.append({"text": "federated validation", "scores": _scores(last.evaluate)})
    else:
        latest = next(
            ({"round": r.round, "scores": _scores(r.evaluate)} for r in reversed(rounds) if r.evaluate is not None),
            None,
        )
        parts.append({"text": "no federated validation in the final round", "latest": latest})
    if last.test is not None:
        parts.append({"text": "test", "scores": _scores(last.test)})
    first = rounds[0]
    start = (first.test or first.evaluate) if first.round == 0 and last.round != 0 else None
    if start is not None:
        which = "test" if first.test is not None else "validation"
        parts.append({"text": f"against the zero-shot start (round 0, {which}):", "scores": _scores(start)})
    return {"round": last.round, "parts": [{"scores": None, "latest": None, **part} for part in parts]}


def _entries(rounds: list[RoundRecord], hospital: str) -> list[tuple[int, HospitalOutcome]]:
    """(round, outcome) of each round the hospital took part in."""
    return [(r.round, o) for r in rounds if (o := r.hospitals.get(hospital)) is not None]


def _epsilon_summary(rounds: list[RoundRecord], hospitals: list[str]) -> dict | None:
    """The largest epsilon spent, the hospital closest to its cap and any over it; None when no
    hospital reported any."""
    best: tuple[float, str, float | None] | None = None  # (spent, hospital, cap)
    tightest: tuple[float, str, float, float] | None = None  # (spent/cap, hospital, spent, cap)
    over: list[str] = []
    for hospital in hospitals:
        outcomes = [o for _, o in _entries(rounds, hospital)]
        spent = [o.epsilon_spent for o in outcomes if o.epsilon_spent is not None and math.isfinite(o.epsilon_spent)]
        caps = [o.epsilon_cap for o in outcomes if o.epsilon_cap is not None]
        if not spent:
            continue
        spent_max, cap = max(spent), (caps[-1] if caps else None)
        if cap is not None and spent_max > cap:
            over.append(hospital)
        if cap is not None and cap > 0 and math.isfinite(cap) and (tightest is None or spent_max / cap > tightest[0]):
            tightest = (spent_max / cap, hospital, spent_max, cap)
        if best is None or spent_max > best[0]:
            best = (spent_max, hospital, cap)
    if best is None:
        return None
    spent_max, hospital, cap = best
    closest = None
    if tightest is not None and tightest[1] != hospital:  # caps differ: the largest spend is not the closest call
        ratio, name, t_spent, t_cap = tightest
        closest = {"hospital": name, "spent": _fmt_eps(t_spent), "cap": _fmt_eps(t_cap), "ratio": f"{ratio:.0%}"}
    return {"spent": _fmt_eps(spent_max), "hospital": hospital, "cap": _fmt_eps(cap), "tightest": closest, "over": over}


def _round_rows(rounds: list[RoundRecord]) -> list[dict]:
    rows = []
    for rnd in rounds:
        val, test = rnd.evaluate, rnd.test
        counts = {s: sum(o.status == s for o in rnd.hospitals.values()) for s in STATUSES}
        cells = [
            str(rnd.round),
            _fmt(None if val is None else val.accuracy),
            _fmt(None if val is None else val.macro_f1),
            _fmt(None if test is None else test.accuracy),
            _fmt(None if test is None else test.macro_f1),
            _fmt(None if test is None else test.loss),
            *(str(counts[s]) for s in STATUSES),
            _fmt_int(rnd.upload_bytes),
            _fmt(rnd.seconds, 1),
        ]
        rows.append({"round": rnd.round, "cells": cells})
    return rows


def _hospital_rows(rounds: list[RoundRecord], hospitals: list[str]) -> list[dict]:
    rows = []
    for hospital in hospitals:
        entries = _entries(rounds, hospital)
        last_round, last = entries[-1]  # hospitals come from the rounds
        spent = [o.epsilon_spent for _, o in entries if o.epsilon_spent is not None]
        caps = [o.epsilon_cap for _, o in entries if o.epsilon_cap is not None]
        spent_last, cap = (spent[-1] if spent else None), (caps[-1] if caps else None)
        rows.append(
            {
                "name": hospital,
                "status": last.status,
                "status_text": last.status,
                "last_round": last_round,
                "reason": last.reason,
                "eps": f"{_fmt_eps(spent_last)} / {_fmt_eps(cap)}",
                "over": spent_last is not None and cap is not None and spent_last > cap,
                "ok_rounds": sum(o.status == "ok" for _, o in entries),
            }
        )
    return rows


def _preflight_rows(metrics: RunMetrics) -> dict | None:
    """The run's pre-flight (server/federation.py): each hospital's answer, and the rounds in which a
    hospital that confirmed refused after all ("refused after confirming in pre-flight")."""
    preflight = metrics.preflight
    if preflight is None:
        return None
    later: dict[str, list[str]] = {}
    for rnd in metrics.rounds:
        for hospital, category in rnd.refused_after_preflight.items():
            later.setdefault(hospital, []).append(f"round {rnd.round}: {category}")
    rows = [
        {
            "name": hospital,
            "status": answer.status,
            "answer": "confirmed" if answer.status == "ok" else answer.status,
            "reason": answer.reason,
            "later": "; ".join(f"refused after confirming in pre-flight: {w}" for w in later.get(hospital, [])),
        }
        for hospital, answer in sorted(preflight.hospitals.items(), key=lambda item: _natural_key(item[0]))
    ]
    return {
        "round": _fmt_int(preflight.round),
        "confirmed": _fmt_int(preflight.confirmed),
        "min_hospitals": _fmt_int(preflight.min_hospitals),
        "rows": rows,
    }


def _export_link(export: str | None, out_dir: Path) -> dict | None:
    if not export:
        return None
    path = Path(export)
    # A relative export path is relative to the working directory of the run (the process
    # writing this report); the link is made relative to the report so the run folder can move.
    try:
        href_path = os.path.relpath(os.path.abspath(path), os.path.abspath(out_dir))
    except ValueError:  # different drive (Windows)
        href_path = os.path.abspath(path)
    return {"href": urllib.parse.quote(Path(href_path).as_posix(), safe="/._-~"), "path": str(path)}


FIGURES = [  # (file, caption, alt text; a non-private run's epsilon plot says it tracks none)
    (
        METRICS_PNG,
        "Federated validation (solid, the sites' noised counts) and test (dashed) scores; test loss below.",
        "macro-F1, accuracy and loss per round",
    ),
    (
        EPSILON_PNG,
        "Cumulative \u03b5 per hospital; dotted lines are each hospital's cap; open squares = refused, "
        "crosses = rejected, triangles = failed.",
        "cumulative epsilon spent per hospital per round",
    ),
    (UPLOAD_PNG, "Bytes uploaded per round, stacked by hospital.", "upload bytes per round by hospital"),
]


def _render_html(metrics: RunMetrics, rounds: list[RoundRecord], hospitals: list[str], out_dir: Path) -> str:
    trained = [r for r in rounds if r.round != 0]  # round 0: the zero-shot start, before anyone trains
    untracked = "NON-PRIVATE run: epsilon not tracked"
    figures = [
        {"name": name, "caption": caption, "alt": alt if metrics.private or name != EPSILON_PNG else untracked}
        for name, caption, alt in FIGURES
    ]
    return _TEMPLATES.get_template("report.html.j2").render(
        run=metrics.run,
        private=metrics.private,
        non_private_detail=None
        if metrics.private
        else "hospitals trained WITHOUT differential privacy; the prompt may memorise patient records",
        outcome=metrics.outcome,
        # set only for a run that produced no model or trained in too few rounds (server/outcome.py)
        outcome_reason=metrics.outcome_reason or "",
        running=metrics.outcome == RUNNING,
        strategy=metrics.strategy,
        fingerprint=metrics.backbone_fingerprint,
        labels=metrics.labels,
        trained_rounds=len(trained),
        zero_shot_round=len(trained) < len(rounds),
        hospitals=hospitals,
        final=_final_quality(rounds) if trained else None,
        eps=_epsilon_summary(trained, hospitals) if trained and metrics.private else None,
        figures=figures,
        round_rows=_round_rows(rounds),
        hospital_rows=_hospital_rows(trained, hospitals),
        preflight=_preflight_rows(metrics),
        export=_export_link(metrics.export, out_dir),
        stamp=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def write_report(metrics: RunMetrics | Mapping[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/report.html`` and its three PNG plots; return the HTML path.

    ``metrics``: the run's metrics (server/history.RunMetrics), or metrics.json's content, validated
    as that model here (a pydantic ValidationError for content that is not). Its ``outcome`` is
    "trained", "no hospital trained", "partly trained" or "running"; ``outcome_reason`` says why it
    is not "trained" (else null). ``epsilon_spent`` is a hospital's cumulative (ledger) total, not the
    round's increment; a hospital's training loss and record count never leave it.

    Files written (each atomically): ``metrics_per_round.png``, ``epsilon_per_hospital.png``,
    ``upload_bytes.png`` and, last, ``report.html``. With no round completed the PNGs are
    placeholders (so stale plots of an earlier report never survive) and the page says so.
    """
    run = RunMetrics.model_validate(metrics)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = sorted(run.rounds, key=lambda r: r.round)
    hospitals = _hospitals(rounds)
    trained = [r for r in rounds if r.round != 0]
    plots = {
        METRICS_PNG: metrics_png(rounds),
        EPSILON_PNG: epsilon_png(trained, hospitals, run.private),
        UPLOAD_PNG: upload_png(trained, hospitals),
    }
    page = _render_html(run, rounds, hospitals, out_dir).encode("utf-8")
    for name, data in plots.items():
        atomic_write(out_dir / name, data)
    report = out_dir / REPORT_NAME
    atomic_write(report, page)
    return report
