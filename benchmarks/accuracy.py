"""Accuracy on real medical abstracts: linear probe, centralised prompt tuning (non-private),
each hospital alone under DP (eps 8), and federated DP (eps 8).

Split (client/partition.py, fixed seed): a stratified 30% global test set; the other 70% over
3 hospitals with Dirichlet(0.5) label skew. Everything is evaluated on the same global test set,
which no mode sees before evaluation. Federated training runs in-process: each round every
hospital trains from the global state with the project's own `client/trainer.train` (DP-SGD via
`wrap_private`), and the global state is the example-weighted average of their
`trainable_state()` (FedAvg) -- the same computation as the Flower path, without Flower's
transport, to keep it cheap.
"""

from __future__ import annotations

import random
import time
import warnings
from pathlib import Path

import torch

from .common import Context, load_corpus, md_table

HOSPITALS = 3
ALPHA = 0.5
TEST_FRAC = 0.3
EPSILON = 8.0
BATCH = 16
MAX_LENGTH = 128
N_VIRTUAL = 20
LR = 0.01
MAX_GRAD_NORM = 1.0
README_PROBE = {"accuracy": 0.588, "macro_f1": 0.572}  # data README: full file, 70/30 split, seed 0


def _stratified_subset(labels: list[int], n: int, seed: int) -> list[int]:
    """n row indices with every class in proportion (all rows when n >= len)."""
    if n >= len(labels):
        return list(range(len(labels)))
    from fedprompt.client.partition import _apportion  # the project's own largest-remainder split

    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    classes = sorted(by_class)
    quota = _apportion(n, [len(by_class[c]) for c in classes])
    out: list[int] = []
    for c, q in zip(classes, quota):
        ix = by_class[c][:]
        rng.shuffle(ix)
        out += ix[:q]
    return sorted(out)


