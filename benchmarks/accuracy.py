"""Accuracy on real medical abstracts, every mode on the same global test set, with the PRODUCT's
defaults: the federation is `FederationConfig`'s defaults (model, training recipe, rounds,
privacy), each site runs the functions a round calls (run_federation below), with the noise the site
calibrates (client/hospital.site_run: PRV, its retry margin, the delta and declared size a workspace's
site.yaml gives it); a site that refuses the plan (too few records for it) sits the run out.

Split A (client/partition.py, seed 0): a stratified 30% global test set; the other 70% over 3
hospitals with Dirichlet(0.5) label skew. Modes on it: zero-shot (round 0, no training),
linear probe and prompt tuning centralised (non-private references), each hospital alone
(non-private: logistic regression on its features; DP eps 8: the product recipe on its records
only), federated non-private (the product recipe without noise, and prompt tuning), federated DP
at eps 1, 4, 8 per hospital. DP modes run with several seeds: the tables give the mean over
seeds of the final round and of the mean of the last 3 rounds.

Split B (personalisation): the same hospitals, each hospital's rows split 70/10/20 into train,
validation and a local test split. The federation trains on the train parts (DP eps 8), then each
site personalises the global model (client/personalize.py) and every model is scored on that
site's local test split: the site's own non-private model, the global model, the personalised one.

Federated training runs in-process (Flower's FedAvg over the sites' replies) to stay cheap; the
regimes suite (benchmarks/regimes.py) runs the product's apps on the same split.
"""

from __future__ import annotations

import functools
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import TensorDataset

from .common import Context, load_corpus, md_table

if TYPE_CHECKING:
    from flwr.app import RecordDict

    from fedprompt.client.hospital import SiteRun
    from fedprompt.client.partition import Partition
    from fedprompt.common.backbone import Backbone
    from fedprompt.common.config import FederationConfig
    from fedprompt.common.model import PromptConfig
    from fedprompt.common.plan import RoundPlan
    from fedprompt.common.records import Records
    from fedprompt.server.strategy import ClassMeansHead

HOSPITALS = 3
ALPHA = 0.5
TEST_FRAC = 0.3
EPSILONS = (1.0, 4.0, 8.0)
ALONE_EPSILON = 8.0
PROMPT_DP_ROUNDS = 4  # the prompt recipe's run: the class-sums round and 3 DP-SGD rounds
PERSONAL_VAL_FRAC, PERSONAL_TEST_FRAC = 0.1, 0.2
# Centralised and federated prompt tuning (non-private references): the settings the previous
# benchmark measured best for prompt + head without noise.
# Prompt tuning from the zero-shot start (no class-sums round), the prompt at the input.
PROMPT_TUNING: dict[str, Any] = {
    "train_prompt": True,
    "optimizer": "adam",
    "lr": 0.01,
    "batch_size": 16,
    "class_sums_share": 0.0,
    "prompt_layer": 0,
}
README_PROBE = {"accuracy": 0.588, "macro_f1": 0.572}  # data README: full file, 70/30 split, seed 0


def _brief(summary: dict) -> dict:
    return {"accuracy": summary["accuracy"], "macro_f1": summary["macro_f1"], "num_examples": summary["num_examples"]}


def _generators(seed: int) -> dict:
    # Fixed seeds for a reproducible benchmark only: deployed sites seed from OS entropy.
    return {
        "noise_generator": torch.Generator().manual_seed(seed),
        "sample_generator": torch.Generator().manual_seed(seed + 1),
    }


def _settled(curve: list[dict], last: int = 3) -> float:
    return statistics.fmean(p["macro_f1"] for p in curve[-last:])


