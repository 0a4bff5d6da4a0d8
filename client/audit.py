"""`fedprompt audit`: an empirical lower bound on this site's epsilon, from one throwaway training run.

The one-run audit of Steinke, Nasr and Jagielski (2023, arXiv 2305.08846): m canaries, each put
into the training set independently with probability 1/2; train once; score every canary; guess
"in" for the k highest scores and "out" for the k lowest (r = 2k guesses, v of them right). A
mechanism that is (eps, delta)-DP cannot make v large: `epsilon_lower_bound` turns (m, r, v) into
the largest eps that the guesses rule out at 95% confidence.

What is audited is the federation's default private recipe exactly as a hospital trains it: the
head (one Linear layer) trained with DP-SGD on the frozen features of the round-0 model, through
`client/trainer.train` (Opacus: Poisson sampling, per-sample clipping at C, Gaussian noise
sigma x C), `local_epochs` per round for the run's SGD rounds, with sigma calibrated as the site calibrates
it for a run (`client/hospital.site_run`: the target epsilon capped by the site's cap, the
site's delta and accountant, its minimum noise, the class-sums release's share composed in; the
one-shot release itself is not audited here). The site is audited as if it were the only
hospital (the global model after each round is its own head): every update it sends is then seen
whole, the strongest position for an adversary watching the wire.

Design (white-box, chosen because it is the strongest available and costs one head training per run):
  canaries  synthetic feature vectors R x e_i (R = CANARY_NORM = 2; a real record's feature has norm 1)
            with a random label y_i. The unit vectors e_i are orthonormal (one canary per direction)
            and lie where the site's records have the least energy: the lowest principal directions
            of its features, after removing the initial head's rows, so the initial head is exactly
            uniform on every canary and neither the records' updates nor the other canaries move a
            canary's score. At R = 2 a canary's gradient (norm about 2) exceeds the clipping norm
            C = 1, as a confidently misclassified record's does: clipping binds. m is at most 2/3 of the free feature
            dimensions (252 for a 384-wide backbone and 5 labels); the default is 250.
  score     the head's total update on the canary's gradient direction at the initial head:
            s_i = <W_final - W_initial, u_i>, u_i = (onehot(y_i) - 1/C) x e_i normalised (the bias
            is left out: every record moves it). A black-box score (the canary's loss relative to
            the initial head) follows the same projection here, the head being linear and the
            canaries orthogonal; the white-box form is free of the bias drift.
  guesses   k = GUESS_FRACTION x m on each side (m 250 -> r 100), fixed before training, as the
            bound requires (choosing k after seeing the scores would void the 95%).

The command runs on the site's own records plus these canaries, on copies of the initial head: it
never opens the privacy ledger (it spends nothing; it reads the site's noise memo if there is one,
never writes it), writes no file and sends nothing. Randomness (membership, canary directions,
Opacus's sampling and noise) comes from OS entropy; tests pass a seed.

Positive controls (the same canaries and scoring, a fresh membership draw each):
  no_dp           no noise and no clipping (TrainSettings.noise_multiplier=None: the trainer's
                  labelled non-private mode);
  noise_100x_low  clipping as configured, noise multiplier sigma / 100: a noise-scale bug (noise
                  divided by the expected batch size twice is exactly this at a site whose expected
                  batch is 100, i.e. 400 records at q = 0.25).
  Not a control: "clipping off, noise unchanged". On this recipe a canary whose gradient exceeds C
  is fitted within one or two unclipped steps, after which its gradient vanishes, so the released
  head moves about as far on it as under clipping: measured on the tiny test site, 1.0-1.5 against
  0.2-0.7 for the private run. The audit cannot see that bug reliably; selftest's zero-noise
  step check (clip-and-average against a manual computation) is what catches it.
A working audit gives both controls a bound at least CLEAR_MARGIN (1.0) above the private run's.

Reading the result. The audit detects privacy bugs; it cannot certify an epsilon. Its ceiling (all
r guesses right) is about 1.8 / 2.8 / 3.5 / 4.2 for r = 20 / 50 / 100 / 200 at delta 1e-5: a site
whose accounted epsilon is 8 cannot be shown to be worse than 8, but a missing or tiny noise shows
up as a bound at the ceiling, far above a correct run's (measured with the real backbone on
medical-abstracts sites of 356 and 500 records at epsilon 8: private 0.9-1.3, both controls 3.49,
the ceiling for m = 250). It passes
(exit 0) when the private bound is at most the accounted epsilon AND both controls exceed it by
CLEAR_MARGIN; else it fails (exit 4, ExitCode.AUDIT_FAILED). A correct implementation can still fail, rarely (the bound
holds at 95%): rerun; a repeated failure is a bug.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binom
from torch.utils.data import TensorDataset

from fedprompt.common.errors import InputError

from .trainer import HEAD_PHYSICAL_BATCH, TrainSettings, train

BETA = 0.05  # the bound holds with probability 1 - BETA
DEFAULT_CANARIES = 250
MIN_CANARIES = 10
GUESS_FRACTION = 0.2  # k = 0.2 m guesses on each side: r = 0.4 m
CANARY_NORM = 2.0  # R: a canary's feature norm (real features are unit vectors when normalised)
CLEAR_MARGIN = 1.0  # a control must beat the private run's bound by this much
NOISE_REDUCTION = 100.0  # the "broken" control: sigma / 100
MAX_DIRECTION_SHARE = 2 / 3  # canaries may use at most this share of the feature dimensions left

PRIVATE, NO_DP, LOW_NOISE = "private", "no_dp", "noise_100x_low"
RUN_TITLES = {
    PRIVATE: "private (as the site trains)",
    NO_DP: "control: no noise, no clipping",
    LOW_NOISE: "control: noise 100x too small",
}


# --- the bound ---------------------------------------------------------------------------------
def _p_value(eps: float, m: int, r: int, v: int, delta: float) -> float:
    """Probability bound that r guesses get >= v right under (eps, delta)-DP (Steinke et al., Thm 3)."""
    q = 1.0 / (1.0 + math.exp(-eps))  # e^eps / (1 + e^eps)
    f_v = float(binom.sf(v - 1, r, q))  # f(x) = P[Binomial(r, q) >= x]
    if delta == 0:
        return f_v
    i = np.arange(1, v + 1)
    f_less = binom.sf(v - i - 1, r, q)  # f(v - i)
    return f_v + 2 * m * delta * float(np.max((f_less - f_v) / i))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = BETA) -> float:
    """The largest eps with p(eps) <= beta: m canaries, r guesses, v correct (0 if none is ruled out)."""
    if not (0 <= v <= r <= m) or m < 1:
        raise ValueError(f"expected 0 <= v <= r <= m, m >= 1; got m={m}, r={r}, v={v}")
    if v == 0 or _p_value(0.0, m, r, v, delta) > beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while _p_value(hi, m, r, v, delta) <= beta:
        lo, hi = hi, hi * 2
        if hi > 64:  # v = r with delta 0 would be ruled out for every eps: no finite answer needed
            return lo
    for _ in range(50):  # [lo, hi] narrows to about 1e-14: far below what is printed
        mid = (lo + hi) / 2
        if _p_value(mid, m, r, v, delta) <= beta:
            lo = mid
        else:
            hi = mid
    return lo


def guesses_for(m: int) -> int:
    """r: the number of guesses for m canaries (k = GUESS_FRACTION x m on each side, at least 1)."""
    return 2 * max(1, int(GUESS_FRACTION * m))


def ceiling(m: int, delta: float, beta: float = BETA) -> float:
    """The highest bound this audit can report: every one of its r guesses right."""
    r = guesses_for(m)
    return epsilon_lower_bound(m, r, r, delta, beta)


# --- canaries ----------------------------------------------------------------------------------
@dataclass
class Canaries:
    features: torch.Tensor  # (m, hidden): R x direction
    labels: torch.Tensor  # (m,) the label each is trained with
    directions: torch.Tensor  # (m, hidden) orthonormal unit vectors
    record_energy: float  # share of the site's feature energy in the canaries' subspace

    def __len__(self) -> int:
        return len(self.labels)


def canary_capacity(hidden: int, num_labels: int) -> int:
    """How many canaries a feature space of `hidden` dimensions takes (one per direction, in at
    most MAX_DIRECTION_SHARE of the dimensions left once the initial head's rows are removed)."""
    return max(0, int((hidden - num_labels) * MAX_DIRECTION_SHARE))


def make_canaries(
    features: torch.Tensor, head_weight: torch.Tensor, m: int, generator: torch.Generator, norm: float = CANARY_NORM
) -> Canaries:
    """m canaries on orthonormal directions where the site's `features` (n, hidden) have the least
    energy, orthogonal to the initial head's rows (so the initial head is uniform on them), each
    with a random label."""
    num_labels, hidden = head_weight.shape
    x, w = features.double(), head_weight.double()
    u, s, _ = torch.linalg.svd(w.T, full_matrices=True)  # the complement of the head's rows
    rank = int((s > s.max() * 1e-10).sum()) if s.numel() else 0
    complement = u[:, rank:]  # (hidden, hidden - rank)
    if m > complement.shape[1]:
        raise ValueError(f"{m} canaries need {m} free directions; {complement.shape[1]} are left")
    xc = x @ complement
    evals, evecs = torch.linalg.eigh(xc.T @ xc / max(len(x), 1))  # ascending
    basis = complement @ evecs[:, :m]  # (hidden, m): the records' quietest directions
    total = float((x * x).sum()) / max(len(x), 1)
    energy = float(evals[:m].clamp(min=0).sum()) / total if total > 0 else 0.0
    # A random orthonormal basis of that subspace: no canary sits on one particular eigenvector.
    rot, tri = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    directions = (basis @ (rot * torch.sign(torch.diagonal(tri)))).T.float().contiguous()
    labels = torch.randint(0, num_labels, (m,), generator=generator)
    return Canaries(features=directions * norm, labels=labels, directions=directions, record_energy=energy)


def canary_scores(delta_weight: torch.Tensor, canaries: Canaries) -> torch.Tensor:
    """s_i = <dW, u_i>: the head's total update on canary i's gradient direction at the initial head,
    u_i = (onehot(y_i) - 1/C) x e_i, normalised (the head starts uniform on e_i)."""
    num_labels = delta_weight.shape[0]
    proj = canaries.directions.double() @ delta_weight.double().T  # (m, C): dW[k] . e_i
    own = proj[torch.arange(len(canaries)), canaries.labels]
    if num_labels == 1:
        return own
    return (own - proj.mean(1)) / math.sqrt(1 - 1 / num_labels)


def count_correct(scores: torch.Tensor, included: torch.Tensor, k: int) -> tuple[int, int]:
    """(r, v): guess "in" for the k highest scores, "out" for the k lowest; v of the r = 2k are right."""
    order = torch.argsort(scores, stable=True)
    low, high = order[:k], order[len(order) - k :]
    v = int(included[high].sum()) + int((~included[low]).sum())
    return 2 * k, v


# --- one training run ----------------------------------------------------------------------------
AUDIT_SGD_ROUNDS = 20  # the DP-SGD rounds audited when the federation's own run has none


@dataclass
class Recipe:
    """How the site trains the head for a run (from the federation's settings and the site's cap)."""

    rounds: int
    local_epochs: int
    sample_rate: float  # q, from the site's declared size (common/schedule.sampling)
    expected_batch: float  # the public constant the noisy sums are divided by
    steps_per_round: int
    lr: float
    optimizer: str
    max_grad_norm: float
    proximal_mu: float
    noise_multiplier: float
    delta: float
    accountant: str
    target_epsilon: float  # what sigma was calibrated for (after the site's cap)
    accounted_epsilon: float  # what the accountant charges for the whole run (both phases)

    @property
    def steps(self) -> int:
        return self.rounds * self.steps_per_round


@dataclass
class AuditRun:
    name: str
    title: str
    m: int
    r: int
    v: int
    included: int
    epsilon_lower_bound: float
    noise_multiplier: float | None
    max_grad_norm: float | None
    steps: int
    seconds: float


def _settings(recipe: Recipe, run: str) -> TrainSettings:
    base = TrainSettings(
        epochs=recipe.local_epochs,
        sample_rate=recipe.sample_rate,
        expected_batch=recipe.expected_batch,
        lr=recipe.lr,
        optimizer=recipe.optimizer,
        max_physical_batch_size=HEAD_PHYSICAL_BATCH,
        noise_multiplier=recipe.noise_multiplier,
        max_grad_norm=recipe.max_grad_norm,
        proximal_mu=recipe.proximal_mu,
    )
    if run == NO_DP:
        return replace(base, noise_multiplier=None)
    if run == LOW_NOISE:
        return replace(base, noise_multiplier=recipe.noise_multiplier / NOISE_REDUCTION)
    return base


def _generator(seed: int | None) -> torch.Generator:
    from .dp import entropy_generator

    if seed is None:
        return entropy_generator()
    return torch.Generator().manual_seed(seed)


def audit_run(
    run: str,
    records: TensorDataset,
    head_state: dict[str, torch.Tensor],
    canaries: Canaries,
    recipe: Recipe,
    generator: torch.Generator,
    device: torch.device,
) -> AuditRun:
    """Draw the canaries' membership, train a copy of the initial head for the whole run, score, guess."""
    t0 = time.perf_counter()
    m = len(canaries)
    included = torch.rand(m, generator=generator) < 0.5
    feats, labels = records.tensors
    data = TensorDataset(
        torch.cat([feats.float(), canaries.features[included]]), torch.cat([labels.long(), canaries.labels[included]])
    )
    weight = head_state["weight"]
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(head_state["bias"])
    settings = _settings(recipe, run)
    # Opacus's noise and Poisson sampling (or the non-private shuffle) from this run's own streams.
    noise_gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    sample_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    steps = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        for _ in range(recipe.rounds):  # one site alone: the global head after a round is its own
            steps += train(head, data, settings, device, noise_generator=noise_gen, sample_generator=sample_gen).steps
    delta_w = head.weight.detach().cpu() - weight
    k = (guesses_for(m)) // 2
    r, v = count_correct(canary_scores(delta_w, canaries), included, k)
    return AuditRun(
        name=run,
        title=RUN_TITLES[run],
        m=m,
        r=r,
        v=v,
        included=int(included.sum()),
        epsilon_lower_bound=epsilon_lower_bound(m, r, v, recipe.delta),
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=None if settings.noise_multiplier is None else settings.max_grad_norm,
        steps=steps,
        seconds=time.perf_counter() - t0,
    )


def verdict(
    accounted: float, private: float, controls: dict[str, float], margin: float = CLEAR_MARGIN
) -> tuple[bool, list[str]]:
    """(passed, reasons it failed)."""
    reasons = []
    if private > accounted:
        reasons.append(
            f"the private run's lower bound {private:.3f} exceeds the accounted epsilon {accounted:.3f}: "
            "the training leaks more than it is charged for"
        )
    for name, bound in controls.items():
        if bound < private + margin:
            reasons.append(
                f"control {name} ({bound:.3f}) is not clearly above the private run ({private:.3f} + {margin:g}): "
                "the private run leaks about as much as a broken one, or the audit lacks power"
            )
    return not reasons, reasons


def run_audit(
    records: TensorDataset,
    head_state: dict[str, torch.Tensor],
    recipe: Recipe,
    *,
    canaries: int = DEFAULT_CANARIES,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    runs: tuple[str, ...] = (PRIVATE, NO_DP, LOW_NOISE),
) -> dict:
    """The audit on frozen `records` (features, labels) with the initial head `head_state`
    ({"weight", "bias"}): the private run and its controls, and the verdict. JSON-safe."""
    device = torch.device(device)
    gen = _generator(seed)
    feats = records.tensors[0]
    weight = head_state["weight"].detach().float().cpu()
    head_state = {"weight": weight, "bias": head_state["bias"].detach().float().cpu()}
    canary_set = make_canaries(feats, weight, canaries, gen)
    results = {name: audit_run(name, records, head_state, canary_set, recipe, gen, device) for name in runs}
    private = results[PRIVATE].epsilon_lower_bound if PRIVATE in results else 0.0
    controls = {n: r.epsilon_lower_bound for n, r in results.items() if n != PRIVATE}
    passed, reasons = verdict(recipe.accounted_epsilon, private, controls)
    r = guesses_for(canaries)
    return {
        "accounted_epsilon": recipe.accounted_epsilon,
        "target_epsilon": recipe.target_epsilon,
        "delta": recipe.delta,
        "beta": BETA,
        "canaries": canaries,
        "guesses": r,
        "ceiling": epsilon_lower_bound(canaries, r, r, recipe.delta),
        "clear_margin": CLEAR_MARGIN,
        "recipe": asdict(recipe),
        "num_records": len(records),
        "canary_design": {"norm": CANARY_NORM, "record_energy_in_canary_subspace": canary_set.record_energy},
        "runs": {name: asdict(res) for name, res in results.items()},
        "passed": passed,
        "reasons": reasons,
    }


# --- at a site ---------------------------------------------------------------------------------
@dataclass
class SiteAuditInputs:
    """What `audit_site` prepared: the frozen features, the initial head, the recipe (for tests and the command)."""

    hospital_id: str
    labels: list[str]
    records: TensorDataset
    head_state: dict[str, torch.Tensor]
    recipe: Recipe
    device: torch.device
    canaries: int
    timings: dict[str, float] = field(default_factory=dict)


def resolve_canaries(canaries: int | None, hidden: int, num_labels: int) -> int:
    """The number of canaries: as asked (InputError if it does not fit), or the default that fits."""
    capacity = canary_capacity(hidden, num_labels)
    if canaries is None:
        canaries = min(DEFAULT_CANARIES, capacity)
        if canaries < MIN_CANARIES:
            raise InputError.at(
                "--canaries",
                f"this backbone ({hidden} features, {num_labels} labels) leaves room for {capacity} canaries; "
                f"the audit needs at least {MIN_CANARIES}",
            )
    elif canaries < MIN_CANARIES:
        raise InputError.at("--canaries", f"expected at least {MIN_CANARIES} canaries, got {canaries}")
    elif canaries > capacity:
        raise InputError.at(
            "--canaries",
            f"{canaries} canaries do not fit this backbone ({hidden} features, {num_labels} labels): at most "
            f"{capacity}",
        )
    return canaries


def prepare_site(
    site_path: str | Path,
    *,
    federation_path: str | Path | None = None,
    epsilon: float | None = None,
    canaries: int | None = None,
) -> SiteAuditInputs:
    """Load the site's records and backbone, build the round-0 model and its frozen features, and
    calibrate sigma as the site would for a run. Reads files only; writes none."""
    from fedprompt.common.accounting import compute_epsilon
    from fedprompt.common.backbone import load_backbone
    from fedprompt.common.config import FederationConfig, SiteConfig
    from fedprompt.common.encoding import encode
    from fedprompt.common.features import extract_features
    from fedprompt.common.model import HEAD_BIAS_KEY, HEAD_WEIGHT_KEY, build_model
    from fedprompt.common.plan import RoundPlan, prompt_config
    from fedprompt.common.records import load_labelled, load_records
    from fedprompt.common.schedule import sgd_rounds
    from fedprompt.common.zeroshot import initial_global_state

    from .hospital import site_run
    from .trainer import resolve_device

    timings: dict[str, float] = {}
    t = time.perf_counter()
    site_path = Path(site_path)
    if not site_path.is_file():
        raise InputError.at(site_path, "site file not found" if not site_path.exists() else "not a file")
    site = SiteConfig.load(site_path)
    if federation_path is not None:
        if not Path(federation_path).is_file():
            raise InputError.at(federation_path, "federation file not found")
        fed = FederationConfig.load(federation_path)
        records = load_records(
            site.train, text_field=site.text_field, label_field=site.label_field, labels=fed.label_names
        )
    else:  # the federation's defaults over the label space the site's records hold
        records, labels = load_labelled(site.train, text_field=site.text_field, label_field=site.label_field)
        if len(labels) < 2:
            raise InputError.at(
                site.train,
                f"only one label ({labels[0]!r}): pass --federation for the label space",
                field=site.label_field,
            )
        fed = FederationConfig(name="audit", labels=list(labels))
    if fed.training.train_prompt:
        raise InputError.at(
            fed.source or "federation.yaml",
            "the audit covers the head-only recipe (train_prompt: false)",
            field="training.train_prompt",
        )
    if epsilon is not None:
        fed = fed.replaced(privacy=fed.privacy.replaced(target_epsilon=epsilon, origin="--epsilon"))
    backbone = load_backbone(site.backbone)
    canaries = resolve_canaries(canaries, backbone.hidden_size, len(fed.label_names))  # before the minute of features
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    config = prompt_config(fed, backbone)
    if fed.model.backbone_fingerprint and fed.model.backbone_fingerprint != backbone.fingerprint:
        raise InputError.at(
            fed.source or "federation.yaml",
            f"pinned backbone {fed.model.backbone_fingerprint[:16]}... but this site's is "
            f"{backbone.fingerprint[:16]}...",
            field="model.backbone_fingerprint",
        )
    state = initial_global_state(
        backbone, config, label_texts=fed.label_texts, head_init=fed.model.head_init, logit_scale=fed.model.logit_scale
    )
    device = resolve_device(site.device)
    model = build_model(backbone, config, state)
    encoded = encode(backbone.tokenizer, records.texts, records.labels, config.max_length)
    feats = extract_features(model, encoded.dataset, device)
    timings["features"] = time.perf_counter() - t

    t = time.perf_counter()
    plan = RoundPlan.for_run(fed, config)
    if sgd_rounds(plan) == 0:
        # A one-shot run (the default) has no DP-SGD rounds: audit the DP-SGD a longer run would train,
        # at the run's whole target. (The one-shot release is one Gaussian mechanism of sensitivity 1:
        # tests/test_schedule.py checks its clipping.)
        plan = plan.replaced(total_rounds=AUDIT_SGD_ROUNDS, class_sums_share=0.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        # the run's SGD phase is what the audit trains (the memo is read, never written)
        run = site_run(site, plan, len(feats))
        assert run.noise is not None and run.noise.sgd is not None  # a private plan with SGD rounds
        sigma, delta = run.noise.sgd, run.delta
        accounted = compute_epsilon(site.privacy.accountant, run.noise.history(run.sampling, sgd_rounds(plan)), delta)
    timings["calibration"] = time.perf_counter() - t
    recipe = Recipe(
        rounds=sgd_rounds(plan),
        local_epochs=plan.local_epochs,
        sample_rate=run.sampling.sample_rate,
        expected_batch=run.sampling.expected_batch,
        steps_per_round=run.sampling.steps_per_round,
        lr=plan.lr,
        optimizer=plan.optimizer,
        max_grad_norm=plan.max_grad_norm,
        proximal_mu=plan.proximal_mu,
        noise_multiplier=sigma,
        delta=delta,
        accountant=site.privacy.accountant,
        target_epsilon=run.target_epsilon,
        accounted_epsilon=accounted,
    )
    head = {"weight": state[HEAD_WEIGHT_KEY], "bias": state[HEAD_BIAS_KEY]}
    return SiteAuditInputs(site.hospital_id, fed.label_names, feats, head, recipe, device, canaries, timings)


def audit_site(
    site_path: str | Path,
    *,
    federation_path: str | Path | None = None,
    canaries: int | None = None,
    epsilon: float | None = None,
    seed: int | None = None,
) -> dict:
    """The whole audit at one site (see the module docstring). JSON-safe report."""
    inputs = prepare_site(site_path, federation_path=federation_path, epsilon=epsilon, canaries=canaries)
    t = time.perf_counter()
    report = run_audit(
        inputs.records, inputs.head_state, inputs.recipe, canaries=inputs.canaries, seed=seed, device=inputs.device
    )
    inputs.timings["audit"] = time.perf_counter() - t
    return {"hospital_id": inputs.hospital_id, "labels": inputs.labels, **report, "seconds": inputs.timings}
