"""Personalisation at one hospital: adapt the global model's head to the site's own records.

The prompt stays as the federation trained it, so the encoder is a fixed feature map (one
forward per record) and only the linear head changes. Candidates, simplest first:

  global      the global model unchanged;
  prior       label-prior correction, bias += log p_site(y) - log p_model(y): the first step of
              Saerens et al. (2002). The site cannot know the federation's training prior, so the
              global model's mean predicted distribution on the site's records stands for it;
  local_head  multinomial logistic regression on the site's features, started from the prior-
              corrected head, its weights pulled towards the global ones by an L2 penalty;
  own         the site alone: the same regression from zero weights (no federation at all).

The choice is made by k-fold cross-validation on the site's TRAIN split (`cv_folds`): every
candidate fitted on records (prior, local head and own model, each at every penalty) is fitted on
the other folds and predicts the held-out fold; the global model predicts every record as is. The
held-out predictions are pooled over the folds and scored once (`criterion`); the best candidate,
the simplest among ties, is then refitted on the whole train split. The validation and test splits
play no part in the choice: `personalize.json` reports every candidate's figures on them.

Nothing here leaves the site, so no privacy budget is spent: the personalised model is fitted on
the site's records WITHOUT differential privacy and must stay at that site.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from fedprompt.common.atomic import atomic_write
from fedprompt.common.backbone import load_backbone
from fedprompt.common.config import SiteConfig
from fedprompt.common.encoding import encode
from fedprompt.common.errors import InputError
from fedprompt.common.features import extract_features
from fedprompt.common.metrics import ClassCounts
from fedprompt.common.model import (
    CONFIG_NAME,
    HEAD_BIAS_KEY,
    HEAD_WEIGHT_KEY,
    WEIGHTS_NAME,
    PromptClassifier,
    PromptConfig,
    load_prompt,
    save_prompt,
)
from fedprompt.common.records import load_records

from .trainer import resolve_device
from .workspace import check_empty_target

GLOBAL, PRIOR, LOCAL_HEAD, OWN = "global", "prior", "local_head", "own"
PERSONALIZED = "personalized"  # the chosen candidate, in reports
# Simplest first, which is also safest on records unlike the site's training split: the global
# model fits nothing to the site; the prior fits one number per label; the local head refits the
# whole head but is held near the global one (it keeps what the federation learnt about labels
# the site rarely sees); the own model knows only the site's records. Ties go to the earlier.
CANDIDATES = (GLOBAL, PRIOR, LOCAL_HEAD, OWN)
METHODS = {
    GLOBAL: "global model",
    PRIOR: "label prior",
    LOCAL_HEAD: "label prior + local head",
    OWN: "the site's own model",
}
# L2 strengths of a fitted head (1/C in scikit-learn's terms, against a summed loss), strongest
# first: among penalties tied on cross-validation the one closest to its starting weights wins.
PENALTIES = (100.0, 10.0, 1.0, 0.1, 0.01)
DEFAULT_PENALTY = 1.0  # scikit-learn's default C = 1: `own_model_features` as a plain probe
FOLDS = 5
SMALL_SITE, SMALL_SITE_FOLDS = 50, 10  # records, folds; see cv_folds
EXTRA_KEY = "personalized"  # config.extra entry of a personalised model
REPORT_NAME = "personalize.json"


@dataclass(frozen=True)
class Head:
    """A linear head, as the model stores it: weight (num_labels, hidden), bias (num_labels,)."""

    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> Head:
        return cls(state[HEAD_WEIGHT_KEY].float(), state[HEAD_BIAS_KEY].float())

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.double() @ self.weight.double().T + self.bias.double()

    def into(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` with this head in place of its own (the prompt untouched)."""
        return {
            **state,
            HEAD_WEIGHT_KEY: self.weight.float().contiguous(),
            HEAD_BIAS_KEY: self.bias.float().contiguous(),
        }


