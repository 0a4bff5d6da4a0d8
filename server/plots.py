"""The report's three plots (server/report.py), drawn from the run's typed history (server/history.py).

Each function returns PNG bytes. Plots use matplotlib's object API (``Figure`` + Agg canvas), never
``pyplot``: no global backend switch, no display needed, nothing left open in pyplot's figure
registry. matplotlib is imported inside the functions: the aggregator's CLI imports the report module
without paying for it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from itertools import pairwise
from typing import Any

from .history import HeldOutScores, RoundRecord, SharedEvaluation

# Marker for a round where a hospital did not contribute an accepted update (epsilon plot).
_STATUS_MARKERS = {"refused": ("s", "refused"), "rejected": ("X", "rejected"), "failed": ("v", "failed")}
_DPI = 110


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


def _placeholder(ax, text: str, color: str = "0.35") -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=13, color=color, wrap=True, transform=ax.transAxes)


def _note(ax, text: str, color: str = "0.4") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", color=color, transform=ax.transAxes)


def _integer_rounds_axis(ax, xs: list[int], min_pad: float = 0.3) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
    if xs:
        lo, hi = min(xs), max(xs)
        pad = max(min_pad, 0.5 if hi == lo else 0.03 * (hi - lo))
        ax.set_xlim(lo - pad, hi + pad)


def _outside_legend(ax, extra: Iterable[tuple[Any, str]] = ()) -> None:
    """Legend to the right of the axes: it can never cover a data point."""
    handles, labels = ax.get_legend_handles_labels()
    for handle, label in extra:
        handles.append(handle)
        labels.append(label)
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=9)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _points(rounds: list[RoundRecord], value) -> tuple[list[int], list[float]]:
    """(round, value) of the rounds that report a finite value: a round without one does not break
    the line (the table shows which rounds have none)."""
    pairs = [(r.round, v) for r in rounds if _finite(v := value(r))]
    return [x for x, _ in pairs], [v for _, v in pairs]


def _score(section: HeldOutScores | SharedEvaluation | None, key: str) -> float | None:
    return None if section is None else getattr(section, key)


def metrics_png(rounds: list[RoundRecord]) -> bytes:
    """Macro-F1 and accuracy per round (the sites' noised validation solid, the held-out test dashed);
    the test loss below (no site sends a loss)."""
    fig, (ax_score, ax_loss) = _new_figure(9.0, 6.4, nrows=2)
    if not rounds:
        ax_loss.set_visible(False)
        _placeholder(ax_score, "No round completed: no metrics to plot")
        return _png_bytes(fig)
    # Colour = metric, line style = split (validation solid, test dashed).
    plotted = False
    for section, split, style, marker in (("evaluate", "fed. validation", "-", "o"), ("test", "test", "--", "s")):
        for key, label, color in (("macro_f1", "macro-F1", "tab:blue"), ("accuracy", "accuracy", "tab:orange")):
            xs, ys = _points(rounds, lambda r, s=section, k=key: _score(getattr(r, s), k))
            if xs:
                ax_score.plot(
                    xs, ys, color=color, linestyle=style, marker=marker, markersize=4, label=f"{label} ({split})"
                )
                plotted = True
    ax_score.set_ylim(0.0, 1.02)
    ax_score.set_ylabel("score")
    ax_score.set_title("Model quality per round", fontsize=12)
    ax_score.grid(True, alpha=0.3)
    if plotted:
        _outside_legend(ax_score)
    else:
        _note(ax_score, "no evaluation reported")

    xs, ys = _points(rounds, lambda r: _score(r.test, "loss"))
    if xs:
        ax_loss.plot(xs, ys, color="tab:red", linestyle="--", marker="s", markersize=4, label="loss (test)")
        _outside_legend(ax_loss)
    else:
        _note(ax_loss, "no loss reported")
    ax_loss.set_ylabel("loss")
    ax_loss.set_xlabel("round")
    ax_loss.grid(True, alpha=0.3)
    _integer_rounds_axis(ax_loss, [r.round for r in rounds])
    return _png_bytes(fig)


def plot_label(name: str, limit: int = 40) -> str:
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


def _hospital_epsilon(ax, rounds: list[RoundRecord], hospital: str, color) -> tuple[bool, set[str]]:
    """One hospital's cumulative epsilon line, its cap, and a marker where it did not contribute an
    accepted update; (whether it reported any epsilon, the statuses marked)."""
    cap: float | None = None
    last_known = 0.0
    xs: list[int] = []
    eps: list[float] = []
    marks: dict[str, tuple[list[int], list[float]]] = {}
    for rnd in rounds:
        entry = rnd.hospitals.get(hospital)
        if entry is None:  # not sampled this round
            continue
        if _finite(entry.epsilon_cap):
            cap = entry.epsilon_cap
        spent = entry.epsilon_spent
        if spent is not None and math.isfinite(spent):
            xs.append(rnd.round)
            eps.append(spent)
            last_known = spent
        if entry.status != "ok":
            # Marked at the hospital's own epsilon when it has one, else its last known total.
            xs_m, ys_m = marks.setdefault(entry.status, ([], []))
            xs_m.append(rnd.round)
            ys_m.append(spent if spent is not None and math.isfinite(spent) else last_known)
    label = plot_label(hospital) if cap is None else f"{plot_label(hospital)} (cap {cap:g})"
    if xs:  # connect the known points: a gap (refusal, not sampled) keeps the running total
        ax.plot(xs, eps, color=color, marker="o", markersize=4, linewidth=1.8, label=label)
    else:
        ax.plot([], [], color=color, marker="o", label=f"{label}: no epsilon reported")
    if cap is not None:
        ax.axhline(cap, color=color, linestyle=":", linewidth=1.6)
    for status, (xs_m, ys_m) in marks.items():
        marker, _ = _STATUS_MARKERS[status]
        facecolors = "none" if marker == "s" else color
        ax.scatter(
            xs_m,
            ys_m,
            marker=marker,
            s=90,
            facecolors=facecolors,
            edgecolors=color,
            linewidths=1.8,
            zorder=5,
            clip_on=False,
        )
    return bool(xs), set(marks)


def epsilon_png(rounds: list[RoundRecord], hospitals: list[str], private: bool) -> bytes:
    """Each hospital's cumulative epsilon per round (its ledger's total), against its cap."""
    from matplotlib.lines import Line2D

    fig, (ax,) = _new_figure(9.0, 4.8)
    if not rounds:
        _placeholder(ax, "No round completed: no privacy spending to plot")
        return _png_bytes(fig)
    if not private:
        _placeholder(ax, "NON-PRIVATE run\nno differential privacy: epsilon is not tracked", color="#b00020")
        return _png_bytes(fig)
    any_eps = False
    status_seen: set[str] = set()
    for hospital, color in zip(hospitals, _colors(len(hospitals)), strict=True):
        reported, marked = _hospital_epsilon(ax, rounds, hospital, color)
        any_eps |= reported
        status_seen |= marked
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative \u03b5 spent")
    ax.set_title("Privacy budget spent per hospital (dotted: the hospital's cap)", fontsize=12)
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0.0)
    _, hi = ax.get_ylim()
    ax.set_ylim(0.0, hi * 1.08 if hi > 0 else 1.0)  # headroom so a cap line is not on the frame
    _integer_rounds_axis(ax, [r.round for r in rounds])
    extra: list[tuple[Any, str]] = [
        (Line2D([], [], color="0.3", linestyle=":", linewidth=1.6), "cap (hospital's colour)")
    ]
    for status in ("refused", "rejected", "failed"):
        if status in status_seen:
            marker, text = _STATUS_MARKERS[status]
            face = "none" if marker == "s" else "0.3"
            handle = Line2D(
                [], [], linestyle="none", marker=marker, markersize=9, markerfacecolor=face, markeredgecolor="0.3"
            )
            extra.append((handle, f"round {text}"))
    _outside_legend(ax, extra)
    if not any_eps:
        _note(ax, "no epsilon reported by any hospital", color="#b00020")
    return _png_bytes(fig)


def upload_png(rounds: list[RoundRecord], hospitals: list[str]) -> bytes:
    """Bytes uploaded per round, stacked by hospital; an update received but not aggregated hatched."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    fig, (ax,) = _new_figure(9.0, 4.6)
    if not rounds:
        _placeholder(ax, "No round completed: nothing uploaded")
        return _png_bytes(fig)
    xs = [r.round for r in rounds]
    # per hospital and round: (bytes, aggregated?)
    per_site = {
        h: [(float(o.upload_bytes), o.status == "ok") if (o := r.hospitals.get(h)) else (0.0, True) for r in rounds]
        for h in hospitals
    }
    # Bytes in the round total that no hospital entry accounts for.
    other = [max(0.0, r.upload_bytes - sum(v[i][0] for v in per_site.values())) for i, r in enumerate(rounds)]
    peak = max(sum(v[i][0] for v in per_site.values()) + other[i] for i in range(len(rounds)))
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
        bar = dict(width=width, bottom=bottom, color=color, linewidth=0.5)
        ax.bar(xs, accepted, edgecolor="white", label=plot_label(hospital), **bar)
        if any(refused):  # uploaded but not aggregated (rejected/failed): same colour, hatched
            any_not_accepted = True
            ax.bar(xs, refused, alpha=0.45, edgecolor="black", hatch="xx", **bar)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    if any(other):
        unattributed = [o / scale for o in other]
        label = "not attributed to a hospital"
        ax.bar(xs, unattributed, width=width, bottom=bottom, color="0.75", edgecolor="white", hatch="//", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(f"uploaded ({unit})")
    ax.set_title("Bytes uploaded to the aggregator per round, by hospital", fontsize=12)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    _integer_rounds_axis(ax, xs, min_pad=width / 2 + 0.1)
    if peak == 0:
        ax.set_ylim(0, 1)
        _note(ax, "no upload reported")
    else:
        hatched = Patch(facecolor="0.6", alpha=0.45, edgecolor="black", hatch="xx")
        _outside_legend(ax, [(hatched, "uploaded, not aggregated")] if any_not_accepted else [])
    return _png_bytes(fig)
