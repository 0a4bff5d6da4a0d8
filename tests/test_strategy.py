"""The aggregator's guard: every malformed update is rejected with its reason, the round goes on,
and each strategy aggregates only the accepted tensors (no simulation needed: real Messages).
Every field of a reply is type-checked: each missing, and each of a wrong type, is "rejected",
never a crash. The strategy registry (server/strategies/) covers every name federation.yaml accepts;
Krum, Multi-Krum and Bulyan run a real round and refuse a federation too small for their rule."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
import torch
from conftest import edit_yaml, make_workspace
from flwr.app import Array, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedprompt.common.config import FederationConfig, StrategyName, StrategySettings
from fedprompt.common.errors import InputError
from fedprompt.common.model import PromptConfig
from fedprompt.common.plan import RoundPlan
from fedprompt.common.wire import (
    ARRAYS,
    EVALUATION,
    LEDGER,
    METRICS,
    REFUSAL_CATEGORIES,
    STATUS,
    Counts,
    EvaluateReply,
    LedgerChain,
    Refusal,
    ReplyError,
    Status,
    TrainMetrics,
    TrainReply,
    refusal,
    state_to_arrays,
)
from fedprompt.server.strategies import REGISTRY, build_strategy
from fedprompt.server.strategy import ClassMeansHead, ValidatedStrategy, Witness, witnessed

PROMPT = PromptConfig(labels=["a", "b", "c"], hidden_size=4, backbone_fingerprint="f" * 64, n_virtual_tokens=2)
GLOBAL = {"prompt.weight": torch.zeros(2, 4), "head.weight": torch.zeros(3, 4), "head.bias": torch.zeros(3)}


def reply(node: int, content: RecordDict | None = None, error: str | None = None, sender: int | None = None) -> Message:
    md = Metadata(
        run_id=1,
        message_id=f"r{node}",
        src_node_id=node if sender is None else sender,
        dst_node_id=0,
        reply_to_message_id=f"m{node}",
        group_id="1",
        created_at=0.0,
        ttl=60,
        message_type="train",
    )
    if error:
        return Message(metadata=md, error=Error(code=1, reason=error))
    return Message(metadata=md, content=content)


HEAD = "a" * 64  # a ledger head


def update(
    value: float, n: int = 10, hospital: str = "h", chain: tuple[str, ...] = (HEAD,), spent: float = 1.5, **tweak
) -> RecordDict:
    state = {k: torch.full_like(v, value) for k, v in GLOBAL.items()}
    arrays = state_to_arrays(state)
    for key, arr in tweak.items():
        arrays[key.replace("__", ".")] = Array(arr)
    return TrainReply(
        status=Status.ok(hospital),
        metrics=TrainMetrics(num_examples=n, private=1, epsilon_spent=spent, epsilon_cap=8.0, delta=1e-5),
        ledger=LedgerChain(chain=list(chain)),
    ).to_content(arrays)


def instruction(node: int) -> Message:
    """A train instruction as the Grid leaves it once sent (message id assigned)."""
    md = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=60,
        message_type="train",
    )
    return Message(metadata=md, content=RecordDict())


def guarded(name: str, min_hospitals: int = 1, norm_bound: float = 100.0, **params) -> ValidatedStrategy:
    fed = FederationConfig(
        name="t", labels=PROMPT.labels, min_hospitals=min_hospitals, strategy={"name": name, **params}
    )
    s = ValidatedStrategy(
        build_strategy(fed), PROMPT, norm_bound=norm_bound, min_hospitals=min_hospitals, round_offset=4
    )
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
        reply(8, refusal("capped", "budget")),
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
    assert got["capped"] == ("refused", "budget")
    assert got["node-9"][0] == "failed" and "ClientApp crashed" in got["node-9"][1]
    # FedAvg over the two valid updates, weighted 10:30 (the weights the sites declared)
    for key in GLOBAL:
        np.testing.assert_allclose(arrays[key].numpy(), 2.5)
    assert dict(metrics) == {"hospitals-ok": 2, "weight": 40.0}  # no loss: no site sends one


def test_a_node_that_named_itself_once_is_reported_by_name_when_it_fails_later():
    s = guarded("fedavg")
    s._sent[1] = [instruction(n) for n in (2, 3)]
    s.aggregate_train(1, [reply(2, update(1.0, hospital="h2")), reply(3, update(1.0, hospital="h3"))])
    s._sent[2] = [instruction(n) for n in (2, 3)]
    # round 2: node 3 is gone (the SuperLink answers for it); node 2 is silent until the timeout
    s.aggregate_train(2, [reply(3, error="Node Unavailable", sender=1)])
    outcomes = s.train_outcomes[2]
    assert set(outcomes) == {"h2", "h3"}
    assert outcomes["h3"].status == "failed" and "Node Unavailable" in outcomes["h3"].reason
    assert outcomes["h2"].status == "failed" and "timeout" in outcomes["h2"].reason


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
    arrays, metrics = s.aggregate_train(
        1, [reply(1, update(1.0, hospital="h1")), reply(2, update(float("nan"), hospital="h2"))]
    )
    assert arrays is None and metrics is None


@pytest.mark.parametrize(
    "name, params, n, expected",
    [
        ("fedmedian", {}, 5, 1.0),
        ("fedtrimmedavg", {}, 5, 1.0),
        ("krum", {"malicious_hospitals": 1}, 5, 1.0),
        ("multikrum", {"malicious_hospitals": 1, "selected_hospitals": 3}, 5, 1.0),
        ("bulyan", {"malicious_hospitals": 1}, 7, 1.0),
        ("fedavg", {}, 5, (1 + 1 + 1 + 1 + 15) / 5),
    ],
)
def test_robust_strategies_resist_an_outlier_within_the_norm_bound(name, params, n, expected):
    s = guarded(name, min_hospitals=n, **params)
    replies = [reply(i, update(1.0, hospital=f"h{i}")) for i in range(1, n)] + [
        reply(n, update(15.0, hospital="outlier"))
    ]
    arrays, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["head.bias"].numpy(), expected, rtol=1e-6)


def _class_sums_head(name: str, outlier: float | None) -> np.ndarray:
    """The head a class-sums round (round 1 of a 2-round plan) makes of four sites' equal sums, and a
    fifth site's (`outlier`; None: it sent nothing)."""
    s = guarded(name, min_hospitals=4)
    s.class_means = ClassMeansHead(torch.eye(3, 4), label_prior=0.0, logit_scale=10.0)
    s._plan = RoundPlan.for_run(FederationConfig(name="t", labels=PROMPT.labels, rounds=2), PROMPT, round=1)
    s.inner.current_arrays = {k: v.numpy() for k, v in GLOBAL.items()}  # fedadam's, set by configure_train
    sums = [update(1.0 + i / 10, hospital=f"h{i}") for i in range(1, 5)]
    if outlier is not None:
        sums.append(update(outlier, hospital="outlier"))
    arrays, _ = s.aggregate_train(1, [reply(i, u) for i, u in enumerate(sums, 1)])
    return arrays["head.weight"].numpy()


