"""The aggregator's run: prepare (validate everything up front), execute rounds, finish.

Checkpoints after every round and rewrites the report in the background (server/live_report.py:
an operator can watch a run in a browser); a resumed run continues the round numbering and the
history. Before its first round a run asks every node it will sample whether it will train the
whole run (the pre-flight, client/preflight.py): it starts only when at least min_hospitals
confirm, and the others are sent no train message. At the end: the export, metrics.json and the
report; a run in which no hospital trained (or that the pre-flight stopped) gets no export, and
metrics.json and the report say why (server/outcome.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from torch.utils.data import TensorDataset

from fedprompt.common.atomic import atomic_write
from fedprompt.common.backbone import Backbone, load_backbone
from fedprompt.common.config import FederationConfig
from fedprompt.common.encoding import encode
from fedprompt.common.errors import InputError
from fedprompt.common.logs import CONSOLE, PROGRESS
from fedprompt.common.metrics import evaluate
from fedprompt.common.model import HEAD_WEIGHT_KEY, PromptConfig, build_model
from fedprompt.common.plan import RoundPlan, initial_global_state_for, prompt_config
from fedprompt.common.records import load_records
from fedprompt.common.schedule import largest_update_bound
from fedprompt.common.wire import (
    ARRAYS,
    CONFIG,
    PreflightReply,
    ReplyError,
    arrays_to_state,
    state_to_arrays,
)

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .export import export_model
from .history import Preflight, PreflightAnswer, RunMetrics
from .live_report import LiveReport
from .outcome import NOTHING_TRAINED, RUNNING, Outcome, preflight_shortfall, run_outcome
from .report import write_report
from .strategy import ClassMeansHead, ValidatedStrategy, build_strategy, identity, judge_unanswered, witnessed

log = logging.getLogger("fedprompt.server")


@dataclass
class RunSpec:
    federation: FederationConfig
    out_dir: Path
    test_path: Path | None = None  # held-out set for the aggregator's reference evaluation
    backbone: Path | None = None  # aggregator's copy of the shared backbone (default: embedded)
    resume: bool = False
    stop_after: int | None = None  # rounds to run in this invocation (resume later)
    expected_hospitals: int | None = None  # wait for this many before each round (simulation: all)


@dataclass
class PreparedRun:
    spec: RunSpec
    backbone: Backbone
    prompt: PromptConfig
    state: dict[str, torch.Tensor]
    done: int
    history: list[dict] = field(default_factory=list)
    test_set: TensorDataset | None = None
    preflight: Preflight | None = None  # this invocation's (ask_preflight)

    @property
    def checkpoint_dir(self) -> Path:
        return self.spec.out_dir / "checkpoint"


def prepare_run(spec: RunSpec) -> PreparedRun:
    fed = spec.federation
    backbone = load_backbone(spec.backbone)
    prompt = prompt_config(fed, backbone)
    run = PreparedRun(spec, backbone, prompt, {}, 0)
    ckpt = load_checkpoint(run.checkpoint_dir)
    if ckpt is not None and not spec.resume:
        raise InputError.at(
            spec.out_dir,
            f"holds a run already (checkpoint at round {ckpt.round}): pass --resume to continue it, or choose "
            "another --out",
        )
    if ckpt is not None:
        if ckpt.backbone_fingerprint != backbone.fingerprint or ckpt.run != fed.name:
            raise InputError.at(
                run.checkpoint_dir / "state.json",
                f"checkpoint is of run {ckpt.run!r} on another backbone/config; cannot resume",
            )
        run.state, run.done, run.history = ckpt.state, ckpt.round, ckpt.history
    else:
        run.state = initial_global_state_for(fed, backbone)
    check_norm_bound(fed, run)
    if spec.test_path is not None:
        records = load_records(spec.test_path, text_field="text", label_field="label", labels=prompt.labels)
        run.test_set = encode(backbone.tokenizer, records.texts, records.labels, prompt.max_length).dataset
    return run


def check_norm_bound(fed: FederationConfig, run: PreparedRun) -> None:
    """A fixed strategy.update_norm_bound below what an honest DP update can reach would reject honest
    sites (and spend their budget for nothing): refused before anything is sent."""
    bound = fed.strategy.update_norm_bound
    if bound is None:
        return
    plan = RoundPlan.for_run(fed, run.prompt)
    honest = largest_update_bound(plan, float(torch.linalg.vector_norm(run.state[HEAD_WEIGHT_KEY])))
    if bound < honest:
        raise InputError.at(
            fed.source or "federation.yaml",
            f"{bound:g} is below the largest update an honest site can send under this plan ({honest:.4g}; "
            "common/schedule.py): remove it to have the bound derived for each reply",
            field="strategy.update_norm_bound",
        )


def _test_metrics(run: PreparedRun, state: dict[str, torch.Tensor]) -> dict | None:
    if run.test_set is None:
        return None
    s = evaluate(build_model(run.backbone, run.prompt, state), run.test_set, run.prompt.num_labels).summary()
    return {k: s[k] for k in ("accuracy", "macro_f1", "loss", "num_examples")}


def execute(grid: Grid, run: PreparedRun) -> dict:
    """Run the remaining rounds on `grid`, then export and report. Returns metrics.json's content."""
    fed = run.spec.federation
    remaining = fed.rounds - run.done
    if run.spec.stop_after is not None:
        remaining = min(remaining, run.spec.stop_after)
    strategy = guarded_strategy(run)
    plan = RoundPlan.for_run(fed, run.prompt).to_config_record()
    if remaining <= 0:
        return finish(run)
    # before anything that could charge a site (round 0's shared evaluation included)
    run.preflight, strategy.declined = ask_preflight(grid, run, state_to_arrays(run.state), plan, strategy.names)
    log.info("%s", preflight_line(run.preflight, fed.rounds), extra=CONSOLE)
    if run.preflight.confirmed < fed.min_hospitals:
        return finish(run)
    recorder = RoundRecorder(run, strategy)  # the first round's clock starts here (round 0 included)
    if recorder.start_at_zero and not strategy.evaluate_in_train:
        evaluate_round_zero(grid, run, strategy, plan)
    try:
        strategy.start(
            grid,
            state_to_arrays(run.state),
            num_rounds=remaining,
            timeout=fed.round_timeout,
            train_config=plan,
            evaluate_config=plan,
            evaluate_fn=recorder,
        )
    finally:
        recorder.live.wait()  # the final report (finish) never races the last round's
    return finish(run)


