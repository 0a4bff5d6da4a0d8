"""Human-readable report of a federated run: ``report.html`` plus three PNG plots.

Input is the run's ``metrics.json`` content (see ``write_report``). The report is static: plain
HTML with inline CSS and relative ``<img>`` links to the PNGs written next to it; no JavaScript,
no external stylesheet or font. The page is the Jinja2 template ``templates/report.html.j2``,
rendered with autoescaping: every value is escaped, since hospital ids and refusal/rejection
reasons come from remote sites. The aggregator rewrites the report after every round (outcome
"running"; the page then reloads itself every 30 s), so that a run can be watched in a browser.

Every file is written with ``common/atomic.atomic_write`` (a temporary name, then a rename); the
HTML goes last, so a crash never leaves a half-written file and a new report page never points at
missing images.

Plots use matplotlib's object API (``Figure`` + Agg canvas), never ``pyplot``: no global
backend switch, no display needed, nothing left open in pyplot's figure registry.
"""

from __future__ import annotations

import io
import math
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import jinja2

from fedprompt.common.atomic import atomic_write

from .outcome import RUNNING

__all__ = ["write_report", "REPORT_NAME", "METRICS_PNG", "EPSILON_PNG", "UPLOAD_PNG", "STATUSES"]

REPORT_NAME = "report.html"
METRICS_PNG = "metrics_per_round.png"
EPSILON_PNG = "epsilon_per_hospital.png"
UPLOAD_PNG = "upload_bytes.png"

STATUSES = ("ok", "refused", "rejected", "failed")
# Marker for a round where a hospital did not contribute an accepted update (epsilon plot).
_STATUS_MARKERS = {"refused": ("s", "refused"), "rejected": ("X", "rejected"), "failed": ("v", "failed")}
_MISSING = "\u2014"  # em dash for an absent value in tables
_DPI = 110


# --------------------------------------------------------------------------------------------
# Input normalisation: metrics.json is produced by our own server, but values can be null or
# absent (a failed hospital has no epsilon, a round may have no evaluation), and the hospital
# part is relayed from remote sites. Nothing here trusts types.
# --------------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """A float, or None for null/absent/non-numeric values (bools are not numbers here).
    Non-finite floats are kept (NaN loss is information); plots turn them into gaps."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _str(value: Any) -> str:
    return "" if value is None else str(value)


