"""A site's DP schedule for one run, from public values only: the round plan and the site's declared size.

Nothing here reads a record. The sample rate, the expected batch that normalises the noisy gradient
sum, the steps, the noise multipliers and the bounds on an honest update all follow from the plan and
the size the site declares (site.yaml `weight`), so the released tensors' noise scale reveals nothing
beyond that declared size (design.md invariant 1); and the aggregator, which sees the declared size
in every reply, derives the same bound the site checks itself against (invariant 4).

A run has up to two phases:
  class sums  (round 1, if `class_sums_share` > 0) one Gaussian release of the per-class sums of the
              site's unit-norm features, divided by the declared size; the aggregator's weighted mean of
              those is sum(S) / sum(w), from which it builds the head (server/prototypes.py);
  sgd         (every other round) DP-SGD on the trainable tensors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .accounting import History, calibrate_noise, compute_epsilon
from .plan import RoundPlan

# An honest site holds at most this many DP units per unit of declared size; it checks so itself
# (client/hospital.py) and refuses otherwise. Sizes rounded to one significant digit stay within 1.5x.
MAX_UNITS_PER_DECLARED = 2.0
# Every bound below holds but with probability e^-TAIL per update (Chernoff for the Poisson batch
# sizes, Gaussian concentration for the noise norm).
TAIL = 20.0
# Where the plan leaves delta to the sites (delta 0), the aggregator's stand-in for it: the largest a
# site's generated config uses (client/workspace.site_delta). A smaller delta means a little more noise.
DEFAULT_DELTA = 1e-5
# Adam's per-coordinate step is at most lr x (1 - beta1) / sqrt(1 - beta2) (= 3.16 at torch's defaults).
ADAM_STEP = 3.2


@dataclass(frozen=True)
class Sampling:
    """Poisson sampling of one site's rounds: all of it public (the plan and the declared size)."""

    sample_rate: float
    expected_batch: float  # sample_rate x declared size: what the noisy gradient sum is divided by
    steps_per_round: int


def sampling(plan: RoundPlan, declared_size: float) -> Sampling:
    """The site's sample rate: the plan's, raised so that the expected batch reaches the plan's floor
    (a site of 40 records at q 0.25 would average over 10, and its noise would swamp its signal);
    at most 1 (full batch). A fixed `batch_size` sets the expected batch itself."""
    if declared_size <= 0:
        raise ValueError(f"declared size must be positive, got {declared_size}")
    if plan.batch_size:
        q = min(1.0, plan.batch_size / declared_size)
    else:
        q = min(1.0, max(plan.sample_rate, plan.min_expected_batch / declared_size))
    return Sampling(q, q * declared_size, plan.local_epochs * int(1 / q))


def class_sums_round(plan: RoundPlan) -> bool:
    """Is this round the one-shot release of class sums (the run's first round)?"""
    return plan.class_sums_share > 0 and plan.round <= 1


def sgd_rounds(plan: RoundPlan) -> int:
    return plan.total_rounds - (1 if plan.class_sums_share > 0 else 0)


Release = tuple[float, float, int]  # (sigma, q, steps): one ledger entry's charge


@dataclass(frozen=True)
class RunNoise:
    """The noise multipliers of a site's run (None: the phase does not happen)."""

    class_sums: float | None
    sgd: float | None

    def history(self, s: Sampling, rounds: int) -> list[Release]:
        """The run's (sigma, q, steps) mechanisms, as the ledger will hold them."""
        out: list[Release] = []
        if self.class_sums is not None:
            out.append((self.class_sums, 1.0, 1))
        if self.sgd is not None and rounds > 0:
            out.append((self.sgd, s.sample_rate, s.steps_per_round * rounds))
        return out

    def scaled(self, factor: float) -> RunNoise:
        """Both phases' noise times `factor` (fit_to_budget)."""
        return RunNoise(*(None if x is None else x * factor for x in (self.class_sums, self.sgd)))


def round_mechanism(plan: RoundPlan, s: Sampling, noise: RunNoise | None) -> tuple[float | None, float, int]:
    """Round `plan.round`'s (sigma, q, steps), as the ledger records it (sigma None: non-private)."""
    sums = class_sums_round(plan)
    q, steps = (1.0, 1) if sums else (s.sample_rate, s.steps_per_round)
    if noise is None:
        return None, q, steps
    return (noise.class_sums if sums else noise.sgd), q, steps