def guarded_strategy(run: PreparedRun) -> ValidatedStrategy:
    """The federation's strategy behind the guard, numbering rounds on from the run's last."""
    fed = run.spec.federation
    return ValidatedStrategy(
        build_strategy(fed, run.spec.expected_hospitals),
        run.prompt,
        norm_bound=fed.strategy.update_norm_bound,
        min_hospitals=fed.min_hospitals,
        round_offset=run.done,
        evaluate_in_train=fed.evaluation == "in_train",
        class_means=ClassMeansHead.for_run(fed, run.backbone, run.prompt),
        witnessed=witnessed(run.history),
    )


def evaluate_round_zero(grid: Grid, run: PreparedRun, strategy: ValidatedStrategy, plan: ConfigRecord) -> None:
    """Round 0: the hospitals validate the initial (zero-shot) model before anyone trains, each in
    its own log; only sites with `share_evaluation: noised` send (noised) counts back. (With
    `evaluation: in_train` they do so inside round 1's train message.)"""
    messages = strategy.configure_evaluate(0, state_to_arrays(run.state), plan, grid)
    replies = grid.send_and_receive(
        [m for m in messages if m.metadata.dst_node_id not in strategy.declined],
        timeout=run.spec.federation.round_timeout,
    )
    strategy.aggregate_evaluate(0, replies)