def _summary(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict:
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
    return ClassCounts.from_predictions(logits.argmax(-1), labels, num_labels, loss).summary()


def scores(head: Head, feats: TensorDataset, num_labels: int) -> dict:
    """Loss, accuracy, macro-F1 (and per class) of `head` on (features, labels)."""
    x, y = feats.tensors
    return _summary(head.logits(x), y, num_labels)


def criterion(summary: dict) -> float:
    """What the choice maximises: the mean of accuracy and macro-F1. Accuracy alone would drop a
    site's rare labels for its common ones; macro-F1 alone would trade many errors on common labels
    for one more hit on a label with two records (a small site's macro-F1 swings on those). The
    hospital is judged on both, so both count, equally. Rounded so that float noise cannot break a
    tie that the counts make exact."""
    return round((summary["accuracy"] + summary["macro_f1"]) / 2, 12)


def prior_shift(head: Head, train_feats: TensorDataset, num_labels: int) -> torch.Tensor:
    """log p_site(y) - log p_model(y): p_site the site's label frequencies with add-one smoothing
    (a class the site has not seen keeps some mass), p_model the head's mean predicted
    distribution on the same records."""
    x, y = train_feats.tensors
    p_site = (torch.bincount(y, minlength=num_labels).double() + 1) / (len(y) + num_labels)
    p_model = head.logits(x).softmax(-1).mean(0)
    return p_site.log() - p_model.log()


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread for the regressions, then as before. These problems (a few thousand
    records x hidden x labels) are too small to share out: on a busy 2-core machine two threads
    made one personalisation of 12 records 16 times slower (48 s against 3 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_head(train_feats: TensorDataset, start: Head, penalty: float, init: Head | None = None) -> Head:
    """argmin over (W, b) of  sum_i CE(W x_i + b, y_i) + penalty/2 ||W - start.W||^2  (bias
    unpenalised, as scikit-learn's), by full-batch L-BFGS from `init` (default `start`): a fit at
    a nearby penalty is a warm start that saves most of the iterations."""
    x, y = train_feats.tensors
    x, y = x.double(), y.long()
    anchor = start.weight.double()
    init = init or start
    w = init.weight.double().clone().requires_grad_(True)
    b = init.bias.double().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=1000,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (
            torch.nn.functional.cross_entropy(x @ w.T + b, y, reduction="sum") + penalty / 2 * ((w - anchor) ** 2).sum()
        )
        loss.backward()
        return loss

    with _one_thread():
        opt.step(closure)
    return Head(w.detach().float(), b.detach().float())


def cv_folds(labels: torch.Tensor) -> torch.Tensor | None:
    """The cross-validation fold of each training record (0..k-1), stratified and deterministic;
    None where the site has fewer than 2 records (nothing to hold out: the global model stays).

    k follows from the site's size, in this one place. FOLDS (5) folds from SMALL_SITE records
    up: each fit sees 80% of the records, and 5 x (2 x len(PENALTIES)) fits of a regression on
    frozen features take seconds. A smaller site gets up to SMALL_SITE_FOLDS folds (leave-one-out
    up to that many records): on 5 folds its fitted candidates would each lose a fifth of very few
    records, which makes them look worse than their refit on the whole split will be and tilts the
    choice towards the global model; with 10 folds each fit sees 90%, and 10 fits of a problem that
    small cost less than 5 of a large one. The smallest class count decides how well the folds can
    be stratified, not k: records are dealt out class by class, round-robin, so each fold's label
    mix is the site's (exactly when every class has at least k records), and a class with fewer
    than k records lands in as many folds as it has records, one each, so each training part holds
    all but one of them. Fewer folds would not improve that, and would shrink every training part."""
    n = len(labels)
    if n < 2:
        return None
    k = FOLDS if n >= SMALL_SITE else min(n, SMALL_SITE_FOLDS)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))  # fixed: the same split every run
    order = order[torch.sort(labels[order], stable=True).indices]  # by class, shuffled within a class
    folds = torch.empty(n, dtype=torch.long)
    folds[order] = torch.arange(n) % k
    return folds


Key = tuple[str, float | None]  # (candidate, penalty); the penalty of a regression, None for global and prior


def _keys(penalties: Sequence[float]) -> list[Key]:
    """Every (candidate, penalty), simplest first: in CANDIDATES' order, strongest penalty first."""
    strongest = sorted(penalties, reverse=True)
    return [(GLOBAL, None), (PRIOR, None)] + [(m, p) for m in (LOCAL_HEAD, OWN) for p in strongest]