def evaluations(plan: RoundPlan) -> int:
    """The noised evaluations a run charges a site that shares them: one a round, and with `evaluation:
    separate` round 0's too."""
    return plan.total_rounds + (not plan.evaluate_in_train)


def run_releases(
    plan: RoundPlan, s: Sampling, noise: RunNoise, evaluation: float | None, margin: int = 0
) -> list[Release]:
    """Every charge rounds `plan.round`..`total_rounds` of a private run make to the site's ledger, in
    the order they are recorded: each round's release, and (`evaluation`: the noise of a shared
    evaluation, None: not shared) each evaluation of a received model, inside the train message before
    it trains, or in a separate message after each round plus round 0's when the run starts. Then
    `margin` retried DP-SGD rounds (with their evaluations), if the run has any."""
    ev: list[Release] = [] if evaluation is None else [(evaluation, 1.0, 1)]
    out: list[Release] = ev if not plan.evaluate_in_train and plan.round == 1 else []
    for r in range(plan.round, plan.total_rounds + 1):
        sigma, q, steps = round_mechanism(plan.replaced(round=r), s, noise)
        assert sigma is not None  # a private run
        out += [*ev, (sigma, q, steps)] if plan.evaluate_in_train else [(sigma, q, steps), *ev]
    if noise.sgd is not None and sgd_rounds(plan) > 0:
        out += [*ev, (noise.sgd, s.sample_rate, s.steps_per_round)] * margin
    return out


def calibrate_run(
    plan: RoundPlan,
    s: Sampling,
    target_epsilon: float,
    delta: float,
    accountant: str,
    floor: float = 0.0,
    calibrate: Callable[..., float] = calibrate_noise,
    evaluation: float | None = None,
    margin: int = 0,
) -> RunNoise:
    """Noise for the whole run at `target_epsilon`: the class sums alone cost `class_sums_share` of it,
    and the SGD rounds' sigma is calibrated on the composition with that release, the run's noised
    evaluations (`evaluation`: their sigma) and `margin` retried SGD rounds, so that the run's epsilon
    with all of them is the target, not the sum of several targets. `floor`: the site's
    min_noise_multiplier. `calibrate`: calibrate_noise, or the site's memo of it."""
    rounds = sgd_rounds(plan)
    n_eval = evaluations(plan) + (margin if rounds > 0 else 0)
    evals: History = ((evaluation, 1.0, n_eval),) if evaluation is not None else ()
    sums = None
    if plan.class_sums_share > 0:
        if rounds > 0:
            sums = max(calibrate(plan.class_sums_share * target_epsilon, delta, 1.0, 1, accountant), floor)
        else:  # the one-shot release: the run's epsilon less its evaluations
            sums = max(calibrate(target_epsilon, delta, 1.0, 1, accountant, evals), floor)
    if rounds == 0:
        return RunNoise(sums, None)
    after = ((sums, 1.0, 1),) if sums is not None else ()
    steps = s.steps_per_round * (rounds + margin)
    sgd = calibrate(target_epsilon, delta, s.sample_rate, steps, accountant, after + evals)
    return RunNoise(sums, max(sgd, floor))


def grouped(releases: Iterable[tuple[float | None, float, int]]) -> list[tuple[float | None, float, int]]:
    """The same composition with each (sigma, q) once, its steps summed. Epsilon does not depend on the
    order of a composition, and the PRV accountant's cost grows with its distinct entries: a ledger whose
    evaluation releases interleave its rounds took 15 s, grouped 1.7 s, for the same epsilon to 1e-11."""
    steps: dict[tuple[float | None, float], int] = {}
    for sigma, q, n in releases:
        steps[sigma, q] = steps.get((sigma, q), 0) + n
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def fit_to_budget(
    noise: RunNoise,
    releases: Callable[[RunNoise], list[Release]],
    project: Callable[[list[Release]], float],
    cap: float,
    max_factor: float,
) -> RunNoise | None:
    """`noise` scaled by the least factor in [1, max_factor] (to 1%) whose `releases` keep `project`
    (the ledger's epsilon after them) within `cap`; None if even max_factor does not."""
    if project(releases(noise)) <= cap:
        return noise
    if max_factor <= 1 or project(releases(noise.scaled(max_factor))) > cap:
        return None
    low, high = 1.0, max_factor
    while high - low > 1e-2 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if project(releases(noise.scaled(mid))) > cap else (low, mid)
    return noise.scaled(high)


