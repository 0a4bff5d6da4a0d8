"""Regimes: the product's default federation, run through the product itself, on splits of the
public corpus it was not tuned on.

Every regime is a real workspace on disk (federation.yaml, hospital-*/site.yaml with train /
validation / local test files, test.csv: client/workspace.write_workspace), and every federation
runs through `fedprompt.simulation.simulate` on the in-process engine (fedprompt/local_engine.py:
the product's ServerApp and ClientApp, each site calibrating its own noise and writing its own
ledger). One process for the whole suite, so the frozen features (common/features.py) of a
regime's records are computed once and serve every epsilon and seed.

Regimes (the corpus' texts under two or more labels are dropped, and all copies of a repeated
text stay on one side: client/partition.py; the held-out test set is the same stratified 30% in
every regime, so the regimes differ only in their sites):
  a  the benchmark split: 3 sites, Dirichlet(0.5) label skew (client/partition.partition)
  b  3 small sites of about 40 / 80 / 120 training records
  c  10 sites of about 60
  d  1 site of about 1,000 and 4 of about 50
  e  split (a) with the labels given as opaque codes C1..C5, each with a public description that
     is not its name (federation.yaml `labels: [{name, description}]`)
Sites of (b)-(d) draw their label mix from Dirichlet(0.5) too. Each site's rows are split into
train, validation (10%) and its own local test split (20%), on top of the sizes above.

Per regime: plain zero-shot (label embeddings against the plain encoder's record embeddings, no
prompt on either side), the federation's round 0 and round 1 (the round that carries the one-shot
class-sums release when the recipe has one), the default federation at epsilon 1 / 4 / 8 per
site (final round, and mean of the last 3 rounds, over seeds: the DP noise comes from OS entropy
as deployed, so seeds are repetitions), the central non-private probe (logistic regression on the
pooled training features), each site alone and personalised on its own local test split (the
product's comparison, client/comparison.py, from the epsilon-8 runs), updates rejected per round,
and the epsilon each site's ledger says it spent.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import statistics
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from .common import Context, central_probe, load_corpus, md_table

EPSILONS = (1.0, 4.0, 8.0)
ALPHA = 0.5
TEST_FRAC, VAL_FRAC, LOCAL_TEST_FRAC = 0.3, 0.1, 0.2
LAST = 3  # "settled": the mean of the last rounds
COMPARISON_EPSILON = 8.0  # the per-site comparison (alone / federated / personalised) of these runs
QUICK_REGIMES = ("b",)
QUICK_ROUNDS = 3
QUICK_ROWS = 600  # quick: a stratified subset of the corpus (test: 30% of it; regime b takes ~340 of the rest)
FEATURE_CACHE_ENTRIES = 512  # every split of a regime (up to 10 sites x 3 + test) stays cached across its runs

# Public descriptions for regime (e): what a clinician would write for each class of the public
# corpus, without the class' own name. (Another corpus: its label names stand as descriptions.)
OPAQUE_DESCRIPTIONS = {
    "neoplasms": "tumours and cancers: malignant or benign growths, carcinoma, lymphoma, metastasis, chemotherapy",
    "digestive system diseases": "disorders of the stomach, bowel, liver, pancreas and biliary tract",
    "nervous system diseases": "disorders of the brain, spinal cord and nerves: stroke, epilepsy, dementia, neuropathy",
    "cardiovascular diseases": (
        "disorders of the heart and blood vessels: coronary disease, hypertension, heart failure, arrhythmia"
    ),
    "general pathological conditions": (
        "conditions not specific to one organ system: infection, inflammation, injury, general symptoms"
    ),
}


@dataclass(frozen=True)
class Regime:
    key: str
    title: str
    train_sizes: tuple[int, ...] | None = None  # None: client/partition.partition's Dirichlet split
    opaque_labels: bool = False


REGIMES = (
    Regime("a", "benchmark split: 3 sites, Dirichlet 0.5"),
    Regime("b", "3 small sites (~40 / 80 / 120 training records)", (40, 80, 120)),
    Regime("c", "10 sites of ~60", (60,) * 10),
    Regime("d", "1 site of ~1,000 and 4 of ~50", (1000, 50, 50, 50, 50)),
    Regime("e", "opaque label codes C1..C5 with public descriptions (split a)", opaque_labels=True),
)


# --- splits ---------------------------------------------------------------------------------------
def sized_split(records, labels: list[str], train_sizes: tuple[int, ...], seed: int):
    """A client/partition.Partition with sites of the given training sizes: the same held-out test
    set as `partition(..., test_frac=TEST_FRAC, seed=seed)` (same draws), then each site's rows
    drawn from what is left, its label mix from Dirichlet(ALPHA) (a class that runs out gives its
    share to the others), split into train / validation / local test as `partition` does.
    Sizes are scaled down together when the corpus is too small for them."""
    from fedprompt.client.partition import Partition, _apportion, _stratified_take
    from fedprompt.common.records import text_groups

    rng = random.Random(seed)
    groups = text_groups(records.texts)
    kept = [g for g in groups if len({records.labels[i] for i in g}) == 1]  # conflicting labels: dropped
    copies = {g[0]: g for g in kept}  # a text's first row stands for all its copies
    by_class = [[g[0] for g in kept if records.labels[g[0]] == c] for c in range(len(labels))]
    test_ix, pool = _stratified_take(rng, by_class, round(TEST_FRAC * len(kept)))
    train_share = 1 - VAL_FRAC - LOCAL_TEST_FRAC
    totals = [round(s / train_share) for s in train_sizes]
    available = sum(map(len, pool))
    if sum(totals) > available:
        totals = _apportion(available, totals)

    def rows(ix: list[int]) -> list[tuple[str, str]]:
        return [(records.texts[j], labels[records.labels[j]]) for i in ix for j in copies[i]]

    left = [list(ix) for ix in pool]  # already shuffled by _stratified_take
    sites, local_tests = {}, {}
    for h, total in enumerate(totals, start=1):
        weights = [rng.gammavariate(ALPHA, 1.0) + 1e-12 for _ in labels]
        want = _apportion(total, weights)
        mine: list[list[int]] = [[] for _ in labels]
        short = 0
        for c, n in enumerate(want):
            mine[c], left[c] = left[c][:n], left[c][n:]
            short += n - len(mine[c])
        while short > 0 and any(left):  # the classes that ran out: their share from the others, largest first
            c = max(range(len(labels)), key=lambda k: len(left[k]))
            mine[c].append(left[c].pop())
            short -= 1
        size = sum(map(len, mine))
        val_ix, rest = _stratified_take(rng, mine, round(VAL_FRAC * size))
        local_ix, rest = _stratified_take(rng, rest, round(LOCAL_TEST_FRAC * size))
        train_ix = [i for ix in rest for i in ix]
        rng.shuffle(train_ix)
        sites[str(h)] = (rows(train_ix), rows(val_ix))
        local_tests[str(h)] = rows(local_ix)
    return Partition(
        list(labels),
        sites,
        rows(test_ix),
        local_tests,
        conflicting_texts=len(groups) - len(kept),
        dropped_rows=len(records) - sum(map(len, kept)),
    )


def write_regime(
    regime: Regime, records, labels: list[str], seed: int, root: Path, backbone: str | None, changes: dict
) -> Path:
    """The regime's workspace (template: each run works on a copy with fresh ledgers). `changes`:
    federation.yaml settings changed from the product's defaults (quick: rounds; tests: a short
    max_length), written here so that the sites' limits admit them as `data partition`'s would."""
    from fedprompt.client.partition import partition
    from fedprompt.client.workspace import write_workspace

    if regime.train_sizes is None:
        part = partition(
            records,
            labels,
            hospitals=3,
            alpha=ALPHA,
            test_frac=TEST_FRAC,
            val_frac=VAL_FRAC,
            local_test_frac=LOCAL_TEST_FRAC,
            seed=seed,
            min_train=8,
        )
    else:
        part = sized_split(records, labels, regime.train_sizes, seed)
    names, overrides = list(labels), dict(changes)
    if regime.opaque_labels:
        names = [f"C{i + 1}" for i in range(len(labels))]
        code = dict(zip(labels, names, strict=True))
        descriptions = [OPAQUE_DESCRIPTIONS.get(name, name) for name in labels]

        def recode(rs):
            return [(t, code[y]) for t, y in rs]

        part = replace(
            part,
            labels=names,
            hospitals={h: (recode(tr), recode(va)) for h, (tr, va) in part.hospitals.items()},
            test=recode(part.test),
            local_tests={h: recode(rs) for h, rs in part.local_tests.items()},
        )
        overrides["labels"] = [{"name": n, "description": d} for n, d in zip(names, descriptions, strict=True)]
    return write_workspace(
        root / f"regime-{regime.key}",
        name=f"regime-{regime.key}",
        labels=names,
        hospitals=part.hospitals,
        test_rows=part.test,
        local_tests=part.local_tests,
        federation_overrides=overrides,
        backbone=Path(backbone).resolve() if backbone else None,
    )


def run_copy(template: Path, dest: Path, *, target_epsilon: float) -> Path:
    """A fresh copy of a regime's workspace (no ledger spent yet) whose federation asks for
    `target_epsilon` per site, its sites' ledgers created (as `data partition` creates them)."""
    from fedprompt.client.workspace import FEDERATION_FILE, create_ledgers

    shutil.copytree(template, dest, ignore=shutil.ignore_patterns("ledger"))
    path = dest / FEDERATION_FILE
    data = yaml.safe_load(path.read_text())
    data.setdefault("privacy", {})["target_epsilon"] = target_epsilon
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    create_ledgers(dest)
    return dest


