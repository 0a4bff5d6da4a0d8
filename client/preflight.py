"""The pre-flight: before a run's first round (and a resumed run's), will this site train every
remaining round as planned?

The aggregator sends the run's round plan (the train message's ConfigRecord, with the round the
run starts at) and the global tensors as a Flower "query" message; the site answers from what it
can know in advance, without spending anything: no ledger entry, no noise memo, nothing trained.
Its records file is read only to count its DP units (records, or patients), which set q and the
steps of a round. The reply is the status record alone: "ok", or a refusal naming only its
category, exactly like a train refusal (common/wire.py); the reasons stay in this site's log.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import RecordDict

from fedprompt.common.config import SiteConfig
from fedprompt.common.errors import InputError, LedgerError, PrivacyBudgetExceeded
from fedprompt.common.plan import RoundPlan
from fedprompt.common.records import load_records
from fedprompt.common.wire import ARRAYS, PreflightReply, Status, refusal

from .hospital import (
    Refused,
    SiteRun,
    _category,
    _prepare,
    _refuse_as,
    _timed,
    check_plan,
    dp_units,
    evaluation_sigma,
    log_detail,
    site_run,
)
from .ledger import PrivacyLedger
from .limits import check_received

log = logging.getLogger("fedprompt.hospital")

Release = tuple[float, float, int]  # (noise multiplier, sample rate, steps): one ledger entry's charge


def run_feasibility(site: SiteConfig, plan: RoundPlan, units: int) -> None:
    """Refused (with the category a round would refuse with) unless this site can train every
    round from `plan.round` to `plan.total_rounds`: each check below is a refusal train_round would
    otherwise make in some round of the run, after other sites had spent their budget on it."""
    if not 1 <= plan.round <= plan.total_rounds:
        raise Refused(f"pre-flight for round {plan.round} of a {plan.total_rounds}-round run", "configuration")
    check_plan(site, plan)  # the recipe against site.yaml: DP unit, non-private, delta (and the site's limits)
    if units < 1:
        raise Refused(f"{site.train}: no training records", "records")
    run = site_run(site, plan, units)  # declared size, and an update that would be mostly noise
    ledger = PrivacyLedger.for_site(site)  # LedgerError (no usable ledger): refused as "budget"
    if not plan.private:
        return  # recorded as a non-private round, never refused by the cap (check_plan asked allow_non_private)
    cap = site.privacy.max_epsilon
    spent, after = ledger.epsilon_spent(), ledger.project_all(remaining_releases(site, plan, run, ledger.delta))
    rounds = f"rounds {plan.round}-{plan.total_rounds}"
    if after > cap:
        raise Refused(
            f"the run's {rounds} would bring epsilon from {spent:.4f} to {after:.4f}, over this site's cap {cap:g}",
            "budget",
        )
    log.info(
        "%s pre-flight (local log): %s bring epsilon from %.4f to %.4f of cap %g",
        site.hospital_id,
        rounds,
        spent,
        after,
        cap,
    )


def remaining_releases(site: SiteConfig, plan: RoundPlan, run: SiteRun, ledger_delta: float) -> list[Release]:
    """Every charge rounds `plan.round`..`total_rounds` of a private run make to the site's ledger,
    in the order train_round / evaluate_round record them: each round's release (SiteRun.mechanism),
    and with `share_evaluation: noised` each evaluation of a received model (inside the train
    message, or a separate evaluate message after each round plus round 0's when the run starts)."""
    train = [run.mechanism(plan.replaced(round=r)) for r in range(plan.round, plan.total_rounds + 1)]
    releases: list[Release] = [(sigma, q, steps) for sigma, q, steps in train if sigma is not None]
    if site.share_evaluation != "noised" or site.validation is None:
        return releases
    evaluation: Release = (evaluation_sigma(site, ledger_delta, run.calibration), 1.0, 1)
    if plan.evaluate_in_train:  # the received model is validated (and charged) before the round trains
        return [r for release in releases for r in (evaluation, release)]
    return [evaluation] * (plan.round == 1) + [r for release in releases for r in (release, evaluation)]


def count_units(site: SiteConfig, plan: RoundPlan) -> int:
    """The site's DP units in its training file: records, or with patient_field its patients."""
    records = load_records(
        site.train,
        text_field=site.text_field,
        label_field=site.label_field,
        labels=plan.labels,
        patient_field=site.patient_field,
    )
    return dp_units(records)


def preflight(
    content: RecordDict, site_path: Path, *, run_id: str = "", timings: dict[str, float] | None = None
) -> RecordDict:
    """The reply to a pre-flight message: the status record only ("ok", or a refusal's category)."""
    hospital = Path(site_path).parent.name
    site: SiteConfig | None = None
    try:
        site, plan, _ = _prepare(content, site_path, timings)  # site.yaml, the plan, the backbone's fingerprint
        hospital = site.hospital_id
        check_received(content.array_records.get(ARRAYS), plan)  # the model round 1 would start from
        with _timed(timings, "records"), _refuse_as("records", OSError):
            units = count_units(site, plan)
        with _timed(timings, "privacy"):
            run_feasibility(site, plan, units)
    except (Refused, InputError, LedgerError, PrivacyBudgetExceeded) as exc:
        category = _category(exc)
        log.warning(
            "%s refuses run %s in pre-flight [%s]: %s", hospital, run_id or "-", category, log_detail(exc, site)
        )
        return refusal(hospital, category)
    log.info(
        "%s confirms run %s in pre-flight: it will train rounds %d-%d",
        hospital,
        run_id or "-",
        plan.round,
        plan.total_rounds,
    )
    return PreflightReply(status=Status.ok(hospital)).to_content()