def class_sums_sigma(plan: RoundPlan, delta: float, accountant: str = "prv") -> float:
    """The noise of the class-sums release at the plan's own target (a site with a lower cap or delta
    adds more): what the aggregator weighs the label embeddings against (server/class_means.py)."""
    share = plan.class_sums_share if sgd_rounds(plan) > 0 else 1.0
    return calibrate_noise(share * plan.target_epsilon, delta, 1.0, 1, accountant)


def site_lr(plan: RoundPlan, s: Sampling, sigma: float | None) -> float:
    """The learning rate a site's DP-SGD steps take: the plan's, scaled down where the noise per expected
    example (sigma / expected batch) exceeds the plan's `noise_lr_ref`. Public values only."""
    if not sigma:  # non-private (None) or noiseless
        return plan.lr
    return plan.lr * min(1.0, plan.noise_lr_ref * s.expected_batch / sigma)


# --- whether a run trains the prompt (train_prompt: auto) ------------------------------------------
# A prompt step is worth taking only where its noise does not swamp what one step can carry: the
# noise norm on the prompt's averaged gradient, sigma x clip x sqrt(prompt values) / expected batch,
# against the clip (the largest a step's signal can be). Chosen on the public corpus (BENCHMARKS.md
# "prompt"): DP-SGD on the prompt lost to the head-only recipe at 0.45 (benchmark split, epsilon 8);
# the limit keeps the prompt to runs an order of magnitude quieter, which no measured run reached.
PROMPT_NOISE_LIMIT = 0.1


def prompt_decision(plan: RoundPlan) -> tuple[bool, str]:
    """Whether a `train_prompt: auto` run trains the prompt, and why: from the plan alone (public).

    The noise is the run's at the smallest site that samples at the plan's own rate (declared size
    min_expected_batch / sample_rate; smaller sites have their rate raised, larger ones more steps at
    the same expected batch)."""
    if plan.prompt_layer < 0:
        return False, "model.prompt_layer is -1: no prompt on the record path"
    if sgd_rounds(plan) < 1:
        return False, "the run has no DP-SGD round (round 1 is the class-sums release; a prompt trains by SGD)"
    if not plan.private:  # the reference mode: its prompt rounds lost to the head's (BENCHMARKS.md "prompt")
        return False, "a non-private run (its SGD rounds lost less with the head alone on the public corpus)"
    # The largest noise at which a prompt step is quiet enough, and what the run's SGD steps would cost
    # at it: RDP (an upper bound on PRV's epsilon, and one closed form whatever the steps, so a plan of a
    # million rounds costs no more to judge), against the share of the target the SGD rounds get.
    s = sampling(plan, plan.min_expected_batch / plan.sample_rate)
    values = plan.n_virtual_tokens * plan.hidden_size
    quiet = PROMPT_NOISE_LIMIT * s.expected_batch / math.sqrt(values)
    steps = s.steps_per_round * sgd_rounds(plan)
    budget = plan.target_epsilon * (1 - plan.class_sums_share)
    with warnings.catch_warnings():  # the accountant's notes on its own tightness: not about this plan
        warnings.filterwarnings("ignore", message="Optimal order is the")
        cost = compute_epsilon("rdp", [(quiet, s.sample_rate, steps)], plan.delta or DEFAULT_DELTA)
    verdict = cost <= budget
    return verdict, (
        f"a prompt step is worth its noise at sigma <= {quiet:.3g} ({PROMPT_NOISE_LIMIT:g} x clip x expected batch "
        f"{s.expected_batch:g} / sqrt({values} prompt values)); the run's {steps} DP-SGD steps would cost epsilon "
        f"{cost:.3g} at it, {'within' if verdict else 'above'} the {budget:.3g} the SGD rounds get"
    )


# --- what an honest update can be ------------------------------------------------------------------