@contextlib.contextmanager
def _feature_cache(entries: int) -> Iterator[None]:
    """Room for every split of a regime in the process' frozen-feature cache for the suite's runs
    (the product keeps 16: one site's splits and the aggregator's test set)."""
    from fedprompt.common import features

    before = features.CACHE_ENTRIES
    features.CACHE_ENTRIES = max(before, entries)
    try:
        yield
    finally:
        features.CACHE_ENTRIES = before


# --- measures -------------------------------------------------------------------------------------
def _brief(summary: dict) -> dict:
    return {"accuracy": float(summary["accuracy"]), "macro_f1": float(summary["macro_f1"])}


def references(workspace: Path, backbone: str | None) -> dict:
    """Plain zero-shot and the central non-private probe on the regime's test set."""
    from fedprompt.client.workspace import load_workspace
    from fedprompt.common.backbone import load_backbone
    from fedprompt.common.encoding import encode
    from fedprompt.common.features import cached_features
    from fedprompt.common.metrics import evaluate
    from fedprompt.common.model import NO_PROMPT, build_model
    from fedprompt.common.plan import initial_global_state_for, prompt_config
    from fedprompt.common.records import load_records

    fed, sites, test_path = load_workspace(workspace)
    bb = load_backbone(backbone)
    config = prompt_config(fed, bb)
    start = initial_global_state_for(fed, bb)

    def dataset(path):
        r = load_records(path, text_field="text", label_field="label", labels=config.labels)
        return encode(bb.tokenizer, r.texts, r.labels, config.max_length).dataset

    assert test_path is not None  # every regime holds a test set
    test = dataset(test_path)
    plain = replace(config, prompt_layer=NO_PROMPT)  # the plain encoder on the record side too
    zero = evaluate(build_model(bb, plain, start), test, config.num_labels).summary()
    # the probe sees what the federation's head sees: the features of the start model
    model = build_model(bb, config, start)
    train = [cached_features(model, dataset(site.train)) for site in sites]
    probe = central_probe(train, cached_features(model, test), config.num_labels)
    return {"zero_shot_plain": _brief(zero), "central_probe": probe, "test_rows": len(test)}