class RoundRecorder:
    """The strategy's evaluate_fn, called after each round (round 0 too): the round's record in the
    history, the checkpoint, the operator's line and the live report. Returns the test metrics."""

    def __init__(self, run: PreparedRun, strategy: ValidatedStrategy):
        self.run, self.strategy = run, strategy
        self.start_at_zero = not any(h["round"] == 0 for h in run.history)  # a resumed run has its round 0 already
        self.live = LiveReport(run.spec.out_dir)
        self._started = (time.perf_counter(), time.time())  # this round's start: monotonic, and epoch for "timing"

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and not self.start_at_zero:
            return None
        run, fed = self.run, self.run.spec.federation
        state = arrays_to_state(arrays)
        record = self.record(server_round, state)
        r = record["round"]
        if broke := refused_after_preflight(run.preflight, record["hospitals"]):
            record["refused_after_preflight"] = broke
            for hospital, category in sorted(broke.items()):
                log.warning("round %d: %s refused after confirming in pre-flight: %s", r, hospital, category)
        self._started = (time.perf_counter(), time.time())
        run.history.append(record)
        run.state, run.done = state, r
        save_checkpoint(
            run.checkpoint_dir, Checkpoint(r, state, run.history, run.prompt.backbone_fingerprint, fed.name)
        )
        log.info("%s", round_line(record, fed.rounds), extra=PROGRESS)
        self.live.submit(run_metrics(run, RUNNING))
        return MetricRecord({f"test-{k}": float(v) for k, v in record["test"].items()}) if record["test"] else None

    def record(self, server_round: int, state: dict[str, torch.Tensor]) -> dict:
        """The round's entry in metrics.json's history (a RoundRecord), less its pre-flight breaches."""
        strategy = self.strategy
        hospitals = strategy.outcomes_json(server_round)
        return {
            "round": strategy.global_round(server_round),
            "seconds": round(time.perf_counter() - self._started[0], 3),
            "aggregate_seconds": strategy.aggregate_seconds.get(server_round),
            "aggregate_cpu_seconds": strategy.aggregate_cpu_seconds.get(server_round),
            # null unless some site shares noised counts; its `model_round` is the model they validated
            # (with `evaluation: in_train`, the one this round started from)
            "evaluate": strategy.eval_results.get(server_round),
            "test": _test_metrics(self.run, state),
            "hospitals": hospitals,
            "aggregated": strategy.aggregated.get(server_round, False),  # the global model changed this round
            "upload_bytes": sum(h["upload_bytes"] for h in hospitals.values()),
            # Wall-clock (epoch) phase boundaries: round start, instructions sent, replies in, round end.
            "timing": {"start": self._started[1], **strategy.timing.get(server_round, {}), "end": time.time()},
        }


def ask_preflight(
    grid: Grid, run: PreparedRun, arrays: ArrayRecord, plan: ConfigRecord, names: dict[int, str]
) -> tuple[Preflight, frozenset[int]]:
    """Ask every node the run will sample whether it will train all of the run's remaining rounds
    (client/preflight.py answers, spending nothing). Returns the answers, and the nodes that did
    not confirm (refused, failed, malformed or silent), which the strategy sends no train message.
    `names` learns each answering node's hospital id (the strategy's, for later silent rounds)."""
    fed = run.spec.federation
    # Whom the strategy will sample: every node connected once this many are (build_strategy).
    _, nodes = sample_nodes(grid, max(fed.min_hospitals, run.spec.expected_hospitals or 0), 0)
    config = ConfigRecord(dict(plan))
    config["fp.round"] = run.done + 1  # the first round of this invocation: the site checks it and every later one
    content = RecordDict({ARRAYS: arrays, CONFIG: config})
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=node) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout))
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids are set when sent
    answers: dict[str, PreflightAnswer] = {}
    answered: set[int] = set()
    confirmed: set[int] = set()
    for msg in replies:
        node = sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        answered.add(node)
        who = identity(msg, node, set(answers), names)
        answers[who] = answer = _judge_preflight(msg)
        if answer.status == "ok":
            confirmed.add(node)
        elif answer.status == "refused":
            log.info("pre-flight: %s refused: %s", who, answer.reason)
        else:
            log.warning("pre-flight: %s answer %s: %s", who, answer.status, answer.reason)
    for node in sorted(set(nodes) - answered):
        answers[names.get(node, f"node-{node}")] = PreflightAnswer("failed", "no reply within the round timeout")
    result = Preflight(round=run.done + 1, min_hospitals=fed.min_hospitals, confirmed=len(confirmed), hospitals=answers)
    return result, frozenset(nodes) - confirmed


def _judge_preflight(msg: Message) -> PreflightAnswer:
    """A pre-flight reply carries the status record alone: "ok", or a refusal naming its category."""
    if (settled := judge_unanswered(msg)) is not None:
        return PreflightAnswer(*settled)
    try:
        PreflightReply.from_content(msg.content)
    except ReplyError as exc:
        return PreflightAnswer("rejected", str(exc))
    return PreflightAnswer("ok")


def _declined(preflight: Preflight) -> dict[str, str]:
    """hospital -> why it will not train the run (its refusal category, or the aggregator's words)."""
    return {h: a.reason or a.status for h, a in preflight.hospitals.items() if a.status != "ok"}


def refused_after_preflight(preflight: Preflight | None, hospitals: dict[str, dict]) -> dict[str, str]:
    """hospital -> category, for the round's refusals by sites that had confirmed the run in pre-flight."""
    if preflight is None:
        return {}
    said_yes = {h for h, a in preflight.hospitals.items() if a.status == "ok"}
    return {h: o["reason"] for h, o in hospitals.items() if o["status"] == "refused" and h in said_yes}