def trainable_dim(plan: RoundPlan) -> int:
    """Values DP-SGD noises each step: the head, and the prompt if it is trained."""
    head = len(plan.labels) * (plan.hidden_size + 1)
    return head + (plan.n_virtual_tokens * plan.hidden_size if plan.train_prompt else 0)


def _poisson_excess(mean: float) -> float:
    """t with P(Binomial sum >= mean + t) <= e^-TAIL (Chernoff: exp(-t^2 / (2 (mean + t / 3))))."""
    return TAIL / 3 + math.sqrt((TAIL / 3) ** 2 + 2 * TAIL * mean)


def sgd_signal(plan: RoundPlan, s: Sampling) -> float:
    """Bound (in units of lr x clip) on the clipped-gradient part of a round's SGD update: per step the
    sum of at most |batch| clipped gradients over the expected batch; the batches of a round hold at
    most MAX_UNITS_PER_DECLARED x declared x steps units, and (w.h.p.) not much over their mean."""
    r, t = MAX_UNITS_PER_DECLARED, s.steps_per_round
    mean = t * r * s.expected_batch
    return min(t * r / s.sample_rate, (mean + _poisson_excess(mean)) / s.expected_batch)


def sgd_noise(plan: RoundPlan, s: Sampling, sigma: float) -> float:
    """Bound (same units) on the noise part: the sum of the round's steps' Gaussian noise over the expected batch."""
    return (
        sigma * math.sqrt(s.steps_per_round) * (math.sqrt(trainable_dim(plan)) + math.sqrt(2 * TAIL)) / s.expected_batch
    )


def class_sums_signal() -> float:
    """||S / declared||: unit-norm features summed per class have Frobenius norm <= units <= r x declared."""
    return MAX_UNITS_PER_DECLARED


def class_sums_noise(plan: RoundPlan, declared_size: float, sigma: float) -> float:
    return sigma * (math.sqrt(len(plan.labels) * plan.hidden_size) + math.sqrt(2 * TAIL)) / declared_size


def noise_ratio(plan: RoundPlan, declared_size: float, noise: RunNoise) -> float:
    """The site's noise bound over its signal bound, in the noisier of the run's phases: above the
    plan's `max_noise_ratio` its updates would be mostly noise, and the site refuses the whole run
    before spending anything (the pre-flight asks the same)."""
    ratios = []
    if noise.class_sums is not None:
        ratios.append(class_sums_noise(plan, declared_size, noise.class_sums) / class_sums_signal())
    if noise.sgd is not None:
        s = sampling(plan, declared_size)
        ratios.append(sgd_noise(plan, s, noise.sgd) / sgd_signal(plan, s))
    return max(ratios, default=0.0)


def update_bound(plan: RoundPlan, declared_size: float, global_norm: float) -> float:
    """The largest L2 norm of (update - global) an honest site of this declared size can send this round
    (with probability >= 1 - e^-TAIL): its signal bound plus noise up to `max_noise_ratio` times it (a
    noisier site refuses). `global_norm`: the norm of the global tensors the class sums replace."""
    if class_sums_round(plan):
        return global_norm + (1 + plan.max_noise_ratio) * class_sums_signal()
    s = sampling(plan, declared_size)
    if plan.optimizer == "adam":  # the step is bounded per coordinate, whatever the gradient
        return plan.lr * ADAM_STEP * s.steps_per_round * math.sqrt(trainable_dim(plan))
    return plan.lr * plan.max_grad_norm * (1 + plan.max_noise_ratio) * sgd_signal(plan, s)


def largest_update_bound(plan: RoundPlan, global_norm: float) -> float:
    """The largest honest bound over every declared size and both phases: what a fixed
    `update_norm_bound` must reach. The SGD bound peaks where the sample rate stops being raised
    (declared size min_expected_batch / sample_rate); a fixed batch_size has no such peak (the steps of
    a round grow with the site), so only the derived per-reply bound fits it."""
    if plan.batch_size:
        return math.inf
    first = plan.model_copy(update={"round": 1})
    later = plan.model_copy(update={"round": 2})
    sizes = [plan.min_expected_batch / plan.sample_rate, *(2.0**k for k in range(-2, 31))]
    sgd = max(update_bound(later, w, global_norm) for w in sizes)
    return max(sgd, update_bound(first, 1.0, global_norm)) if plan.class_sums_share > 0 else sgd
