"""`fedprompt audit`: an empirical lower bound on this site's epsilon, from throwaway runs of its own rounds.

The one-run audit of Steinke, Nasr and Jagielski (2023, arXiv 2305.08846): m canaries, each put
into the training set independently with probability 1/2; train once; score every canary; guess
"in" for the k highest scores and "out" for the k lowest (r = 2k guesses, v of them right). A
mechanism that is (eps, delta)-DP cannot make v large: `epsilon_lower_bound` turns (m, r, v) into
the largest eps that the guesses rule out at 95% confidence.

What is audited is what ships: every round of the run goes through the hospital's own
`client/hospital.train_round`, on a throwaway copy of the site (a temporary folder, deleted at the
end): the site's records plus the included canaries, its site.yaml (cap, delta, accountant, minimum
noise, DP unit, evaluation sharing, limits) with an empty ledger of its own and the site's declared
size pinned. So the audited run has the site's sampling, calibration, ledger charges, patient
grouping (with `patient_field` each canary is a patient of its own), the class-sums release of a
run that has one, DP-SGD through `local_update`, and the validation of the model received (and its
noised release, charged, with `share_evaluation: noised`). The site is audited as if it were the
only hospital (the global model after each round is its own reply): every update it sends is then
seen whole, the strongest position for an adversary watching the wire. A one-shot run (the default:
one Gaussian release of the class sums) has no DP-SGD rounds: the DP-SGD of a 20-round run at the
same target is audited instead. The copy calibrates as a site with nothing spent yet.

Design (white-box, chosen because it is the strongest available and costs one head training per run):
  canaries  records whose frozen feature (the encoder's output, which train_round reads from
            common/features' cache) is set to R x e_i (R = CANARY_NORM = 2; a real record's feature
            has norm 1), with a random label y_i: DP must hold whatever the feature map, so a
            canary may have any feature. The unit vectors e_i are orthonormal (one canary per
            direction) and lie where the site's records have the least energy: the lowest principal
            directions of its features, after removing the initial head's rows, so the initial head
            is exactly uniform on every canary and neither the records' updates nor the other
            canaries move a canary's score. At R = 2 a canary's gradient (norm about 2) exceeds the
            clipping norm C = 1, as a confidently misclassified record's does: clipping binds. m is at
            most 2/3 of the free feature dimensions (252 for a 384-wide backbone and 5 labels), and
            at most the units the site may add under its declared size (2x); the default is 250.
  score     the head's total update on the canary's gradient direction at the initial head:
            s_i = <W_final - W_initial, u_i>, u_i = (onehot(y_i) - 1/C) x e_i normalised (the bias
            is left out: every record moves it).
  guesses   k = GUESS_FRACTION x m on each side (m 250 -> r 100), fixed before training, as the
            bound requires (choosing k after seeing the scores would void the 95%).

It never opens the site's ledger (it spends nothing), reads the site's noise memo if there is one
(public calibrations) but never writes it, writes nothing outside its temporary folder and sends
nothing. Canary directions and memberships come from OS entropy (tests pass a seed); the noise, as
at the site, from the OS's CSPRNG.

Runs (the same canaries and scoring, a fresh membership draw each; every one through train_round):
  private         the site's run as calibrated;
  sigma / 2, / 4  the power table: the noise drawn at half and a quarter of its calibrated std
                  while the ledger charges the calibrated sigma (client/secure_noise.weakened), the
                  noise bug the audit must see, at two sizes;
  noise_100x_low  control: the same at a hundredth (a noise divided by the expected batch twice at a
                  site whose expected batch is 100);
  no_dp           control: the plan non-private (no noise, no clipping; the copy allows it).
  Not a control: "clipping off, noise unchanged". On this recipe a canary whose gradient exceeds C
  is fitted within one or two unclipped steps, after which its gradient vanishes, so the released
  head moves about as far on it as under clipping. The audit cannot see that bug reliably;
  selftest's zero-noise step check (clip-and-average against a manual computation) catches it.
A working audit gives both controls a bound at least CLEAR_MARGIN (1.0) above the private run's.

Reading the result. The audit detects privacy bugs; it cannot certify an epsilon. Its ceiling (all
r guesses right) is about 1.8 / 2.8 / 3.5 / 4.2 for r = 20 / 50 / 100 / 200 at delta 1e-5: a site
whose accounted epsilon is 8 cannot be shown to be worse than 8, but a missing or tiny noise shows
up as a bound at the ceiling, far above a correct run's. The power table says how large a noise bug
it sees: a run counts as told apart when its bound is CLEAR_MARGIN above the private run's
(docs/privacy.md has the figures measured on a 160-record site). It passes (exit 0) when the private
bound is at most the accounted epsilon AND both controls exceed it by CLEAR_MARGIN; else it fails
(exit 4). A correct implementation can still fail, rarely (the bound holds at 95%): rerun; a
repeated failure is a bug.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from flwr.app import RecordDict
from scipy.stats import binom
from torch.utils.data import TensorDataset

from fedprompt.common.config import FederationConfig, SiteConfig
from fedprompt.common.errors import InputError
from fedprompt.common.features import cached_features, remember_features
from fedprompt.common.model import HEAD_WEIGHT_KEY, build_model
from fedprompt.common.plan import RoundPlan, initial_global_state_for, prompt_config
from fedprompt.common.records import Records, load_labelled
from fedprompt.common.schedule import MAX_UNITS_PER_DECLARED, sgd_rounds
from fedprompt.common.wire import ARRAYS, CONFIG, STATUS, Status, arrays_to_state, state_to_arrays

from .hospital import _noise_memo, cached_backbone, declared_size, dp_units, encoded_records, train_round
from .ledger import PrivacyLedger, file_sha256
from .secure_noise import weakened
from .trainer import resolve_device

BETA = 0.05  # the bound holds with probability 1 - BETA
DEFAULT_CANARIES = 250
MIN_CANARIES = 10
GUESS_FRACTION = 0.2  # k = 0.2 m guesses on each side: r = 0.4 m
CANARY_NORM = 2.0  # R: a canary's feature norm (real features are unit vectors when normalised)
CLEAR_MARGIN = 1.0  # a control must beat the private run's bound by this much
NOISE_REDUCTION = 100.0  # the "broken" control: sigma / 100
MAX_DIRECTION_SHARE = 2 / 3  # canaries may use at most this share of the feature dimensions left
EXIT_AUDIT_FAILED = 4

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


# --- the site's own rounds on a throwaway copy ---------------------------------------------------
AUDIT_SGD_ROUNDS = 20  # the DP-SGD rounds audited when the federation's own run has none
HALF, QUARTER = "sigma_over_2", "sigma_over_4"
# Each run and the factor its noise is drawn at (secure_noise.weakened) while the ledger charges the
# calibrated sigma; None: a non-private run (the plan says so, the copy allows it). The private run
# first: the others are judged against it.
RUNS: dict[str, float | None] = {PRIVATE: 1.0, HALF: 0.5, QUARTER: 0.25, LOW_NOISE: 1 / NOISE_REDUCTION, NO_DP: None}
RUN_TITLES.update({HALF: "power: noise sigma / 2", QUARTER: "power: noise sigma / 4"})
CONTROLS = (NO_DP, LOW_NOISE)
POWER = (PRIVATE, HALF, QUARTER)


@dataclass
class AuditRun:
    name: str
    title: str
    noise_scale: float | None  # the factor on the calibrated noise (None: no noise, no clipping)
    m: int
    r: int
    v: int
    included: int
    epsilon_lower_bound: float
    accounted_epsilon: float | None  # the copy's ledger after the run (None: non-private, infinite)
    rounds: int
    seconds: float


@dataclass
class AuditSite:
    """What every audit run starts from (prepare_site): the site as configured, the run's plan, its
    round-0 tensors, and its own records with their frozen features (encoded once)."""

    site: SiteConfig
    plan: RoundPlan
    state: dict[str, torch.Tensor]
    records: Records
    features: torch.Tensor  # (records, hidden)
    declared_size: float
    device: torch.device
    canaries: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.state[HEAD_WEIGHT_KEY].detach().float().cpu()


def _generator(seed: int | None) -> torch.Generator:
    from .dp import entropy_generator

    if seed is None:
        return entropy_generator()
    return torch.Generator().manual_seed(seed)


def _write_copy(base: AuditSite, folder: Path, canaries: Canaries, included: torch.Tensor, private: bool) -> Path:
    """A throwaway copy of the site in `folder`: its records plus the included canaries (each its own
    patient), its own empty ledger, the site's declared size pinned (canaries change neither q nor the
    public divisor), non-private allowed only for the no-DP control. Returns its site.yaml."""
    recs, labels, site = base.records, base.plan.labels, base.site
    chosen = torch.nonzero(included).flatten().tolist()
    texts = recs.texts + [f"audit canary {i}" for i in chosen]
    ys = recs.labels + [int(canaries.labels[i]) for i in chosen]
    rows = [{site.text_field: text, site.label_field: labels[y]} for text, y in zip(texts, ys, strict=True)]
    if site.patient_field is not None:
        patients = (recs.patients or []) + [f"audit-canary-{i}" for i in chosen]
        for row, patient in zip(rows, patients, strict=True):
            row[site.patient_field] = patient
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    data = site.model_dump(mode="json")
    data.update(
        train=str(train),
        ledger=str(folder / "ledger.json"),
        ledger_anchor=None,
        test=None,
        weight=base.declared_size,
        allow_non_private=not private,
    )
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _seed_features(base: AuditSite, site_path: Path, canaries: Canaries, included: torch.Tensor) -> None:
    """The copy's records as train_round encodes them, their frozen features set: the site's own as
    its encoder computed them, each canary's its direction x R (white-box canaries)."""
    site = SiteConfig.load(site_path)
    backbone = cached_backbone(str(site.backbone) if site.backbone else None)
    _, encoded = encoded_records(site.train, file_sha256(site.train), site, base.plan, backbone, patients=True)
    labels = encoded.dataset.tensors[-1]
    n = len(base.records)
    if not torch.equal(labels[:n], torch.tensor(base.records.labels)):
        raise RuntimeError("the audit's copy of the records does not read back as the site's")
    model = build_model(backbone, base.plan.prompt_config(), base.state)
    features = TensorDataset(torch.cat([base.features, canaries.features[included]]), labels)
    remember_features(model, encoded.dataset, base.device, features)