def summarize_run(metrics: dict, workspace: Path) -> dict:
    """One federation's figures from its metrics.json content and its sites' ledgers."""
    from fedprompt.client.ledger import PrivacyLedger
    from fedprompt.client.workspace import load_workspace

    rounds = [r for r in metrics["rounds"] if r.get("test")]
    curve = [_brief(r["test"]) for r in rounds]
    trained = [c for r, c in zip(rounds, curve, strict=True) if r["round"] > 0]
    statuses = [
        {
            s: sum(1 for o in r["hospitals"].values() if o["status"] == s)
            for s in ("ok", "refused", "rejected", "failed")
        }
        for r in metrics["rounds"]
        if r["round"] > 0
    ]
    _, sites, _ = load_workspace(workspace)
    out = {
        "outcome": metrics["outcome"],
        "outcome_reason": metrics.get("outcome_reason"),
        "rounds": [r["round"] for r in rounds],
        "curve": curve,
        "round0": curve[0] if rounds and rounds[0]["round"] == 0 else None,
        # round 1: the first model the sites trained (the one-shot class-sums release, where the recipe has one)
        "round1": next((c for r, c in zip(rounds, curve, strict=True) if r["round"] == 1), None),
        "final": trained[-1] if trained else None,
        "last3": {k: statistics.fmean(c[k] for c in trained[-LAST:]) for k in ("accuracy", "macro_f1")}
        if trained
        else None,
        "statuses_per_round": statuses,
        "rejected_per_round": [s["rejected"] for s in statuses],
        "epsilon_spent": {s.hospital_id: PrivacyLedger.open(s.ledger).epsilon_spent() for s in sites},
        "comparison": metrics.get("hospital_comparison") or [],
    }
    return out