def site_runs(site_sets: dict, plan: RoundPlan, eps: float | None) -> tuple[dict[str, SiteRun], dict[str, dict]]:
    """Each site's run as the product calibrates it (client/hospital.site_run, public values only: the
    site's declared size, its sampling, the noise of both phases with its retry margin) for a site that
    grants `eps`, with the delta and declared size a workspace's site.yaml gives it (client/workspace.py),
    and each site's privacy figures. A site that refuses the plan sits the run out, as in pre-flight."""
    from fedprompt.client.hospital import Refused, site_run
    from fedprompt.client.workspace import declared_weight, site_delta
    from fedprompt.common.accounting import compute_epsilon
    from fedprompt.common.config import PrivacyCap, SiteConfig
    from fedprompt.common.schedule import grouped, sgd_rounds

    runs, privacy = {}, {}
    for h, ds in site_sets.items():
        site = SiteConfig(
            hospital_id=f"hospital-{h}",
            train=Path("train.csv"),
            ledger=Path("ledger/privacy-ledger.json"),  # never read: no ledger is passed to site_run
            privacy=PrivacyCap(max_epsilon=eps or plan.target_epsilon, delta=site_delta(len(ds))),
            weight=declared_weight(len(ds)),
        )
        try:
            runs[h] = run = site_run(site, plan, len(ds))
        except Refused as exc:
            refusal = {"refused": exc.category, "refusal": str(exc)}
            privacy[h] = {"sigma": None, "delta": site.privacy.delta, "n_train": len(ds), **refusal}
            continue
        noise = run.noise
        privacy[h] = {
            "sigma": None if noise is None else noise.sgd,
            "class_sums_sigma": None if noise is None else noise.class_sums,
            "sample_rate": run.sampling.sample_rate,
            "steps": run.sampling.steps_per_round * sgd_rounds(plan),  # DP-SGD steps (the class sums are one release)
            "delta": run.delta,
            "n_train": len(ds),
            # what the site's ledger holds after the run's rounds (its retry margin unspent)
            "epsilon_spent": None
            if noise is None
            else compute_epsilon(site.privacy.accountant, grouped(run.releases(plan.replaced(round=1))), run.delta),
        }
    return runs, privacy


def _site_update(bb: Backbone, state: dict, ds: TensorDataset, plan: RoundPlan, run: SiteRun, seed: int) -> RecordDict:
    """One site's reply to round `plan.round`, through the functions client/hospital.py's round calls: the
    one-shot class sums (client/class_sums.noisy_class_sums) or DP-SGD (client/trainer.local_update)."""
    from flwr.app import MetricRecord, RecordDict

    from fedprompt.client.class_sums import noisy_class_sums
    from fedprompt.client.trainer import local_update
    from fedprompt.common.features import cached_features
    from fedprompt.common.model import build_model
    from fedprompt.common.schedule import class_sums_round
    from fedprompt.common.wire import state_to_arrays

    cpu = torch.device("cpu")
    model = build_model(bb, plan.prompt_config(), state)
    gens = _generators(seed)
    sigma = run.mechanism(plan)[0]
    if class_sums_round(plan):
        features = cached_features(model, ds, cpu)
        with torch.no_grad():
            model.head.weight.copy_(
                noisy_class_sums(features, len(plan.labels), sigma or 0.0, run.declared_size, gens["noise_generator"])
            )
    else:
        local_update(model, ds, plan, run.sampling, sigma, cpu, **gens)
    return RecordDict(
        {"arrays": state_to_arrays(model.trainable_state()), "metrics": MetricRecord({"w": run.declared_size})}
    )


