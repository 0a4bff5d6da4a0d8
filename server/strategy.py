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
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedprompt.common.backbone import Backbone
from fedprompt.common.config import FederationConfig
from fedprompt.common.metrics import ClassCounts
from fedprompt.common.model import HEAD_WEIGHT_KEY, PromptConfig
from fedprompt.common.plan import PREFIX as PLAN_PREFIX
from fedprompt.common.plan import RoundPlan
from fedprompt.common.schedule import DEFAULT_DELTA, class_sums_round, class_sums_sigma, update_bound
from fedprompt.common.wire import (
    ARRAYS,
    METRICS,
    STATUS,
    Counts,
    EvaluateReply,
    Refusal,
    ReplyError,
    TrainReply,
    arrays_to_state,
    check_update,
    payload_bytes,
    state_to_arrays,
)
from fedprompt.common.zeroshot import label_prototypes

from .class_means import head_from_class_sums, label_weight
from .history import HospitalOutcome
from .strategies import build_strategy as build_strategy  # its home before the registry

log = logging.getLogger("fedprompt.server")


def _number(value: object) -> float:
    """A metric value that validation has already checked to be a finite number."""
    assert isinstance(value, (int, float))
    return float(value)


def judge_unanswered(msg: Message) -> tuple[Literal["failed", "rejected", "refused"], str] | None:
    """An error reply ("failed") or a refusal ("refused" with its category, or "rejected" if malformed);
    None for a reply that answers the message (train and pre-flight replies alike)."""
    if msg.has_error():  # its first line: an engine's reason can run to pages (a dead Ray actor's does)
        first = (msg.error.reason or "").strip().split("\n", 1)[0]
        return "failed", f"error reply: {first[:200]}"
    status = msg.content.config_records.get(STATUS)
    if status is not None and status.get("status") == "refused":
        try:
            return "refused", Refusal.from_content(msg.content).status.reason  # a category
        except ReplyError as exc:
            return "rejected", f"malformed refusal: {exc}"
    return None


@dataclass(frozen=True)
class Witness:
    """What a site's last accepted reply showed of its privacy ledger (its head: the last entry's hash)."""

    head: str
    epsilon_spent: float | None  # None: a non-private round
    round: int


def witnessed(history: Iterable[dict]) -> dict[str, Witness]:
    """Each hospital's last accepted ledger head and epsilon in a run's history (a resumed run goes on from them)."""
    seen: dict[str, Witness] = {}
    for record in history:
        for hospital, o in record["hospitals"].items():
            if o["status"] == "ok" and o.get("ledger_head"):
                seen[hospital] = Witness(o["ledger_head"], o.get("epsilon_spent"), record["round"])
    return seen


def rolled_back(seen: Witness | None, reply: TrainReply) -> str | None:
    """Why a site's ledger is not a continuation of the one it showed before, or None.

    An honest ledger only grows: its epsilon never decreases, and its chain keeps every entry the
    aggregator saw (LedgerChain holds the run's entry hashes, so a site that skipped or lost a round
    still shows the head it reported before it)."""
    if seen is None:
        return None
    hospital, spent = reply.status.hospital_id, reply.metrics.epsilon_spent
    if seen.epsilon_spent is not None and spent is not None and spent < seen.epsilon_spent:
        return (
            f"{hospital}: privacy ledger rolled back: epsilon spent {spent:.4f} is below the {seen.epsilon_spent:.4f} "
            f"it reported in round {seen.round}"
        )
    if seen.head not in reply.ledger.chain:
        return (
            f"{hospital}: privacy ledger rolled back or replaced: its chain does not extend the head "
            f"{seen.head[:16]}... it reported in round {seen.round} (entries were cut, or an older copy restored)"
        )
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