def _mean(runs: list[dict], part: str, key: str) -> float | None:
    xs = [r[part][key] for r in runs if r.get(part)]
    return statistics.fmean(xs) if xs else None


def run_regime(regime: Regime, workspace: Path, ctx: Context, *, epsilons, seeds: int) -> dict:
    from fedprompt.client.workspace import load_workspace
    from fedprompt.simulation import simulate

    t0 = time.perf_counter()
    fed, sites, _ = load_workspace(workspace)
    result: dict = {
        "title": regime.title,
        "labels": fed.label_texts,
        # round 1 is the recipe's one-shot DP release of class sums when it spends a share on one
        "round1_is_one_shot": fed.training.class_sums_share > 0,
        "sites": {
            s.hospital_id: {
                "train": _rows(s.train),
                "validation": _rows(s.validation),
                "local_test": _rows(s.test),
                "declared_weight": s.weight,
            }
            for s in sites
        },
    }
    result.update(references(workspace, ctx.backbone))
    ctx.log(
        f"regimes {regime.key}: {len(sites)} sites {[v['train'] for v in result['sites'].values()]}, test "
        f"{result['test_rows']}; zero-shot {result['zero_shot_plain']['macro_f1']:.3f}, central probe "
        f"{result['central_probe']['macro_f1']:.3f}"
    )
    runs_root = workspace.parent / f"runs-{regime.key}"
    feds = {}
    for eps in epsilons:
        runs = []
        for s in range(seeds):
            tag = f"eps{eps:g}-seed{s}"
            ws = run_copy(workspace, runs_root / tag / "workspace", target_epsilon=eps)
            t = time.perf_counter()
            backbone = Path(ctx.backbone) if ctx.backbone else None
            # the per-site comparison (cross-validated personalisation at every site) at one epsilon only
            metrics = simulate(
                ws, runs_root / tag / "out", backbone=backbone, engine="local", compare=eps == COMPARISON_EPSILON
            )
            run = {**summarize_run(metrics, ws), "seconds": round(time.perf_counter() - t, 1)}
            runs.append(run)
            final = run["final"]["macro_f1"] if run["final"] else float("nan")
            ctx.log(
                f"regimes {regime.key} {tag}: {run['outcome']}, final macro-F1 {final:.3f}, rejected "
                f"{sum(run['rejected_per_round'])}, eps spent max {max(run['epsilon_spent'].values()):.2f}, "
                f"{run['seconds']} s"
            )
        feds[f"{eps:g}"] = {
            "epsilon": eps,
            "runs": runs,
            **{
                f"{part}_{key}": _mean(runs, part, key)
                for part in ("final", "last3", "round0", "round1")
                for key in ("accuracy", "macro_f1")
            },
            "final_macro_f1_seeds": [r["final"]["macro_f1"] if r["final"] else None for r in runs],
            "rejected_total": sum(sum(r["rejected_per_round"]) for r in runs),
            "epsilon_spent_max": max(max(r["epsilon_spent"].values()) for r in runs),
        }
    result["federated"] = feds
    result["per_site"] = per_site(feds[f"{COMPARISON_EPSILON:g}"])
    result["targets"] = targets(result)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _rows(path: Path | None) -> int:
    if path is None:
        return 0
    from fedprompt.common.records import csv_rows, read_text

    return sum(1 for _ in csv_rows(path, read_text(path))) - 1  # less the header