def test_the_class_sums_round_is_aggregated_by_the_strategy():
    """A robust rule protects the class-sums round (the default run's only round): one site's sums inside
    the bound move FedAvg's head and not the median's; FedAdam, a server optimiser, takes the plain mean
    there (its step from the global model would not be a sum of class sums)."""
    assert np.array_equal(_class_sums_head("fedmedian", 15.0), _class_sums_head("fedmedian", 1.3))
    assert not np.allclose(_class_sums_head("fedavg", 15.0), _class_sums_head("fedavg", None), atol=1e-3)
    np.testing.assert_allclose(_class_sums_head("fedadam", 15.0), _class_sums_head("fedavg", 15.0), rtol=1e-6)


def test_fedprox_and_fedadam_build_and_aggregate():
    for name in ("fedprox", "fedadam"):
        s = guarded(name)
        s.inner.current_arrays = {k: v.numpy() for k, v in GLOBAL.items()}  # set by configure_train (needs a Grid)
        arrays, _ = s.aggregate_train(1, [reply(1, update(1.0, hospital="a")), reply(2, update(1.0, hospital="b"))])
        assert set(arrays.keys()) == set(GLOBAL)


# --- the registry: one entry per strategy, for every name federation.yaml accepts ---------------------
def _members() -> dict[str, type]:
    """StrategySettings' member models by the name their `name` field holds."""
    union, _ = get_args(StrategySettings)  # Annotated[member | ..., Discriminator]
    models = [get_args(tagged)[0] for tagged in get_args(union)]
    return {get_args(m.model_fields["name"].annotation)[0]: m for m in models}