def run_federation(
    bb, class_means: ClassMeansHead, state0: dict, site_sets: dict, round_plan, eps, rounds: int, seed: int, score
) -> tuple[list[dict], dict, dict]:
    """The product's rounds in-process: each site's run as it calibrates it (site_runs), its reply each
    round (_site_update), Flower's FedAvg over the replies (`aggregate_arrayrecords`, weights = declared
    sizes), and in the class-sums round the aggregator's head from the sums (server/strategy.ClassMeansHead).
    The regimes suite runs the apps themselves (fedprompt/local_engine.py). Returns the per-round
    `score(state)` curve (round 0 first), the final state and each site's privacy figures."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedprompt.common.schedule import class_sums_round
    from fedprompt.common.wire import arrays_to_state

    plan = round_plan.replaced(total_rounds=rounds, private=eps is not None, target_epsilon=eps or 1.0)
    runs, privacy = site_runs(site_sets, plan, eps)
    state, curve = {k: v.clone() for k, v in state0.items()}, [score(state0)]
    for r in range(1, rounds + 1):
        this = plan.replaced(round=r)
        replies = [
            _site_update(bb, state, site_sets[h], this, run, seed * 1000 + 10 * r + int(h)) for h, run in runs.items()
        ]
        if replies:  # else every site refused: the global model stays as it is
            state = arrays_to_state(aggregate_arrayrecords(replies, "w"))
            if class_sums_round(this):
                state = class_means.apply(state, sum(run.declared_size for run in runs.values()), len(replies), this)
        curve.append(score(state))
    return curve, state, privacy


@dataclass
class Setup:
    """What every mode shares: split A of the corpus, encoded, and the product's federation over it."""

    ctx: Context
    bb: Backbone
    fed: FederationConfig
    config: PromptConfig
    plan: RoundPlan
    state0: dict
    class_means: ClassMeansHead
    rows_in_file: int
    subset: Records
    part: Partition
    test: TensorDataset
    sites: dict[str, TensorDataset]
    pooled: TensorDataset
    seeds: int
    prompt_epochs: int
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return self.fed.label_names

    def encoded(self, rows: list) -> TensorDataset:
        return _encoded(self.bb, self.labels, self.config.max_length, rows)

    def score(self, state: dict, on: TensorDataset | None = None, model_config: PromptConfig | None = None) -> dict:
        from fedprompt.common.metrics import evaluate
        from fedprompt.common.model import build_model

        model = build_model(self.bb, model_config or self.config, state)
        return _brief(evaluate(model, self.test if on is None else on, len(self.labels), torch.device("cpu")).summary())

    def features(self, ds: TensorDataset) -> TensorDataset:
        """The initial prompt's features: what head-only training sees."""
        from fedprompt.common.features import cached_features
        from fedprompt.common.model import build_model

        return cached_features(build_model(self.bb, self.config, self.state0), ds, torch.device("cpu"))

    def federate(self, site_sets: dict, round_plan: RoundPlan, eps: float | None, rounds: int, seed: int):
        model_config = round_plan.prompt_config()
        return run_federation(
            self.bb,
            self.class_means,
            self.state0,
            site_sets,
            round_plan,
            eps,
            rounds,
            seed,
            lambda s: self.score(s, self.test, model_config),
        )

    def seeded(
        self, key: str, site_sets: dict, round_plan: RoundPlan, eps: float | None, note: str = "", rounds: int = 0
    ) -> dict:
        """A federated mode over the seeds (one seed without noise): the first seed's curve, every seed's
        final and last-3 macro-F1. `rounds`: 0 for the federation's."""
        t = time.perf_counter()
        runs = []
        for s in range(self.seeds if eps is not None else 1):
            curve, _state, privacy = self.federate(
                site_sets, round_plan, eps, rounds or self.fed.rounds, self.ctx.seed + s
            )
            runs.append({"curve": curve, "final": curve[-1]["macro_f1"], "last3": _settled(curve), "privacy": privacy})
            self.ctx.log(
                f"accuracy: {key} seed {s}: final {curve[-1]['macro_f1']:.4f}, mean of last 3 {runs[-1]['last3']:.4f}"
            )
        self.timing[key] = time.perf_counter() - t
        first = runs[0]
        return {
            **first["curve"][-1],
            "macro_f1_last3": statistics.fmean(r["last3"] for r in runs),
            "macro_f1_final_mean": statistics.fmean(r["final"] for r in runs),
            "macro_f1_seeds": [r["final"] for r in runs],
            "last3_seeds": [r["last3"] for r in runs],
            "per_round": first["curve"],
            "epsilon": eps,
            "per_hospital_privacy": first["privacy"],
            **({"note": note} if note else {}),
        }


def _encoded(bb: Backbone, labels: list[str], max_length: int, rows: list) -> TensorDataset:
    from fedprompt.common.encoding import encode

    index = {name: i for i, name in enumerate(labels)}
    return encode(bb.tokenizer, [t for t, _ in rows], [index[y] for _, y in rows], max_length).dataset


