"""`fedprompt plan`: what a run of a workspace would cost each hospital, before it starts.

Per hospital: its DP units, the sampling rate q and steps per round, the noise multiplier sigma,
the epsilon it has spent, the epsilon it would reach after the whole run against its cap, and
whether it would refuse. Computed by the functions a round uses (client/hospital.py check_plan,
with the site's limits, and site_run; the pre-flight's account of the run's releases; the ledger's
own projection), on the round plan the aggregator would send. Reads files only: no ledger entry,
no noise memo, nothing sent; nothing is calibrated for a site that refuses the plan outright.
Exit 0: some hospital would train (refusals listed); 1: none would (each one's reason on stderr);
2: bad input (workspace, records, backbone).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
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
    from fedprompt.client.hospital import Refused, check_plan, site_run
    from fedprompt.client.ledger import PrivacyLedger, json_epsilon
    from fedprompt.client.preflight import count_units
    from fedprompt.common.errors import LedgerError
    from fedprompt.common.schedule import noise_ratio

    units = count_units(site, plan)
    cap = site.privacy.max_epsilon
    row: dict[str, Any] = {
        "hospital_id": site.hospital_id,
        "site": str(site.source),
        "dp_unit": "record" if site.patient_field is None else "patient",
        "units": units,
        "declared_size": None,
        "class_sums_noise_multiplier": None,
        "noise_ratio": None,
        "sample_rate": None,
        "steps_per_round": None,
        "noise_multiplier": None,
        "delta": None,
        "epsilon_spent": None,
        "epsilon_after_run": None,
        "epsilon_cap": cap,
        "epsilon_remaining": None,
        "refusal": None,
    }
    refusal, run, ledger = None, None, None
    try:
        ledger = PrivacyLedger.for_site(site)
    except LedgerError as exc:
        refusal = ("budget", str(exc))  # as train_round: no usable ledger, no round
    try:
        # As train_round: the site's limits and the recipe first, then the run's schedule and its
        # calibration on what the ledger leaves (never for a plan the site refuses outright).
        check_plan(site, plan)
        run = site_run(site, plan, units, ledger)
    except Refused as exc:
        refusal = exc.category, str(exc)
    if run is not None:
        row.update(
            declared_size=run.declared_size,
            sample_rate=run.sampling.sample_rate,
            steps_per_round=run.sampling.steps_per_round,
        )
        if run.noise is not None:
            row.update(
                noise_multiplier=run.noise.sgd,
                class_sums_noise_multiplier=run.noise.class_sums,
                noise_ratio=noise_ratio(plan, run.declared_size, run.noise),
                delta=run.delta,
            )
    if ledger is not None:
        spent = ledger.epsilon_spent()
        row.update(epsilon_spent=json_epsilon(spent), epsilon_remaining=max(cap - spent, 0.0))
        if run is not None:
            # The pre-flight's account of the whole run: every round's release and evaluation charge.
            after = ledger.project_all(run.releases(plan)) if plan.private else math.inf
            row.update(epsilon_after_run=json_epsilon(after))
    if refusal is not None:
        row["refusal"] = {"category": refusal[0], "reason": refusal[1]}
    return row


def run(args: argparse.Namespace) -> int:
    from fedprompt.client.workspace import load_workspace
    from fedprompt.common.backbone import load_backbone
    from fedprompt.common.errors import InputError
    from fedprompt.common.plan import RoundPlan, prompt_config, train_prompt

    fed, sites, _ = load_workspace(args.workspace)
    if args.rounds is not None:
        fed = fed.replaced(rounds=args.rounds, origin="--rounds")
    if args.non_private:
        fed = fed.replaced(privacy=fed.privacy.replaced(private=False))
    # The plan the aggregator would send (round 1; the rounds differ only in their number).
    backbone = load_backbone(args.backbone)
    plan = RoundPlan.for_run(fed, prompt_config(fed, backbone), round=1)
    _, prompt_why = train_prompt(fed, prompt_config(fed, backbone), backbone)
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
        "train_prompt": plan.train_prompt,
        "train_prompt_why": prompt_why,
        "hospitals": rows,
    }
    if args.json:
        print(json.dumps(report))
        return _none_trains(rows)
    print(
        f"fedprompt plan: run {fed.name!r}, {plan.total_rounds} rounds, "
        + (
            f"DP, target epsilon {plan.target_epsilon:g} per run (each site's cap wins)"
            if plan.private
            else "NON-PRIVATE"
        )
    )
    print(f"recipe: {recipe(plan, prompt_why)}")
    header = (
        f"{'hospital':<16} {'DP units':>14} {'declared':>8} {'q':>9} {'steps/round':>11} {'sigma':>8} "
        f"{'sigma sums':>10} {'noise/sig':>9} {'eps spent':>10} {'after run':>10} {'cap':>7} {'left now':>9}  verdict"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        verdict = "trains" if r["refusal"] is None else f"REFUSES [{r['refusal']['category']}]"
        print(
            f"{r['hospital_id']:<16} {r['units']:>6} {r['dp_unit'] + 's':<7} {_num(r['declared_size'], 'g'):>8} "
            f"{_num(r['sample_rate'], '.4g'):>9} {_num(r['steps_per_round'], 'd'):>11} "
            f"{_num(r['noise_multiplier'], '.4g'):>8} {_num(r['class_sums_noise_multiplier'], '.4g'):>10} "
            f"{_num(r['noise_ratio'], '.2f'):>9} {_num(r['epsilon_spent']):>10} "
            f"{_num(r['epsilon_after_run']):>10} {r['epsilon_cap']:>7g} {_num(r['epsilon_remaining']):>9}  {verdict}"
        )
    for r in rows:
        if r["refusal"] is not None:
            print(f"{r['hospital_id']}: {r['refusal']['reason']}")
    return _none_trains(rows)


def recipe(plan: RoundPlan, prompt_why: str) -> str:
    """What the run trains and why, in one line."""
    from fedprompt.common.schedule import sgd_rounds

    parts = []
    if plan.class_sums_share > 0:
        share = plan.class_sums_share if sgd_rounds(plan) else 1.0
        parts.append(
            f"round 1 releases each site's class sums once ({share:.0%} of its epsilon) and the head starts from "
            "the noisy class means"
        )
    if sgd_rounds(plan):
        what = "the soft prompt and the head" if plan.train_prompt else "the head on frozen features"
        parts.append(f"{sgd_rounds(plan)} DP-SGD round(s) train {what}")
    prompt = f"a {plan.prompt_style} prompt before layer {plan.prompt_layer}" if plan.train_prompt else "no prompt"
    parts.append(f"{prompt}: {prompt_why}")
    return "; ".join(parts)


def _none_trains(rows: list[dict]) -> int:
    """1 (and why, on stderr) when no hospital would train the run: nothing to start; else 0."""
    if any(r["refusal"] is None for r in rows):
        return 0
    print(f"fedprompt plan: no hospital would train this run ({len(rows)} refuse):", file=sys.stderr)
    for r in rows:
        print(f"  {r['hospital_id']} [{r['refusal']['category']}]: {r['refusal']['reason']}", file=sys.stderr)
    return 1


def _num(value: float | str | None, spec: str = ".4f") -> str:
    """A table cell: "-" where there is no value (no DP, no usable ledger), "inf" after a non-private round."""
    if value is None:
        return "-"
    return value if isinstance(value, str) else format(value, spec)