def test_the_registry_covers_every_strategy_the_configuration_accepts():
    members = _members()
    assert set(members) == set(REGISTRY) == set(get_args(StrategyName))
    assert len(REGISTRY) == 8 and {"krum", "multikrum", "bulyan"} <= set(REGISTRY)
    for name, entry in REGISTRY.items():
        assert entry["settings"] is members[name]
        least, _ = members[name].model_validate({"name": name}).least_hospitals()
        fed = FederationConfig(name="t", labels=["a", "b"], min_hospitals=least, strategy={"name": name})
        built = build_strategy(fed, wait_for=least + 2)
        assert isinstance(built, Strategy) and type(built).__name__.lower() == name
        assert built.min_train_nodes == least + 2  # samples every connected node once all are

    # each strategy's own parameters reach Flower's
    def built(min_hospitals: int = 2, **strategy):
        return build_strategy(
            FederationConfig(name="t", labels=["a", "b"], min_hospitals=min_hospitals, strategy=strategy)
        )

    assert built(name="fedprox", proximal_mu=0.3).proximal_mu == 0.3
    assert built(name="fedadam", server_lr=0.5).eta == 0.5
    assert built(name="fedtrimmedavg", trim_beta=0.1).beta == 0.1
    assert built(9, name="krum", malicious_hospitals=3).num_malicious_nodes == 3
    multi = built(7, name="multikrum", malicious_hospitals=2, selected_hospitals=4)
    assert (multi.num_malicious_nodes, multi.num_nodes_to_select) == (2, 4)
    assert built(11, name="bulyan", malicious_hospitals=2).num_malicious_nodes == 2


FLAT = """\
name: t
labels: [a, b]
min_hospitals: 7
strategy:
  name: {name}
  proximal_mu: {mu}
  trim_beta: 0.2
  server_lr: 0.1
  update_norm_bound: null
"""


def test_a_flat_strategy_block_of_earlier_releases_still_loads(tmp_path):
    """Every federation.yaml fedprompt wrote held all the strategies' parameters in one block: each
    strategy accepts the others' at their old defaults. Another value (it never had an effect) is refused."""
    path = tmp_path / "federation.yaml"
    for name in get_args(StrategyName):
        path.write_text(FLAT.format(name=name, mu=0.01))
        assert FederationConfig.load(path).strategy == REGISTRY[name]["settings"].model_validate({"name": name})
    path.write_text(FLAT.format(name="fedavg", mu=0.5))
    with pytest.raises(InputError) as err:
        FederationConfig.load(path)
    assert str(err.value) == f"{path}:6: strategy.proximal_mu: unknown key (expected one of: name, update_norm_bound)"


@pytest.mark.parametrize(
    "strategy, least, message",
    [
        ("name: krum", 5, "krum (malicious_hospitals 1) needs min_hospitals >= 5 (n > 2f + 2"),
        (
            "name: krum\n  malicious_hospitals: 2",
            7,
            "krum (malicious_hospitals 2) needs min_hospitals >= 7 (n > 2f + 2",
        ),
        (
            "name: multikrum\n  selected_hospitals: 5",
            6,
            "multikrum (malicious_hospitals 1, selected_hospitals 5) needs min_hospitals >= 6 "
            "(n > 2f + 2 and n >= f + m",
        ),
        ("name: bulyan", 7, "bulyan (malicious_hospitals 1) needs min_hospitals >= 7 (n >= 4f + 3"),
    ],
)
def test_a_federation_too_small_for_the_rule_is_refused_at_start(tmp_path, strategy, least, message):
    path = tmp_path / "federation.yaml"
    text = f"name: t\nlabels: [a, b]\nmin_hospitals: {least - 1}\nstrategy:\n  {strategy}\n"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        FederationConfig.load(path)
    assert str(err.value).startswith(f"{path}:4: strategy: {message}, n: the updates aggregated in a round")
    assert str(err.value).endswith(f"got min_hospitals {least - 1}") and err.value.exit_code == 2
    path.write_text(text.replace(f"min_hospitals: {least - 1}", f"min_hospitals: {least}"))
    assert FederationConfig.load(path).strategy.least_hospitals()[0] == least


def test_the_simulate_command_refuses_krum_with_too_few_hospitals_before_anything_runs(tmp_path, capsys):
    from fedprompt import cli

    ws = make_workspace(tmp_path, None, hospitals=3, per_hospital=10, test_size=10)
    fed_yaml = ws / "federation.yaml"
    edit_yaml(fed_yaml, lambda d: d["strategy"].update(name="krum"))
    out = tmp_path / "out"
    assert cli.main(["simulate", "--workspace", str(ws), "--out", str(out), "--engine", "local"]) == 2
    err = capsys.readouterr().err
    assert f"{fed_yaml}:" in err and "strategy: krum (malicious_hospitals 1) needs min_hospitals >= 5" in err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.simulation