def load(ctx: Context) -> Setup:
    """The corpus, its stratified subset, split A (client/partition.py) encoded, and the federation:
    FederationConfig's defaults (rounds and max_length as the run's knobs say)."""
    from fedprompt.client.partition import partition, stratified_subset
    from fedprompt.common.backbone import load_backbone
    from fedprompt.common.config import FederationConfig
    from fedprompt.common.plan import RoundPlan, initial_global_state_for, prompt_config
    from fedprompt.server.strategy import ClassMeansHead

    rows = int(ctx.knob("acc_rows", 10**9, 240))
    torch.manual_seed(ctx.seed)
    records, labels = load_corpus(ctx.data)
    subset = stratified_subset(records, rows, ctx.seed)
    bb = load_backbone(ctx.backbone)
    fed = FederationConfig(name="benchmark", labels=labels)  # the product's defaults, nothing else
    if ctx.overrides.get("acc_rounds"):
        fed = fed.replaced(rounds=int(ctx.overrides["acc_rounds"]))
    elif ctx.quick:
        fed = fed.replaced(rounds=3)
    if ctx.overrides.get("max_length"):
        fed = fed.replaced(model=fed.model.replaced(max_length=int(ctx.overrides["max_length"])))
    config = prompt_config(fed, bb)
    plan, state0 = RoundPlan.for_run(fed, config), initial_global_state_for(fed, bb)
    part = partition(
        subset, labels, hospitals=HOSPITALS, alpha=ALPHA, test_frac=TEST_FRAC, val_frac=0.0, seed=ctx.seed, min_train=8
    )
    encoded = functools.partial(_encoded, bb, labels, config.max_length)
    s = Setup(
        ctx=ctx,
        bb=bb,
        fed=fed,
        config=config,
        plan=plan,
        state0=state0,
        class_means=ClassMeansHead.for_run(fed, bb, config),
        rows_in_file=len(records),
        subset=subset,
        part=part,
        test=encoded(part.test),
        sites={h: encoded(tr) for h, (tr, _val) in part.hospitals.items()},
        pooled=encoded([r for h in part.hospitals for r in part.hospitals[h][0]]),
        seeds=int(ctx.knob("acc_seeds", 3, 1)),
        prompt_epochs=int(ctx.knob("acc_prompt_epochs", 3, 1)),
    )
    ctx.log(
        f"accuracy: {len(subset)} rows -> test {len(s.test)}, hospitals {[len(d) for d in s.sites.values()]}, "
        f"{fed.rounds} rounds, {s.seeds} seed(s)"
    )
    return s


def references(s: Setup) -> dict[str, dict]:
    """The reference probes: zero-shot (round 0, no record seen), the centralised linear probe, and each
    hospital alone, non-private (its own logistic regression) and DP eps 8 (the product recipe, no federation)."""
    from fedprompt.client.personalize import DEFAULT_PENALTY, own_model_features, scores

    results: dict[str, dict] = {}
    results["zero_shot"] = {
        **s.score(s.state0),
        "note": "round 0 of every federation: label texts' embeddings as the head",
    }
    s.ctx.log(f"accuracy: zero-shot {results['zero_shot']['macro_f1']:.4f}")
    n = len(s.labels)
    # linear probe, centralised, non-private (logistic regression on the same features)
    t = time.perf_counter()
    head = own_model_features(s.features(s.pooled), n)
    results["linear_probe"] = {**_brief(scores(head, s.features(s.test), n)), "penalty": DEFAULT_PENALTY}
    s.timing["linear_probe"] = time.perf_counter() - t
    alone_np, alone_dp = {}, {}
    t = time.perf_counter()
    for h, ds in s.sites.items():
        head = own_model_features(s.features(ds), n)
        alone_np[h] = {**_brief(scores(head, s.features(s.test), n)), "n_train": len(ds)}
        alone_dp[h] = s.seeded(f"hospital {h} alone DP", {h: ds}, s.plan, ALONE_EPSILON)
    s.timing["hospitals_alone"] = time.perf_counter() - t
    for key, per in (("hospitals_alone_nonprivate", alone_np), ("hospitals_alone_dp", alone_dp)):
        results[key] = {
            "accuracy": statistics.fmean(a["accuracy"] for a in per.values()),
            "macro_f1": statistics.fmean(a["macro_f1"] for a in per.values()),
            "best_macro_f1": max(a["macro_f1"] for a in per.values()),
            "worst_macro_f1": min(a["macro_f1"] for a in per.values()),
            "num_examples": len(s.test),
            "per_hospital": per,
            "note": "each hospital's own model on the global test set; accuracy/macro_f1 are the means over hospitals",
        }
    return results


def federated(s: Setup) -> dict[str, dict]:
    """The federated modes: the product recipe without noise, then DP at each epsilon, and the prompt
    recipe under DP (issue 21: round 1 the class sums, then DP-SGD on a prefix before the encoder's last
    layer and the head), beside the head-only recipe at the same epsilon."""
    results = {
        "federated_nonprivate": s.seeded(
            "federated_nonprivate",
            s.sites,
            s.plan.replaced(private=False),
            None,
            "the product recipe without noise (head on frozen features)",
        )
    }
    for eps in EPSILONS:
        results[f"federated_dp_eps{eps:g}"] = s.seeded(f"federated_dp_eps{eps:g}", s.sites, s.plan, eps)
    prompt_rounds = 2 if s.ctx.quick else PROMPT_DP_ROUNDS
    prompt_plan = s.plan.replaced(
        train_prompt=True, prompt_layer=int(s.bb.model.config.num_hidden_layers) - 1, prompt_style="prefix"
    )
    results[f"federated_prompt_dp_eps{ALONE_EPSILON:g}"] = s.seeded(
        f"federated_prompt_dp_eps{ALONE_EPSILON:g}",
        s.sites,
        prompt_plan,
        ALONE_EPSILON,
        f"class sums, then {prompt_rounds - 1} DP-SGD round(s) on a prefix before the last layer and the head",
        rounds=prompt_rounds,
    )
    return results


