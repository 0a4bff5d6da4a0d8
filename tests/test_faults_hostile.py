"""Fault scenario 4: a hostile hospital, on real data.

Five hospitals share the real medical-abstracts corpus. Four train honestly; the fifth trains too,
then replaces its update by (c) the honest update scaled x1000 or (d) Gaussian noise whose norm
sits just inside the aggregator's norm bound (the strongest noise the bound lets through). Each
round runs the real client code (`client.hospital.train_round`, from the RoundPlan the server
sends) and the aggregator's real guard + Flower strategy (`ValidatedStrategy` over FedAvg,
FedTrimmedAvg, FedMedian), on Flower Messages; only the transport is left out (the transport is
covered by the deployment and process tests; robustness is decided by aggregation).

The backbone is the real default one (all-MiniLM-L6-v2; a tiny random BERT does not learn this
task in a few rounds), on 1,500 abstracts (431 held out for the test) cut to 64 tokens, with mild
label skew (Dirichlet alpha 10). Training is NON-PRIVATE so that five rounds learn something
measurable (DP noise is orthogonal to what the aggregator does with an outlier), with a small
learning rate so that the clean runs climb smoothly instead of swinging by 10-30 points between
rounds (as they did at lr 0.02 on 300 test rows, where no 2-point comparison meant anything).
Runs are compared by the mean macro-F1 of their last two rounds. Every random draw (shuffles) is
seeded per (hospital, round), so that the attacked run and the clean run of the same strategy
differ only by the attack; runs that reach the same global state share the honest training. An
"absent" run per strategy (hospital-5 never replies) is the federation of the four honest
hospitals: under (c) the attacked run must be that federation, bit for bit.
Figures: printed with `-s`, and written as JSON to $FEDPROMPT_FAULTS_REPORT/hostile.json when
that variable names a folder (the recorded run: docs/results/hostile.json).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from flwr.app import Message, RecordDict

from fedprompt.client import hospital, trainer
from fedprompt.client.partition import load_corpus, partition, stratified_subset
from fedprompt.client.workspace import load_workspace, write_workspace
from fedprompt.common.backbone import load_backbone
from fedprompt.common.encoding import encode
from fedprompt.common.metrics import evaluate
from fedprompt.common.model import build_model, initial_state
from fedprompt.common.plan import RoundPlan, prompt_config
from fedprompt.common.wire import ARRAYS, CONFIG, arrays_to_state, state_to_arrays
from fedprompt.server.strategy import ClassMeansHead, ValidatedStrategy, build_strategy
from fedprompt.simulation import ensure_ledgers

from test_strategy import instruction, reply

pytestmark = [pytest.mark.faults, pytest.mark.heavy]

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medical-abstracts"
HOSPITALS = 5
HOSTILE = "hospital-5"
ROWS = int(os.environ.get("FEDPROMPT_HOSTILE_ROWS", "1500"))
ROUNDS = int(os.environ.get("FEDPROMPT_HOSTILE_ROUNDS", "5"))
ALPHA = float(os.environ.get("FEDPROMPT_HOSTILE_ALPHA", "10"))
LR = float(os.environ.get("FEDPROMPT_HOSTILE_LR", "0.005"))
SETTLED = 2  # macro-F1 is compared as the mean of the last SETTLED rounds (one round's value is noisier)
TOLERANCE = 0.02  # macro-F1 points allowed between an attacked robust run and the clean run
BOUND_FACTOR = 2.0  # the operator's norm bound: 2x the largest honest update norm seen in a clean round 1


def make_federation(
    root: Path, *, rows: int = ROWS, rounds: int = ROUNDS, alpha: float = ALPHA, lr: float = LR
) -> dict:
    """Five hospitals' workspace on `rows` real abstracts, the backbone and the encoded test set."""
    records, labels = load_corpus(
        DATA / "medical_tc_test.csv",
        text_column="medical_abstract",
        label_column="condition_label",
        label_names=DATA / "medical_tc_labels.csv",
    )
    part = partition(
        stratified_subset(records, rows, seed=0),
        labels,
        hospitals=HOSPITALS,
        alpha=alpha,
        test_frac=0.3,
        val_frac=0.0,
        seed=0,
        min_train=30,
    )
    ws = write_workspace(
        root / "workspace",
        name="hostile",
        labels=labels,
        hospitals={h: (train, []) for h, (train, _val) in part.hospitals.items()},
        allow_non_private=True,
        federation_overrides={
            "rounds": rounds,
            "privacy": {"private": False},
            "model": {"max_length": 64},
            "training": {"local_epochs": 1, "batch_size": 16, "lr": lr},
        },
    )
    ensure_ledgers(ws)  # every round is recorded, non-private ones too (at infinite epsilon)
    fed, _, _ = load_workspace(ws)
    backbone = load_backbone(None)  # the embedded all-MiniLM-L6-v2
    prompt = prompt_config(fed, backbone)
    index = {name: i for i, name in enumerate(labels)}
    test = encode(
        backbone.tokenizer, [t for t, _ in part.test], [index[y] for _, y in part.test], prompt.max_length
    ).dataset
    return {
        "fed": fed,
        "sites": sorted(ws.glob("hospital-*/site.yaml")),
        "backbone": backbone,
        "prompt": prompt,
        "test": test,
        "train_rows": {h: len(tr) for h, (tr, _) in part.hospitals.items()},
        "cache": {},
    }


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    if not (DATA / "medical_tc_test.csv").is_file():
        pytest.skip(f"real corpus not found at {DATA}")
    return make_federation(tmp_path_factory.mktemp("hostile"))


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[k].flatten() for k in sorted(state)])