def _train_rounds(
    site_path: Path, plan: RoundPlan, state: dict[str, torch.Tensor], origin: Path | None
) -> dict[str, torch.Tensor]:
    """The run's rounds through the product's train_round on the copy at `site_path`, the site alone
    (the global model after a round is its own reply). A refusal is the site's (`origin`) answer to
    this plan: InputError."""
    for round_ in range(1, plan.total_rounds + 1):
        content = RecordDict({ARRAYS: state_to_arrays(state), CONFIG: plan.replaced(round=round_).to_config_record()})
        reply = train_round(content, site_path, run_id="audit")
        status = Status.model_validate(dict(reply.config_records[STATUS]))
        if status.status != "ok":
            raise InputError.at(
                origin or site_path,
                f"this site refuses round {round_} of the audited run [{status.reason}] (the reason is logged "
                "above): the audit trains only what the site would",
            )
        state = {**state, **arrays_to_state(reply.array_records[ARRAYS])}
    return state


def audit_run(
    name: str, base: AuditSite, canaries: Canaries, generator: torch.Generator, folder: Path, memo: Path | None
) -> AuditRun:
    """Draw the canaries' membership, train the run on a copy of the site with them (train_round, every
    round), score the head it released last, guess. `memo`: a noise memo to start from (public
    calibrations: the site's, or the previous run's), so that each run does not calibrate again."""
    t0 = time.perf_counter()
    scale = RUNS[name]
    m = len(canaries)
    included = torch.rand(m, generator=generator) < 0.5
    folder.mkdir()
    site_path = _write_copy(base, folder, canaries, included, private=scale is not None)
    site = SiteConfig.load(site_path)
    PrivacyLedger.create_for_site(site)
    if memo is not None and memo.is_file():
        shutil.copyfile(memo, _noise_memo(site).path)
    _seed_features(base, site_path, canaries, included)
    plan = base.plan if scale is not None else base.plan.replaced(private=False)
    with warnings.catch_warnings(), weakened(1.0 if scale is None else scale):
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        state = _train_rounds(site_path, plan, base.state, base.site.source)
    delta_w = state[HEAD_WEIGHT_KEY].detach().float().cpu() - base.head_weight
    k = guesses_for(m) // 2
    r, v = count_correct(canary_scores(delta_w, canaries), included, k)
    return AuditRun(
        name=name,
        title=RUN_TITLES[name],
        noise_scale=scale,
        m=m,
        r=r,
        v=v,
        included=int(included.sum()),
        epsilon_lower_bound=epsilon_lower_bound(m, r, v, base.site.privacy.delta),
        accounted_epsilon=PrivacyLedger.for_site(site).epsilon_spent() if scale is not None else None,
        rounds=plan.total_rounds,
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


def power_table(runs: dict[str, AuditRun], margin: float = CLEAR_MARGIN) -> list[dict]:
    """The audit's bound with the noise as calibrated, halved and quartered (charged as calibrated), and
    whether the audit tells each apart from the private run, as it asks of its controls."""
    threshold = runs[PRIVATE].epsilon_lower_bound + margin
    return [
        {
            "run": name,
            "noise_scale": runs[name].noise_scale,
            "epsilon_lower_bound": runs[name].epsilon_lower_bound,
            "detected": name != PRIVATE and runs[name].epsilon_lower_bound >= threshold,
        }
        for name in POWER
        if name in runs
    ]


def _charges(site_path: Path) -> list[dict]:
    """What the private run's copy was charged, entry by entry kind: (release, sigma, q, steps) x count."""
    counts: dict[tuple, int] = {}
    for e in PrivacyLedger.for_site(SiteConfig.load(site_path)).history:
        key = (
            "evaluation" if e.run_id.endswith("/evaluation") else "training",
            e.noise_multiplier,
            e.sample_rate,
            e.steps,
        )
        counts[key] = counts.get(key, 0) + 1
    return [
        {"release": k[0], "noise_multiplier": k[1], "sample_rate": k[2], "steps": k[3], "entries": n}
        for k, n in counts.items()
    ]


def run_audit(base: AuditSite, *, seed: int | None = None, runs: tuple[str, ...] | None = None) -> dict:
    """The audit of `base` (prepare_site): the private run, its power runs and controls (`runs`, default
    every one of RUNS), the verdict. JSON-safe."""
    gen = _generator(seed)
    canary_set = make_canaries(base.features, base.head_weight, base.canaries, gen)
    results: dict[str, AuditRun] = {}
    with tempfile.TemporaryDirectory(prefix="fedprompt-audit-") as tmp:
        memo = _noise_memo(base.site).path
        for name in runs or tuple(RUNS):
            results[name] = audit_run(name, base, canary_set, gen, Path(tmp) / name, memo)
            memo = _noise_memo(SiteConfig.load(Path(tmp) / name / "site.yaml")).path
        charges = _charges(Path(tmp) / PRIVATE / "site.yaml") if PRIVATE in results else []
    private = results[PRIVATE].epsilon_lower_bound if PRIVATE in results else 0.0
    accounted = results[PRIVATE].accounted_epsilon if PRIVATE in results else None
    controls = {n: results[n].epsilon_lower_bound for n in CONTROLS if n in results}
    passed, reasons = verdict(accounted or 0.0, private, controls)
    m, r, delta = base.canaries, guesses_for(base.canaries), base.site.privacy.delta
    plan = base.plan
    return {
        "accounted_epsilon": accounted,
        "target_epsilon": min(plan.target_epsilon, base.site.privacy.max_epsilon),
        "delta": delta,
        "dp_unit": "record" if base.site.patient_field is None else "patient",
        "beta": BETA,
        "canaries": m,
        "guesses": r,
        "ceiling": epsilon_lower_bound(m, r, r, delta),
        "clear_margin": CLEAR_MARGIN,
        "plan": {
            "rounds": plan.total_rounds,
            "sgd_rounds": sgd_rounds(plan),
            "class_sums_share": plan.class_sums_share,
            "local_epochs": plan.local_epochs,
            "lr": plan.lr,
            "optimizer": plan.optimizer,
            "max_grad_norm": plan.max_grad_norm,
            "evaluate_in_train": plan.evaluate_in_train,
            "share_evaluation": base.site.share_evaluation,
        },
        "declared_size": base.declared_size,
        "charges": charges,
        "num_records": len(base.records),
        "canary_design": {"norm": CANARY_NORM, "record_energy_in_canary_subspace": canary_set.record_energy},
        "runs": {name: asdict(res) for name, res in results.items()},
        "power": power_table(results) if PRIVATE in results else [],
        "detection_threshold": private + CLEAR_MARGIN,
        "passed": passed,
        "reasons": reasons,
    }


# --- at a site ---------------------------------------------------------------------------------
def resolve_canaries(canaries: int | None, hidden: int, num_labels: int, room: int) -> int:
    """The number of canaries: as asked (InputError if it does not fit), or the default that fits.
    `room`: how many units the site may add before it holds more than its declared size allows."""
    capacity = min(canary_capacity(hidden, num_labels), room)
    why = f"this backbone ({hidden} features, {num_labels} labels) and this site's declared size"
    if canaries is None:
        canaries = min(DEFAULT_CANARIES, capacity)
        if canaries < MIN_CANARIES:
            raise InputError.at(
                "--canaries", f"{why} leave room for {capacity} canaries; the audit needs at least {MIN_CANARIES}"
            )
    elif canaries < MIN_CANARIES:
        raise InputError.at("--canaries", f"expected at least {MIN_CANARIES} canaries, got {canaries}")
    elif canaries > capacity:
        raise InputError.at("--canaries", f"{canaries} canaries do not fit {why}: at most {capacity}")
    return canaries


def _federation(site: SiteConfig, federation_path: str | Path | None, epsilon: float | None) -> FederationConfig:
    """federation.yaml as received, or the federation's defaults over the labels the site's records hold."""
    if federation_path is not None:
        if not Path(federation_path).is_file():
            raise InputError.at(federation_path, "federation file not found")
        fed = FederationConfig.load(federation_path)
    else:
        _, labels = load_labelled(site.train, text_field=site.text_field, label_field=site.label_field)
        if len(labels) < 2:
            raise InputError.at(
                site.train,
                f"only one label ({labels[0]!r}): pass --federation for the label space",
                field=site.label_field,
            )
        fed = FederationConfig(name="audit", labels=list(labels))
    if epsilon is not None:
        fed = fed.replaced(privacy=fed.privacy.replaced(target_epsilon=epsilon, origin="--epsilon"))
    return fed


def prepare_site(
    site_path: str | Path,
    *,
    federation_path: str | Path | None = None,
    epsilon: float | None = None,
    canaries: int | None = None,
) -> AuditSite:
    """Load the site, its records (as train_round reads them) and backbone, the run's plan and round-0
    tensors, and the records' frozen features. Reads files only; writes none."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    site_path = Path(site_path)
    if not site_path.is_file():
        raise InputError.at(site_path, "site file not found" if not site_path.exists() else "not a file")
    site = SiteConfig.load(site_path)
    fed = _federation(site, federation_path, epsilon)
    backbone = cached_backbone(str(site.backbone) if site.backbone else None)
    state = initial_global_state_for(fed, backbone)
    plan = RoundPlan.for_run(fed, prompt_config(fed, backbone))
    if plan.train_prompt:
        raise InputError.at(
            fed.source or "federation.yaml",
            "this run trains the soft prompt; the audit covers the head-only recipe (train_prompt: false)",
            field="training.train_prompt",
        )
    if sgd_rounds(plan) == 0:
        # A one-shot run (the default) has no DP-SGD rounds: audit the DP-SGD a longer run would train,
        # at the run's whole target. (The one-shot release is one Gaussian mechanism of sensitivity 1:
        # tests/test_schedule.py checks its clipping.)
        plan = plan.replaced(total_rounds=AUDIT_SGD_ROUNDS, class_sums_share=0.0)
    records, encoded = encoded_records(site.train, file_sha256(site.train), site, plan, backbone, patients=True)
    size = declared_size(site, dp_units(records))
    room = int(MAX_UNITS_PER_DECLARED * size) - dp_units(records)  # every canary included, at worst
    canaries = resolve_canaries(canaries, backbone.hidden_size, len(plan.labels), room)  # before the features
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    device = resolve_device(site.device)
    model = build_model(backbone, plan.prompt_config(), state)
    features = cached_features(model, encoded.dataset, device).tensors[0]
    timings["features"] = time.perf_counter() - t
    return AuditSite(site, plan, state, records, features, size, device, canaries, timings)


def audit_site(
    site_path: str | Path,
    *,
    federation_path: str | Path | None = None,
    canaries: int | None = None,
    epsilon: float | None = None,
    seed: int | None = None,
) -> dict:
    """The whole audit at one site (see the module docstring). JSON-safe report."""
    base = prepare_site(site_path, federation_path=federation_path, epsilon=epsilon, canaries=canaries)
    t = time.perf_counter()
    report = run_audit(base, seed=seed)
    base.timings["audit"] = time.perf_counter() - t
    return {"hospital_id": base.site.hospital_id, "labels": base.plan.labels, **report, "seconds": base.timings}