def _summary(counts) -> dict:
    s = counts.summary()
    return {"accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "num_examples": s["num_examples"]}


@torch.no_grad()
def _embed(backbone, dataset, batch_size: int = 64) -> torch.Tensor:
    """Frozen mean-pooled sentence embeddings (how all-MiniLM-L6-v2 is used), no prompt."""
    out = []
    for ids, mask, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        longest = max(int(mask.sum(1).max()), 1)
        ids, mask = ids[:, :longest], mask[:, :longest]
        h = backbone.model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        out.append((h * m).sum(1) / m.sum(1).clamp(min=1.0))
    return torch.cat(out)


def _logistic_regression(x: torch.Tensor, y: torch.Tensor, num_labels: int, c: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, scikit-learn's default objective (L2, C=1, bias
    unpenalised): sum of cross-entropies + ||W||^2 / (2C), minimised by L-BFGS."""
    x, y = x.double(), y.long()
    w = torch.zeros(x.shape[1], num_labels, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=1000, tolerance_grad=1e-7, tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y, reduction="sum") + (w * w).sum() / (2 * c)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _generators(seed: int) -> dict:
    # Fixed seeds for a reproducible benchmark only: deployed sites seed from OS entropy.
    return {"noise_generator": torch.Generator().manual_seed(seed), "sample_generator": torch.Generator().manual_seed(seed + 1)}


def run(ctx: Context) -> dict:
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # RDP side of calibration
    from fedprompt.client.dp import calibrate_noise, plan_steps
    from fedprompt.client.ledger import compute_epsilon
    from fedprompt.client.partition import partition
    from fedprompt.client.records import Records
    from fedprompt.client.trainer import TrainSettings, train
    from fedprompt.client.workspace import site_delta
    from fedprompt.common.backbone import load_backbone
    from fedprompt.common.encoding import encode
    from fedprompt.common.metrics import ClassCounts, evaluate
    from fedprompt.common.model import PromptConfig, build_model, initial_state

    rows = int(ctx.knob("acc_rows", 1000, 160))
    epochs = int(ctx.knob("acc_epochs", 2, 1))
    rounds = int(ctx.knob("acc_rounds", epochs, 1))
    max_length = int(ctx.knob("max_length", MAX_LENGTH, MAX_LENGTH))
    n_virtual = int(ctx.knob("n_virtual", N_VIRTUAL, N_VIRTUAL))
    cpu = torch.device("cpu")
    torch.manual_seed(ctx.seed)

    records, labels = load_corpus(ctx.data)
    keep = _stratified_subset(records.labels, rows, ctx.seed)
    subset = Records([records.texts[i] for i in keep], [records.labels[i] for i in keep], records.path)
    part = partition(subset, labels, hospitals=HOSPITALS, alpha=ALPHA, test_frac=TEST_FRAC, val_frac=0.0, seed=ctx.seed, min_train=max(8, BATCH // 2))
    index = {name: i for i, name in enumerate(labels)}

    bb = load_backbone(ctx.backbone)

    def encoded(rows_):
        return encode(bb.tokenizer, [t for t, _ in rows_], [index[y] for _, y in rows_], max_length).dataset

    test = encoded(part.test)
    sites = {h: encoded(tr) for h, (tr, _val) in part.hospitals.items()}
    pooled_rows = [r for h in part.hospitals for r in part.hospitals[h][0]]
    pooled = encoded(pooled_rows)
    site_counts = {h: [sum(1 for _, y in part.hospitals[h][0] if y == name) for name in labels] for h in part.hospitals}
    ctx.log(f"accuracy: {len(subset)} rows -> test {len(test)}, hospitals {[len(d) for d in sites.values()]}, epochs {epochs}, rounds {rounds}")

    config = PromptConfig(labels=labels, hidden_size=bb.hidden_size, backbone_fingerprint=bb.fingerprint, n_virtual_tokens=n_virtual, pooling="mean", max_length=max_length, seed=ctx.seed)
    state0 = initial_state(bb, config)
    results: dict[str, dict] = {}
    timing: dict[str, float] = {}

    # 1. linear probe (centralised, non-private, frozen embeddings, no prompt)
    t = time.perf_counter()
    w, b = _logistic_regression(_embed(bb, pooled), pooled.tensors[2], len(labels))
    preds = (_embed(bb, test).double() @ w + b).argmax(-1)
    results["linear_probe"] = _summary(ClassCounts.from_predictions(preds, test.tensors[2], len(labels)))
    timing["linear_probe"] = time.perf_counter() - t
    ctx.log(f"accuracy: linear probe {results['linear_probe']}")

    # 2. centralised prompt tuning, NON-PRIVATE
    t = time.perf_counter()
    model = build_model(bb, config, state0)
    train(model, pooled, TrainSettings(epochs=epochs, batch_size=BATCH, lr=LR, noise_multiplier=None), cpu, sample_generator=_generators(ctx.seed)["sample_generator"])
    results["central_prompt_nonprivate"] = _summary(evaluate(model, test, len(labels), cpu))
    timing["central_prompt_nonprivate"] = time.perf_counter() - t
    ctx.log(f"accuracy: central prompt tuning {results['central_prompt_nonprivate']}")

    # 3. each hospital alone, DP at eps 8 over its `epochs` local epochs
    alone = {}
    t = time.perf_counter()
    for h, ds in sites.items():
        q, steps = plan_steps(len(ds), BATCH, epochs)
        delta = site_delta(len(ds))
        sigma = calibrate_noise(EPSILON, delta, q, steps, "prv")
        model = build_model(bb, config, state0)
        train(model, ds, TrainSettings(epochs=epochs, batch_size=BATCH, lr=LR, noise_multiplier=sigma, max_grad_norm=MAX_GRAD_NORM), cpu, **_generators(ctx.seed + int(h)))
        alone[h] = {**_summary(evaluate(model, test, len(labels), cpu)), "n_train": len(ds), "sigma": sigma, "sample_rate": q, "steps": steps,
                    "delta": delta, "epsilon_spent": compute_epsilon("prv", [(sigma, q, steps)], delta)}
        ctx.log(f"accuracy: hospital {h} alone (DP) {alone[h]['accuracy']:.3f} / {alone[h]['macro_f1']:.3f}")
    timing["hospitals_alone_dp"] = time.perf_counter() - t
    results["hospitals_alone_dp"] = {
        "accuracy": sum(a["accuracy"] for a in alone.values()) / len(alone),
        "macro_f1": sum(a["macro_f1"] for a in alone.values()) / len(alone),
        "num_examples": len(test),
        "per_hospital": alone,
        "note": "mean over hospitals of each one's own model on the global test set",
    }

    # 4. federated DP (FedAvg in-process), eps 8 per hospital over all rounds
    t = time.perf_counter()
    plan = {}
    for h, ds in sites.items():
        q, steps = plan_steps(len(ds), BATCH, 1)
        delta = site_delta(len(ds))
        plan[h] = (q, steps, delta, calibrate_noise(EPSILON, delta, q, steps * rounds, "prv"))
    global_state = {k: v.clone() for k, v in state0.items()}
    for r in range(rounds):
        states, weights = [], []
        for h, ds in sites.items():
            q, steps, delta, sigma = plan[h]
            model = build_model(bb, config, global_state)
            train(model, ds, TrainSettings(epochs=1, batch_size=BATCH, lr=LR, noise_multiplier=sigma, max_grad_norm=MAX_GRAD_NORM), cpu, **_generators(ctx.seed + 100 * (r + 1) + int(h)))
            states.append(model.trainable_state())
            weights.append(len(ds))
        total = sum(weights)
        global_state = {k: sum(s[k] * (n / total) for s, n in zip(states, weights)) for k in global_state}
        ctx.log(f"accuracy: federated round {r + 1}/{rounds} done")
    results["federated_dp"] = {
        **_summary(evaluate(build_model(bb, config, global_state), test, len(labels), cpu)),
        "rounds": rounds,
        "per_hospital_privacy": {h: {"sigma": p[3], "sample_rate": p[0], "steps": p[1] * rounds, "delta": p[2],
                                      "epsilon_spent": compute_epsilon("prv", [(p[3], p[0], p[1])] * rounds, p[2])} for h, p in plan.items()},
    }
    timing["federated_dp"] = time.perf_counter() - t
    ctx.log(f"accuracy: federated DP {results['federated_dp']['accuracy']:.3f} / {results['federated_dp']['macro_f1']:.3f}")

    return {
        "config": {
            "rows_used": len(subset), "rows_in_file": len(records), "labels": labels, "hospitals": HOSPITALS, "alpha": ALPHA,
            "test_frac": TEST_FRAC, "test_rows": len(test), "hospital_train_rows": {h: len(d) for h, d in sites.items()},
            "hospital_label_counts": site_counts, "max_length": max_length, "n_virtual_tokens": n_virtual, "batch": BATCH, "lr": LR,
            "epochs_central_and_alone": epochs, "federated_rounds": rounds, "federated_local_epochs": 1, "epsilon": EPSILON,
            "max_grad_norm": MAX_GRAD_NORM, "accountant": "prv", "seed": ctx.seed,
            "federation": "in-process FedAvg (client/trainer.train + example-weighted average of trainable_state), not Flower transport",
            "linear_probe": "torch L-BFGS multinomial logistic regression, sklearn-default objective (L2, C=1); scikit-learn not installed",
        },
        "results": results,
        "readme_linear_probe_reference": README_PROBE,
        "seconds_per_mode": timing,
    }


NAMES = {
    "linear_probe": "linear probe, frozen embeddings (central, non-private)",
    "central_prompt_nonprivate": "prompt tuning, centralised, NON-private",
    "hospitals_alone_dp": "each hospital alone, DP eps 8 (mean of 3)",
    "federated_dp": "federated (FedAvg), DP eps 8",
}


def markdown(r: dict) -> str:
    c, res = r["config"], r["results"]
    rows = [[NAMES[k], v["accuracy"], v["macro_f1"], round(r["seconds_per_mode"][k])] for k, v in res.items()]
    for h, a in res["hospitals_alone_dp"]["per_hospital"].items():
        rows.append([f"  hospital {h} alone ({a['n_train']} train rows, sigma {a['sigma']:.3f}, eps {a['epsilon_spent']:.2f})", a["accuracy"], a["macro_f1"], ""])
    t = md_table(["mode (global test set)", "accuracy", "macro-F1", "seconds"], rows)
    fed = res["federated_dp"]["per_hospital_privacy"]
    return "\n\n".join([
        f"{c['rows_used']} of {c['rows_in_file']} rows (stratified subset), {c['test_rows']} test rows, hospitals {c['hospital_train_rows']} "
        f"(label counts {c['hospital_label_counts']}), max_length {c['max_length']}, {c['n_virtual_tokens']} virtual tokens, batch {c['batch']}, "
        f"lr {c['lr']}, {c['epochs_central_and_alone']} epoch(s) central/alone, {c['federated_rounds']} federated round(s) x 1 local epoch. "
        f"Federation: {c['federation']}. Linear probe: {c['linear_probe']}.",
        t,
        "Federated privacy per hospital: " + "; ".join(f"{h}: sigma {p['sigma']:.3f}, {p['steps']} steps, eps {p['epsilon_spent']:.2f} at delta {p['delta']:g}" for h, p in fed.items()) + ".",
        f"Data README reference (linear probe, full file, 70/30 split): accuracy {r['readme_linear_probe_reference']['accuracy']} / macro-F1 {r['readme_linear_probe_reference']['macro_f1']}.",
    ])


def plot(r: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = r["results"]
    keys = list(res)
    x = range(len(keys))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar([i - 0.2 for i in x], [res[k]["accuracy"] for k in keys], width=0.4, label="accuracy")
    ax.bar([i + 0.2 for i in x], [res[k]["macro_f1"] for k in keys], width=0.4, label="macro-F1")
    ax.axhline(README_PROBE["accuracy"], color="grey", linestyle=":", label="README probe accuracy (full file)")
    ax.set_xticks(list(x), [NAMES[k].replace(", ", "\n", 1) for k in keys], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(f"global test set ({r['config']['test_rows']} rows)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]
