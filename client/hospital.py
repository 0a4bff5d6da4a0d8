"""One hospital's side of a round: checks, privacy accounting, local training, the reply.

Every refusal (bad records, budget spent, backbone mismatch, ...) is a well-formed reply that
names only a category (common/wire.REFUSAL_CATEGORIES); the detail (file, line, label, path)
goes to the hospital's own log. Unexpected failures become an "internal" refusal in
client/client_app.py. Training loss, record counts, truncation and validation metrics are
logged here and never sent (docs/deployment.md section 5).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from flwr.app import RecordDict

from fedprompt.common.accounting import calibrate_noise, compute_epsilon
from fedprompt.common.backbone import Backbone, load_backbone
from fedprompt.common.config import SiteConfig
from fedprompt.common.encoding import Encoded, encode
from fedprompt.common.errors import InputError, LedgerError, PrivacyBudgetExceeded
from fedprompt.common.features import cached_features, group_by_patient
from fedprompt.common.metrics import ClassCounts, evaluate
from fedprompt.common.model import PromptClassifier, build_model
from fedprompt.common.plan import RoundPlan
from fedprompt.common.records import Records, load_records, redacted
from fedprompt.common.schedule import (
    MAX_UNITS_PER_DECLARED,
    Release,
    RunNoise,
    Sampling,
    calibrate_run,
    class_sums_round,
    fit_to_budget,
    grouped,
    noise_ratio,
    round_mechanism,
    run_releases,
    sampling,
)
from fedprompt.common.wire import (
    ARRAYS,
    Counts,
    EvaluateReply,
    LedgerChain,
    Status,
    TrainMetrics,
    TrainReply,
    arrays_to_state,
    refusal,
    state_to_arrays,
)

from .class_sums import noisy_class_sums
from .dp import NoiseMemo
from .ledger import PrivacyLedger, file_sha256, state_sha256
from .limits import check_limits, check_received
from .secure_noise import gaussian
from .trainer import PATIENT_INPUT_PROMPT, local_update, resolve_device
from .workspace import declared_weight

log = logging.getLogger("fedprompt.hospital")


@functools.lru_cache(maxsize=2)
def cached_backbone(path: str | None) -> Backbone:
    # One load per process: the warm worker and a simulation actor serve many rounds; the encoder is frozen.
    return load_backbone(path)


_ENCODED: dict[tuple, tuple[Records, Encoded]] = {}
_ENCODED_MAX = 4  # train + validation of the current run, and the previous run's


def encoded_records(
    path: Path, sha256: str, site: SiteConfig, plan: RoundPlan, backbone: Backbone, *, patients: bool = False
) -> tuple[Records, Encoded]:
    """The records file read, validated and tokenised once per content: keyed by its sha256, so a
    changed file is read and validated again; a long-lived process (the warm worker) pays once."""
    key = (
        str(path),
        sha256,
        site.text_field,
        site.label_field,
        site.patient_field if patients else None,
        tuple(plan.labels),
        plan.max_length,
        backbone.fingerprint,
    )
    if key not in _ENCODED:
        records = load_records(
            path,
            text_field=site.text_field,
            label_field=site.label_field,
            labels=plan.labels,
            patient_field=site.patient_field if patients else None,
        )
        if len(_ENCODED) >= _ENCODED_MAX:
            _ENCODED.pop(next(iter(_ENCODED)))
        _ENCODED[key] = records, encode(backbone.tokenizer, records.texts, records.labels, plan.max_length)
    return _ENCODED[key]


class Refused(Exception):
    """This site will not take part in this round. `category` (common/wire.REFUSAL_CATEGORIES) is
    all that leaves; the message stays in the hospital's log."""

    def __init__(self, message: str, category: str = "configuration"):
        super().__init__(message)
        self.category = category


@contextmanager
def _refuse_as(category: str, *also: type[Exception]) -> Iterator[None]:
    """Bad input in the block (InputError: file, line, field; or the `also` types) refuses the round in `category`."""
    refused: tuple[type[Exception], ...] = (InputError, *also)
    try:
        yield
    except refused as exc:
        raise Refused(str(exc), category) from exc


def log_detail(exc: Exception, site: SiteConfig | None) -> str:
    """A refusal's text for the site's log. Bad records are named by file, line and field; the values
    read from them (a label outside the label space, a record's text, a patient id) only with
    `site.yaml: log_records: true`. None (site.yaml unread): withheld, the safe default."""
    cause = exc if isinstance(exc, InputError) else exc.__cause__
    if isinstance(cause, InputError) and not (site is not None and site.log_records):
        return redacted(cause)
    return str(exc)