def _starts(base: Head, train_feats: TensorDataset, num_labels: int) -> dict[str, Head]:
    """The global and prior heads, and the weights each regression starts from and is pulled to:
    the prior-corrected global head for the local head, zero for the site's own model."""
    prior = Head(base.weight, (base.bias.double() + prior_shift(base, train_feats, num_labels)).float())
    zero = Head(torch.zeros_like(base.weight), torch.zeros_like(base.bias))
    return {GLOBAL: base, PRIOR: prior, LOCAL_HEAD: prior, OWN: zero}


def _fit(key: Key, base: Head, train_feats: TensorDataset, num_labels: int) -> Head:
    """Candidate `key` fitted on `train_feats` (the global head `base` as is for GLOBAL)."""
    method, penalty = key
    start = _starts(base, train_feats, num_labels)[method]
    return start if penalty is None else fit_head(train_feats, start, penalty)


def cross_validate(
    base: Head, train_feats: TensorDataset, num_labels: int, folds: torch.Tensor, penalties: Sequence[float] = PENALTIES
) -> dict[Key, dict]:
    """Scores of every (candidate, penalty) on its held-out predictions, pooled over the folds.
    Pooled, not a mean of per-fold scores: a fold of a small site holds a few records per label,
    and its macro-F1 jumps with each of them."""
    x, y = train_feats.tensors
    keys = _keys(penalties)
    held_out = {key: torch.empty(len(y), num_labels, dtype=torch.float64) for key in keys}
    for fold in range(int(folds.max()) + 1):
        out = folds == fold
        part = TensorDataset(x[~out], y[~out])
        starts = _starts(base, part, num_labels)
        fitted: dict[str, Head] = {}  # each regression's last fit: the next (weaker) penalty's warm start
        for method, penalty in keys:
            if penalty is None:
                head = starts[method]
            else:
                head = fitted[method] = fit_head(part, starts[method], penalty, init=fitted.get(method))
            held_out[(method, penalty)][out] = head.logits(x[out])
    return {key: _summary(logits, y, num_labels) for key, logits in held_out.items()}


@dataclass
class PersonalizeResult:
    method: str  # one of CANDIDATES: the candidate chosen
    penalty: float | None  # the chosen regression's L2 strength; None for global and prior
    penalties: dict[str, float]  # LOCAL_HEAD's and OWN's L2 strengths, each the best on cross-validation
    heads: dict[str, Head]  # each candidate refitted on the whole train split (at its penalty), by name
    folds: int  # k of the cross-validation; 0: too few records to cross-validate
    cross_validation: dict[Key, dict] | None  # pooled held-out scores of every (candidate, penalty)
    state: dict[str, torch.Tensor]  # the personalised trainable state: global prompt, chosen head


def personalize_features(
    global_state: Mapping[str, torch.Tensor],
    config: PromptConfig,
    train_feats: TensorDataset,
    penalties: Sequence[float] = PENALTIES,
) -> PersonalizeResult:
    """Personalise the global model's head on precomputed (features, labels) of the site's train
    records, choosing by cross-validation on them."""
    n = config.num_labels
    base = Head.of(global_state)
    folds = cv_folds(train_feats.tensors[1])
    cv: dict[Key, dict] | None = None
    if folds is None:  # a single record: nothing to hold out, so no evidence against the global model
        best = {m: (m, None if m in (GLOBAL, PRIOR) else DEFAULT_PENALTY) for m in CANDIDATES}
        chosen: Key = (GLOBAL, None)
    else:
        cv = scored = cross_validate(base, train_feats, n, folds, penalties)
        keys = list(scored)  # simplest first: max() returns the first of equals
        best = {m: max((k for k in keys if k[0] == m), key=lambda k: criterion(scored[k])) for m in CANDIDATES}
        chosen = max(keys, key=lambda k: criterion(scored[k]))
    heads = {m: _fit(key, base, train_feats, n) for m, key in best.items()}
    method, penalty = chosen
    return PersonalizeResult(
        method=method,
        penalty=penalty,
        penalties={m: p for m, (_, p) in best.items() if p is not None},
        heads=heads,
        folds=0 if folds is None else int(folds.max()) + 1,
        cross_validation=cv,
        state=heads[method].into(global_state),
    )