def prompt_tuning(s: Setup, zero_shot: dict) -> dict[str, dict]:
    """Prompt tuning, non-private references: centralised (epochs over the pooled records, through
    client/trainer.local_update) and federated (rounds of one local epoch), from the zero-shot start."""
    from fedprompt.client.trainer import local_update
    from fedprompt.common.model import build_model
    from fedprompt.common.schedule import sampling

    tuning = s.plan.replaced(private=False).replaced(**PROMPT_TUNING)
    results = {}
    t = time.perf_counter()
    model, curve = build_model(s.bb, tuning.prompt_config(), s.state0), [zero_shot]
    for epoch in range(s.prompt_epochs):
        gens = _generators(s.ctx.seed + epoch)
        local_update(model, s.pooled, tuning, sampling(tuning, len(s.pooled)), None, torch.device("cpu"), **gens)
        curve.append(s.score(model.trainable_state(), s.test, tuning.prompt_config()))
        s.ctx.log(f"accuracy: central prompt tuning epoch {epoch + 1}: {curve[-1]['macro_f1']:.4f}")
    results["central_prompt_nonprivate"] = {**curve[-1], "per_round": curve, "macro_f1_last3": _settled(curve)}
    s.timing["central_prompt_nonprivate"] = time.perf_counter() - t
    t = time.perf_counter()
    curve, _, _ = s.federate(s.sites, tuning, None, s.prompt_epochs, s.ctx.seed)
    results["federated_prompt_nonprivate"] = {**curve[-1], "per_round": curve, "macro_f1_last3": _settled(curve)}
    s.timing["federated_prompt_nonprivate"] = time.perf_counter() - t
    return results


def personalization(s: Setup) -> dict:
    """Split B: federated DP eps 8 on each site's train part, then each site adapts the global model
    (client/personalize.py); every model scored on the site's local test split."""
    from fedprompt.client.partition import partition
    from fedprompt.client.personalize import GLOBAL, OWN, personalize_features, scores

    t = time.perf_counter()
    part_b = partition(
        s.subset,
        s.labels,
        hospitals=HOSPITALS,
        alpha=ALPHA,
        test_frac=TEST_FRAC,
        val_frac=PERSONAL_VAL_FRAC,
        local_test_frac=PERSONAL_TEST_FRAC,
        seed=s.ctx.seed,
        min_train=8,
    )
    train_b = {h: s.encoded(tr) for h, (tr, _val) in part_b.hospitals.items()}
    _, global_b, privacy_b = s.federate(train_b, s.plan, ALONE_EPSILON, s.fed.rounds, s.ctx.seed)
    n, personal = len(s.labels), dict[str, dict[str, Any]]()
    for h, (_tr, val_rows) in part_b.hospitals.items():
        tr_f = s.features(train_b[h])
        local_f = s.features(s.encoded(part_b.local_tests[h]))
        chosen = personalize_features(global_b, s.config, tr_f)  # chosen by cross-validation on tr_f
        own = chosen.heads[OWN]  # the site alone, its penalty cross-validated like every candidate's
        personal[h] = {
            "n_train": len(train_b[h]),
            "n_validation": len(val_rows),
            "n_local_test": len(local_f),
            "method": chosen.method,
            "own_nonprivate": _brief(scores(own, local_f, n)),
            "global_dp": _brief(scores(chosen.heads[GLOBAL], local_f, n)),
            "personalized": _brief(scores(chosen.heads[chosen.method], local_f, n)),
        }
        p = personal[h]
        s.ctx.log(
            f"accuracy: hospital {h} local test: own {p['own_nonprivate']['macro_f1']:.3f}, global "
            f"{p['global_dp']['macro_f1']:.3f}, personalised ({chosen.method}) {p['personalized']['macro_f1']:.3f}"
        )
    s.timing["personalized"] = time.perf_counter() - t
    return {
        "per_hospital": personal,
        "federation_privacy": privacy_b,
        "note": "split B: each hospital's rows 70/10/20 train/validation/local test; scored on the local test split",
    }


