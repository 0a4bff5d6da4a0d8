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
    _category,
    _prepare,
    _refuse_as,
    _timed,
    check_plan,
    dp_units,
    log_detail,
    site_run,
)
from .ledger import PrivacyLedger
from .limits import check_received

log = logging.getLogger("fedprompt.hospital")


def run_feasibility(site: SiteConfig, plan: RoundPlan, units: int) -> None:
    """Refused (with the category a round would refuse with) unless this site can train every
    round from `plan.round` to `plan.total_rounds`: each check below is a refusal train_round would
    otherwise make in some round of the run, after other sites had spent their budget on it
    (check_plan, which needs no record, has passed: `units` were counted after it)."""
    if not 1 <= plan.round <= plan.total_rounds:
        raise Refused(f"pre-flight for round {plan.round} of a {plan.total_rounds}-round run", "configuration")
    if units < 1:
        raise Refused(f"{site.train}: no training records", "records")
    ledger = PrivacyLedger.for_site(site)  # LedgerError (no usable ledger): refused as "budget"
    # Declared size, an update that would be mostly noise, and the noise fitted to what the ledger
    # leaves of the cap for every remaining round ("budget" if nothing useful fits).
    run = site_run(site, plan, units, ledger)
    if not plan.private:
        return  # recorded as a non-private round, never refused by the cap (check_plan asked allow_non_private)
    spent, after = ledger.epsilon_spent(), ledger.project_all(run.releases(plan))
    log.info(
        "%s pre-flight (local log): rounds %d-%d bring epsilon from %.4f to %.4f of cap %g (sigma %s)",
        site.hospital_id,
        plan.round,
        plan.total_rounds,
        spent,
        after,
        site.privacy.max_epsilon,
        run.noise,
    )


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
        # Before a record is read: the label space site.yaml pins, the site's limits, the recipe.
        check_plan(site, plan)
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