def _category(exc: Exception) -> str:
    if isinstance(exc, Refused):
        return exc.category
    if isinstance(exc, (LedgerError, PrivacyBudgetExceeded)):
        return "budget"  # the cap is reached, or the ledger cannot account for the round
    return "configuration"


@contextmanager
def _timed(timings: dict[str, float] | None, phase: str) -> Iterator[None]:
    """Adds the seconds spent in the block to timings[phase] (the hospital's log; benchmarks/round.py)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - t0


def _prepare(
    content: RecordDict, site_path: Path, timings: dict[str, float] | None = None
) -> tuple[SiteConfig, RoundPlan, Backbone]:
    with _refuse_as("configuration"):
        site = SiteConfig.load(site_path)
    with _refuse_as("configuration", KeyError, TypeError, ValueError):  # the aggregator's round plan
        plan = RoundPlan.from_config_record(content.config_records["config"])
    with _timed(timings, "backbone"), _refuse_as("backbone"):  # load + fingerprint, once per process
        backbone = cached_backbone(str(site.backbone) if site.backbone else None)
    if backbone.fingerprint != plan.backbone_fingerprint:
        raise Refused(
            f"backbone mismatch: the federation uses {plan.backbone_fingerprint[:16]}..., this site's backbone is "
            f"{backbone.fingerprint[:16]}... (at {backbone.path}); install the federation's backbone",
            "backbone",
        )
    return site, plan, backbone


def check_plan(site: SiteConfig, plan: RoundPlan) -> None:
    """Refusals decided by site.yaml and the aggregator's plan alone, before any record is read
    (Refused); train_round and `fedprompt plan` ask the same."""
    check_limits(site, plan)  # first: the site's bounds on any plan (site.yaml `limits`)
    if site.patient_field is not None and plan.train_prompt and plan.prompt_layer == 0:
        raise Refused(f"{site.source}: patient_field: {PATIENT_INPUT_PROMPT}", "configuration")
    if not plan.private and not site.allow_non_private:
        raise Refused(
            "the aggregator asked for NON-PRIVATE training and this site does not allow it (allow_non_private: false)",
            "non-private refused",
        )
    if (
        plan.private and 0 < plan.delta < site.privacy.delta
    ):  # the ledger accounts at the site's delta (PrivacyLedger.for_site)
        raise Refused(
            f"the federation asks for delta {plan.delta:g}, below this site's ledger delta {site.privacy.delta:g}"
        )


def dp_units(records: Records) -> int:
    """The DP unit: a record, or with patient_field a patient (all of its records together)."""
    return len(records) if records.patients is None else len(set(records.patients))


class MemoCalibration:
    """calibrate_noise through the site's noise memo (client/dp.NoiseMemo). What it calibrates anew
    is written to the memo only by `save`, once the ledger entry it prices is durable: a refused
    round writes nothing."""

    def __init__(self, site: SiteConfig):
        self.memo = _noise_memo(site)
        self.new: dict[tuple, float] = {}

    def __call__(self, *args) -> float:
        known = self.memo.get(args)
        if known is not None:
            return known
        self.new[args] = sigma = calibrate_noise(*args)
        return sigma

    def save(self) -> None:
        for args, sigma in self.new.items():
            self.memo.put(args, sigma)


def declared_size(site: SiteConfig, units: int) -> float:
    """site.yaml `weight`, or (not declared) the unit count to 1 significant digit."""
    return site.weight if site.weight is not None else declared_weight(units)


@dataclass(frozen=True)
class SiteRun:
    """What a site trains with in a run, from public values only (common/schedule.py): its declared
    size, its sampling, and (private runs) the noise of both phases at what the site grants, and of
    its noised evaluations if it shares them."""

    declared_size: float
    sampling: Sampling
    target_epsilon: float
    delta: float
    noise: RunNoise | None  # None: a non-private run
    evaluation: float | None  # the noise of a shared evaluation; None: not shared (or a non-private run)
    calibration: MemoCalibration

    def mechanism(self, plan: RoundPlan) -> tuple[float | None, float, int]:
        """This round's (sigma, q, steps), as the ledger records it (sigma None: non-private)."""
        return round_mechanism(plan, self.sampling, self.noise)

    def releases(self, plan: RoundPlan, margin: int = 0) -> list[Release]:
        """The charges of rounds plan.round..total_rounds of a private run (common/schedule.run_releases)."""
        assert self.noise is not None, "a non-private run has no releases"
        return run_releases(plan, self.sampling, self.noise, self.evaluation, margin)


