"""The site's bounds on what an aggregator may ask (site.yaml `limits`), and its check of the model
it receives.

Both run before any record is read, any noise is calibrated or any ledger entry is written
(design invariant 7): a plan outside them is refused as "configuration" and costs the site
nothing. Calibration's cost grows faster than the run's steps (the PRV accountant's grid: 20,000
steps took 35 s and 0.9 GB on a busy 2-core host, 50,000 took 116 s and 1.3 GB; the schema caps
limits.max_steps at 100,000), so the step bound is what keeps a hostile or mistyped plan
(`rounds: 1000000`: 4 M steps) from taking the hospital's host down.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

from fedprompt.common.config import SiteConfig
from fedprompt.common.plan import RoundPlan
from fedprompt.common.schedule import sampling, sgd_rounds
from fedprompt.common.wire import decode_tensors

# Every value of a received model must lie within +-MAX_ABS_VALUE. Generous on purpose: the initial
# model's values are about logit_scale (10) in size at most (cosine head rows of norm logit_scale,
# prompts from vocabulary embeddings), and the aggregator bounds how far each round's update moves
# it (common/schedule.update_bound), so an honest model stays orders of magnitude below 1e4 in any
# plausible run. Values beyond it (a hostile or corrupted model) only saturate the classifier and
# make the training's arithmetic meaningless: nothing would be learned for the epsilon spent.
MAX_ABS_VALUE = 1e4


def _refused(message: str) -> Exception:
    """client/hospital.py's Refused, category "configuration" (imported here: hospital.py imports this module)."""
    from .hospital import Refused

    return Refused(message, "configuration")


def check_limits(site: SiteConfig, plan: RoundPlan) -> None:
    """Refused ("configuration", the site.yaml field named) unless `plan` is within the site's limits."""
    limits, where = site.limits, f"{site.source}: limits"
    if plan.total_rounds > limits.max_total_rounds:
        raise _refused(
            f"{where}.max_total_rounds: the plan has {plan.total_rounds} rounds, above this site's limit "
            f"{limits.max_total_rounds}"
        )
    if plan.round > plan.total_rounds:
        raise _refused(f"the plan's round {plan.round} is beyond its total of {plan.total_rounds} rounds")
    if plan.private and plan.batch_size and not limits.allow_fixed_batch:
        raise _refused(
            f"{where}.allow_fixed_batch: the plan fixes the expected batch (batch_size {plan.batch_size}): the sample "
            "rate and the epsilon this site reports would follow its size; refused (limits.allow_fixed_batch: false)"
        )
    check_steps(site, _steps_per_round(site, plan), plan.total_rounds)
    if len(plan.labels) > limits.max_labels:
        raise _refused(
            f"{where}.max_labels: the plan has {len(plan.labels)} labels, above this site's limit {limits.max_labels}"
        )
    values = sum(int(np.prod(shape)) for shape in plan.prompt_config().shapes().values())
    if values > limits.max_tensor_values:
        raise _refused(
            f"{where}.max_tensor_values: the plan's prompt and head hold {values:,} values, above this site's limit "
            f"{limits.max_tensor_values:,}"
        )
    check_label_space(site, plan)
    if not plan.private:
        return  # no noise, no epsilon: the privacy limits below have nothing to bound (allow_non_private decides)
    # A one-shot class-sums run (one round) is calibrated for its one release; a run with DP-SGD
    # rounds must spread its epsilon over at least the minimum.
    if sgd_rounds(plan) > 0 and plan.total_rounds < limits.min_total_rounds:
        raise _refused(
            f"{where}.min_total_rounds: the plan's noise would be calibrated for {plan.total_rounds} round(s), fewer "
            f"than this site's minimum {limits.min_total_rounds} (the run's epsilon in a few low-noise updates)"
        )
    if limits.max_run_epsilon is not None and plan.target_epsilon > limits.max_run_epsilon:
        raise _refused(
            f"{where}.max_run_epsilon: the plan targets epsilon {plan.target_epsilon:g} for the run, above this "
            f"site's per-run limit {limits.max_run_epsilon:g}"
        )


def check_label_space(site: SiteConfig, plan: RoundPlan) -> None:
    """Refused unless the plan's label space is the one site.yaml pins (`labels`, as a set). Were the
    records the judge (a label outside the plan's space refused as "records"), an aggregator varying the
    space would learn for free whether each label occurs in the site's files."""
    if site.labels is None:
        raise _refused(
            f"{site.source}: labels: not set: this site trains and evaluates only on a label space it has pinned; "
            f"pin the federation's with `fedprompt hospital labels --site {site.source} --federation "
            "federation.yaml`"
        )
    extra, missing = sorted(set(plan.labels) - set(site.labels)), sorted(set(site.labels) - set(plan.labels))
    differences = [f"not pinned: {_names(extra)}"] * bool(extra)
    differences += [f"missing from the plan: {_names(missing)}"] * bool(missing)
    if differences:
        raise _refused(
            f"{site.source}: labels: the plan's label space is not the one this site pinned ({'; '.join(differences)})"
        )


def _names(labels: list[str], shown: int = 5) -> str:
    more = f" and {len(labels) - shown} more" if len(labels) > shown else ""
    return ", ".join(labels[:shown]) + more


def _steps_per_round(site: SiteConfig, plan: RoundPlan) -> int:
    """The most DP-SGD steps a round of `plan` takes at this site, known before its records are read."""
    if not plan.batch_size:
        # A site's sample rate is the plan's, only ever raised (common/schedule.sampling): at most this many.
        return plan.local_epochs * int(1 / plan.sample_rate)
    if site.weight is None:  # the steps would grow with the records, unknown here: no bound before reading them
        raise _refused(
            f"{site.source}: weight: the plan fixes the expected batch (batch_size {plan.batch_size}) and this site "
            "declares no size: declare one (weight) to bound such a run's steps"
        )
    return sampling(plan, site.weight).steps_per_round  # the declared size sets the rate


def check_steps(site: SiteConfig, steps_per_round: int, total_rounds: int) -> None:
    """Refused unless the run's DP-SGD steps (what its noise is calibrated for) are within limits.max_steps."""
    steps = steps_per_round * total_rounds
    if steps > site.limits.max_steps:
        raise _refused(
            f"{site.source}: limits.max_steps: the run plans {steps:,} DP-SGD steps ({steps_per_round:,} a round x "
            f"{total_rounds:,} rounds), above this site's limit {site.limits.max_steps:,}"
        )


def check_received(arrays: ArrayRecord | None, plan: RoundPlan) -> None:
    """Refused unless the model received is exactly the plan's tensors (keys, shapes, float32), finite,
    and every value within +-MAX_ABS_VALUE: nothing trains or evaluates on anything else."""
    if arrays is None:
        raise _refused("the message carries no model (ArrayRecord 'arrays')")
    try:
        decoded = decode_tensors(arrays, plan.prompt_config().shapes())
    except ValueError as exc:
        raise _refused(f"the model received: {exc}") from None
    for key, values in decoded.items():
        if values.size and float(np.abs(values).max()) > MAX_ABS_VALUE:
            raise _refused(
                f"the model received: {key}: values up to {float(np.abs(values).max()):.3g} in size, beyond "
                f"+-{MAX_ABS_VALUE:g}"
            )
