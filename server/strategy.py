"""The guard every strategy runs behind (the strategies themselves: server/strategies/).

`ValidatedStrategy` wraps any Flower Message-API strategy: it checks every field of each reply
before anything reads it (a malformed reply is "rejected", never a crash, and never reaches the
strategy, which would raise `InconsistentMessageReplies` and end the run), records each
hospital's outcome for the report, sums the noised evaluation counts of the sites that share
them (none by default: sites evaluate locally), and numbers rounds globally so a resumed run
continues where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict
from typing import Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedprompt.common.metrics import ClassCounts
from fedprompt.common.model import HEAD_WEIGHT_KEY, PromptConfig
from fedprompt.common.plan import PREFIX as PLAN_PREFIX
from fedprompt.common.plan import RoundPlan
from fedprompt.common.schedule import DEFAULT_DELTA, class_sums_round, class_sums_sigma, update_bound
from fedprompt.common.wire import (
    ARRAYS,
    EVALUATION,
    METRICS,
    STATUS,
    arrays_to_state,
    payload_bytes,
    state_to_arrays,
    validate_evaluation,
    validate_refusal,
    validate_update,
)

from .class_means import head_from_class_sums, label_weight
from .history import HospitalOutcome
from .strategies import build_strategy as build_strategy  # its home before the registry

log = logging.getLogger("fedprompt.server")


def _number(value: object) -> float:
    """A metric value that validation has already checked to be a finite number."""
    assert isinstance(value, (int, float))
    return float(value)


def _numbers(value: object) -> list[float]:
    """A metric list that validation has already checked to hold finite numbers."""
    assert isinstance(value, list)
    return [float(v) for v in value]


def judge_unanswered(msg: Message) -> tuple[Literal["failed", "rejected", "refused"], str] | None:
    """An error reply ("failed") or a refusal ("refused" with its category, or "rejected" if malformed);
    None for a reply that answers the message (train and pre-flight replies alike)."""
    if msg.has_error():  # its first line: an engine's reason can run to pages (a dead Ray actor's does)
        first = (msg.error.reason or "").strip().split("\n", 1)[0]
        return "failed", f"error reply: {first[:200]}"
    status = msg.content.config_records.get(STATUS)
    if status is not None and status.get("status") == "refused":
        reason = validate_refusal(msg.content)
        if reason:
            return "rejected", f"malformed refusal: {reason}"
        return "refused", str(status["reason"])  # a category: validate_refusal checked it
    return None


def identity(msg: Message, node_id: int, taken: set[str], known: dict[int, str]) -> str:
    """The hospital a reply is from: the id its status record names, else (an error reply, a node the
    SuperLink answered for) the name `known` learned for its node from an earlier reply (the pre-flight's
    included), else `node-<id>`. A reply that names itself teaches `known`."""
    node = f"node-{node_id}"
    status = msg.content.config_records.get(STATUS) if not msg.has_error() else None
    name = status.get("hospital-id") if status is not None else None
    if isinstance(name, str) and name and len(name) <= 64:
        known[node_id] = name
    else:
        name = known.get(node_id, node)
    return name if name not in taken else f"{name}@{node}"


class ValidatedStrategy(Strategy):
    def __init__(
        self,
        inner: Strategy,
        prompt: PromptConfig,
        *,
        norm_bound: float | None,
        min_hospitals: int,
        round_offset: int = 0,
        evaluate_in_train: bool = False,
        label_prototypes: torch.Tensor | None = None,
        label_prior: float = 0.0,
        logit_scale: float = 10.0,
    ):
        self.inner = inner
        # The class-sums round builds the head from the released sums and these (server/class_means.py).
        self.label_prototypes = label_prototypes
        self.label_prior = label_prior
        self.logit_scale = logit_scale
        self._plan: RoundPlan | None = None  # this round's, as sent
        # Each node's hospital id, from the replies that named it: a silent or failed node is then
        # reported by name, not as node-<id>.
        self.names: dict[int, str] = {}
        # One message per round: no evaluate messages; sites validate the model received inside
        # the train message, and those that share send noised counts with their update.
        self.evaluate_in_train = evaluate_in_train
        self.shapes = prompt.shapes()
        self.num_labels = prompt.num_labels
        self.norm_bound = norm_bound  # None: derived per reply from the plan and its declared size
        self.min_hospitals = min_hospitals
        self.round_offset = round_offset
        self._global: dict[str, torch.Tensor] | None = None
        self._sent: dict[int, list[Message]] = {}
        self.train_outcomes: dict[int, dict[str, HospitalOutcome]] = {}
        self.aggregated: dict[int, bool] = {}  # did the round change the global model (>= min_hospitals valid updates)?
        self.eval_results: dict[int, dict | None] = {}
        # Per round, time in aggregate_train (validation + the inner aggregate): wall clock, and
        # this thread's CPU time, which a loaded host or the engine's other threads do not inflate.
        self.aggregate_seconds: dict[int, float] = {}
        self.aggregate_cpu_seconds: dict[int, float] = {}
        # Wall-clock time of each phase boundary per round (metrics.json "timing"): where a round's time goes.
        self.timing: dict[int, dict[str, float]] = {}

    def global_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    def _mark(self, server_round: int, event: str) -> None:
        self.timing.setdefault(server_round, {})[event] = time.time()

    def summary(self) -> None:
        self.inner.summary()

    # Nodes that did not confirm the run in pre-flight (server/federation.py): never sent a train message.
    declined: frozenset[int] = frozenset()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._mark(server_round, "train_sent")
        self._global = arrays_to_state(arrays)
        config = ConfigRecord(dict(config))
        config["fp.round"] = self.global_round(server_round)
        # The server's own plan (server/federation.py); a bare config (tests of the guard) carries none.
        self._plan = RoundPlan.from_config_record(config) if f"{PLAN_PREFIX}run_name" in config else None
        # The inner strategy samples every connected node: the declined ones are taken out of its sample.
        messages = [
            m
            for m in self.inner.configure_train(server_round, arrays, config, grid)
            if m.metadata.dst_node_id not in self.declined
        ]
        self._sent[server_round] = messages
        return messages

    def _destinations(self, server_round: int) -> dict[str, int]:
        """Message id -> hospital node of this round's instructions (ids are set when sent).

        Replies are attributed through `reply_to_message_id`: when a node is unavailable the
        SuperLink answers in its place, with its own id as the sender.
        """
        return {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent.get(server_round, [])}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._mark(server_round, "train_received")
        t0, cpu0 = time.perf_counter(), time.thread_time()
        try:
            return self._aggregate_train(server_round, list(replies))
        finally:
            self.aggregate_seconds[server_round] = time.perf_counter() - t0
            self.aggregate_cpu_seconds[server_round] = time.thread_time() - cpu0

    def _aggregate_train(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        sent = self._destinations(server_round)
        outcomes: dict[str, HospitalOutcome] = {}
        accepted: list[Message] = []
        answered: set[int] = set()
        shared: list[MetricRecord] = []
        for msg in replies:
            node = sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            answered.add(node)
            who = identity(msg, node, set(outcomes), self.names)
            outcome = self._judge(msg)
            outcomes[who] = outcome
            if outcome.status == "ok":
                if EVALUATION in msg.content.metric_records:  # validated with the update by _judge
                    shared.append(msg.content.metric_records[EVALUATION])
                # The strategy sees only the tensors and the weight: nothing else to trip on.
                msg.content = RecordDict(
                    {ARRAYS: msg.content[ARRAYS], METRICS: MetricRecord({"num-examples": outcome.weight})}
                )
                accepted.append(msg)
            elif outcome.status in ("rejected", "failed"):
                log.warning(
                    "round %d: %s update %s: %s", self.global_round(server_round), who, outcome.status, outcome.reason
                )
            else:
                log.info("round %d: %s refused: %s", self.global_round(server_round), who, outcome.reason)
        for node in sorted(set(sent.values()) - answered):
            outcomes[self.names.get(node, f"node-{node}")] = HospitalOutcome(
                "failed", "no reply within the round timeout"
            )
        self.train_outcomes[server_round] = outcomes
        if self.evaluate_in_train:
            self.eval_results[server_round] = self._sum_counts(shared, model_round=self.global_round(server_round) - 1)
        if len(accepted) < self.min_hospitals:
            log.warning(
                "round %d: %d valid update(s), fewer than min_hospitals=%d: global model unchanged",
                self.global_round(server_round),
                len(accepted),
                self.min_hospitals,
            )
            return None, None
        untouched = self._untouched(accepted)  # before the inner strategy, which may consume the replies
        arrays: ArrayRecord | None
        if self._plan is not None and class_sums_round(self._plan):
            arrays = self._class_means_head(accepted)
        else:
            arrays, _ = self.inner.aggregate_train(server_round, accepted)
        self.aggregated[server_round] = arrays is not None
        if arrays is not None:
            assert self._global is not None  # set by configure_train (_untouched checked it too)
            for key in untouched:
                arrays[key] = Array(np.ascontiguousarray(self._global[key].numpy().astype(np.float32)))
        total = sum(o.weight for o in outcomes.values() if o.status == "ok")
        return arrays, MetricRecord({"hospitals-ok": len(accepted), "weight": float(total)})

    def _class_means_head(self, accepted: list[Message]) -> ArrayRecord:
        """The class-sums round: the weighted mean of the replies (each site's noisy sums over its
        declared size, weighted by that size: sum(S) / sum(w)) made into the head. Whatever robust
        strategy runs the other rounds, this one is a mean: the sums are meant to be added."""
        assert self._global is not None and self.label_prototypes is not None
        weights = [_number(m.content.metric_records[METRICS]["num-examples"]) for m in accepted]
        merged = aggregate_arrayrecords([m.content for m in accepted], "num-examples")
        state = arrays_to_state(merged)
        assert self._plan is not None  # a class-sums round is known from its plan
        sigma = class_sums_sigma(self._plan, self._plan.delta or DEFAULT_DELTA) if self._plan.private else 0.0
        prior = label_weight(self.label_prior, sigma, len(accepted))
        state[HEAD_WEIGHT_KEY] = head_from_class_sums(
            state[HEAD_WEIGHT_KEY], sum(weights), self.label_prototypes, prior, self.logit_scale
        )
        return state_to_arrays(state)

    def _bound(self, declared_size: float) -> float:
        """The largest update norm an honest site of this declared size sends this round."""
        if self.norm_bound is not None:
            return self.norm_bound
        if self._plan is None:
            raise ValueError("a derived norm bound needs the round plan in the train config")
        assert self._global is not None
        global_norm = float(torch.linalg.vector_norm(self._global[HEAD_WEIGHT_KEY]))
        return update_bound(self._plan, declared_size, global_norm)

    def _untouched(self, accepted: list[Message]) -> list[str]:
        """The tensors no hospital changed: they stay bit-identical to the ones sent.

        Any average of equal values is that value, but float rounding in the weighted sum moves
        it by an ulp: with a frozen prompt (head-only training) that would make every site
        recompute its frozen features each round, and drift the prompt for nothing.
        """
        assert self._global is not None
        replies = [arrays_to_state(m.content.array_records[ARRAYS]) for m in accepted]
        return [key for key, sent in self._global.items() if all(torch.equal(r[key], sent) for r in replies)]

    def _judge(self, msg: Message) -> HospitalOutcome:
        if (settled := judge_unanswered(msg)) is not None:
            return HospitalOutcome(*settled)
        content = msg.content
        try:
            upload = payload_bytes(content.array_records[ARRAYS]) if ARRAYS in content.array_records else 0
        except Exception:  # noqa: BLE001 - a hostile Array may not even have bytes
            upload = 0
        assert self._global is not None  # set by configure_train, before any reply
        reason = validate_update(content, self.shapes, self._global, self._bound)
        if reason:
            return HospitalOutcome("rejected", reason, upload_bytes=upload)
        m = content.metric_records[METRICS]  # every field present and typed: validate_update checked them
        return HospitalOutcome(
            "ok",
            weight=_number(m["num-examples"]),
            epsilon_spent=_number(m["epsilon-spent"]) if "epsilon-spent" in m else None,
            epsilon_cap=_number(m["epsilon-cap"]) if "epsilon-cap" in m else None,
            upload_bytes=upload,
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._mark(server_round, "evaluate_sent")
        if self.evaluate_in_train:
            return []
        config = ConfigRecord(dict(config))
        config["fp.round"] = self.global_round(server_round)
        # The server's own plan (server/federation.py); a bare config (tests of the guard) carries none.
        self._plan = RoundPlan.from_config_record(config) if f"{PLAN_PREFIX}run_name" in config else None
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Sum the noised per-class counts of the sites that share them (`share_evaluation: noised`).

        By default no site shares (each evaluates and logs locally): the result is None, and the
        run's quality is the aggregator's own test-set evaluation. Noised counts are summed, then
        each total clipped at 0; there is no loss (no site sends one).
        """
        self._mark(server_round, "evaluate_received")
        if self.evaluate_in_train:
            return None  # the counts came with the updates (aggregate_train)
        shared = []
        for msg in replies:
            if msg.has_error():
                continue
            reason = validate_evaluation(msg.content, self.num_labels)
            if reason:
                log.warning("round %d: malformed evaluation reply ignored: %s", self.global_round(server_round), reason)
                continue
            if METRICS in msg.content.metric_records:  # else refused, or evaluated locally (the default)
                shared.append(msg.content.metric_records[METRICS])
        self.eval_results[server_round] = result = self._sum_counts(shared, model_round=self.global_round(server_round))
        if result is None:
            return None
        return MetricRecord(
            {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )

    def _sum_counts(self, shared: list[MetricRecord], model_round: int) -> dict | None:
        """The sum of the sites' noised per-class counts (validated), each total clipped at 0;
        None if no site shared. `model_round`: the global model they evaluated."""
        total = ClassCounts.zeros(self.num_labels)
        for m in shared:
            total = total + ClassCounts(_numbers(m["tp"]), _numbers(m["fp"]), _numbers(m["fn"]))
        clipped = ClassCounts(
            [max(0.0, v) for v in total.tp], [max(0.0, v) for v in total.fp], [max(0.0, v) for v in total.fn]
        )
        if not shared or clipped.n <= 0:
            return None
        s = clipped.summary()
        return {
            "accuracy": s["accuracy"],
            "macro_f1": s["macro_f1"],
            "loss": None,
            "num_examples": round(s["num_examples"]),
            "noised": True,
            "hospitals": len(shared),
            "model_round": model_round,
        }

    def outcomes_json(self, server_round: int) -> dict[str, dict]:
        return {k: asdict(v) for k, v in self.train_outcomes.get(server_round, {}).items()}