def evaluation_sigma(site: SiteConfig, delta: float, calibration: MemoCalibration) -> float:
    """The noise of one release of noised validation counts (`share_evaluation: noised`)."""
    sigma = calibration(site.evaluation_epsilon, delta, 1.0, 1, site.privacy.accountant)
    return max(sigma, site.privacy.min_noise_multiplier)


def site_run(site: SiteConfig, plan: RoundPlan, units: int, ledger: PrivacyLedger | None = None) -> SiteRun:
    """The site's schedule for this run, calibrated once per run on what the site grants (its cap wins
    over the plan's target; the aggregator may ask for a smaller delta, never a larger one), with the
    run's noised evaluations and `privacy.retry_margin` retried DP-SGD rounds inside that target. With
    `ledger`, the noise is then raised, if need be, until the rounds left (plan.round..total_rounds,
    their evaluations and the margin) fit under the cap after what the ledger has spent: calibrated on
    what is left. One function for train_round, the pre-flight, `fedprompt plan` and the audit.
    Refuses (Refused) a declared size below the records it holds, a run in which its update would be
    mostly noise, and ("budget") one that what is left of the cap cannot hold."""
    size = declared_size(site, units)
    if units > MAX_UNITS_PER_DECLARED * size:
        raise Refused(
            f"{site.source}: weight: the declared size {size:g} is below this site's {units} training units "
            f"(at most {MAX_UNITS_PER_DECLARED:g}x is allowed): declare about {declared_weight(units):g}",
            "configuration",
        )
    s = sampling(plan, size)
    target = min(plan.target_epsilon, site.privacy.max_epsilon)
    delta = min(plan.delta, site.privacy.delta) if plan.delta > 0 else site.privacy.delta
    calibration = MemoCalibration(site)
    if not plan.private:
        return SiteRun(size, s, target, delta, None, None, calibration)
    shared = site.share_evaluation == "noised" and site.validation is not None
    evaluation = evaluation_sigma(site, site.privacy.delta, calibration) if shared else None
    floor, margin = site.privacy.min_noise_multiplier, site.privacy.retry_margin
    try:
        noise = calibrate_run(plan, s, target, delta, site.privacy.accountant, floor, calibration, evaluation, margin)
    except ValueError as exc:  # the evaluations (and the class sums) alone reach the target
        raise Refused(
            f"the run's noised evaluations leave nothing of epsilon {target:g} to train: {exc}", "budget"
        ) from exc
    ratio = noise_ratio(plan, size, noise)
    if ratio > plan.max_noise_ratio:
        raise Refused(
            f"under this plan the site's update would be mostly noise: noise bound {ratio:.2f}x its signal "
            f"bound, above the plan's max_noise_ratio {plan.max_noise_ratio:g} (declared size {size:g}, "
            f"epsilon {target:g}); a larger budget, fewer rounds or a larger min_expected_batch would help",
            "too few records",
        )
    run = SiteRun(size, s, target, delta, noise, evaluation, calibration)
    if ledger is None:
        return run
    cap = site.privacy.max_epsilon

    history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.history]

    def project(releases: list[Release]) -> float:  # the ledger's epsilon after `releases`
        return compute_epsilon(ledger.mechanism, grouped([*history, *releases]), ledger.delta)

    def releases(n: RunNoise) -> list[Release]:
        return run_releases(plan, s, n, evaluation, margin)

    fitted = fit_to_budget(noise, releases, project, cap, plan.max_noise_ratio / ratio)
    if fitted is None:
        raise Refused(
            f"epsilon spent {ledger.epsilon_spent():.4f} leaves too little of this site's cap {cap:g} for rounds "
            f"{plan.round}-{plan.total_rounds} (their evaluations and a margin of {margin} retried round(s)): even "
            f"with the noise at max_noise_ratio {plan.max_noise_ratio:g} they would cross it",
            "budget",
        )
    return replace(run, noise=fitted)


def _noise_memo(site: SiteConfig) -> NoiseMemo:
    # the ledger's volume: the site's writable one
    return NoiseMemo(site.ledger.with_name(site.ledger.name + ".noise-memo"))