@dataclass(frozen=True)
class ClassMeansHead:
    """How the class-sums round's replies become the global head (server/class_means.py): against the label
    texts' prototypes, with federation.yaml's `training.label_prior` and `model.logit_scale`."""

    label_prototypes: torch.Tensor
    label_prior: float
    logit_scale: float

    @classmethod
    def for_run(cls, fed: FederationConfig, backbone: Backbone, prompt: PromptConfig) -> ClassMeansHead:
        return cls(label_prototypes(backbone, prompt, fed.label_texts), fed.training.label_prior, fed.model.logit_scale)

    def apply(
        self, merged: dict[str, torch.Tensor], total_weight: float, sites: int, plan: RoundPlan
    ) -> dict[str, torch.Tensor]:
        """`merged` (the weighted mean of `sites` replies: each site's noisy sums over its declared size,
        weighted by that size, sum(S) / sum(w); or a robust strategy's estimate of it) with its head made
        from those sums."""
        sigma = class_sums_sigma(plan, plan.delta or DEFAULT_DELTA) if plan.private else 0.0
        prior = label_weight(self.label_prior, sigma, sites)
        head = head_from_class_sums(
            merged[HEAD_WEIGHT_KEY], total_weight, self.label_prototypes, prior, self.logit_scale
        )
        return {**merged, HEAD_WEIGHT_KEY: head}


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
        class_means: ClassMeansHead | None = None,
        witnessed: dict[str, Witness] | None = None,
    ):
        self.inner = inner
        # Each hospital's ledger head and epsilon as its last accepted reply showed them (rollback witness).
        self.witnessed: dict[str, Witness] = dict(witnessed or {})
        # The class-sums round builds the head from the released sums with it (None: no class-sums round).
        self.class_means = class_means
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
        shared: list[Counts] = []
        for msg in replies:
            node = sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            answered.add(node)
            who = identity(msg, node, set(outcomes), self.names)
            outcome, reply = self._judge(msg, server_round)
            outcomes[who] = outcome
            if reply is not None:
                if reply.evaluation is not None:
                    shared.append(reply.evaluation)
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
            arrays = self._class_means_head(server_round, accepted)
        else:
            arrays, _ = self.inner.aggregate_train(server_round, accepted)
        self.aggregated[server_round] = arrays is not None
        if arrays is not None:
            assert self._global is not None  # set by configure_train (_untouched checked it too)
            for key in untouched:
                arrays[key] = Array(np.ascontiguousarray(self._global[key].numpy().astype(np.float32)))
        total = sum(o.weight for o in outcomes.values() if o.status == "ok")
        return arrays, MetricRecord({"hospitals-ok": len(accepted), "weight": float(total)})

    def _class_means_head(self, server_round: int, accepted: list[Message]) -> ArrayRecord | None:
        """The class-sums round: the replies (each site's noisy sums over its declared size) aggregated, made
        into the head (ClassMeansHead). By the run's strategy where it is an aggregator: FedAvg (weights =
        declared sizes) adds the sums, sum(S) / sum(w); a robust one gives a robust estimate of that
        per-record mass, which one hostile site inside the norm bound cannot drag as it drags a sum
        (tests/test_faults_hostile.py). A server optimiser (FedOpt: FedAdam) steps from the global model
        instead of aggregating, so its round is the plain weighted mean (and its moments stay untouched)."""
        assert self.class_means is not None and self._plan is not None  # a class-sums round is known from its plan
        weight = sum(_number(m.content.metric_records[METRICS]["num-examples"]) for m in accepted)
        if isinstance(self.inner, FedOpt):
            merged: ArrayRecord | None = aggregate_arrayrecords([m.content for m in accepted], "num-examples")
        else:
            merged, _ = self.inner.aggregate_train(server_round, accepted)
        if merged is None:
            return None
        return state_to_arrays(self.class_means.apply(arrays_to_state(merged), weight, len(accepted), self._plan))

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

    def _judge(self, msg: Message, server_round: int) -> tuple[HospitalOutcome, TrainReply | None]:
        """The reply's outcome, and the reply parsed (None unless accepted)."""
        if (settled := judge_unanswered(msg)) is not None:
            return HospitalOutcome(*settled), None
        content = msg.content
        try:
            upload = payload_bytes(content.array_records[ARRAYS]) if ARRAYS in content.array_records else 0
        except Exception:  # noqa: BLE001 - a hostile Array may not even have bytes
            upload = 0
        assert self._global is not None  # set by configure_train, before any reply
        try:
            reply = TrainReply.from_content(content, num_labels=self.num_labels)
        except ReplyError as exc:
            return HospitalOutcome("rejected", str(exc), upload_bytes=upload), None
        m, hospital = reply.metrics, reply.status.hospital_id
        reason = rolled_back(self.witnessed.get(hospital), reply) or check_update(
            content.array_records[ARRAYS], self.shapes, self._global, self._bound(m.num_examples)
        )
        if reason:
            return HospitalOutcome("rejected", reason, upload_bytes=upload), None
        self.witnessed[hospital] = Witness(reply.ledger.head, m.epsilon_spent, self.global_round(server_round))
        outcome = HospitalOutcome(
            "ok",
            weight=m.num_examples,
            epsilon_spent=m.epsilon_spent,
            epsilon_cap=m.epsilon_cap,
            delta=m.delta,
            ledger_head=reply.ledger.head,
            upload_bytes=upload,
        )
        return outcome, reply

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
            if judge_unanswered(msg) is not None:  # an error reply or a refusal (well-formed or not)
                continue
            try:
                reply = EvaluateReply.from_content(msg.content, num_labels=self.num_labels)
            except ReplyError as exc:
                log.warning("round %d: malformed evaluation reply ignored: %s", self.global_round(server_round), exc)
                continue
            if reply.metrics is not None:  # else evaluated locally (the default)
                shared.append(reply.metrics)
        self.eval_results[server_round] = result = self._sum_counts(shared, model_round=self.global_round(server_round))
        if result is None:
            return None
        return MetricRecord(
            {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )

    def _sum_counts(self, shared: list[Counts], model_round: int) -> dict | None:
        """The sum of the sites' noised per-class counts (validated), each total clipped at 0;
        None if no site shared. `model_round`: the global model they evaluated."""
        total = ClassCounts.zeros(self.num_labels)
        for m in shared:
            total = total + ClassCounts(m.tp, m.fp, m.fn)
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