def _config(s: Setup) -> dict:
    """results.json's `config`: the split, the federation's settings, the modes' own."""
    part, fed = s.part, s.fed
    return {
        "rows_used": len(s.subset),
        "rows_in_file": s.rows_in_file,
        "labels": s.labels,
        "hospitals": HOSPITALS,
        "alpha": ALPHA,
        "test_frac": TEST_FRAC,
        "test_rows": len(s.test),
        "hospital_train_rows": {h: len(d) for h, d in s.sites.items()},
        "hospital_label_counts": {
            h: [sum(1 for _, y in part.hospitals[h][0] if y == name) for name in s.labels] for h in part.hospitals
        },
        "model": vars(fed.model),
        "training": vars(fed.training),
        "rounds": fed.rounds,
        "max_grad_norm": fed.privacy.max_grad_norm,
        "prompt_tuning": PROMPT_TUNING,
        "prompt_epochs": s.prompt_epochs,
        "epsilons": list(EPSILONS),
        "alone_epsilon": ALONE_EPSILON,
        "accountant": "prv",
        "seeds": s.seeds,
        "seed": s.ctx.seed,
        "federation": (
            "in-process FedAvg over client/trainer.local_update (the daemon's training call), not Flower transport"
        ),
        "linear_probe": (
            "client/personalize.own_model_features (L-BFGS logistic regression, L2 1/C = 1) on the model's features"
        ),
    }


def run(ctx: Context) -> dict:
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # RDP side of calibration
    s = load(ctx)
    results = references(s)
    results.update(federated(s))
    results.update(prompt_tuning(s, results["zero_shot"]))
    results["personalized"] = personalization(s)
    return {
        "config": _config(s),
        "results": results,
        "targets": _targets(results),
        "readme_linear_probe_reference": README_PROBE,
        "seconds_per_mode": s.timing,
    }


def _targets(res: dict) -> list[dict]:
    """The issue's accuracy targets, each with its figures and whether it is met."""
    dp8, probe, zero = res["federated_dp_eps8"], res["linear_probe"]["macro_f1"], res["zero_shot"]["macro_f1"]
    prompt8 = res["federated_prompt_dp_eps8"]
    fed_np, central = res["federated_prompt_nonprivate"]["macro_f1"], res["central_prompt_nonprivate"]["macro_f1"]
    out = [
        {
            "target": "federated DP eps 8 macro-F1 >= centralised non-private linear probe",
            "measured": (
                f"final {dp8['macro_f1_final_mean']:.4f}, last-3 mean {dp8['macro_f1_last3']:.4f} (mean of "
                f"{len(dp8['macro_f1_seeds'])} seeds) vs {probe:.4f}"
            ),
            "met": dp8["macro_f1_last3"] >= probe,
        },
        {
            "target": "final federated DP eps 8 macro-F1 never below round 0 (zero-shot)",
            "measured": f"lowest final over seeds {min(dp8['macro_f1_seeds']):.4f} vs {zero:.4f}",
            "met": min(dp8["macro_f1_seeds"]) >= zero,
        },
        {
            "target": "federated DP eps 8 with the prompt never below the head-only recipe (last-3 mean)",
            "measured": f"{prompt8['macro_f1_last3']:.4f} vs {dp8['macro_f1_last3']:.4f}",
            "met": prompt8["macro_f1_last3"] >= dp8["macro_f1_last3"],
        },
        {
            "target": "federated non-private (prompt tuning) >= centralised prompt tuning - 2 points",
            "measured": f"{fed_np:.4f} vs {central:.4f} - 0.02 = {central - 0.02:.4f}",
            "met": fed_np >= central - 0.02,
        },
    ]
    per = res["personalized"]["per_hospital"]
    beats = {
        h: all(p["personalized"][m] > max(p["own_nonprivate"][m], p["global_dp"][m]) for m in ("accuracy", "macro_f1"))
        for h, p in per.items()
    }
    out.append(
        {
            "target": (
                "personalised beats the site's own non-private model and the global model on its local test split "
                "(accuracy and macro-F1), every hospital"
            ),
            "measured": "; ".join(
                f"h{h}: acc {p['personalized']['accuracy']:.3f} vs own {p['own_nonprivate']['accuracy']:.3f} / global "
                f"{p['global_dp']['accuracy']:.3f}, F1 {p['personalized']['macro_f1']:.3f} vs "
                f"{p['own_nonprivate']['macro_f1']:.3f} / {p['global_dp']['macro_f1']:.3f}"
                for h, p in per.items()
            ),
            "met": all(beats.values()),
        }
    )
    return out