def _ledger_binding(plan: RoundPlan, content: RecordDict, run_id: str, records_sha256: str, release: str = "") -> dict:
    """What a ledger entry binds: run (and which release: "" training, "/evaluation"), round, the
    records file it was computed on, the model it received."""
    base = f"{plan.run_name}/{run_id}" if run_id else plan.run_name
    return {
        "run_id": base + release,
        "round": plan.round,
        "records_sha256": records_sha256,
        "model_in_sha256": state_sha256(arrays_to_state(content.array_records[ARRAYS])),
    }


def run_chain(ledger: PrivacyLedger, run_name: str) -> list[str]:
    """The hashes of the ledger's entries from this run's first on, its head last (common/wire.LedgerChain):
    the aggregator checks that they hold the last head it saw from this site (a rollback witness)."""
    history = ledger.history
    first = next(i for i, e in enumerate(history) if e.run_id == run_name or e.run_id.startswith(run_name + "/"))
    return [e.hash for e in history[first:]]


@dataclass
class _Round:
    """One round's prepared state: the site, its plan, its records (hashed once) and its privacy run."""

    site: SiteConfig
    plan: RoundPlan
    backbone: Backbone
    train_sha256: str
    records: Records
    encoded: Encoded
    units: int
    ledger: PrivacyLedger
    run: SiteRun
    shared: Counts | None
    sigma: float | None
    q: float
    steps: int


def _prepare_round(
    content: RecordDict,
    site: SiteConfig,
    plan: RoundPlan,
    backbone: Backbone,
    run_id: str,
    timings: dict[str, float] | None,
) -> _Round:
    check_received(content.array_records.get(ARRAYS), plan)
    check_plan(site, plan)
    with _timed(timings, "records"), _refuse_as("records", OSError):
        train_sha256 = file_sha256(site.train)
        records, encoded = encoded_records(site.train, train_sha256, site, plan, backbone, patients=True)
    units = dp_units(records)
    with _timed(timings, "privacy"):  # noise calibration on what the ledger leaves, before anything is charged
        ledger = PrivacyLedger.for_site(site)
        run = site_run(site, plan, units, ledger)
    # One message per round: the model received is validated here (before training changes it).
    shared = None
    if plan.evaluate_in_train and site.validation is not None:
        with _timed(timings, "records"), _refuse_as("records", OSError):
            validation_sha256 = file_sha256(site.validation)
            _, validation = encoded_records(site.validation, validation_sha256, site, plan, backbone)
        shared = _validate_received(site, plan, backbone, content, run_id, validation, validation_sha256, timings)
    sigma, q, steps = run.mechanism(plan)
    return _Round(site, plan, backbone, train_sha256, records, encoded, units, ledger, run, shared, sigma, q, steps)


def _reserve_budget(r: _Round, content: RecordDict, run_id: str, timings: dict[str, float] | None) -> dict:
    """The round's durable ledger entry; returns the reply's privacy fields (TrainMetrics): a private round's only."""
    site, plan, run = r.site, r.plan, r.run
    privacy: dict = {}
    with _timed(timings, "privacy"):  # durable ledger entry
        if r.sigma is not None:
            # Durable BEFORE training: a crash from here on over-counts, never under-counts.
            spent = r.ledger.record(
                r.sigma,
                r.q,
                r.steps,
                epsilon_cap=site.privacy.max_epsilon,
                **_ledger_binding(plan, content, run_id, r.train_sha256),
            )
            # Only once the entry is durable: a refused round writes nothing else.
            run.calibration.save()
            if run.noise is not None and run.noise.sgd is not None:  # what the next round will ask
                _NEXT_ROUND[site.source] = (run.noise.sgd, run.sampling.sample_rate, run.sampling.steps_per_round)
            privacy = {"epsilon_spent": spent, "epsilon_cap": site.privacy.max_epsilon, "delta": run.delta}
        else:
            # Recorded too, durably BEFORE training: from this entry on the site's epsilon is
            # infinite, for good (`privacy show`), and its cap refuses every later private round.
            r.ledger.record_non_private(
                r.q,
                r.steps,
                epsilon_cap=site.privacy.max_epsilon,
                **_ledger_binding(plan, content, run_id, r.train_sha256),
            )
    return privacy


