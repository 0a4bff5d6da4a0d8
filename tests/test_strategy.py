"""The aggregator's guard: every malformed update is rejected with its reason, the round goes on,
and each strategy aggregates only the accepted tensors (no simulation needed: real Messages)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, Error, Message, Metadata, MetricRecord, RecordDict

from fedprompt.common.config import FederationConfig, StrategySettings
from fedprompt.common.model import PromptConfig
from fedprompt.common.wire import ARRAYS, METRICS, STATUS, refusal, state_to_arrays, status_record
from fedprompt.server.strategy import ValidatedStrategy, build_strategy

PROMPT = PromptConfig(labels=["a", "b", "c"], hidden_size=4, backbone_fingerprint="f" * 64, n_virtual_tokens=2)
GLOBAL = {"prompt.weight": torch.zeros(2, 4), "head.weight": torch.zeros(3, 4), "head.bias": torch.zeros(3)}


def reply(node: int, content: RecordDict | None = None, error: str | None = None, sender: int | None = None) -> Message:
    md = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node if sender is None else sender, dst_node_id=0, reply_to_message_id=f"m{node}",
                  group_id="1", created_at=0.0, ttl=60, message_type="train")
    if error:
        return Message(metadata=md, error=Error(code=1, reason=error))
    return Message(metadata=md, content=content)


def update(value: float, n: int = 10, hospital: str = "h", **tweak) -> RecordDict:
    state = {k: torch.full_like(v, value) for k, v in GLOBAL.items()}
    arrays = state_to_arrays(state)
    for key, arr in tweak.items():
        arrays[key.replace("__", ".")] = Array(arr)
    metrics = MetricRecord({"num-examples": n, "train-loss": 1.0, "epsilon-spent": 1.5, "epsilon-cap": 8.0})
    return RecordDict({ARRAYS: arrays, METRICS: metrics, STATUS: status_record(hospital, "ok")})


def instruction(node: int) -> Message:
    """A train instruction as the Grid leaves it once sent (message id assigned)."""
    md = Metadata(run_id=1, message_id=f"m{node}", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                  group_id="1", created_at=0.0, ttl=60, message_type="train")
    return Message(metadata=md, content=RecordDict())


def guarded(name: str, min_hospitals: int = 1, norm_bound: float = 100.0) -> ValidatedStrategy:
    fed = FederationConfig(name="t", labels=PROMPT.labels, min_hospitals=min_hospitals, strategy=StrategySettings(name=name))
    s = ValidatedStrategy(build_strategy(fed), PROMPT, norm_bound=norm_bound, min_hospitals=min_hospitals, round_offset=4)
    s._global = GLOBAL
    s._sent[1] = [instruction(n) for n in range(1, 10)]
    return s


def test_every_kind_of_bad_update_is_rejected_and_the_round_completes():
    s = guarded("fedavg", norm_bound=50.0)
    bad_nan = update(1.0, hospital="nan")
    arr = bad_nan[ARRAYS]["prompt.weight"].numpy().copy()
    arr[0, 0] = np.inf
    bad_nan[ARRAYS]["prompt.weight"] = Array(arr)
    replies = [
        reply(1, update(1.0, n=10, hospital="h1")),
        reply(2, update(3.0, n=30, hospital="h2")),
        reply(3, bad_nan),
        reply(4, update(1.0, hospital="shape", head__bias=np.zeros(7, np.float32))),
        reply(5, update(1.0, hospital="extra", stolen__tokens=np.arange(6, dtype=np.float32))),
        reply(6, update(1000.0, hospital="scaled")),
        reply(7, update(1.0, hospital="f64", head__weight=np.ones((3, 4), np.float64))),
        reply(8, refusal("capped", "privacy budget: would exceed the cap")),
        reply(9, error="ClientApp crashed"),
    ]
    arrays, metrics = s.aggregate_train(1, replies)
    got = {h: (o.status, o.reason) for h, o in s.train_outcomes[1].items()}
    assert got["h1"] == ("ok", "") and got["h2"] == ("ok", "")
    assert got["nan"][0] == "rejected" and "non-finite" in got["nan"][1]
    assert got["shape"] == ("rejected", "head.bias: shape (7,) != expected (3,)")
    assert got["extra"][0] == "rejected" and "stolen.tokens" in got["extra"][1]
    assert got["scaled"][0] == "rejected" and "exceeds the bound 50" in got["scaled"][1]
    assert got["f64"] == ("rejected", "head.weight: dtype float64 != float32")
    assert got["capped"] == ("refused", "privacy budget: would exceed the cap")
    assert got["node-9"][0] == "failed" and "ClientApp crashed" in got["node-9"][1]
    # FedAvg over the two valid updates, weighted 10:30
    for key in GLOBAL:
        np.testing.assert_allclose(arrays[key].numpy(), 2.5)
    assert metrics["hospitals-ok"] == 2 and metrics["num-examples"] == 40


def test_missing_replies_are_reported_as_failed():
    s = guarded("fedavg")
    s.aggregate_train(1, [reply(1, update(1.0, hospital="h1"))])
    outcomes = s.train_outcomes[1]
    assert outcomes["node-2"].status == "failed" and "timeout" in outcomes["node-2"].reason


def test_superlink_answering_for_an_unavailable_node_is_one_entry_for_that_node():
    s = guarded("fedavg")
    s._sent[1] = [instruction(n) for n in (2, 3)]
    # node 3 is gone: the SuperLink (node id 1) replies in its place with an error
    s.aggregate_train(1, [reply(2, update(1.0, hospital="h2")), reply(3, error="Node Unavailable", sender=1)])
    outcomes = s.train_outcomes[1]
    assert set(outcomes) == {"h2", "node-3"}
    assert outcomes["node-3"].status == "failed" and "Node Unavailable" in outcomes["node-3"].reason


def test_below_min_hospitals_keeps_the_global_model():
    s = guarded("fedavg", min_hospitals=2)
    arrays, metrics = s.aggregate_train(1, [reply(1, update(1.0, hospital="h1")), reply(2, update(float("nan"), hospital="h2"))])
    assert arrays is None and metrics is None


@pytest.mark.parametrize("name, expected", [("fedmedian", 1.0), ("fedtrimmedavg", 1.0), ("fedavg", (1 + 1 + 1 + 1 + 15) / 5)])
def test_robust_strategies_resist_an_outlier_within_the_norm_bound(name, expected):
    s = guarded(name)
    replies = [reply(i, update(1.0, hospital=f"h{i}")) for i in range(1, 5)] + [reply(5, update(15.0, hospital="outlier"))]
    arrays, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["head.bias"].numpy(), expected, rtol=1e-6)


def test_fedprox_and_fedadam_build_and_aggregate():
    for name in ("fedprox", "fedadam"):
        s = guarded(name)
        s.inner.current_arrays = {k: v.numpy() for k, v in GLOBAL.items()}  # set by configure_train (needs a Grid)
        arrays, _ = s.aggregate_train(1, [reply(1, update(1.0, hospital="a")), reply(2, update(1.0, hospital="b"))])
        assert set(arrays.keys()) == set(GLOBAL)


def test_evaluation_is_exact_from_summed_counts():
    s = guarded("fedavg")
    def ev(node, tp, fp, fn, loss):
        m = MetricRecord({"num-examples": sum(tp) + sum(fn), "loss-sum": loss, "tp": tp, "fp": fp, "fn": fn})
        return reply(node, RecordDict({METRICS: m, STATUS: status_record("h", "ok")}))
    out = s.aggregate_evaluate(1, [ev(1, [5, 0, 0], [0, 5, 0], [0, 0, 5], 10.0), ev(2, [0, 5, 0], [0, 0, 0], [5, 0, 0], 5.0)])
    # summed: tp [5,5,0], fp [0,5,0], fn [5,0,5]; n = 20
    assert out["accuracy"] == pytest.approx(10 / 20)
    f1 = [10 / 15, 10 / 15, 0.0]
    assert out["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert out["loss"] == pytest.approx(15 / 20)


def test_round_numbers_continue_after_resume():
    s = guarded("fedavg")
    assert s.global_round(1) == 5


def test_a_tensor_no_hospital_changed_stays_bit_identical():
    """With a frozen prompt every site returns the prompt it received: FedAvg's weighted sum
    would move it by float rounding (and make every site recompute its frozen features)."""
    prompt = PromptConfig(labels=["a", "b", "c"], hidden_size=8, backbone_fingerprint="f", n_virtual_tokens=3)
    gen = torch.Generator().manual_seed(0)
    sent = {k: torch.randn(*shape, generator=gen) for k, shape in prompt.shapes().items()}
    strategy = ValidatedStrategy(build_strategy(FederationConfig(name="t", labels=prompt.labels), 3), prompt, norm_bound=1e3, min_hospitals=1)
    strategy._global = sent
    replies = []
    for i, n in enumerate((7, 11, 13)):
        state = {**sent, "head.weight": sent["head.weight"] + 0.1 * (i + 1)}  # the head moves, the prompt does not
        md = Metadata(run_id=1, message_id=f"r{i}", src_node_id=i + 1, dst_node_id=0, reply_to_message_id=f"m{i}", group_id="1",
                      created_at=0.0, ttl=60, message_type="train")
        metrics = MetricRecord({"num-examples": n, "train-loss": 1.0})
        replies.append(Message(metadata=md, content=RecordDict({ARRAYS: state_to_arrays(state), METRICS: metrics, STATUS: status_record(f"h{i}", "ok")})))
    strategy._sent[1] = [instruction(i) for i in range(3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.array_equal(arrays["prompt.weight"].numpy(), sent["prompt.weight"].numpy())
    expected = sent["head.weight"] + (0.1 * 7 + 0.2 * 11 + 0.3 * 13) / 31
    assert np.allclose(arrays["head.weight"].numpy(), expected.numpy(), atol=1e-6)
    assert not np.array_equal(arrays["head.weight"].numpy(), sent["head.weight"].numpy())
