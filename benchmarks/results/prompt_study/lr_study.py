"""Issue 21's learning-rate study: the head alone against prefix + head, non-private and at epsilon 8,
central (the sites' rows pooled) and federated, through the product's round functions
(benchmarks/accuracy.run_federation: class sums, then local_update, Flower's FedAvg).

Usage: python lr_study.py OUT.jsonl SPEC...   SPEC = where:lr:ratio:eps:seed
  where: central | fed; ratio: the prompt's lr as a multiple of the head's (-1: head only);
  eps: 0 = non-private. Environment: ML=max_length, K=prompt_layer (defaults: the product's).

The prompt's own lr is a second optimiser parameter group, set here by replacing the trainer's
optimiser factory: the product has one lr (this study is why)."""

import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

import fedprompt.client.trainer as trainer
from benchmarks.accuracy import ALPHA, HOSPITALS, TEST_FRAC, _brief, run_federation
from benchmarks.common import DEFAULT_DATA, load_corpus
from fedprompt.client.partition import partition, stratified_subset
from fedprompt.common.backbone import load_backbone
from fedprompt.common.config import FederationConfig
from fedprompt.common.encoding import encode
from fedprompt.common.metrics import evaluate
from fedprompt.common.model import build_model
from fedprompt.common.plan import RoundPlan, initial_global_state_for, prompt_config
from fedprompt.server.strategy import ClassMeansHead

warnings.filterwarnings("ignore")
ROUNDS = 4
MODEL = {k: int(v) for k, v in (("max_length", os.environ.get("ML")), ("prompt_layer", os.environ.get("K"))) if v}
RATIO = [1.0]


def main(out: Path, specs: list[str]) -> None:
    records, labels = load_corpus(DEFAULT_DATA)
    bb = load_backbone(None)
    fed = FederationConfig.model_validate(
        {
            "name": "lr",
            "labels": labels,
            "rounds": ROUNDS,
            "training": {"train_prompt": True},
            "model": {"prompt_style": "prefix", **MODEL},
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
        stratified_subset(records, 10**9, 0),
        labels,
        hospitals=HOSPITALS,
        alpha=ALPHA,
        test_frac=TEST_FRAC,
        val_frac=0.0,
        seed=0,
        min_train=8,
    )
    test = enc(part.test)
    sites = {h: enc(tr) for h, (tr, _v) in part.hospitals.items()}
    pooled = {0: enc([r for h in part.hospitals for r in part.hospitals[h][0]])}

    def optimizer(name, params, lr):
        prompt = [p for p in params if p.dim() == 2 and p.shape[0] == config.n_virtual_tokens]
        rest = [p for p in params if all(p is not q for q in prompt)]
        groups = [{"params": rest, "lr": lr}] + ([{"params": prompt, "lr": lr * RATIO[0]}] if prompt else [])
        return torch.optim.Adam(groups, lr=lr) if name == "adam" else torch.optim.SGD(groups, lr=lr)

    trainer._optimizer = optimizer
    for spec in specs:
        where, lr, ratio, eps, seed = spec.split(":")
        RATIO[0] = float(ratio)
        p = plan.replaced(lr=float(lr), train_prompt=float(ratio) >= 0)
        cfg = p.prompt_config()
        t0 = time.time()
        curve, _, _ = run_federation(
            bb,
            ClassMeansHead.for_run(fed, bb, cfg),
            state0,
            pooled if where == "central" else sites,
            p,
            float(eps) or None,
            ROUNDS,
            int(seed),
            lambda s, c=cfg: _brief(evaluate(build_model(bb, c, s), test, len(labels), torch.device("cpu")).summary()),
        )
        f1 = [round(c["macro_f1"], 4) for c in curve]
        last3 = round(sum(f1[-3:]) / 3, 4)
        row = {"spec": spec, "model": MODEL, "f1": f1, "last3": last3, "s": round(time.time() - t0)}
        print(row, flush=True)
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