def own_model_features(train_feats: TensorDataset, num_labels: int, penalty: float = DEFAULT_PENALTY) -> Head:
    """A plain non-private probe: the logistic regression from zero weights at one penalty. (The
    site's own model as a personalisation candidate has its penalty chosen by cross-validation:
    `personalize_features(...).heads[OWN]`.)"""
    hidden = train_feats.tensors[0].shape[1]
    return fit_head(train_feats, Head(torch.zeros(num_labels, hidden), torch.zeros(num_labels)), penalty)


# --- the site's files -------------------------------------------------------------------------


def _brief(summary: dict) -> dict:
    return {k: summary[k] for k in ("num_examples", "accuracy", "macro_f1")}


def cross_validation_table(result: PersonalizeResult) -> dict[str, dict] | None:
    """Each candidate's pooled held-out figures at its chosen penalty, and the chosen one's."""
    cv = result.cross_validation
    if cv is None:
        return None
    keys = {m: (m, result.penalties.get(m)) for m in CANDIDATES}
    keys[PERSONALIZED] = (result.method, result.penalty)
    return {name: {**_brief(cv[key]), "criterion": criterion(cv[key]), "penalty": key[1]} for name, key in keys.items()}


def personalize_site(site_path: str | Path, model_dir: str | Path, out_dir: str | Path) -> dict:
    """Personalise the export at `model_dir` on the records of the site at `site_path`; write the
    personalised model (the export's format) and personalize.json into `out_dir`, which must be
    new or empty. Reads only the site's files, the export and the backbone; returns the report."""
    out = check_empty_target(out_dir)  # before any work, and nothing written on refusal
    site = SiteConfig.load(site_path)
    model_dir = Path(model_dir)
    config, _ = load_prompt(model_dir)
    personal = config.extra.get(EXTRA_KEY)
    if personal is not None:
        whom = personal.get("hospital_id") if isinstance(personal, dict) else None
        raise InputError.at(
            model_dir / CONFIG_NAME, f"already personalised for {whom}; personalise the global export", field="extra"
        )
    # Every record file is validated before the (slow) backbone loads.
    records = {
        split: None
        if path is None
        else load_records(path, text_field=site.text_field, label_field=site.label_field, labels=config.labels)
        for split, path in (("train", site.train), ("validation", site.validation), ("test", site.test))
    }
    model = PromptClassifier.from_pretrained(model_dir, load_backbone(site.backbone))  # refuses another backbone
    device = resolve_device(site.device)
    model.to(device)

    def features(split: str) -> TensorDataset | None:
        r = records[split]
        return (
            None
            if r is None
            else extract_features(
                model, encode(model.encoder_tokenizer, r.texts, r.labels, config.max_length).dataset, device
            )
        )

    train, val, test = features("train"), features("validation"), features("test")
    assert train is not None  # site.yaml's train file is required
    global_state = model.trainable_state()
    result = personalize_features(global_state, config, train)
    heads = {**result.heads, PERSONALIZED: result.heads[result.method]}

    def table(feats: TensorDataset | None) -> dict[str, dict] | None:
        return None if feats is None else {name: scores(head, feats, config.num_labels) for name, head in heads.items()}

    base_sha = hashlib.sha256((model_dir / WEIGHTS_NAME).read_bytes()).hexdigest()
    provenance = {
        "hospital_id": site.hospital_id,
        "base_model_sha256": base_sha,
        "method": result.method,
        "penalty": result.penalty,
        "folds": result.folds,
        "cross_validation": cross_validation_table(result),
    }
    report = {
        **provenance,
        "penalties": result.penalties,
        "criterion": "mean of accuracy and macro-F1 over the train split's held-out folds, pooled",
        "cross_validation_grid": None
        if result.cross_validation is None
        else [
            {"candidate": m, "penalty": p, **_brief(s), "criterion": criterion(s)}
            for (m, p), s in result.cross_validation.items()
        ],
        "num_records": {
            name: None if feats is None else len(feats)
            for name, feats in (("train", train), ("validation", val), ("test", test))
        },
        "validation": table(val),  # reported only: the choice never sees it
        "test": table(test),
    }
    # Fitted on the site's records without DP (except the unchanged global model): says so to
    # `fedprompt predict`, and to anyone tempted to share it.
    personalised = replace(
        config, private=config.private and result.method == GLOBAL, extra={**config.extra, EXTRA_KEY: provenance}
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / REPORT_NAME, (json.dumps(report, indent=2) + "\n").encode())
    save_prompt(out, personalised, result.state)
    return report