NAMES = {
    "zero_shot": "zero-shot (round 0: label texts, no training, no privacy spent)",
    "linear_probe": "linear probe, frozen features (central, non-private)",
    "hospitals_alone_nonprivate": "each hospital alone, non-private (mean of 3)",
    "hospitals_alone_dp": "each hospital alone, DP eps 8 (mean of 3)",
    "federated_nonprivate": "federated, product recipe, NON-private",
    "federated_dp_eps1": "federated DP, eps 1 per hospital",
    "federated_dp_eps4": "federated DP, eps 4 per hospital",
    "federated_dp_eps8": "federated DP, eps 8 per hospital",
    "federated_prompt_dp_eps8": "federated DP, eps 8, prompt recipe (class sums + DP-SGD on a last-layer prefix)",
    "central_prompt_nonprivate": "prompt tuning, centralised, NON-private",
    "federated_prompt_nonprivate": "prompt tuning, federated, NON-private",
}


def markdown(r: dict) -> str:
    c, res = r["config"], r["results"]
    rows = []
    for k, name in NAMES.items():
        v = res[k]
        rows.append(
            [
                name,
                v["accuracy"],
                v["macro_f1"],
                v.get("macro_f1_last3", float("nan")),
                round(r["seconds_per_mode"].get(k, 0)),
            ]
        )
    for key in ("hospitals_alone_nonprivate", "hospitals_alone_dp"):
        for h, a in res[key]["per_hospital"].items():
            rows.append(
                [
                    f"  hospital {h} ({a.get('n_train', '')} train rows), {NAMES[key].split(', ')[1].split(' (')[0]}",
                    a["accuracy"],
                    a["macro_f1"],
                    a.get("macro_f1_last3", float("nan")),
                    "",
                ]
            )
    curves = {k: v["per_round"] for k, v in res.items() if "per_round" in v}
    longest = max(len(v) for v in curves.values())
    per_round = md_table(
        ["mode", *[f"r{i}" for i in range(longest)]],
        [[NAMES[k], *[p["macro_f1"] for p in v], *[""] * (longest - len(v))] for k, v in curves.items()],
    )
    privacy = []
    for k, v in res.items():
        for h, p in v.get("per_hospital_privacy", {}).items():
            if p.get("refused"):  # the site sat the run out: nothing trained, nothing spent
                privacy.append([NAMES.get(k, k), h, p["n_train"], f"refused ({p['refused']})", "", "", p["delta"], 0.0])
            elif p["sigma"] is not None:
                privacy.append(
                    [
                        NAMES.get(k, k),
                        h,
                        p["n_train"],
                        p["sigma"],
                        p["sample_rate"],
                        p["steps"],
                        p["delta"],
                        p["epsilon_spent"],
                    ]
                )
    seeds = md_table(
        ["mode", "final macro-F1 per seed", "last-3 mean per seed"],
        [
            [
                NAMES[k],
                ", ".join(f"{x:.3f}" for x in v["macro_f1_seeds"]),
                ", ".join(f"{x:.3f}" for x in v["last3_seeds"]),
            ]
            for k, v in res.items()
            if "macro_f1_seeds" in v
        ],
    )
    pers = []
    for h, p in res["personalized"]["per_hospital"].items():
        for label, key in (
            ("own model, non-private", "own_nonprivate"),
            ("global model, DP eps 8", "global_dp"),
            (f"personalised ({p['method']})", "personalized"),
        ):
            pers.append(
                [
                    f"hospital {h} ({p['n_train']} train / {p['n_local_test']} local test)",
                    label,
                    p[key]["accuracy"],
                    p[key]["macro_f1"],
                ]
            )
    targets = md_table(
        ["target", "measured (macro-F1)", ""],
        [[t["target"], t["measured"], "**met**" if t["met"] else "**missed**"] for t in r["targets"]],
    )
    t = c["training"]
    return "\n\n".join(
        [
            f"{c['rows_used']} of {c['rows_in_file']} rows, {c['test_rows']} test rows, hospitals "
            f"{c['hospital_train_rows']} (label counts {c['hospital_label_counts']}). The product's defaults: "
            f"max_length {c['model']['max_length']}, {c['model']['n_virtual_tokens']} virtual tokens, normalised "
            f"features, zero-shot head (scale {c['model']['logit_scale']}); {c['rounds']} rounds x "
            f"{t['local_epochs']} local epoch, sample rate {t['sample_rate']}, {t['optimizer']} lr {t['lr']}, "
            f"train_prompt {t['train_prompt']}, clip {c['max_grad_norm']}, PRV accountant, delta per site from "
            f"site_delta(n). DP modes: {c['seeds']} seed(s). Prompt-tuning references: {c['prompt_tuning']}, "
            f"{c['prompt_epochs']} epoch(s)/round(s). Federation: {c['federation']}. Linear probe: "
            f"{c['linear_probe']}.",
            targets,
            md_table(
                [
                    "mode (global test set)",
                    "accuracy",
                    "macro-F1 (final)",
                    "macro-F1 (mean of last 3 rounds, over seeds)",
                    "seconds",
                ],
                rows,
            ),
            "DP modes, each seed:\n\n" + seeds,
            "Macro-F1 after each round (r0 = the zero-shot start; centralised: after each epoch; first seed):\n\n"
            + per_round,
            "Personalisation (split B), each hospital's local test split:\n\n"
            + md_table(["hospital", "model", "accuracy", "macro-F1"], pers),
            "DP per hospital:\n\n"
            + md_table(
                ["mode", "hospital", "train rows", "sigma", "sample rate", "steps", "delta", "epsilon spent"], privacy
            ),
            "Data README reference (linear probe, full file, 70/30 split, 128 tokens): accuracy "
            f"{r['readme_linear_probe_reference']['accuracy']} / "
            f"macro-F1 {r['readme_linear_probe_reference']['macro_f1']}.",
        ]
    )


