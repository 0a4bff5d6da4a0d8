"""Did a run produce a model? Its `outcome` in metrics.json, and the exit status when it did not.

A run in which no hospital's update was accepted in any round (every site refused, e.g. its
privacy budget spent, or was rejected or failed), or which fewer than min_hospitals sites
confirmed in pre-flight (it never started, and no site was charged), has nothing to deliver: its global model is
still the zero-shot start. It must not pass for a finished run: no export is written, metrics.json
and the report say why, and `fedprompt aggregator run` / `fedprompt simulate` exit with
EXIT_NOTHING_TRAINED. Kept free of heavy imports: the operator's CLI reads it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Final, Literal

TRAINED: Final = "trained"  # at least one round aggregated valid updates (the global model changed)
# every training reply of every round was a refusal, rejection or failure; or the pre-flight stopped the run
NOTHING_TRAINED: Final = "no hospital trained"
RUNNING: Final = "running"  # the report rewritten after each round, before the run ends
Outcome = Literal["trained", "no hospital trained", "running"]  # the three above (metrics.json's "outcome")
# Distinct from the other exit codes: 1 run failed, 2 bad input, 3 privacy ledger, 4 audit failed.
EXIT_NOTHING_TRAINED = 5


def preflight_shortfall(confirmed: int, min_hospitals: int, declined: Mapping[str, str]) -> str:
    """Why a run did not start: too few sites confirmed it in pre-flight (server/federation.py).
    `declined`: hospital -> its refusal category, or the aggregator's words (no reply, malformed)."""
    return f"pre-flight: only {confirmed} of min_hospitals {min_hospitals} sites can train the run: " + ", ".join(
        f"{hospital}: {why}" for hospital, why in sorted(declined.items())
    )


def run_outcome(history: list[dict], not_started: str | None = None) -> tuple[Outcome, str | None]:
    """(outcome, why) of a run from its whole history (a resumed run's earlier rounds count).

    `why` is None for a TRAINED run; for NOTHING_TRAINED it is `not_started` when the pre-flight
    stopped this invocation before its first round (preflight_shortfall), else it tallies every
    training reply of every round by status, refusals by their category ("refused 6 (budget 6)"):
    the per-round, per-hospital detail is in metrics.json's rounds.
    """
    training = [r for r in history if r.get("round", 0) > 0]
    training_rounds = len(training)
    replies = [o for r in training for o in r.get("hospitals", {}).values()]
    # "aggregated" is false for a round with fewer valid updates than min_hospitals: the model did
    # not move. (Histories written before the field existed: an accepted update counts.)
    if any(r.get("aggregated", any(o["status"] == "ok" for o in r.get("hospitals", {}).values())) for r in training):
        return TRAINED, None
    if not_started is not None:
        return NOTHING_TRAINED, not_started
    if any(o["status"] == "ok" for o in replies):
        return NOTHING_TRAINED, (
            f"fewer valid updates than min_hospitals in every one of {training_rounds} training round(s): "
            "the global model never changed"
        )
    if not replies:
        return (
            NOTHING_TRAINED,
            f"no hospital was asked to train in {training_rounds} training round(s)"
            if training_rounds
            else "no training round ran",
        )
    statuses = Counter(o["status"] for o in replies)
    refusals = Counter(o["reason"] for o in replies if o["status"] == "refused")

    def tally(status: str, n: int) -> str:
        if status != "refused":
            return f"{status} {n}"
        return f"refused {n} (" + ", ".join(f"{category} {c}" for category, c in sorted(refusals.items())) + ")"

    return NOTHING_TRAINED, (
        f"no hospital's update was accepted in {training_rounds} training round(s): "
        + "; ".join(tally(status, n) for status, n in sorted(statuses.items()))
    )