def _natural_key(name: str) -> list:
    """h2 before h10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _rounds(metrics: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    rounds = [r for r in (metrics.get("rounds") or []) if isinstance(r, Mapping)]
    # Sort by round number; entries without one keep their relative order at the end.
    return sorted(rounds, key=lambda r: (_num(r.get("round")) is None, _num(r.get("round")) or 0.0))


def _round_no(rnd: Mapping[str, Any], index: int) -> int:
    n = _num(rnd.get("round"))
    return int(n) if n is not None and math.isfinite(n) else index + 1


def _hospitals(rounds: Iterable[Mapping[str, Any]]) -> list[str]:
    names: set[str] = set()
    for rnd in rounds:
        names.update(str(h) for h in _dict(rnd.get("hospitals")))
    return sorted(names, key=_natural_key)


def _hospital_entry(rnd: Mapping[str, Any], hospital: str) -> Mapping[str, Any] | None:
    for key, value in _dict(rnd.get("hospitals")).items():
        if str(key) == hospital:
            return _dict(value)
    return None


def _status(entry: Mapping[str, Any]) -> str:
    status = _str(entry.get("status")).strip().lower()
    return status if status in STATUSES else "failed"  # unknown or missing: not a usable update


def _round_upload(rnd: Mapping[str, Any]) -> float | None:
    total = _num(rnd.get("upload_bytes"))
    if total is not None:
        return total
    reported = [_num(_dict(e).get("upload_bytes")) for e in _dict(rnd.get("hospitals")).values()]
    per_site = [v for v in reported if v is not None]
    return sum(per_site) if per_site else None


def _is_private(metrics: Mapping[str, Any]) -> bool:
    """Only an explicit ``"private": true`` counts as private; absent or anything else is
    reported as NON-PRIVATE (the report must never claim protection it cannot show)."""
    return metrics.get("private") is True


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    v = _num(value)
    if v is None:
        return _MISSING
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "\u221e" if v > 0 else "-\u221e"
    return f"{v:.{digits}f}"


def _fmt_int(value: Any) -> str:
    v = _num(value)
    if v is None:
        return _MISSING
    if not math.isfinite(v):
        return _fmt(v)
    return f"{int(round(v)):,}"


def _fmt_eps(value: Any) -> str:
    v = _num(value)
    if v is None:
        return _MISSING
    return f"{v:.2f}" if math.isfinite(v) else _fmt(v)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float, nrows: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0] if nrows > 1 else [fig.add_subplot()]
    return fig, list(axes)


def _png_bytes(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.15)
    return buf.getvalue()


def _placeholder(fig, ax, text: str, color: str = "0.35") -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=13, color=color, wrap=True, transform=ax.transAxes)


def _integer_rounds_axis(ax, xs: list[int], min_pad: float = 0.3) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
    if xs:
        lo, hi = min(xs), max(xs)
        pad = max(min_pad, 0.5 if hi == lo else 0.03 * (hi - lo))
        ax.set_xlim(lo - pad, hi + pad)


def _outside_legend(ax, extra: Iterable[tuple[Any, str]] = (), **kwargs) -> None:
    """Legend to the right of the axes: it can never cover a data point."""
    handles, labels = ax.get_legend_handles_labels()
    for handle, label in extra:
        handles.append(handle)
        labels.append(label)
    if handles:
        ax.legend(
            handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=9, **kwargs
        )


def _finite_or_nan(values: list[float | None]) -> list[float]:
    return [v if v is not None and math.isfinite(v) else math.nan for v in values]


def _plot_metrics(rounds: list[Mapping[str, Any]], xs: list[int]) -> bytes:
    fig, (ax_score, ax_loss) = _new_figure(9.0, 6.4, nrows=2)
    if not rounds:
        ax_loss.set_visible(False)
        _placeholder(fig, ax_score, "No round completed: no metrics to plot")
        return _png_bytes(fig)

    def series(section: str, key: str) -> list[float]:
        return _finite_or_nan([_num(_dict(r.get(section)).get(key)) for r in rounds])

    def has(values: list[float]) -> bool:
        return any(not math.isnan(v) for v in values)

    def known(values: list[float]) -> tuple[list[int], list[float]]:
        """Only the rounds that report a value: a round without evaluation does not break the
        line (the table shows which rounds have none)."""
        pairs = [(x, v) for x, v in zip(xs, values, strict=True) if not math.isnan(v)]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    # Colour = metric, line style = split (validation solid, test dashed).
    spec = [("macro_f1", "macro-F1", "tab:blue"), ("accuracy", "accuracy", "tab:orange")]
    plotted_scores = False
    for key, label, color in spec:
        val = series("evaluate", key)
        if has(val):
            ax_score.plot(
                *known(val), color=color, linestyle="-", marker="o", markersize=4, label=f"{label} (fed. validation)"
            )
            plotted_scores = True
    for key, label, color in spec:
        test = series("test", key)
        if has(test):
            ax_score.plot(*known(test), color=color, linestyle="--", marker="s", markersize=4, label=f"{label} (test)")
            plotted_scores = True
    ax_score.set_ylim(0.0, 1.02)
    ax_score.set_ylabel("score")
    ax_score.set_title("Model quality per round", fontsize=12)
    ax_score.grid(True, alpha=0.3)
    if plotted_scores:
        _outside_legend(ax_score)
    else:
        ax_score.text(
            0.5, 0.5, "no evaluation reported", ha="center", va="center", color="0.4", transform=ax_score.transAxes
        )

    val_loss, test_loss = series("evaluate", "loss"), series("test", "loss")
    if has(val_loss):
        ax_loss.plot(
            *known(val_loss), color="tab:red", linestyle="-", marker="o", markersize=4, label="loss (fed. validation)"
        )
    if has(test_loss):
        ax_loss.plot(*known(test_loss), color="tab:red", linestyle="--", marker="s", markersize=4, label="loss (test)")
    ax_loss.set_ylabel("loss")
    ax_loss.set_xlabel("round")
    ax_loss.grid(True, alpha=0.3)
    if has(val_loss) or has(test_loss):
        _outside_legend(ax_loss)
    else:
        ax_loss.text(0.5, 0.5, "no loss reported", ha="center", va="center", color="0.4", transform=ax_loss.transAxes)
    _integer_rounds_axis(ax_loss, xs)
    return _png_bytes(fig)


def _plot_label(name: str, limit: int = 40) -> str:
    """A remote-supplied name made safe for a matplotlib label: bounded length, and ``$`` escaped
    so it is never parsed as mathtext (an unbalanced ``$`` would make rendering fail), and a
    leading ``_`` kept visible."""
    name = " ".join(name.split())
    if len(name) > limit:
        name = name[: limit - 1] + "\u2026"
    name = name.replace("$", r"\$")
    # matplotlib leaves labels starting with "_" out of the legend.
    return "\u200b" + name if name.startswith("_") else name


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _plot_epsilon(rounds: list[Mapping[str, Any]], xs: list[int], hospitals: list[str], private: bool) -> bytes:
    from matplotlib.lines import Line2D

    fig, (ax,) = _new_figure(9.0, 4.8)
    if not rounds:
        _placeholder(fig, ax, "No round completed: no privacy spending to plot")
        return _png_bytes(fig)
    if not private:
        _placeholder(
            fig,
            ax,
            "NON-PRIVATE run\nno differential privacy: epsilon is not tracked",
            color="#b00020",
        )
        return _png_bytes(fig)

    any_eps = False
    status_seen: set[str] = set()
    for hospital, color in zip(hospitals, _colors(len(hospitals)), strict=True):
        eps: list[float] = []
        cap: float | None = None
        last_known: float | None = None
        marks: dict[str, tuple[list[int], list[float]]] = {}
        for x, rnd in zip(xs, rounds, strict=True):
            entry = _hospital_entry(rnd, hospital)
            if entry is None:  # not sampled this round
                eps.append(math.nan)
                continue
            spent = _num(entry.get("epsilon_spent"))
            entry_cap = _num(entry.get("epsilon_cap"))
            if entry_cap is not None and math.isfinite(entry_cap):
                cap = entry_cap
            if spent is not None and math.isfinite(spent):
                last_known = spent
            eps.append(spent if spent is not None and math.isfinite(spent) else math.nan)
            status = _status(entry)
            if status != "ok":
                # Marked at the hospital's own epsilon when it has one, else its last known total.
                y = (
                    spent
                    if spent is not None and math.isfinite(spent)
                    else (last_known if last_known is not None else 0.0)
                )
                xs_m, ys_m = marks.setdefault(status, ([], []))
                xs_m.append(x)
                ys_m.append(y)
        known = [(x, e) for x, e in zip(xs, eps, strict=True) if not math.isnan(e)]
        label = _plot_label(hospital) if cap is None else f"{_plot_label(hospital)} (cap {cap:g})"
        if known:
            any_eps = True
            # Connect the known points: a gap (refusal, not sampled) keeps the running total.
            ax.plot(
                [k[0] for k in known],
                [k[1] for k in known],
                color=color,
                marker="o",
                markersize=4,
                linewidth=1.8,
                label=label,
            )
        else:
            ax.plot([], [], color=color, marker="o", label=f"{label}: no epsilon reported")
        if cap is not None:
            ax.axhline(cap, color=color, linestyle=":", linewidth=1.6)
        for status, (xs_m, ys_m) in marks.items():
            marker, _ = _STATUS_MARKERS[status]
            ax.scatter(
                xs_m,
                ys_m,
                marker=marker,
                s=90,
                facecolors="none" if marker == "s" else color,
                edgecolors=color,
                linewidths=1.8,
                zorder=5,
                clip_on=False,
            )
            status_seen.add(status)

    ax.set_xlabel("round")
    ax.set_ylabel("cumulative \u03b5 spent")
    ax.set_title("Privacy budget spent per hospital (dotted: the hospital's cap)", fontsize=12)
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0.0)
    lo, hi = ax.get_ylim()
    ax.set_ylim(0.0, hi * 1.08 if hi > 0 else 1.0)  # headroom so a cap line is not on the frame
    _integer_rounds_axis(ax, xs)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="0.3", linestyle=":", linewidth=1.6))
    labels.append("cap (hospital's colour)")
    for status in ("refused", "rejected", "failed"):
        if status in status_seen:
            marker, text = _STATUS_MARKERS[status]
            handles.append(
                Line2D(
                    [],
                    [],
                    linestyle="none",
                    marker=marker,
                    markersize=9,
                    markerfacecolor="none" if marker == "s" else "0.3",
                    markeredgecolor="0.3",
                    markeredgewidth=1.6,
                )
            )
            labels.append(f"round {text}")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=9)
    if not any_eps:
        ax.text(
            0.5,
            0.5,
            "no epsilon reported by any hospital",
            ha="center",
            va="center",
            color="#b00020",
            transform=ax.transAxes,
        )
    return _png_bytes(fig)


def _plot_upload(rounds: list[Mapping[str, Any]], xs: list[int], hospitals: list[str]) -> bytes:
    from matplotlib.ticker import FuncFormatter

    fig, (ax,) = _new_figure(9.0, 4.6)
    if not rounds:
        _placeholder(fig, ax, "No round completed: nothing uploaded")
        return _png_bytes(fig)

    def site_bytes(rnd: Mapping[str, Any], hospital: str) -> tuple[float, bool]:
        entry = _hospital_entry(rnd, hospital)
        if entry is None:
            return 0.0, True
        value = _num(entry.get("upload_bytes"))
        return (value if value is not None and math.isfinite(value) and value > 0 else 0.0), _status(entry) == "ok"

    per_site = {h: [site_bytes(r, h) for r in rounds] for h in hospitals}
    # Bytes in the round total that no hospital entry accounts for (e.g. hospitals not listed).
    other = []
    for i, rnd in enumerate(rounds):
        total = _round_upload(rnd)
        attributed = sum(vals[i][0] for vals in per_site.values())
        other.append(max(0.0, total - attributed) if total is not None and math.isfinite(total) else 0.0)
    peak = max([sum(vals[i][0] for vals in per_site.values()) + other[i] for i in range(len(rounds))] + [0.0])
    unit, scale = next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if peak >= s), ("B", 1.0))

    distinct = sorted(set(xs))
    width = 0.8 * (min(b - a for a, b in pairwise(distinct)) if len(distinct) > 1 else 1)
    bottom = [0.0] * len(rounds)
    any_not_accepted = False
    for hospital, color in zip(hospitals, _colors(len(hospitals)), strict=True):
        vals = [v / scale for v, _ in per_site[hospital]]
        if not any(vals):
            continue
        accepted = [v if ok else 0.0 for v, (_, ok) in zip(vals, per_site[hospital], strict=True)]
        refused = [0.0 if ok else v for v, (_, ok) in zip(vals, per_site[hospital], strict=True)]
        ax.bar(
            xs,
            accepted,
            width=width,
            bottom=bottom,
            color=color,
            edgecolor="white",
            linewidth=0.5,
            label=_plot_label(hospital),
        )
        if any(refused):  # uploaded but not aggregated (rejected/failed): same colour, hatched
            any_not_accepted = True
            ax.bar(
                xs,
                refused,
                width=width,
                bottom=bottom,
                color=color,
                alpha=0.45,
                edgecolor="black",
                linewidth=0.5,
                hatch="xx",
            )
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    if any(other):
        ax.bar(
            xs,
            [o / scale for o in other],
            width=width,
            bottom=bottom,
            color="0.75",
            edgecolor="white",
            linewidth=0.5,
            hatch="//",
            label="not attributed to a hospital",
        )
    extra = []
    if any_not_accepted:
        from matplotlib.patches import Patch

        extra.append((Patch(facecolor="0.6", alpha=0.45, edgecolor="black", hatch="xx"), "uploaded, not aggregated"))
    ax.set_xlabel("round")
    ax.set_ylabel(f"uploaded ({unit})")
    ax.set_title("Bytes uploaded to the aggregator per round, by hospital", fontsize=12)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    _integer_rounds_axis(ax, xs, min_pad=width / 2 + 0.1)
    if peak == 0:
        ax.set_ylim(0, 1)
        ax.text(0.5, 0.5, "no upload reported", ha="center", va="center", color="0.4", transform=ax.transAxes)
    else:
        _outside_legend(ax, extra)
    return _png_bytes(fig)


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


def _status_counts(rnd: Mapping[str, Any]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for entry in _dict(rnd.get("hospitals")).values():
        counts[_status(_dict(entry))] += 1
    return counts


def _scores(section: Mapping[str, Any]) -> dict[str, str]:
    return {"f1": _fmt(section.get("macro_f1")), "acc": _fmt(section.get("accuracy"))}


def _final_quality(rounds: list[Mapping[str, Any]], xs: list[int]) -> dict:
    last, last_x = rounds[-1], xs[-1]
    parts: list[dict] = []
    val = _dict(last.get("evaluate"))
    if val:
        parts.append({"text": "federated validation", "scores": _scores(val)})
    else:
        latest = next(
            (
                {"round": x, "scores": _scores(_dict(r.get("evaluate")))}
                for r, x in zip(reversed(rounds), reversed(xs), strict=True)
                if _dict(r.get("evaluate"))
            ),
            None,
        )
        parts.append({"text": "no federated validation in the final round", "latest": latest})
    test = _dict(last.get("test"))
    if test:
        parts.append({"text": "test", "scores": _scores(test)})
    start = _dict(rounds[0].get("test")) or _dict(rounds[0].get("evaluate")) if xs[0] == 0 and last_x != 0 else {}
    if start:
        which = "test" if _dict(rounds[0].get("test")) else "validation"
        parts.append({"text": f"against the zero-shot start (round 0, {which}):", "scores": _scores(start)})
    return {"round": last_x, "parts": [{"scores": None, "latest": None, **part} for part in parts]}


def _epsilon_summary(rounds: list[Mapping[str, Any]], hospitals: list[str]) -> dict | None:
    """The largest epsilon spent, the hospital closest to its cap and any over it; None when no
    hospital reported any."""
    best: tuple[float, str, float | None] | None = None  # (spent, hospital, cap)
    tightest: tuple[float, str, float, float] | None = None  # (spent/cap, hospital, spent, cap)
    over: list[str] = []
    for hospital in hospitals:
        spent_max: float | None = None
        cap: float | None = None
        for rnd in rounds:
            entry = _hospital_entry(rnd, hospital)
            if entry is None:
                continue
            spent, entry_cap = _num(entry.get("epsilon_spent")), _num(entry.get("epsilon_cap"))
            if spent is not None and math.isfinite(spent):
                spent_max = spent if spent_max is None else max(spent_max, spent)
            if entry_cap is not None:
                cap = entry_cap
        if spent_max is None:
            continue
        if cap is not None and spent_max > cap:
            over.append(hospital)
        if cap is not None and cap > 0 and math.isfinite(cap) and (tightest is None or spent_max / cap > tightest[0]):
            tightest = (spent_max / cap, hospital, spent_max, cap)
        if best is None or spent_max > best[0]:
            best = (spent_max, hospital, cap)
    if best is None:
        return None
    spent, hospital, cap = best
    closest = None
    if tightest is not None and tightest[1] != hospital:  # caps differ: the largest spend is not the closest call
        ratio, name, t_spent, t_cap = tightest
        closest = {"hospital": name, "spent": _fmt_eps(t_spent), "cap": _fmt_eps(t_cap), "ratio": f"{ratio:.0%}"}
    return {"spent": _fmt_eps(spent), "hospital": hospital, "cap": _fmt_eps(cap), "tightest": closest, "over": over}


def _round_rows(rounds: list[Mapping[str, Any]], xs: list[int]) -> list[dict]:
    rows = []
    for rnd, x in zip(rounds, xs, strict=True):
        val, test, counts = _dict(rnd.get("evaluate")), _dict(rnd.get("test")), _status_counts(rnd)
        cells = [
            str(x),
            _fmt(val.get("accuracy")),
            _fmt(val.get("macro_f1")),
            _fmt(val.get("loss")),
            _fmt(test.get("accuracy")),
            _fmt(test.get("macro_f1")),
            *(str(counts[s]) for s in STATUSES),
            _fmt_int(_round_upload(rnd)),
            _fmt(rnd.get("seconds"), 1),
        ]
        rows.append({"round": x, "cells": cells})
    return rows


def _hospital_rows(rounds: list[Mapping[str, Any]], xs: list[int], hospitals: list[str]) -> list[dict]:
    rows = []
    for hospital in hospitals:
        last: Mapping[str, Any] | None = None
        last_x = None
        ok_rounds = 0
        spent: float | None = None
        cap: float | None = None
        for rnd, x in zip(rounds, xs, strict=True):
            entry = _hospital_entry(rnd, hospital)
            if entry is None:
                continue
            last, last_x = entry, x
            ok_rounds += _status(entry) == "ok"
            s, c = _num(entry.get("epsilon_spent")), _num(entry.get("epsilon_cap"))
            if s is not None:
                spent = s
            if c is not None:
                cap = c
        assert last is not None  # hospitals come from the rounds
        status = _status(last)
        raw_status = _str(last.get("status"))
        rows.append(
            {
                "name": hospital,
                "status": status,
                "status_text": raw_status
                if raw_status.strip().lower() == status
                else f"{status} ({raw_status or 'no status'})",
                "last_round": last_x,
                "reason": _str(last.get("reason")),
                "eps": f"{_fmt_eps(spent)} / {_fmt_eps(cap)}",
                "over": spent is not None and cap is not None and spent > cap,
                "ok_rounds": ok_rounds,
            }
        )
    return rows


def _preflight_rows(metrics: Mapping[str, Any], rounds: list[Mapping[str, Any]], xs: list[int]) -> dict | None:
    """The run's pre-flight (server/federation.py): each hospital's answer, and the rounds in which a
    hospital that confirmed refused after all ("refused after confirming in pre-flight")."""
    preflight = _dict(metrics.get("preflight"))
    if not preflight:
        return None
    later: dict[str, list[str]] = {}
    for rnd, x in zip(rounds, xs, strict=True):
        for hospital, category in _dict(rnd.get("refused_after_preflight")).items():
            later.setdefault(str(hospital), []).append(f"round {x}: {_str(category)}")
    answers = _dict(preflight.get("hospitals"))
    rows = []
    for hospital in sorted(answers, key=_natural_key):
        answer = _dict(answers[hospital])
        status = _str(answer.get("status"))
        rows.append(
            {
                "name": hospital,
                "status": status if status in STATUSES else "failed",
                "answer": "confirmed" if status == "ok" else status or _MISSING,
                "reason": _str(answer.get("reason")),
                "later": "; ".join(f"refused after confirming in pre-flight: {w}" for w in later.get(hospital, [])),
            }
        )
    return {
        "round": _fmt_int(preflight.get("round")),
        "confirmed": _fmt_int(preflight.get("confirmed")),
        "min_hospitals": _fmt_int(preflight.get("min_hospitals")),
        "rows": rows,
    }


def _export_link(export: Any, out_dir: Path) -> dict | None:
    if not export:
        return None
    path = Path(str(export))
    # A relative export path is relative to the working directory of the run (the process
    # writing this report); the link is made relative to the report so the run folder can move.
    try:
        href_path = os.path.relpath(os.path.abspath(path), os.path.abspath(out_dir))
    except ValueError:  # different drive (Windows)
        href_path = os.path.abspath(path)
    return {"href": urllib.parse.quote(Path(href_path).as_posix(), safe="/._-~"), "path": str(path)}


def _trained(rounds: list[Mapping[str, Any]], xs: list[int]) -> tuple[list[Mapping[str, Any]], list[int]]:
    """The training rounds: round 0 (the zero-shot start, before anyone trains) has no hospitals."""
    kept = [(r, x) for r, x in zip(rounds, xs, strict=True) if x != 0]
    return [r for r, _ in kept], [x for _, x in kept]


def _render_html(
    metrics: Mapping[str, Any], rounds: list[Mapping[str, Any]], xs: list[int], hospitals: list[str], out_dir: Path
) -> str:
    private = _is_private(metrics)
    trained, trained_xs = _trained(rounds, xs)
    non_private_detail = None
    if not private:
        non_private_detail = (
            "the run did not record whether it was private"
            if "private" not in metrics or metrics.get("private") is None
            else "hospitals trained WITHOUT differential privacy; the prompt may memorise patient records"
        )
    outcome = _str(metrics.get("outcome"))
    alt_eps = (
        "NON-PRIVATE run: epsilon not tracked" if not private else "cumulative epsilon spent per hospital per round"
    )
    figures = [
        (
            METRICS_PNG,
            "Federated validation (solid) and test (dashed) scores; loss below.",
            "macro-F1, accuracy and loss per round",
        ),
        (
            EPSILON_PNG,
            "Cumulative \u03b5 per hospital; dotted lines are each hospital's cap; open squares = refused, "
            "crosses = rejected, triangles = failed.",
            alt_eps,
        ),
        (UPLOAD_PNG, "Bytes uploaded per round, stacked by hospital.", "upload bytes per round by hospital"),
    ]
    return _TEMPLATES.get_template("report.html.j2").render(
        run=_str(metrics.get("run")) or "(unnamed run)",
        private=private,
        non_private_detail=non_private_detail,
        outcome=outcome,
        # set only for a run that produced no model or trained in too few rounds (server/outcome.py)
        outcome_reason=_str(metrics.get("outcome_reason")),
        running=outcome == RUNNING,
        strategy=_str(metrics.get("strategy")) or _MISSING,
        fingerprint=_str(metrics.get("backbone_fingerprint")),
        labels=[str(label) for label in (metrics.get("labels") or []) if label is not None],
        trained_rounds=len(trained),
        zero_shot_round=len(trained) < len(rounds),
        hospitals=hospitals,
        final=_final_quality(rounds, xs) if trained else None,
        eps=_epsilon_summary(trained, hospitals) if trained and private else None,
        figures=[{"name": name, "caption": caption, "alt": alt} for name, caption, alt in figures],
        round_rows=_round_rows(rounds, xs),
        hospital_rows=_hospital_rows(trained, trained_xs, hospitals),
        preflight=_preflight_rows(metrics, rounds, xs),
        export=_export_link(metrics.get("export"), out_dir),
        stamp=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def write_report(metrics: Mapping[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/report.html`` and its three PNG plots; return the HTML path.

    ``metrics`` is the run's ``metrics.json`` content: ``run``, ``outcome`` ("trained", "no
    hospital trained" or "partly trained"), ``outcome_reason`` (why not "trained", else null), ``private``,
    ``strategy``,
    ``backbone_fingerprint``, ``labels``, ``export`` and ``rounds``, a list of
    ``{"round", "seconds", "aggregate_seconds", "aggregate_cpu_seconds", "upload_bytes", "evaluate",
    "test", "hospitals"}`` (``aggregate_*``: wall and CPU time in the strategy's aggregate_train,
    validation included) where ``evaluate``
    and ``test`` are ``{"accuracy", "macro_f1", "loss", "num_examples"}`` or null/absent
    (``evaluate`` is null unless some hospital shares noised validation counts; then its loss is
    null) and ``hospitals`` maps a hospital id to ``{"status": ok|refused|rejected|failed,
    "reason", "weight", "epsilon_spent", "epsilon_cap", "upload_bytes"}`` (a hospital's training
    loss and record count never leave it). Any value
    may be null. ``epsilon_spent`` is the hospital's cumulative (ledger) total, not the
    round's increment.

    Files written (each atomically): ``metrics_per_round.png``, ``epsilon_per_hospital.png``,
    ``upload_bytes.png`` and, last, ``report.html``. With no round completed the PNGs are
    placeholders (so stale plots of an earlier report never survive) and the page says so.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = _dict(metrics)
    rounds = _rounds(metrics)
    xs = [_round_no(r, i) for i, r in enumerate(rounds)]
    hospitals = _hospitals(rounds)
    private = _is_private(metrics)

    trained, trained_xs = _trained(rounds, xs)
    plots = {
        METRICS_PNG: _plot_metrics(rounds, xs),
        EPSILON_PNG: _plot_epsilon(trained, trained_xs, hospitals, private),
        UPLOAD_PNG: _plot_upload(trained, trained_xs, hospitals),
    }
    page = _render_html(metrics, rounds, xs, hospitals, out_dir).encode("utf-8")
    for name, data in plots.items():
        atomic_write(out_dir / name, data)
    report = out_dir / REPORT_NAME
    atomic_write(report, page)
    return report