def per_site(fed: dict) -> dict:
    """Each site's comparison on its local test split, mean over the seeds of one epsilon."""
    rows: dict[str, list[dict]] = {}
    for run in fed["runs"]:
        for row in run["comparison"]:
            rows.setdefault(row["hospital"], []).append(row)
    out = {}
    for hospital, rs in rows.items():
        out[hospital] = {
            "epsilon": fed["epsilon"],
            "local_test_rows": rs[0]["local_test_rows"],
            "personalized_methods": [r.get("personalized_method") for r in rs],
            **{
                model: {k: statistics.fmean(r[model][k] for r in rs) for k in ("accuracy", "macro_f1")}
                for model in ("zero_shot", "alone", "federated", "personalized")
                if all(model in r for r in rs)
            },
        }
    return out


def targets(res: dict) -> dict:
    """Issue 20's targets that this regime's figures decide (None where a figure is missing)."""
    feds = res["federated"]
    zero = res["zero_shot_plain"]["macro_f1"]
    out: dict = {"no_update_rejected": all(f["rejected_total"] == 0 for f in feds.values())}
    eight = feds[f"{COMPARISON_EPSILON:g}"]
    top, low = eight["final_macro_f1"], feds["1"]["final_macro_f1"]
    one_shot = eight["round1_macro_f1"] if res["round1_is_one_shot"] else None
    # None: no run trained at that epsilon (every site keeps the zero-shot model; nothing to compare)
    out["eps8_final_ge_zero_shot"] = None if top is None else top >= zero
    if one_shot is not None:
        out["eps8_final_ge_one_shot_class_means"] = None if top is None else top >= one_shot
    out["eps8_final_ge_probe_minus_3pt"] = None if top is None else top >= res["central_probe"]["macro_f1"] - 0.03
    out["eps1_final_ge_zero_shot"] = None if low is None else low >= zero
    sites = res["per_site"].values()
    if sites and all({"alone", "federated", "personalized"} <= set(s) for s in sites):
        out["personalized_ge_max_alone_global_minus_1pt"] = all(
            s["personalized"]["macro_f1"] >= max(s["alone"]["macro_f1"], s["federated"]["macro_f1"]) - 0.01
            for s in sites
        )
    return out