@pytest.mark.parametrize(
    "strategy, hospitals",
    [
        ({"name": "krum", "malicious_hospitals": 1}, 5),
        ({"name": "multikrum", "malicious_hospitals": 1, "selected_hospitals": 2}, 5),
        ({"name": "bulyan", "malicious_hospitals": 1}, 7),
    ],
    ids=["krum", "multikrum", "bulyan"],
)
def test_byzantine_robust_strategies_run_a_real_round(tmp_path, tiny_dir, strategy, hospitals):
    """One DP-SGD round (no class-sums release: that round is a mean whatever the strategy) of the
    product's apps on the in-process engine, aggregated by Flower's Krum / MultiKrum / Bulyan."""
    from fedprompt.simulation import LOG_NAME, ensure_ledgers, simulate

    overrides = {
        "rounds": 1,
        "model": {"max_length": 16},
        "training": {"class_sums_share": 0.0, "local_epochs": 1, "lr": 0.05},
        "strategy": strategy,
    }
    ws = make_workspace(tmp_path, tiny_dir, hospitals=hospitals, per_hospital=12, test_size=12, overrides=overrides)
    ensure_ledgers(ws)
    out = tmp_path / "out"
    metrics = simulate(ws, out, backbone=tiny_dir, non_private=True, engine="local", compare=False)
    assert (metrics["strategy"], metrics["outcome"]) == (strategy["name"], "trained")
    last = metrics["rounds"][-1]
    assert last["round"] == 1 and last["aggregated"] is True
    assert sorted(o["status"] for o in last["hospitals"].values()) == ["ok"] * hospitals
    log = (out / "logs" / LOG_NAME).read_text()
    flower_name = {"krum": "Krum", "multikrum": "MultiKrum", "bulyan": "Bulyan"}[strategy["name"]]
    assert f"{flower_name} settings:" in log and "Number of malicious nodes: 1" in log  # Flower's own summary


def _eval_reply(node: int, metrics: dict | None = None, hospital: str = "h") -> Message:
    content = RecordDict({STATUS: Status.ok(hospital).to_record()})
    if metrics is not None:
        content[METRICS] = MetricRecord(metrics)
    return reply(node, content)


def test_evaluation_stays_local_by_default_so_there_is_nothing_to_aggregate():
    """Sites evaluate locally and reply with their status alone: the round's "evaluate" is null."""
    s = guarded("fedavg")
    out = s.aggregate_evaluate(
        1, [_eval_reply(1), _eval_reply(2), reply(3, refusal("h3", "records")), reply(4, error="gone")]
    )
    assert out is None and s.eval_results[1] is None


