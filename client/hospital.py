"""One hospital's side of a round: checks, privacy accounting, local training, the reply.

Every refusal (bad records, budget spent, backbone mismatch, ...) is a well-formed reply with
its reason; only unexpected failures surface as Flower error replies.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import RecordDict

from fedprompt.common.backbone import Backbone, load_backbone
from fedprompt.common.config import SiteConfig
from fedprompt.common.encoding import encode
from fedprompt.common.errors import InputError, LedgerError, PrivacyBudgetExceeded
from fedprompt.common.metrics import evaluate
from fedprompt.common.model import build_model
from fedprompt.common.plan import RoundPlan
from fedprompt.common.wire import (
    ARRAYS,
    EVAL_METRIC_KEYS,
    METRICS,
    STATUS,
    TRAIN_METRIC_KEYS,
    arrays_to_state,
    metric_record,
    refusal,
    state_to_arrays,
    status_record,
)

from .dp import NoiseMemo, calibrate_noise, plan_steps
from .ledger import PrivacyLedger
from .records import load_records
from .trainer import local_update, resolve_device

log = logging.getLogger("fedprompt.hospital")


@functools.lru_cache(maxsize=2)
def _cached_backbone(path: str | None) -> Backbone:
    # One load per process: in simulation an actor serves many rounds; the encoder is frozen.
    return load_backbone(path)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/])/(?:[^\s:'\",()/]+/)*([^\s:'\",()/]+)")


def public_reason(message: str) -> str:
    """A refusal reason fit to leave the site: local paths cut to their file names.

    The full message (with paths) stays in the hospital's own log.
    """
    return _ABSOLUTE_PATH.sub(r"\1", message)


class Refused(Exception):
    """This site will not take part in this round, for the stated reason."""


@contextmanager
def _timed(timings: dict[str, float] | None, phase: str) -> Iterator[None]:
    """Adds the seconds spent in the block to timings[phase] (the hospital's log; benchmarks/round.py)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - t0


def _prepare(content: RecordDict, site_path: Path, timings: dict[str, float] | None = None) -> tuple[SiteConfig, RoundPlan, Backbone]:
    site = SiteConfig.load(site_path)
    plan = RoundPlan.from_config_record(content["config"])
    with _timed(timings, "backbone"):  # load + fingerprint, once per process
        backbone = _cached_backbone(str(site.backbone) if site.backbone else None)
    if backbone.fingerprint != plan.backbone_fingerprint:
        # The reason goes to the aggregator: fingerprints only, never local paths.
        log.warning("backbone at %s has fingerprint %s, the federation's is %s", backbone.path, backbone.fingerprint, plan.backbone_fingerprint)
        raise Refused(
            f"backbone mismatch: the federation uses {plan.backbone_fingerprint[:16]}..., "
            f"this site's backbone is {backbone.fingerprint[:16]}...; install the federation's backbone"
        )
    return site, plan, backbone


def _calibration(site: SiteConfig, plan: RoundPlan, sample_rate: float, steps_per_round: int) -> tuple:
    """calibrate_noise's arguments for this run: what the site grants (sigma is calibrated once per run)."""
    target = min(plan.target_epsilon, site.privacy.max_epsilon)  # the site's cap wins
    # The aggregator may ask for a smaller delta (more privacy), never a larger one.
    delta = min(plan.delta, site.privacy.delta) if plan.delta > 0 else site.privacy.delta
    return target, delta, sample_rate, steps_per_round * plan.total_rounds, site.privacy.accountant


def _noise_memo(site: SiteConfig) -> NoiseMemo:
    return NoiseMemo(site.ledger.with_name(site.ledger.name + ".noise-memo"))  # the ledger's volume: the site's writable one


def train_round(content: RecordDict, site_path: Path, *, run_id: str = "", progress: bool = False,
                timings: dict[str, float] | None = None) -> RecordDict:
    """`timings`, if given, receives the seconds of each phase (backbone, records, privacy, build, train, reply)."""
    hospital = Path(site_path).parent.name
    try:
        site, plan, backbone = _prepare(content, site_path, timings)
        hospital = site.hospital_id
        with _timed(timings, "records"):
            records = load_records(site.train, text_field=site.text_field, label_field=site.label_field, labels=plan.labels)
            encoded = encode(backbone.tokenizer, records.texts, records.labels, plan.max_length)
        q, steps = plan_steps(len(encoded.dataset), plan.batch_size, plan.local_epochs, plan.sample_rate)
        metrics: dict = {"num-examples": len(encoded.dataset), "private": int(plan.private)}
        with _timed(timings, "privacy"):  # noise calibration + durable ledger entry
            if plan.private:
                ledger = PrivacyLedger.for_site(site)
                args, memo = _calibration(site, plan, q, steps), _noise_memo(site)
                calibrated = memo.get(args) or calibrate_noise(*args)
                sigma, delta = max(calibrated, site.privacy.min_noise_multiplier), args[1]
                if delta != ledger.delta:
                    raise Refused(f"the federation asks for delta {delta:g}, below this site's ledger delta {ledger.delta:g}")
                # Durable BEFORE training: a crash from here on over-counts, never under-counts.
                spent = ledger.record(sigma, q, steps, epsilon_cap=site.privacy.max_epsilon, run_id=f"{plan.run_name}/{run_id}" if run_id else plan.run_name, round=plan.round)
                memo.put(args, calibrated)  # only once the entry is durable: a refused round writes nothing else
                metrics.update({"noise-multiplier": sigma, "sample-rate": q, "epsilon-spent": spent, "epsilon-cap": site.privacy.max_epsilon, "delta": delta})
            elif not site.allow_non_private:
                raise Refused("the aggregator asked for NON-PRIVATE training and this site does not allow it (allow_non_private: false)")
            else:
                sigma = None
    except (Refused, InputError, LedgerError, PrivacyBudgetExceeded) as exc:
        log.warning("%s refuses round: %s", hospital, exc)
        return refusal(hospital, public_reason(str(exc)))

    device = resolve_device(site.device)
    with _timed(timings, "build"):
        model = build_model(backbone, plan.prompt_config(), arrays_to_state(content[ARRAYS]))
    with _timed(timings, "train"):  # (frozen features included: computed once per prompt and process)
        result = local_update(model, encoded.dataset, plan, sigma, device, max_physical_batch_size=site.max_physical_batch_size,
                              progress=progress, progress_label=f"{hospital} r{plan.round}")
    metrics.update({"train-loss": result.mean_loss, "steps": result.steps})
    eps = f"eps {metrics['epsilon-spent']:.3f}/{site.privacy.max_epsilon:g}" if plan.private else "NON-PRIVATE"
    log.info("%s round %d: %d steps, loss %.4f, %s", hospital, plan.round, result.steps, result.mean_loss, eps)
    with _timed(timings, "reply"):
        return RecordDict(
            {
                ARRAYS: state_to_arrays(model.trainable_state()),
                METRICS: metric_record(metrics, TRAIN_METRIC_KEYS),
                STATUS: status_record(hospital, "ok", truncated=encoded.truncated),
            }
        )


def evaluate_round(content: RecordDict, site_path: Path, *, timings: dict[str, float] | None = None) -> RecordDict:
    """`timings`, if given, receives the seconds of each phase (backbone, records, build, evaluate)."""
    hospital = Path(site_path).parent.name
    try:
        site, plan, backbone = _prepare(content, site_path, timings)
        hospital = site.hospital_id
        if site.validation is None:
            raise Refused("no validation file configured")
        with _timed(timings, "records"):
            records = load_records(site.validation, text_field=site.text_field, label_field=site.label_field, labels=plan.labels)
    except (Refused, InputError) as exc:
        log.warning("%s refuses evaluation: %s", hospital, exc)
        return refusal(hospital, public_reason(str(exc)))
    with _timed(timings, "records"):
        encoded = encode(backbone.tokenizer, records.texts, records.labels, plan.max_length)
    device = resolve_device(site.device)
    with _timed(timings, "build"):
        model = build_model(backbone, plan.prompt_config(), arrays_to_state(content[ARRAYS])).to(device)
    with _timed(timings, "evaluate"):
        counts = evaluate(model, encoded.dataset, len(plan.labels), device)
    metrics = {"num-examples": counts.n, "loss-sum": counts.loss_sum, "tp": counts.tp, "fp": counts.fp, "fn": counts.fn}
    return RecordDict({METRICS: metric_record(metrics, EVAL_METRIC_KEYS), STATUS: status_record(hospital, "ok")})