# --- suite ----------------------------------------------------------------------------------------
def run(ctx: Context) -> dict:
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    from fedprompt.client.partition import stratified_subset
    from fedprompt.common.config import FederationConfig

    rows = int(ctx.knob("acc_rows", 10**9, QUICK_ROWS))
    seeds = int(ctx.knob("acc_seeds", 3, 1))
    # None: the product's default; quick: at most QUICK_ROUNDS of it
    default_rounds = FederationConfig.model_fields["rounds"].default
    rounds = ctx.overrides.get("acc_rounds") or (min(QUICK_ROUNDS, default_rounds) if ctx.quick else None)
    changes: dict = {"rounds": rounds} if rounds else {}
    if ctx.overrides.get("max_length"):
        changes["model"] = {"max_length": int(ctx.overrides["max_length"])}
    epsilons = EPSILONS
    chosen = [r for r in REGIMES if not ctx.quick or r.key in QUICK_REGIMES]
    records, labels = load_corpus(ctx.data)
    subset = stratified_subset(records, rows, ctx.seed)
    root = ctx.out / "regimes"
    if root.exists():
        shutil.rmtree(root)  # a fresh run of the suite: its workspaces and ledgers are made here
    root.mkdir(parents=True)
    results: dict = {}
    t0 = time.perf_counter()
    with _feature_cache(FEATURE_CACHE_ENTRIES):
        for regime in chosen:
            ws = write_regime(regime, subset, labels, ctx.seed, root, ctx.backbone, changes)
            results[regime.key] = run_regime(regime, ws, ctx, epsilons=epsilons, seeds=seeds)
    return {
        "config": {
            "rows_used": len(subset),
            "rows_in_file": len(records),
            "regimes": [r.key for r in chosen],
            "epsilons": list(epsilons),
            "seeds": seeds,
            "rounds": rounds or "federation default",
            "federation_changes": changes,
            "alpha": ALPHA,
            "test_frac": TEST_FRAC,
            "val_frac": VAL_FRAC,
            "local_test_frac": LOCAL_TEST_FRAC,
            "seed": ctx.seed,
            "engine": "local (fedprompt/local_engine.py: the product's ServerApp and ClientApp in one process)",
            "workspaces": str(root),
        },
        "regimes": results,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def markdown(r: dict) -> str:
    cfg = r["config"]
    out = [
        f"Each federation runs through `fedprompt simulate`'s path on the in-process engine, the product's default "
        f"federation (rounds: {cfg['rounds']}) at each epsilon, {cfg['seeds']} seed(s) (DP noise from OS entropy; "
        f"figures are means over seeds). Held-out test: {cfg['test_frac']:.0%} of the distinct texts; texts under "
        f"conflicting labels dropped, repeated texts kept on one side. Total {r['total_seconds']} s.",
    ]
    for key, res in r["regimes"].items():
        sizes = ", ".join(f"{h.removeprefix('hospital-')}: {s['train']}" for h, s in res["sites"].items())
        out += [
            "",
            f"### ({key}) {res['title']}",
            "",
            f"Training records per site: {sizes}; test {res['test_rows']}.",
            "",
        ]
        rows = [
            [
                "plain zero-shot (label vs record embeddings, no prompt)",
                _f(res["zero_shot_plain"]["macro_f1"]),
                _f(res["zero_shot_plain"]["accuracy"]),
                "",
                "",
                "",
                "",
            ],
            [
                "central non-private probe (pooled training features)",
                _f(res["central_probe"]["macro_f1"]),
                _f(res["central_probe"]["accuracy"]),
                "",
                "",
                "",
                "",
            ],
        ]
        for eps, f in res["federated"].items():
            rows.append(
                [
                    f"federated DP eps {eps}: final (last-3 mean)",
                    f"{_f(f['final_macro_f1'])} ({_f(f['last3_macro_f1'])})",
                    f"{_f(f['final_accuracy'])} ({_f(f['last3_accuracy'])})",
                    _f(f["round0_macro_f1"]),
                    _f(f["round1_macro_f1"]),
                    f["rejected_total"],
                    f"{f['epsilon_spent_max']:.2f}",
                ]
            )
        out.append(
            md_table(
                [
                    "model",
                    "macro-F1",
                    "accuracy",
                    "round 0 F1",
                    "round 1 F1" + (" (one-shot DP class means)" if res.get("round1_is_one_shot") else ""),
                    "rejected updates",
                    "max eps spent",
                ],
                rows,
            )
        )
        if res["per_site"]:
            out += [
                "",
                f"Per site, on its own local test split (macro-F1; federated runs at eps {COMPARISON_EPSILON:g}):",
                "",
            ]
            out.append(
                md_table(
                    ["site", "local test", "zero-shot", "alone", "federated", "personalised", "eps spent (seed 0)"],
                    [
                        [
                            h,
                            s["local_test_rows"],
                            *(
                                _f(s.get(m, {}).get("macro_f1"))
                                for m in ("zero_shot", "alone", "federated", "personalized")
                            ),
                            _f(res["federated"][f"{COMPARISON_EPSILON:g}"]["runs"][0]["epsilon_spent"].get(h)),
                        ]
                        for h, s in res["per_site"].items()
                    ],
                )
            )
        untrained = [
            f"eps {eps} seed {i}: {run['outcome']} ({run['outcome_reason']})"
            for eps, f in res["federated"].items()
            for i, run in enumerate(f["runs"])
            if run["final"] is None
        ]
        if untrained:
            out += ["", "Runs that did not train: " + "; ".join(untrained) + "."]
        out += [
            "",
            "Targets: "
            + ", ".join(
                f"{k} **{'n/a (no run trained)' if v is None else 'met' if v else 'NOT met'}**"
                for k, v in res["targets"].items()
            ),
        ]
    return "\n".join(out)


def plot(r: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    for key, res in r["regimes"].items():
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for eps, f in res["federated"].items():
            curves = [run["curve"] for run in f["runs"] if run["curve"]]
            if not curves:
                continue
            n = min(map(len, curves))
            mean = [statistics.fmean(c[i]["macro_f1"] for c in curves) for i in range(n)]
            ax.plot(f["runs"][0]["rounds"][:n], mean, "o-", markersize=3, label=f"federated DP eps {eps}")
        ax.axhline(res["zero_shot_plain"]["macro_f1"], linestyle="--", color="grey", label="plain zero-shot")
        ax.axhline(res["central_probe"]["macro_f1"], linestyle="-.", color="black", label="central non-private probe")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round (0 = the federation's start)")
        ax.set_ylabel(f"macro-F1 (test, {res['test_rows']} rows)")
        ax.set_ylim(0, 1)
        ax.set_title(f"({key}) {res['title']}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"regime_{key}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(name)
    return paths