def test_noised_evaluation_counts_are_summed_and_clipped():
    """Sites with `share_evaluation: noised` send noised per-class counts (floats, maybe < 0):
    the aggregator sums them, clips each total at 0, and reports no loss (none is sent)."""
    s = guarded("fedavg")
    out = s.aggregate_evaluate(
        1,
        [
            _eval_reply(1, {"tp": [5.0, 0.0, 0.0], "fp": [0.0, 5.0, 0.0], "fn": [0.0, 0.0, 5.0]}),
            _eval_reply(2, {"tp": [0.0, 5.0, -0.5], "fp": [0.0, 0.0, 0.0], "fn": [5.0, 0.0, 5.0]}),
            _eval_reply(3),  # evaluated locally only
            _eval_reply(4, {"tp": [1.0, 2.0], "fp": [0.0, 0.0], "fn": [0.0, 0.0]}),  # wrong length: ignored
            _eval_reply(5, {"tp": [1.0] * 3, "fp": [0.0] * 3, "fn": [0.0] * 3, "loss-sum": 3.0}),  # a loss: ignored
        ],
    )
    # summed: tp [5, 5, -0.5 -> 0], fp [0, 5, 0], fn [5, 0, 10]; n = 25
    assert s.eval_results[1]["accuracy"] == pytest.approx(10 / 25)
    f1 = [10 / 15, 10 / 15, 0.0]
    assert s.eval_results[1]["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert s.eval_results[1]["loss"] is None and s.eval_results[1]["num_examples"] == 25
    assert s.eval_results[1]["noised"] is True and s.eval_results[1]["hospitals"] == 2
    assert "loss" not in out and out["accuracy"] == pytest.approx(0.4)


def test_round_numbers_continue_after_resume():
    s = guarded("fedavg")
    assert s.global_round(1) == 5


def test_a_tensor_no_hospital_changed_stays_bit_identical():
    """With a frozen prompt every site returns the prompt it received: FedAvg's weighted sum
    would move it by float rounding (and make every site recompute its frozen features)."""
    prompt = PromptConfig(labels=["a", "b", "c"], hidden_size=8, backbone_fingerprint="f", n_virtual_tokens=3)
    gen = torch.Generator().manual_seed(0)
    sent = {k: torch.randn(*shape, generator=gen) for k, shape in prompt.shapes().items()}
    strategy = ValidatedStrategy(
        build_strategy(FederationConfig(name="t", labels=prompt.labels), 3), prompt, norm_bound=1e3, min_hospitals=1
    )
    strategy._global = sent
    replies = []
    for i, n in enumerate((7, 11, 13)):
        state = {**sent, "head.weight": sent["head.weight"] + 0.1 * (i + 1)}  # the head moves, the prompt does not
        md = Metadata(
            run_id=1,
            message_id=f"r{i}",
            src_node_id=i + 1,
            dst_node_id=0,
            reply_to_message_id=f"m{i}",
            group_id="1",
            created_at=0.0,
            ttl=60,
            message_type="train",
        )
        content = TrainReply(
            status=Status.ok(f"h{i}"),
            metrics=TrainMetrics(num_examples=n, private=0),
            ledger=LedgerChain(chain=[HEAD]),
        ).to_content(state_to_arrays(state))
        replies.append(Message(metadata=md, content=content))
    strategy._sent[1] = [instruction(i) for i in range(3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.array_equal(arrays["prompt.weight"].numpy(), sent["prompt.weight"].numpy())
    expected = sent["head.weight"] + (0.1 * 7 + 0.2 * 11 + 0.3 * 13) / 31
    assert np.allclose(arrays["head.weight"].numpy(), expected.numpy(), atol=1e-6)
    assert not np.array_equal(arrays["head.weight"].numpy(), sent["head.weight"].numpy())


# --- every field of a reply: missing or of a wrong type is "rejected", never a crash -----------------
def _del(record: str, key: str | None = None):
    def change(c: RecordDict) -> None:
        if key is None:
            del c[record]
        else:
            del c[record][key]

    return change


def _set(record: str, key: str, value):
    def change(c: RecordDict) -> None:
        c[record][key] = value

    return change


def _swap(record: str, new_record):
    def change(c: RecordDict) -> None:
        del c[record]
        c[record] = new_record

    return change


def _raw_array(dtype: str, shape: tuple, data: bytes) -> Array:
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


TRAIN_FIELDS = [  # (what, how the reply is changed, a fragment of the rejection reason)
    # records
    ("missing: tensors record", _del(ARRAYS), "ArrayRecord"),
    ("missing: metrics record", _del(METRICS), "MetricRecord"),
    ("missing: status record", _del(STATUS), "ConfigRecord"),
    ("type: tensors record is a MetricRecord", _swap(ARRAYS, MetricRecord({"x": 1.0})), "ArrayRecord"),
    (
        "type: metrics record is a ConfigRecord",
        _swap(METRICS, ConfigRecord({"num-examples": 10, "private": 1})),
        "MetricRecord",
    ),
    ("type: status record is a MetricRecord", _swap(STATUS, MetricRecord({"status": 1})), "Record"),
    (
        "extra: a second ConfigRecord",
        lambda c: c.__setitem__("notes", ConfigRecord({"text": "chest pain"})),
        "unexpected record 'notes'",
    ),
    # tensors
    *[(f"missing: {k}", _del(ARRAYS, k), "tensor keys") for k in GLOBAL],
    ("type: prompt.weight int32", _set(ARRAYS, "prompt.weight", Array(np.zeros((2, 4), np.int32))), "dtype"),
    ("type: head.weight float64", _set(ARRAYS, "head.weight", Array(np.zeros((3, 4), np.float64))), "dtype"),
    (
        "type: head.bias undecodable bytes",
        _set(ARRAYS, "head.bias", _raw_array("float32", (3,), b"garbage")),
        "undecodable",
    ),
    (
        "type: head.bias bytes of another shape",
        _set(ARRAYS, "head.bias", _raw_array("float32", (3,), Array(np.zeros(5, np.float32)).data)),
        "shape",
    ),
    # metrics
    *[(f"missing: {k}", _del(METRICS, k), k) for k in ("num-examples", "private")],
    *[
        (f"missing: {k}", _del(METRICS, k), "a private update carries")
        for k in ("epsilon-spent", "epsilon-cap", "delta")
    ],
    ("type: num-examples a list", _set(METRICS, "num-examples", [10]), "num-examples"),
    ("type: num-examples NaN", _set(METRICS, "num-examples", float("nan")), "num-examples"),
    ("value: num-examples 0", _set(METRICS, "num-examples", 0), "num-examples"),
    ("value: num-examples negative", _set(METRICS, "num-examples", -3.0), "num-examples"),
    ("value: num-examples huge", _set(METRICS, "num-examples", 1e300), "num-examples"),
    ("type: private a float", _set(METRICS, "private", 1.0), "private"),
    ("type: private a list", _set(METRICS, "private", [1]), "private"),
    ("value: private 2", _set(METRICS, "private", 2), "private"),
    ("type: epsilon-spent a list", _set(METRICS, "epsilon-spent", [1.5]), "epsilon-spent"),
    ("type: epsilon-spent NaN", _set(METRICS, "epsilon-spent", float("nan")), "epsilon-spent"),
    ("type: epsilon-cap a list", _set(METRICS, "epsilon-cap", [8.0]), "epsilon-cap"),
    ("type: epsilon-cap inf", _set(METRICS, "epsilon-cap", float("inf")), "epsilon-cap"),
    ("type: delta a list", _set(METRICS, "delta", [1e-5]), "delta"),
    ("value: delta 1", _set(METRICS, "delta", 1), "delta"),
    ("value: epsilon-spent over the cap", _set(METRICS, "epsilon-spent", 9.0), "exceeds the site's own epsilon-cap"),
    ("extra: train-loss (private data)", _set(METRICS, "train-loss", 1.0), "metrics.train-loss: unknown key"),
    ("extra: noise-multiplier (reveals N)", _set(METRICS, "noise-multiplier", 0.9), "noise-multiplier: unknown key"),
    ("extra: privacy fields on a non-private update", _set(METRICS, "private", 0), "non-private update carries"),
    # status
    *[
        (f"missing: status {k}", _del(STATUS, k), f"{k}: missing required key")
        for k in ("hospital-id", "status", "reason")
    ],
    ("type: hospital-id an int", _set(STATUS, "hospital-id", 7), "hospital-id"),
    ("type: hospital-id bytes", _set(STATUS, "hospital-id", b"h1"), "hospital-id"),
    ("value: hospital-id empty", _set(STATUS, "hospital-id", ""), "hospital-id"),
    ("value: hospital-id too long", _set(STATUS, "hospital-id", "h" * 65), "hospital-id"),
    ("type: status a bool", _set(STATUS, "status", True), "status.status: expected one of"),
    ("value: status unknown", _set(STATUS, "status", "fine"), "status.status: expected one of"),
    ("type: reason a list", _set(STATUS, "reason", ["x"]), "reason"),
    ("value: reason text on an ok update", _set(STATUS, "reason", "train.csv:17: label"), "reason"),
    ("extra: status truncated (private data)", _set(STATUS, "truncated", 12), "status.truncated: unknown key"),
    # the ledger chain (the rollback witness)
    ("missing: ledger record", _del(LEDGER), "missing record 'fedprompt.ledger'"),
    ("value: ledger chain empty", _set(LEDGER, "chain", []), "chain: expected at least 1"),
    ("value: ledger head not a hash", _set(LEDGER, "chain", ["/data/train.csv"]), "chain[0]: expected a sha256"),
    ("extra: ledger epsilon", _set(LEDGER, "sigma", "0.9"), "fedprompt.ledger.sigma: unknown key"),
]


@pytest.mark.parametrize("change, fragment", [pytest.param(c, f, id=w) for w, c, f in TRAIN_FIELDS])
def test_each_field_of_a_train_reply_missing_or_mistyped_is_rejected(change, fragment):
    s = guarded("fedavg")
    bad = update(2.0, hospital="bad")
    change(bad)
    arrays, metrics = s.aggregate_train(1, [reply(1, update(1.0, hospital="h1")), reply(2, bad)])
    outcomes = s.train_outcomes[1]
    bad_outcome = outcomes.get("bad") or outcomes["node-2"]  # named by its hospital-id when that is well-formed
    assert bad_outcome.status == "rejected" and fragment in bad_outcome.reason, bad_outcome
    assert outcomes["h1"].status == "ok" and metrics["hospitals-ok"] == 1
    for key in GLOBAL:  # the round completed with the hospital that answered well
        np.testing.assert_allclose(arrays[key].numpy(), 1.0)


REFUSALS = [
    (
        "free text with a record line and a label",
        _set(STATUS, "reason", "train.csv:17: label: unknown label 'x'"),
        "a refusal's reason must be one of",
    ),
    ("reason an int", _set(STATUS, "reason", 3), "reason"),
    ("missing reason", _del(STATUS, "reason"), "reason: missing required key"),
    ("missing hospital-id", _del(STATUS, "hospital-id"), "hospital-id: missing required key"),
    ("hospital-id a list", _set(STATUS, "hospital-id", ["h"]), "hospital-id"),
    ("carries tensors", lambda c: c.__setitem__(ARRAYS, state_to_arrays(GLOBAL)), "unexpected record 'arrays'"),
    (
        "carries metrics",
        lambda c: c.__setitem__(METRICS, MetricRecord({"num-examples": 40})),
        "unexpected record 'metrics'",
    ),
]


@pytest.mark.parametrize("change, fragment", [pytest.param(c, f, id=w) for w, c, f in REFUSALS])
def test_a_refusal_carries_only_a_category_or_is_rejected(change, fragment):
    s = guarded("fedavg")
    bad = refusal("bad", "records")
    change(bad)
    s.aggregate_train(1, [reply(1, update(1.0, hospital="h1")), reply(2, bad)])
    # named by its hospital-id when that is well-formed
    outcome = s.train_outcomes[1].get("bad") or s.train_outcomes[1]["node-2"]
    assert outcome.status == "rejected" and "malformed refusal" in outcome.reason and fragment in outcome.reason, (
        outcome
    )


@pytest.mark.parametrize("category", REFUSAL_CATEGORIES)
def test_every_refusal_category_is_a_well_formed_refusal(category):
    s = guarded("fedavg")
    s.aggregate_train(1, [reply(1, update(1.0, hospital="h1")), reply(2, refusal("h2", category))])
    assert (s.train_outcomes[1]["h2"].status, s.train_outcomes[1]["h2"].reason) == ("refused", category)
    with pytest.raises(ValueError):
        refusal("h2", "train.csv:17: label: unknown label 'x'")  # free text cannot even be built


EVALUATIONS = [
    ("metrics without status", lambda c: c.__delitem__(STATUS), "missing record 'fedprompt.status'"),
    ("status reason text", _set(STATUS, "reason", "val.csv:3"), "reason"),
    ("tensors in an evaluate reply", lambda c: c.__setitem__(ARRAYS, state_to_arrays(GLOBAL)), "record 'arrays'"),
    ("missing tp", _del(METRICS, "tp"), "metrics.tp: missing required key"),
    ("extra num-examples (exact N)", _set(METRICS, "num-examples", 30), "metrics.num-examples: unknown key"),
    ("extra loss-sum", _set(METRICS, "loss-sum", 3.0), "metrics.loss-sum: unknown key"),
    ("tp a scalar", _set(METRICS, "tp", 5.0), "metrics.tp: expected a list"),
    ("fp wrong length", _set(METRICS, "fp", [1.0]), "metrics.fp: expected one count per label (3), got 1"),
    ("fn with NaN", _set(METRICS, "fn", [1.0, float("nan"), 0.0]), "metrics.fn[1]: expected a finite number"),
]


@pytest.mark.parametrize("change, fragment", [pytest.param(c, f, id=w) for w, c, f in EVALUATIONS])
def test_each_field_of_an_evaluate_reply_missing_or_mistyped_is_ignored(change, fragment, caplog):
    s = guarded("fedavg")
    good = _eval_reply(1, {"tp": [5.0, 5.0, 5.0], "fp": [0.0] * 3, "fn": [0.0] * 3})
    bad = _eval_reply(2, {"tp": [0.0, 0.0, 0.0], "fp": [9.0] * 3, "fn": [9.0] * 3})
    change(bad.content)
    with caplog.at_level("WARNING", logger="fedprompt.server"):
        s.aggregate_evaluate(1, [good, bad])
    assert s.eval_results[1]["accuracy"] == 1.0 and s.eval_results[1]["hospitals"] == 1  # only the good one counted
    assert any("malformed evaluation reply" in r.getMessage() and fragment in r.getMessage() for r in caplog.records), (
        caplog.text
    )


# --- the typed replies (common/wire.py): one model builds and parses each -------------------------
def test_the_reply_models_round_trip_and_name_each_bad_field():
    counts = Counts(tp=[1.0, 2.0, 3.0], fp=[0.5] * 3, fn=[-0.25] * 3)
    train = TrainReply(
        status=Status.ok("h1"),
        metrics=TrainMetrics(num_examples=30.0, private=1, epsilon_spent=1.5, epsilon_cap=8.0, delta=1e-5),
        ledger=LedgerChain(chain=[HEAD, "b" * 64]),
        evaluation=counts,
    )
    content = train.to_content(state_to_arrays(GLOBAL))
    assert set(content.keys()) == {ARRAYS, STATUS, METRICS, LEDGER, EVALUATION}
    assert dict(content[METRICS]) == {
        "num-examples": 30.0,
        "private": 1,
        "epsilon-spent": 1.5,
        "epsilon-cap": 8.0,
        "delta": 1e-5,
    }
    assert dict(content[LEDGER]) == {"chain": [HEAD, "b" * 64]} and train.ledger.head == "b" * 64
    assert TrainReply.from_content(content, num_labels=3) == train
    evaluate = EvaluateReply(status=Status.ok("h1"), metrics=counts)
    assert EvaluateReply.from_content(evaluate.to_content(), num_labels=3) == evaluate
    assert Refusal.from_content(refusal("h1", "budget")).status.reason == "budget"

    def problem(change) -> str:
        bad = train.to_content(state_to_arrays(GLOBAL))
        change(bad)
        with pytest.raises(ReplyError) as caught:
            TrainReply.from_content(bad, num_labels=3)
        return str(caught.value)

    assert problem(_set(METRICS, "loss", 0.3)) == (
        "metrics.loss: unknown key (expected one of: delta, epsilon-cap, epsilon-spent, num-examples, private)"
    )
    assert problem(_del(METRICS, "num-examples")) == "metrics.num-examples: missing required key"
    assert problem(_del(LEDGER)) == "missing record 'fedprompt.ledger' (a ConfigRecord)"
    assert problem(_set(EVALUATION, "tp", [1.0])) == "fedprompt.evaluation.tp: expected one count per label (3), got 1"
    assert problem(lambda c: c.__setitem__("notes", ConfigRecord({"x": "y"}))).startswith(
        "unexpected record 'notes': a TrainReply carries only 'arrays', 'fedprompt.evaluation', 'fedprompt.ledger', "
    )


# --- the rollback witness: each site's ledger head and epsilon, round after round -------------------
def _witness_round(s: ValidatedStrategy, server_round: int, content: RecordDict):
    s.aggregate_train(server_round, [reply(1, content)])
    return s.train_outcomes[server_round]["h1"]


def test_a_site_whose_epsilon_decreases_is_rejected_by_name():
    s = guarded("fedavg")
    first = _witness_round(s, 1, update(1.0, hospital="h1", chain=(HEAD,), spent=6.38))
    assert (first.status, first.ledger_head, first.epsilon_spent) == ("ok", HEAD, 6.38)
    cut = _witness_round(s, 2, update(1.0, hospital="h1", chain=(HEAD, "b" * 64), spent=5.40))
    assert cut.status == "rejected" and cut.reason == (
        "h1: privacy ledger rolled back: epsilon spent 5.4000 is below the 6.3800 it reported in round 5"
    )
    # the witness stays at what was accepted: the next reply is judged against round 5's head and epsilon
    assert _witness_round(s, 3, update(1.0, hospital="h1", chain=(HEAD, "c" * 64), spent=6.5)).status == "ok"


def test_a_site_whose_chain_does_not_extend_the_last_head_is_rejected_and_one_that_skipped_rounds_is_not():
    s = guarded("fedavg")
    assert _witness_round(s, 1, update(1.0, hospital="h1", chain=(HEAD,))).status == "ok"
    # rounds it was not heard in (a refusal after recording, a reply lost): its chain still holds the head
    skipped = _witness_round(s, 2, update(1.0, hospital="h1", chain=(HEAD, "b" * 64, "c" * 64)))
    assert (skipped.status, skipped.ledger_head) == ("ok", "c" * 64)
    # cut and re-anchored: the same epsilon, but the chain no longer holds round 6's head
    cut = _witness_round(s, 3, update(1.0, hospital="h1", chain=(HEAD, "d" * 64)))
    assert cut.status == "rejected" and cut.reason == (
        "h1: privacy ledger rolled back or replaced: its chain does not extend the head cccccccccccccccc... it "
        "reported in round 6 (entries were cut, or an older copy restored)"
    )
    assert cut.ledger_head is None  # the history records only what was accepted


def test_a_resumed_run_witnesses_from_its_history():
    history = [
        {"round": 1, "hospitals": {"h1": {"status": "ok", "ledger_head": HEAD, "epsilon_spent": 3.0}}},
        {"round": 2, "hospitals": {"h1": {"status": "rejected", "ledger_head": None, "epsilon_spent": None}}},
    ]
    assert witnessed(history) == {"h1": Witness(HEAD, 3.0, 1)}
    s = ValidatedStrategy(
        build_strategy(FederationConfig(name="t", labels=PROMPT.labels)),
        PROMPT,
        norm_bound=100.0,
        min_hospitals=1,
        round_offset=2,
        witnessed=witnessed(history),
    )
    s._global, s._sent[1] = dict(GLOBAL), [instruction(1)]
    assert _witness_round(s, 1, update(1.0, hospital="h1", chain=("b" * 64,), spent=3.5)).reason.endswith(
        "it reported in round 1 (entries were cut, or an older copy restored)"
    )
    assert _witness_round(s, 2, update(1.0, hospital="h1", chain=(HEAD,), spent=2.0)).reason.endswith(
        "epsilon spent 2.0000 is below the 3.0000 it reported in round 1"
    )
