"""`fedprompt plan`: what a run of a workspace would cost each hospital, before it starts.

Per hospital: its DP units, the sampling rate q and steps per round, the noise multiplier sigma,
the epsilon it has spent, the epsilon it would reach after the whole run against its cap, and
whether it would refuse. Computed by the functions a round uses (client/hospital.py check_plan,
dp_units, site_noise; client/dp.py plan_steps; the ledger's own projection), on the round plan
the aggregator would send. Reads files only: no ledger entry, no noise memo, nothing sent.
Exit 0 (refusals included); 2: bad input (workspace, records, backbone).
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedprompt.common.config import SiteConfig
    from fedprompt.common.plan import RoundPlan


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="each hospital's q, steps, sigma and projected epsilon for a run of a workspace, before it starts"
    )
    p.add_argument(
        "--workspace", type=Path, required=True, help="workspace folder (federation.yaml + hospital-*/site.yaml)"
    )
    p.add_argument("--rounds", type=int, help="override federation.yaml's rounds (as `fedprompt simulate --rounds`)")
    p.add_argument(
        "--non-private",
        action="store_true",
        help="plan a reference run WITHOUT differential privacy (as `simulate --non-private`)",
    )
    p.add_argument(
        "--backbone", type=Path, help="the aggregator's backbone directory (default: embedded all-MiniLM-L6-v2)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def plan_site(site: SiteConfig, plan: RoundPlan) -> dict:
    """One hospital's row: what train_round would compute for every round of `plan`."""
    from fedprompt.client.dp import plan_steps
    from fedprompt.client.hospital import Refused, check_plan, dp_units, site_noise
    from fedprompt.client.ledger import PrivacyLedger, json_epsilon
    from fedprompt.common.errors import LedgerError
    from fedprompt.common.records import load_records

    records = load_records(
        site.train,
        text_field=site.text_field,
        label_field=site.label_field,
        labels=plan.labels,
        patient_field=site.patient_field,
    )
    units = dp_units(records)
    q, steps = plan_steps(units, plan.batch_size, plan.local_epochs, plan.sample_rate)
    cap = site.privacy.max_epsilon
    row: dict[str, Any] = {
        "hospital_id": site.hospital_id,
        "site": str(site.source),
        "dp_unit": "record" if records.patients is None else "patient",
        "units": units,
        "sample_rate": q,
        "steps_per_round": steps,
        "noise_multiplier": None,
        "delta": None,
        "epsilon_spent": None,
        "epsilon_after_run": None,
        "epsilon_cap": cap,
        "epsilon_remaining": None,
        "refusal": None,
    }
    refusal = None
    try:
        check_plan(site, plan)
    except Refused as exc:
        refusal = exc.category, str(exc)
    if plan.private:
        noise = site_noise(site, plan, q, steps)
        row.update(noise_multiplier=noise.sigma, delta=noise.calibration.delta)
    try:
        ledger = PrivacyLedger.for_site(site)
    except LedgerError as exc:
        refusal = refusal or ("budget", str(exc))  # as train_round: no usable ledger, no round
    else:
        spent = ledger.epsilon_spent()
        after = ledger.project(noise.sigma, q, steps * plan.total_rounds) if plan.private else math.inf
        row.update(
            epsilon_spent=json_epsilon(spent),
            epsilon_after_run=json_epsilon(after),
            epsilon_remaining=max(cap - spent, 0.0),
        )
        # ledger.record refuses the private round that would cross the cap, and every later one (a
        # non-private round: never).
        if plan.private and refusal is None and after > cap:
            first = "its first round" if ledger.project(noise.sigma, q, steps) > cap else "a later round"
            refusal = (
                "budget",
                f"the run would bring epsilon from {spent:.4f} to {after:.4f}, over the site's cap {cap:g}: it "
                f"refuses {first}",
            )
    if refusal is not None:
        row["refusal"] = {"category": refusal[0], "reason": refusal[1]}
    return row


def run(args: argparse.Namespace) -> int:
    from fedprompt.client.workspace import load_workspace
    from fedprompt.common.backbone import load_backbone
    from fedprompt.common.errors import InputError
    from fedprompt.common.plan import RoundPlan, prompt_config

    fed, sites, _ = load_workspace(args.workspace)
    if args.rounds is not None:
        fed = fed.replaced(rounds=args.rounds, origin="--rounds")
    if args.non_private:
        fed = fed.replaced(privacy=fed.privacy.replaced(private=False))
    # The plan the aggregator would send (round 1; the rounds differ only in their number).
    plan = RoundPlan.for_run(fed, prompt_config(fed, load_backbone(args.backbone)), round=1)
    rows, problems = [], []
    with warnings.catch_warnings():
        # Opacus' RDP bounds (its PRV domain size; the ledger past PRV_CEILING) warn about their own
        # tightness: not about this plan.
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        for site in sites:
            try:
                rows.append(plan_site(site, plan))
            except InputError as exc:
                problems += exc.problems
    if problems:
        raise InputError(problems)
    report = {
        "run": fed.name,
        "rounds": plan.total_rounds,
        "private": plan.private,
        "target_epsilon": plan.target_epsilon,
        "hospitals": rows,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"fedprompt plan: run {fed.name!r}, {plan.total_rounds} rounds, "
        + (
            f"DP-SGD, target epsilon {plan.target_epsilon:g} per run (each site's cap wins)"
            if plan.private
            else "NON-PRIVATE"
        )
    )
    header = (
        f"{'hospital':<16} {'DP units':>14} {'q':>9} {'steps/round':>11} {'sigma':>8} {'eps spent':>10} "
        f"{'after run':>10} {'cap':>7} {'left now':>9}  verdict"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        verdict = "trains" if r["refusal"] is None else f"REFUSES [{r['refusal']['category']}]"
        print(
            f"{r['hospital_id']:<16} {r['units']:>6} {r['dp_unit'] + 's':<7} {r['sample_rate']:>9.4g} "
            f"{r['steps_per_round']:>11} {_num(r['noise_multiplier'], '.4g'):>8} {_num(r['epsilon_spent']):>10} "
            f"{_num(r['epsilon_after_run']):>10} {r['epsilon_cap']:>7g} {_num(r['epsilon_remaining']):>9}  {verdict}"
        )
    for r in rows:
        if r["refusal"] is not None:
            print(f"{r['hospital_id']}: {r['refusal']['reason']}")
    return 0


def _num(value: float | str | None, spec: str = ".4f") -> str:
    """A table cell: "-" where there is no value (no DP, no usable ledger), "inf" after a non-private round."""
    if value is None:
        return "-"
    return value if isinstance(value, str) else format(value, spec)
