"""Issue 21's non-private target: federated prompt tuning against centralised prompt tuning (the same
recipe on the pooled records), through the product's round functions (benchmarks/accuracy.run_federation:
class sums, then local_update, Flower's FedAvg). Usage: python nonprivate.py OUT [ROUNDS] [STRATEGY-free]."""

import json
import sys
import warnings
from pathlib import Path

import torch

from benchmarks.accuracy import ALPHA, HOSPITALS, TEST_FRAC, _brief, run_federation
from benchmarks.common import DEFAULT_DATA, load_corpus
from fedprompt.client.partition import partition, stratified_subset
from fedprompt.common.backbone import load_backbone
from fedprompt.common.config import FederationConfig
from fedprompt.common.encoding import encode
from fedprompt.common.metrics import evaluate
from fedprompt.common.model import build_model
from fedprompt.common.plan import RoundPlan, initial_global_state_for, prompt_config

warnings.filterwarnings("ignore")
out = Path(sys.argv[1])
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
records, labels = load_corpus(DEFAULT_DATA)
subset = stratified_subset(records, 10**9, 0)
bb = load_backbone(None)
fed = FederationConfig.model_validate(
    {
        "name": "np",
        "labels": labels,
        "rounds": rounds,
        "training": {"train_prompt": True},
        "model": {"prompt_layer": 5, "prompt_style": "prefix"},
        "privacy": {"private": False},
    }
)
config = prompt_config(fed, bb)
plan = RoundPlan.for_run(fed, config)
state0 = initial_global_state_for(fed, bb)
index = {n: i for i, n in enumerate(labels)}


def enc(rows):
    return encode(bb.tokenizer, [t for t, _ in rows], [index[y] for _, y in rows], config.max_length).dataset


part = partition(
    subset, labels, hospitals=HOSPITALS, alpha=ALPHA, test_frac=TEST_FRAC, val_frac=0.0, seed=0, min_train=8
)
test = enc(part.test)
sites = {h: enc(tr) for h, (tr, _v) in part.hospitals.items()}
pooled = enc([r for h in part.hospitals for r in part.hospitals[h][0]])


def score(state):
    return _brief(
        evaluate(build_model(bb, plan.prompt_config(), state), test, len(labels), torch.device("cpu")).summary()
    )


res = {}
for name, sets in (("central", {0: pooled}), ("federated", sites)):
    for mode, p in (("prompt", plan), ("head", plan.replaced(train_prompt=False))):
        cfg = p.prompt_config()
        curve, _, _ = run_federation(
            bb,
            cfg,
            state0,
            sets,
            p,
            None,
            rounds,
            0,
            lambda s, c=cfg: _brief(evaluate(build_model(bb, c, s), test, len(labels), torch.device("cpu")).summary()),
        )
        res[f"{name}_{mode}"] = [c["macro_f1"] for c in curve]
        print(name, mode, res[f"{name}_{mode}"], flush=True)
(out / "nonprivate.json").write_text(json.dumps(res, indent=1))