def preflight_line(preflight: Preflight, total: int) -> str:
    """The pre-flight for the operator: how many sites confirmed, and why each other one will not train."""
    declined = _declined(preflight)
    parts = [
        f"pre-flight for rounds {preflight.round}-{total}",
        f"{preflight.confirmed} of {len(preflight.hospitals)} site(s) will train the run "
        f"(min_hospitals {preflight.min_hospitals})",
    ]
    if declined:
        parts.append("not: " + ", ".join(f"{h} ({why})" for h, why in sorted(declined.items())))
    if preflight.confirmed < preflight.min_hospitals:
        parts.append("the run does not start: no site is charged")
    return " | ".join(parts)


def finish(run: PreparedRun) -> dict:
    fed, out = run.spec.federation, run.spec.out_dir
    preflight = run.preflight
    not_started = (  # the pre-flight stopped this invocation before its first round
        preflight_shortfall(preflight.confirmed, preflight.min_hospitals, _declined(preflight))
        if preflight is not None and preflight.confirmed < preflight.min_hospitals
        else None
    )
    # a resumed run is judged on the rounds this invocation ran
    outcome, why = run_outcome(run.history, not_started, None if preflight is None else preflight.round)
    export_dir = (
        None
        if outcome == NOTHING_TRAINED
        else export_model(out / "export", run.prompt, run.state, run.history, fed.name)
    )
    metrics = run_metrics(run, outcome, why, export_dir)
    out.mkdir(parents=True, exist_ok=True)  # a run the pre-flight stopped has written nothing yet
    atomic_write(out / "metrics.json", (json.dumps(metrics, indent=1) + "\n").encode())
    write_report(metrics, out)
    if why is not None:
        log.info(
            "%s: %s; %s (the per-round reasons are in %s)",
            outcome,
            why,
            "no export written" if export_dir is None else f"exported to {export_dir}",
            out / "metrics.json",
        )
    return metrics


def run_metrics(run: PreparedRun, outcome: Outcome, why: str | None = None, export_dir: Path | None = None) -> dict:
    """metrics.json's content (and the report's input): the run's history and how it ended."""
    fed = run.spec.federation
    return RunMetrics.model_validate(  # the history's rounds are dicts: validated as RoundRecords
        dict(
            run=fed.name,
            outcome=outcome,
            outcome_reason=why,
            private=fed.privacy.private,
            strategy=fed.strategy.name,
            backbone_fingerprint=run.prompt.backbone_fingerprint,
            labels=fed.label_names,
            rounds=run.history,
            export=None if export_dir is None else str(export_dir),
            **({} if run.preflight is None else {"preflight": run.preflight}),
        )
    ).model_dump(exclude_unset=True)


def round_line(rec: dict, total: int) -> str:
    """One round for the operator: scores, each hospital's status and epsilon (counts beyond a few
    hospitals), seconds."""
    ev, test, sites = rec["evaluate"] or {}, rec["test"] or {}, rec["hospitals"]
    parts = [f"round {rec['round']}/{total}" + (" (zero-shot start, no training)" if rec["round"] == 0 else "")]
    if ev:  # only from sites that share noised counts; by default each site logs its own validation
        parts.append(f"val{' (noised)' if ev.get('noised') else ''} acc {ev['accuracy']:.3f} F1 {ev['macro_f1']:.3f}")
    if test:
        parts.append(f"test acc {test['accuracy']:.3f} F1 {test['macro_f1']:.3f}")
    if rec["round"] > 0 and len(sites) <= 4:
        parts.append(
            ", ".join(
                f"{h} {o['status']}"
                + (
                    f" after confirming in pre-flight: {o['reason']}"
                    if h in rec.get("refused_after_preflight", {})
                    else f" ({o['reason']})"
                    if o["status"] != "ok" and o.get("reason")
                    else ""
                )
                + (f" eps {o['epsilon_spent']:.2f}" if o.get("epsilon_spent") is not None else "")
                for h, o in sorted(sites.items())
            )
        )
    elif rec["round"] > 0:
        eps = [o["epsilon_spent"] for o in sites.values() if o.get("epsilon_spent") is not None]
        parts.append(" ".join(f"{k}:{v}" for k, v in sorted(Counter(o["status"] for o in sites.values()).items())))
        parts.append(f"max eps {max(eps):.2f}" if eps else "eps n/a")
    parts.append(f"{rec['seconds']:.1f}s")
    return " | ".join(parts)
