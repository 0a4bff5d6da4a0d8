"""How the private recipe (the defaults of `federation.yaml`'s `model` and `training`) was chosen:
a sweep on the shared public corpus, never on a hospital's budget.

The accuracy suite's split A (3 hospitals, Dirichlet 0.5, 30% global test). Every point is the
product's own path (`benchmarks/accuracy.run_federation`: `client/trainer.local_update` with the
noise each site would calibrate, then FedAvg), head-only on frozen features, so a 20-round
federation costs seconds once the features are computed; it is scored by the macro-F1 averaged
over the last 3 rounds, averaged over seeds (a single final round on 866 rows swings by points).

1. Feature variants (prompt length x sequence length): zero-shot and the default recipe at eps 8.
2. On the chosen features: sample rate x learning rate x rounds at eps 8, the clipping norm, and
   the learning rate at eps 1.
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path
from typing import Any

from .accuracy import ALPHA, HOSPITALS, TEST_FRAC, _settled, run_federation
from .common import Context, load_corpus, md_table

# (n_virtual_tokens, max_length): the default first.
FEATURES = ((4, 256), (20, 256), (4, 128))


def _grid(quick: bool) -> list[dict[str, Any]]:
    """Points of the recipe sweep on the default features (keys: TrainingSettings fields, rounds,
    max_grad_norm, epsilon)."""
    if quick:
        return [{"epsilon": 8.0}, {"epsilon": 8.0, "lr": 2.0}]
    points = [{"epsilon": 8.0, "sample_rate": q, "lr": lr} for q in (0.1, 0.25, 0.5) for lr in (4.0, 8.0, 16.0)]
    points += [
        {"epsilon": 8.0, "rounds": 10},
        {"epsilon": 8.0, "max_grad_norm": 0.5, "lr": 16.0},
        {"epsilon": 8.0, "local_epochs": 2},
    ]
    points += [{"epsilon": 1.0, "lr": lr} for lr in (2.0, 8.0)]
    return points


def run(ctx: Context) -> dict:
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    from fedprompt.client.partition import partition, stratified_subset
    from fedprompt.common.backbone import load_backbone
    from fedprompt.common.config import FederationConfig, ModelSettings
    from fedprompt.common.encoding import encode
    from fedprompt.common.metrics import evaluate
    from fedprompt.common.model import build_model
    from fedprompt.common.plan import RoundPlan, initial_global_state_for, prompt_config
    from fedprompt.server.strategy import ClassMeansHead

    rows = int(ctx.knob("acc_rows", 10**9, 240))
    seeds = int(ctx.knob("acc_seeds", 3, 1))
    records, labels = load_corpus(ctx.data)
    subset = stratified_subset(records, rows, ctx.seed)
    part = partition(
        subset, labels, hospitals=HOSPITALS, alpha=ALPHA, test_frac=TEST_FRAC, val_frac=0.0, seed=ctx.seed, min_train=8
    )
    bb = load_backbone(ctx.backbone)
    index = {name: i for i, name in enumerate(labels)}
    default = FederationConfig(name="recipe", labels=labels)
    features = [(default.model.n_virtual_tokens, default.model.max_length)] if ctx.quick else list(FEATURES)
    if ctx.overrides.get("max_length"):  # a small test backbone has fewer positions
        features = [(n, min(length, int(ctx.overrides["max_length"]))) for n, length in features[:1]]
    points: list[dict] = []

    for n_virtual, max_length in features:
        t = time.perf_counter()
        fed = FederationConfig(
            name="recipe", labels=labels, model=ModelSettings(n_virtual_tokens=n_virtual, max_length=max_length)
        )
        config = prompt_config(fed, bb)
        state0 = initial_global_state_for(fed, bb)
        class_means = ClassMeansHead.for_run(fed, bb, config)

        def encoded(rows_):  # called in this iteration only: the loop variables are the current ones
            texts, ys = [t for t, _ in rows_], [index[y] for _, y in rows_]
            return encode(bb.tokenizer, texts, ys, max_length).dataset  # noqa: B023

        test = encoded(part.test)
        sites = {h: encoded(tr) for h, (tr, _val) in part.hospitals.items()}

        def score(state: dict) -> dict:  # used in this iteration only (run_federation below)
            s = evaluate(build_model(bb, config, state), test, len(labels)).summary()  # noqa: B023
            return {"accuracy": s["accuracy"], "macro_f1": s["macro_f1"]}

        zero = score(state0)["macro_f1"]
        is_default = (n_virtual, max_length) == features[0]
        sweep: list[dict[str, Any]] = _grid(ctx.quick) if is_default else [{"epsilon": 8.0}]
        for point in sweep:
            training = {k: v for k, v in point.items() if k in ("sample_rate", "lr", "local_epochs")}
            rounds = point.get("rounds", fed.rounds)
            plan = RoundPlan.for_run(fed, config).replaced(
                **training, max_grad_norm=point.get("max_grad_norm", fed.privacy.max_grad_norm)
            )
            runs = [
                run_federation(bb, class_means, state0, sites, plan, point["epsilon"], rounds, ctx.seed + s, score)[0]
                for s in range(seeds)
            ]
            settled = [_settled(c) for c in runs]
            points.append(
                {
                    "n_virtual_tokens": n_virtual,
                    "max_length": max_length,
                    "zero_shot": zero,
                    "epsilon": point["epsilon"],
                    "sample_rate": plan.sample_rate,
                    "lr": plan.lr,
                    "local_epochs": plan.local_epochs,
                    "rounds": rounds,
                    "max_grad_norm": plan.max_grad_norm,
                    "last3": statistics.fmean(settled),
                    "last3_seeds": settled,
                    "final_seeds": [c[-1]["macro_f1"] for c in runs],
                }
            )
            p = points[-1]
            ctx.log(
                f"recipe: {n_virtual} tokens x {max_length}, eps {p['epsilon']:g}, q {p['sample_rate']}, lr {p['lr']}, "
                f"E {p['local_epochs']}, R {rounds}, C {p['max_grad_norm']}: last-3 {p['last3']:.4f} (zero-shot "
                f"{zero:.4f})"
            )
        ctx.log(f"recipe: features {n_virtual} x {max_length} done in {time.perf_counter() - t:.0f} s")

    defaults = default.training
    return {
        "config": {
            "rows_used": len(subset),
            "test_rows": len(part.test),
            "hospital_train_rows": {h: len(tr) for h, (tr, _) in part.hospitals.items()},
            "seeds": seeds,
            "defaults": {
                "n_virtual_tokens": features[0][0],
                "max_length": features[0][1],
                "sample_rate": defaults.sample_rate,
                "lr": defaults.lr,
                "local_epochs": defaults.local_epochs,
                "rounds": default.rounds,
                "max_grad_norm": default.privacy.max_grad_norm,
            },
        },
        "points": points,
    }


def _is_default(p: dict, d: dict) -> bool:
    return all(p[k] == d[k] for k in d)


def markdown(r: dict) -> str:
    c, pts = r["config"], r["points"]
    d = c["defaults"]
    header = [
        "prompt tokens",
        "max_length",
        "eps",
        "sample rate",
        "lr",
        "local epochs",
        "rounds",
        "clip",
        "zero-shot",
        "last-3 macro-F1 (mean over seeds)",
        "per seed",
        "",
    ]
    rows = [
        [
            p["n_virtual_tokens"],
            p["max_length"],
            p["epsilon"],
            p["sample_rate"],
            p["lr"],
            p["local_epochs"],
            p["rounds"],
            p["max_grad_norm"],
            p["zero_shot"],
            p["last3"],
            ", ".join(f"{x:.3f}" for x in p["last3_seeds"]),
            "**default**" if _is_default(p, d) and p["epsilon"] == 8.0 else "",
        ]
        for p in pts
    ]
    return "\n\n".join(
        [
            f"{c['rows_used']} rows, {c['test_rows']} test rows, hospitals {c['hospital_train_rows']}, {c['seeds']} "
            f"seed(s) per point; the product's path (local_update + FedAvg), head on frozen features; defaults {d}.",
            md_table(header, rows),
        ]
    )


def plot(r: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = r["config"]["defaults"]
    pts = [
        p
        for p in r["points"]
        if p["n_virtual_tokens"] == d["n_virtual_tokens"]
        and p["max_length"] == d["max_length"]
        and p["epsilon"] == 8.0
        and p["max_grad_norm"] == d["max_grad_norm"]
        and p["local_epochs"] == d["local_epochs"]
    ]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for q, rounds in sorted({(p["sample_rate"], p["rounds"]) for p in pts}):
        line = sorted((p["lr"], p["last3"]) for p in pts if p["sample_rate"] == q and p["rounds"] == rounds)
        ax.plot([x for x, _ in line], [y for _, y in line], "o-", label=f"q {q}, {rounds} rounds")
    if pts:
        ax.axhline(pts[0]["zero_shot"], linestyle="--", color="grey", label="zero-shot")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("learning rate (SGD)")
    ax.set_ylabel("macro-F1, mean of last 3 rounds (global test)")
    ax.set_title("federated DP eps 8, head on frozen features")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "recipe.png", dpi=110)
    plt.close(fig)
    return ["recipe.png"]