def plot(r: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = r["results"]
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    def references(ax) -> None:
        ax.axhline(res["zero_shot"]["macro_f1"], linestyle="--", color="grey", label=NAMES["zero_shot"])
        ax.axhline(res["linear_probe"]["macro_f1"], linestyle="-.", color="black", label=NAMES["linear_probe"])

    keys = list(NAMES)
    x = range(len(keys))
    fig, ax = plt.subplots(figsize=(13, 4.8))
    ax.bar([i - 0.2 for i in x], [res[k]["accuracy"] for k in keys], width=0.4, label="accuracy")
    ax.bar([i + 0.2 for i in x], [res[k]["macro_f1"] for k in keys], width=0.4, label="macro-F1")
    ax.set_xticks(list(x), [NAMES[k].replace(", ", "\n", 1) for k in keys], fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_title(f"global test set ({r['config']['test_rows']} rows)")
    ax.legend(fontsize=8)
    save(fig, "accuracy.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    eps = r["config"]["epsilons"]
    ax.errorbar(
        eps,
        [res[f"federated_dp_eps{e:g}"]["macro_f1_last3"] for e in eps],
        yerr=[statistics.pstdev(res[f"federated_dp_eps{e:g}"]["last3_seeds"]) for e in eps],
        fmt="o-",
        capsize=3,
        label="federated DP (last-3 mean, over seeds)",
    )
    references(ax)
    ax.axhline(
        res["federated_nonprivate"]["macro_f1"], linestyle=":", color="green", label=NAMES["federated_nonprivate"]
    )
    ax.plot(
        [r["config"]["alone_epsilon"]],
        [res["hospitals_alone_dp"]["best_macro_f1"]],
        "s",
        color="red",
        label="best hospital alone, DP",
    )
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.set_xlabel("epsilon per hospital")
    ax.set_ylabel("macro-F1 (global test)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6)
    save(fig, "accuracy_vs_epsilon.png")

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for key, v in res.items():
        if "per_round" in v:
            ax.plot(
                range(len(v["per_round"])),
                [p["macro_f1"] for p in v["per_round"]],
                "o-",
                markersize=3,
                label=NAMES[key],
            )
    references(ax)
    ax.set_xlabel("round (0 = zero-shot start; centralised: epoch)")
    ax.set_ylabel("macro-F1 (global test)")
    ax.set_ylim(0.2, 0.8)
    ax.legend(fontsize=6)
    save(fig, "accuracy_per_round.png")

    per = res["personalized"]["per_hospital"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (key, label) in enumerate(
        (
            ("own_nonprivate", "own model (non-private)"),
            ("global_dp", "global model (DP eps 8)"),
            ("personalized", "personalised"),
        )
    ):
        ax.bar(
            [j + (i - 1) * 0.27 for j in range(len(per))],
            [p[key]["macro_f1"] for p in per.values()],
            width=0.27,
            label=label,
        )
    ax.set_xticks(range(len(per)), [f"hospital {h}" for h in per])
    ax.set_ylabel("macro-F1 on the hospital's local test split")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    save(fig, "personalization.png")
    return [p.name for p in paths]
