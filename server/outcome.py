"""Did a run produce a model, and did this invocation train it? Its `outcome` in metrics.json, and
the exit status of `fedprompt aggregator run` / `fedprompt simulate` (common/exit_codes.py).

- "no hospital trained": no round of the run aggregated (every site refused, e.g. its privacy
  budget spent, or was rejected or failed), or fewer than min_hospitals sites confirmed a fresh run
  in pre-flight (it never started, and no site was charged). The global model is still the
  zero-shot start: no export, exit NOTHING_TRAINED.
- "partly trained": the model changed, but most training rounds of this invocation did not
  aggregate (hospitals died, refused or failed; a resumed run is judged on its new rounds), or the
  pre-flight stopped a resumed run. The export holds the last model that aggregated; exit
  PARTLY_TRAINED, never success.
- "trained": most rounds aggregated.
Neither of the first two passes for a finished run: metrics.json and the report say why. Kept free
of heavy imports: the operator's CLI reads it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Final, Literal

from fedprompt.common.exit_codes import ExitCode

TRAINED: Final = "trained"  # most training rounds (of this invocation) aggregated valid updates
# every training reply of every round was a refusal, rejection or failure; or the pre-flight stopped the run
NOTHING_TRAINED: Final = "no hospital trained"
PARTLY_TRAINED: Final = "partly trained"  # the model changed, but most of this invocation's rounds did not
RUNNING: Final = "running"  # the report rewritten after each round, before the run ends
# the four above (metrics.json's "outcome")
Outcome = Literal["trained", "no hospital trained", "partly trained", "running"]


def exit_code(outcome: str) -> ExitCode:
    """The exit status of `fedprompt simulate` / `fedprompt aggregator run` for a run that ended so
    ("running": it never finished)."""
    return {
        TRAINED: ExitCode.OK,
        NOTHING_TRAINED: ExitCode.NOTHING_TRAINED,
        PARTLY_TRAINED: ExitCode.PARTLY_TRAINED,
    }.get(outcome, ExitCode.FAILED)


def preflight_shortfall(confirmed: int, min_hospitals: int, declined: Mapping[str, str]) -> str:
    """Why a run did not start: too few sites confirmed it in pre-flight (server/federation.py).
    `declined`: hospital -> its refusal category, or the aggregator's words (no reply, malformed)."""
    return f"pre-flight: only {confirmed} of min_hospitals {min_hospitals} sites can train the run: " + ", ".join(
        f"{hospital}: {why}" for hospital, why in sorted(declined.items())
    )


def _aggregated(record: dict) -> bool:
    # "aggregated" is false for a round with fewer valid updates than min_hospitals: the model did
    # not move. (Histories written before the field existed: an accepted update counts.)
    return record.get("aggregated", any(o["status"] == "ok" for o in record.get("hospitals", {}).values()))


def _tally(rounds: list[dict]) -> str:
    """The replies of `rounds` by status, refusals by category: "failed 1; refused 4 (budget 3, ...)"."""
    replies = [o for r in rounds for o in r.get("hospitals", {}).values()]
    statuses = Counter(o["status"] for o in replies)
    refusals = Counter(o["reason"] for o in replies if o["status"] == "refused")

    def one(status: str, n: int) -> str:
        if status != "refused":
            return f"{status} {n}"
        return f"refused {n} (" + ", ".join(f"{category} {c}" for category, c in sorted(refusals.items())) + ")"

    return "; ".join(one(status, n) for status, n in sorted(statuses.items())) or "no hospital was asked"


def _never_trained(training: list[dict], not_started: str | None) -> str:
    """Why a run whose global model never changed has nothing to deliver."""
    if not_started is not None:
        return not_started
    n = len(training)
    if any(o["status"] == "ok" for r in training for o in r.get("hospitals", {}).values()):
        return (
            f"fewer valid updates than min_hospitals in every one of {n} training round(s): the global model never "
            "changed"
        )
    if not any(r.get("hospitals") for r in training):
        return f"no hospital was asked to train in {n} training round(s)" if n else "no training round ran"
    return f"no hospital's update was accepted in {n} training round(s): {_tally(training)}"


def run_outcome(
    history: list[dict], not_started: str | None = None, first_round: int | None = None
) -> tuple[Outcome, str | None]:
    """(outcome, why) of a run from its whole history; `why` is None for a TRAINED run.

    `not_started`: the pre-flight stopped this invocation before its first round
    (preflight_shortfall). `first_round`: the first round this invocation ran (a resumed run's
    new rounds are judged on their own); None: every round of the history. The per-round,
    per-hospital detail is in metrics.json's rounds; `why` tallies the replies by status and
    refusals by category ("refused 6 (budget 6)").
    """
    training = [r for r in history if r.get("round", 0) > 0]
    done = [r["round"] for r in training if _aggregated(r)]
    if not done:
        return NOTHING_TRAINED, _never_trained(training, not_started)
    model = f"the model is that of round {done[-1]}"
    if not_started is not None:
        return PARTLY_TRAINED, f"{not_started}; no new round ran, {model}"
    judged = [r for r in training if first_round is None or r["round"] >= first_round] or training
    failed = [r for r in judged if not _aggregated(r)]
    if 2 * len(failed) <= len(judged):
        return TRAINED, None
    return PARTLY_TRAINED, (
        f"only {len(judged) - len(failed)} of {len(judged)} training round(s)"
        + (f" since round {first_round}" if first_round not in (None, 1) else "")
        + f" aggregated; round{'s' if len(failed) > 1 else ''} {', '.join(str(r['round']) for r in failed)} did not"
        + f" ({_tally(failed)}); {model}"
    )
