"""Issue 21's study: the prompt recipe against the head-only one, through the product (simulate, local
engine), on regimes of the public corpus at one epsilon. Usage: python study.py OUT REGIME VARIANT [EPS]."""

import json
import sys
import time
import warnings
from pathlib import Path

from benchmarks.common import DEFAULT_DATA, load_corpus
from benchmarks.regimes import REGIMES, _feature_cache, run_copy, summarize_run, write_regime
from fedprompt.client.partition import stratified_subset
from fedprompt.simulation import simulate

warnings.filterwarnings("ignore")
VARIANTS = {
    # the product's head-only default at the same number of rounds (class sums, then DP-SGD on the head)
    "head4": {"rounds": 4},
    # class sums, then DP-SGD on a prefix before the last layer and the head
    "prefix5": {
        "rounds": 4,
        "training": {"train_prompt": True},
        "model": {"prompt_layer": 5, "prompt_style": "prefix"},
    },
    "prefix3": {
        "rounds": 4,
        "training": {"train_prompt": True},
        "model": {"prompt_layer": 3, "prompt_style": "prefix"},
    },
}
out, key, variant = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
eps = float(sys.argv[4]) if len(sys.argv) > 4 else 8.0
records, labels = load_corpus(DEFAULT_DATA)
subset = stratified_subset(records, 10**9, 0)
regime = next(r for r in REGIMES if r.key == key)
root = out / f"{key}-{variant}-eps{eps:g}"
with _feature_cache(512):
    ws = write_regime(regime, subset, labels, 0, root, None, VARIANTS[variant])
    run = run_copy(ws, root / "run" / "workspace", target_epsilon=eps)
    t = time.perf_counter()
    metrics = simulate(run, root / "run" / "out", engine="local", compare=False)
    summary = {**summarize_run(metrics, run), "seconds": round(time.perf_counter() - t, 1)}
line = {"regime": key, "variant": variant, "epsilon": eps, **summary}
with open(out / "results.jsonl", "a") as f:
    f.write(json.dumps(line) + "\n")
print(
    json.dumps(
        {
            k: line[k]
            for k in ("regime", "variant", "epsilon", "final", "last3", "round0", "round1", "seconds")
            if k in line
        }
    )
)