def _train(
    r: _Round, content: RecordDict, hospital: str, progress: bool, timings: dict[str, float] | None
) -> tuple[PromptClassifier, str]:
    """The local update (or the class sums' one release); returns the model and what was done, for the log."""
    site, plan, records, encoded = r.site, r.plan, r.records, r.encoded
    device = resolve_device(site.device)
    with _timed(timings, "build"):
        model = build_model(r.backbone, plan.prompt_config(), arrays_to_state(content.array_records[ARRAYS]))
    with _timed(timings, "train"):  # (frozen features included: computed once per prompt and process)
        if class_sums_round(plan):
            features = cached_features(model, encoded.dataset, device)
            if records.patients is not None:
                features = group_by_patient(features, list(records.patients))
            with torch.no_grad():
                model.head.weight.copy_(
                    noisy_class_sums(features, len(plan.labels), r.sigma or 0.0, r.run.declared_size)
                )
            done = "released its class sums once"
        else:
            result = local_update(
                model,
                encoded.dataset,
                plan,
                r.run.sampling,
                r.sigma,
                device,
                max_physical_batch_size=site.max_physical_batch_size,
                progress=progress,
                progress_label=f"{hospital} r{plan.round}",
                patients=records.patients,
            )
            done = f"{result.steps} steps, loss {result.mean_loss:.4f}"
    return model, done


def _log_round(r: _Round, hospital: str, privacy: dict, done: str) -> None:
    # Loss, record count, truncation, steps, sigma and q: the hospital's log only, never the reply.
    eps = (
        f"sigma {r.sigma:.4g}, q {r.q:.4g}, eps {privacy['epsilon_spent']:.3f}/{r.site.privacy.max_epsilon:g}"
        if r.sigma is not None
        else "NON-PRIVATE"
    )
    unit = "" if r.records.patients is None else f" of {r.units} patients (patient-level DP)"
    log.info(
        "%s round %d (local log, not sent): %d records%s (%d truncated at %d tokens), %s, %s",
        hospital,
        r.plan.round,
        len(r.encoded.dataset),
        unit,
        r.encoded.truncated,
        r.plan.max_length,
        done,
        eps,
    )


def train_round(
    content: RecordDict,
    site_path: Path,
    *,
    run_id: str = "",
    progress: bool = False,
    timings: dict[str, float] | None = None,
) -> RecordDict:
    """prepare (site, plan, records) -> reserve budget (ledger entry) -> train -> complete -> reply.
    `timings`, if given, receives the seconds of each phase (backbone, records, privacy, build, train, reply)."""
    hospital = Path(site_path).parent.name
    site: SiteConfig | None = None
    try:
        site, plan, backbone = _prepare(content, site_path, timings)
        hospital = site.hospital_id
        r = _prepare_round(content, site, plan, backbone, run_id, timings)
        privacy = _reserve_budget(r, content, run_id, timings)
    except (Refused, InputError, LedgerError, PrivacyBudgetExceeded) as exc:
        category = _category(exc)
        log.warning("%s refuses round [%s]: %s", hospital, category, log_detail(exc, site))  # the detail stays here
        return refusal(hospital, category)

    model, done = _train(r, content, hospital, progress, timings)
    try:  # the update that leaves, bound to this round's entry durably BEFORE the reply (else nothing is sent)
        with _timed(timings, "privacy"):
            r.ledger.complete(state_sha256(model.trainable_state()))
    except LedgerError as exc:
        log.warning("%s refuses round [%s]: %s", hospital, _category(exc), exc)  # the round stays counted
        return refusal(hospital, _category(exc))
    _log_round(r, hospital, privacy, done)
    with _timed(timings, "reply"):
        return TrainReply(
            status=Status.ok(hospital),
            # The FedAvg weight is the size the site declares, never len(records) (docs/deployment.md 5).
            metrics=TrainMetrics(num_examples=r.run.declared_size, private=int(plan.private), **privacy),
            ledger=LedgerChain(chain=run_chain(r.ledger, plan.run_name)),
            evaluation=r.shared,
        ).to_content(state_to_arrays(model.trainable_state()))


_NEXT_ROUND: dict[Path | None, tuple[float, float, int]] = {}  # a site's last private round's (sigma, q, steps)


def project_next_round(site_path: Path) -> None:
    """While idle, compute the epsilon the site's next round of the same run would reach (the ledger's
    accountant memoises it in this process): the next round's cap check then costs nothing. Pure
    computation, nothing written; the check itself still runs on the ledger as it is then."""
    site = SiteConfig.load(site_path)
    if site.source in _NEXT_ROUND:
        PrivacyLedger.for_site(site).project(*_NEXT_ROUND[site.source])


# Adding or removing one validation record changes its class's tp by 1 (right), or its class's fn
# and its predicted class's fp by 1 each (wrong): the per-class counts have L2 sensitivity sqrt(2).
EVAL_COUNT_SENSITIVITY = math.sqrt(2.0)