def _corrupt(honest: RecordDict, global_state: dict, attack: str, norm: float, seed: int) -> RecordDict:
    """The hostile hospital's reply: its honest reply with the tensors replaced."""
    mine = arrays_to_state(honest[ARRAYS])
    if attack == "scaled":
        bad = {k: global_state[k] + 1000.0 * (mine[k] - global_state[k]) for k in mine}
    else:  # Gaussian noise with an update norm just inside the bound
        gen = torch.Generator().manual_seed(seed)
        noise = {k: torch.randn(v.shape, generator=gen) for k, v in mine.items()}
        scale = 0.99 * norm / float(_flat(noise).norm())
        bad = {k: global_state[k] + scale * noise[k] for k in mine}
    honest[ARRAYS] = state_to_arrays(bad)
    return honest


def _digest(state: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()


def _honest_reply(
    fx: dict, monkeypatch, content: RecordDict, state: dict, rnd: int, node: int, site: Path
) -> RecordDict:
    """hospital.train_round with seeded draws. Training is deterministic given (round, hospital,
    global state), so runs that reach the same global state (every run's round 1) share it."""
    key = (rnd, node, _digest(state))
    if key not in fx["cache"]:
        seeds = iter(range(1000 * rnd + 10 * node, 1000 * rnd + 10 * node + 10))  # the same draws in every run
        monkeypatch.setattr(trainer, "entropy_generator", lambda: torch.Generator().manual_seed(next(seeds)))
        answer = hospital.train_round(RecordDict(dict(content)), site)
        fx["cache"][key] = (answer, arrays_to_state(answer[ARRAYS]))
    answer, tensors = fx["cache"][key]
    # Fresh records every time: Flower's aggregation empties the ArrayRecords it consumes.
    return RecordDict({**dict(answer), ARRAYS: state_to_arrays(tensors)})


def run_federation(
    fx: dict, monkeypatch, strategy: str, attack: str | None, norm_bound: float, rounds: int = ROUNDS
) -> dict:
    """`rounds` rounds; the global macro-F1 on the held-out test set after each round. `attack`:
    None (hospital-5 honest), "scaled", "noise", or "absent" (hospital-5 never replies)."""
    fed, prompt, backbone = fx["fed"], fx["prompt"], fx["backbone"]
    guard = ValidatedStrategy(
        build_strategy(fed.replaced(strategy={"name": strategy})),
        prompt,
        norm_bound=norm_bound,
        min_hospitals=HOSPITALS - 1,
        class_means=ClassMeansHead.for_run(fed, backbone, prompt),  # round 1 is the class-sums release
    )
    state = initial_state(backbone, prompt)
    out: dict = {"strategy": strategy, "attack": attack or "none", "norm_bound": norm_bound, "rounds": []}
    for rnd in range(1, rounds + 1):
        plan = RoundPlan.for_run(fed, prompt, round=rnd)
        content = RecordDict({ARRAYS: state_to_arrays(state), CONFIG: plan.to_config_record()})
        # What configure_train records: the model, the messages and the plan it sent.
        guard._global, guard._sent[rnd] = state, [instruction(n) for n in range(1, HOSPITALS + 1)]
        guard._plan = plan
        replies: list[Message] = []
        honest_norms = []
        for node, site in enumerate(fx["sites"], start=1):
            hostile = site.parent.name == HOSTILE
            if hostile and attack == "absent":
                continue
            answer = _honest_reply(fx, monkeypatch, content, state, rnd, node, site)
            honest_norms.append(float((_flat(arrays_to_state(answer[ARRAYS])) - _flat(state)).norm()))
            if hostile and attack:
                answer = _corrupt(answer, state, attack, norm_bound, seed=rnd)
            replies.append(reply(node, answer))
        arrays, _ = guard.aggregate_train(rnd, replies)
        if arrays is not None:
            state = arrays_to_state(arrays)
        s = evaluate(build_model(backbone, prompt, state), fx["test"], prompt.num_labels).summary()
        outcome = guard.train_outcomes[rnd].get(HOSTILE) or guard.train_outcomes[rnd][f"node-{HOSPITALS}"]
        out["rounds"].append(
            {
                "round": rnd,
                "macro_f1": s["macro_f1"],
                "accuracy": s["accuracy"],
                "loss": s["loss"],
                "hostile_status": outcome.status,
                "hostile_reason": outcome.reason,
                "honest_update_norms": honest_norms,
            }
        )
    out["final"] = out["rounds"][-1]
    out["settled_macro_f1"] = sum(r["macro_f1"] for r in out["rounds"][-SETTLED:]) / len(out["rounds"][-SETTLED:])
    out["final_state_sha256"] = _digest(state)
    return out


ROBUST = ("fedtrimmedavg", "fedmedian")


def test_robust_strategies_and_norm_bound_hold_against_a_hostile_hospital(federation, monkeypatch):
    runs: dict[str, dict] = {}
    runs["fedavg/none"] = run_federation(federation, monkeypatch, "fedavg", None, math.inf)
    first = runs["fedavg/none"]["rounds"][0]
    bound = BOUND_FACTOR * max(first["honest_update_norms"])
    runs["fedavg/none"]["norm_bound"] = f"inf (round-1 honest norms set the bound {bound:.3g})"
    # Two rounds show what the unbounded average does; more would train from a wrecked model.
    runs["fedavg-unbounded/scaled"] = run_federation(federation, monkeypatch, "fedavg", "scaled", math.inf, rounds=2)
    for strategy in ("fedavg", *ROBUST):
        for attack in ("none", "scaled", "noise", "absent"):
            if f"{strategy}/{attack}" not in runs:
                runs[f"{strategy}/{attack}"] = run_federation(
                    federation, monkeypatch, strategy, None if attack == "none" else attack, bound
                )

    settled = {k: r["settled_macro_f1"] for k, r in runs.items()}
    drift = {f"{s}/{a}": settled[f"{s}/{a}"] - settled[f"{s}/none"] for s in ROBUST for a in ("scaled", "noise")}
    report = {
        "rows": ROWS,
        "rounds": ROUNDS,
        "alpha": ALPHA,
        "lr": LR,
        "settled_rounds": SETTLED,
        "hospitals": HOSPITALS,
        "train_rows": federation["train_rows"],
        "test_rows": len(federation["test"]),
        "norm_bound": bound,
        "settled_macro_f1": settled,
        "robust_drift": drift,
        "runs": runs,
    }
    lines = [
        f"{k:28s} settled macro-F1 {v:.4f}  final loss {runs[k]['final']['loss']:.4g}  per round "
        + " ".join(f"{r['macro_f1']:.3f}" for r in runs[k]["rounds"])
        + f"  hostile: {runs[k]['final']['hostile_status']}"
        for k, v in settled.items()
    ]
    print(
        "\n".join(
            [
                "",
                f"norm bound {bound:.4g}",
                *lines,
                "robust drift vs clean: " + json.dumps({k: round(v, 4) for k, v in drift.items()}),
            ]
        )
    )
    if os.environ.get("FEDPROMPT_FAULTS_REPORT"):
        folder = Path(os.environ["FEDPROMPT_FAULTS_REPORT"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hostile.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    # The clean run learned something, so that "within 2 points" means something.
    assert settled["fedavg/none"] > 0.35, settled
    for strategy in ("fedavg", *ROBUST):
        # The bound is above every honest update: the clean run is the same with or without it.
        assert all(r["hostile_status"] == "ok" for r in runs[f"{strategy}/none"]["rounds"])
        # (c): the norm bound rejects the scaled update in every round, whatever the strategy...
        for r in runs[f"{strategy}/scaled"]["rounds"]:
            assert r["hostile_status"] == "rejected" and "exceeds the bound" in r["hostile_reason"], r
        # ...so the global model is bit for bit the one the four honest hospitals make alone.
        assert runs[f"{strategy}/scaled"]["final_state_sha256"] == runs[f"{strategy}/absent"]["final_state_sha256"]
        # (d): the noise passes the bound (it is plausible), and is accepted into the aggregate.
        assert all(r["hostile_status"] == "ok" for r in runs[f"{strategy}/noise"]["rounds"])
    # Plain FedAvg without the bound: the scaled update dominates the average and wrecks the model
    # (round 1's head is rebuilt from the sums at the logit scale, so it is the accuracy that falls).
    assert settled["fedavg-unbounded/scaled"] < settled["fedavg/none"] - 0.2, settled
    # Robust strategies + bound: within 2 macro-F1 points of the clean run on the same data.
    assert all(abs(v) <= TOLERANCE for v in drift.values()), drift