def noised_counts(counts: ClassCounts, sigma: float) -> dict[str, list[float]]:
    """tp, fp, fn per class plus Gaussian noise of std sigma x sensitivity from the OS's CSPRNG
    (client/secure_noise.py), in float64: one Gaussian mechanism release, which the ledger accounts
    as one step of the subsampled Gaussian at q = 1."""
    std = sigma * EVAL_COUNT_SENSITIVITY
    out = {}
    for key in ("tp", "fp", "fn"):
        values = getattr(counts, key)
        noise = gaussian((len(values),), std)
        out[key] = [float(v) + float(z) for v, z in zip(values, noise, strict=True)]
    return out


def _validate_received(
    site: SiteConfig,
    plan: RoundPlan,
    backbone: Backbone,
    content: RecordDict,
    run_id: str,
    encoded: Encoded,
    records_sha256: str,
    timings: dict[str, float] | None,
) -> Counts | None:
    """Validate the model received on the site's validation records and LOG the result.

    Returns None with `share_evaluation: none` (the default): exact counts back for any tensors
    the aggregator chooses to send would be an unlimited oracle on the records. With `noised`:
    per-class counts plus Gaussian noise, `evaluation_epsilon` charged to the ledger first
    (durably, before anything is sent); LedgerError / PrivacyBudgetExceeded if it cannot be.
    """
    device = resolve_device(site.device)
    with _timed(timings, "build"):
        model = build_model(backbone, plan.prompt_config(), arrays_to_state(content.array_records[ARRAYS])).to(device)
    with _timed(timings, "evaluate"):
        counts = evaluate(model, encoded.dataset, len(plan.labels), device)
    s = counts.summary()
    log.info(
        "%s round %d validation of the model received (local log, not sent): %d records, accuracy %.4f, macro-F1 %.4f, "
        "loss %.4f, F1 per class %s",
        site.hospital_id,
        plan.round,
        s["num_examples"],
        s["accuracy"],
        s["macro_f1"],
        s["loss"],
        [round(f, 4) for f in s["f1_per_class"]],
    )
    if site.share_evaluation != "noised":
        return None
    with _timed(timings, "privacy"):
        ledger = PrivacyLedger.for_site(site)
        calibration = MemoCalibration(site)
        sigma = evaluation_sigma(site, ledger.delta, calibration)
        # Durable BEFORE the counts leave: a crash from here on over-counts, never under-counts.
        spent = ledger.record(
            sigma,
            1.0,
            1,
            epsilon_cap=site.privacy.max_epsilon,
            **_ledger_binding(plan, content, run_id, records_sha256, "/evaluation"),
        )
        calibration.save()
    log.info(
        "%s round %d: sends noised validation counts (sigma %.4g, std %.4g per count), eps %.3f/%g",
        site.hospital_id,
        plan.round,
        sigma,
        sigma * EVAL_COUNT_SENSITIVITY,
        spent,
        site.privacy.max_epsilon,
    )
    return Counts(**noised_counts(counts, sigma))


def evaluate_round(
    content: RecordDict, site_path: Path, *, run_id: str = "", timings: dict[str, float] | None = None
) -> RecordDict:
    """A separate evaluate message (federation `evaluation: separate`): the site validates the
    received model (_validate_received); the reply is the status record, plus noised counts if the
    site shares them. `timings`, if given, receives the seconds of each phase."""
    hospital = Path(site_path).parent.name
    site: SiteConfig | None = None
    try:
        site, plan, backbone = _prepare(content, site_path, timings)
        hospital = site.hospital_id
        check_limits(site, plan)  # as for training: no run outside the site's bounds, nor any model
        check_received(content.array_records.get(ARRAYS), plan)
        if site.validation is None:
            raise Refused("no validation file configured (site.yaml: validation)", "configuration")
        with _timed(timings, "records"), _refuse_as("records", OSError):
            validation_sha256 = file_sha256(site.validation)
            _, encoded = encoded_records(site.validation, validation_sha256, site, plan, backbone)
    except (Refused, InputError) as exc:
        category = _category(exc)
        # the detail stays here
        log.warning("%s refuses evaluation [%s]: %s", hospital, category, log_detail(exc, site))
        return refusal(hospital, category)
    try:
        shared = _validate_received(site, plan, backbone, content, run_id, encoded, validation_sha256, timings)
    except (LedgerError, PrivacyBudgetExceeded) as exc:
        log.warning("%s refuses to share its evaluation [budget]: %s", hospital, exc)
        return refusal(hospital, "budget")
    return EvaluateReply(status=Status.ok(hospital), metrics=shared).to_content()
